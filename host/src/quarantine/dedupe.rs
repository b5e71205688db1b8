//! A burst of the same poison stored once: per fingerprint, the first
//! occurrence is written at once, repeats only raise a count, written at
//! most once per [`REWRITE_EVERY`] as an entry that supersedes the last.
//! Pure: driven with the time given, tested without sleeping.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How often the count of one fingerprint is written again, at most.
pub const REWRITE_EVERY: Duration = Duration::from_secs(1);

/// Fingerprints remembered at once; the oldest is forgotten past it (its
/// next occurrence is written as a first one, with a count of its own).
pub const MAX_FINGERPRINTS: usize = 256;

/// Bytes of remembered entries at once (each is kept to write its count
/// again): the oldest are forgotten past it.
pub const MAX_REMEMBERED_BYTES: usize = 64 * 1024 * 1024;

/// What to do about one occurrence.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Write the entry now, with this count (1: the first occurrence).
    Write(u64),
    /// Write the count at this time (call [`Dedupe::due`] then).
    Later(Instant),
    /// Nothing: a write is already due later.
    Nothing,
}

struct Seen<T> {
    template: T,
    size: usize,
    count: u64,
    written: u64,
    last_write: Instant,
    pending: bool,
}

/// The fingerprints of one service seen lately, with what was written.
pub struct Dedupe<T> {
    seen: HashMap<u64, Seen<T>>,
    order: VecDeque<u64>,
    bytes: usize,
}

impl<T> Default for Dedupe<T> {
    fn default() -> Self {
        Self {
            seen: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
        }
    }
}

impl<T: Clone> Dedupe<T> {
    /// Records one occurrence of `fp` at `now`; `template` makes its entry
    /// (and its size in bytes) when it is new.
    pub fn record(
        &mut self,
        fp: u64,
        now: Instant,
        template: impl FnOnce() -> (T, usize),
    ) -> Action {
        let Some(seen) = self.seen.get_mut(&fp) else {
            let (template, size) = template();
            self.remember(fp, template, size, now);
            return Action::Write(1);
        };
        seen.count += 1;
        if seen.pending {
            return Action::Nothing;
        }
        let next = seen.last_write + REWRITE_EVERY;
        if now >= next {
            seen.written = seen.count;
            seen.last_write = now;
            return Action::Write(seen.count);
        }
        seen.pending = true;
        Action::Later(next)
    }

    /// At `now`, the count of `fp` to write, if one was left for later and
    /// is higher than the last written.
    pub fn due(&mut self, fp: u64, now: Instant) -> Option<u64> {
        let seen = self.seen.get_mut(&fp)?;
        if !seen.pending {
            return None;
        }
        seen.pending = false;
        if seen.count <= seen.written {
            return None;
        }
        seen.written = seen.count;
        seen.last_write = now;
        Some(seen.count)
    }

    /// The entry remembered for `fp`.
    pub fn template(&self, fp: u64) -> Option<T> {
        self.seen.get(&fp).map(|s| s.template.clone())
    }

    fn remember(&mut self, fp: u64, template: T, size: usize, now: Instant) {
        while !self.order.is_empty()
            && (self.order.len() >= MAX_FINGERPRINTS || self.bytes + size > MAX_REMEMBERED_BYTES)
        {
            if let Some(old) = self.order.pop_front() {
                if let Some(s) = self.seen.remove(&old) {
                    self.bytes -= s.size;
                }
            }
        }
        self.order.push_back(fp);
        self.bytes += size;
        self.seen.insert(
            fp,
            Seen {
                template,
                size,
                count: 1,
                written: 1,
                last_write: now,
                pending: false,
            },
        );
    }

    /// How many fingerprints are remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_written_once_then_its_count_once_a_second() {
        let t0 = Instant::now();
        let mut d = Dedupe::default();
        assert_eq!(d.record(7, t0, || ((), 1)), Action::Write(1));
        let later = t0 + REWRITE_EVERY;
        assert_eq!(d.record(7, t0, || ((), 1)), Action::Later(later));
        for _ in 0..4998 {
            assert_eq!(d.record(7, t0, || ((), 1)), Action::Nothing);
        }
        assert_eq!(d.due(7, later), Some(5000));
        assert_eq!(d.due(7, later), None, "written once");
        // A second later, the next repeat is written at once.
        let t2 = later + REWRITE_EVERY;
        assert_eq!(d.record(7, t2, || ((), 1)), Action::Write(5001));
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn fingerprints_and_bytes_are_bounded() {
        let t0 = Instant::now();
        let mut d = Dedupe::default();
        for fp in 0..(MAX_FINGERPRINTS as u64 + 10) {
            assert_eq!(d.record(fp, t0, || (fp, 1)), Action::Write(1));
        }
        assert_eq!(d.len(), MAX_FINGERPRINTS);
        assert_eq!(d.template(0), None, "the oldest is forgotten");
        assert_eq!(
            d.template(MAX_FINGERPRINTS as u64 + 9),
            Some(MAX_FINGERPRINTS as u64 + 9)
        );
        let mut d = Dedupe::default();
        d.record(1, t0, || (1, MAX_REMEMBERED_BYTES));
        d.record(2, t0, || (2, 1));
        assert_eq!((d.template(1), d.len()), (None, 1));
    }
}
