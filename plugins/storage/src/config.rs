//! The service's configuration, as the original's `storage.conf` holds
//! it: `storage_handlers` (which store keeps which model classes) and the
//! `custodia_*` keys of the secrets store.

use serde_json::{Map, Value};

use crate::models::{ModelClass, CLASSES};
use crate::tls::{TlsFiles, CA_KEY, CERT_KEY, KEY_KEY};

/// Where the original's etcd store looks when its entry names no server.
pub const DEFAULT_ETCD_URL: &str = "http://127.0.0.1:2379";

/// The custodia socket of the original when `custodia_socket_path` is
/// not set.
pub const DEFAULT_CUSTODIA_SOCKET: &str = "/var/run/custodia/custodia.sock";

/// The etcd store's module in the original: its default handler name.
const ETCD_MODULE: &str = "commissaire.storage.etcd";
/// The custodia store's module in the original: its handler name.
const CUSTODIA_MODULE: &str = "commissaire_service.storage.custodia";

pub use crate::error::ConfigError;

/// The kind of store a handler is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Etcd,
    Custodia,
}

impl StoreKind {
    /// The original's class name, as `list_store_handlers` reports it.
    pub fn class_name(self) -> &'static str {
        match self {
            StoreKind::Etcd => "EtcdStoreHandler",
            StoreKind::Custodia => "CustodiaStoreHandler",
        }
    }
}

/// One configured store handler.
#[derive(Debug, Clone)]
pub struct HandlerDef {
    pub name: String,
    pub kind: StoreKind,
    /// Its entry without `type` and `models`, with its `name`: what
    /// `list_store_handlers` shows.
    pub config: Map<String, Value>,
    /// The classes routed to it, sorted by name.
    pub classes: Vec<&'static ModelClass>,
}

impl HandlerDef {
    /// The etcd server URL of an etcd handler.
    pub fn server_url(&self) -> &str {
        self.config
            .get("server_url")
            .and_then(Value::as_str)
            .unwrap_or(DEFAULT_ETCD_URL)
    }

    /// The TLS files of an etcd handler: `certificate_ca_path`, and
    /// `certificate_path` with `certificate_key_path`.
    pub fn tls_files(&self) -> TlsFiles<'_> {
        tls_files(&self.config)
    }

    /// Whether an etcd handler speaks TLS (`https://`).
    pub fn uses_tls(&self) -> bool {
        self.server_url().starts_with("https://")
    }
}

/// Every handler, in the order the original registers them (custodia
/// first, then `storage_handlers` in order).
#[derive(Debug)]
pub struct Routing {
    pub handlers: Vec<HandlerDef>,
}

impl Routing {
    /// The routing `config` (the plugin's `init` config) asks for.
    pub fn from_config(config: &Value) -> Result<Self, ConfigError> {
        let empty = Map::new();
        let root = match config {
            Value::Null => &empty,
            Value::Object(m) => m,
            other => return Err(ConfigError(format!("must be a table, not {other}"))),
        };
        let mut handlers = Vec::new();

        // Secret models always go to custodia, configured by the root's
        // `custodia_*` keys with the prefix dropped.
        let mut custodia: Map<String, Value> = root
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("custodia_")?.to_owned(), v.clone())))
            .collect();
        custodia.insert("name".into(), Value::String(CUSTODIA_MODULE.into()));
        handlers.push(HandlerDef {
            name: CUSTODIA_MODULE.into(),
            kind: StoreKind::Custodia,
            config: custodia,
            classes: sorted(CLASSES.iter().filter(|c| c.secret).collect()),
        });

        let entries = match root.get("storage_handlers") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.clone(),
            Some(other) => {
                return Err(ConfigError(format!(
                    "`storage_handlers` must be a list, not {other}"
                )))
            }
        };
        if entries.is_empty() {
            // The original means one etcd store for every model here (and
            // fails on its own default, which names no type).
            let mut only = Map::new();
            only.insert("type".into(), Value::String("etcd".into()));
            only.insert("name".into(), Value::String("etcd".into()));
            register(&mut handlers, Value::Object(only))?;
        }
        for entry in entries {
            register(&mut handlers, entry)?;
        }
        Ok(Self { handlers })
    }

    /// The custodia socket: `custodia_socket_path`, else the original's
    /// default.
    pub fn custodia_socket(&self) -> &str {
        self.handlers
            .iter()
            .find(|h| h.kind == StoreKind::Custodia)
            .and_then(|h| h.config.get("socket_path"))
            .and_then(Value::as_str)
            .unwrap_or(DEFAULT_CUSTODIA_SOCKET)
    }

    /// The handler a model of `class` goes to.
    pub fn handler_for(&self, class: &ModelClass) -> Option<&HandlerDef> {
        self.handlers
            .iter()
            .find(|h| h.classes.iter().any(|c| c.name == class.name))
    }

    /// The handler named `name`.
    pub fn handler_named(&self, name: &str) -> Option<&HandlerDef> {
        self.handlers.iter().find(|h| h.name == name)
    }
}

