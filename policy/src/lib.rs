//! airgate-policy: the pure core of airgate.
//!
//! This crate owns the decisions: who a transport identity is, and (as later
//! issues land) what the signed bundle allows them. It takes bytes, time and
//! facts and returns values. It must never do I/O, read a clock of its own,
//! log, or pull in an async runtime: `cargo check -p airgate-policy` stays free
//! of tokio, hyper, sled and the filesystem.
#![forbid(unsafe_code)]

pub mod admission;
pub mod assertion;
pub mod audit;
pub mod bundle;
pub mod content;
pub mod decision;
pub mod identity;
pub mod time;
