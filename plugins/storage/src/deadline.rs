//! The time a store call may take: its own bound, and less when the
//! request's caller stops waiting sooner.

use std::time::{Duration, SystemTime};

use commissaire_plugin_api::Message;

/// Kept back from the request's time left for answering it: a call that
/// times out still gets its error to the caller before the host's
/// watchdog answers -32603 in its place.
const ANSWER_MARGIN: Duration = Duration::from_millis(100);

/// When a request's caller stops waiting, if its host says
/// ([`Message::deadline`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Deadline(Option<SystemTime>);

impl Deadline {
    /// The deadline of the request `msg`.
    pub fn of(msg: &Message) -> Self {
        Self(msg.deadline())
    }

    /// How long a call bounded by `own` may take now: `own`, or the time
    /// left less [`ANSWER_MARGIN`] when that is shorter.
    pub fn limit(self, own: Duration) -> Duration {
        match self.0 {
            None => own,
            Some(at) => {
                let left = at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .saturating_sub(ANSWER_MARGIN);
                own.min(left)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearer_bound_wins() {
        let own = Duration::from_secs(5);
        assert_eq!(Deadline(None).limit(own), own);
        let far = Deadline(Some(SystemTime::now() + Duration::from_secs(60)));
        assert_eq!(far.limit(own), own);
        let near = Deadline(Some(SystemTime::now() + Duration::from_secs(1)));
        assert!(near.limit(own) < Duration::from_secs(1));
        let past = Deadline(Some(SystemTime::now() - Duration::from_secs(1)));
        assert_eq!(past.limit(own), Duration::ZERO);
    }
}
