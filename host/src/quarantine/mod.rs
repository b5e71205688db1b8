//! The quarantine: requests refused as poison, whose handler panicked or
//! timed out, kept by the bus (per service queue, `<queue>.quarantine`,
//! bounded, the oldest dropped first) for `commissaire-host quarantine` to
//! list, show, replay and turn into a test.
//!
//! - [`entry`]: what is kept of one request, its fingerprint, and how
//!   `list` sums a fingerprint's entries up (pure).
//! - [`dedupe`]: a burst of the same request stored once, with a count
//!   (pure).
//! - [`render`]: what the commands print (pure).
//! - [`capture`]: the worker's last log lines about each request, which
//!   an entry keeps.
//! - here: [`Quarantine`], which a worker calls after a request's answer
//!   went out; it writes beside the request's path, never in it.

pub mod capture;
pub mod dedupe;
pub mod entry;
pub mod render;

use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use tokio::sync::Semaphore;

use crate::bus::{BusTransport, Incoming};
use crate::metrics::ServiceMetrics;
use crate::throttle::LogThrottle;
use dedupe::{Action, Dedupe};
pub use entry::{Entry, Reason};

/// Writes to the bus in flight at once per service: a first occurrence
/// past them is counted in `/metrics` but not stored.
pub const MAX_WRITES: usize = 16;

/// The quarantine of the requests of `queue`.
pub fn queue_of(queue: &str) -> String {
    format!("{queue}.quarantine")
}

/// This process, in the entries it stores (repeats are counted per
/// process, and `list` adds processes up).
fn origin() -> &'static str {
    static ORIGIN: OnceLock<String> = OnceLock::new();
    ORIGIN.get_or_init(|| format!("{}-{:08x}", std::process::id(), fastrand::u32(..)))
}

/// Whether a handler's -32603 error is the one plugin-api's `call` makes
/// of a panic ("the handler of `<method>` panicked: …").
pub fn is_panic(code: i64, message: &str) -> bool {
    code == commissaire_plugin_api::RpcError::INTERNAL_ERROR
        && message.starts_with("the handler of `")
        && message.contains("` panicked")
}

/// One service's quarantine, as a worker writes it.
pub struct Quarantine {
    service: Arc<str>,
    bound: u32,
    dedupe: Mutex<Dedupe<Arc<Entry>>>,
    writes: Arc<Semaphore>,
    metrics: Arc<ServiceMetrics>,
    logs: LogThrottle,
}

impl std::fmt::Debug for Quarantine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quarantine")
            .field("service", &self.service)
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

impl Quarantine {
    /// `service`'s quarantine, of `bound` entries per queue (0: off).
    pub fn new(service: Arc<str>, bound: u32, metrics: Arc<ServiceMetrics>) -> Arc<Self> {
        metrics.set_quarantine_bound(bound);
        Arc::new(Self {
            service,
            bound,
            dedupe: Mutex::default(),
            writes: Arc::new(Semaphore::new(MAX_WRITES)),
            metrics,
            logs: LogThrottle::new(crate::throttle::INTERVAL),
        })
    }

