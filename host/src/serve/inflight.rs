//! Requests whose handler is running: for the handler-timeout watchdog and,
//! in a worker process, for the supervisor to learn which requests were
//! running when the worker died.
//!
//! A worker mirrors the table into its *slot file*: one 16-byte record per
//! slot, the request's key and a flag, written with `pwrite` as a request
//! arrives (*held*), as its handler starts (*running*) and as it is settled
//! (no syscall beyond that, no message to the supervisor on the request
//! path). When the worker dies, the supervisor reads the records still
//! flagged: a request running may have killed the worker, one held had not
//! started and only comes back because of the death (see
//! [`crate::supervise::crashes`]).
//!
//! Entering the running table goes through the *lane*: a request suspected
//! of crashing the worker runs alone (it waits for the running ones to
//! finish, and the ones arriving meanwhile wait for it), so that if the
//! worker dies, it dies with one request running, the culprit.

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use super::inbound::Inbound;
use super::placement::SLOW;
use crate::bus::Incoming;

const RECORD: u64 = 16;
/// A record's flag: its handler started.
const RUNNING: u64 = 1;
/// A record's flag: arrived, not started (waiting for its verdict or its
/// turn in the lane).
const HELD: u64 = 2;

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

enum Entry {
    Held,
    Running(Arc<Inbound>),
}

impl Entry {
    fn running(&self) -> Option<&Arc<Inbound>> {
        match self {
            Self::Running(inbound) => Some(inbound),
            Self::Held => None,
        }
    }
}

#[derive(Default)]
struct Table {
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
}

/// The requests of this process: held (arrived, not started) and running.
#[derive(Default)]
pub struct InFlight {
    table: Mutex<Table>,
    slots: Option<File>,
    /// Shared by the requests running side by side, taken whole by one
    /// running alone. Fair: once one waits to run alone, requests arriving
    /// after it wait behind it.
    lane: Arc<RwLock<()>>,
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
    pub timed_out: Vec<Arc<Inbound>>,
    /// Still running past timeout + grace.
    pub hung: Vec<Arc<Inbound>>,
    /// Running on the runtime thread for longer than [`SLOW`].
    pub stalling: Vec<Arc<Inbound>>,
}

