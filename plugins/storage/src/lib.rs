//! The `storage` service: Commissaire's `StorageService` (save, get,
//! delete and list models of `commissaire.models` in etcd) as a
//! commissaire-host plugin. See README.md for what differs from the
//! original.

use std::collections::HashMap;

use commissaire_plugin_api::prelude::*;

mod config;
mod custodia;
mod deadline;
mod error;
mod etcd;
mod models;
mod pyfmt;
mod secrets;
mod throttle;
mod tls;

/// Bytes a store's URL path keeps as they are: RFC 3986's unreserved set,
/// and `/` between the path's segments.
const URL_PATH: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// Bytes a form value keeps as they are (RFC 3986's unreserved set).
const FORM_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `value` in an `application/x-www-form-urlencoded` body.
fn form_value(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, FORM_VALUE).to_string()
}

/// `path` for an etcd or custodia URL: any primary key reaches the store
/// as sent (`/a/b c?d#é` is `/a/b%20c%3Fd%23%C3%A9`).
fn url_path(path: &str) -> String {
    percent_encoding::utf8_percent_encode(path, URL_PATH).to_string()
}

use config::{HandlerDef, Routing, StoreKind};
use custodia::CustodiaClient;
use deadline::Deadline;
use error::{StorageError, ETCD_KEY_NOT_FOUND, STORAGE_LOOKUP_ERROR};
use etcd::EtcdClient;
use models::{Model, ModelClass};
use throttle::Throttle;

/// Log budgets of the problems that can repeat on every request.
static BAD_RECORD_LOG: Throttle = Throttle::new();
static NOTIFY_FAILED_LOG: Throttle = Throttle::new();

/// Where the original keeps every model in etcd.
const NAMESPACE: &str = "/commissaire";

/// Saves, reads, deletes and lists Commissaire's models (clusters, hosts,
/// networks, ...) in etcd for the other services, and announces every
/// change on `notify.storage.<Class>.<event>`.
pub struct Storage {
    routing: Routing,
    /// One client per etcd handler, by handler name.
    etcd: HashMap<String, EtcdClient>,
    /// The secrets store.
    custodia: CustodiaClient,
}

/// The store a handler is, ready to call.
enum Store<'a> {
    Etcd(&'a EtcdClient),
    Custodia(&'a CustodiaClient),
}

/// A store event, as the original announces it.
#[derive(Debug, Clone, Copy)]
enum Event {
    Created,
    Updated,
    Deleted,
}

impl Event {
    fn name(self) -> &'static str {
        match self {
            Event::Created => "created",
            Event::Updated => "updated",
            Event::Deleted => "deleted",
        }
    }
}

/// Saves, reads, deletes and lists Commissaire's models in etcd.
#[service(name = "storage")]
impl Storage {
    /// Builds the service from the original `storage.conf` keys:
    /// `storage_handlers` (a list of `{"type": "etcd", "server_url": ...,
    /// "models": [patterns], "name": ...}`) and `custodia_socket_path`.
    fn init(config: Value) -> Result<Self, RpcError> {
        let routing =
            Routing::from_config(&config).map_err(|e| RpcError::invalid_params(e.to_string()))?;
        let etcd = routing
            .handlers
            .iter()
            .filter(|h| h.kind == StoreKind::Etcd)
            .map(|h| Ok((h.name.clone(), EtcdClient::new(h)?)))
            .collect::<Result<_, config::ConfigError>>()
            .map_err(|e| RpcError::invalid_params(e.to_string()))?;
        for h in &routing.handlers {
            let classes: Vec<&str> = h.classes.iter().map(|c| c.name).collect();
            tracing::info!(
                handler = %h.name,
                kind = h.kind.class_name(),
                server_url = (h.kind == StoreKind::Etcd).then(|| h.server_url()),
                models = %classes.join(","),
                "storage handler"
            );
        }
        let custodia = CustodiaClient::new(std::path::Path::new(routing.custodia_socket()));
        Ok(Self {
            routing,
            etcd,
            custodia,
        })
    }

