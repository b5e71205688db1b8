//! The host's TOML configuration (or an original Commissaire service's
//! JSON one, see [`original`]), and how command-line flags and the
//! environment override it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

mod file;
mod http;
pub mod original;
mod service;
#[cfg(test)]
mod tests;

use file::FileConfig;
use http::http_settings;
pub use http::{HttpSettings, HttpToken};
use service::file_services;
pub use service::{QueueConfig, ServiceSettings};

// The limits' defaults live with the limits; here for the settings that
// name them.
pub use crate::limits::{
    DEFAULT_BUS_WAITS_PER_SLOT, DEFAULT_CONCURRENCY, DEFAULT_CRASH_LIMIT, DEFAULT_HANDLER_GRACE,
    DEFAULT_HANDLER_TIMEOUT, DEFAULT_HTTP_HEADER_TIMEOUT, DEFAULT_HTTP_MAX_BUFFERED_BYTES,
    DEFAULT_HTTP_MAX_CONNECTIONS, DEFAULT_HTTP_MAX_IN_FLIGHT, DEFAULT_MAX_MESSAGE_BYTES,
};

/// The exchange Commissaire uses unless told otherwise.
pub const DEFAULT_EXCHANGE: &str = "commissaire";
/// The bus when nothing names one: the embedded in-process bus.
pub const DEFAULT_BUS_URI: &str = "memory://";
/// How long a request waits for its reply (Commissaire's default).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long stopping waits for in-flight handlers and their replies.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a plugin's `init` may run in a new worker before the worker
/// is killed and the service counts as failed to start.
pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(60);
/// The smallest `max_worker_rss`: below it a worker is over the cap
/// before it serves anything, and would be replaced for ever.
pub const MIN_WORKER_RSS: u64 = 32 * 1024 * 1024;
/// How long an ack may wait to go out with others unless configured.
pub const DEFAULT_ACK_WINDOW: Duration = Duration::from_millis(1);
/// The longest ack window: a waiting ack holds a prefetch slot, and is
/// lost (its request delivered again) if the worker dies.
pub const MAX_ACK_WINDOW_US: u64 = 100_000;
/// Environment variable for the bus URI: wins over `[bus] uri` in the
/// file, loses to `--bus-uri` (flag, then environment, then file).
pub const BUS_URI_ENV: &str = "COMMISSAIRE_BUS_URI";
/// Environment variable holding the HTTP endpoint's bearer token; wins
/// over `[http] token` (a secret is better kept out of files).
pub const HTTP_TOKEN_ENV: &str = "COMMISSAIRE_HTTP_TOKEN";
/// The longest `[bus] queue_prefix`: a queue name is at most 255 bytes.
pub const MAX_QUEUE_PREFIX_BYTES: usize = 64;

/// A configuration error: where, and what is wrong, on one line.
#[derive(Debug, thiserror::Error)]
#[error("{location}: {message}")]
pub struct ConfigError {
    /// `file:line:column`, or the file alone.
    pub location: String,
    /// What is wrong.
    pub message: String,
}

/// Command-line values that win over the file.
/// Why the plugins loaded do not fit the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    /// Nothing to serve.
    #[error(
        "no plugin to serve: the plugin directory {0} holds no .so file. Point --plugins-dir (or [plugins] dir in a \
         config file given with -c) at a directory of built plugins; scripts/run-example.sh builds \
         the example plugins and serves them with -c examples/host.toml"
    )]
    NoPlugins(String),
    /// A `[[service]]` entry names no loaded plugin.
    #[error(
        "{location}: [[service]] `{name}` is not exported by any loaded plugin (loaded: {loaded})"
    )]
    UnknownService {
        /// `file:line:col`.
        location: String,
        /// The name.
        name: String,
        /// The services that did load.
        loaded: String,
    },
    /// A setting does not fit a loaded service.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--bus-uri`.
    pub bus_uri: Option<String>,
    /// `--bus-exchange`.
    pub bus_exchange: Option<String>,
    /// `--plugins-dir`.
    pub plugins_dir: Option<PathBuf>,
    /// `--http-listen`.
    pub http_listen: Option<SocketAddr>,
    /// `--allow-insecure-plugins`.
    pub allow_insecure_plugins: bool,
    /// `run --allow-breaking`.
    pub allow_breaking_upgrades: bool,
}

