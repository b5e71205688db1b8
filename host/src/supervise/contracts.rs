//! Contracts across a SIGHUP roll: before a served service moves to its
//! new plugin, the new contract is compared with the running one, and a
//! change that would break the service's callers (see
//! [`crate::contract::compare`]) keeps the service on its running
//! version, unless the operator allowed breaking upgrades. Callers learn
//! of a breaking upgrade from one log line and a metric, not from a
//! stream of -32601 and -32602 errors.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::plugin_copies::Copies;
use super::workers::listing_command;
use super::{Supervisor, SupervisorError};
use crate::contract::{compare, Contract};

/// The contract of every service the copies export (derived from the
/// method list for plugins built before contracts), read by a child
/// process as the listing is.
pub(super) async fn list_contracts(
    exe: &Path,
    copies: &Copies,
    trust: crate::plugin::Trust,
) -> Result<BTreeMap<String, Contract>, SupervisorError> {
    let dir = copies.dir.as_path();
    let fail = |reason: String| SupervisorError::Listing {
        dir: copies.original(dir).display().to_string(),
        reason,
    };
    let output = listing_command(exe, dir, trust, "--openrpc")
        .output()
        .await
        .map_err(|e| fail(e.to_string()))?;
    let documents: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&output.stdout)
        .map_err(|_| {
            let stderr = String::from_utf8_lossy(&output.stderr);
            fail(
                stderr
                    .trim()
                    .trim_start_matches("commissaire-host: ")
                    .to_owned(),
            )
        })?;
    documents
        .into_iter()
        .map(|(service, doc)| {
            let contract = Contract::from_value(doc)
                .map_err(|e| fail(format!("the contract of `{service}`: {e}")))?;
            Ok((service, contract))
        })
        .collect()
}

impl Supervisor {
    /// The served services whose new contract (in `new`) breaks their
    /// callers, unless breaking upgrades are allowed: the roll leaves them
    /// on their running version. Each refusal is one error line naming
    /// every breaking difference, and the service's metrics.
    pub(super) fn refuse_breaking(&mut self, new: &BTreeMap<String, Contract>) -> BTreeSet<String> {
        let mut refused = BTreeSet::new();
        for (name, state) in &self.services {
            // A version that never served has no callers to break: the
            // fix of a plugin that crash-loops at start must roll.
            if !state.proven {
                continue;
            }
            let (Some(running), Some(next)) = (&state.contract, new.get(name)) else {
                continue;
            };
            let breaking: Vec<_> = compare(running, next)
                .into_iter()
                .filter(|d| d.change.is_breaking())
                .collect();
            if breaking.is_empty() {
                self.metrics.upgrade_accepted(name);
                continue;
            }
            let said: Vec<String> = breaking
                .iter()
                .map(|d| format!("`{}`: {}", d.method, d.detail))
                .collect();
            if self.config.allow_breaking_upgrades {
                tracing::warn!(
                    service = %name, from = running.version(), to = next.version(),
                    breaking = %said.join("; "),
                    "rolling an upgrade that breaks callers, as allow_breaking_upgrades allows"
                );
                self.metrics.upgrade_accepted(name);
                continue;
            }
            tracing::error!(
                service = %name, from = running.version(), to = next.version(),
                breaking = %said.join("; "),
                "upgrade refused: the new plugin would break the service's callers; the running \
                 version keeps serving (allow it with [host] allow_breaking_upgrades = true or \
                 run --allow-breaking)"
            );
            let mut by_change: BTreeMap<&'static str, u64> = BTreeMap::new();
            for d in &breaking {
                *by_change.entry(d.change.label()).or_default() += 1;
            }
            self.metrics
                .upgrade_refused(name, by_change.into_iter().collect());
            refused.insert(name.clone());
        }
        refused
    }
}
