//! What a serving process counts, cheaply, on the request path: atomics per
//! method of each service, looked up by the routing key's method.
//!
//! Every label value is bounded here already: a method the service does not
//! have counts as [`UNKNOWN_METHOD`], error codes beyond [`MAX_CODES`] per
//! method as [`OTHER`], bus-call targets beyond [`MAX_TARGETS`] as
//! [`OTHER`]. A worker sends [`ServiceSnapshot`]s of these cumulative counts
//! to the supervisor, which adds up every worker's (see
//! `supervise::metrics`).

pub mod http;
pub mod text;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The `method` label of a method the service does not have.
pub const UNKNOWN_METHOD: &str = "_unknown";
/// The label value of what is beyond a bound.
pub const OTHER: &str = "_other";
/// Distinct error codes counted per method; more are counted as [`OTHER`].
pub const MAX_CODES: usize = 16;
/// Distinct bus-call targets counted per service; more are [`OTHER`].
pub const MAX_TARGETS: usize = 32;
/// Upper bounds (seconds) of the handler-duration histogram's buckets.
pub const BUCKETS: [f64; 14] = [
    0.000_1, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

/// One method's counts.
#[derive(Debug, Default)]
struct MethodCounts {
    ok: AtomicU64,
    /// Error replies by code (at most [`MAX_CODES`]), and beyond them.
    errors: Mutex<(Vec<(i64, u64)>, u64)>,
    took_count: AtomicU64,
    took_nanos: AtomicU64,
    /// Per bucket of [`BUCKETS`], and one past the last (+Inf).
    buckets: [AtomicU64; BUCKETS.len() + 1],
}

impl MethodCounts {
    fn outcome(&self, code: Option<i64>) {
        let Some(code) = code else {
            self.ok.fetch_add(1, Relaxed);
            return;
        };
        let mut errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
        let (codes, other) = &mut *errors;
        if let Some(entry) = codes.iter_mut().find(|(c, _)| *c == code) {
            entry.1 += 1;
        } else if codes.len() < MAX_CODES {
            codes.push((code, 1));
        } else {
            *other += 1;
        }
    }

    fn took(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.took_count.fetch_add(1, Relaxed);
        self.took_nanos
            .fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    fn snapshot(&self, name: &str) -> MethodSnapshot {
        let errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
        let mut codes: Vec<(String, u64)> =
            errors.0.iter().map(|(c, n)| (c.to_string(), *n)).collect();
        if errors.1 > 0 {
            codes.push((OTHER.to_owned(), errors.1));
        }
        MethodSnapshot {
            method: name.to_owned(),
            ok: self.ok.load(Relaxed),
            errors: codes,
            count: self.took_count.load(Relaxed),
            sum: self.took_nanos.load(Relaxed) as f64 / 1e9,
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
        }
    }
}

/// Declares [`Dropped`] and its counters from one list: a reason added
/// here is counted, reported by workers, added up by the supervisor and
/// exported, with nothing else to edit.
macro_rules! dropped_reasons {
    ($($(#[doc = $doc:literal])* $why:ident => $metric:literal, $help:literal;)*) => {
        /// Requests dropped or refused, by why (each its own counter).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Dropped {
            $($(#[doc = $doc])* $why,)*
        }

        impl Dropped {
            /// Every reason, in the order of its counter.
            pub const ALL: &'static [Dropped] = &[$(Dropped::$why),*];
            /// How many reasons there are.
            pub const COUNT: usize = Dropped::ALL.len();

            /// Its counter's name (`_total` is added on export).
            pub fn metric(self) -> &'static str {
                match self {
                    $(Dropped::$why => $metric,)*
                }
            }

            /// Its counter's help text.
            pub fn help(self) -> &'static str {
                match self {
                    $(Dropped::$why => $help,)*
                }
            }
        }
    };
}

dropped_reasons! {
    /// A request over `max_message_bytes` (answered -32600).
    Oversize => "commissaire_oversize_refused",
        "Requests over max_message_bytes, answered -32600.";
    /// A property that is not UTF-8 (answered -32600).
    NotUtf8 => "commissaire_not_utf8_refused",
        "Requests with a property that is not UTF-8, answered -32600 or dropped.";
    /// Headers nested too deep (answered -32600).
    TooDeep => "commissaire_too_deep_refused",
        "Requests whose headers nest deeper than 16 levels, answered -32600.";
    /// Not a message of the transport's format (acked without a reply).
    NotAnEnvelope => "commissaire_not_an_envelope_dropped",
        "Messages on Redis that are not kombu envelopes, acked without a reply.";
    /// A `reply_to` that is not UTF-8: acked without a reply.
    UnreadableReplyTo => "commissaire_unreadable_reply_to_dropped",
        "Requests dropped because their reply_to is not UTF-8.";
    /// A reply that could not be published: its request acked and dropped.
    ReplyDropped => "commissaire_replies_dropped",
        "Replies that could not be published: their requests acked and dropped.";
    /// Refused after crashing workers or coming back too often.
    Poison => "commissaire_poison_refused",
        "Requests refused for crashing workers or coming back too often.";
    /// Its handler did not return in time (answered -32603).
    Timeout => "commissaire_handler_timeouts",
        "Requests answered -32603 because their handler passed its timeout.";
    /// Its caller's deadline passed before its handler started (answered
    /// -32603).
    DeadlinePassed => "commissaire_deadline_passed",
        "Requests answered -32603 without running because their caller's deadline had passed.";
}

/// One service's counts in this process.
#[derive(Debug)]
pub struct ServiceMetrics {
    /// Per method, sorted by name, then [`UNKNOWN_METHOD`] last.
    methods: Vec<(Box<str>, MethodCounts)>,
    drops: Box<[AtomicU64]>,
    bus_calls: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Requests quarantined, by [`QuarantineReason`] (its index).
    quarantined: [AtomicU64; 3],
    quarantine_bound: AtomicU64,
}

impl ServiceMetrics {
    fn new<'a>(methods: impl IntoIterator<Item = &'a str>) -> Self {
        let mut list: Vec<(Box<str>, MethodCounts)> = methods
            .into_iter()
            .filter(|m| *m != UNKNOWN_METHOD)
            .map(|m| (Box::from(m), MethodCounts::default()))
            .collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        list.dedup_by(|a, b| a.0 == b.0);
        list.push((Box::from(UNKNOWN_METHOD), MethodCounts::default()));
        Self {
            methods: list,
            drops: Dropped::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            bus_calls: Mutex::default(),
            quarantined: Default::default(),
            quarantine_bound: AtomicU64::new(0),
        }
    }

    fn method(&self, routing_key: &str) -> &MethodCounts {
        let name = crate::protocol::method_of(routing_key);
        // A binary search, not a hash map: a service has a few methods, and
        // SipHash over the name cost more than the counting itself.
        let known = &self.methods[..self.methods.len() - 1];
        let i = known
            .binary_search_by(|(m, _)| (**m).cmp(name))
            .unwrap_or(known.len());
        &self.methods[i].1
    }

    /// Counts a request of `routing_key` answered (or, for a
    /// notification, ended) with `code` (`None`: a result).
    pub fn request(&self, routing_key: &str, code: Option<i64>) {
        self.method(routing_key).outcome(code);
    }

    /// Counts how long parsing and the handler took for a request of
    /// `routing_key` (its outcome is counted where it is answered).
    pub fn took(&self, routing_key: &str, took: Duration) {
        self.method(routing_key).took(took);
    }

    /// Counts a request dropped or refused for `why`.
    pub fn dropped(&self, why: Dropped) {
        self.drops[why as usize].fetch_add(1, Relaxed);
    }

    /// Counts a request quarantined for `why`.
    pub fn quarantined(&self, why: QuarantineReason) {
        self.quarantined[why as usize].fetch_add(1, Relaxed);
    }

    /// Sets the quarantine's configured bound (entries per queue; 0: off).
    pub fn set_quarantine_bound(&self, bound: u32) {
        self.quarantine_bound.store(u64::from(bound), Relaxed);
    }

    /// Counts a handler's own bus call to `routing_key`: its target is the
    /// routing key's first segment (the service it names).
    pub fn bus_call(&self, routing_key: &str, ok: bool) {
        let target = routing_key.split('.').next().unwrap_or_default();
        let outcome = if ok { "ok" } else { "error" };
        let mut calls = self
            .bus_calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let known = calls.keys().any(|(t, _)| t == target);
        let distinct = calls
            .keys()
            .filter(|(t, _)| t != OTHER)
            .map(|(t, _)| t)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let target = if known || distinct < MAX_TARGETS {
            target
        } else {
            OTHER
        };
        *calls.entry((target.to_owned(), outcome)).or_default() += 1;
    }

    fn snapshot(&self, service: &str, process: &ProcessFigures) -> ServiceSnapshot {
        ServiceSnapshot {
            service: service.to_owned(),
            methods: self
                .methods
                .iter()
                .map(|(name, m)| m.snapshot(name))
                .collect(),
            drops: self.drops.iter().map(|n| n.load(Relaxed)).collect(),
            bus_calls: self
                .bus_calls
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|((t, o), n)| (t.clone(), (*o).to_owned(), *n))
                .collect(),
            reconnects: process.reconnects,
            redeclared: process.redeclared,
            in_flight: process.in_flight,
            quarantined: self.quarantined.iter().map(|n| n.load(Relaxed)).collect(),
            quarantine_bound: self.quarantine_bound.load(Relaxed),
        }
    }
}

/// Figures of the process rather than of one service.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessFigures {
    /// Bus connections lost and made again.
    pub reconnects: u64,
    /// Queues, bindings and reply queues the broker lost and this process
    /// declared again.
    pub redeclared: u64,
    /// Requests in flight now.
    pub in_flight: u64,
}

