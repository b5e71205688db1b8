//! The original Commissaire services' JSON config files, read as the
//! host's own: `/etc/commissaire/storage.conf` holds
//! `{"bus_uri": "redis://127.0.0.1:6379", "exchange_name": "commissaire",
//! "debug": false, "storage_handlers": [...]}`. `bus_uri` and
//! `exchange_name` configure the bus, `debug` the log level (see
//! [`debug`]), and every other key goes to the service's plugin as its
//! `init` config. The file serves one service, named by its stem
//! (`storage.conf` serves `storage`, from queue `storage` bound to
//! `storage.*`, as the original did), from the packaged plugin directory
//! unless `--plugins-dir` names another.
//!
//! A file is told apart by its content, not its name: a TOML document
//! never starts with `{`, a JSON object always does.

use std::path::Path;

use serde_json::{Map, Value};

use super::ConfigError;

/// Where a JSON config's service finds its plugin unless `--plugins-dir`
/// says otherwise: where the Debian package puts them.
pub const PACKAGED_PLUGINS: &str = "/usr/lib/commissaire/plugins";

/// The keys the host takes; the rest are the plugin's.
const HOST_KEYS: [&str; 3] = ["bus_uri", "exchange_name", "debug"];

/// Whether `text` is an original JSON config rather than TOML.
pub fn is_json(text: &str) -> bool {
    text.trim_start().starts_with('{')
}

/// `debug: true` in the original JSON config at `path`: the log level it
/// asks for when `COMMISSAIRE_LOG` does not say. `None` for a TOML file,
/// one that cannot be read (loading it says why) or `debug` unset.
pub fn debug(path: &Path) -> Option<bool> {
    let text = std::fs::read_to_string(path).ok()?;
    if !is_json(&text) {
        return None;
    }
    let v: Value = serde_json::from_str(&text).ok()?;
    v.get("debug").and_then(Value::as_bool)
}

/// The host's TOML for the original JSON config `text` read from `path`.
pub fn to_toml(path: &Path, text: &str) -> Result<String, ConfigError> {
    // serde_json counts columns from 0 at a line's start (an error at a
    // newline); editors and the TOML errors count from 1.
    let location =
        |line: usize, column: usize| format!("{}:{line}:{}", path.display(), column.max(1));
    let object: Map<String, Value> = serde_json::from_str(text).map_err(|e| ConfigError {
        location: location(e.line(), e.column()),
        message: format!("not a Commissaire JSON config: {e}"),
    })?;
    let error = |message: String| ConfigError {
        location: path.display().to_string(),
        message,
    };
    let service = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| error("the file's name must name its service, as storage.conf".into()))?;
    let text_of = |key: &str| -> Result<Option<String>, ConfigError> {
        match object.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(error(format!("`{key}` must be a string, not {other}"))),
        }
    };
    let mut bus = toml::Table::new();
    if let Some(uri) = text_of("bus_uri")? {
        bus.insert("uri".into(), toml::Value::String(uri));
    }
    if let Some(exchange) = text_of("exchange_name")? {
        bus.insert("exchange".into(), toml::Value::String(exchange));
    }
    if let Some(debug) = object.get("debug") {
        if !matches!(debug, Value::Bool(_) | Value::Null) {
            return Err(error(format!("`debug` must be true or false, not {debug}")));
        }
    }
    let mut plugin = toml::Table::new();
    for (key, value) in &object {
        if HOST_KEYS.contains(&key.as_str()) {
            continue;
        }
        if let Some(value) = to_toml_value(value) {
            plugin.insert(key.clone(), value);
        }
    }
    let mut entry = toml::Table::new();
    entry.insert("name".into(), toml::Value::String(service.to_owned()));
    entry.insert("config".into(), toml::Value::Table(plugin));
    let mut plugins = toml::Table::new();
    plugins.insert(
        "dir".into(),
        toml::Value::String(PACKAGED_PLUGINS.to_owned()),
    );
    let mut document = toml::Table::new();
    document.insert("bus".into(), toml::Value::Table(bus));
    document.insert("plugins".into(), toml::Value::Table(plugins));
    document.insert(
        "service".into(),
        toml::Value::Array(vec![toml::Value::Table(entry)]),
    );
    toml::to_string(&document).map_err(|e| error(format!("cannot read it as a host config: {e}")))
}

/// `value` in TOML; `None` for JSON's `null`, which TOML cannot say (a key
/// set to null reaches the plugin as absent).
fn to_toml_value(value: &Value) -> Option<toml::Value> {
    Some(match value {
        Value::Null => return None,
        Value::Bool(b) => toml::Value::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64()?),
        },
        Value::String(s) => toml::Value::String(s.clone()),
        Value::Array(items) => toml::Value::Array(items.iter().filter_map(to_toml_value).collect()),
        Value::Object(map) => toml::Value::Table(
            map.iter()
                .filter_map(|(k, v)| Some((k.clone(), to_toml_value(v)?)))
                .collect(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STORAGE: &str = r#"{
        "bus_uri": "redis://127.0.0.1:6379",
        "exchange_name": "commissaire",
        "debug": false,
        "custodia_socket_path": "/var/run/custodia/custodia.sock",
        "storage_handlers": [
            {"type": "etcd", "server_url": "http://127.0.0.1:2379",
             "certificate_path": null, "models": ["*"]}
        ]
    }"#;

    #[test]
    fn json_is_told_from_toml_by_its_content() {
        assert!(is_json(STORAGE));
        assert!(is_json("\n  {}"));
        assert!(!is_json("[bus]\nuri = \"memory://\"\n"));
        assert!(!is_json("# {\n[bus]"));
    }

    #[test]
    fn the_bus_keys_configure_the_bus_and_the_rest_goes_to_the_plugin() {
        let text = to_toml(Path::new("/etc/commissaire/storage.conf"), STORAGE).unwrap();
        let doc: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(doc["bus"]["uri"].as_str(), Some("redis://127.0.0.1:6379"));
        assert_eq!(doc["bus"]["exchange"].as_str(), Some("commissaire"));
        assert_eq!(doc["plugins"]["dir"].as_str(), Some(PACKAGED_PLUGINS));
        let service = &doc["service"][0];
        assert_eq!(service["name"].as_str(), Some("storage"));
        let config = service["config"].as_table().unwrap();
        assert_eq!(
            config.keys().collect::<Vec<_>>(),
            ["custodia_socket_path", "storage_handlers"]
        );
        let handler = &config["storage_handlers"][0];
        assert_eq!(handler["type"].as_str(), Some("etcd"));
        assert!(handler.get("certificate_path").is_none(), "null is absent");
        assert_eq!(handler["models"][0].as_str(), Some("*"));
    }

    #[test]
    fn mistakes_name_the_file_and_what_is_wrong() {
        let path = Path::new("/etc/commissaire/clusterexec.conf");
        let e = to_toml(path, "{\"bus_uri\": 5}").unwrap_err();
        assert_eq!(e.location, "/etc/commissaire/clusterexec.conf");
        assert!(e.message.contains("`bus_uri` must be a string"), "{e:?}");
        let e = to_toml(path, "{\n  \"debug\": fals\n}").unwrap_err();
        assert_eq!(e.location, "/etc/commissaire/clusterexec.conf:3:1");
        assert!(e.message.contains("not a Commissaire JSON config"), "{e:?}");
        let e = to_toml(path, "{\"debug\": \"yes\"}").unwrap_err();
        assert!(e.message.contains("`debug` must be true or false"), "{e:?}");
    }
}
