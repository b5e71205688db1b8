//! What `commissaire-host describe` prints: a contract for people. Each
//! method as a signature (`add(x: integer, y: integer) -> integer`), its
//! markers, its doc and its declared errors; the shared types its `$ref`s
//! name after them.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::contract::{Contract, MethodView};

/// Nested objects deeper than this are said `object`: a signature stays
/// one readable line.
const MAX_DEPTH: usize = 3;

/// The whole contract, or only `method` (which it has: see
/// [`Contract::method`]).
pub fn render_text(contract: &Contract, method: Option<&str>) -> String {
    let mut out = String::new();
    let info = &contract.document()["info"];
    let _ = write!(out, "service {}", contract.service());
    if !contract.version().is_empty() {
        let _ = write!(out, ", version {}", contract.version());
    }
    if let Some(api) = info["x-plugin-api"].as_str() {
        let _ = write!(out, " (plugin-api {api})");
    }
    out.push('\n');
    if let Some(description) = info["description"].as_str() {
        indented(&mut out, description, 2);
    }
    if contract.is_derived() {
        out.push_str(
            "  no contract: derived from the method list (a plugin built before plugin-api 1.6; \
             parameter types unknown)\n",
        );
    }
    let methods: Vec<MethodView<'_>> = contract
        .methods()
        .filter(|m| method.is_none_or(|name| m.name() == name))
        .collect();
    for m in &methods {
        out.push('\n');
        render_method(&mut out, m);
    }
    let used = referenced(contract, &methods);
    if let Some(schemas) = contract.components() {
        let shown: Vec<(&String, &Value)> = schemas
            .iter()
            .filter(|(name, _)| used.contains(*name))
            .collect();
        if !shown.is_empty() {
            out.push_str("\ntypes:\n");
        }
        for (name, schema) in shown {
            let _ = writeln!(out, "  {name} = {}", definition_text(schema));
            if let Some(d) = schema.get("description").and_then(Value::as_str) {
                indented(&mut out, d, 6);
            }
        }
    }
    out
}

