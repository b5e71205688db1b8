//! Serving: load the plugins, connect, declare, consume every service with
//! `concurrency` handlers in flight per queue, answer, and stop cleanly.
//!
//! - [`lifecycle`]: one request's life, from delivery to ack.
//! - [`inbound`]: the request itself, its states and its ways out.
//! - [`session`]: one connection's declarations and consumers.
//! - [`worker`]: a worker process serving one service, reconnecting.
//! - [`in_process`]: every service in this process (the embedded
//!   `memory://` bus).
//! - [`handler_bus`]: the bus as handlers see it.
//! - [`watchdog`]: handler timeouts and hung handlers.
//! - [`placement`]: where a handler runs; [`inflight`]: what is in flight.

use std::sync::Arc;

pub mod handler_bus;
pub mod in_process;
pub mod inbound;
pub mod inflight;
pub mod lifecycle;
pub mod placement;
pub mod replay;
pub mod session;
pub mod watchdog;
pub mod worker;

pub use in_process::{run, start, RunningHost};
pub use worker::{run_worker, WorkerEnd, WorkerOptions};

use crate::control::Control;
use crate::health::Health;
use inflight::InFlight;

/// What lives as long as the process, across connections.
#[derive(Clone)]
pub struct Process {
    /// The requests in flight.
    pub inflight: Arc<InFlight>,
    /// The supervisor, in a worker process.
    pub control: Option<Arc<Control>>,
    /// What `/healthz` reports.
    pub health: Arc<Health>,
    /// What `/metrics` reports of this process.
    pub metrics: Arc<crate::metrics::Metrics>,
}
