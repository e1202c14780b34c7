//! Reading recovery points through a `PointStore`: a point's tree and files (`view`), and
//! writing a point out (`restore`).

pub mod restore;
pub mod view;