/// The configuration in effect.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The bus URI (may hold a password: print it with `redact_uri`).
    pub bus_uri: String,
    /// Where [`HostConfig::bus_uri`] came from (`--bus-uri`,
    /// `COMMISSAIRE_BUS_URI`, `host.toml: [bus] uri` or `the default`), for
    /// every "cannot connect".
    pub bus_uri_source: String,
    /// Prefixed to every service queue's name (`[bus] queue_prefix`), so
    /// that deployments sharing a vhost keep their queues apart.
    pub queue_prefix: String,
    /// Settings given in two places where the one that wins hides the
    /// other (an environment variable under a flag, a file's value under
    /// an environment variable): one warning each, for the command to log.
    pub warnings: Vec<String>,
    /// The topic exchange.
    pub exchange: String,
    /// How long a request waits for its reply.
    pub request_timeout: Duration,
    /// Ack a request only once the broker confirmed its reply (publisher
    /// confirms). Off (the default), the reply goes out on the request's
    /// own channel ahead of the ack, which the broker handles in order, as
    /// kombu does; on survives a broker crash between the two, for about
    /// 15% of throughput.
    pub confirm_replies: bool,
    /// How long a request's ack may wait to go out with others in one
    /// `basic.ack multiple=true` (`[bus] ack_window_us`, AMQP); zero acks
    /// each request on its own.
    pub ack_window: Duration,
    /// The largest request the host parses, and the largest reply it
    /// sends (`[bus] max_message_bytes`).
    pub max_message_bytes: usize,
    /// Where the host's own requests wait for their replies (`[bus]
    /// reply_queue`): a named queue an original Python service can reply
    /// to (the default), or RabbitMQ's direct reply-to.
    pub reply_queue: crate::bus::ReplyQueueKind,
    /// The plugin directory.
    pub plugins_dir: PathBuf,
    /// Which plugin files are trusted (`--allow-insecure-plugins`).
    pub plugin_trust: crate::plugin::Trust,
    /// The HTTP endpoint's address, if any.
    pub http_listen: Option<SocketAddr>,
    /// The HTTP endpoint's token, allow-list, CORS origins and limits.
    pub http: HttpSettings,
    /// `[[service]]` entries by name.
    pub services: HashMap<String, ServiceSettings>,
    /// How long stopping waits for in-flight handlers and their replies.
    pub shutdown_timeout: Duration,
    /// How long a timed-out handler may still run before its worker is
    /// recycled.
    pub handler_grace: Duration,
    /// A SIGHUP roll may swap in a plugin whose contract breaks its
    /// callers (`[host] allow_breaking_upgrades`, `run --allow-breaking`);
    /// by default such a roll is refused for that service.
    pub allow_breaking_upgrades: bool,
    /// On Redis, the bus URI's `visibility_timeout` (`None` on other
    /// buses), and where the URI was given, for errors.
    pub visibility_timeout: Option<(Duration, String)>,
    /// What the bus URI means to the host (see [`crate::bus::BusTraits`]).
    pub bus_traits: crate::bus::BusTraits,
}

/// Whether a delivery held for `handler_timeout + handler_grace` is still
/// unacked by then on Redis: otherwise it is handed to another worker while
/// it runs. The error names the numbers.
fn visibility_covers(
    service: &str,
    handler_timeout: Duration,
    is_default: bool,
    handler_grace: Duration,
    visibility_timeout: Duration,
) -> Result<(), String> {
    let held = handler_timeout + handler_grace;
    if visibility_timeout >= held {
        return Ok(());
    }
    Err(format!(
        "service `{service}`: handler_timeout ({} s{}) + [host] handler_grace ({} s) = {} s \
         exceeds the Redis visibility_timeout ({} s): a request still running would be \
         delivered again; raise visibility_timeout in the bus URI or lower handler_timeout",
        handler_timeout.as_secs_f64(),
        if is_default { ", the default" } else { "" },
        handler_grace.as_secs_f64(),
        held.as_secs_f64(),
        visibility_timeout.as_secs_f64(),
    ))
}

