//! Publishing through an exchange: the binding set is read and the
//! envelope pushed in one script ([`super::scripts`]' `PUBLISH_ROUTED`),
//! routed by the members this connection last read, which the script
//! checks are still the set's.

use super::bindings::route;
use super::connection::{refused, Inner};
use super::keys::{binding_key, priority_list};
use crate::bus::BusError;

/// How many times one publish routes again after finding the binding set
/// changed.
const MAX_ROUTES: usize = 3;

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
