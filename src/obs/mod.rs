//! What an operator reads: a store's or replica's health (`status`), its changes as
//! events (`watch`), both as Prometheus metrics (`metrics`) and
//! one HTML page (`page`), and what is tracked (`changes`).

pub mod changes;
pub mod metrics;
pub mod page;
pub mod status;
pub mod watch;