    /// Saves one model, or a list of models of one class, applying the
    /// class's defaults; answers the full saved model(s).
    #[rpc_error(-32600, "the model class, its data or the store failed: `data.exception` names the Python exception the original service raised")]
    #[rpc_error(-32700, "`model_json_data` is a string that is not JSON")]
    async fn on_save(
        &self,
        msg: &Message,
        model_type_name: String,
        model_json_data: Value,
    ) -> Result<Value, StorageError> {
        let (models, many) = build_all(&model_type_name, &model_json_data)?;
        let mut saved = Vec::with_capacity(models.len());
        for model in models {
            saved.push(self.save(msg, model).await?.to_dict());
        }
        Ok(one_or_many(saved, many))
    }

    /// Reads one model, or a list of models of one class, identified by
    /// their primary keys; answers the full stored model(s).
    #[rpc_error(
        STORAGE_LOOKUP_ERROR,
        "the model is not in the store (StorageLookupError); `data` carries the model"
    )]
    #[rpc_error(-32600, "the model class, its data or the store failed: `data.exception` names the Python exception the original service raised")]
    #[rpc_error(-32700, "`model_json_data` is a string that is not JSON")]
    async fn on_get(
        &self,
        msg: &Message,
        model_type_name: String,
        model_json_data: Value,
    ) -> Result<Value, StorageError> {
        let (models, many) = build_all(&model_type_name, &model_json_data)?;
        let mut found = Vec::with_capacity(models.len());
        for model in models {
            found.push(self.get(&model, Deadline::of(msg)).await?.to_dict());
        }
        Ok(one_or_many(found, many))
    }

    /// Deletes one model, or a list of models of one class; answers
    /// `null`.
    #[rpc_error(
        STORAGE_LOOKUP_ERROR,
        "the model is not in the store (StorageLookupError); `data` carries the model"
    )]
    #[rpc_error(-32600, "the model class, its data or the store failed: `data.exception` names the Python exception the original service raised")]
    #[rpc_error(-32700, "`model_json_data` is a string that is not JSON")]
    async fn on_delete(
        &self,
        msg: &Message,
        model_type_name: String,
        model_json_data: Value,
    ) -> Result<(), StorageError> {
        let (models, _) = build_all(&model_type_name, &model_json_data)?;
        for model in models {
            self.delete(msg, &model).await?;
        }
        Ok(())
    }

    /// Lists every stored model of a list class (`Hosts`, `Clusters`,
    /// `Networks`, `ContainerManagerConfigs`).
    #[rpc_error(-32600, "the class is not a list class, or the store failed: `data.exception` names the Python exception the original service raised")]
    async fn on_list(
        &self,
        msg: &Message,
        model_type_name: String,
    ) -> Result<Vec<Value>, StorageError> {
        let class = models::class(&model_type_name)?;
        let list = Model::new(class, &json!({}))?;
        let Store::Etcd(client) = self.store(self.handler(&list)?)? else {
            // The original's custodia store has no list.
            return Err(StorageError::TypeError(format!(
                "{} cannot be listed",
                class.name
            )));
        };
        let key = etcd_key(&list)?;
        let Some((_, item_class)) = class.list_of else {
            // The original reads the key and then fails on the class;
            // callers only ever list list classes.
            return Err(StorageError::TypeError(format!(
                "{} is not a list model",
                class.name
            )));
        };
        let item_class = models::class(item_class)?;
        let node = match client.get(&key, true, Deadline::of(msg)).await {
            Ok(node) => node,
            // The original answers -32600 here; see README.md.
            Err(StorageError::Etcd { code, .. }) if code == ETCD_KEY_NOT_FOUND => {
                return Ok(Vec::new())
            }
            Err(e) => return Err(e),
        };
        let mut items = Vec::new();
        for text in node.leaf_values() {
            let item = serde_json::from_str::<Value>(text)
                .map_err(|e| StorageError::TypeError(e.to_string()))
                .and_then(|v| Model::exact(item_class, &v));
            match item {
                Ok(item) => items.push(item.to_dict()),
                Err(e) => {
                    if let Some(left_out) = BAD_RECORD_LOG.allow() {
                        tracing::warn!(%key, error = %e, left_out, "etcd holds a record that is not a model: skipped");
                    }
                }
            }
        }
        Ok(items)
    }

    /// Describes every store handler: `handler_type`, `config` and the
    /// `model_types` it keeps.
    fn on_list_store_handlers(&self) -> Result<Vec<Value>, RpcError> {
        Ok(self
            .routing
            .handlers
            .iter()
            .map(|h| {
                json!({
                    "handler_type": h.kind.class_name(),
                    "config": h.config,
                    "model_types": h.classes.iter().map(|c| c.name).collect::<Vec<_>>(),
                })
            })
            .collect())
    }
}

