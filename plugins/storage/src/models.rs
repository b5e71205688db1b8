//! The model classes of `commissaire.models`, as a table: their
//! attributes and types, defaults, hidden attributes, primary keys and
//! extra validation rules, and how the storage service builds, validates
//! and renders them.

use serde_json::{Map, Value};

use crate::error::StorageError;
use crate::pyfmt;

/// The type an attribute must have (Python's `isinstance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Str,
    /// An integer; `true`/`false` pass too, as Python's `bool` is an `int`.
    Int,
    List,
    Dict,
}

impl Kind {
    fn admits(self, value: &Value) -> bool {
        match self {
            Kind::Str => value.is_string(),
            Kind::Int => value.is_i64() || value.is_u64() || value.is_boolean(),
            Kind::List => value.is_array(),
            Kind::Dict => value.is_object(),
        }
    }

    fn py_name(self) -> &'static str {
        match self {
            Kind::Str => "str",
            Kind::Int => "int",
            Kind::List => "list",
            Kind::Dict => "dict",
        }
    }
}

/// A default value of an attribute.
#[derive(Debug, Clone, Copy)]
pub enum DefaultValue {
    Str(&'static str),
    Int(i64),
    EmptyList,
    EmptyDict,
}

impl DefaultValue {
    fn value(self) -> Value {
        match self {
            DefaultValue::Str(s) => Value::String(s.to_owned()),
            DefaultValue::Int(i) => Value::from(i),
            DefaultValue::EmptyList => Value::Array(Vec::new()),
            DefaultValue::EmptyDict => Value::Object(Map::new()),
        }
    }
}

/// Validation beyond attribute types, per class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extra {
    None,
    /// `type` is one of these.
    OneOf(&'static str, &'static [&'static str]),
    /// These attributes must not be empty (`''` or `None`).
    NonEmpty(&'static [&'static str]),
    /// `last_check` parses as `%Y-%m-%dT%H:%M:%S.%f`.
    IsoDate,
    /// The original's `HostStatus` declares one attribute type as a set
    /// (`{'type: dict'}`), so validating one always fails with a
    /// `TypeError`; kept, so that callers see what they saw.
    BrokenSpec,
}

/// One class of `commissaire.models`.
#[derive(Debug)]
pub struct ModelClass {
    pub name: &'static str,
    /// In the original's declaration order (its JSON keys keep it).
    pub attrs: &'static [(&'static str, Kind)],
    defaults: &'static [(&'static str, DefaultValue)],
    hidden: &'static [&'static str],
    pub primary_key: Option<&'static str>,
    /// For a list model: its attribute holding the items, and their class.
    pub list_of: Option<(&'static str, &'static str)>,
    /// Kept in the secrets store (custodia), never in etcd.
    pub secret: bool,
    /// Its key under `/commissaire` on etcd, `{}` standing for the primary
    /// key's value; `None` for classes the etcd store cannot hold.
    pub etcd_key: Option<&'static str>,
    extra: Extra,
}

const NETWORK_TYPES: &[&str] = &["flannel_etcd", "flannel_server"];
const CONTAINER_MANAGER_TYPES: &[&str] = &["openshift", "trivial"];

macro_rules! class {
    ($name:literal { attrs: [$(($a:literal, $k:ident)),*], defaults: [$(($d:literal, $dv:expr)),*],
      hidden: [$($h:literal),*], pk: $pk:expr, list_of: $lo:expr, secret: $s:expr,
      etcd: $e:expr, extra: $x:expr }) => {
        ModelClass {
            name: $name,
            attrs: &[$(($a, Kind::$k)),*],
            defaults: &[$(($d, $dv)),*],
            hidden: &[$($h),*],
            primary_key: $pk,
            list_of: $lo,
            secret: $s,
            etcd_key: $e,
            extra: $x,
        }
    };
}

use DefaultValue::{EmptyDict, EmptyList, Int, Str};