impl InFlight {
    /// A table mirrored into the slot file at `path`, which must not
    /// exist yet (and is not followed if it is a symbolic link): the
    /// supervisor reads it to count crashes, so nobody else may have
    /// placed it.
    pub fn with_slot_file(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc_o_nofollow())
            .open(path)?;
        Ok(Self {
            table: Mutex::default(),
            slots: Some(file),
            lane: Arc::default(),
        })
    }

    /// Whether requests need a key (a slot file records them).
    pub fn wants_keys(&self) -> bool {
        self.slots.is_some()
    }

    /// Records request `key` as held (arrived, not started) until the
    /// returned guard is dropped or [`Held::enter`]s.
    pub fn hold(self: &Arc<Self>, key: u64) -> Held {
        let slot = {
            let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
            match t.free.pop() {
                Some(i) => {
                    t.entries[i] = Some(Entry::Held);
                    i
                }
                None => {
                    t.entries.push(Some(Entry::Held));
                    t.entries.len() - 1
                }
            }
        };
        self.write(slot, key, HELD);
        Held {
            table: self.clone(),
            slot,
            key,
            entered: false,
        }
    }

    /// Holds and enters at once, beside the others (tests only: the
    /// request path waits for its turn in the lane).
    #[cfg(test)]
    fn enter(self: &Arc<Self>, inbound: Arc<Inbound>) -> Entered {
        let lane = self
            .lane
            .clone()
            .try_read_owned()
            .map(LaneGuard::beside)
            .expect("nobody runs alone in this test");
        self.hold(inbound.key()).enter_now(inbound, lane)
    }

    fn leave(&self, slot: usize) {
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

    /// At `now`: requests past their timeout (not answered yet), past
    /// timeout + `grace`, and inline handlers running past [`SLOW`].
    pub fn overdue(&self, now: Instant, grace: Duration) -> Overdue {
        let t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let mut found = Overdue::default();
        for inbound in t.entries.iter().flatten().filter_map(Entry::running) {
            let elapsed = now.saturating_duration_since(inbound.arrived());
            if inbound
                .inline()
                .is_some_and(|call| now.saturating_duration_since(call.started()) > SLOW)
            {
                found.stalling.push(inbound.clone());
            }
            if elapsed >= inbound.timeout() + grace {
                found.hung.push(inbound.clone());
            } else if elapsed >= inbound.timeout() && !inbound.is_claimed() {
                found.timed_out.push(inbound.clone());
            }
        }
        found
    }

    /// How many requests are not settled yet: still handled, answered but
    /// not acked, or past their timeout and not yet answered by the
    /// watchdog. A hung handler's request is not one of them once the
    /// watchdog has answered it.
    pub fn unsettled(&self) -> usize {
        let t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        t.entries
            .iter()
            .flatten()
            .filter_map(Entry::running)
            .filter(|i| !i.is_settled())
            .count()
    }

    /// How many requests are running (their handler started).
    pub fn len(&self) -> usize {
        let t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        t.entries
            .iter()
            .flatten()
            .filter(|e| e.running().is_some())
            .count()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A request arrived and not started, until dropped (then its record is
/// cleared) or entered.
pub struct Held {
    table: Arc<InFlight>,
    slot: usize,
    key: u64,
    entered: bool,
}

impl Held {
    /// Waits for its turn in the lane (`alone`: for every running request
    /// to finish, the ones arriving meanwhile waiting behind it), then
    /// records it running until the returned guard is dropped.
    pub async fn enter(self, inbound: Arc<Inbound>, alone: bool) -> Entered {
        let lane = self.table.lane.clone();
        let lane = if alone {
            LaneGuard::alone(lane.write_owned().await)
        } else {
            LaneGuard::beside(lane.read_owned().await)
        };
        self.enter_now(inbound, lane)
    }

    fn enter_now(mut self, inbound: Arc<Inbound>, lane: LaneGuard) -> Entered {
        self.entered = true;
        let table = self.table.clone();
        {
            let mut t = table.table.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = t.entries.get_mut(self.slot) {
                *entry = Some(Entry::Running(inbound));
            }
        }
        table.write(self.slot, self.key, RUNNING);
        Entered {
            table,
            slot: self.slot,
            _lane: lane,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.entered {
            self.table.leave(self.slot);
        }
    }
}

/// A request's place in the lane while it runs: beside others, or alone.
struct LaneGuard {
    _beside: Option<OwnedRwLockReadGuard<()>>,
    _alone: Option<OwnedRwLockWriteGuard<()>>,
}

impl LaneGuard {
    fn beside(guard: OwnedRwLockReadGuard<()>) -> Self {
        Self {
            _beside: Some(guard),
            _alone: None,
        }
    }

    fn alone(guard: OwnedRwLockWriteGuard<()>) -> Self {
        Self {
            _beside: None,
            _alone: Some(guard),
        }
    }
}

/// A request running, until dropped: then its record is cleared, and the
/// lane let go.
pub struct Entered {
    table: Arc<InFlight>,
    slot: usize,
    _lane: LaneGuard,
}

impl Drop for Entered {
    fn drop(&mut self) {
        self.table.leave(self.slot);
    }
}

/// `O_NOFOLLOW`: the one flag std has no name for (Linux's value).
const fn libc_o_nofollow() -> i32 {
    0o400000
}

/// What a worker held when it stopped, by request key.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SlotRecords {
    /// Their handler had started.
    pub running: Vec<u64>,
    /// Arrived, not started.
    pub held: Vec<u64>,
}

/// The requests running and held when the worker that wrote the slot file
/// at `path` stopped.
pub fn slot_records(path: &Path) -> std::io::Result<SlotRecords> {
    let bytes = std::fs::read(path)?;
    let mut found = SlotRecords::default();
    for r in bytes.chunks_exact(RECORD as usize) {
        let (Ok(key), Ok(flag)) = (r[..8].try_into(), r[8..].try_into()) else {
            continue;
        };
        let (key, flag) = (u64::from_le_bytes(key), u64::from_le_bytes(flag));
        match flag {
            _ if key == 0 => {}
            RUNNING => found.running.push(key),
            HELD => found.held.push(key),
            _ => {}
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use commissaire_plugin_api::RpcError;

    pub(crate) fn incoming(body: &str) -> Incoming {
        Incoming {
            exchange: "ex".into(),
            routing_key: "simple.add".into(),
            body: body.as_bytes().to_vec(),
            reply_to: Some("r".into()),
            correlation_id: Some(b"c".to_vec()),
            malformed: None,
            traceparent: None,
            redelivered: false,
            deadline: None,
            settlement: None,
        }
    }

    #[test]
    fn the_same_message_redelivered_has_the_same_key() {
        let a = incoming(r#"{"id":1}"#);
        let mut b = incoming(r#"{"id":1}"#);
        b.redelivered = true;
        assert_eq!(request_key(&a), request_key(&b));
        b.correlation_id = Some(b"other".to_vec());
        assert_ne!(request_key(&a), request_key(&b));
    }

    fn inbound(body: &str, timeout: Duration) -> (u64, Arc<Inbound>) {
        let i = incoming(body);
        let key = request_key(&i);
        (key, Arc::new(Inbound::for_test(i, key, timeout)))
    }

    #[tokio::test]
    async fn a_request_is_unsettled_until_its_way_out_is_over() {
        let table = Arc::new(InFlight::default());
        let (_, answered) = inbound("[1]", Duration::from_secs(60));
        let (_, handed_back) = inbound("[2]", Duration::from_secs(60));
        let _a = table.enter(answered.clone());
        let _b = table.enter(handed_back.clone());
        assert_eq!(table.unsettled(), 2);
        // Claimed (a handler answered, or the watchdog at the timeout) is
        // not settled: its reply and ack may still be on their way.
        assert!(answered.claim());
        assert_eq!(table.unsettled(), 2);
        answered
            .refuse(&RpcError::internal_error("timed out"))
            .await;
        assert_eq!(table.unsettled(), 1);
        handed_back.requeue().await;
        // Both still in flight (their guards live), neither unsettled: a
        // hung handler's request stays in the table once answered.
        assert_eq!((table.len(), table.unsettled()), (2, 0));
    }

    #[tokio::test]
    async fn the_slot_file_holds_exactly_the_requests_held_and_running() {
        let dir = std::env::temp_dir().join(format!("slots-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("slots");
        let table = Arc::new(InFlight::with_slot_file(&path).unwrap());
        let (k1, r1) = inbound("[1]", Duration::from_secs(60));
        let (k2, r2) = inbound("[2]", Duration::from_secs(60));
        let (k3, r3) = inbound("[3]", Duration::from_secs(60));
        let (k4, _) = inbound("[4]", Duration::from_secs(60));
        assert_ne!(k1, k2);
        let e1 = table.enter(r1);
        let e2 = table.enter(r2);
        drop(e1);
        let _e3 = table.hold(k3).enter(r3, false).await;
        let held = table.hold(k4);
        let mut records = slot_records(&path).unwrap();
        records.running.sort_unstable();
        let mut running = vec![k2, k3];
        running.sort_unstable();
        assert_eq!(
            records,
            SlotRecords {
                running,
                held: vec![k4]
            }
        );
        assert_eq!(table.len(), 2, "held is not running");
        drop(e2);
        drop(held);
        assert_eq!(
            slot_records(&path).unwrap(),
            SlotRecords {
                running: vec![k3],
                held: vec![]
            }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_request_running_alone_waits_for_the_running_ones_and_holds_the_next() {
        let table = Arc::new(InFlight::default());
        let (k1, r1) = inbound("[1]", Duration::from_secs(60));
        let (k2, r2) = inbound("[2]", Duration::from_secs(60));
        let (k3, r3) = inbound("[3]", Duration::from_secs(60));
        let first = table.hold(k1).enter(r1, false).await;
        let alone = tokio::spawn({
            let table = table.clone();
            async move { table.hold(k2).enter(r2, true).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!alone.is_finished(), "it waits for the running one");
        // Arriving while it waits: behind it.
        let next = tokio::spawn({
            let table = table.clone();
            async move { table.hold(k3).enter(r3, false).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!next.is_finished());
        drop(first);
        let alone = alone.await.unwrap();
        assert_eq!(table.len(), 1, "alone");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!next.is_finished(), "held until the one alone is done");
        drop(alone);
        let _next = next.await.unwrap();
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn overdue_requests_are_found_until_claimed_then_as_hung() {
        let table = Arc::new(InFlight::default());
        let (_, r) = inbound("[]", Duration::from_secs(5));
        let _entered = table.enter(r.clone());
        let grace = Duration::from_secs(10);
        let t0 = r.arrived();
        assert!(table
            .overdue(t0 + Duration::from_secs(4), grace)
            .timed_out
            .is_empty());
        let found = table.overdue(t0 + Duration::from_secs(5), grace);
        assert_eq!(found.timed_out.len(), 1);
        assert!(found.hung.is_empty());
        assert!(r.claim());
        assert!(!r.claim(), "only one party answers");
        assert!(table
            .overdue(t0 + Duration::from_secs(6), grace)
            .timed_out
            .is_empty());
        assert_eq!(
            table
                .overdue(t0 + Duration::from_secs(15), grace)
                .hung
                .len(),
            1
        );
    }

    #[test]
    fn a_slot_file_is_never_one_somebody_else_placed() {
        let dir = std::env::temp_dir().join(format!("slots-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let existing = dir.join("existing");
        std::fs::write(&existing, b"").unwrap();
        assert!(InFlight::with_slot_file(&existing).is_err());
        let link = dir.join("link");
        std::os::unix::fs::symlink(dir.join("target"), &link).unwrap();
        assert!(InFlight::with_slot_file(&link).is_err());
        assert!(!dir.join("target").exists(), "the link was not followed");
        assert!(InFlight::with_slot_file(&dir.join("fresh")).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