impl HostConfig {
    /// Reads `path` (if given), then applies `overrides` and the
    /// environment (`env` is `std::env::var` in production).
    pub fn load(
        path: Option<&Path>,
        overrides: &Overrides,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let source = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                    location: path.display().to_string(),
                    message: format!("cannot read: {e}"),
                })?;
                Some((path, text))
            }
            None => None,
        };
        Self::load_source(source, overrides, env)
    }

    /// As [`HostConfig::load`], with the file's text already read from
    /// `path` (which names it in errors and is where relative paths start).
    pub fn load_text(
        path: &Path,
        text: String,
        overrides: &Overrides,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        Self::load_source(Some((path, text)), overrides, env)
    }

    fn load_source(
        source: Option<(&Path, String)>,
        overrides: &Overrides,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let path = source.as_ref().map(|(path, _)| *path);
        let (file, base, text) = match source {
            Some((path, text)) => {
                let text = if original::is_json(&text) {
                    original::to_toml(path, &text)?
                } else {
                    text
                };
                let file: FileConfig = toml::from_str(&text).map_err(|e| {
                    let location = match e.span() {
                        Some(span) => {
                            let (line, col) = line_col(&text, span.start);
                            format!("{}:{line}:{col}", path.display())
                        }
                        None => path.display().to_string(),
                    };
                    ConfigError {
                        location,
                        message: e.message().trim().to_owned(),
                    }
                })?;
                let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
                let services = file_services(&file, path, &text)?;
                ((file, services), base, Some(text))
            }
            None => (
                (FileConfig::default(), HashMap::new()),
                PathBuf::new(),
                None,
            ),
        };
        let (file, services) = file;
        let worker_processes: Vec<(&String, &String)> = services
            .iter()
            .filter(|(_, s)| s.workers > 1)
            .filter_map(|(name, s)| s.workers_location.as_ref().map(|l| (name, l)))
            .collect();
        let file_name = path.map(|p| p.display().to_string()).unwrap_or_default();
        let env_uri = env(BUS_URI_ENV).filter(|u| !u.is_empty());
        let mut warnings = Vec::new();
        let (bus_uri, uri_source) = match (&overrides.bus_uri, env_uri, file.bus.uri) {
            (Some(flag), env_uri, _) => {
                if env_uri.is_some() {
                    warnings.push(format!("{BUS_URI_ENV} is set, but --bus-uri wins over it"));
                }
                (flag.clone(), "--bus-uri".to_owned())
            }
            (None, Some(env_uri), file_uri) => {
                if file_uri.is_some() {
                    warnings.push(format!(
                        "{file_name}: [bus] uri is not used: {BUS_URI_ENV} is set and wins over it"
                    ));
                }
                (env_uri, BUS_URI_ENV.to_owned())
            }
            (None, None, Some(file_uri)) => (file_uri.joined(), format!("{file_name}: [bus] uri")),
            (None, None, None) => (DEFAULT_BUS_URI.to_owned(), "the default".to_owned()),
        };
        let exchange = overrides
            .bus_exchange
            .clone()
            .or(file.bus.exchange)
            .unwrap_or_else(|| DEFAULT_EXCHANGE.to_owned());
        let text = text.unwrap_or_default();
        let request_timeout = seconds(
            file.bus.request_timeout.as_ref(),
            "[bus] request_timeout",
            DEFAULT_REQUEST_TIMEOUT,
            &file_name,
            &text,
        )?;
        let shutdown_timeout = seconds(
            file.host.shutdown_timeout.as_ref(),
            "[host] shutdown_timeout",
            DEFAULT_SHUTDOWN_TIMEOUT,
            &file_name,
            &text,
        )?;
        let handler_grace = seconds(
            file.host.handler_grace.as_ref(),
            "[host] handler_grace",
            DEFAULT_HANDLER_GRACE,
            &file_name,
            &text,
        )?;
        let bus_traits = crate::bus::traits(&bus_uri).map_err(|message| ConfigError {
            location: uri_source.clone(),
            message: format!("bus URI {}: {message}", crate::redact::redact_uri(&bus_uri)),
        })?;
        let max_message_bytes = match &file.bus.max_message_bytes {
            None => DEFAULT_MAX_MESSAGE_BYTES,
            Some(v) => match usize::try_from(*v.get_ref()) {
                Ok(n) if n >= 1024 => n,
                _ => {
                    let (line, col) = line_col(&text, v.span().start);
                    return Err(ConfigError {
                        location: format!("{file_name}:{line}:{col}"),
                        message: format!(
                            "[bus] max_message_bytes must be at least 1024, not {}",
                            v.get_ref()
                        ),
                    });
                }
            },
        };
        let ack_window = match &file.bus.ack_window_us {
            None => DEFAULT_ACK_WINDOW,
            Some(v) => match u64::try_from(*v.get_ref()) {
                Ok(us) if us <= MAX_ACK_WINDOW_US => Duration::from_micros(us),
                _ => {
                    let (line, col) = line_col(&text, v.span().start);
                    return Err(ConfigError {
                        location: format!("{file_name}:{line}:{col}"),
                        message: format!(
                            "[bus] ack_window_us must be 0 to {MAX_ACK_WINDOW_US}, not {}",
                            v.get_ref()
                        ),
                    });
                }
            },
        };
        let http = http_settings(&file.http, &env, &file_name, &text)?;
        if file.http.token.is_some() && env(HTTP_TOKEN_ENV).is_some() {
            warnings.push(format!(
                "{file_name}: [http] token is not used: {HTTP_TOKEN_ENV} is set and wins over it"
            ));
        }
        let queue_prefix = match &file.bus.queue_prefix {
            None => String::new(),
            Some(prefix) => {
                let p = prefix.get_ref();
                let fine = p.len() <= MAX_QUEUE_PREFIX_BYTES
                    && p.bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'#');
                if !fine {
                    let (line, col) = line_col(&text, prefix.span().start);
                    return Err(ConfigError {
                        location: format!("{file_name}:{line}:{col}"),
                        message: format!(
                            "[bus] queue_prefix must be at most {MAX_QUEUE_PREFIX_BYTES} visible ASCII \
                             characters other than `*` and `#`, e.g. \"staging.\", not {p:?}"
                        ),
                    });
                }
                p.clone()
            }
        };
        let http_listen = overrides.http_listen.or(file.http.listen);
        if http_listen.is_some() && http.max_buffered_bytes < max_message_bytes {
            // A body the bus may carry must fit: otherwise it would always
            // be refused 503, "try again", and never taken.
            let span = file
                .http
                .max_buffered_bytes
                .as_ref()
                .map(Spanned::span)
                .or_else(|| file.bus.max_message_bytes.as_ref().map(Spanned::span));
            let location = span.map_or_else(
                || file_name.clone(),
                |span| {
                    let (line, col) = line_col(&text, span.start);
                    format!("{file_name}:{line}:{col}")
                },
            );
            return Err(ConfigError {
                location,
                message: format!(
                    "[http] max_buffered_bytes ({}) must be at least [bus] max_message_bytes ({}): \
                     a body of the largest size allowed must fit",
                    http.max_buffered_bytes, max_message_bytes
                ),
            });
        }
        if !bus_traits.shared {
            if let Some((name, location)) = worker_processes.first() {
                return Err(ConfigError {
                    location: (*location).clone(),
                    message: format!(
                        "service `{name}`: `workers` above 1 needs a shared bus (amqp:// or redis://); \
                         {} is inside one process",
                        crate::redact::redact_uri(&bus_uri)
                    ),
                });
            }
        }
        let visibility_timeout = match bus_traits.redelivers_after {
            Some(visibility) => {
                for (name, settings) in &services {
                    visibility_covers(
                        name,
                        settings.handler_timeout,
                        false,
                        handler_grace,
                        visibility,
                    )
                    .map_err(|message| ConfigError {
                        location: settings.location.clone().unwrap_or_default(),
                        message,
                    })?;
                }
                Some((visibility, uri_source.clone()))
            }
            None => None,
        };
        if !queue_prefix.is_empty() && exchange == DEFAULT_EXCHANGE {
            warnings.push(format!(
                "{file_name}: [bus] queue_prefix keeps this deployment's queues apart, but its \
                 exchange is the default `{DEFAULT_EXCHANGE}`: every deployment using it gets a copy \
                 of each request; give each its own [bus] exchange too"
            ));
        }
        let plugins_dir = match &overrides.plugins_dir {
            Some(dir) => dir.clone(),
            None => base.join(file.plugins.dir.unwrap_or_else(|| PathBuf::from("plugins"))),
        };
        Ok(Self {
            bus_uri,
            bus_uri_source: uri_source,
            queue_prefix,
            warnings,
            exchange,
            request_timeout,
            confirm_replies: file.bus.confirm_replies.unwrap_or(false),
            ack_window,
            max_message_bytes,
            reply_queue: file.bus.reply_queue.unwrap_or_default(),
            plugins_dir,
            plugin_trust: if overrides.allow_insecure_plugins {
                crate::plugin::Trust::AnyPermissions
            } else {
                crate::plugin::Trust::OwnerOnly
            },
            http_listen,
            http,
            services,
            shutdown_timeout,
            handler_grace,
            allow_breaking_upgrades: overrides.allow_breaking_upgrades
                || file.host.allow_breaking_upgrades.unwrap_or(false),
            visibility_timeout,
            bus_traits,
        })
    }

    /// Checks the services the plugin directory exports against the config:
    /// at least one, and every `[[service]]` entry among them.
    pub fn check_services(&self, loaded: &[&str]) -> Result<(), ServicesError> {
        if loaded.is_empty() {
            return Err(ServicesError::NoPlugins(
                self.plugins_dir.display().to_string(),
            ));
        }
        for (name, settings) in &self.services {
            if !loaded.contains(&name.as_str()) {
                return Err(ServicesError::UnknownService {
                    location: settings.location.clone().unwrap_or_default(),
                    name: name.clone(),
                    loaded: loaded.join(", "),
                });
            }
        }
        // Services without an entry run with the default handler_timeout.
        if let Some((visibility, source)) = &self.visibility_timeout {
            for name in loaded.iter().filter(|n| !self.services.contains_key(**n)) {
                visibility_covers(
                    name,
                    DEFAULT_HANDLER_TIMEOUT,
                    true,
                    self.handler_grace,
                    *visibility,
                )
                .map_err(|message| ConfigError {
                    location: source.clone(),
                    message,
                })?;
            }
        }
        Ok(())
    }

    /// How service `name` is served: its `[[service]]` entry or defaults,
    /// with `[bus] queue_prefix` before each queue's name.
    pub fn service(&self, name: &str) -> ServiceSettings {
        let mut settings = self
            .services
            .get(name)
            .cloned()
            .unwrap_or_else(|| ServiceSettings::defaults(name));
        if !self.queue_prefix.is_empty() {
            for queue in &mut settings.queues {
                queue.name.insert_str(0, &self.queue_prefix);
            }
        }
        settings
    }
}

/// A positive number of seconds from the file, or `default`.
pub(super) fn seconds(
    value: Option<&Spanned<f64>>,
    key: &str,
    default: Duration,
    file: &str,
    text: &str,
) -> Result<Duration, ConfigError> {
    let Some(value) = value else {
        return Ok(default);
    };
    let secs = *value.get_ref();
    if secs.is_finite() && secs > 0.0 && secs < 1e9 {
        return Ok(Duration::from_secs_f64(secs));
    }
    let (line, col) = line_col(text, value.span().start);
    Err(ConfigError {
        location: format!("{file}:{line}:{col}"),
        message: format!("{key} must be a positive number of seconds, not {secs}"),
    })
}

pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}
