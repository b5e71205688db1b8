//! Asking a running service for its contract over the bus: one request to
//! `<service>.rpc_discover` (see docs/protocol.md, "Discovery"), and a
//! cache of the answers for callers that ask often (the HTTP endpoint).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use commissaire_plugin_api::RpcError;
use serde_json::value::RawValue;

use crate::client::{RequestError, RpcClient};
use crate::contract::{Contract, ContractError, DISCOVER_METHOD};

/// Why a service's contract could not be had.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// No usable reply: nobody consumes its routing key, or nobody
    /// answered in time, or the bus failed.
    #[error(transparent)]
    NoAnswer(#[from] RequestError),
    /// It answered with an error: -32601 from a service that has no
    /// discovery method (an original Python service, a host before
    /// contracts).
    #[error("it answered error {}: {}", .0.code, .0.message)]
    Refused(RpcError),
    /// Its answer is no contract.
    #[error("its answer is not a contract: {0}")]
    Unreadable(#[from] ContractError),
    /// Its answer is larger than any contract a plugin writes.
    #[error("its answer ({0} bytes) is larger than a contract may be ({MAX_CONTRACT_BYTES})")]
    TooLarge(usize),
}

/// The largest discovery answer read. The plugins here write 2 to 9 KB;
/// an answer comes from whoever consumes the routing key, and the HTTP
/// endpoint compiles checks from it.
pub const MAX_CONTRACT_BYTES: usize = 1 << 20;

impl DiscoveryError {
    /// Whether the service answered that it has no discovery method.
    pub fn has_no_discovery(&self) -> bool {
        matches!(self, Self::Refused(e) if e.code == RpcError::METHOD_NOT_FOUND)
    }
}

/// The routing key of `service`'s discovery request.
pub fn discovery_key(service: &str) -> String {
    format!("{service}.{DISCOVER_METHOD}")
}

/// Asks `service` for its contract (no params), waiting `timeout` at most
/// (the client's default without one).
pub async fn discover(
    client: &RpcClient,
    service: &str,
    timeout: Option<Duration>,
) -> Result<Contract, DiscoveryError> {
    let text = discover_text(client, service, timeout).await?;
    Ok(Contract::parse(text.get())?)
}

/// As [`discover`], the document as the service sent it.
pub async fn discover_text(
    client: &RpcClient,
    service: &str,
    timeout: Option<Duration>,
) -> Result<Box<RawValue>, DiscoveryError> {
    let text = client
        .request(&discovery_key(service), None, timeout, None)
        .await?
        .map_err(DiscoveryError::Refused)?;
    if text.get().len() > MAX_CONTRACT_BYTES {
        return Err(DiscoveryError::TooLarge(text.get().len()));
    }
    Ok(text)
}

/// Contracts asked of the bus, each kept for a while: a burst of callers
/// for one service sends one discovery request, and a service that did not
/// answer is not asked again before its time either. Bounded: past
/// `capacity` services, those known longest are forgotten first.
#[derive(Debug)]
pub struct ContractCache {
    ttl: Duration,
    timeout: Duration,
    capacity: usize,
    slots: Mutex<HashMap<Box<str>, Arc<Slot>>>,
}

/// One service's answer, once it came.
#[derive(Debug, Default)]
struct Slot {
    found: tokio::sync::OnceCell<Found>,
    /// The answer this one replaces was none: a service still silent is
    /// not logged again.
    failed_before: bool,
}

#[derive(Debug)]
struct Found {
    at: Instant,
    contract: Option<Arc<Contract>>,
}

impl ContractCache {
    /// Keeps answers for `ttl`, asks with `timeout`, holds `capacity`
    /// services.
    pub fn new(ttl: Duration, timeout: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            timeout,
            capacity: capacity.max(1),
            slots: Mutex::default(),
        }
    }

    /// The contract of `service`: known within the last `ttl`, else asked
    /// of the bus through `client`. `None` when it did not answer with one
    /// (logged once for as long as it stays so).
    pub async fn get(&self, client: &RpcClient, service: &str) -> Option<Arc<Contract>> {
        let slot = self.slot(service);
        let found = slot
            .found
            .get_or_init(|| async {
                let timeout = self.timeout.min(client.default_timeout());
                let contract = match discover(client, service, Some(timeout)).await {
                    Ok(contract) => {
                        if slot.failed_before {
                            tracing::info!(service, "the service answers discovery again");
                        }
                        Some(Arc::new(contract))
                    }
                    Err(e) if slot.failed_before => {
                        tracing::debug!(service, error = %e, "still no contract");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(
                            service, error = %e,
                            "no contract from the service's discovery request: left out of \
                             /openrpc.json and its calls unchecked (asked again in {}s)",
                            self.ttl.as_secs()
                        );
                        None
                    }
                };
                Found {
                    at: Instant::now(),
                    contract,
                }
            })
            .await;
        found.contract.clone()
    }

    /// As [`ContractCache::get`], but an answer older than `fresh` is
    /// asked again first: before refusing a call by a contract that a
    /// roll may have changed since. One request for a burst of callers
    /// (the first replaces the answer, the others wait for the new one).
    pub async fn get_fresh(
        &self,
        client: &RpcClient,
        service: &str,
        fresh: Duration,
    ) -> Option<Arc<Contract>> {
        {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            let stale = slots
                .get(service)
                .and_then(|slot| slot.found.get())
                .is_some_and(|found| found.at.elapsed() >= fresh);
            if stale {
                slots.remove(service);
            }
        }
        self.get(client, service).await
    }

    /// The slot to read `service`'s answer from: the current one, or a new
    /// one in place of an answer past its time.
    fn slot(&self, service: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let mut failed_before = false;
        if let Some(slot) = slots.get(service) {
            match slot.found.get() {
                // Being asked now: wait for that answer.
                None => return slot.clone(),
                Some(found) if found.at.elapsed() < self.ttl => return slot.clone(),
                Some(found) => failed_before = found.contract.is_none(),
            }
        } else if slots.len() >= self.capacity {
            self.make_room(&mut slots);
        }
        let slot = Arc::new(Slot {
            found: tokio::sync::OnceCell::new(),
            failed_before,
        });
        slots.insert(service.into(), slot.clone());
        slot
    }

    /// Forgets answers past their time and questions nobody waits for
    /// any more (their asker gave up), else the oldest answer, else any
    /// one: the cache never holds more than its capacity.
    fn make_room(&self, slots: &mut HashMap<Box<str>, Arc<Slot>>) {
        slots.retain(|_, s| match s.found.get() {
            Some(f) => f.at.elapsed() < self.ttl,
            // Only the map holds it: no caller awaits this answer.
            None => Arc::strong_count(s) > 1,
        });
        if slots.len() < self.capacity {
            return;
        }
        let oldest = slots
            .iter()
            .filter_map(|(name, s)| Some((s.found.get()?.at, name.clone())))
            .min()
            .map(|(_, name)| name)
            .or_else(|| slots.keys().next().cloned());
        if let Some(name) = oldest {
            // Its waiters keep their own handle on it and get their answer.
            slots.remove(&name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_cache_forgets_the_oldest_answer() {
        let cache = ContractCache::new(Duration::from_secs(60), Duration::from_secs(1), 2);
        for name in ["a", "b"] {
            let slot = cache.slot(name);
            slot.found
                .set(Found {
                    at: Instant::now(),
                    contract: None,
                })
                .expect("unset");
        }
        let _ = cache.slot("c");
        let slots = cache.slots.lock().expect("lock");
        let mut names: Vec<&str> = slots.keys().map(|k| &**k).collect();
        names.sort_unstable();
        assert_eq!(names, ["b", "c"]);
    }

    #[test]
    fn a_question_nobody_waits_for_makes_room_and_the_cache_never_overflows() {
        let cache = ContractCache::new(Duration::from_secs(60), Duration::from_secs(1), 2);
        // Asked, then the asker went away: only the map holds the slot.
        drop(cache.slot("gone"));
        let waited = cache.slot("waited");
        let _ = cache.slot("new");
        {
            let slots = cache.slots.lock().expect("lock");
            assert!(!slots.contains_key("gone"));
            assert!(slots.contains_key("waited") && slots.contains_key("new"));
        }
        // Every slot awaited: one still goes.
        let _held = cache.slot("new");
        let _also = cache.slot("third");
        assert!(cache.slots.lock().expect("lock").len() <= 2);
        drop(waited);
    }

    #[test]
    fn an_answer_past_its_time_is_asked_again_and_a_fresh_one_is_not() {
        let cache = ContractCache::new(Duration::from_millis(0), Duration::from_secs(1), 8);
        let first = cache.slot("a");
        first
            .found
            .set(Found {
                at: Instant::now(),
                contract: None,
            })
            .expect("unset");
        let second = cache.slot("a");
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(second.failed_before, "the silence carries over");

        let cache = ContractCache::new(Duration::from_secs(60), Duration::from_secs(1), 8);
        let first = cache.slot("a");
        assert!(Arc::ptr_eq(&first, &cache.slot("a")), "still being asked");
        first
            .found
            .set(Found {
                at: Instant::now(),
                contract: None,
            })
            .expect("unset");
        assert!(Arc::ptr_eq(&first, &cache.slot("a")), "fresh");
    }
}
