//! Reading a schema's keywords: `$ref`s followed, types as bits, the
//! parts of a schema the rules of [`super`] compare.

use serde_json::{Map, Value};

use super::*;

/// `schema` with its `$ref`s followed into `doc` (local pointers only; a
/// `$ref`'s siblings are ignored, as draft 7 says).
pub(super) fn resolve<'a>(doc: &'a Value, schema: &'a Value, at: &str) -> Result<&'a Value, Gap> {
    let mut current = schema;
    for _ in 0..DEEPEST {
        let Some(reference) = current.get("$ref").and_then(Value::as_str) else {
            return Ok(current);
        };
        let target = reference
            .strip_prefix('#')
            .filter(|p| p.starts_with('/'))
            .and_then(|p| doc.pointer(&percent_decoded(p)));
        current = target.ok_or_else(|| {
            unproven(
                at,
                &format!("`$ref` {reference} does not point into the document"),
            )
        })?;
    }
    Err(unproven(at, "`$ref`s that point at each other"))
}

/// A JSON pointer from a URI fragment: `%XX` decoded.
pub(super) fn percent_decoded(pointer: &str) -> String {
    let bytes = pointer.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A schema as its keywords: `true` as none; `None` for `false` or a
/// value that is no schema.
pub(super) fn as_schema<'a>(
    schema: &'a Value,
    empty: &'a Map<String, Value>,
) -> Option<&'a Map<String, Value>> {
    match schema {
        Value::Bool(true) => Some(empty),
        Value::Object(o) => Some(o),
        _ => None,
    }
}

/// `true`, or only annotations.
pub(super) fn takes_anything(schema: &Value) -> bool {
    match schema {
        Value::Bool(b) => *b,
        Value::Object(o) => o.keys().all(|k| is_annotation(k)),
        _ => false,
    }
}

pub(super) fn is_annotation(keyword: &str) -> bool {
    ANNOTATIONS.contains(&keyword) || keyword.starts_with("x-")
}

/// A narrow side's `anyOf` or `oneOf`: either bounds its values.
pub(super) fn alternatives(schema: &Map<String, Value>) -> Option<&[Value]> {
    match schema.get("anyOf").or_else(|| schema.get("oneOf")) {
        Some(Value::Array(branches)) => Some(branches),
        _ => None,
    }
}

pub(super) fn without(schema: &Map<String, Value>, keywords: &[&str]) -> Map<String, Value> {
    schema
        .iter()
        .filter(|(k, _)| !keywords.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The values a schema can take when they are few: its `const` or `enum`,
/// or all values of `null`/`boolean` when those are its only types.
pub(super) fn finite_values(schema: &Map<String, Value>) -> Option<Vec<Value>> {
    if let Some(c) = schema.get("const") {
        return Some(vec![c.clone()]);
    }
    if let Some(Value::Array(values)) = schema.get("enum") {
        return Some(values.clone());
    }
    if !schema.contains_key("type") {
        return None;
    }
    let t = types(schema);
    if t & !(ty::NULL | ty::BOOLEAN) != 0 {
        return None;
    }
    let mut values = Vec::new();
    if t & ty::NULL != 0 {
        values.push(Value::Null);
    }
    if t & ty::BOOLEAN != 0 {
        values.extend([Value::Bool(false), Value::Bool(true)]);
    }
    Some(values)
}

/// A validator for `schema` with `doc`'s components, to try values on.
pub(super) fn checker(schema: &Value, doc: &Value, at: &str) -> Result<jsonschema::Validator, Gap> {
    let mut root = Map::new();
    root.insert("allOf".into(), json!([schema]));
    if let Some(components) = doc.get("components") {
        root.insert("components".into(), components.clone());
    }
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft7)
        .should_validate_formats(false)
        .build(&Value::Object(root))
        .map_err(|e| unproven(at, &format!("the schema does not compile: {e}")))
}

/// The types a schema's `type` allows (all without one).
pub(super) fn types(schema: &Map<String, Value>) -> u8 {
    let one = |name: &str| match name {
        "null" => ty::NULL,
        "boolean" => ty::BOOLEAN,
        "integer" => ty::INTEGER,
        "number" => ty::NUMBER,
        "string" => ty::STRING,
        "array" => ty::ARRAY,
        "object" => ty::OBJECT,
        _ => 0,
    };
    match schema.get("type") {
        Some(Value::String(name)) => one(name),
        Some(Value::Array(names)) => names
            .iter()
            .filter_map(Value::as_str)
            .fold(0, |all, n| all | one(n)),
        _ => ty::ALL,
    }
}

/// `schema` for values of type `t` only.
pub(super) fn restricted(schema: &Map<String, Value>, t: u8) -> Value {
    let name = match t {
        ty::NULL => "null",
        ty::BOOLEAN => "boolean",
        ty::INTEGER => "integer",
        ty::FRACTION => "number",
        ty::STRING => "string",
        ty::ARRAY => "array",
        _ => "object",
    };
    let mut piece = without(schema, &["anyOf", "oneOf"]);
    piece.insert("type".into(), name.into());
    Value::Object(piece)
}

pub(super) fn plural(t: u8) -> &'static str {
    match t {
        ty::NULL => "null",
        ty::BOOLEAN => "booleans",
        ty::INTEGER => "integers",
        ty::FRACTION => "numbers that are not integers",
        ty::STRING => "strings",
        ty::ARRAY => "arrays",
        _ => "objects",
    }
}

/// The types a keyword the rules do not read constrains.
pub(super) fn applies_to(keyword: &str) -> u8 {
    match keyword {
        "pattern" => ty::STRING,
        "multipleOf" => ty::NUMBER,
        "uniqueItems" | "contains" | "minContains" | "maxContains" | "unevaluatedItems" => {
            ty::ARRAY
        }
        "patternProperties"
        | "propertyNames"
        | "minProperties"
        | "maxProperties"
        | "dependencies"
        | "dependentRequired"
        | "dependentSchemas"
        | "unevaluatedProperties" => ty::OBJECT,
        _ => ty::ALL,
    }
}

pub(super) fn required(schema: &Map<String, Value>) -> Vec<&str> {
    schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// An array schema as positions and the schema of the items after them
/// (`None`: any).
pub(super) fn items(schema: &Map<String, Value>) -> (&[Value], Option<&Value>) {
    // `prefixItems` is how a tuple is written after draft 7; `#[service]`
    // writes it for an inline tuple argument.
    if let Some(Value::Array(tuple)) = schema.get("prefixItems") {
        return (tuple, schema.get("items"));
    }
    match schema.get("items") {
        Some(Value::Array(tuple)) => (tuple, schema.get("additionalItems")),
        Some(each) => (&[], Some(each)),
        None => (&[], None),
    }
}
