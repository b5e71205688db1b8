//! commissaire-host: serves Commissaire bus services from plugin libraries.
//!
//! - [`plugin`] loads and checks plugin libraries.
//! - [`dispatch`] turns a delivered message into the reply docs/protocol.md asks
//!   for.
//! - [`listing`] renders what `commissaire-host plugins` prints.

#![forbid(unsafe_code)]

pub mod bus;
pub mod client;
pub mod config;
pub mod contract;
pub mod control;
pub mod deadline;
pub mod describe;
pub mod discovery;
pub mod dispatch;
pub mod error;
pub mod fd_limit;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod http;
pub mod limits;
pub mod listing;
pub mod metrics;
pub mod plugin;
pub mod protocol;
pub mod quarantine;
pub mod redact;
pub mod retry;
pub mod serve;
pub mod supervise;
pub mod throttle;
pub mod trace;