/// Every service's counts in this process.
#[derive(Debug, Default)]
pub struct Metrics {
    services: Mutex<BTreeMap<String, Arc<ServiceMetrics>>>,
    reconnects: AtomicU64,
}

impl Metrics {
    /// The counts of `service`, whose methods are `methods`: kept across
    /// connections.
    pub fn service<'a>(
        &self,
        service: &str,
        methods: impl IntoIterator<Item = &'a str>,
    ) -> Arc<ServiceMetrics> {
        self.services
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(service.to_owned())
            .or_insert_with(|| Arc::new(ServiceMetrics::new(methods)))
            .clone()
    }

    /// Counts a lost bus connection made again.
    pub fn reconnected(&self) {
        self.reconnects.fetch_add(1, Relaxed);
    }

    /// Every service's cumulative counts, with `in_flight` requests now.
    pub fn snapshot(&self, in_flight: u64) -> Vec<ServiceSnapshot> {
        let process = ProcessFigures {
            reconnects: self.reconnects.load(Relaxed),
            redeclared: crate::bus::heal::redeclared_total(),
            in_flight,
        };
        self.services
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(name, s)| s.snapshot(name, &process))
            .collect()
    }
}

/// One method's cumulative counts, as a worker reports them.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MethodSnapshot {
    /// The method ([`UNKNOWN_METHOD`] for the others).
    pub method: String,
    /// Requests answered with a result.
    pub ok: u64,
    /// Requests answered with an error, by code.
    pub errors: Vec<(String, u64)>,
    /// Handled requests timed.
    pub count: u64,
    /// Their total time, in seconds.
    pub sum: f64,
    /// Per bucket of [`BUCKETS`] then +Inf (not cumulative).
    pub buckets: Vec<u64>,
}

