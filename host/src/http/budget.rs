//! The bytes of request bodies the endpoint holds in memory at once, all
//! requests together, bounded by `[http] max_buffered_bytes`. Without it,
//! `max_in_flight` bodies of `max_message_bytes` each (16 GiB by default)
//! could sit in the supervisor, the one process that must not die.
//!
//! A body takes its bytes before they are read: a declared length whole,
//! a chunked body as its buffer grows. A body that finds no room is
//! refused at once, never made to wait: waiting bodies would hold their
//! connections and in-flight slots for nothing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The bytes all bodies may hold, and those they hold now.
#[derive(Debug)]
pub(super) struct BodyBudget {
    max: usize,
    used: AtomicUsize,
}

impl BodyBudget {
    /// A budget of `max` bytes.
    pub(super) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            used: AtomicUsize::new(0),
        })
    }

    /// The bytes held now.
    pub(super) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The most all bodies may hold.
    pub(super) fn max(&self) -> usize {
        self.max
    }

    fn try_take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.max)
            })
            .is_ok()
    }

    /// `bytes` for one body, if they fit.
    pub(super) fn take(self: &Arc<Self>, bytes: usize) -> Option<Held> {
        self.try_take(bytes).then(|| Held {
            budget: self.clone(),
            bytes,
        })
    }
}

/// Bytes one body holds; given back when dropped.
#[derive(Debug)]
pub(super) struct Held {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl Held {
    /// The bytes held.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Holds `total` bytes in all, giving back the rest (nothing if it
    /// holds less).
    pub(super) fn shrink_to(&mut self, total: usize) {
        let back = self.bytes.saturating_sub(total);
        self.budget.used.fetch_sub(back, Ordering::AcqRel);
        self.bytes -= back;
    }

    /// Holds `total` bytes in all, if the budget has room for the rest.
    pub(super) fn grow_to(&mut self, total: usize) -> bool {
        let more = total.saturating_sub(self.bytes);
        if more == 0 {
            return true;
        }
        let taken = self.budget.try_take(more);
        if taken {
            self.bytes = total;
        }
        taken
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_hold_at_most_the_budget_together_and_give_it_back() {
        let budget = BodyBudget::new(100);
        let mut a = budget.take(60).unwrap();
        assert!(budget.take(41).is_none(), "over the budget");
        let b = budget.take(40).unwrap();
        assert_eq!(budget.used(), 100);
        assert!(!a.grow_to(61));
        assert_eq!(a.bytes(), 60, "a failed growth holds what it held");
        drop(b);
        assert!(a.grow_to(100));
        assert!(a.grow_to(80), "growing to less takes nothing");
        assert_eq!((a.bytes(), budget.used()), (100, 100));
        a.shrink_to(30);
        a.shrink_to(50);
        assert_eq!((a.bytes(), budget.used()), (30, 30));
        drop(a);
        assert_eq!(budget.used(), 0);
        let empty = budget.take(0).unwrap();
        assert_eq!(empty.bytes(), 0);
    }
}