/// A method's signature line: name, params, result, markers.
pub fn signature(method: &MethodView<'_>) -> String {
    let params: Vec<String> = method
        .params()
        .map(|p| {
            let optional = if p.required { "" } else { "?" };
            format!("{}{optional}: {}", p.name, schema_text(p.schema))
        })
        .collect();
    let mut line = format!("{}({})", method.name(), params.join(", "));
    if !method.is_notification() {
        if let Some(result) = method.result() {
            let _ = write!(line, " -> {}", schema_text(result));
        }
    }
    let markers: Vec<&str> = [
        (method.is_async(), "async"),
        (method.is_notification(), "notification"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    if !markers.is_empty() {
        let _ = write!(line, "  [{}]", markers.join(", "));
    }
    line
}

fn render_method(out: &mut String, method: &MethodView<'_>) {
    let _ = writeln!(out, "{}", signature(method));
    let doc = if method.doc().is_empty() {
        method.summary()
    } else {
        method.doc()
    };
    indented(out, doc, 4);
    let errors: Vec<(i64, &str)> = method.errors().collect();
    if !errors.is_empty() {
        out.push_str("    errors:\n");
        for (code, message) in errors {
            let _ = writeln!(out, "      {code}  {message}");
        }
    }
}

/// `text`'s lines, each indented by `by` spaces (blank lines kept blank).
fn indented(out: &mut String, text: &str, by: usize) {
    for line in text.trim_end().lines() {
        if line.trim().is_empty() {
            out.push('\n');
        } else {
            let _ = writeln!(out, "{:by$}{}", "", line.trim_end());
        }
    }
}

/// A JSON Schema as a type: `integer`, `string | null`, `array<string>`,
/// `{name: string, port?: integer}`, `Host` for a `$ref`.
pub fn schema_text(schema: &Value) -> String {
    text_at(schema, 0)
}

/// A shared type's own schema: its fields spelled out, however deep it
/// sits in a signature.
fn definition_text(schema: &Value) -> String {
    match schema {
        Value::Object(o) if !o.contains_key("$ref") => object_text(o, 0),
        other => text_at(other, 0),
    }
}

fn text_at(schema: &Value, depth: usize) -> String {
    match schema {
        Value::Bool(false) => "never".to_owned(),
        Value::Object(o) => object_text(o, depth),
        _ => "any".to_owned(),
    }
}

fn object_text(o: &Map<String, Value>, depth: usize) -> String {
    if let Some(target) = o.get("$ref").and_then(Value::as_str) {
        return ref_name(target);
    }
    if let Some(value) = o.get("const") {
        return value.to_string();
    }
    if let Some(values) = o.get("enum").and_then(Value::as_array) {
        return union(values.iter().map(Value::to_string));
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(options) = o.get(key).and_then(Value::as_array) {
            return union(options.iter().map(|s| text_at(s, depth)));
        }
    }
    if let Some(all) = o.get("allOf").and_then(Value::as_array) {
        let parts: Vec<String> = all.iter().map(|s| text_at(s, depth)).collect();
        return parts.join(" & ");
    }
    match o.get("type") {
        Some(Value::String(t)) => type_text(t, o, depth),
        Some(Value::Array(types)) => union(
            types
                .iter()
                .filter_map(Value::as_str)
                .map(|t| type_text(t, o, depth)),
        ),
        _ if o.contains_key("properties") => type_text("object", o, depth),
        _ => "any".to_owned(),
    }
}

fn type_text(t: &str, o: &Map<String, Value>, depth: usize) -> String {
    match t {
        "array" => match o.get("items") {
            Some(Value::Array(tuple)) => tuple_text(tuple, depth),
            Some(items) => format!("array<{}>", text_at(items, depth + 1)),
            None => match o.get("prefixItems").and_then(Value::as_array) {
                Some(tuple) => tuple_text(tuple, depth),
                None => "array<any>".to_owned(),
            },
        },
        "object" if depth >= MAX_DEPTH => "object".to_owned(),
        "object" => {
            if let Some(properties) = o.get("properties").and_then(Value::as_object) {
                let required: BTreeSet<&str> = o
                    .get("required")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let fields: Vec<String> = properties
                    .iter()
                    .map(|(name, schema)| {
                        let optional = if required.contains(name.as_str()) {
                            ""
                        } else {
                            "?"
                        };
                        format!("{name}{optional}: {}", text_at(schema, depth + 1))
                    })
                    .collect();
                format!("{{{}}}", fields.join(", "))
            } else {
                match o.get("additionalProperties") {
                    Some(values @ Value::Object(_)) => {
                        format!("map<string, {}>", text_at(values, depth + 1))
                    }
                    _ => "object".to_owned(),
                }
            }
        }
        other => other.to_owned(),
    }
}

fn tuple_text(items: &[Value], depth: usize) -> String {
    let items: Vec<String> = items.iter().map(|s| text_at(s, depth + 1)).collect();
    format!("[{}]", items.join(", "))
}

/// The alternatives, each once, in their order.
fn union(parts: impl Iterator<Item = String>) -> String {
    let mut seen = Vec::new();
    for part in parts {
        if !seen.contains(&part) {
            seen.push(part);
        }
    }
    if seen.is_empty() {
        "never".to_owned()
    } else {
        seen.join(" | ")
    }
}

/// `#/components/schemas/Host` names `Host` (JSON Pointer escapes undone).
fn ref_name(target: &str) -> String {
    let last = target.rsplit('/').next().unwrap_or(target);
    last.replace("~1", "/").replace("~0", "~")
}

/// The shared types `methods` name, directly or through one another.
fn referenced(contract: &Contract, methods: &[MethodView<'_>]) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut todo: Vec<&Value> = methods.iter().map(MethodView::raw).collect();
    let schemas = contract.components();
    while let Some(value) = todo.pop() {
        match value {
            Value::Object(o) => {
                if let Some(target) = o.get("$ref").and_then(Value::as_str) {
                    let name = ref_name(target);
                    if let Some(schema) = schemas.and_then(|s| s.get(&name)) {
                        if found.insert(name) {
                            todo.push(schema);
                        }
                    }
                }
                todo.extend(o.values());
            }
            Value::Array(items) => todo.extend(items),
            _ => {}
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn schemas_read_as_types() {
        let cases = [
            (json!(true), "any"),
            (json!({}), "any"),
            (json!({"type": "integer", "format": "int64"}), "integer"),
            (json!({"type": ["string", "null"]}), "string | null"),
            (
                json!({"type": "array", "items": {"type": "string"}}),
                "array<string>",
            ),
            (
                json!({"type": "array", "items": [{"type": "integer"}, {"type": "boolean"}]}),
                "[integer, boolean]",
            ),
            (json!({"$ref": "#/components/schemas/Host"}), "Host"),
            (
                json!({"anyOf": [{"$ref": "#/components/schemas/Host"}, {"type": "null"}]}),
                "Host | null",
            ),
            (json!({"enum": ["a", "b"]}), r#""a" | "b""#),
            (
                json!({"type": "object", "properties": {"name": {"type": "string"},
                       "port": {"type": "integer"}}, "required": ["name"]}),
                "{name: string, port?: integer}",
            ),
            (
                json!({"type": "object", "additionalProperties": {"type": "number"}}),
                "map<string, number>",
            ),
            (json!({"type": "object"}), "object"),
        ];
        for (schema, text) in cases {
            assert_eq!(schema_text(&schema), text, "{schema}");
        }
    }

    #[test]
    fn a_method_reads_as_a_signature_with_its_doc_errors_and_types() {
        let contract = Contract::parse(
            &json!({
                "openrpc": "1.3.2",
                "info": {"title": "store", "version": "1.0.0", "description": "Keeps things."},
                "methods": [
                    {"name": "put", "description": "Stores a host.\n\nMore.",
                     "params": [{"name": "host", "required": true,
                                 "schema": {"$ref": "#/components/schemas/Host"}},
                                {"name": "ttl", "required": false,
                                 "schema": {"type": ["integer", "null"]}}],
                     "result": {"name": "result", "schema": {"type": "null"}},
                     "errors": [{"code": 409, "message": "exists"}], "x-async": true},
                    {"name": "ping", "params": [], "x-notification": true}
                ],
                "components": {"schemas": {
                    "Host": {"type": "object", "properties": {"address": {"type": "string"}},
                             "required": ["address"]},
                    "Unused": {"type": "string"}
                }}
            })
            .to_string(),
        )
        .expect("a contract");
        let text = render_text(&contract, None);
        assert!(
            text.starts_with("service store, version 1.0.0\n  Keeps things.\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "put(host: Host, ttl?: integer | null) -> null  [async]\n    Stores a host.\n\n    More.\n    errors:\n      409  exists\n"
            ),
            "{text}"
        );
        assert!(text.contains("ping()  [notification]\n"), "{text}");
        assert!(
            text.contains("types:\n  Host = {address: string}\n"),
            "{text}"
        );
        assert!(!text.contains("Unused"), "{text}");
        let only = render_text(&contract, Some("ping"));
        assert!(!only.contains("put("), "{only}");
        assert!(!only.contains("types:"), "{only}");
    }

    #[test]
    fn a_derived_contract_says_so() {
        let contract = Contract::derived("old", "0.1.0", None, &[]);
        assert!(render_text(&contract, None).contains("no contract: derived from the method list"));
    }
}