/// One service's cumulative counts in one process.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ServiceSnapshot {
    /// The service.
    pub service: String,
    /// Per method.
    pub methods: Vec<MethodSnapshot>,
    /// Requests dropped or refused, by [`Dropped`] reason (its index).
    #[serde(default)]
    pub drops: Vec<u64>,
    /// Handlers' bus calls: target, outcome, count.
    pub bus_calls: Vec<(String, String, u64)>,
    /// Bus connections lost and made again.
    pub reconnects: u64,
    /// Queues, bindings and reply queues the broker lost and the process
    /// declared again (absent from an older worker's report: 0).
    #[serde(default)]
    pub redeclared: u64,
    /// Requests in flight now (a gauge).
    pub in_flight: u64,
    /// Requests quarantined, by [`QuarantineReason`] (its index).
    #[serde(default)]
    pub quarantined: Vec<u64>,
    /// The quarantine's configured bound (a gauge; 0: off).
    #[serde(default)]
    pub quarantine_bound: u64,
}

impl ServiceSnapshot {
    /// Requests dropped or refused for `why`.
    pub fn dropped(&self, why: Dropped) -> u64 {
        self.drops.get(why as usize).copied().unwrap_or(0)
    }

    /// Requests quarantined for `why`.
    pub fn quarantined(&self, why: QuarantineReason) -> u64 {
        self.quarantined.get(why as usize).copied().unwrap_or(0)
    }