fn sorted(mut classes: Vec<&'static ModelClass>) -> Vec<&'static ModelClass> {
    classes.sort_by_key(|c| c.name);
    classes
}

fn register(handlers: &mut Vec<HandlerDef>, entry: Value) -> Result<(), ConfigError> {
    let Value::Object(mut config) = entry else {
        return Err(ConfigError(format!(
            "Store handler format must be a JSON object, got {entry} instead"
        )));
    };
    let kind = match config.remove("type") {
        None => {
            return Err(ConfigError(format!(
                "Store handler configuration missing \"type\" key: {}",
                Value::Object(config)
            )))
        }
        Some(Value::String(t)) if t == "etcd" || t == ETCD_MODULE => StoreKind::Etcd,
        Some(other) => {
            return Err(ConfigError(format!(
                "unknown store handler type {other}: this plugin has \"etcd\" ({ETCD_MODULE})"
            )))
        }
    };
    let patterns = match config.remove("models") {
        None => vec!["*".to_owned()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|p| {
                p.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ConfigError(format!("\"models\" must hold strings, not {p}")))
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ConfigError(format!(
                "\"models\" must be a list of patterns, not {other}"
            )))
        }
    };
    let mut classes: Vec<&'static ModelClass> = Vec::new();
    for pattern in &patterns {
        let matches: Vec<_> = CLASSES
            .iter()
            .filter(|c| !c.secret && glob(pattern, c.name))
            .collect();
        if matches.is_empty() {
            return Err(ConfigError(format!("No match for model: {pattern}")));
        }
        for m in matches {
            if !classes.iter().any(|c| c.name == m.name) {
                classes.push(m);
            }
        }
    }
    if kind == StoreKind::Etcd {
        check_etcd(&config)?;
    }
    let given = match config.get("name") {
        None => String::new(),
        Some(Value::String(s)) => s.trim().to_owned(),
        Some(other) => {
            return Err(ConfigError(format!(
                "\"name\" must be a string, not {other}"
            )))
        }
    };
    let name = if given.is_empty() {
        let mut name = ETCD_MODULE.to_owned();
        let mut suffix = 1;
        while handlers.iter().any(|h| h.name == name) {
            name = format!("{ETCD_MODULE}-{suffix}");
            suffix += 1;
        }
        config.insert("name".into(), Value::String(name.clone()));
        name
    } else {
        given
    };
    if handlers.iter().any(|h| h.name == name) {
        return Err(ConfigError(format!(
            "Duplicate storage handlers named \"{name}\""
        )));
    }
    for class in &classes {
        if let Some(owner) = handlers
            .iter()
            .find(|h| h.classes.iter().any(|c| c.name == class.name))
        {
            return Err(ConfigError(format!(
                "Model \"{}\" already assigned to \"{}\"",
                class.name, owner.name
            )));
        }
    }
    handlers.push(HandlerDef {
        name,
        kind,
        config,
        classes: sorted(classes),
    });
    Ok(())
}