/// Every class the original's `commissaire.models` module holds, the base
/// classes included (the original's registry takes every `Model` subclass
/// of the module, so `Model`, `ListModel` and `SecretModel` are names a
/// caller may send and `list_store_handlers` lists).
pub static CLASSES: &[ModelClass] = &[
    class!("Model" { attrs: [], defaults: [], hidden: [], pk: None, list_of: None,
        secret: false, etcd: None, extra: Extra::None }),
    class!("SecretModel" { attrs: [], defaults: [], hidden: [], pk: None, list_of: None,
        secret: true, etcd: None, extra: Extra::None }),
    class!("ListModel" { attrs: [], defaults: [], hidden: [], pk: None, list_of: None,
        secret: false, etcd: None, extra: Extra::None }),
    class!("Network" { attrs: [("name", Str), ("type", Str), ("options", Dict)],
        defaults: [("type", Str("flannel_etcd")), ("options", EmptyDict)], hidden: [],
        pk: Some("name"), list_of: None, secret: false, etcd: Some("/networks/{}"),
        extra: Extra::OneOf("type", NETWORK_TYPES) }),
    class!("Networks" { attrs: [("networks", List)], defaults: [("networks", EmptyList)],
        hidden: [], pk: None, list_of: Some(("networks", "Network")), secret: false,
        etcd: Some("/networks"), extra: Extra::None }),
    class!("Cluster" { attrs: [("name", Str), ("status", Str), ("network", Str),
            ("hostset", List), ("container_manager", Str)],
        defaults: [("status", Str("")), ("hostset", EmptyList), ("network", Str("default")),
            ("container_manager", Str(""))],
        hidden: ["hostset"], pk: Some("name"), list_of: None, secret: false,
        etcd: Some("/clusters/{}"), extra: Extra::None }),
    class!("ClusterDeploy" { attrs: [("name", Str), ("status", Str), ("version", Str),
            ("deployed", List), ("in_process", List), ("started_at", Str), ("finished_at", Str)],
        defaults: [("status", Str("")), ("version", Str("")), ("deployed", EmptyList),
            ("in_process", EmptyList), ("started_at", Str("")), ("finished_at", Str(""))],
        hidden: [], pk: Some("name"), list_of: None, secret: false,
        etcd: Some("/cluster/{}/deploy"), extra: Extra::NonEmpty(&["version", "name"]) }),
    class!("ClusterRestart" { attrs: [("name", Str), ("status", Str), ("restarted", List),
            ("in_process", List), ("started_at", Str), ("finished_at", Str)],
        defaults: [("status", Str("")), ("restarted", EmptyList), ("in_process", EmptyList),
            ("started_at", Str("")), ("finished_at", Str(""))],
        hidden: [], pk: Some("name"), list_of: None, secret: false,
        etcd: Some("/cluster/{}/restart"), extra: Extra::NonEmpty(&["name"]) }),
    class!("ClusterUpgrade" { attrs: [("name", Str), ("status", Str), ("upgraded", List),
            ("in_process", List), ("started_at", Str), ("finished_at", Str)],
        defaults: [("status", Str("")), ("upgraded", EmptyList), ("in_process", EmptyList),
            ("started_at", Str("")), ("finished_at", Str(""))],
        hidden: [], pk: Some("name"), list_of: None, secret: false,
        etcd: Some("/cluster/{}/upgrade"), extra: Extra::NonEmpty(&["name"]) }),
    class!("Clusters" { attrs: [("clusters", List)], defaults: [("clusters", EmptyList)],
        hidden: [], pk: None, list_of: Some(("clusters", "Cluster")), secret: false,
        etcd: Some("/clusters/"), extra: Extra::None }),
    class!("Host" { attrs: [("address", Str), ("status", Str), ("os", Str), ("cpus", Int),
            ("memory", Int), ("space", Int), ("last_check", Str), ("source", Str)],
        defaults: [("status", Str("")), ("os", Str("")), ("cpus", Int(0)), ("memory", Int(0)),
            ("space", Int(0)), ("last_check", Str("")), ("source", Str(""))],
        hidden: [], pk: Some("address"), list_of: None, secret: false,
        etcd: Some("/hosts/{}"), extra: Extra::None }),
    class!("HostCreds" { attrs: [("address", Str), ("ssh_priv_key", Str), ("remote_user", Str)],
        defaults: [("ssh_priv_key", Str("")), ("remote_user", Str("root"))],
        hidden: [], pk: Some("address"), list_of: None, secret: true,
        etcd: Some("/hosts/{}"), extra: Extra::None }),
    class!("HostStatus" { attrs: [("type", Str), ("host", Dict), ("container_manager", Dict)],
        defaults: [("type", Str("")), ("host", EmptyDict), ("container_manager", EmptyDict)],
        hidden: [], pk: None, list_of: None, secret: false, etcd: None,
        extra: Extra::BrokenSpec }),
    class!("Hosts" { attrs: [("hosts", List)], defaults: [("hosts", EmptyList)],
        hidden: [], pk: None, list_of: Some(("hosts", "Host")), secret: false,
        etcd: Some("/hosts"), extra: Extra::None }),
    class!("WatcherRecord" { attrs: [("address", Str), ("last_check", Str)],
        defaults: [("address", Str("")), ("last_check", Str("9999-12-31T23:59:59.999999"))],
        hidden: [], pk: None, list_of: None, secret: false, etcd: None,
        extra: Extra::IsoDate }),
    class!("ContainerManagerConfig" { attrs: [("name", Str), ("type", Str), ("options", Dict)],
        defaults: [("type", Str("openshift")), ("options", EmptyDict)], hidden: [],
        pk: Some("name"), list_of: None, secret: false, etcd: Some("/container_managers/{}"),
        extra: Extra::OneOf("type", CONTAINER_MANAGER_TYPES) }),
    class!("ContainerManagerConfigs" { attrs: [("container_managers", List)],
        defaults: [("container_managers", EmptyList)], hidden: [], pk: None,
        list_of: Some(("container_managers", "ContainerManagerConfig")), secret: false,
        etcd: Some("/container_managers/"), extra: Extra::None }),
];