    /// Keeps `incoming`, delivered from `queue`, for `reason`, with the
    /// log lines [`capture`] holds of `trace` (its request's trace id):
    /// counted at once, written beside the caller (spawned, bounded);
    /// returns at once. Call it once the request is answered.
    pub fn keep(
        self: &Arc<Self>,
        bus: &Arc<dyn BusTransport>,
        queue: &str,
        incoming: &Incoming,
        reason: Reason,
        detail: &str,
        trace: crate::trace::TraceId,
    ) {
        if self.bound == 0 {
            return;
        }
        self.metrics.quarantined(reason);
        let fp = entry::fingerprint(&self.service, &incoming.routing_key, &incoming.body);
        let now = Instant::now();
        let action = self.lock().record(fp, now, || {
            let mut e = Entry::of(
                &self.service,
                queue,
                incoming,
                reason,
                detail,
                origin(),
                crate::deadline::now_ms(),
            );
            e.log = capture::global().lines(trace.value());
            let size =
                e.body_base64.len() + e.detail.len() + e.log.iter().map(String::len).sum::<usize>();
            (Arc::new(e), size)
        });
        match action {
            Action::Write(count) => {
                if count == 1 {
                    if let Some(suppressed) = self.logs.admit() {
                        tracing::error!(
                            suppressed, service = &*self.service, queue,
                            routing_key = %incoming.routing_key, reason = reason.as_str(),
                            id = %format!("{queue}:{fp:016x}"),
                            "request quarantined: see `commissaire-host quarantine show ID`"
                        );
                    }
                }
                if let Ok(permit) = self.writes.clone().try_acquire_owned() {
                    self.write(bus.clone(), fp, count, permit);
                } else {
                    crate::throttled!(warn!(
                        service = &*self.service,
                        "quarantine writes are backed up: an entry was counted, not stored"
                    ));
                }
            }
            Action::Later(at) => {
                let (this, bus) = (self.clone(), bus.clone());
                tokio::spawn(async move {
                    tokio::time::sleep_until(at.into()).await;
                    let due = this.lock().due(fp, Instant::now());
                    if let Some(count) = due {
                        if let Ok(permit) = this.writes.clone().acquire_owned().await {
                            this.write(bus, fp, count, permit);
                        }
                    }
                });
            }
            Action::Nothing => {}
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Dedupe<Arc<Entry>>> {
        self.dedupe.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(
        &self,
        bus: Arc<dyn BusTransport>,
        fp: u64,
        count: u64,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let Some(template) = self.lock().template(fp) else {
            return;
        };
        let bound = self.bound;
        let service = self.service.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let entry = Entry {
                count,
                last_ms: crate::deadline::now_ms(),
                ..(*template).clone()
            };
            let name = queue_of(&entry.queue);
            if let Err(e) = bus.quarantine_keep(&name, &entry.to_bytes(), bound).await {
                crate::throttled!(warn!(
                    service = &*service, quarantine = %name, error = %e,
                    "cannot store a quarantined request"
                ));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::memory::MemoryBus;

    fn incoming(body: &str) -> Incoming {
        Incoming {
            exchange: "x".into(),
            routing_key: "s.boom".into(),
            body: body.as_bytes().to_vec(),
            reply_to: Some("r".into()),
            correlation_id: None,
            malformed: None,
            traceparent: None,
            deadline: None,
            redelivered: false,
            settlement: None,
        }
    }

    fn trace() -> crate::trace::TraceId {
        crate::trace::TraceContext::child_of(None).trace_id()
    }

    async fn summaries(bus: &Arc<dyn BusTransport>) -> (Vec<entry::Summary>, usize) {
        let raw = bus.quarantine_read("q.quarantine").await.unwrap();
        let n = raw.len();
        (
            entry::summarize(raw.iter().filter_map(|b| Entry::from_bytes(b))),
            n,
        )
    }

    #[tokio::test]
    async fn a_burst_is_one_entry_whose_count_catches_up() {
        let bus: Arc<dyn BusTransport> = Arc::new(MemoryBus::new());
        let all = crate::metrics::Metrics::default();
        let q = Quarantine::new(Arc::from("s"), 5, all.service("s", []));
        for id in 0..1000 {
            let body = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"boom","params":[]}}"#);
            q.keep(&bus, "q", &incoming(&body), Reason::Panic, "boom", trace());
        }
        // The count of the burst is written within REWRITE_EVERY.
        let started = Instant::now();
        loop {
            let (list, stored) = summaries(&bus).await;
            if list.first().is_some_and(|s| s.count == 1000) {
                assert_eq!(list.len(), 1);
                assert!(stored <= 2, "{stored} stored: the first, then the count");
                break;
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(10));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        // Different ones: never more than the bound.
        for n in 0..50 {
            let body = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"boom","params":[{n}]}}"#);
            q.keep(&bus, "q", &incoming(&body), Reason::Panic, "boom", trace());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(summaries(&bus).await.1 <= 5);
        let counts = &all.snapshot(0)[0];
        assert_eq!(counts.quarantined(Reason::Panic), 1050);
        assert_eq!(counts.quarantine_bound, 5);
    }

    #[tokio::test]
    async fn a_bound_of_0_keeps_nothing() {
        let bus: Arc<dyn BusTransport> = Arc::new(MemoryBus::new());
        let all = crate::metrics::Metrics::default();
        let q = Quarantine::new(Arc::from("s"), 0, all.service("s", []));
        q.keep(&bus, "q", &incoming("{}"), Reason::Timeout, "late", trace());
        let counts = &all.snapshot(0)[0];
        assert_eq!(counts.quarantined(Reason::Timeout), 0, "not counted");
        assert_eq!(counts.quarantine_bound, 0);
        assert!(is_panic(-32603, "the handler of `m` panicked: x"));
        assert!(!is_panic(-32603, "the handler did not return within 1s"));
    }
}