    /// Counts `n` more dropped for `why`.
    pub fn add_dropped(&mut self, why: Dropped, n: u64) {
        if self.drops.len() < Dropped::ALL.len() {
            self.drops.resize(Dropped::ALL.len(), 0);
        }
        self.drops[why as usize] += n;
    }
}

/// Why a request was quarantined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuarantineReason {
    /// Refused after crashing `crash_limit` workers (or coming back too
    /// often).
    Poison,
    /// Its handler panicked (answered -32603).
    Panic,
    /// Its handler passed `handler_timeout` (answered -32603).
    Timeout,
}

impl QuarantineReason {
    /// Every reason, in the order of its counter.
    pub const ALL: [Self; 3] = [Self::Poison, Self::Panic, Self::Timeout];

    /// Its label in `/metrics` and `list`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Poison => "poison",
            Self::Panic => "panic",
            Self::Timeout => "timeout",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_drop_reason_has_its_own_counter() {
        let names: std::collections::BTreeSet<_> =
            Dropped::ALL.iter().map(|w| w.metric()).collect();
        assert_eq!(names.len(), Dropped::ALL.len());
        for (i, &why) in Dropped::ALL.iter().enumerate() {
            assert_eq!(why as usize, i, "{why:?}");
            assert!(why.metric().starts_with("commissaire_") && !why.help().is_empty());
        }
        let m = ServiceMetrics::new(["add"]);
        m.dropped(Dropped::Timeout);
        let snap = m.snapshot("s", &ProcessFigures::default());
        assert_eq!(snap.dropped(Dropped::Timeout), 1);
        assert_eq!(snap.dropped(Dropped::Poison), 0);
    }

    #[test]
    fn unknown_methods_codes_and_targets_are_bounded() {
        let m = Metrics::default();
        let s = m.service("calc", ["add", "div"]);
        s.took("calc.add", Duration::from_micros(50));
        s.request("calc.add", None);
        s.took("calc.add", Duration::from_millis(3));
        s.request("calc.add", Some(-32602));
        for i in 0..1000 {
            s.request(&format!("calc.nope{i}"), Some(-32601));
        }
        for code in 0..40 {
            s.request("calc.div", Some(code));
        }
        for i in 0..100 {
            s.bus_call(&format!("svc{i}.m"), i % 2 == 0);
        }
        let snap = m.snapshot(3);
        assert_eq!(snap.len(), 1);
        let methods: Vec<&str> = snap[0].methods.iter().map(|m| m.method.as_str()).collect();
        assert_eq!(methods, ["add", "div", UNKNOWN_METHOD]);
        let add = &snap[0].methods[0];
        assert_eq!((add.ok, add.count), (1, 2));
        assert_eq!(add.errors, [("-32602".to_owned(), 1)]);
        assert_eq!(add.buckets.iter().sum::<u64>(), 2);
        assert_eq!(snap[0].methods[2].errors, [("-32601".to_owned(), 1000)]);
        let div = &snap[0].methods[1];
        assert_eq!(div.errors.len(), MAX_CODES + 1);
        assert_eq!(div.errors.last(), Some(&(OTHER.to_owned(), 40 - 16)));
        let targets: std::collections::BTreeSet<&str> = snap[0]
            .bus_calls
            .iter()
            .map(|(t, _, _)| t.as_str())
            .collect();
        assert_eq!(targets.len(), MAX_TARGETS + 1);
        assert_eq!(snap[0].in_flight, 3);
    }
}
