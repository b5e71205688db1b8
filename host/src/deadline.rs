//! Deadlines that follow a call chain (docs/protocol.md, "Deadlines").
//!
//! A request may carry a `deadline` header: the moment its caller stops
//! waiting, in milliseconds since the Unix epoch. The host sets it on every
//! request it sends (`call`, the HTTP relay, handlers' bus calls); a
//! handler's own bus calls inherit what is left of their request's, so a
//! chain gives up together instead of working for callers long gone.
//! Callers that send none (the original Python ones) keep the host's
//! `handler_timeout`. Absolute time needs the hosts' clocks to agree, as
//! NTP keeps them; a deadline further away than the handler's own timeout
//! never extends it.

use std::cell::Cell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The header's name, in AMQP headers and kombu's `headers` on Redis.
pub const HEADER: &str = "deadline";

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The deadline `timeout` from now.
pub fn after(timeout: Duration) -> u64 {
    now_ms().saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX))
}

/// What is left until `deadline` (zero once it passed).
pub fn remaining(deadline: u64) -> Duration {
    Duration::from_millis(deadline.saturating_sub(now_ms()))
}

/// A header value as a deadline: a whole number of milliseconds, sent as
/// an integer or as its decimal text. Anything else is no deadline.
pub fn parse(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

thread_local! {
    /// The deadline of the request whose handler runs on this thread.
    static CURRENT: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Runs `f` (a handler) with `deadline` as this thread's request deadline,
/// for the bus calls the handler makes from it.
pub fn with<R>(deadline: Option<u64>, f: impl FnOnce() -> R) -> R {
    let before = CURRENT.with(|c| c.replace(deadline));
    let result = f();
    CURRENT.with(|c| c.set(before));
    result
}

/// The deadline of the request whose handler runs on this thread, if any
/// (a thread a plugin started itself has none).
pub fn current() -> Option<u64> {
    CURRENT.with(Cell::get)
}

/// How long a bus call made now may wait: `timeout`, or less when the
/// current request's deadline comes first.
pub fn bounded(timeout: Duration) -> Duration {
    match current() {
        Some(deadline) => timeout.min(remaining(deadline)),
        None => timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_milliseconds_are_a_deadline() {
        assert_eq!(parse("1765100000000"), Some(1_765_100_000_000));
        for bad in ["", "-1", "1.5", "1e3", " 1", "99999999999999999999999"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_handler_s_calls_wait_no_longer_than_its_request() {
        let timeout = Duration::from_secs(10);
        assert_eq!(bounded(timeout), timeout);
        let soon = after(Duration::from_secs(1));
        let inner = with(Some(soon), || bounded(timeout));
        assert!(inner <= Duration::from_secs(1), "{inner:?}");
        assert_eq!(
            with(Some(now_ms() - 1), || bounded(timeout)),
            Duration::ZERO
        );
        assert_eq!(
            current(),
            None,
            "the thread's deadline ends with the handler"
        );
    }
}
