//! The host's TOML configuration, and how command-line flags and the
//! environment override it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// The exchange Commissaire uses unless told otherwise.
pub const DEFAULT_EXCHANGE: &str = "commissaire";
/// The bus when nothing names one: the embedded in-process bus.
pub const DEFAULT_BUS_URI: &str = "memory://";
/// Handlers in flight per service unless configured.
pub const DEFAULT_CONCURRENCY: u16 = 16;
/// How long a request waits for its reply (Commissaire's default).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a handler may run before its caller gets a timeout reply.
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(60);
/// How much longer a timed-out handler may run before its worker is
/// recycled.
pub const DEFAULT_HANDLER_GRACE: Duration = Duration::from_secs(10);
/// How long stopping waits for in-flight handlers and their replies.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// How many worker crashes a request may cause before it is refused.
pub const DEFAULT_CRASH_LIMIT: u32 = 3;
/// The largest request (and reply) the host takes unless configured.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// How long an ack may wait to go out with others unless configured.
pub const DEFAULT_ACK_WINDOW: Duration = Duration::from_millis(1);
/// The longest ack window: a waiting ack holds a prefetch slot, and is
/// lost (its request delivered again) if the worker dies.
pub const MAX_ACK_WINDOW_US: u64 = 100_000;
/// Handlers waiting in bus calls at once, per worker, per unit of
/// `concurrency`, unless configured.
pub const DEFAULT_BUS_WAITS_PER_SLOT: u16 = 4;
/// Environment variable read for the bus URI when neither a flag nor the
/// file gives one.
pub const BUS_URI_ENV: &str = "COMMISSAIRE_BUS_URI";
/// Environment variable holding the HTTP endpoint's bearer token; wins
/// over `[http] token` (a secret is better kept out of files).
pub const HTTP_TOKEN_ENV: &str = "COMMISSAIRE_HTTP_TOKEN";
/// Requests the HTTP endpoint relays at once unless configured.
pub const DEFAULT_HTTP_MAX_IN_FLIGHT: usize = 1024;
/// Connections the HTTP endpoint holds open at once unless configured.
pub const DEFAULT_HTTP_MAX_CONNECTIONS: usize = 1024;

