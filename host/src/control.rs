//! The line protocol between the supervisor and its worker processes.
//!
//! It runs over a socket of its own: the worker's stdin is one end of a
//! Unix socket pair, read and written both ways. Stdout is the plugins'
//! (passed through to the log, never parsed), so nothing a plugin prints
//! can pass for a control line. Every line is at most [`MAX_LINE`] bytes:
//! a longer one is skipped whole.
//!
//! Worker → supervisor, each line starting with [`PREFIX`]: `initialized`
//! (its plugins' `init` returned), `consuming`,
//! `idle` (not consuming: connecting or reconnecting), `check <key>` for a
//! redelivered request, answered with how many workers it killed and how
//! many times it was checked (delivered again), `metrics <json>` (its
//! cumulative counts, see [`crate::metrics`]) and `fatal <why>`.
//!
//! Supervisor → worker: `verdict <key> <crashes> <deliveries> <alone>`
//! (`alone` is 1 when the request must run alone: it was running when a
//! worker died) and `stop`.
//! End of input means the supervisor is gone: stop too.

use std::collections::HashMap;
use std::io::{BufRead as _, Read as _, Write as _};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _};

use crate::metrics::ServiceSnapshot;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Marks a control line from a worker.
pub const PREFIX: &str = "@commissaire ";

/// The longest control line, either way, newline included.
pub const MAX_LINE: usize = 1 << 20;

/// Exit status of a worker that stopped because it was asked to.
pub const EXIT_STOPPED: i32 = 0;
/// Exit status of a worker that recycled itself (a handler hung): restart
/// it at once; not a crash.
pub const EXIT_RECYCLE: i32 = 75;
/// Exit status of a worker that cannot start (bad plugin, bad config,
/// broker unreachable with `--fail-fast`): restarting will not help.
pub const EXIT_FATAL: i32 = 78;

/// A message from a worker.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerEvent {
    /// Its plugins' `init` returned.
    Initialized,
    /// Its consumers are up.
    Consuming,
    /// It is not consuming (connecting, or the connection was lost).
    Idle,
    /// How many workers has this request killed?
    Check(u64),
    /// It cannot start, and why (its last words).
    Fatal(String),
    /// Its cumulative counts.
    Metrics(Vec<ServiceSnapshot>),
}

impl WorkerEvent {
    /// Parses a line of the control socket; `None` if it is not a
    /// control line.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix(PREFIX)?;
        if let Some(why) = rest.strip_prefix("fatal ") {
            return Some(Self::Fatal(why.to_owned()));
        }
        if let Some(json) = rest.strip_prefix("metrics ") {
            return serde_json::from_str(json).ok().map(Self::Metrics);
        }
        let mut words = rest.split_whitespace();
        match (words.next()?, words.next()) {
            ("consuming", None) => Some(Self::Consuming),
            ("initialized", None) => Some(Self::Initialized),
            ("idle", None) => Some(Self::Idle),
            ("check", Some(key)) => u64::from_str_radix(key, 16).ok().map(Self::Check),
            _ => None,
        }
    }

    /// The line for it.
    pub fn line(&self) -> String {
        match self {
            Self::Consuming => format!("{PREFIX}consuming\n"),
            Self::Initialized => format!("{PREFIX}initialized\n"),
            Self::Idle => format!("{PREFIX}idle\n"),
            Self::Check(key) => format!("{PREFIX}check {key:x}\n"),
            Self::Fatal(why) => {
                let mut why = why.replace('\n', " ");
                if why.len() > MAX_LINE / 2 {
                    let mut end = MAX_LINE / 2;
                    while !why.is_char_boundary(end) {
                        end -= 1;
                    }
                    why.truncate(end);
                }
                format!("{PREFIX}fatal {why}\n")
            }
            Self::Metrics(snapshot) => format!(
                "{PREFIX}metrics {}\n",
                serde_json::to_string(snapshot).unwrap_or_else(|_| "[]".to_owned())
            ),
        }
    }
}

/// What [`read_line`] read.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A line, without its newline.
    Text(String),
    /// A line longer than the bound, skipped.
    TooLong,
    /// The end of input.
    End,
}

/// Reads one line of at most `max` bytes (newline included) from `input`;
/// skips the rest of a longer one. Not UTF-8 is replaced, not refused.
pub async fn read_line<R: AsyncBufRead + Unpin>(
    input: &mut R,
    max: usize,
) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    let n = (&mut *input)
        .take(max as u64)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(Line::End);
    }
    if buf.last() != Some(&b'\n') {
        if buf.len() < max {
            // The end of input, with no newline.
            return Ok(Line::Text(String::from_utf8_lossy(&buf).into_owned()));
        }
        // Skip to the end of the line, a buffer at a time.
        loop {
            let chunk = input.fill_buf().await?;
            if chunk.is_empty() {
                break;
            }
            match chunk.iter().position(|b| *b == b'\n') {
                Some(at) => {
                    input.consume(at + 1);
                    break;
                }
                None => {
                    let len = chunk.len();
                    input.consume(len);
                }
            }
        }
        return Ok(Line::TooLong);
    }
    buf.pop();
    Ok(Line::Text(String::from_utf8_lossy(&buf).into_owned()))
}

