//! The binding sets a connection last read, by exchange, and routing a
//! key through one: a cache the publish script checks is still current.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, PoisonError};

use super::keys::member_routes;

/// How many exchanges' binding sets a connection remembers; past that it
/// forgets them all and reads again.
const MAX_EXCHANGES: usize = 256;

/// The binding sets this connection last read, by exchange.
#[derive(Default)]
pub(super) struct Bindings(std::sync::Mutex<HashMap<String, Arc<[String]>>>);

impl Bindings {
    pub(super) fn get(&self, exchange: &str) -> Option<Arc<[String]>> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(exchange)
            .cloned()
    }

    pub(super) fn put(&self, exchange: &str, members: Arc<[String]>) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_EXCHANGES && !map.contains_key(exchange) {
            map.clear();
        }
        map.insert(exchange.to_owned(), members);
    }
}

/// The queues the members route `routing_key` to, each once.
pub(super) fn route(members: &[String], routing_key: &str) -> Vec<String> {
    let queues: BTreeSet<String> = members
        .iter()
        .filter_map(|m| member_routes(m, routing_key))
        .collect();
    queues.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::redis::binding_member;

    #[test]
    fn routes_each_queue_once() {
        let members = [
            binding_member("simple.*", "a"),
            binding_member("simple.add", "a"),
            binding_member("#", "b"),
            binding_member("other.*", "c"),
        ];
        assert_eq!(route(&members, "simple.add"), ["a", "b"]);
        assert_eq!(route(&members, "x"), ["b"]);
    }

    #[test]
    fn forgets_all_when_full() {
        let bindings = Bindings::default();
        for i in 0..MAX_EXCHANGES {
            bindings.put(&format!("e{i}"), Arc::from(Vec::new()));
        }
        bindings.put("e0", Arc::from(Vec::new()));
        assert!(bindings.get("e1").is_some());
        bindings.put("new", Arc::from(Vec::new()));
        assert!(bindings.get("e1").is_none());
        assert!(bindings.get("new").is_some());
    }
}
