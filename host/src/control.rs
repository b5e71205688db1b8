//! The line protocol between the supervisor and its worker processes.
//!
//! Worker → supervisor, on the worker's stdout, each line starting with
//! [`PREFIX`] (anything else a plugin prints there is passed through):
//! `consuming`, `idle` (not consuming: connecting or reconnecting), and
//! `check <key>` for a redelivered request, answered with how many workers
//! it killed and how many times it was checked (delivered again).
//!
//! Supervisor → worker, on the worker's stdin: `verdict <key> <crashes>
//! <deliveries>` and `stop`. End of input means the supervisor is gone: stop too.

use std::collections::HashMap;
use std::io::{BufRead as _, Write as _};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Marks a control line on a worker's stdout.
pub const PREFIX: &str = "@commissaire ";

/// Exit status of a worker that stopped because it was asked to.
pub const EXIT_STOPPED: i32 = 0;
/// Exit status of a worker that recycled itself (a handler hung): restart
/// it at once; not a crash.
pub const EXIT_RECYCLE: i32 = 75;
/// Exit status of a worker that cannot start (bad plugin, bad config,
/// broker unreachable with `--fail-fast`): restarting will not help.
pub const EXIT_FATAL: i32 = 78;

/// A message from a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerEvent {
    /// Its consumers are up.
    Consuming,
    /// It is not consuming (connecting, or the connection was lost).
    Idle,
    /// How many workers has this request killed?
    Check(u64),
    /// It cannot start, and why (its last words).
    Fatal(String),
}

impl WorkerEvent {
    /// Parses a line of the worker's stdout; `None` if it is not a control
    /// line.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix(PREFIX)?;
        if let Some(why) = rest.strip_prefix("fatal ") {
            return Some(Self::Fatal(why.to_owned()));
        }
        let mut words = rest.split_whitespace();
        match (words.next()?, words.next()) {
            ("consuming", None) => Some(Self::Consuming),
            ("idle", None) => Some(Self::Idle),
            ("check", Some(key)) => u64::from_str_radix(key, 16).ok().map(Self::Check),
            _ => None,
        }
    }

    /// The line for it.
    pub fn line(&self) -> String {
        match self {
            Self::Consuming => format!("{PREFIX}consuming\n"),
            Self::Idle => format!("{PREFIX}idle\n"),
            Self::Check(key) => format!("{PREFIX}check {key:x}\n"),
            Self::Fatal(why) => format!("{PREFIX}fatal {}\n", why.replace('\n', " ")),
        }
    }
}

/// What the supervisor knows of a request: how many workers died while it
/// was in flight, and how many times it came back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Workers that died while it was in flight.
    pub crashes: u32,
    /// Redeliveries checked, this one included.
    pub deliveries: u32,
}

/// The line answering `check <key>`.
pub fn verdict_line(key: u64, seen: Seen) -> String {
    format!("verdict {key:x} {} {}\n", seen.crashes, seen.deliveries)
}

/// The line asking a worker to stop.
pub const STOP_LINE: &str = "stop\n";

type Waiting = Arc<Mutex<HashMap<u64, Vec<oneshot::Sender<Seen>>>>>;

/// The worker's end.
#[derive(Debug)]
pub struct Control {
    waiting: Waiting,
    stop: CancellationToken,
}

impl Control {
    /// Reads the supervisor's lines on a thread of its own; `stop` is
    /// cancelled on `stop` or end of input. If the process is still there
    /// `deadline` after that, the thread ends it (exit status 0): a worker
    /// must never outlive its supervisor, whatever it is stuck in.
    pub fn start(stop: CancellationToken, deadline: Duration) -> Arc<Self> {
        let waiting: Waiting = Arc::default();
        let control = Arc::new(Self {
            waiting: waiting.clone(),
            stop: stop.clone(),
        });
        let reader = move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                let mut words = line.split_whitespace();
                match (words.next(), words.next(), words.next(), words.next()) {
                    (Some("stop"), ..) => break,
                    (Some("verdict"), Some(key), Some(crashes), Some(deliveries)) => {
                        let (Ok(key), Ok(crashes), Ok(deliveries)) = (
                            u64::from_str_radix(key, 16),
                            crashes.parse::<u32>(),
                            deliveries.parse::<u32>(),
                        ) else {
                            continue;
                        };
                        let seen = Seen {
                            crashes,
                            deliveries,
                        };
                        let senders = waiting
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .remove(&key)
                            .unwrap_or_default();
                        for s in senders {
                            let _ = s.send(seen);
                        }
                    }
                    _ => tracing::warn!(line, "unknown line from the supervisor"),
                }
            }
            stop.cancel();
            std::thread::sleep(deadline);
            tracing::error!(
                deadline_s = deadline.as_secs(),
                "still running long after being told to stop; exiting"
            );
            std::process::exit(EXIT_STOPPED);
        };
        if let Err(e) = std::thread::Builder::new()
            .name("control".into())
            .spawn(reader)
        {
            tracing::error!(error = %e, "cannot read the supervisor's input; stopping");
            control.stop.cancel();
        }
        control
    }

    /// Tells the supervisor why this worker cannot start.
    pub fn fatal(why: &str) {
        Self::write(&WorkerEvent::Fatal(why.to_owned()));
    }

    fn write(event: &WorkerEvent) {
        let mut out = std::io::stdout().lock();
        if let Err(e) = out
            .write_all(event.line().as_bytes())
            .and_then(|()| out.flush())
        {
            tracing::debug!(error = %e, "cannot write to the supervisor");
        }
    }

    /// Tells the supervisor whether this worker consumes.
    pub fn status(&self, consuming: bool) {
        Self::write(if consuming {
            &WorkerEvent::Consuming
        } else {
            &WorkerEvent::Idle
        });
    }

    /// What the supervisor knows of the redelivered request `key` (and it
    /// counts this delivery); nothing if it does not answer within a few
    /// seconds.
    pub async fn check(&self, key: u64) -> Seen {
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default()
            .push(tx);
        Self::write(&WorkerEvent::Check(key));
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(seen)) => seen,
            _ => {
                tracing::warn!(
                    key = format!("{key:x}"),
                    "no crash count from the supervisor; running the request"
                );
                Seen::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_other_output_is_not_an_event() {
        for e in [
            WorkerEvent::Consuming,
            WorkerEvent::Idle,
            WorkerEvent::Check(0xdead_beef_0123),
            WorkerEvent::Fatal("service `demo` failed to start: no".into()),
        ] {
            assert_eq!(WorkerEvent::parse(e.line().trim_end()), Some(e));
        }
        assert_eq!(WorkerEvent::parse("consuming"), None);
        assert_eq!(WorkerEvent::parse("@commissaire check zz"), None);
        assert_eq!(WorkerEvent::parse("hello from a plugin"), None);
    }
}
