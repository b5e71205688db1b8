//! Crash memory: what is known of requests that were in flight when a
//! worker died, or came back, the last [`CRASH_MEMORY`] of them.

use std::collections::{HashMap, VecDeque};

use crate::control::Seen;

/// Requests remembered at most (oldest forgotten first).
const CRASH_MEMORY: usize = 10_000;

/// Per request key, its crashes and deliveries.
#[derive(Debug, Default)]
pub(super) struct CrashMemory {
    seen: HashMap<u64, Seen>,
    order: VecDeque<u64>,
}

impl CrashMemory {
    /// What is remembered of request `key`, remembered from now on.
    pub(super) fn seen(&mut self, key: u64) -> &mut Seen {
        if !self.seen.contains_key(&key) {
            self.order.push_back(key);
            if self.order.len() > CRASH_MEMORY {
                if let Some(old) = self.order.pop_front() {
                    self.seen.remove(&old);
                }
            }
        }
        self.seen.entry(key).or_default()
    }

    /// Counts a worker death while `key` was in flight; its crashes now.
    pub(super) fn count_crash(&mut self, key: u64) -> u32 {
        let seen = self.seen(key);
        seen.crashes = seen.crashes.saturating_add(1);
        seen.crashes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crashes_are_counted_and_memory_is_bounded() {
        let mut m = CrashMemory::default();
        assert_eq!(m.count_crash(7), 1);
        assert_eq!(m.count_crash(7), 2);
        for key in 100..100 + CRASH_MEMORY as u64 {
            m.seen(key);
        }
        assert_eq!(m.seen.len(), CRASH_MEMORY);
        assert_eq!(m.seen(7).crashes, 0, "the oldest is forgotten");
    }
}