fn check_etcd(config: &Map<String, Value>) -> Result<(), ConfigError> {
    let url = match config.get("server_url") {
        None => DEFAULT_ETCD_URL,
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(ConfigError(format!(
                "\"server_url\" must be a string, not {other}"
            )))
        }
    };
    for key in [CA_KEY, CERT_KEY, KEY_KEY] {
        match config.get(key) {
            None | Some(Value::Null | Value::String(_)) => {}
            Some(other) => {
                return Err(ConfigError(format!(
                    "\"{key}\" must be a string (a file's path), not {other}"
                )))
            }
        }
    }
    let files = tls_files(config);
    if given(config, CERT_KEY).is_some() != given(config, KEY_KEY).is_some() {
        return Err(ConfigError(format!(
            "Both \"{CERT_KEY}\" and \"{KEY_KEY}\" must be provided \
             to use a client side certificate"
        )));
    }
    let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
    match scheme {
        "https" => Ok(()),
        // The original meant to refuse this (its check looked for a
        // misspelt `certificate-path` and never fired) and then ignored
        // the files: a handler its operator believes secured is not.
        "http" if files.any() => Err(ConfigError(format!(
            "Server URL scheme must be \"https\" when using client side certificates \
             or a CA (\"{CA_KEY}\", \"{CERT_KEY}\", \"{KEY_KEY}\"): got {url:?}"
        ))),
        "http" => Ok(()),
        _ => Err(ConfigError(format!(
            "etcd server_url {url:?}: must be http://host:port or https://host:port"
        ))),
    }
}

/// A non-empty string under `key` (the original tested the keys' truth:
/// an empty path is no path).
fn given<'a>(config: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    config
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// The TLS files an etcd handler's entry names.
fn tls_files(config: &Map<String, Value>) -> TlsFiles<'_> {
    TlsFiles {
        ca: given(config, CA_KEY),
        client: given(config, CERT_KEY).zip(given(config, KEY_KEY)),
    }
}

/// Python's `fnmatch` on POSIX: `*`, `?`, `[seq]` and `[!seq]`, case
/// sensitive.
pub fn glob(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    glob_at(&p, &n)
}