/// A configuration error: where, and what is wrong, on one line.
#[derive(Debug, thiserror::Error)]
#[error("{location}: {message}")]
pub struct ConfigError {
    /// `file:line:column`, or the file alone.
    pub location: String,
    /// What is wrong.
    pub message: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    bus: BusSection,
    #[serde(default)]
    plugins: PluginsSection,
    #[serde(default)]
    http: HttpSection,
    #[serde(default)]
    host: HostSection,
    #[serde(default)]
    service: Vec<ServiceSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostSection {
    /// Seconds stopping waits for in-flight handlers.
    shutdown_timeout: Option<Spanned<f64>>,
    /// Seconds a timed-out handler may still run before its worker is
    /// recycled.
    handler_grace: Option<Spanned<f64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BusSection {
    /// One URI, or a failover list (also as kombu's `a;b;c`).
    uri: Option<UriList>,
    exchange: Option<String>,
    /// Seconds a request waits for its reply.
    request_timeout: Option<Spanned<f64>>,
    /// Ack a request only once the broker confirmed its reply.
    confirm_replies: Option<bool>,
    /// Microseconds an ack may wait to go out with others (AMQP).
    ack_window_us: Option<Spanned<i64>>,
    /// The largest request or reply, in bytes.
    max_message_bytes: Option<Spanned<i64>>,
    /// Where the host's own requests wait for replies: `named`, `direct`.
    reply_queue: Option<crate::bus::ReplyQueueKind>,
}

#[derive(Debug)]
enum UriList {
    One(String),
    Several(Vec<String>),
}

impl<'de> Deserialize<'de> for UriList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Uris;
        impl<'de> serde::de::Visitor<'de> for Uris {
            type Value = UriList;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a URI string or a list of URI strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<UriList, E> {
                Ok(UriList::One(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<UriList, A::Error> {
                let mut uris = Vec::new();
                while let Some(uri) = seq.next_element::<String>()? {
                    uris.push(uri);
                }
                Ok(UriList::Several(uris))
            }
        }
        d.deserialize_any(Uris)
    }
}

impl UriList {
    /// kombu's failover form: `a;b;c`.
    fn joined(self) -> String {
        match self {
            Self::One(uri) => uri,
            Self::Several(uris) => uris.join(";"),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginsSection {
    dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSection {
    listen: Option<SocketAddr>,
    token: Option<Spanned<String>>,
    allow: Option<Vec<Spanned<String>>>,
    cors_origins: Option<Vec<Spanned<String>>>,
    max_in_flight: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
}

/// The HTTP endpoint's bearer token. Never printed: `Debug` shows `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpToken(String);

impl HttpToken {
    /// The token, to compare a request's `Authorization` with.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// A token that can be sent in an `Authorization` header: visible ASCII
    /// without spaces, not empty.
    pub(crate) fn parse(text: &str) -> Result<Self, &'static str> {
        if text.is_empty() {
            Err("is empty")
        } else if !text.bytes().all(|b| b.is_ascii_graphic()) {
            Err("must be visible ASCII characters without spaces")
        } else {
            Ok(Self(text.to_owned()))
        }
    }
}

impl std::fmt::Debug for HttpToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpToken(***)")
    }
}

/// How the HTTP endpoint guards itself (`[http]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    /// `/rpc/*` requires `Authorization: Bearer <token>` when set.
    pub token: Option<HttpToken>,
    /// Topic patterns of the routing keys relayed; `None` relays all.
    pub allow: Option<Vec<String>>,
    /// Origins whose browsers may call `/rpc/*` (CORS); none by default.
    pub cors_origins: Vec<String>,
    /// Requests relayed at once; beyond, 503.
    pub max_in_flight: usize,
    /// Connections open at once; beyond, new ones are closed at once.
    pub max_connections: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            token: None,
            allow: None,
            cors_origins: Vec::new(),
            max_in_flight: DEFAULT_HTTP_MAX_IN_FLIGHT,
            max_connections: DEFAULT_HTTP_MAX_CONNECTIONS,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSection {
    name: Spanned<String>,
    queues: Option<Vec<QueueConfig>>,
    concurrency: Option<NonZeroU16>,
    workers: Option<Spanned<NonZeroU16>>,
    handler_timeout: Option<Spanned<f64>>,
    crash_limit: Option<std::num::NonZeroU32>,
    inline_handlers: Option<bool>,
    max_bus_waits: Option<u16>,
    #[serde(default)]
    config: toml::Table,
}

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
    pub arguments: std::collections::BTreeMap<String, QueueArgument>,
}

/// One queue declaration argument, typed as AMQP carries it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum QueueArgument {
    /// A long string.
    Text(String),
    /// A signed 64-bit integer.
    Integer(i64),
    /// A boolean.
    Bool(bool),
    /// A double.
    Float(f64),
}

/// How one service is served.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// Its queues.
    pub queues: Vec<QueueConfig>,
    /// Handlers in flight (and the broker prefetch), per worker.
    pub concurrency: u16,
    /// Worker processes.
    pub workers: u16,
    /// How long a handler may run before its caller gets a timeout reply.
    pub handler_timeout: Duration,
    /// Worker crashes a request may cause before it is refused.
    pub crash_limit: u32,
    /// Run handlers on the async runtime's threads without handing the
    /// thread over first (`Some(true)`), always hand it over
    /// (`Some(false)`), or learn it per method (`None`, the default: see
    /// [`crate::placement`]).
    pub inline_handlers: Option<bool>,
    /// Handlers that may wait in bus calls at once, per worker: each
    /// lets the consumers take one more delivery while it waits, and a
    /// call beyond this fails at once instead of raising the prefetch
    /// further (a burst of self-calls cannot take every thread).
    pub max_bus_waits: u16,
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
            inline_handlers: None,
            max_bus_waits: DEFAULT_CONCURRENCY.saturating_mul(DEFAULT_BUS_WAITS_PER_SLOT),
            config: serde_json::Value::Object(serde_json::Map::new()),
            location: None,
            workers_location: None,
        }
    }
}

