//! One log line per kind of trouble per interval, not one per message: a
//! flood of hostile or failing messages must not flood the log. The first
//! event of a quiet spell is logged at once; those that follow within the
//! interval are only counted, and the next line logged says how many were
//! left out (`suppressed`). Metrics count every one.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How often a kind of per-message trouble may be logged.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// The log budget of one kind of event.
#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    logged: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    /// A budget of one line per `interval`.
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new(State {
                logged: None,
                suppressed: 0,
            }),
        }
    }

    /// Whether to log an event happening now: `Some(n)` with the number of
    /// events left out since the last line, or `None` to leave this one out.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match s.logged {
            Some(at) if now.saturating_duration_since(at) < self.interval => {
                s.suppressed += 1;
                None
            }
            _ => {
                s.logged = Some(now);
                Some(std::mem::take(&mut s.suppressed))
            }
        }
    }
}

/// Logs a `tracing` event at most once per [`INTERVAL`] for this call
/// site, adding `suppressed = <events left out since the last line>`.
#[macro_export]
macro_rules! throttled {
    ($level:ident!($($arg:tt)+)) => {{
        static THROTTLE: $crate::throttle::LogThrottle =
            $crate::throttle::LogThrottle::new($crate::throttle::INTERVAL);
        if let Some(suppressed) = THROTTLE.admit() {
            ::tracing::$level!(suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_then_the_count_of_those_left_out() {
        let t = LogThrottle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(t.admit_at(t0), Some(0));
        for i in 1..=1000 {
            assert_eq!(t.admit_at(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(t.admit_at(t0 + Duration::from_secs(10)), Some(1000));
        assert_eq!(t.admit_at(t0 + Duration::from_secs(11)), None);
        assert_eq!(t.admit_at(t0 + Duration::from_secs(30)), Some(1));
    }
}
