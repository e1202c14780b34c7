//! What an operator reads: a store's or replica's health (`status`) and what is tracked
//! (`changes`).

pub mod changes;
pub mod status;
