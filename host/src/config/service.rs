//! `[[service]]`: queues, their arguments, and how each service is served.

use std::collections::HashMap;
use std::num::NonZeroU16;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::file::FileConfig;
use super::{
    line_col, seconds, ConfigError, DEFAULT_BUS_WAITS_PER_SLOT, DEFAULT_CONCURRENCY,
    DEFAULT_CRASH_LIMIT, DEFAULT_HANDLER_TIMEOUT, DEFAULT_INIT_TIMEOUT, MIN_WORKER_RSS,
};
use crate::limits::DEFAULT_QUARANTINE;

/// One queue a service consumes, bound with its routing key.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// The queue name, e.g. `simple`.
    pub name: String,
    /// The binding pattern, e.g. `simple.*`.
    pub routing_key: String,
    /// Declaration arguments, as kombu's `queue_arguments`
    /// (`x-queue-type = "quorum"`, `x-delivery-limit = 5`, ...): strings,
    /// integers, booleans and floats (RabbitMQ only).
    #[serde(default)]
    pub arguments: crate::bus::QueueArguments,
}

/// How one service is served.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// Its queues.
    pub queues: Vec<QueueConfig>,
    /// Handlers in flight (and the broker prefetch), per queue, in each
    /// worker: each queue has its own window, so that a flood on one queue
    /// never holds up another's requests.
    pub concurrency: u16,
    /// Worker processes.
    pub workers: u16,
    /// How long a handler may run before its caller gets a timeout reply.
    pub handler_timeout: Duration,
    /// Worker crashes a request may cause before it is refused.
    pub crash_limit: u32,
    /// Entries each of its quarantines keeps, the oldest dropped past it
    /// (0: no quarantine; see [`crate::quarantine`]).
    pub quarantine: u32,
    /// Run handlers on the async runtime's threads without handing the
    /// thread over first (`Some(true)`), always hand it over
    /// (`Some(false)`), or learn it per method (`None`, the default: see
    /// [`crate::serve::placement`]).
    pub inline_handlers: Option<bool>,
    /// Handlers that may wait in bus calls at once, per worker: each
    /// lets the consumers take one more delivery while it waits, and a
    /// call beyond this fails at once instead of raising the prefetch
    /// further (a burst of self-calls cannot take every thread).
    pub max_bus_waits: u16,
    /// How long the plugin's `init` may run in a new worker: past it the
    /// worker is killed and counts as failed to start.
    pub init_timeout: Duration,
    /// Resident memory past which a worker stops taking requests, finishes
    /// what it holds and is replaced (`None`: no cap).
    pub max_worker_rss: Option<u64>,
    /// The section handed to the plugin's `init`.
    pub config: serde_json::Value,
    /// Where it was configured (`file:line`), for errors.
    pub location: Option<String>,
    /// Where `workers` was set, for errors.
    pub workers_location: Option<String>,
}

impl ServiceSettings {
    /// The defaults for a plugin dropped in with no `[[service]]` entry:
    /// queue `<name>` bound with `<name>.*`.
    pub fn defaults(name: &str) -> Self {
        Self {
            queues: vec![QueueConfig {
                name: name.to_owned(),
                routing_key: format!("{name}.*"),
                arguments: std::collections::BTreeMap::new(),
            }],
            concurrency: DEFAULT_CONCURRENCY,
            workers: 1,
            handler_timeout: DEFAULT_HANDLER_TIMEOUT,
            crash_limit: DEFAULT_CRASH_LIMIT,
            quarantine: DEFAULT_QUARANTINE,
            inline_handlers: None,
            max_bus_waits: DEFAULT_CONCURRENCY.saturating_mul(DEFAULT_BUS_WAITS_PER_SLOT),
            init_timeout: DEFAULT_INIT_TIMEOUT,
            max_worker_rss: None,
            config: serde_json::Value::Object(serde_json::Map::new()),
            location: None,
            workers_location: None,
        }
    }
}

pub(super) fn file_services(
    file: &FileConfig,
    path: &Path,
    text: &str,
) -> Result<HashMap<String, ServiceSettings>, ConfigError> {
    let mut services = HashMap::new();
    for section in &file.service {
        let (line, col) = line_col(text, section.name.span().start);
        let location = format!("{}:{line}:{col}", path.display());
        let name = section.name.get_ref().clone();
        let fail = |message: String| ConfigError {
            location: location.clone(),
            message,
        };
        let defaults = ServiceSettings::defaults(&name);
        let queues = section.queues.clone().unwrap_or(defaults.queues);
        if queues.is_empty() {
            return Err(fail(format!("service `{name}` has an empty `queues` list")));
        }
        let config = serde_json::to_value(&section.config)
            .map_err(|e| fail(format!("service `{name}`: config: {e}")))?;
        let workers_location = section.workers.as_ref().map(|w| {
            let (line, col) = line_col(text, w.span().start);
            format!("{}:{line}:{col}", path.display())
        });
        let handler_timeout = seconds(
            section.handler_timeout.as_ref(),
            "handler_timeout",
            DEFAULT_HANDLER_TIMEOUT,
            &path.display().to_string(),
            text,
        )?;
        let init_timeout = seconds(
            section.init_timeout.as_ref(),
            "init_timeout",
            DEFAULT_INIT_TIMEOUT,
            &path.display().to_string(),
            text,
        )?;
        let max_worker_rss = match &section.max_worker_rss {
            None => None,
            Some(size) => {
                let (line, col) = line_col(text, size.span().start);
                let at = format!("{}:{line}:{col}", path.display());
                let bytes = size.get_ref().bytes().map_err(|why| ConfigError {
                    location: at.clone(),
                    message: format!("service `{name}`: max_worker_rss: {why}"),
                })?;
                if bytes < MIN_WORKER_RSS {
                    return Err(ConfigError {
                        location: at,
                        message: format!(
                            "service `{name}`: max_worker_rss must be at least {} MiB \
                             (a worker needs about that to start), not {bytes} bytes",
                            MIN_WORKER_RSS >> 20
                        ),
                    });
                }
                Some(bytes)
            }
        };
        let concurrency = section
            .concurrency
            .map_or(DEFAULT_CONCURRENCY, NonZeroU16::get);
        let settings = ServiceSettings {
            queues,
            concurrency,
            workers: section.workers.as_ref().map_or(1, |w| w.get_ref().get()),
            handler_timeout,
            crash_limit: section
                .crash_limit
                .map_or(DEFAULT_CRASH_LIMIT, std::num::NonZeroU32::get),
            quarantine: section.quarantine.unwrap_or(DEFAULT_QUARANTINE),
            inline_handlers: section.inline_handlers,
            max_bus_waits: section
                .max_bus_waits
                .unwrap_or(concurrency.saturating_mul(DEFAULT_BUS_WAITS_PER_SLOT)),
            init_timeout,
            max_worker_rss,
            config,
            location: Some(location.clone()),
            workers_location,
        };
        if services.insert(name.clone(), settings).is_some() {
            return Err(fail(format!("service `{name}` is configured twice")));
        }
    }
    Ok(services)
}
