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
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::inbound::Inbound;
use super::placement::SLOW;
use crate::bus::Incoming;

const RECORD: u64 = 16;

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
    entries: Vec<Option<Arc<Inbound>>>,
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
        })
    }

    /// Whether requests need a key (a slot file records them).
    pub fn wants_keys(&self) -> bool {
        self.slots.is_some()
    }

    /// Records a request in flight until the returned guard is dropped.
    pub fn enter(self: &Arc<Self>, inbound: Arc<Inbound>) -> Entered {
        let key = inbound.key();
        let slot = self.insert(inbound);
        self.write(slot, key, 1);
        Entered {
            table: self.clone(),
            slot,
        }
    }

    fn insert(&self, running: Arc<Inbound>) -> usize {
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
        slot
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
        for inbound in t.entries.iter().flatten() {
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
            .filter(|i| !i.is_settled())
            .count()
    }

    /// How many requests are in flight.
    pub fn len(&self) -> usize {
        let t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        t.entries.len() - t.free.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A request in flight, until dropped: then its record is cleared.
pub struct Entered {
    table: Arc<InFlight>,
    slot: usize,
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

    #[test]
    fn the_slot_file_holds_exactly_the_requests_in_flight() {
        let dir = std::env::temp_dir().join(format!("slots-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("slots");
        let table = Arc::new(InFlight::with_slot_file(&path).unwrap());
        let (k1, r1) = inbound("[1]", Duration::from_secs(60));
        let (k2, r2) = inbound("[2]", Duration::from_secs(60));
        let (k3, r3) = inbound("[3]", Duration::from_secs(60));
        assert_ne!(k1, k2);
        let e1 = table.enter(r1);
        let e2 = table.enter(r2);
        drop(e1);
        let _e3 = table.enter(r3);
        let mut keys = running_keys(&path).unwrap();
        keys.sort_unstable();
        let mut expected = vec![k2, k3];
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert_eq!(table.len(), 2);
        drop(e2);
        assert_eq!(running_keys(&path).unwrap(), vec![k3]);
        std::fs::remove_dir_all(&dir).unwrap();
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
