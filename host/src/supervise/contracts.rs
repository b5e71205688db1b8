//! Contracts across a SIGHUP roll: before a served service moves to its
//! new plugin, the new contract is compared with the running one, and a
//! change that would break the service's callers (see
//! [`crate::contract::compare`]) keeps the service on its running
//! version, unless the operator allowed breaking upgrades. Callers learn
//! of a breaking upgrade from one log line and a metric, not from a
//! stream of -32601 and -32602 errors.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use super::plugin_copies::Copies;
use super::workers::{listing_command, listing_output};
use super::{Supervisor, SupervisorError};
use crate::contract::{compare, Contract, Difference};

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
    let output = listing_output(listing_command(exe, dir, trust, "--openrpc"))
        .await
        .map_err(fail)?;
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

/// How long a roll's comparisons may take, every service together: past
/// it, each service not yet compared is refused as "cannot prove".
const COMPARE_TIMEOUT: Duration = Duration::from_secs(10);

/// One service's comparison: its name, the two versions, and the
/// breaking differences (`None`: not compared in time).
type Compared = (String, String, String, Option<Vec<Difference>>);

/// Compares each (service, running, new) off the supervisor's thread: a
/// large contract takes time, and the supervisor must go on reaping and
/// answering its workers meanwhile.
async fn compare_all(pairs: Vec<(String, Contract, Contract)>) -> Vec<Compared> {
    let names: Vec<Compared> = pairs
        .iter()
        .map(|(n, old, new)| (n.clone(), old.version().into(), new.version().into(), None))
        .collect();
    let work = tokio::task::spawn_blocking(move || {
        pairs
            .into_iter()
            .map(|(name, old, new)| {
                let breaking = compare(&old, &new)
                    .into_iter()
                    .filter(Difference::is_breaking)
                    .collect();
                (
                    name,
                    old.version().into(),
                    new.version().into(),
                    Some(breaking),
                )
            })
            .collect::<Vec<Compared>>()
    });
    match tokio::time::timeout(COMPARE_TIMEOUT, work).await {
        Ok(Ok(compared)) => compared,
        _ => names,
    }
}

impl Supervisor {
    /// The served services whose new contract (in `new`) breaks their
    /// callers, unless breaking upgrades are allowed: the roll leaves them
    /// on their running version. Each refusal is one error line naming
    /// every breaking difference, and the service's metrics.
    pub(super) async fn refuse_breaking(
        &mut self,
        new: &BTreeMap<String, Contract>,
    ) -> BTreeSet<String> {
        let pairs: Vec<(String, Contract, Contract)> = self
            .services
            .iter()
            // A version that never served has no callers to break: the
            // fix of a plugin that crash-loops at start must roll.
            .filter(|(_, state)| state.proven)
            .filter_map(|(name, state)| {
                Some((
                    name.clone(),
                    state.contract.clone()?,
                    new.get(name)?.clone(),
                ))
            })
            .collect();
        let mut refused = BTreeSet::new();
        for (name, from, to, breaking) in compare_all(pairs).await {
            let (said, by_change): (Vec<String>, BTreeMap<&'static str, u64>) = match &breaking {
                Some(breaking) if breaking.is_empty() => {
                    self.metrics.upgrade_accepted(&name);
                    continue;
                }
                Some(breaking) => {
                    let mut by_change = BTreeMap::new();
                    for d in breaking {
                        *by_change.entry(d.change.label()).or_default() += 1;
                    }
                    let said = breaking
                        .iter()
                        .map(|d| format!("`{}`: {}", d.method, d.detail))
                        .collect();
                    (said, by_change)
                }
                None => (
                    vec![format!(
                        "the contracts could not be compared within {} s",
                        COMPARE_TIMEOUT.as_secs()
                    )],
                    BTreeMap::from([(NOT_COMPARED, 1)]),
                ),
            };
            if self.config.allow_breaking_upgrades {
                tracing::warn!(
                    service = %name, from, to, breaking = %said.join("; "),
                    "rolling an upgrade that breaks callers, as allow_breaking_upgrades allows"
                );
                self.metrics.upgrade_accepted(&name);
                continue;
            }
            tracing::error!(
                service = %name, from, to, breaking = %said.join("; "),
                "upgrade refused: the new plugin would break the service's callers; the running \
                 version keeps serving (allow it with [host] allow_breaking_upgrades = true or \
                 run --allow-breaking, and restart)"
            );
            self.metrics
                .upgrade_refused(&name, by_change.into_iter().collect());
            refused.insert(name);
        }
        refused
    }
}

/// The `change` label of a roll refused because its comparison did not
/// end in time (beside [`crate::contract::Change`]'s labels).
const NOT_COMPARED: &str = "not_compared";
