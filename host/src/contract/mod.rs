//! Services' contracts: the OpenRPC document a plugin exports (plugin-api
//! ≥ 1.6), read as data. Pure: no I/O; discovery, the commands and the
//! roll use it.
//!
//! A plugin built before contracts has none; the host then derives one
//! from its method list (names, which arguments are optional, no types),
//! marked `x-derived`, so that discovery still answers and a roll still
//! notices a removed method.
//!
//! [`Contract::check_params`] checks a call's params against a contract;
//! [`compat`] compares two versions of one.

pub mod compat;
mod inclusion;
mod validate;

use serde_json::{json, Map, Value};

use crate::plugin::{MethodInfo, PluginLibrary};

pub use commissaire_plugin_api::{DISCOVER_METHOD, OPENRPC_VERSION};
pub use compat::{compare, Change, Difference};
pub use validate::ParamProblem;

/// Why a document is not a contract this host can read.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    /// Not JSON.
    #[error("not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    /// JSON, but not an OpenRPC document as plugins write them.
    #[error("not an OpenRPC document: {0}")]
    Shape(&'static str),
}

/// One service's contract. Clones share its compiled parameter checks;
/// two contracts are equal when their documents are.
#[derive(Debug, Clone, PartialEq)]
pub struct Contract {
    doc: Value,
    checks: validate::CompiledChecks,
}

/// One method of a contract, borrowed from its document.
#[derive(Debug, Clone, Copy)]
pub struct MethodView<'c> {
    raw: &'c Value,
}

/// One parameter of a method.
#[derive(Debug, Clone, Copy)]
pub struct ParamView<'c> {
    /// Its name.
    pub name: &'c str,
    /// Whether a call must give it.
    pub required: bool,
    /// Its JSON Schema (`true` for any value).
    pub schema: &'c Value,
}

impl Contract {
    /// The contract of `library`: its own, or one derived from its method
    /// list when it has none (or an unreadable one, which is logged).
    pub fn of(library: &PluginLibrary) -> Self {
        if let Some(text) = &library.contract {
            match Self::parse(text) {
                Ok(contract) => return contract,
                Err(e) => tracing::warn!(
                    service = %library.service_name, plugin = %library.path.display(),
                    error = %e, "the plugin's contract is unreadable; using its method list"
                ),
            }
        }
        Self::derived(
            &library.service_name,
            &library.plugin_version,
            library.description.as_deref(),
            &library.methods,
        )
    }

    /// Reads a document (a plugin's, or a discovery answer).
    pub fn parse(text: &str) -> Result<Self, ContractError> {
        Self::from_value(serde_json::from_str(text)?)
    }

    /// Checks that `doc` has what this host reads: `openrpc`, `info.title`
    /// and `methods`, each method with a `name` and `params`.
    pub fn from_value(doc: Value) -> Result<Self, ContractError> {
        if !doc["openrpc"].is_string() {
            return Err(ContractError::Shape("no `openrpc` version"));
        }
        if !doc["info"]["title"].is_string() {
            return Err(ContractError::Shape("no `info.title`"));
        }
        let Some(methods) = doc["methods"].as_array() else {
            return Err(ContractError::Shape("no `methods` array"));
        };
        // Names are how every reader finds a method or a parameter: one
        // named twice would be checked by one entry and compared by another.
        let mut names = std::collections::HashSet::new();
        for m in methods {
            let Some(name) = m["name"].as_str() else {
                return Err(ContractError::Shape("a method without a `name`"));
            };
            if !names.insert(name) {
                return Err(ContractError::Shape("a method named twice"));
            }
            let Some(params) = m["params"].as_array() else {
                return Err(ContractError::Shape("a method without a `params` array"));
            };
            let mut params_seen = std::collections::HashSet::new();
            for p in params {
                let Some(param) = p["name"].as_str() else {
                    return Err(ContractError::Shape("a parameter without a `name`"));
                };
                if !params_seen.insert(param) {
                    return Err(ContractError::Shape("a parameter named twice"));
                }
            }
        }
        Ok(Self {
            doc,
            checks: validate::CompiledChecks::default(),
        })
    }

    /// The contract of a plugin built before contracts: its methods and
    /// which arguments are optional, every type "any".
    pub fn derived(
        service: &str,
        version: &str,
        description: Option<&str>,
        methods: &[MethodInfo],
    ) -> Self {
        let methods: Vec<Value> = methods
            .iter()
            .map(|m| {
                let params: Vec<Value> = m
                    .params
                    .iter()
                    .map(|p| json!({ "name": p.name, "required": !p.optional, "schema": true }))
                    .collect();
                let mut method = json!({
                    "name": m.name,
                    "paramStructure": "either",
                    "params": params,
                    "result": { "name": "result", "schema": true },
                });
                if !m.doc.is_empty() {
                    method["description"] = m.doc.clone().into();
                }
                if m.is_async {
                    method["x-async"] = true.into();
                }
                method
            })
            .collect();
        let mut info = Map::new();
        info.insert("title".into(), service.into());
        info.insert("version".into(), version.into());
        if let Some(d) = description {
            info.insert("description".into(), d.into());
        }
        Self {
            doc: json!({
                "openrpc": OPENRPC_VERSION,
                "info": info,
                "methods": methods,
                "x-derived": true,
            }),
            checks: validate::CompiledChecks::default(),
        }
    }