/// `model_json_data` as models of `type_name`: one (a dict or a JSON
/// string) or a list of them, all built before any is stored so that bad
/// input changes nothing.
fn build_all(type_name: &str, data: &Value) -> Result<(Vec<Model>, bool), StorageError> {
    match data {
        Value::Array(items) => Ok((
            items
                .iter()
                .map(|item| build(type_name, item))
                .collect::<Result<_, _>>()?,
            true,
        )),
        one => Ok((vec![build(type_name, one)?], false)),
    }
}

fn build(type_name: &str, data: &Value) -> Result<Model, StorageError> {
    let parsed;
    let data = match data {
        Value::String(text) => {
            parsed = serde_json::from_str::<Value>(text).map_err(StorageError::BadJson)?;
            if !parsed.is_object() {
                return Err(StorageError::TypeError(
                    "Model data expected to be a JSON object".into(),
                ));
            }
            &parsed
        }
        other => other,
    };
    Model::new(models::class(type_name)?, data)
}

fn one_or_many(mut items: Vec<Value>, many: bool) -> Value {
    match (many, items.pop()) {
        (false, Some(one)) => one,
        (_, last) => {
            items.extend(last);
            Value::Array(items)
        }
    }
}

/// The etcd key of `model`: `/commissaire` + its class's key with the
/// primary key's value in place of `{}`.
fn etcd_key(model: &Model) -> Result<String, StorageError> {
    let pattern = model
        .class
        .etcd_key
        .ok_or_else(|| StorageError::KeyError(pyfmt::repr_str(model.class.name)))?;
    Ok(match model.store_key()? {
        Some(pk) => format!("{NAMESPACE}{}", pattern.replacen("{}", &pk, 1)),
        None => format!("{NAMESPACE}{pattern}"),
    })
}

impl Storage {
    /// The handler for `model`: a Host whose `source` names a handler goes
    /// there, any other model to the handler its class is routed to.
    fn handler(&self, model: &Model) -> Result<&HandlerDef, StorageError> {
        if model.class.name == "Host" {
            if let Some(source) = model.get("source").and_then(Value::as_str) {
                let source = source.trim();
                if !source.is_empty() {
                    return self
                        .routing
                        .handler_named(source)
                        .ok_or_else(|| StorageError::KeyError(pyfmt::repr_str(source)));
                }
            }
        }
        self.routing.handler_for(model.class).ok_or_else(|| {
            StorageError::KeyError(format!("<class 'commissaire.models.{}'>", model.class.name))
        })
    }