/// The class named `name`, or the original's `KeyError`.
pub fn class(name: &str) -> Result<&'static ModelClass, StorageError> {
    CLASSES
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| StorageError::KeyError(pyfmt::repr_str(name)))
}

/// A model instance: its class and exactly its attributes.
#[derive(Debug, Clone)]
pub struct Model {
    pub class: &'static ModelClass,
    attrs: Map<String, Value>,
}

impl Model {
    /// `Class.new(**data)`: the defaults, overridden by `data`; every
    /// attribute must then be present. Keys that are not attributes are
    /// dropped, as the original ignores them.
    pub fn new(class: &'static ModelClass, data: &Value) -> Result<Self, StorageError> {
        let Value::Object(data) = data else {
            return Err(StorageError::TypeError(format!(
                "new() argument after ** must be a mapping, not {}",
                pyfmt::type_name(data)
            )));
        };
        let mut attrs = Map::new();
        for (name, _) in class.attrs {
            let value = data.get(*name).cloned().or_else(|| {
                class
                    .defaults
                    .iter()
                    .find(|(d, _)| d == name)
                    .map(|(_, v)| v.value())
            });
            match value {
                Some(v) => {
                    attrs.insert((*name).to_owned(), v);
                }
                None => return Err(missing(class)),
            }
        }
        Ok(Self { class, attrs })
    }

    /// `Class(**data)`: as [`Model::new`] without the defaults (how the
    /// original's etcd store builds the items of a list).
    pub fn exact(class: &'static ModelClass, data: &Value) -> Result<Self, StorageError> {
        let Value::Object(data) = data else {
            return Err(StorageError::TypeError(format!(
                "{}() argument after ** must be a mapping, not {}",
                class.name,
                pyfmt::type_name(data)
            )));
        };
        let mut attrs = Map::new();
        for (name, _) in class.attrs {
            let value = data.get(*name).ok_or_else(|| missing(class))?;
            attrs.insert((*name).to_owned(), value.clone());
        }
        Ok(Self { class, attrs })
    }

