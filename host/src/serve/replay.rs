//! `quarantine replay --plugin`: one quarantined request run against a
//! plugin file in this process, with no bus (its handler's bus calls
//! fail). The command runs it in a child process of its own, so that a
//! handler that aborts ends the child, which the command then reports.

use std::path::Path;

use commissaire_plugin_api::host::{HostBus, RequestMeta};
use commissaire_plugin_api::RpcError;

use crate::bus::Incoming;
use crate::dispatch::Service;
use crate::plugin::trust::{self, Kind, Owners};
use crate::plugin::{PluginLibrary, Trust};
use crate::quarantine::Entry;

/// What a replayed handler's bus calls get.
const NO_BUS: &str = "replayed without a bus (quarantine replay --plugin): bus calls fail";

/// The handler's bus, which has none.
struct NoBus;

impl HostBus for NoBus {
    fn request(
        &self,
        _caller: &RequestMeta<'_>,
        _routing_key: &str,
        _params_json: &str,
        _timeout: Option<std::time::Duration>,
    ) -> Result<String, RpcError> {
        Err(RpcError::internal_error(NO_BUS))
    }

    fn notify(
        &self,
        _caller: &RequestMeta<'_>,
        _routing_key: &str,
        _params_json: &str,
    ) -> Result<(), RpcError> {
        Err(RpcError::internal_error(NO_BUS))
    }

    fn respond(
        &self,
        _caller: &RequestMeta<'_>,
        _queue: &str,
        _id_json: &str,
        _result_json: &str,
    ) -> Result<(), RpcError> {
        Err(RpcError::internal_error(NO_BUS))
    }
}

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The plugin file is not one the host would load.
    #[error("{0}")]
    Untrusted(String),
    /// It does not load.
    #[error(transparent)]
    Load(#[from] crate::plugin::LoadError),
    /// Its `init` failed.
    #[error("the plugin's init failed: {0}")]
    Init(RpcError),
}

/// Runs `entry` against the plugin at `plugin`, started with `config`:
/// the reply's JSON text (always asked for, notification or not) and the
/// plugin's service name.
pub fn replay(
    plugin: &Path,
    trust: Trust,
    config: &serde_json::Value,
    entry: &Entry,
) -> Result<(Vec<u8>, String), ReplayError> {
    if trust == Trust::OwnerOnly {
        trust::check(plugin, Kind::File, Owners::of_this_process()).map_err(|why| {
            ReplayError::Untrusted(format!(
                "{}: {why} (--allow-insecure-plugins to load it anyway)",
                plugin.display()
            ))
        })?;
    }
    let library = PluginLibrary::load(plugin)?;
    let name = library.service_name.clone();
    let service = Service::start(library, config).map_err(ReplayError::Init)?;
    let incoming = Incoming {
        exchange: entry.exchange.clone(),
        routing_key: entry.routing_key.clone(),
        body: entry.body(),
        reply_to: Some("quarantine-replay".to_owned()),
        correlation_id: entry.correlation_id(),
        malformed: None,
        traceparent: entry.traceparent.clone(),
        deadline: None,
        redelivered: false,
        settlement: None,
    };
    let handled = service.handle(&incoming, entry.traceparent.as_deref(), &NoBus);
    Ok((handled.reply.map(|r| r.body).unwrap_or_default(), name))
}
