//! Crash memory: what is known of requests that were in flight when a
//! worker died, or came back, the last [`CRASH_MEMORY`] of them.
//!
//! A crash blames its culprit, not its neighbours. A worker that dies with
//! one request running was killed by it: that is a crash of its own, and
//! at `crash_limit` of those it is refused. A worker that dies with several
//! running says only that one of them may have done it: none is counted,
//! each becomes a *suspect* and, when it comes back, runs alone in its
//! worker (see [`crate::serve::inflight`]), so that its next crash, if any,
//! is its own. The requests a dead worker held but had not started come
//! back because of the death, not of themselves: their next delivery is
//! *excused* (not counted against `crash_limit + 3`), at most
//! [`MAX_EXCUSED`] times, so that a request still never comes back for ever.

use std::collections::{HashMap, VecDeque};

use crate::control::Seen;

/// Requests remembered at most (oldest forgotten first).
const CRASH_MEMORY: usize = 10_000;

/// Deliveries of one request that other requests' crashes may excuse, at
/// most: past them, every delivery counts.
pub(super) const MAX_EXCUSED: u32 = 16;

/// What is known of one request.
#[derive(Debug, Default, Clone, Copy)]
struct Record {
    /// Crashes of its own: workers that died with it running alone.
    crashes: u32,
    /// Deliveries counted.
    deliveries: u32,
    /// It was running beside others when a worker died.
    suspect: bool,
    /// Deliveries to come that a death excused.
    excused: u32,
    /// Deliveries excused so far.
    excused_total: u32,
}

/// How a worker's death was accounted.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Blame {
    /// The one request running, and its crashes now.
    pub culprit: Option<(u64, u32)>,
    /// The requests running beside each other, now suspects.
    pub suspects: usize,
}

/// Per request key, its crashes, deliveries and suspicion.
#[derive(Debug, Default)]
pub(super) struct CrashMemory {
    records: HashMap<u64, Record>,
    order: VecDeque<u64>,
}

impl CrashMemory {
    /// What is remembered of request `key`, remembered from now on.
    fn record(&mut self, key: u64) -> &mut Record {
        if !self.records.contains_key(&key) {
            self.order.push_back(key);
            if self.order.len() > CRASH_MEMORY {
                if let Some(old) = self.order.pop_front() {
                    self.records.remove(&old);
                }
            }
        }
        self.records.entry(key).or_default()
    }

    /// A worker died with `running` requests running and `held` ones not
    /// started; `limit` is its service's `crash_limit`, which a count never
    /// passes.
    pub(super) fn worker_died(&mut self, running: &[u64], held: &[u64], limit: u32) -> Blame {
        let mut blame = Blame::default();
        match running {
            [culprit] => {
                let r = self.record(*culprit);
                r.crashes = r.crashes.saturating_add(1).min(limit);
                blame.culprit = Some((*culprit, r.crashes));
            }
            suspects => {
                for key in suspects {
                    let r = self.record(*key);
                    r.suspect = true;
                    Self::excuse(r);
                }
                blame.suspects = suspects.len();
            }
        }
        for key in held {
            Self::excuse(self.record(*key));
        }
        blame
    }

    /// A worker ended without a crash (recycled after a hung handler)
    /// holding these requests: they come back through no fault of theirs.
    pub(super) fn worker_recycled(&mut self, keys: &[u64]) {
        for key in keys {
            Self::excuse(self.record(*key));
        }
    }

    fn excuse(r: &mut Record) {
        if r.excused_total < MAX_EXCUSED {
            r.excused_total += 1;
            r.excused += 1;
        }
    }

    /// Request `key` came back: counts the delivery unless a death excused
    /// it, and says what the worker must know.
    pub(super) fn check(&mut self, key: u64) -> Seen {
        let r = self.record(key);
        if r.excused > 0 {
            r.excused -= 1;
        } else {
            r.deliveries = r.deliveries.saturating_add(1);
        }
        Seen {
            crashes: r.crashes,
            deliveries: r.deliveries,
            alone: r.suspect || r.crashes > 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_death_with_one_request_running_counts_against_it_never_past_the_limit() {
        let mut m = CrashMemory::default();
        for n in 1..=3 {
            let blame = m.worker_died(&[7], &[], 3);
            assert_eq!(blame.culprit, Some((7, n)));
        }
        assert_eq!(m.worker_died(&[7], &[], 3).culprit, Some((7, 3)));
        let seen = m.check(7);
        assert_eq!((seen.crashes, seen.alone), (3, true));
    }

    #[test]
    fn a_death_with_several_running_blames_none_and_makes_them_run_alone() {
        let mut m = CrashMemory::default();
        let blame = m.worker_died(&[1, 2, 3], &[4], 3);
        assert_eq!((blame.culprit, blame.suspects), (None, 3));
        for key in [1, 2, 3] {
            let seen = m.check(key);
            assert_eq!(
                seen,
                Seen {
                    crashes: 0,
                    deliveries: 0,
                    alone: true
                },
                "a suspect's coming back is the death's doing"
            );
        }
        // Held, not started: not a suspect.
        assert!(!m.check(4).alone);
        // Then the culprit crashes alone: its own crash.
        assert_eq!(m.worker_died(&[2], &[], 3).culprit, Some((2, 1)));
    }

    #[test]
    fn deliveries_a_death_caused_are_not_counted_but_stay_bounded() {
        let mut m = CrashMemory::default();
        m.worker_died(&[9], &[5], 3);
        assert_eq!(m.check(5).deliveries, 0, "excused");
        assert_eq!(m.check(5).deliveries, 1, "counted");
        for _ in 0..MAX_EXCUSED + 10 {
            m.worker_died(&[9], &[5], 3);
            m.check(5);
        }
        // MAX_EXCUSED excuses in all, the first one above.
        let counted = 1 + (MAX_EXCUSED + 10) - (MAX_EXCUSED - 1);
        assert_eq!(
            m.check(5).deliveries,
            counted + 1,
            "excused at most MAX_EXCUSED"
        );
        // The culprit's own crashes are not excused.
        assert_eq!(m.check(9).deliveries, 1);
        assert_eq!(m.records[&9].deliveries, 1);
    }

    #[test]
    fn memory_is_bounded() {
        let mut m = CrashMemory::default();
        m.worker_died(&[7], &[], 3);
        for key in 100..100 + CRASH_MEMORY as u64 {
            m.check(key);
        }
        assert_eq!(m.records.len(), CRASH_MEMORY);
        assert_eq!(m.check(7).crashes, 0, "the oldest is forgotten");
    }
}