/// Command-line values that win over the file.
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
}

/// The configuration in effect.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The bus URI (may hold a password: print it with `redact_uri`).
    pub bus_uri: String,
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
    /// On Redis, the bus URI's `visibility_timeout` (`None` on other
    /// buses), and where the URI was given, for errors.
    pub visibility_timeout: Option<(Duration, String)>,
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
        let uri_source = if overrides.bus_uri.is_some() {
            "--bus-uri".to_owned()
        } else if file.bus.uri.is_some() {
            format!("{file_name}: [bus] uri")
        } else {
            BUS_URI_ENV.to_owned()
        };
        let bus_uri = overrides
            .bus_uri
            .clone()
            .or(file.bus.uri.map(UriList::joined))
            .or_else(|| env(BUS_URI_ENV))
            .unwrap_or_else(|| DEFAULT_BUS_URI.to_owned());
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
        if bus_uri.contains(';') {
            let kinds: Vec<_> = bus_uri
                .split(';')
                .map(|u| crate::bus::BusKind::of(u.trim()).ok())
                .collect();
            if kinds.iter().any(|k| *k != Some(crate::bus::BusKind::Amqp)) {
                return Err(ConfigError {
                    location: file_name.clone(),
                    message: format!(
                        "bus URI {}: a failover list takes amqp:// and amqps:// URIs only",
                        crate::redact::redact_uri(&bus_uri)
                    ),
                });
            }
        }
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
        if !crate::bus::BusKind::of(&bus_uri).is_ok_and(crate::bus::BusKind::is_shared) {
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
        let visibility_timeout = match crate::bus::BusKind::of(&bus_uri) {
            Ok(crate::bus::BusKind::Redis) => {
                let (_, options) =
                    crate::bus::redis::parse_uri(&bus_uri).map_err(|message| ConfigError {
                        location: uri_source.clone(),
                        message: format!(
                            "bus URI {}: {message}",
                            crate::redact::redact_uri(&bus_uri)
                        ),
                    })?;
                for (name, settings) in &services {
                    visibility_covers(
                        name,
                        settings.handler_timeout,
                        false,
                        handler_grace,
                        options.visibility_timeout,
                    )
                    .map_err(|message| ConfigError {
                        location: settings.location.clone().unwrap_or_default(),
                        message,
                    })?;
                }
                Some((options.visibility_timeout, uri_source))
            }
            _ => None,
        };
        let plugins_dir = match &overrides.plugins_dir {
            Some(dir) => dir.clone(),
            None => base.join(file.plugins.dir.unwrap_or_else(|| PathBuf::from("plugins"))),
        };
        Ok(Self {
            bus_uri,
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
            http_listen: overrides.http_listen.or(file.http.listen),
            http,
            services,
            shutdown_timeout,
            handler_grace,
            visibility_timeout,
        })
    }

    /// Checks the services the plugin directory exports against the config:
    /// at least one, and every `[[service]]` entry among them.
    pub fn check_services(&self, loaded: &[&str]) -> Result<(), crate::error::HostError> {
        if loaded.is_empty() {
            return Err(crate::error::HostError::NoPlugins(
                self.plugins_dir.display().to_string(),
            ));
        }
        for (name, settings) in &self.services {
            if !loaded.contains(&name.as_str()) {
                return Err(crate::error::HostError::UnknownService {
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

    /// How service `name` is served: its `[[service]]` entry or defaults.
    pub fn service(&self, name: &str) -> ServiceSettings {
        self.services
            .get(name)
            .cloned()
            .unwrap_or_else(|| ServiceSettings::defaults(name))
    }
}

fn file_services(
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
            inline_handlers: section.inline_handlers,
            max_bus_waits: section
                .max_bus_waits
                .unwrap_or(concurrency.saturating_mul(DEFAULT_BUS_WAITS_PER_SLOT)),
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

/// The `[http]` settings, with the token from the environment winning.
fn http_settings(
    section: &HttpSection,
    env: impl Fn(&str) -> Option<String>,
    file: &str,
    text: &str,
) -> Result<HttpSettings, ConfigError> {
    let at = |span: std::ops::Range<usize>| {
        let (line, col) = line_col(text, span.start);
        format!("{file}:{line}:{col}")
    };
    let token = match (env(HTTP_TOKEN_ENV), &section.token) {
        (Some(value), _) => Some(HttpToken::parse(&value).map_err(|why| ConfigError {
            location: HTTP_TOKEN_ENV.to_owned(),
            message: format!("the HTTP token {why}"),
        })?),
        (None, Some(value)) => {
            Some(
                HttpToken::parse(value.get_ref()).map_err(|why| ConfigError {
                    location: at(value.span()),
                    message: format!("[http] token {why}"),
                })?,
            )
        }
        (None, None) => None,
    };
    let allow = match &section.allow {
        None => None,
        Some(patterns) => {
            let mut allow = Vec::with_capacity(patterns.len());
            for pattern in patterns {
                let p = pattern.get_ref();
                if p.is_empty() || p.len() > crate::bus::topic::MAX_ROUTING_KEY_BYTES {
                    return Err(ConfigError {
                        location: at(pattern.span()),
                        message: format!(
                            "[http] allow: `{p}` is not a routing-key pattern \
                             (1 to 255 bytes, e.g. \"simple.*\" or \"demo.#\")"
                        ),
                    });
                }
                allow.push(p.clone());
            }
            Some(allow)
        }
    };
    let mut cors_origins = Vec::new();
    for origin in section.cors_origins.iter().flatten() {
        let o = origin.get_ref();
        if !is_origin(o) {
            return Err(ConfigError {
                location: at(origin.span()),
                message: format!(
                    "[http] cors_origins: `{o}` is not an origin \
                     (scheme, host and optional port, e.g. \"https://ops.example.com\")"
                ),
            });
        }
        cors_origins.push(o.to_ascii_lowercase());
    }
    let limit = |value: &Option<Spanned<i64>>, key: &str, default: usize| match value {
        None => Ok(default),
        Some(v) => match usize::try_from(*v.get_ref()) {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(ConfigError {
                location: at(v.span()),
                message: format!("[http] {key} must be at least 1, not {}", v.get_ref()),
            }),
        },
    };
    Ok(HttpSettings {
        token,
        allow,
        cors_origins,
        max_in_flight: limit(
            &section.max_in_flight,
            "max_in_flight",
            DEFAULT_HTTP_MAX_IN_FLIGHT,
        )?,
        max_connections: limit(
            &section.max_connections,
            "max_connections",
            DEFAULT_HTTP_MAX_CONNECTIONS,
        )?,
    })
}

/// `http://host[:port]` or `https://host[:port]`, as a browser sends it in
/// `Origin` (no path, no wildcard).
fn is_origin(text: &str) -> bool {
    let Some((scheme, rest)) = text.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}

/// A positive number of seconds from the file, or `default`.
fn seconds(
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

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(
        text: &str,
        overrides: &Overrides,
        env: Option<&str>,
    ) -> Result<HostConfig, String> {
        let dir = std::env::temp_dir().join(format!("chcfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let path = dir.join("host.toml");
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        let r = HostConfig::load(Some(&path), overrides, |_| env.map(str::to_owned)).map_err(|e| {
            e.to_string()
                .replace(&path.display().to_string(), "host.toml")
        });
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    const EXAMPLE: &str = r#"
[bus]
uri = "memory://"
exchange = "commissaire"

[plugins]
dir = "plugins"

[http]
listen = "127.0.0.1:8080"

[[service]]
name = "simple"
queues = [{ name = "simple", routing_key = "simple.*" }]
concurrency = 16
config = { greeting = "hi" }
"#;

    #[test]
    fn the_ack_window_defaults_to_1_ms_and_is_bounded() {
        let ack_window = |toml: &str| load_text(toml, &Overrides::default(), None);
        assert_eq!(ack_window("").unwrap().ack_window, Duration::from_millis(1));
        assert_eq!(
            ack_window("[bus]\nack_window_us = 0\n").unwrap().ack_window,
            Duration::ZERO
        );
        for bad in ["-1", "100001"] {
            let e = ack_window(&format!("[bus]\nack_window_us = {bad}\n")).unwrap_err();
            assert!(
                e.to_string().contains("ack_window_us must be 0 to 100000"),
                "{e}"
            );
        }
    }

    #[test]
    fn the_example_parses() {
        let c = load_text(EXAMPLE, &Overrides::default(), None).unwrap();
        assert_eq!(c.bus_uri, "memory://");
        assert_eq!(c.http_listen, Some("127.0.0.1:8080".parse().unwrap()));
        let s = c.service("simple");
        assert_eq!(s.concurrency, 16);
        assert_eq!(s.config, serde_json::json!({"greeting": "hi"}));
        assert!(c.plugins_dir.ends_with("plugins"));
        assert_eq!(c.reply_queue, crate::bus::ReplyQueueKind::Named);
        let direct = load_text(
            "[bus]\nreply_queue = \"direct\"\n",
            &Overrides::default(),
            None,
        );
        assert_eq!(
            direct.unwrap().reply_queue,
            crate::bus::ReplyQueueKind::Direct
        );
        let d = c.service("demo");
        assert_eq!(
            d.queues,
            vec![QueueConfig {
                name: "demo".into(),
                routing_key: "demo.*".into(),
                arguments: Default::default(),
            }]
        );
    }

    #[test]
    fn queue_arguments_are_typed_and_uri_lists_join_as_kombu() {
        let c = load_text(
            r#"
[bus]
uri = ["amqp://h1", "amqp://u:p@h2/%2f"]
[[service]]
name = "simple"
queues = [{ name = "simple", routing_key = "simple.*", arguments = { "x-queue-type" = "quorum", "x-delivery-limit" = 5, "x-single-active-consumer" = false } }]
"#,
            &Overrides::default(),
            None,
        )
        .unwrap();
        assert_eq!(c.bus_uri, "amqp://h1;amqp://u:p@h2/%2f");
        let args = &c.service("simple").queues[0].arguments;
        assert_eq!(args["x-queue-type"], QueueArgument::Text("quorum".into()));
        assert_eq!(args["x-delivery-limit"], QueueArgument::Integer(5));
        assert_eq!(args["x-single-active-consumer"], QueueArgument::Bool(false));
        let err = load_text(
            "[bus]\nuri = \"amqp://h1;redis://h2\"\n",
            &Overrides::default(),
            None,
        )
        .unwrap_err();
        assert!(err.contains("a failover list takes amqp://"), "{err}");
        let err = load_text(
            "[[service]]\nname = \"s\"\nqueues = [{ name = \"s\", routing_key = \"s.*\", arguments = { x = [1] } }]\n",
            &Overrides::default(),
            None,
        )
        .unwrap_err();
        assert!(err.starts_with("host.toml:"), "{err}");
    }

    #[test]
    fn a_redis_visibility_timeout_shorter_than_a_handler_s_time_is_refused() {
        let redis = |vt: &str| Overrides {
            bus_uri: Some(format!("redis://h/0?visibility_timeout={vt}")),
            ..Overrides::default()
        };
        let text = "[host]\nhandler_grace = 2\n\n[[service]]\nname = \"s\"\nhandler_timeout = 25\n";
        assert_eq!(
            load_text(text, &redis("20"), None).unwrap_err(),
            "host.toml:5:8: service `s`: handler_timeout (25 s) + [host] handler_grace (2 s) = 27 s \
             exceeds the Redis visibility_timeout (20 s): a request still running would be \
             delivered again; raise visibility_timeout in the bus URI or lower handler_timeout"
        );
        let c = load_text(text, &redis("27"), None).unwrap();
        assert_eq!(
            c.visibility_timeout,
            Some((Duration::from_secs(27), "--bus-uri".to_owned()))
        );
        assert!(c.check_services(&["s"]).is_ok());
        // A service without an entry runs with the default handler_timeout.
        let e = c.check_services(&["s", "other"]).unwrap_err().to_string();
        assert!(
            e.starts_with("--bus-uri: service `other`: handler_timeout (60 s, the default) + [host] handler_grace (2 s) = 62 s"),
            "{e}"
        );
        // kombu's default of one hour covers the defaults.
        let c = load_text(
            "[bus]\nuri = \"redis://h/0\"\n",
            &Overrides::default(),
            None,
        )
        .unwrap();
        assert_eq!(
            c.visibility_timeout.as_ref().map(|v| v.0),
            Some(Duration::from_secs(3600))
        );
        assert!(c.check_services(&["any"]).is_ok());
        assert_eq!(
            load_text("", &redis("soon"), None).unwrap_err(),
            "--bus-uri: bus URI redis://h/0?visibility_timeout=soon: \
             `visibility_timeout` must be a positive number of seconds, not `soon`"
        );
        assert_eq!(
            load_text("", &Overrides::default(), None)
                .unwrap()
                .visibility_timeout,
            None
        );
    }

    #[test]
    fn flag_wins_over_file_which_wins_over_env() {
        let flag = Overrides {
            bus_uri: Some("amqp://flag".into()),
            ..Overrides::default()
        };
        assert_eq!(
            load_text(EXAMPLE, &flag, Some("amqp://env"))
                .unwrap()
                .bus_uri,
            "amqp://flag"
        );
        assert_eq!(
            load_text(EXAMPLE, &Overrides::default(), Some("amqp://env"))
                .unwrap()
                .bus_uri,
            "memory://"
        );
        assert_eq!(
            load_text("", &Overrides::default(), Some("amqp://env"))
                .unwrap()
                .bus_uri,
            "amqp://env"
        );
        assert_eq!(
            load_text("", &Overrides::default(), None).unwrap().bus_uri,
            DEFAULT_BUS_URI
        );
    }

    #[test]
    fn errors_name_file_line_and_problem() {
        let cases = [
            ("[bus]\nurl = \"x\"\n", "host.toml:2:1: unknown field `url`"),
            (
                "[http]\nlisten = \"nope\"\n",
                "host.toml:2:10: invalid socket address syntax",
            ),
            (
                "[[service]]\nname = \"s\"\nconcurrency = 0\n",
                "host.toml:3:15:",
            ),
            ("[bus\n", "host.toml:1:5:"),
            (
                "[[service]]\nname = \"a\"\n[[service]]\nname = \"a\"\n",
                "host.toml:4:8: service `a` is configured twice",
            ),
            (
                "[[service]]\nname = \"s\"\nworkers = 2\n",
                "host.toml:3:11: service `s`: `workers` above 1 needs a shared bus \
                 (amqp:// or redis://); memory:// is inside one process",
            ),
            (
                "[[service]]\nname = \"s\"\nhandler_timeout = -1\n",
                "host.toml:3:19: handler_timeout must be a positive number of seconds, not -1",
            ),
            (
                "[bus]\nrequest_timeout = \"x\"\n",
                "host.toml:2:19: invalid type: string \"x\", expected f64",
            ),
            (
                "[bus]\nrequest_timeout = -3\n",
                "host.toml:2:19: [bus] request_timeout must be a positive number of seconds, not -3",
            ),
            (
                "[bus]\nreply_queue = \"pseudo\"\n",
                "host.toml:2:15: unknown variant `pseudo`, expected `named` or `direct`",
            ),
            (
                "[host]\nshutdown_timeout = 0\n",
                "host.toml:2:20: [host] shutdown_timeout must be a positive number of seconds, not 0",
            ),
        ];
        for (text, expected) in cases {
            let e = load_text(text, &Overrides::default(), None).unwrap_err();
            assert!(e.starts_with(expected), "{text:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn worker_settings_and_their_defaults() {
        let text = "[bus]\nuri = \"amqp://h\"\n[host]\nhandler_grace = 2.5\n\
                    [[service]]\nname = \"s\"\nworkers = 3\nhandler_timeout = 5\ncrash_limit = 2\n";
        let c = load_text(text, &Overrides::default(), None).unwrap();
        let s = c.service("s");
        assert_eq!((s.workers, s.crash_limit), (3, 2));
        assert_eq!(s.handler_timeout, Duration::from_secs(5));
        assert_eq!(c.handler_grace, Duration::from_millis(2500));
        assert_eq!(c.shutdown_timeout, DEFAULT_SHUTDOWN_TIMEOUT);
        let d = c.service("other");
        assert_eq!((d.workers, d.crash_limit), (1, DEFAULT_CRASH_LIMIT));
        assert_eq!(d.handler_timeout, DEFAULT_HANDLER_TIMEOUT);
        // The bus given on the command line decides too.
        let memory = Overrides {
            bus_uri: Some("memory://".into()),
            ..Overrides::default()
        };
        let e = load_text(text, &memory, None).unwrap_err();
        assert!(
            e.starts_with("host.toml:7:11: service `s`: `workers` above 1"),
            "{e}"
        );
    }

    #[test]
    fn http_settings_and_their_defaults() {
        let c = load_text(EXAMPLE, &Overrides::default(), None).unwrap();
        assert_eq!(c.http, HttpSettings::default());
        assert_eq!(c.http.max_in_flight, 1024);
        let text = "[http]\ntoken = \"s3cret\"\nallow = [\"simple.*\", \"demo.ping\"]\n\
                    cors_origins = [\"https://Ops.example.com:8443\"]\n\
                    max_in_flight = 8\nmax_connections = 16\n";
        let c = load_text(text, &Overrides::default(), None).unwrap();
        assert_eq!(c.http_listen, None);
        assert_eq!(
            c.http.token.as_ref().map(HttpToken::expose),
            Some(&b"s3cret"[..])
        );
        assert_eq!(
            c.http.allow,
            Some(vec!["simple.*".to_owned(), "demo.ping".to_owned()])
        );
        assert_eq!(c.http.cors_origins, ["https://ops.example.com:8443"]);
        assert_eq!((c.http.max_in_flight, c.http.max_connections), (8, 16));
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "the token is never printed"
        );
    }

    #[test]
    fn the_environment_token_wins_over_the_file() {
        let dir = std::env::temp_dir().join(format!("chcfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("host.toml");
        std::fs::write(&path, "[http]\ntoken = \"from-file\"\n").unwrap();
        let env = |value: &'static str| {
            move |name: &str| (name == HTTP_TOKEN_ENV).then(|| value.to_owned())
        };
        let c = HostConfig::load(Some(&path), &Overrides::default(), env("from-env")).unwrap();
        assert_eq!(c.http.token.unwrap().expose(), b"from-env");
        let e = HostConfig::load(Some(&path), &Overrides::default(), env("")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "COMMISSAIRE_HTTP_TOKEN: the HTTP token is empty"
        );
        let e = HostConfig::load(Some(&path), &Overrides::default(), env("two words")).unwrap_err();
        assert!(!e.to_string().contains("two words"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_http_settings_name_the_line() {
        let cases = [
            (
                "[http]\ntoken = \"\"\n",
                "host.toml:2:9: [http] token is empty",
            ),
            (
                "[http]\ntoken = \"a b\"\n",
                "host.toml:2:9: [http] token must be visible ASCII characters without spaces",
            ),
            (
                "[http]\nallow = [\"\"]\n",
                "host.toml:2:10: [http] allow: `` is not",
            ),
            (
                "[http]\ncors_origins = [\"*\"]\n",
                "host.toml:2:17: [http] cors_origins: `*` is not an origin",
            ),
            (
                "[http]\ncors_origins = [\"https://a.example/path\"]\n",
                "host.toml:2:17: [http] cors_origins: `https://a.example/path` is not an origin",
            ),
            (
                "[http]\nmax_in_flight = 0\n",
                "host.toml:2:17: [http] max_in_flight must be at least 1, not 0",
            ),
            (
                "[http]\nmax_connections = -5\n",
                "host.toml:2:19: [http] max_connections must be at least 1, not -5",
            ),
            (
                "[http]\ntokens = \"x\"\n",
                "host.toml:2:1: unknown field `tokens`",
            ),
        ];
        for (text, expected) in cases {
            let e = load_text(text, &Overrides::default(), None).unwrap_err();
            assert!(e.starts_with(expected), "{text:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn line_and_column() {
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab", 0), (1, 1));
    }
}
