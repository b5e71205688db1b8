//! `GET /openrpc.json`: one OpenRPC document for every service the
//! endpoint relays, put together from the services' own (asked over the
//! bus, see [`crate::discovery`]). Methods are named by routing key
//! (`simple.add`: what an HTTP caller posts to `/rpc/`), and each
//! service's shared schemas are renamed `<service>.<Name>`, with its
//! `$ref`s to match, so that two services' `Host` never collide.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::contract::{Contract, OPENRPC_VERSION};

const SCHEMAS: &str = "#/components/schemas/";

/// The services whose documents to ask for: those this host serves, and
/// those an `[http] allow` pattern names word for word before its method
/// (`storage.*`, `a.b.get`), which another host or an original Python
/// service may serve.
pub(super) fn candidates(
    served: impl IntoIterator<Item = String>,
    allow: Option<&[String]>,
) -> BTreeSet<String> {
    let mut services: BTreeSet<String> = served.into_iter().collect();
    for pattern in allow.into_iter().flatten() {
        let service = crate::protocol::service_of(pattern);
        if service != pattern && !service.is_empty() && !service.contains(['*', '#']) {
            services.insert(service.to_owned());
        }
    }
    services
}

/// The combined document of `contracts` (service, its contract), with only
/// the methods `allowed` lets through; a service left with none is left
/// out.
pub(super) fn combined(
    contracts: &[(String, Arc<Contract>)],
    allowed: impl Fn(&str) -> bool,
) -> Value {
    let mut methods = Vec::new();
    let mut schemas = Map::new();
    let mut services = Map::new();
    for (service, contract) in contracts {
        let mine: Vec<Value> = contract
            .methods()
            .filter_map(|m| {
                let key = format!("{service}.{}", m.name());
                if !allowed(&key) {
                    return None;
                }
                let mut method = m.raw().clone();
                method["name"] = key.into();
                rewrite_refs(&mut method, service);
                Some(method)
            })
            .collect();
        if mine.is_empty() {
            continue;
        }
        methods.extend(mine);
        for (name, schema) in contract.components().into_iter().flatten() {
            let mut schema = schema.clone();
            rewrite_refs(&mut schema, service);
            schemas.insert(format!("{service}.{name}"), schema);
        }
        let info = &contract.document()["info"];
        let mut about = Map::new();
        for key in ["title", "version", "description", "x-plugin-api"] {
            if let Some(v) = info.get(key) {
                about.insert(key.to_owned(), v.clone());
            }
        }
        if contract.is_derived() {
            about.insert("x-derived".to_owned(), true.into());
        }
        services.insert(service.clone(), Value::Object(about));
    }
    let mut doc = json!({
        "openrpc": OPENRPC_VERSION,
        "info": {
            "title": "commissaire-host HTTP endpoint",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The methods this endpoint relays, named by routing key: \
                            POST a JSON-RPC request to /rpc/<name>.",
        },
        "methods": methods,
        "x-services": services,
    });
    if !schemas.is_empty() {
        doc["components"] = json!({ "schemas": schemas });
    }
    doc
}

/// Points `service`'s `$ref`s in `value` at its renamed schemas.
fn rewrite_refs(value: &mut Value, service: &str) {
    match value {
        Value::Object(o) => {
            for (key, v) in o.iter_mut() {
                match v {
                    Value::String(target) if key == "$ref" => {
                        if let Some(name) = target.strip_prefix(SCHEMAS) {
                            *target = format!("{SCHEMAS}{}.{name}", pointer_escape(service));
                        }
                    }
                    v => rewrite_refs(v, service),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite_refs(v, service)),
        _ => {}
    }
}

/// `text` as one JSON Pointer token.
fn pointer_escape(text: &str) -> String {
    text.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contract(title: &str) -> Arc<Contract> {
        let doc = json!({
            "openrpc": "1.3.2",
            "info": {"title": title, "version": "1.0.0"},
            "methods": [
                {"name": "get", "params": [{"name": "host", "required": true,
                  "schema": {"$ref": "#/components/schemas/Host"}}],
                 "result": {"name": "result", "schema": {"type": "string"}}},
                {"name": "drop", "params": []}
            ],
            "components": {"schemas": {
                "Host": {"type": "object", "properties": {"next": {"$ref": "#/components/schemas/Host"}}}
            }}
        });
        Arc::new(Contract::from_value(doc).expect("a contract"))
    }

    #[test]
    fn methods_go_by_routing_key_and_schemas_by_service() {
        let doc = combined(
            &[
                ("a".to_owned(), contract("a")),
                ("b".to_owned(), contract("b")),
            ],
            |key| key != "b.drop",
        );
        let names: Vec<&str> = doc["methods"]
            .as_array()
            .expect("methods")
            .iter()
            .filter_map(|m| m["name"].as_str())
            .collect();
        assert_eq!(names, ["a.get", "a.drop", "b.get"]);
        assert_eq!(
            doc["methods"][2]["params"][0]["schema"]["$ref"],
            "#/components/schemas/b.Host"
        );
        assert_eq!(
            doc["components"]["schemas"]["a.Host"]["properties"]["next"]["$ref"],
            "#/components/schemas/a.Host"
        );
        assert_eq!(doc["x-services"]["b"]["version"], "1.0.0");
        let re = Contract::from_value(doc).expect("itself a contract");
        assert_eq!(re.methods().count(), 3);
    }

    #[test]
    fn a_service_with_no_method_relayed_is_left_out() {
        let doc = combined(&[("a".to_owned(), contract("a"))], |_| false);
        assert_eq!(doc["methods"], json!([]));
        assert_eq!(doc["x-services"], json!({}));
        assert!(doc.get("components").is_none());
    }

    #[test]
    fn allow_patterns_name_services_word_for_word_only() {
        let allow = [
            "storage.*".to_owned(),
            "a.b.get".to_owned(),
            "*.ping".to_owned(),
            "#".to_owned(),
            "x.#".to_owned(),
        ];
        let found = candidates(["simple".to_owned()], Some(&allow));
        let found: Vec<&str> = found.iter().map(String::as_str).collect();
        assert_eq!(found, ["a.b", "simple", "storage", "x"]);
    }
}
