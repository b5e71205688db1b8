//! Requests whose handler is running: for the handler-timeout watchdog and,
//! in a worker process, for the supervisor to learn which requests were
//! running when the worker died.
//!
//! A worker mirrors the table into its *slot file*: one 16-byte record per
//! slot, the request's key and a running flag, written with `pwrite` as a
//! handler starts and ends (no syscall beyond that, no message to the
//! supervisor on the request path). When the worker dies, the supervisor
//! reads the records still flagged running.

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::bus::{BusTransport, Incoming};
use crate::placement::{InlineCall, SLOW};

const RECORD: u64 = 16;

/// A request whose handler runs.
pub struct Running {
    /// The delivery.
    pub incoming: Incoming,
    /// Its identity across redeliveries (see [`request_key`]).
    pub key: u64,
    /// The service running it.
    pub service: Arc<str>,
    /// The connection it came on (timeout replies go out through it).
    pub bus: Arc<dyn BusTransport>,
    /// Set while its handler runs on the runtime thread: the method and
    /// the thread, for the watchdog to move it off if it stalls there.
    pub inline: Option<InlineCall>,
    started: Instant,
    timeout: Duration,
    settled: AtomicBool,
}

impl Running {
    /// A request starting now, with `timeout` for its handler.
    pub fn new(
        incoming: Incoming,
        key: u64,
        service: Arc<str>,
        bus: Arc<dyn BusTransport>,
        timeout: Duration,
    ) -> Self {
        Self {
            incoming,
            key,
            service,
            bus,
            inline: None,
            started: Instant::now(),
            timeout,
            settled: AtomicBool::new(false),
        }
    }

    /// Takes the right to answer and settle the request: true for the first
    /// caller only (the handler's return, or the watchdog at the timeout).
    pub fn claim(&self) -> bool {
        !self.settled.swap(true, Ordering::AcqRel)
    }

    /// How long the handler has run.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The handler's time limit.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// A request's identity across redeliveries: routing key, `reply_to`,
/// `correlation_id` and body (a broker redelivers all four unchanged).
pub fn request_key(incoming: &Incoming) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    incoming.routing_key.hash(&mut h);
    incoming.reply_to.hash(&mut h);
    incoming.correlation_id.hash(&mut h);
    incoming.body.hash(&mut h);
    // 0 marks a free record in the slot file.
    h.finish().max(1)
}

#[derive(Default)]
struct Table {
    entries: Vec<Option<Arc<Running>>>,
    free: Vec<usize>,
}

/// The running requests of this process.
#[derive(Default)]
pub struct InFlight {
    table: Mutex<Table>,
    slots: Option<File>,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight").finish_non_exhaustive()
    }
}

/// What the watchdog found.
#[derive(Default)]
pub struct Overdue {
    /// Past their timeout and not answered yet: the watchdog answers them.
    pub timed_out: Vec<Arc<Running>>,
    /// Still running past timeout + grace.
    pub hung: Vec<Arc<Running>>,
    /// Running on the runtime thread for longer than [`SLOW`].
    pub stalling: Vec<Arc<Running>>,
}

impl InFlight {
    /// A table mirrored into the slot file at `path` (created or
    /// truncated).
    pub fn with_slot_file(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)?;
        Ok(Self {
            table: Mutex::default(),
            slots: Some(file),
        })
    }

    /// Whether requests need a key (a slot file records them).
    pub fn wants_keys(&self) -> bool {
        self.slots.is_some()
    }

    /// Records a running request; returns its slot for [`Self::leave`].
    pub fn enter(&self, running: Arc<Running>) -> usize {
        let key = running.key;
        let slot = {
            let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
            match t.free.pop() {
                Some(i) => {
                    t.entries[i] = Some(running);
                    i
                }
                None => {
                    t.entries.push(Some(running));
                    t.entries.len() - 1
                }
            }
        };
        self.write(slot, key, 1);
        slot
    }

    /// The handler of `slot` returned.
    pub fn leave(&self, slot: usize) {
        self.write(slot, 0, 0);
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = t.entries.get_mut(slot) {
            *entry = None;
            t.free.push(slot);
        }
    }

    fn write(&self, slot: usize, key: u64, flag: u64) {
        let Some(file) = &self.slots else { return };
        let mut record = [0u8; RECORD as usize];
        record[..8].copy_from_slice(&key.to_le_bytes());
        record[8..].copy_from_slice(&flag.to_le_bytes());
        if let Err(e) = file.write_all_at(&record, slot as u64 * RECORD) {
            tracing::warn!(error = %e, "cannot write the slot file");
        }
    }

    /// Requests past their timeout (not answered yet) and past timeout +
    /// `grace`.
    pub fn overdue(&self, grace: Duration) -> Overdue {
        let t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let mut found = Overdue::default();
        for running in t.entries.iter().flatten() {
            let elapsed = running.elapsed();
            if running.inline.is_some() && elapsed > SLOW {
                found.stalling.push(running.clone());
            }
            if elapsed >= running.timeout + grace {
                found.hung.push(running.clone());
            } else if elapsed >= running.timeout && !running.settled.load(Ordering::Acquire) {
                found.timed_out.push(running.clone());
            }
        }
        found
    }
}

