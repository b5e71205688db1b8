//! The watchdog: answers requests past their handler timeout, moves
//! methods whose inline handler stalls the runtime off it (see
//! `placement`), and acts on handlers still running past the grace period.
//!
//! A thread, not a task: it keeps watching when handlers stall every
//! runtime thread. What it decides is [`Watchdog::tick`], a pure function
//! of what is in flight and the time, tested without sleeping.

use std::sync::Arc;
use std::time::{Duration, Instant};

use commissaire_plugin_api::RpcError;
use tokio_util::sync::CancellationToken;

use super::inbound::Inbound;
use super::inflight::{InFlight, Overdue};

/// How often the watchdog looks.
const TICK: Duration = Duration::from_millis(20);

/// How long a worker may take to recycle itself before the watchdog ends
/// the process (its runtime is stalled by handlers that never return).
pub const RECYCLE_DEADLINE: Duration = Duration::from_secs(5);

/// How long a recycling worker waits for its requests that are not hung
/// to settle (then up to 2 s more for its acks: within
/// [`RECYCLE_DEADLINE`]).
pub const RECYCLE_DRAIN: Duration = Duration::from_secs(2);

/// What the watchdog does about hung handlers.
pub enum OnHung {
    /// Cancel this token (a worker recycles itself); exit with status 75
    /// if the process is still there [`RECYCLE_DEADLINE`] later.
    Recycle(CancellationToken),
    /// Log them (a single process cannot recycle).
    Log,
}

/// What one tick decided about hung handlers.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to do.
    Quiet,
    /// Log that `hung` handlers run past timeout and grace.
    LogHung {
        /// How many.
        hung: usize,
    },
    /// Recycle the worker.
    Recycle {
        /// How many hung.
        hung: usize,
    },
    /// The recycle did not happen in time: end the process.
    Exit,
}

/// The watchdog's memory between ticks.
pub struct Watchdog {
    recycles: bool,
    logged_hung: usize,
    recycling_since: Option<Instant>,
}

impl Watchdog {
    /// A watchdog that recycles the worker (`recycles`) or only logs.
    pub fn new(recycles: bool) -> Self {
        Self {
            recycles,
            logged_hung: 0,
            recycling_since: None,
        }
    }

    /// Decides, at `now`, what to do about `hung` handlers.
    pub fn tick(&mut self, hung: usize, now: Instant) -> Verdict {
        if let Some(since) = self.recycling_since {
            return if now.duration_since(since) > RECYCLE_DEADLINE {
                Verdict::Exit
            } else {
                Verdict::Quiet
            };
        }
        if hung == 0 {
            self.logged_hung = 0;
            return Verdict::Quiet;
        }
        if self.recycles {
            self.recycling_since = Some(now);
            return Verdict::Recycle { hung };
        }
        if hung == self.logged_hung {
            return Verdict::Quiet;
        }
        self.logged_hung = hung;
        Verdict::LogHung { hung }
    }
}

/// Starts the watchdog thread, until `stop`; timeout replies go out on
/// `runtime`.
pub fn start(
    inflight: Arc<InFlight>,
    grace: Duration,
    on_hung: OnHung,
    runtime: tokio::runtime::Handle,
    stop: CancellationToken,
) {
    let mut watchdog = Watchdog::new(matches!(on_hung, OnHung::Recycle(_)));
    let watch = move || {
        while !stop.is_cancelled() {
            std::thread::sleep(TICK);
            let now = Instant::now();
            let Overdue {
                timed_out,
                hung,
                stalling,
            } = inflight.overdue(now, grace);
            for inbound in &stalling {
                if let Some(call) = inbound.inline() {
                    call.check();
                }
            }
            for inbound in timed_out {
                if inbound.claim() {
                    runtime.spawn(async move { answer_timed_out(&inbound).await });
                }
            }
            let first = hung.first();
            match (watchdog.tick(hung.len(), now), &on_hung, first) {
                (Verdict::Exit, _, _) => {
                    tracing::error!(
                        "the worker did not recycle within {}s (its runtime is stalled); exiting",
                        RECYCLE_DEADLINE.as_secs()
                    );
                    std::process::exit(crate::control::EXIT_RECYCLE);
                }
                (Verdict::Recycle { hung }, OnHung::Recycle(recycle), Some(first)) => {
                    tracing::error!(
                        service = first.service(),
                        hung,
                        running_s = now.duration_since(first.arrived()).as_secs(),
                        "a handler is still running past its timeout and grace period: recycling this worker \
                         (its other requests get {}s to be answered, then go back to the queue)",
                        RECYCLE_DRAIN.as_secs()
                    );
                    recycle.cancel();
                }
                (Verdict::LogHung { hung }, _, Some(first)) => tracing::error!(
                    service = first.service(),
                    hung,
                    running_s = now.duration_since(first.arrived()).as_secs(),
                    "handlers still running past their timeout and grace period; \
                     run on a broker with worker processes to recycle them"
                ),
                _ => {}
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("commissaire-watchdog".into())
        .spawn(watch)
    {
        tracing::error!(error = %e, "cannot start the watchdog thread: handler timeouts are not enforced");
    }
}

/// Answers a request whose handler ran past its timeout (the caller of
/// this claimed it).
pub(super) async fn answer_timed_out(inbound: &Inbound) {
    let timeout = inbound.timeout();
    crate::throttled!(error!(
        service = inbound.service(),
        routing_key = inbound.routing_key(),
        trace_id = %inbound.trace().trace_id(),
        timeout_s = timeout.as_secs_f64(),
        "handler timed out: answering -32603"
    ));
    inbound.count_dropped(crate::metrics::Dropped::Timeout);
    let error = RpcError::internal_error(format!(
        "the handler did not return within {}s",
        timeout.as_secs_f64()
    ));
    inbound.refuse(&error).await;
    inbound.quarantine(crate::quarantine::Reason::Timeout, &error.message);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_recycles_once_and_exits_if_it_does_not_in_time() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(true);
        assert_eq!(w.tick(0, t0), Verdict::Quiet);
        assert_eq!(w.tick(2, t0), Verdict::Recycle { hung: 2 });
        assert_eq!(w.tick(2, t0 + Duration::from_secs(1)), Verdict::Quiet);
        assert_eq!(
            w.tick(2, t0 + RECYCLE_DEADLINE + Duration::from_millis(1)),
            Verdict::Exit
        );
    }

    #[test]
    fn a_single_process_logs_each_change_once() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(false);
        assert_eq!(w.tick(1, t0), Verdict::LogHung { hung: 1 });
        assert_eq!(w.tick(1, t0), Verdict::Quiet, "no flood");
        assert_eq!(w.tick(3, t0), Verdict::LogHung { hung: 3 });
        assert_eq!(w.tick(0, t0), Verdict::Quiet);
        assert_eq!(w.tick(3, t0), Verdict::LogHung { hung: 3 });
    }
}