    fn store(&self, handler: &HandlerDef) -> Result<Store<'_>, StorageError> {
        match handler.kind {
            StoreKind::Etcd => self
                .etcd
                .get(&handler.name)
                .map(Store::Etcd)
                .ok_or_else(|| StorageError::KeyError(pyfmt::repr_str(&handler.name))),
            StoreKind::Custodia => Ok(Store::Custodia(&self.custodia)),
        }
    }

    async fn save(&self, msg: &Message<'_>, model: Model) -> Result<Model, StorageError> {
        let store = self.store(self.handler(&model)?)?;
        model.validate()?;
        let client = match store {
            Store::Etcd(client) => client,
            Store::Custodia(custodia) => {
                secrets::save(custodia, &model, Deadline::of(msg)).await?;
                return Ok(model);
            }
        };
        let key = etcd_key(&model)?;
        let mut text = model.to_json();
        if model.class.name == "Host" {
            text = merge_stored(client, &key, &text, Deadline::of(msg)).await?;
        }
        let written = client.set(&key, &text, Deadline::of(msg)).await?;
        let stored: Value = written
            .node
            .value
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(StorageError::BadJson)?
            .unwrap_or(Value::Null);
        let saved = Model::new(model.class, &stored)?;
        let event = if written.created {
            Event::Created
        } else {
            Event::Updated
        };
        announce(msg, event, &saved);
        Ok(saved)
    }

    async fn get(&self, model: &Model, deadline: Deadline) -> Result<Model, StorageError> {
        let client = match self.store(self.handler(model)?)? {
            Store::Etcd(client) => client,
            Store::Custodia(custodia) => {
                let found = secrets::get(custodia, model, deadline).await?;
                found.validate()?;
                return Ok(found);
            }
        };
        let key = etcd_key(model)?;
        let node = client
            .get(&key, false, deadline)
            .await
            .map_err(|e| lookup(e, model))?;
        let Some(text) = node.value else {
            return Err(StorageError::TypeError(
                "the JSON object must be str, bytes or bytearray, not NoneType".into(),
            ));
        };
        let value: Value = serde_json::from_str(&text).map_err(StorageError::BadJson)?;
        let found = Model::new(model.class, &value)?;
        found.validate()?;
        Ok(found)
    }

    async fn delete(&self, msg: &Message<'_>, model: &Model) -> Result<(), StorageError> {
        let client = match self.store(self.handler(model)?)? {
            Store::Etcd(client) => client,
            Store::Custodia(custodia) => {
                return secrets::delete(custodia, model, Deadline::of(msg)).await
            }
        };
        let key = etcd_key(model)?;
        let deleted = client
            .delete(&key, Deadline::of(msg))
            .await
            .map_err(|e| lookup(e, model))?;
        let prev: Value = deleted
            .prev_node
            .and_then(|n| n.value)
            .map(|t| serde_json::from_str(&t))
            .transpose()
            .map_err(StorageError::BadJson)?
            .unwrap_or(Value::Null);
        let gone = Model::new(model.class, &prev)?;
        announce(msg, Event::Deleted, &gone);
        Ok(())
    }
}

/// A Host's new text merged over what its key holds: keys the stored
/// record has and the model does not (the credentials a HostCreds kept in
/// the same key) survive the save. The new values win; see README.md.
async fn merge_stored(
    client: &EtcdClient,
    key: &str,
    text: &str,
    deadline: Deadline,
) -> Result<String, StorageError> {
    let stored = match client.get(key, false, deadline).await {
        Ok(node) => node.value,
        Err(StorageError::Etcd { code, .. }) if code == ETCD_KEY_NOT_FOUND => None,
        Err(e) => return Err(e),
    };
    let Some(Ok(Value::Object(stored))) = stored.map(|t| serde_json::from_str::<Value>(&t)) else {
        return Ok(text.to_owned());
    };
    let extra: Vec<(String, Value)> = {
        let new: Value = serde_json::from_str(text).map_err(StorageError::BadJson)?;
        stored
            .into_iter()
            .filter(|(k, _)| new.get(k).is_none())
            .collect()
    };
    if extra.is_empty() {
        return Ok(text.to_owned());
    }
    let mut merged = text.trim_end_matches('}').to_owned();
    for (k, v) in extra {
        merged.push_str(&format!(", {}: {v}", Value::String(k)));
    }
    merged.push('}');
    Ok(merged)
}

/// An etcd "Key not found" as the original's lookup error for `model`.
fn lookup(e: StorageError, model: &Model) -> StorageError {
    match e {
        StorageError::Etcd {
            code,
            message,
            cause,
        } if code == ETCD_KEY_NOT_FOUND => StorageError::Lookup {
            message: format!("{message} : {cause}"),
            class: model.class.name,
            model_safe: model.to_dict_safe(),
        },
        other => other,
    }
}

/// Publishes `notify.storage.<Class>.<event>` with the body the original's
/// kombu producer sent: `{"event": …, "class": …, "model": …}` itself (no
/// JSON-RPC envelope), in that order, as Python's `json.dumps` spells it.
/// A notification that cannot be sent is logged, never the caller's
/// failure: the change is stored.
fn announce(msg: &Message, event: Event, model: &Model) {
    let class: &ModelClass = model.class;
    let routing_key = format!("notify.storage.{}.{}", class.name, event.name());
    let body = notification_body(event, model);
    if let Err(e) = msg.bus().publish(&routing_key, &body) {
        if let Some(left_out) = NOTIFY_FAILED_LOG.allow() {
            tracing::warn!(%routing_key, error = %e.message, left_out, "cannot send the storage notification");
        }
    }
}