/// What the supervisor tells a worker of a redelivered request: how many
/// workers it killed, how many times it came back, and whether it must
/// run alone (see [`super::crashes`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Workers that died while it ran alone.
    pub crashes: u32,
    /// Redeliveries counted, this one included.
    pub deliveries: u32,
    /// It was running when a worker died: it runs alone until it is
    /// cleared or refused.
    pub alone: bool,
}

/// The line answering `check <key>`.
pub fn verdict_line(key: u64, seen: Seen) -> String {
    format!(
        "verdict {key:x} {} {} {}\n",
        seen.crashes,
        seen.deliveries,
        u8::from(seen.alone)
    )
}

/// Reads a `verdict` line (its words after `verdict`).
fn parse_verdict<'a>(mut words: impl Iterator<Item = &'a str>) -> Option<(u64, Seen)> {
    let key = u64::from_str_radix(words.next()?, 16).ok()?;
    let crashes = words.next()?.parse().ok()?;
    let deliveries = words.next()?.parse().ok()?;
    let alone = words.next() == Some("1");
    Some((
        key,
        Seen {
            crashes,
            deliveries,
            alone,
        },
    ))
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
            let mut input = std::io::stdin().lock();
            loop {
                let mut buf = Vec::new();
                match (&mut input)
                    .take(MAX_LINE as u64)
                    .read_until(b'\n', &mut buf)
                {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if buf.last() != Some(&b'\n') {
                    // Longer than any line the supervisor sends.
                    if buf.len() >= MAX_LINE {
                        tracing::warn!("an overlong line from the supervisor; stopping");
                    }
                    break;
                }
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end();
                let mut words = line.split_whitespace();
                match words.next() {
                    Some("stop") => break,
                    Some("verdict") => {
                        let Some((key, seen)) = parse_verdict(words) else {
                            tracing::warn!(line, "unreadable verdict from the supervisor");
                            continue;
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

    /// Writes to the control socket: the worker's stdin, opened again
    /// for writing (a socket carries both ways).
    fn write(event: &WorkerEvent) {
        static OUT: OnceLock<Option<Mutex<std::fs::File>>> = OnceLock::new();
        let out = OUT.get_or_init(|| {
            use std::os::fd::AsFd as _;
            match std::io::stdin().as_fd().try_clone_to_owned() {
                Ok(fd) => Some(Mutex::new(std::fs::File::from(fd))),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach the supervisor");
                    None
                }
            }
        });
        let Some(out) = out else { return };
        let mut out = out.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = out.write_all(event.line().as_bytes()) {
            tracing::debug!(error = %e, "cannot write to the supervisor");
        }
    }

    /// Sends the supervisor this process's cumulative counts.
    pub fn metrics(&self, snapshot: Vec<ServiceSnapshot>) {
        Self::write(&WorkerEvent::Metrics(snapshot));
    }

    /// Tells the supervisor its plugins' `init` returned (past the
    /// service's `init_timeout` without this, the worker is killed).
    pub fn initialized(&self) {
        Self::write(&WorkerEvent::Initialized);
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
            WorkerEvent::Initialized,
            WorkerEvent::Idle,
            WorkerEvent::Check(0xdead_beef_0123),
            WorkerEvent::Fatal("service `demo` failed to start: no".into()),
            WorkerEvent::Metrics(vec![ServiceSnapshot {
                service: "calc".into(),
                drops: vec![0, 2, 0, 0, 0, 0, 3, 1],
                ..ServiceSnapshot::default()
            }]),
        ] {
            assert_eq!(WorkerEvent::parse(e.line().trim_end()), Some(e));
        }
        assert_eq!(WorkerEvent::parse("consuming"), None);
        assert_eq!(WorkerEvent::parse("@commissaire check zz"), None);
        assert_eq!(WorkerEvent::parse("hello from a plugin"), None);
    }
}

#[cfg(test)]
mod verdict_tests {
    use super::*;

    #[test]
    fn verdicts_round_trip() {
        for seen in [
            Seen::default(),
            Seen {
                crashes: 2,
                deliveries: 5,
                alone: true,
            },
        ] {
            let line = verdict_line(0xabc, seen);
            let mut words = line.split_whitespace();
            assert_eq!(words.next(), Some("verdict"));
            assert_eq!(parse_verdict(words), Some((0xabc, seen)));
        }
    }
}

#[cfg(test)]
mod line_tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded_and_an_overlong_one_is_skipped_whole() {
        let long = "x".repeat(100);
        let input = format!("short\n{long}\nafter\ntail");
        let mut r = tokio::io::BufReader::with_capacity(8, input.as_bytes());
        assert_eq!(
            read_line(&mut r, 16).await.ok(),
            Some(Line::Text("short".into()))
        );
        assert_eq!(read_line(&mut r, 16).await.ok(), Some(Line::TooLong));
        assert_eq!(
            read_line(&mut r, 16).await.ok(),
            Some(Line::Text("after".into()))
        );
        assert_eq!(
            read_line(&mut r, 16).await.ok(),
            Some(Line::Text("tail".into()))
        );
        assert_eq!(read_line(&mut r, 16).await.ok(), Some(Line::End));
    }
}