    /// Whether the host derived it from a method list: the plugin has no
    /// contract of its own.
    pub fn is_derived(&self) -> bool {
        self.doc["x-derived"] == true
    }

    /// The service's name (`info.title`).
    pub fn service(&self) -> &str {
        self.doc["info"]["title"].as_str().unwrap_or_default()
    }

    /// The plugin's version (`info.version`).
    pub fn version(&self) -> &str {
        self.doc["info"]["version"].as_str().unwrap_or_default()
    }

    /// The whole document.
    pub fn document(&self) -> &Value {
        &self.doc
    }

    /// The document as JSON text.
    pub fn to_json(&self) -> String {
        self.doc.to_string()
    }

    /// Its methods, in the document's order.
    pub fn methods(&self) -> impl Iterator<Item = MethodView<'_>> {
        self.doc["methods"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|raw| MethodView { raw })
    }

    /// The method called `name`.
    pub fn method(&self, name: &str) -> Option<MethodView<'_>> {
        self.methods().find(|m| m.name() == name)
    }

    /// The shared schemas `$ref`s point into (`components.schemas`).
    pub fn components(&self) -> Option<&Map<String, Value>> {
        self.doc["components"]["schemas"].as_object()
    }
}

impl<'c> MethodView<'c> {
    /// Its name.
    pub fn name(&self) -> &'c str {
        self.raw["name"].as_str().unwrap_or_default()
    }

    /// Its doc comment (`description`), or "".
    pub fn doc(&self) -> &'c str {
        self.raw["description"].as_str().unwrap_or_default()
    }

    /// Its first sentence (`summary`), or "".
    pub fn summary(&self) -> &'c str {
        self.raw["summary"].as_str().unwrap_or_default()
    }

    /// Its parameters, in order.
    pub fn params(&self) -> impl Iterator<Item = ParamView<'c>> {
        self.raw["params"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| ParamView {
                name: p["name"].as_str().unwrap_or_default(),
                required: p["required"] == true,
                schema: p.get("schema").unwrap_or(&Value::Bool(true)),
            })
    }

    /// Its result's schema; `None` for a notification-only method.
    pub fn result(&self) -> Option<&'c Value> {
        let result = self.raw.get("result")?;
        Some(result.get("schema").unwrap_or(&Value::Bool(true)))
    }

    /// Whether the handler is an `async fn`.
    pub fn is_async(&self) -> bool {
        self.raw["x-async"] == true
    }

    /// Whether callers expect no result (`#[notification]`).
    pub fn is_notification(&self) -> bool {
        self.raw["x-notification"] == true || self.raw.get("result").is_none()
    }

    /// Its declared errors: (code, message).
    pub fn errors(&self) -> impl Iterator<Item = (i64, &'c str)> {
        self.raw["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e["code"].as_i64()?, e["message"].as_str().unwrap_or(""))))
    }

    /// The method as it stands in the document.
    pub fn raw(&self) -> &'c Value {
        self.raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::ParamInfo;

    /// The method list of a plugin built before contracts:
    /// `add(x: i64, y: Option<i64>) -> i64`.
    pub(super) fn old_add() -> [MethodInfo; 1] {
        let param = |name: &str, ty: &str, optional| ParamInfo {
            name: name.into(),
            ty: ty.into(),
            optional,
        };
        [MethodInfo {
            name: "add".into(),
            doc: "Adds.".into(),
            params: vec![param("x", "i64", false), param("y", "Option<i64>", true)],
            returns: "i64".into(),
            is_async: false,
        }]
    }

    #[test]
    fn a_plugin_without_a_contract_gets_one_from_its_method_list() {
        let contract = Contract::derived("old", "0.1.0", None, &old_add());
        assert!(contract.is_derived());
        let reread = Contract::parse(&contract.to_json()).expect("a document");
        let add = reread.method("add").expect("add");
        let params: Vec<(&str, bool)> = add.params().map(|p| (p.name, p.required)).collect();
        assert_eq!(params, [("x", true), ("y", false)]);
        assert_eq!(add.result(), Some(&Value::Bool(true)));
    }

    #[test]
    fn a_method_or_parameter_named_twice_is_refused() {
        let m = r#"{"name":"a","params":[]}"#;
        let twice = format!(
            r#"{{"openrpc":"1.3.2","info":{{"title":"x","version":"1"}},"methods":[{m},{m}]}}"#
        );
        let e = Contract::parse(&twice).expect_err("a twice");
        assert_eq!(
            e.to_string(),
            "not an OpenRPC document: a method named twice"
        );
        let p = r#"{"name":"a","params":[{"name":"x"},{"name":"x"}]}"#;
        let twice = format!(
            r#"{{"openrpc":"1.3.2","info":{{"title":"x","version":"1"}},"methods":[{p}]}}"#
        );
        let e = Contract::parse(&twice).expect_err("x twice");
        assert_eq!(
            e.to_string(),
            "not an OpenRPC document: a parameter named twice"
        );
    }

    #[test]
    fn a_document_without_methods_is_refused() {
        let e = Contract::parse(r#"{"openrpc":"1.3.2","info":{"title":"x","version":"1"}}"#)
            .expect_err("no methods");
        assert_eq!(e.to_string(), "not an OpenRPC document: no `methods` array");
    }
}
