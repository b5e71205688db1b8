//! What the HTTP endpoint counts: each connection or request it refuses to
//! protect itself, by reason, and what it holds now. One endpoint per
//! process (the supervisor's, or the in-process host's), so these are the
//! process's own counts, never summed over workers.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Defines [`HttpRefusal`] from one list: variant, label, help.
macro_rules! http_refusals {
    ($($(#[doc = $doc:literal])+ $variant:ident = $label:literal,)+) => {
        /// Why the HTTP endpoint refused a connection or a request
        /// (`commissaire_http_refused_total{reason}`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum HttpRefusal {
            $($(#[doc = $doc])+ $variant,)+
        }

        impl HttpRefusal {
            /// Every reason, in the order they are rendered.
            pub const ALL: &[Self] = &[$(Self::$variant),+];

            /// The `reason` label.
            pub const fn label(self) -> &'static str {
                match self {
                    $(Self::$variant => $label,)+
                }
            }
        }
    };
}

http_refusals! {
    /// A new connection closed at once: `[http] max_connections` open,
    /// every one of them serving a request.
    ConnectionsFull = "connections_full",
    /// A connection waiting for a request head (or idle between requests)
    /// the longest, closed to make room for a new one at `[http]
    /// max_connections`.
    Evicted = "evicted",
    /// A request head not complete within `[http] header_timeout`.
    HeadTimeout = "head_timeout",
    /// A request refused 503 at `[http] max_in_flight`.
    InFlightFull = "in_flight_full",
    /// A body refused 503: the bodies held already fill `[http]
    /// max_buffered_bytes`.
    BufferFull = "buffer_full",
    /// A body over `[bus] max_message_bytes`, refused 413.
    BodyTooLarge = "body_too_large",
    /// A body that did not arrive in time, refused 408.
    BodyTimeout = "body_timeout",
    /// A request whose params its service's contract refuses (`[http]
    /// validate`), answered -32602 without relaying it.
    InvalidParams = "invalid_params",
}

/// The HTTP endpoint's counters and gauges.
#[derive(Debug, Default)]
pub struct HttpCounts {
    refused: [AtomicU64; HttpRefusal::ALL.len()],
    connections: AtomicU64,
}

impl HttpCounts {
    /// Counts one refusal.
    pub fn refused(&self, why: HttpRefusal) {
        self.refused[why as usize].fetch_add(1, Relaxed);
    }

    /// `open` connections hold a place now.
    pub fn connections(&self, open: u64) {
        self.connections.store(open, Relaxed);
    }

    /// The counts now; `buffered_bytes` from the body budget.
    pub fn snapshot(&self, buffered_bytes: u64) -> HttpSnapshot {
        HttpSnapshot {
            refused: HttpRefusal::ALL
                .iter()
                .map(|&r| (r.label(), self.refused[r as usize].load(Relaxed)))
                .collect(),
            connections: self.connections.load(Relaxed),
            buffered_bytes,
        }
    }
}

/// The HTTP endpoint's counts at a scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpSnapshot {
    /// Refusals by reason label.
    pub refused: Vec<(&'static str, u64)>,
    /// Connections open now.
    pub connections: u64,
    /// Bytes of request bodies held now.
    pub buffered_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_counted_under_its_own_label() {
        let counts = HttpCounts::default();
        counts.refused(HttpRefusal::Evicted);
        counts.refused(HttpRefusal::Evicted);
        counts.refused(HttpRefusal::BufferFull);
        counts.connections(1);
        let snap = counts.snapshot(42);
        assert_eq!(snap.refused.len(), HttpRefusal::ALL.len());
        let labels: std::collections::BTreeSet<_> = snap.refused.iter().map(|r| r.0).collect();
        assert_eq!(labels.len(), HttpRefusal::ALL.len(), "labels are distinct");
        assert!(snap.refused.contains(&("evicted", 2)));
        assert!(snap.refused.contains(&("buffer_full", 1)));
        assert!(snap.refused.contains(&("head_timeout", 0)));
        assert_eq!((snap.connections, snap.buffered_bytes), (1, 42));
    }
}
