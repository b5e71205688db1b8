//! Publishing through an exchange: the binding set is read and the
//! envelope pushed in one script ([`super::scripts`]' `PUBLISH_ROUTED`),
//! routed by the members this connection last read, which the script
//! checks are still the set's.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, PoisonError};

use super::connection::{refused, Inner};
use super::keys::{binding_key, member_routes, priority_list};
use crate::bus::BusError;

/// How many exchanges' binding sets a connection remembers; past that it
/// forgets them all and reads again.
const MAX_EXCHANGES: usize = 256;

/// How many times one publish routes again after finding the binding set
/// changed.
const MAX_ROUTES: usize = 3;

/// The binding sets this connection last read, by exchange.
#[derive(Default)]
pub(super) struct Bindings(std::sync::Mutex<HashMap<String, Arc<[String]>>>);

impl Bindings {
    fn get(&self, exchange: &str) -> Option<Arc<[String]>> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(exchange)
            .cloned()
    }

    fn put(&self, exchange: &str, members: Arc<[String]>) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_EXCHANGES && !map.contains_key(exchange) {
            map.clear();
        }
        map.insert(exchange.to_owned(), members);
    }
}

/// The queues the members route `routing_key` to, each once.
fn route(members: &[String], routing_key: &str) -> Vec<String> {
    let queues: BTreeSet<String> = members
        .iter()
        .filter_map(|m| member_routes(m, routing_key))
        .collect();
    queues.into_iter().collect()
}

impl Inner {
    /// Pushes `envelope` onto every queue `routing_key` reaches through
    /// `exchange` (not the default exchange); returns those queues (none:
    /// nothing was pushed).
    pub async fn publish_routed(
        &self,
        exchange: &str,
        routing_key: &str,
        envelope: &str,
    ) -> Result<Vec<String>, BusError> {
        let what = format!("publishing to `{routing_key}`");
        for _ in 0..MAX_ROUTES {
            let known = self.bindings.get(exchange);
            let queues = known
                .as_deref()
                .map(|m| route(m, routing_key))
                .unwrap_or_default();
            let mut inv = self.scripts.publish_routed.prepare_invoke();
            inv.key(binding_key(exchange));
            for queue in &queues {
                inv.key(priority_list(queue, 0));
            }
            inv.arg(envelope)
                .arg(if known.is_some() { "1" } else { "0" });
            for member in known.as_deref().unwrap_or_default() {
                inv.arg(member);
            }
            match self.script::<::redis::Value>(&what, &inv).await? {
                ::redis::Value::Array(members) => {
                    let members: Vec<String> = members
                        .into_iter()
                        .filter_map(|m| ::redis::from_redis_value(m).ok())
                        .collect();
                    self.bindings.put(exchange, members.into());
                }
                answer => {
                    refused(&what, answer)?;
                    return Ok(queues);
                }
            }
        }
        Err(BusError::op(
            what,
            format!("the bindings of `{exchange}` changed {MAX_ROUTES} times while routing"),
        ))
    }
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