/// The text of a notification (see [`announce`]).
fn notification_body(event: Event, model: &Model) -> String {
    let mut body = String::from("{\"event\": ");
    pyfmt::write_json_str(&mut body, event.name());
    body.push_str(", \"class\": ");
    pyfmt::write_json_str(&mut body, model.class.name);
    body.push_str(", \"model\": ");
    body.push_str(&model.to_json_safe());
    body.push('}');
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notification_bodies_are_the_originals_text() {
        // The `notify` sample of wire.txt, as the original sent it.
        let host = Model::new(
            models::class("Host").unwrap(),
            &json!({"address": "192.168.152.110", "status": "active", "os": "fedora",
                    "cpus": 1, "memory": 1234, "space": 12345}),
        )
        .unwrap();
        assert_eq!(
            notification_body(Event::Deleted, &host),
            r#"{"event": "deleted", "class": "Host", "model": {"address": "192.168.152.110", "status": "active", "os": "fedora", "cpus": 1, "memory": 1234, "space": 12345, "last_check": "", "source": ""}}"#
        );
        // Hidden attributes are left out (`to_dict_safe`).
        let cluster = Model::new(
            models::class("Cluster").unwrap(),
            &json!({"name": "c", "hostset": ["10.0.0.1"]}),
        )
        .unwrap();
        let body = notification_body(Event::Created, &cluster);
        assert!(
            body.starts_with(r#"{"event": "created", "class": "Cluster", "model": {"name": "c", "#),
            "{body}"
        );
        assert!(!body.contains("hostset"), "{body}");
    }

    #[test]
    fn store_paths_are_percent_encoded_but_slashes() {
        assert_eq!(
            url_path("/commissaire/hosts/10.0.0.1"),
            "/commissaire/hosts/10.0.0.1"
        );
        assert_eq!(url_path("/a/b c?d#é"), "/a/b%20c%3Fd%23%C3%A9");
    }
    use commissaire_plugin_api::testing::TestService;

    fn svc() -> TestService<Storage> {
        // Nothing listens on port 1: any call that reaches etcd fails fast.
        TestService::<Storage>::with_config(json!({"storage_handlers": [
            {"type": "etcd", "server_url": "http://127.0.0.1:1", "models": ["*"]}]}))
        .unwrap()
    }

    #[test]
    fn list_store_handlers_as_the_original() {
        let got = svc().call("list_store_handlers", json!([])).unwrap();
        assert_eq!(got[0]["handler_type"], json!("CustodiaStoreHandler"));
        assert_eq!(got[0]["model_types"], json!(["HostCreds", "SecretModel"]));
        assert_eq!(got[1]["handler_type"], json!("EtcdStoreHandler"));
        assert_eq!(
            got[1]["config"],
            json!({"server_url": "http://127.0.0.1:1", "name": "commissaire.storage.etcd"})
        );
        let types = got[1]["model_types"].as_array().unwrap();
        assert!(types.contains(&json!("Host")) && !types.contains(&json!("HostCreds")));
    }

    #[test]
    fn bad_input_is_refused_before_etcd() {
        let s = svc();
        let e = s
            .call(
                "save",
                json!({"model_type_name": "Nope", "model_json_data": {}}),
            )
            .unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-32600, "'Nope'"));
        assert_eq!(e.data, Some(json!({"exception": "<class 'KeyError'>"})));
        let e = s
            .call(
                "get",
                json!({"model_type_name": "Host", "model_json_data": "{"}),
            )
            .unwrap_err();
        assert_eq!(e.code, -32700);
        let e = s
            .call(
                "save",
                json!({"model_type_name": "Host", "model_json_data": {"address": 1}}),
            )
            .unwrap_err();
        assert_eq!(e.code, -32600);
        assert!(
            e.message
                .contains("Host.address: Expected type <class 'str'>"),
            "{}",
            e.message
        );
    }

    #[test]
    fn etcd_down_is_a_clear_error() {
        let e = svc()
            .call(
                "get",
                json!({"model_type_name": "Host", "model_json_data": {"address": "a"}}),
            )
            .unwrap_err();
        assert_eq!(e.code, -32600);
        assert!(
            e.message.starts_with("Connection to etcd failed"),
            "{}",
            e.message
        );
        assert!(e.message.contains("http://127.0.0.1:1"), "{}", e.message);
    }
}