/// The keys of the requests that were running when the worker that wrote
/// the slot file at `path` stopped.
pub fn running_keys(path: &Path) -> std::io::Result<Vec<u64>> {
    let bytes = std::fs::read(path)?;
    Ok(bytes
        .chunks_exact(RECORD as usize)
        .filter_map(|r| {
            let key = u64::from_le_bytes(r[..8].try_into().ok()?);
            let flag = u64::from_le_bytes(r[8..].try_into().ok()?);
            (flag != 0 && key != 0).then_some(key)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::memory::MemoryBus;

    fn incoming(body: &str) -> Incoming {
        Incoming {
            exchange: "ex".into(),
            routing_key: "simple.add".into(),
            body: body.as_bytes().to_vec(),
            reply_to: Some("r".into()),
            correlation_id: Some("c".into()),
            redelivered: false,
            acker: None,
        }
    }

    #[test]
    fn the_slot_file_holds_exactly_the_running_requests() {
        let path = std::env::temp_dir().join(format!("slots-{}", uuid::Uuid::new_v4()));
        let table = InFlight::with_slot_file(&path).unwrap();
        let bus: Arc<dyn BusTransport> = Arc::new(MemoryBus::new());
        let run = |body: &str| {
            let i = incoming(body);
            let key = request_key(&i);
            (
                key,
                Arc::new(Running::new(
                    i,
                    key,
                    "simple".into(),
                    bus.clone(),
                    Duration::from_secs(60),
                )),
            )
        };
        let (k1, r1) = run("[1]");
        let (k2, r2) = run("[2]");
        let (k3, r3) = run("[3]");
        assert_ne!(k1, k2);
        let s1 = table.enter(r1);
        let s2 = table.enter(r2);
        table.leave(s1);
        let _s3 = table.enter(r3);
        let mut keys = running_keys(&path).unwrap();
        keys.sort_unstable();
        let mut expected = vec![k2, k3];
        expected.sort_unstable();
        assert_eq!(keys, expected);
        table.leave(s2);
        assert_eq!(running_keys(&path).unwrap(), vec![k3]);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn the_same_message_redelivered_has_the_same_key() {
        let a = incoming(r#"{"id":1}"#);
        let mut b = incoming(r#"{"id":1}"#);
        b.redelivered = true;
        assert_eq!(request_key(&a), request_key(&b));
        b.correlation_id = Some("other".into());
        assert_ne!(request_key(&a), request_key(&b));
    }

    #[test]
    fn overdue_requests_are_found_once_claimed_or_hung() {
        let table = InFlight::default();
        let bus: Arc<dyn BusTransport> = Arc::new(MemoryBus::new());
        let r = Arc::new(Running::new(
            incoming("[]"),
            1,
            "s".into(),
            bus,
            Duration::ZERO,
        ));
        table.enter(r.clone());
        let found = table.overdue(Duration::from_secs(60));
        assert_eq!(found.timed_out.len(), 1);
        assert!(found.hung.is_empty());
        assert!(r.claim());
        assert!(!r.claim(), "only one party answers");
        assert!(table.overdue(Duration::from_secs(60)).timed_out.is_empty());
        assert_eq!(table.overdue(Duration::ZERO).hung.len(), 1);
    }
}
