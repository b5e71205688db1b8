//! At most one log line per period for a problem that can repeat on every
//! request (a bad record in each listing, a bus that refuses every
//! notification), with the count of the lines left out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// How often a repeating problem is logged.
const PERIOD_SECS: u64 = 10;

/// One repeating problem's log budget.
#[derive(Debug, Default)]
pub struct Throttle {
    /// When the last line was let through (seconds since the epoch).
    last: AtomicU64,
    /// Lines left out since.
    skipped: AtomicU64,
}

impl Throttle {
    pub const fn new() -> Self {
        Self {
            last: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// `Some(lines left out before this one)` when this line may be
    /// logged now, `None` when it is to be left out.
    pub fn allow(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.allow_at(now)
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let last = self.last.load(Ordering::Relaxed);
        if (last == 0 || now >= last + PERIOD_SECS)
            && self
                .last
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.skipped.swap(0, Ordering::Relaxed));
        }
        self.skipped.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_with_the_count_left_out() {
        let t = Throttle::new();
        assert_eq!(t.allow_at(100), Some(0));
        assert_eq!(t.allow_at(101), None);
        assert_eq!(t.allow_at(109), None);
        assert_eq!(t.allow_at(110), Some(2));
        assert_eq!(t.allow_at(111), None);
    }
}
