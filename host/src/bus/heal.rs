//! What the broker forgot, declared again.
//!
//! A broker may lose what the host declared while the host runs: a queue
//! deleted by hand or by a policy, an exchange deleted, a Redis database
//! flushed or restarted without persistence. The host notices (the
//! broker's `basic.cancel`, a failed passive declaration, binding members
//! missing on Redis: see [`super::BusTransport::still_declared`]) and
//! declares again what it owns, as kombu's consumer does after a cancel.
//! Each such event is one log line and one count here, read by the
//! process's metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::throttle::LogThrottle;

/// How often a consumed queue is checked for what no broker signal tells:
/// on RabbitMQ a deleted exchange (a passive declaration of the exchange
/// and of the queue, 2 commands), on Redis lost bindings (one
/// `SISMEMBER`). Per consumed queue of each worker: with `workers = 2`
/// and one queue, 2 Redis commands a second. A queue deleted on RabbitMQ
/// is told at once (`basic.cancel`).
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How many times a lost object is declared again in a row before the
/// connection is given up and made anew (each attempt waits
/// [`CHECK_EVERY`] more).
pub const MAX_ATTEMPTS: u32 = 5;

/// What was declared again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// A service queue whose consumer the broker cancelled (deleted).
    Queue,
    /// A service queue's exchange or binding (RabbitMQ: the exchange or
    /// the queue gone; Redis: the binding members gone).
    Binding,
    /// The connection's own reply queue.
    ReplyQueue,
}

impl Lost {
    /// The word for log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queue => "queue",
            Self::Binding => "binding",
            Self::ReplyQueue => "reply queue",
        }
    }
}

static REDECLARED: AtomicU64 = AtomicU64::new(0);

/// One line per kind a second: each event is logged in the normal course
/// (a queue heals at most once per [`CHECK_EVERY`]), while a script
/// deleting the queue in a loop costs a line a second, never a flood.
static LOG_BUDGET: [LogThrottle; 3] = [
    LogThrottle::new(Duration::from_secs(1)),
    LogThrottle::new(Duration::from_secs(1)),
    LogThrottle::new(Duration::from_secs(1)),
];

/// Counts and logs one object the broker lost and the host declared again
/// after `deaf_for` without it.
pub fn redeclared(what: Lost, name: &str, deaf_for: Duration) {
    REDECLARED.fetch_add(1, Ordering::Relaxed);
    if let Some(suppressed) = LOG_BUDGET[what as usize].admit() {
        tracing::warn!(
            what = what.as_str(),
            name,
            deaf_ms = deaf_for.as_millis() as u64,
            suppressed,
            "the broker lost what this host declared; declared again"
        );
    }
}

/// Objects declared again by this process so far.
pub fn redeclared_total() -> u64 {
    REDECLARED.load(Ordering::Relaxed)
}