fn glob_at(p: &[char], n: &[char]) -> bool {
    match p.first() {
        None => n.is_empty(),
        Some('*') => (0..=n.len()).any(|i| glob_at(&p[1..], &n[i..])),
        Some('?') => !n.is_empty() && glob_at(&p[1..], &n[1..]),
        Some('[') => {
            let Some(close) = p.iter().skip(2).position(|c| *c == ']').map(|i| i + 2) else {
                // No closing bracket: a literal `[`.
                return n.first() == Some(&'[') && glob_at(&p[1..], &n[1..]);
            };
            let Some(c) = n.first() else { return false };
            let (negate, set) = match p[1] {
                '!' => (true, &p[2..close]),
                _ => (false, &p[1..close]),
            };
            let mut hit = false;
            let mut i = 0;
            while i < set.len() {
                if i + 2 < set.len() && set[i + 1] == '-' {
                    hit |= set[i] <= *c && *c <= set[i + 2];
                    i += 3;
                } else {
                    hit |= set[i] == *c;
                    i += 1;
                }
            }
            hit != negate && glob_at(&p[close + 1..], &n[1..])
        }
        Some(c) => n.first() == Some(c) && glob_at(&p[1..], &n[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn globs_as_fnmatch() {
        assert!(glob("*", "Host"));
        assert!(glob("Host*", "HostStatus"));
        assert!(glob("H?st", "Host"));
        assert!(!glob("host", "Host"));
        assert!(glob("[CH]*s", "Clusters"));
        assert!(!glob("[!CH]*", "Hosts"));
    }

    #[test]
    fn secret_models_go_to_custodia_and_the_rest_by_pattern() {
        let r = Routing::from_config(&json!({
        "custodia_socket_path": "/tmp/c.sock",
        "storage_handlers": [
            {"type": "etcd", "name": "a", "models": ["Host*"]},
            {"type": "commissaire.storage.etcd", "server_url": "http://127.0.0.1:1",
             "models": ["Cluster*"]},
        ]}))
        .unwrap();
        let names: Vec<_> = r.handlers.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, [CUSTODIA_MODULE, "a", "commissaire.storage.etcd"]);
        let host = crate::models::class("Host").unwrap();
        let creds = crate::models::class("HostCreds").unwrap();
        let cluster = crate::models::class("Cluster").unwrap();
        assert_eq!(r.handler_for(host).unwrap().name, "a");
        assert_eq!(r.handler_for(creds).unwrap().kind, StoreKind::Custodia);
        assert_eq!(
            r.handler_for(cluster).unwrap().server_url(),
            "http://127.0.0.1:1"
        );
        assert_eq!(r.handlers[0].config["socket_path"], json!("/tmp/c.sock"));
    }

    #[test]
    fn no_handlers_means_one_etcd_for_every_model() {
        for config in [json!({}), json!({"storage_handlers": []}), Value::Null] {
            let r = Routing::from_config(&config).unwrap();
            assert_eq!(r.handlers.len(), 2, "{config}");
            let etcd = &r.handlers[1];
            assert_eq!(
                (etcd.name.as_str(), etcd.server_url()),
                ("etcd", DEFAULT_ETCD_URL)
            );
            assert_eq!(
                etcd.classes.len(),
                CLASSES.iter().filter(|c| !c.secret).count()
            );
            assert_eq!(r.custodia_socket(), DEFAULT_CUSTODIA_SOCKET);
        }
    }

    #[test]
    fn the_originals_configuration_errors() {
        let err = |c: Value| Routing::from_config(&c).unwrap_err().to_string();
        assert!(err(json!({"storage_handlers": [{"models": ["*"]}]})).contains("missing \"type\""));
        assert!(
            err(json!({"storage_handlers": [{"type": "etcd", "models": ["Nope"]}]}))
                .contains("No match for model: Nope")
        );
        assert!(err(json!({"storage_handlers": [
            {"type": "etcd", "models": ["Host"]}, {"type": "etcd", "models": ["Host"]}]}))
        .contains("Model \"Host\" already assigned"));
        assert!(err(json!({"storage_handlers": [
            {"type": "etcd", "name": "x", "models": ["Host"]},
            {"type": "etcd", "name": "x", "models": ["Cluster"]}]}))
        .contains("Duplicate storage handlers named \"x\""));
        assert!(
            err(json!({"storage_handlers": [{"type": "etcd", "models": ["HostCreds"]}]}))
                .contains("No match for model: HostCreds")
        );
    }

    #[test]
    fn tls_keys_as_the_original_read_them() {
        let err = |c: Value| Routing::from_config(&c).unwrap_err().to_string();
        let etcd = |extra: Value| {
            let mut entry = json!({"type": "etcd", "server_url": "https://127.0.0.1:2379"});
            for (k, v) in extra.as_object().unwrap() {
                entry[k] = v.clone();
            }
            json!({ "storage_handlers": [entry] })
        };
        // A certificate without its key, and the other way round.
        for half in [
            json!({"certificate_path": "/c.pem"}),
            json!({"certificate_key_path": "/c.key"}),
            json!({"certificate_path": "/c.pem", "certificate_key_path": ""}),
        ] {
            assert!(
                err(etcd(half.clone()))
                    .contains("Both \"certificate_path\" and \"certificate_key_path\""),
                "{half}"
            );
        }
        // TLS files with a plain http:// server.
        let mut plain = etcd(json!({"certificate_ca_path": "/ca.pem"}));
        plain["storage_handlers"][0]["server_url"] = json!("http://127.0.0.1:2379");
        assert!(err(plain).contains("must be \"https\""));
        assert!(err(etcd(json!({"certificate_ca_path": 1}))).contains("must be a string"));
        let mut ftp = etcd(json!({}));
        ftp["storage_handlers"][0]["server_url"] = json!("ftp://127.0.0.1:2379");
        assert!(err(ftp).contains("must be http://host:port or https://host:port"));

        // Empty paths are no paths, as the original's truth tests had it.
        let r = Routing::from_config(&etcd(json!({
            "certificate_ca_path": "/ca.pem", "certificate_path": "", "certificate_key_path": ""
        })))
        .unwrap();
        let h = &r.handlers[1];
        assert!(h.uses_tls());
        let files = h.tls_files();
        assert_eq!((files.ca, files.client), (Some("/ca.pem"), None));
        let r = Routing::from_config(&etcd(json!({
            "certificate_path": "/c.pem", "certificate_key_path": "/c.key"
        })))
        .unwrap();
        let files = r.handlers[1].tls_files();
        assert_eq!((files.ca, files.client), (None, Some(("/c.pem", "/c.key"))));
    }
}