    /// The value of attribute `name`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.attrs.get(name)
    }

    /// The primary key as a path segment of a store (etcd's
    /// `/commissaire/hosts/<key>`, custodia's `/secrets/<container>/<key>`):
    /// one that holds `/` or is `.` or `..` would reach another model's
    /// path (`../clusters/x` saved as a Host overwrites a Cluster), so it
    /// is refused as a validation error. Commissaire's own keys (addresses,
    /// names) never hold one.
    pub fn store_key(&self) -> Result<Option<String>, StorageError> {
        let Some(key) = self.primary_key() else {
            return Ok(None);
        };
        if key.contains('/') || key == "." || key == ".." {
            let attribute = self.class.primary_key.unwrap_or_default();
            return Err(StorageError::Validation {
                class: self.class.name,
                errors: vec![format!(
                    "{attribute}: {} cannot be a store key: it must not hold \"/\" or be \".\" or \"..\"",
                    pyfmt::repr_str(&key)
                )],
            });
        }
        Ok(Some(key))
    }

    /// The primary key's value as the original formats it into a key
    /// (`'{}'.format(value)`; validation has made it a string).
    fn primary_key(&self) -> Option<String> {
        let value = self.get(self.class.primary_key?)?;
        Some(match value {
            Value::String(s) => s.clone(),
            other => pyfmt::str_of(other),
        })
    }

    /// `_validate()`: the class's own rules first, then every attribute's
    /// type, all reported at once.
    pub fn validate(&self) -> Result<(), StorageError> {
        let class = self.class;
        let mut errors = Vec::new();
        match class.extra {
            Extra::None => {}
            Extra::BrokenSpec => {
                return Err(StorageError::TypeError(
                    "'set' object is not subscriptable".into(),
                ))
            }
            Extra::OneOf(attr, allowed) => {
                let ok = self
                    .get(attr)
                    .and_then(Value::as_str)
                    .is_some_and(|v| allowed.contains(&v));
                if !ok {
                    errors.push(format!(
                        "Container {attr} must be one of the following: {}",
                        allowed.join(", ")
                    ));
                }
            }
            Extra::NonEmpty(attrs) => {
                for attr in attrs {
                    if matches!(self.get(attr), Some(Value::Null) | None)
                        || self.get(attr).and_then(Value::as_str) == Some("")
                    {
                        errors.push(format!("{attr} must be a non empty string"));
                    }
                }
            }
            Extra::IsoDate => match self.get("last_check") {
                Some(Value::String(s)) if pyfmt::is_iso_datetime(s) => {}
                Some(Value::String(_)) => errors
                    .push("last_check must be in isoformat: \"%Y-%m-%dT%H:%M:%S.%f\"".to_owned()),
                Some(other) => {
                    return Err(StorageError::TypeError(format!(
                        "strptime() argument 1 must be str, not {}",
                        pyfmt::type_name(other)
                    )))
                }
                None => {}
            },
        }
        for (name, kind) in class.attrs {
            let value = self.get(name).unwrap_or(&Value::Null);
            if !kind.admits(value) {
                errors.push(format!(
                    "{}.{name}: Expected type <class '{}'>. Got <class '{}'>",
                    class.name,
                    kind.py_name(),
                    pyfmt::type_name(value)
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(StorageError::Validation {
                class: class.name,
                errors,
            })
        }
    }

    /// `to_dict()`: every attribute, the hidden ones too.
    pub fn to_dict(&self) -> Value {
        Value::Object(self.attrs.clone())
    }

    /// `to_dict_safe()`: without the hidden attributes (what notifications
    /// and lookup errors carry).
    pub fn to_dict_safe(&self) -> Value {
        Value::Object(
            self.attrs
                .iter()
                .filter(|(k, _)| !self.class.hidden.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }

    /// `to_json()`: the text stored in etcd, keys in declaration order and
    /// with Python's separators, as the original writes it (other readers
    /// of etcd see the same text).
    pub fn to_json(&self) -> String {
        self.json_of(|_| true)
    }

    /// `to_json_safe()`: [`Model::to_json`] without the hidden attributes,
    /// the `model` of a notification as the original's `json.dumps` wrote
    /// it.
    pub fn to_json_safe(&self) -> String {
        self.json_of(|name| !self.class.hidden.contains(&name))
    }

    /// The attributes `keep` keeps, in declaration order, as `json.dumps`.
    fn json_of(&self, keep: impl Fn(&str) -> bool) -> String {
        let mut out = String::from("{");
        let kept = self.class.attrs.iter().filter(|(name, _)| keep(name));
        for (i, (name, _)) in kept.enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            pyfmt::write_json_str(&mut out, name);
            out.push_str(": ");
            pyfmt::write_json(&mut out, self.get(name).unwrap_or(&Value::Null));
        }
        out.push('}');
        out
    }
}

fn missing(class: &ModelClass) -> StorageError {
    let names: Vec<&str> = class.attrs.iter().map(|(n, _)| *n).collect();
    StorageError::TypeError(format!(
        "{}.__init__() missing 1 or more required keyword arguments: {}",
        class.name,
        names.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn host() -> &'static ModelClass {
        class("Host").unwrap()
    }

    #[test]
    fn new_fills_defaults_and_drops_unknown_keys() {
        let m = Model::new(host(), &json!({"address": "10.0.0.1", "bogus": 1})).unwrap();
        assert_eq!(
            m.to_dict(),
            json!({"address": "10.0.0.1", "status": "", "os": "", "cpus": 0,
                   "memory": 0, "space": 0, "last_check": "", "source": ""})
        );
        let c = Model::new(class("Cluster").unwrap(), &json!({"name": "c"})).unwrap();
        assert_eq!(c.get("network"), Some(&json!("default")));
        assert!(c.to_dict_safe().get("hostset").is_none());
        assert_eq!(c.to_dict()["hostset"], json!([]));
    }

    #[test]
    fn a_primary_key_that_would_leave_its_directory_is_refused() {
        for bad in ["../clusters/x", "a/b", ".", ".."] {
            let m = Model::new(host(), &json!({"address": bad})).unwrap();
            assert!(
                matches!(m.store_key(), Err(StorageError::Validation { .. })),
                "{bad}"
            );
        }
        let m = Model::new(host(), &json!({"address": "10.0.0.1"})).unwrap();
        assert_eq!(m.store_key().unwrap().as_deref(), Some("10.0.0.1"));
    }

    #[test]
    fn new_without_a_required_attribute_is_the_originals_type_error() {
        let e = Model::new(host(), &json!({})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Host.__init__() missing 1 or more required keyword arguments: \
             address, status, os, cpus, memory, space, last_check, source"
        );
    }

    #[test]
    fn validation_reports_every_error_in_python_form() {
        let m = Model::new(host(), &json!({"address": 5, "cpus": "2", "memory": true})).unwrap();
        let e = m.validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"('Host instance is invalid due to 2 errors.', ["Host.address: Expected type <class 'str'>. Got <class 'int'>", "Host.cpus: Expected type <class 'int'>. Got <class 'str'>"])"#
        );
        let net = Model::new(
            class("Network").unwrap(),
            &json!({"name": "n", "type": "x"}),
        )
        .unwrap();
        assert!(net
            .validate()
            .unwrap_err()
            .to_string()
            .contains("Container type must be one of the following: flannel_etcd, flannel_server"));
    }

    #[test]
    fn to_json_keeps_the_declaration_order() {
        let m = Model::new(host(), &json!({"address": "a"})).unwrap();
        assert_eq!(
            m.to_json(),
            r#"{"address": "a", "status": "", "os": "", "cpus": 0, "memory": 0, "space": 0, "last_check": "", "source": ""}"#
        );
    }
}
