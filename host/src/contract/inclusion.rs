//! Whether one JSON Schema accepts every value another accepts: the
//! question an upgrade asks of each parameter (does the new schema take
//! all the old one took?) and of each result (does the old schema, which
//! callers read with, take all the new one may return?).
//!
//! Sound, not complete: `Ok` is a proof, and anything the rules below
//! cannot prove is a [`Gap`]. The rules cover what `#[service]` writes
//! (schemars, draft 7): `$ref`s into the document's components, type sets
//! (`integer` inside `number`), `anyOf`/`oneOf` (`Option`, enums), numeric
//! ranges and the integer formats' implied ones, string lengths, arrays
//! and tuples, objects' properties, `required` and
//! `additionalProperties`, `enum` and `const`. Any other constraint on the
//! accepting side must stand unchanged on the other.

use std::collections::HashSet;
use std::fmt;

use serde_json::{json, Map, Number, Value};

use super::validate::shown_value;

/// Values one schema accepts and the other may refuse, or why that cannot
/// be ruled out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Gap {
    /// These values: a noun phrase ("integers > 255", "null"), at a place
    /// inside the value (".x", "[]"; "" for the value itself).
    Values {
        /// Where inside the value.
        at: String,
        /// Which values.
        what: String,
    },
    /// The rules cannot tell.
    Unproven {
        /// Where inside the value.
        at: String,
        /// What stands in the way.
        why: String,
    },
}

impl fmt::Display for Gap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (text, at) = match self {
            Gap::Values { at, what } => (what.clone(), at),
            Gap::Unproven { at, why } => (format!("cannot prove compatible: {why}"), at),
        };
        if at.is_empty() {
            f.write_str(&text)
        } else {
            write!(f, "{text} at `{at}`")
        }
    }
}

/// Proves that `wide` (read against `wide_doc`'s components) accepts every
/// value `narrow` (read against `narrow_doc`'s) accepts.
pub(super) fn accepts_all(
    wide: &Value,
    wide_doc: &Value,
    narrow: &Value,
    narrow_doc: &Value,
) -> Result<(), Gap> {
    Walk::new(wide_doc, narrow_doc, false).includes(wide, narrow, "")
}

/// Whether two schemas are the same text once `$ref`s are followed.
pub(super) fn same(a: &Value, a_doc: &Value, b: &Value, b_doc: &Value) -> bool {
    Walk::new(a_doc, b_doc, false).same(a, b)
}

/// Whether two schemas differ at most in their wording: [`same`] with
/// annotations (descriptions, titles, examples…) set aside.
pub(super) fn same_but_wording(a: &Value, a_doc: &Value, b: &Value, b_doc: &Value) -> bool {
    Walk::new(a_doc, b_doc, true).same(a, b)
}

/// Nesting deeper than this is not followed (a proof would need it).
const DEEPEST: usize = 64;

/// The types of JSON Schema as bits; `number` is both integer bits.
mod ty {
    pub const NULL: u8 = 1;
    pub const BOOLEAN: u8 = 2;
    pub const INTEGER: u8 = 4;
    /// Numbers that are not integers.
    pub const FRACTION: u8 = 8;
    pub const NUMBER: u8 = INTEGER | FRACTION;
    pub const STRING: u8 = 16;
    pub const ARRAY: u8 = 32;
    pub const OBJECT: u8 = 64;
    pub const ALL: u8 = 127;
    /// Each type once, `number` as its two halves.
    pub const EACH: [u8; 7] = [NULL, BOOLEAN, INTEGER, FRACTION, STRING, ARRAY, OBJECT];
}

/// Keywords that constrain nothing.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$comment",
    "$schema",
    "$id",
    "id",
    "$anchor",
    "definitions",
    "$defs",
    "contentEncoding",
    "contentMediaType",
];

/// Keywords the rules read.
const UNDERSTOOD: &[&str] = &[
    "type",
    "enum",
    "const",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "items",
    "prefixItems",
    "additionalItems",
    "minItems",
    "maxItems",
    "properties",
    "additionalProperties",
    "required",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "format",
];

/// The formats whose meaning `minimum`/`maximum` already carry (or that
/// say nothing a handler enforces), and the integer formats' ranges.
fn numeric_format(format: &str) -> Option<Option<(i128, i128)>> {
    let range = match format {
        "int8" => (i8::MIN.into(), i8::MAX.into()),
        "int16" => (i16::MIN.into(), i16::MAX.into()),
        "int32" => (i32::MIN.into(), i32::MAX.into()),
        "int64" | "int" => (i64::MIN.into(), i64::MAX.into()),
        "uint8" => (0, u8::MAX.into()),
        "uint16" => (0, u16::MAX.into()),
        "uint32" => (0, u32::MAX.into()),
        "uint64" | "uint" => (0, u64::MAX.into()),
        "float" | "double" => return Some(None),
        _ => return None,
    };
    Some(Some(range))
}

struct Walk<'d> {
    wide_doc: &'d Value,
    narrow_doc: &'d Value,
    /// Pairs being compared further up: met again (a recursive type),
    /// the pair holds if everything else does.
    in_progress: HashSet<(usize, usize)>,
    /// The same for [`Walk::same`].
    equal_in_progress: HashSet<(usize, usize)>,
    depth: usize,
    /// [`Walk::same`] sets annotations aside.
    loose: bool,
}

impl<'d> Walk<'d> {
    fn new(wide_doc: &'d Value, narrow_doc: &'d Value, loose: bool) -> Self {
        Self {
            wide_doc,
            narrow_doc,
            in_progress: HashSet::new(),
            equal_in_progress: HashSet::new(),
            depth: 0,
            loose,
        }
    }

    fn includes(&mut self, wide: &Value, narrow: &Value, at: &str) -> Result<(), Gap> {
        let wide = resolve(self.wide_doc, wide, at)?;
        let narrow = resolve(self.narrow_doc, narrow, at)?;
        let key = (
            wide as *const Value as usize,
            narrow as *const Value as usize,
        );
        if self.depth >= DEEPEST {
            return Err(unproven(at, "the schemas nest too deeply to follow"));
        }
        if !self.in_progress.insert(key) {
            return Ok(());
        }
        self.depth += 1;
        let outcome = self.includes_resolved(wide, narrow, at);
        self.depth -= 1;
        self.in_progress.remove(&key);
        outcome
    }

    fn includes_resolved(&mut self, wide: &Value, narrow: &Value, at: &str) -> Result<(), Gap> {
        if takes_anything(wide) || narrow == &Value::Bool(false) || self.same(wide, narrow) {
            return Ok(());
        }
        let empty = Map::new();
        let Some(wide_obj) = as_schema(wide, &empty) else {
            return Err(values(at, "any value"));
        };
        let Some(narrow_obj) = as_schema(narrow, &empty) else {
            return Err(unproven(
                at,
                "a schema that is neither an object nor a boolean",
            ));
        };

        // The narrow side as a union: each alternative on its own.
        if let Some(branches) = alternatives(narrow_obj) {
            for branch in branches {
                self.includes(wide, branch, at)?;
            }
            return Ok(());
        }
        if let Some(Value::Array(members)) = narrow_obj.get("allOf") {
            // Each member, and the rest, accepts more than the whole: one
            // of them inside `wide` is proof enough.
            let rest = Value::Object(without(narrow_obj, &["allOf"]));
            let mut first_gap = None;
            for part in members.iter().chain(std::iter::once(&rest)) {
                match self.includes(wide, part, at) {
                    Ok(()) => return Ok(()),
                    Err(gap) => {
                        first_gap.get_or_insert(gap);
                    }
                }
            }
            return Err(first_gap.unwrap_or_else(|| unproven(at, "`allOf`")));
        }
        // Finitely many values: each is tried.
        if let Some(finite) = finite_values(narrow_obj) {
            let accepted = checker(wide, self.wide_doc, at)?;
            return match finite.iter().find(|v| !accepted.is_valid(v)) {
                Some(v) => Err(values(at, &shown_value(v))),
                None => Ok(()),
            };
        }

        // The wide side is finite and the narrow one not.
        if wide_obj.contains_key("enum") || wide_obj.contains_key("const") {
            let listed: Vec<String> = finite_values(wide_obj)
                .unwrap_or_default()
                .iter()
                .map(shown_value)
                .collect();
            return Err(values(
                at,
                &format!("values other than {}", listed.join(", ")),
            ));
        }

        // The wide side's combinators.
        if let Some(Value::Array(members)) = wide_obj.get("allOf") {
            for member in members {
                self.includes(member, narrow, at)?;
            }
        }
        for (keyword, exclusive) in [("anyOf", false), ("oneOf", true)] {
            if let Some(Value::Array(branches)) = wide_obj.get(keyword) {
                self.fits_an_alternative(branches, exclusive, narrow_obj, at)?;
            }
        }

        let wide_types = types(wide_obj);
        let narrow_types = types(narrow_obj);
        if narrow_types & ty::FRACTION != 0 && wide_types & ty::NUMBER == ty::INTEGER {
            return Err(values(at, "numbers that are not integers"));
        }
        if let Some(missing) = ty::EACH
            .into_iter()
            .find(|t| narrow_types & t != 0 && wide_types & t == 0)
        {
            return Err(values(at, plural(missing)));
        }
        if narrow_types & ty::NUMBER != 0 {
            let noun = if narrow_types & ty::FRACTION != 0 {
                "numbers"
            } else {
                "integers"
            };
            within_range(wide_obj, narrow_obj, noun, at)?;
        }
        if narrow_types & ty::STRING != 0 {
            self.strings(wide_obj, narrow_obj, at)?;
        }
        if narrow_types & ty::ARRAY != 0 {
            self.arrays(wide_obj, narrow_obj, at)?;
        }
        if narrow_types & ty::OBJECT != 0 {
            self.objects(wide_obj, narrow_obj, at)?;
        }
        self.other_keywords(wide_obj, narrow_obj, narrow_types, at)
    }

    /// `narrow`, type by type, inside one of `branches`; for `oneOf`
    /// (`exclusive`), inside exactly one.
    fn fits_an_alternative(
        &mut self,
        branches: &[Value],
        exclusive: bool,
        narrow: &Map<String, Value>,
        at: &str,
    ) -> Result<(), Gap> {
        let narrow_types = types(narrow);
        for t in ty::EACH.into_iter().filter(|t| narrow_types & t != 0) {
            let piece = restricted(narrow, t);
            // The gaps of the alternatives the piece may meet at all.
            let mut gaps = Vec::new();
            let mut found = false;
            for (i, branch) in branches.iter().enumerate() {
                if self.disjoint(&piece, branch) {
                    continue;
                }
                match self.includes(branch, &piece, at) {
                    Ok(()) => {
                        let alone = !exclusive
                            || branches
                                .iter()
                                .enumerate()
                                .filter(|(j, _)| *j != i)
                                .all(|(_, other)| self.disjoint(&piece, other));
                        if alone {
                            found = true;
                            break;
                        }
                        gaps.push(unproven(
                            at,
                            &format!("{} may match more than one `oneOf` alternative", plural(t)),
                        ));
                    }
                    Err(gap) => gaps.push(gap),
                }
            }
            if !found {
                return Err(match gaps.len() {
                    0 => values(at, plural(t)),
                    // One alternative for them: its own words.
                    1 => gaps.remove(0),
                    _ => unproven(
                        at,
                        &format!("no single alternative takes all {}", plural(t)),
                    ),
                });
            }
        }
        Ok(())
    }

    /// Whether no value is accepted by both `piece` (of the narrow side)
    /// and `other` (of the wide side), as far as types, finite sets and
    /// objects' tags tell.
    fn disjoint(&self, piece: &Value, other: &Value) -> bool {
        let empty = Map::new();
        let Ok(other) = resolve(self.wide_doc, other, "") else {
            return false;
        };
        let (Some(a), Some(b)) = (as_schema(piece, &empty), as_schema(other, &empty)) else {
            return false;
        };
        if types(a) & types(b) == 0 {
            return true;
        }
        let refused_by = |values: &[Value], schema: &Value, doc: &Value| {
            checker(schema, doc, "")
                .map(|c| values.iter().all(|v| !c.is_valid(v)))
                .unwrap_or(false)
        };
        if let Some(finite) = finite_values(a) {
            if refused_by(&finite, other, self.wide_doc) {
                return true;
            }
        }
        if let Some(finite) = finite_values(b) {
            if refused_by(&finite, piece, self.narrow_doc) {
                return true;
            }
        }
        if types(a) & types(b) != ty::OBJECT {
            return false;
        }
        let forbids = |s: &Map<String, Value>, key: &str| {
            s.get("additionalProperties") == Some(&Value::Bool(false))
                && !s
                    .get("properties")
                    .and_then(Value::as_object)
                    .is_some_and(|p| p.contains_key(key))
        };
        let (required_a, required_b) = (required(a), required(b));
        if required_a.iter().any(|k| forbids(b, k)) || required_b.iter().any(|k| forbids(a, k)) {
            return true;
        }
        // A tag: a property both require, with no value in common.
        required_a
            .iter()
            .filter(|k| required_b.contains(k))
            .any(|k| {
                let tag = |s: &Map<String, Value>, doc: &Value| {
                    let p = s.get("properties")?.get(*k)?;
                    let p = resolve(doc, p, "").ok()?;
                    finite_values(p.as_object()?)
                };
                match (tag(a, self.narrow_doc), tag(b, self.wide_doc)) {
                    (Some(x), Some(y)) => x.iter().all(|v| !y.contains(v)),
                    _ => false,
                }
            })
    }

    fn strings(
        &mut self,
        wide: &Map<String, Value>,
        narrow: &Map<String, Value>,
        at: &str,
    ) -> Result<(), Gap> {
        counts_within(
            wide,
            narrow,
            "minLength",
            "maxLength",
            "strings",
            "characters",
            at,
        )?;
        if let Some(format) = wide.get("format").and_then(Value::as_str) {
            if numeric_format(format).is_none()
                && narrow.get("format").and_then(Value::as_str) != Some(format)
            {
                return Err(values(at, &format!("strings that are not `{format}`")));
            }
        }
        Ok(())
    }

    fn arrays(
        &mut self,
        wide: &Map<String, Value>,
        narrow: &Map<String, Value>,
        at: &str,
    ) -> Result<(), Gap> {
        counts_within(wide, narrow, "minItems", "maxItems", "arrays", "items", at)?;
        let (wide_tuple, wide_rest) = items(wide);
        let (narrow_tuple, narrow_rest) = items(narrow);
        let longest = narrow
            .get("maxItems")
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok());
        let any = Value::Bool(true);
        let positions = wide_tuple.len().max(narrow_tuple.len());
        for i in 0..positions {
            if longest.is_some_and(|n| i >= n) {
                return Ok(());
            }
            let w = wide_tuple.get(i).or(wide_rest).unwrap_or(&any);
            let n = narrow_tuple.get(i).or(narrow_rest).unwrap_or(&any);
            self.includes(w, n, &format!("{at}[{i}]"))?;
        }
        if longest.is_some_and(|n| positions >= n) {
            return Ok(());
        }
        let w = wide_rest.unwrap_or(&any);
        let n = narrow_rest.unwrap_or(&any);
        self.includes(w, n, &format!("{at}[]"))
    }

    fn objects(
        &mut self,
        wide: &Map<String, Value>,
        narrow: &Map<String, Value>,
        at: &str,
    ) -> Result<(), Gap> {
        let narrow_required = required(narrow);
        if let Some(missing) = required(wide)
            .into_iter()
            .find(|k| !narrow_required.contains(k))
        {
            return Err(values(at, &format!("objects without `{missing}`")));
        }
        if narrow.contains_key("patternProperties")
            && narrow
                .get("additionalProperties")
                .is_some_and(|a| a != &Value::Bool(true))
        {
            // Keys its patterns match escape its `additionalProperties`.
            return Err(unproven(
                at,
                "`patternProperties` beside `additionalProperties`",
            ));
        }
        let empty = Map::new();
        let props = |s: &Map<String, Value>| -> Map<String, Value> {
            s.get("properties")
                .and_then(Value::as_object)
                .unwrap_or(&empty)
                .clone()
        };
        let (wide_props, narrow_props) = (props(wide), props(narrow));
        let any = Value::Bool(true);
        let wide_other = wide.get("additionalProperties").unwrap_or(&any);
        let narrow_other = narrow.get("additionalProperties").unwrap_or(&any);
        let narrow_closed = narrow
            .get("additionalProperties")
            .is_some_and(|a| a != &any);
        for (key, w) in &wide_props {
            // A property the narrow side does not name, where it allows
            // any other: no caller sent it meaning anything (serde ignores
            // unknown fields), so a new optional field is no break.
            let n = match narrow_props.get(key) {
                Some(n) => n,
                None if narrow_closed || narrow_required.contains(&key.as_str()) => narrow_other,
                None => continue,
            };
            self.includes(w, n, &format!("{at}.{key}"))?;
        }
        for (key, n) in narrow_props
            .iter()
            .filter(|(k, _)| !wide_props.contains_key(*k))
        {
            if wide_other == &Value::Bool(false) && n != &Value::Bool(false) {
                return Err(values(at, &format!("objects with `{key}`")));
            }
            self.includes(wide_other, n, &format!("{at}.{key}"))?;
        }
        if narrow_other != &Value::Bool(false) {
            if wide_other == &Value::Bool(false) {
                return Err(values(at, "objects with other properties"));
            }
            self.includes(wide_other, narrow_other, &format!("{at}.*"))?;
        }
        Ok(())
    }

    /// Constraints the rules do not read: on the wide side, each must
    /// stand unchanged on the narrow side (where it only narrows, it may
    /// be added).
    fn other_keywords(
        &mut self,
        wide: &Map<String, Value>,
        narrow: &Map<String, Value>,
        narrow_types: u8,
        at: &str,
    ) -> Result<(), Gap> {
        for (keyword, value) in wide {
            if is_annotation(keyword)
                || UNDERSTOOD.contains(&keyword.as_str())
                || applies_to(keyword) & narrow_types == 0
            {
                continue;
            }
            match narrow.get(keyword) {
                Some(other) if self.same(value, other) => {}
                Some(_) => return Err(unproven(at, &format!("`{keyword}` changed"))),
                None => return Err(unproven(at, &format!("`{keyword}` added"))),
            }
        }
        Ok(())
    }

    /// Deep equality, `$ref`s followed on both sides.
    fn same(&mut self, a: &Value, b: &Value) -> bool {
        let (Ok(a), Ok(b)) = (
            resolve(self.wide_doc, a, ""),
            resolve(self.narrow_doc, b, ""),
        ) else {
            return false;
        };
        let key = (a as *const Value as usize, b as *const Value as usize);
        if self.depth >= DEEPEST {
            return false;
        }
        if !self.equal_in_progress.insert(key) {
            return true;
        }
        self.depth += 1;
        let equal = match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                // Loose, a property named like an annotation is set aside
                // too: the caller only words a difference it proved harmless.
                let loose = self.loose;
                let kept = |k: &&String| !(loose && is_annotation(k));
                x.keys().filter(kept).count() == y.keys().filter(kept).count()
                    && x.iter()
                        .filter(|(k, _)| kept(k))
                        .all(|(k, v)| y.get(k).is_some_and(|w| self.same(v, w)))
            }
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(v, w)| self.same(v, w))
            }
            _ => a == b,
        };
        self.depth -= 1;
        self.equal_in_progress.remove(&key);
        equal
    }
}

/// `schema` with its `$ref`s followed into `doc` (local pointers only; a
/// `$ref`'s siblings are ignored, as draft 7 says).
fn resolve<'a>(doc: &'a Value, schema: &'a Value, at: &str) -> Result<&'a Value, Gap> {
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
fn percent_decoded(pointer: &str) -> String {
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
fn as_schema<'a>(
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
fn takes_anything(schema: &Value) -> bool {
    match schema {
        Value::Bool(b) => *b,
        Value::Object(o) => o.keys().all(|k| is_annotation(k)),
        _ => false,
    }
}

fn is_annotation(keyword: &str) -> bool {
    ANNOTATIONS.contains(&keyword) || keyword.starts_with("x-")
}

/// A narrow side's `anyOf` or `oneOf`: either bounds its values.
fn alternatives(schema: &Map<String, Value>) -> Option<&[Value]> {
    match schema.get("anyOf").or_else(|| schema.get("oneOf")) {
        Some(Value::Array(branches)) => Some(branches),
        _ => None,
    }
}

fn without(schema: &Map<String, Value>, keywords: &[&str]) -> Map<String, Value> {
    schema
        .iter()
        .filter(|(k, _)| !keywords.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The values a schema can take when they are few: its `const` or `enum`,
/// or all values of `null`/`boolean` when those are its only types.
fn finite_values(schema: &Map<String, Value>) -> Option<Vec<Value>> {
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
fn checker(schema: &Value, doc: &Value, at: &str) -> Result<jsonschema::Validator, Gap> {
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
fn types(schema: &Map<String, Value>) -> u8 {
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
fn restricted(schema: &Map<String, Value>, t: u8) -> Value {
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

fn plural(t: u8) -> &'static str {
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
fn applies_to(keyword: &str) -> u8 {
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

fn required(schema: &Map<String, Value>) -> Vec<&str> {
    schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// An array schema as positions and the schema of the items after them
/// (`None`: any).
fn items(schema: &Map<String, Value>) -> (&[Value], Option<&Value>) {
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

/// One end of a numeric range.
#[derive(Debug, Clone, Copy)]
struct Bound {
    value: Exact,
    exclusive: bool,
}

/// A JSON number compared without losing the integers' precision.
#[derive(Debug, Clone, Copy)]
enum Exact {
    Integer(i128),
    Float(f64),
}

impl Exact {
    fn of(n: &Number) -> Option<Self> {
        if let Some(i) = n.as_i64() {
            Some(Exact::Integer(i.into()))
        } else if let Some(u) = n.as_u64() {
            Some(Exact::Integer(u.into()))
        } else {
            n.as_f64().map(Exact::Float)
        }
    }

    fn cmp(self, other: Self) -> Option<std::cmp::Ordering> {
        match (self, other) {
            (Exact::Integer(a), Exact::Integer(b)) => Some(a.cmp(&b)),
            // Rounding only where an integer meets a fraction.
            (Exact::Integer(a), Exact::Float(b)) => (a as f64).partial_cmp(&b),
            (Exact::Float(a), Exact::Integer(b)) => a.partial_cmp(&(b as f64)),
            (Exact::Float(a), Exact::Float(b)) => a.partial_cmp(&b),
        }
    }
}

impl fmt::Display for Exact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exact::Integer(i) => write!(f, "{i}"),
            Exact::Float(x) => write!(f, "{x}"),
        }
    }
}

/// A schema's lower (`upper` false) or upper bound: the tightest of its
/// keywords and its integer format's range.
fn bound(schema: &Map<String, Value>, upper: bool) -> Option<Bound> {
    let (inclusive, exclusive) = if upper {
        ("maximum", "exclusiveMaximum")
    } else {
        ("minimum", "exclusiveMinimum")
    };
    let number = |k: &str| schema.get(k).and_then(Value::as_number).and_then(Exact::of);
    let mut candidates = Vec::new();
    if let Some(v) = number(inclusive) {
        // Draft 4 wrote exclusivity as a boolean beside the bound.
        let flag = schema.get(exclusive) == Some(&Value::Bool(true));
        candidates.push(Bound {
            value: v,
            exclusive: flag,
        });
    }
    if let Some(v) = number(exclusive) {
        candidates.push(Bound {
            value: v,
            exclusive: true,
        });
    }
    if let Some(Some((lo, hi))) = schema
        .get("format")
        .and_then(Value::as_str)
        .and_then(numeric_format)
    {
        candidates.push(Bound {
            value: Exact::Integer(if upper { hi } else { lo }),
            exclusive: false,
        });
    }
    candidates.into_iter().reduce(|a, b| {
        // The tighter: the larger lower bound, the smaller upper one.
        match a.value.cmp(b.value) {
            Some(std::cmp::Ordering::Equal) => {
                if b.exclusive {
                    b
                } else {
                    a
                }
            }
            Some(std::cmp::Ordering::Greater) if upper => b,
            Some(std::cmp::Ordering::Less) if !upper => b,
            _ => a,
        }
    })
}

/// The narrow side's range inside the wide side's.
fn within_range(
    wide: &Map<String, Value>,
    narrow: &Map<String, Value>,
    noun: &str,
    at: &str,
) -> Result<(), Gap> {
    for upper in [false, true] {
        let Some(w) = bound(wide, upper) else {
            continue;
        };
        let beyond = match bound(narrow, upper) {
            None => true,
            Some(n) => match n.value.cmp(w.value) {
                Some(std::cmp::Ordering::Equal) => w.exclusive && !n.exclusive,
                Some(std::cmp::Ordering::Less) => !upper,
                Some(std::cmp::Ordering::Greater) => upper,
                None => true,
            },
        };
        if beyond {
            let op = match (upper, w.exclusive) {
                (false, false) => "<",
                (false, true) => "≤",
                (true, false) => ">",
                (true, true) => "≥",
            };
            return Err(values(at, &format!("{noun} {op} {}", w.value)));
        }
    }
    Ok(())
}

/// The narrow side's count range (`min`..`max` keywords) inside the wide
/// side's.
fn counts_within(
    wide: &Map<String, Value>,
    narrow: &Map<String, Value>,
    min: &str,
    max: &str,
    noun: &str,
    unit: &str,
    at: &str,
) -> Result<(), Gap> {
    let count = |s: &Map<String, Value>, k: &str| s.get(k).and_then(Value::as_u64);
    if let Some(w) = count(wide, min).filter(|w| *w > 0) {
        if count(narrow, min).is_none_or(|n| n < w) {
            return Err(values(at, &format!("{noun} of fewer than {w} {unit}")));
        }
    }
    if let Some(w) = count(wide, max) {
        if count(narrow, max).is_none_or(|n| n > w) {
            return Err(values(at, &format!("{noun} of more than {w} {unit}")));
        }
    }
    Ok(())
}

fn values(at: &str, what: &str) -> Gap {
    Gap::Values {
        at: at.to_owned(),
        what: what.to_owned(),
    }
}

fn unproven(at: &str, why: &str) -> Gap {
    Gap::Unproven {
        at: at.to_owned(),
        why: why.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A document holding `components`.
    fn doc(components: Value) -> Value {
        json!({ "components": { "schemas": components } })
    }

    /// `wide` takes all of `narrow`, both without components.
    fn takes(wide: Value, narrow: Value) -> Result<(), String> {
        let d = doc(json!({}));
        accepts_all(&wide, &d, &narrow, &d).map_err(|g| g.to_string())
    }

    fn int(format: &str) -> Value {
        json!({ "type": "integer", "format": format })
    }

    #[test]
    fn identical_and_any_are_proven() {
        let point = json!({"type": "object", "properties": {"x": {"type": "integer"}}});
        assert_eq!(takes(point.clone(), point.clone()), Ok(()));
        assert_eq!(takes(json!(true), point.clone()), Ok(()));
        assert_eq!(takes(json!({}), point.clone()), Ok(()));
        assert_eq!(
            takes(json!({"description": "anything"}), point.clone()),
            Ok(())
        );
        assert_eq!(takes(point.clone(), json!(false)), Ok(()));
        assert_eq!(takes(point, json!(true)), Err("null".to_owned()));
    }

    #[test]
    fn type_sets_widen_and_narrow() {
        let t = |types: Value| json!({ "type": types });
        assert_eq!(
            takes(t(json!(["integer", "null"])), t(json!("integer"))),
            Ok(())
        );
        assert_eq!(
            takes(t(json!("integer")), t(json!(["integer", "null"]))),
            Err("null".to_owned())
        );
        assert_eq!(
            takes(t(json!("string")), t(json!("integer"))),
            Err("integers".to_owned())
        );
        // integer ⊂ number.
        assert_eq!(takes(t(json!("number")), t(json!("integer"))), Ok(()));
        assert_eq!(
            takes(t(json!("integer")), t(json!("number"))),
            Err("numbers that are not integers".to_owned())
        );
    }

    #[test]
    fn option_as_any_of_with_null_and_as_a_type_pair_are_the_same() {
        let d = doc(json!({"Point": {"type": "object", "required": ["x"],
            "properties": {"x": {"type": "integer"}}}}));
        let any_of = json!({"anyOf": [{"$ref": "#/components/schemas/Point"}, {"type": "null"}]});
        let point = json!({"$ref": "#/components/schemas/Point"});
        assert_eq!(accepts_all(&any_of, &d, &point, &d), Ok(()));
        assert_eq!(
            accepts_all(&point, &d, &any_of, &d).map_err(|g| g.to_string()),
            Err("null".to_owned())
        );
        assert_eq!(
            takes(
                json!({"anyOf": [{"type": "integer"}, {"type": "null"}]}),
                json!({"type": ["integer", "null"]})
            ),
            Ok(())
        );
        assert_eq!(
            takes(
                json!({"type": ["integer", "null"]}),
                json!({"anyOf": [{"type": "integer"}, {"type": "null"}]})
            ),
            Ok(())
        );
    }

    #[test]
    fn numeric_ranges_and_integer_formats() {
        assert_eq!(takes(int("int64"), int("int32")), Ok(()));
        assert_eq!(
            takes(int("int32"), int("int64")),
            Err("integers < -2147483648".to_owned())
        );
        assert_eq!(takes(int("uint64"), int("uint8")), Ok(()));
        assert_eq!(
            takes(int("uint8"), int("uint16")),
            Err("integers > 255".to_owned())
        );
        assert_eq!(
            takes(int("int64"), int("uint64")),
            Err("integers > 9223372036854775807".to_owned())
        );
        assert_eq!(
            takes(int("uint32"), int("int8")),
            Err("integers < 0".to_owned())
        );
        // Bounds written out, as `#[service]` writes them, agree with the format.
        let written = json!({"type": "integer", "format": "int32",
            "minimum": i32::MIN, "maximum": i32::MAX});
        assert_eq!(takes(int("int32"), written.clone()), Ok(()));
        assert_eq!(takes(written, int("int32")), Ok(()));
        assert_eq!(
            takes(
                json!({"type": "number", "maximum": 10}),
                json!({"type": "number"})
            ),
            Err("numbers > 10".to_owned())
        );
        assert_eq!(
            takes(
                json!({"type": "number", "exclusiveMaximum": 10}),
                json!({"type": "integer", "maximum": 10})
            ),
            Err("integers ≥ 10".to_owned())
        );
        assert_eq!(
            takes(
                json!({"type": "number", "minimum": 0.5}),
                json!({"type": "number", "exclusiveMinimum": 0.5})
            ),
            Ok(())
        );
        assert_eq!(
            takes(json!({"type": "number", "format": "double"}), int("uint8")),
            Ok(())
        );
    }

    #[test]
    fn objects_properties_required_and_additional() {
        let obj = |props: Value, required: Value| json!({"type": "object", "properties": props, "required": required});
        let x = json!({"x": {"type": "integer"}});
        let xy = json!({"x": {"type": "integer"}, "y": {"type": "string"}});
        // A new optional property, others still allowed: compatible.
        assert_eq!(
            takes(obj(xy.clone(), json!(["x"])), obj(x.clone(), json!(["x"]))),
            Ok(())
        );
        // A new required property.
        assert_eq!(
            takes(
                obj(xy.clone(), json!(["x", "y"])),
                obj(x.clone(), json!(["x"]))
            ),
            Err("objects without `y`".to_owned())
        );
        // A property's type, inside.
        assert_eq!(
            takes(
                obj(json!({"x": {"type": "string"}}), json!(["x"])),
                obj(x.clone(), json!(["x"]))
            ),
            Err("integers at `.x`".to_owned())
        );
        // No more unknown properties.
        let mut closed = obj(x.clone(), json!(["x"]));
        closed["additionalProperties"] = json!(false);
        assert_eq!(
            takes(closed.clone(), obj(x.clone(), json!(["x"]))),
            Err("objects with other properties".to_owned())
        );
        assert_eq!(
            takes(closed.clone(), obj(xy, json!(["x"]))),
            Err("objects with `y`".to_owned())
        );
        assert_eq!(takes(obj(x.clone(), json!(["x"])), closed), Ok(()));
        // Map values (`HashMap<String, u8>` → `HashMap<String, u16>`).
        let map = |f: &str| json!({"type": "object", "additionalProperties": int(f)});
        assert_eq!(takes(map("uint16"), map("uint8")), Ok(()));
        assert_eq!(
            takes(map("uint8"), map("uint16")),
            Err("integers > 255 at `.*`".to_owned())
        );
    }

    #[test]
    fn arrays_items_and_tuples() {
        let list = |f: &str| json!({"type": "array", "items": int(f)});
        assert_eq!(takes(list("int64"), list("int32")), Ok(()));
        assert_eq!(
            takes(list("int32"), list("int64")),
            Err("integers < -2147483648 at `[]`".to_owned())
        );
        let tuple = |a: Value, b: Value| json!({"type": "array", "items": [a, b], "minItems": 2, "maxItems": 2});
        let pair = tuple(int("int32"), json!({"type": "string"}));
        assert_eq!(takes(pair.clone(), pair.clone()), Ok(()));
        assert_eq!(
            takes(
                tuple(int("int32"), json!({"type": "integer"})),
                pair.clone()
            ),
            Err("strings at `[1]`".to_owned())
        );
        // A tuple inside a list of its items' union; a list is no tuple.
        assert_eq!(
            takes(
                json!({"type": "array", "items": {"type": ["integer", "string"]}}),
                pair.clone()
            ),
            Ok(())
        );
        assert_eq!(
            takes(pair.clone(), list("int32")),
            Err("arrays of fewer than 2 items".to_owned())
        );
        // `prefixItems`, as `#[service]` writes an inline tuple.
        let prefixed = json!({"type": "array", "prefixItems": [int("int32"), {"type": "string"}],
            "minItems": 2, "maxItems": 2});
        assert_eq!(takes(pair.clone(), prefixed.clone()), Ok(()));
        assert_eq!(takes(prefixed, pair), Ok(()));
    }

    #[test]
    fn enums_and_consts_by_set_inclusion() {
        let e = |values: Value| json!({"type": "string", "enum": values});
        assert_eq!(
            takes(e(json!(["a", "b", "c"])), e(json!(["a", "b"]))),
            Ok(())
        );
        assert_eq!(
            takes(e(json!(["a"])), e(json!(["a", "b"]))),
            Err("\"b\"".to_owned())
        );
        assert_eq!(
            takes(json!({"type": "string"}), json!({"const": "x"})),
            Ok(())
        );
        assert_eq!(
            takes(json!({"const": "x"}), json!({"type": "string"})),
            Err("values other than \"x\"".to_owned())
        );
        assert_eq!(
            takes(
                e(json!(["a", "b"])),
                json!({"type": "string", "maxLength": 1})
            ),
            Err("values other than \"a\", \"b\"".to_owned())
        );
        assert_eq!(
            takes(json!({"type": "boolean"}), json!({"enum": [true, false]})),
            Ok(())
        );
        assert_eq!(
            takes(
                json!({"enum": [null, true, false]}),
                json!({"type": ["null", "boolean"]})
            ),
            Ok(())
        );
    }

    #[test]
    fn rust_enums_as_one_of() {
        // schemars' externally tagged enum: a string for unit variants,
        // an object with one key for the others.
        let shape = |with_triangle: bool| {
            let mut units = vec![json!("Empty")];
            if with_triangle {
                units.push(json!("Triangle"));
            }
            json!({"oneOf": [
                {"type": "string", "enum": units},
                {"type": "object", "additionalProperties": false, "required": ["Circle"],
                 "properties": {"Circle": {"type": "number"}}},
                {"type": "object", "additionalProperties": false, "required": ["Square"],
                 "properties": {"Square": int("uint32")}},
            ]})
        };
        assert_eq!(takes(shape(true), shape(false)), Ok(()));
        assert_eq!(
            takes(shape(false), shape(true)),
            Err("\"Triangle\"".to_owned())
        );
        // Internally tagged: a `const` tag tells the variants apart.
        let tagged = |y: &str| {
            json!({"oneOf": [
                {"type": "object", "required": ["kind", "x"], "properties": {
                    "kind": {"type": "string", "const": "A"}, "x": int("int32")}},
                {"type": "object", "required": ["kind", "y"], "properties": {
                    "kind": {"type": "string", "const": "B"}, "y": {"type": y}}},
            ]})
        };
        assert_eq!(takes(tagged("string"), tagged("string")), Ok(()));
        let widened = tagged("number");
        assert_eq!(takes(widened.clone(), tagged("integer")), Ok(()));
        assert_eq!(
            takes(tagged("integer"), widened),
            Err("numbers that are not integers at `.y`".to_owned())
        );
        // Two alternatives that may overlap: `oneOf` refuses a value both take.
        let overlapping = json!({"oneOf": [{"type": "integer"}, {"type": "number"}]});
        let gap = takes(overlapping, json!({"type": "integer"})).expect_err("unproven");
        assert!(gap.starts_with("cannot prove compatible"), "{gap}");
    }

    #[test]
    fn refs_are_followed_in_each_document_and_recursion_ends() {
        let tree = |leaf: &str| {
            doc(
                json!({"Tree": {"type": "object", "required": ["kids"], "properties": {
                "leaf": {"type": leaf},
                "kids": {"type": "array", "items": {"$ref": "#/components/schemas/Tree"}}}}}),
            )
        };
        let r = json!({"$ref": "#/components/schemas/Tree"});
        let (narrow, wide) = (tree("integer"), tree("number"));
        assert_eq!(accepts_all(&r, &wide, &r, &narrow), Ok(()));
        assert_eq!(
            accepts_all(&r, &narrow, &r, &wide).map_err(|g| g.to_string()),
            Err("numbers that are not integers at `.leaf`".to_owned())
        );
        assert!(same(&r, &narrow, &r, &narrow));
        assert!(!same(&r, &narrow, &r, &wide));
        // The same `$ref` text naming a changed definition is no proof.
        let (a, b) = (
            doc(json!({"T": {"type": "integer"}})),
            doc(json!({"T": {"type": "string"}})),
        );
        let t = json!({"$ref": "#/components/schemas/T"});
        assert!(accepts_all(&t, &a, &t, &b).is_err());
        let dangling = json!({"$ref": "#/components/schemas/Gone"});
        let gap = accepts_all(&dangling, &a, &t, &a)
            .expect_err("dangling")
            .to_string();
        assert!(gap.starts_with("cannot prove compatible: `$ref`"), "{gap}");
    }

    #[test]
    fn unread_constraints_must_stand_unchanged() {
        let s = |extra: Value| {
            let mut schema = json!({"type": "string"});
            if let (Some(o), Value::Object(e)) = (schema.as_object_mut(), extra) {
                o.extend(e);
            }
            schema
        };
        let pattern = s(json!({"pattern": "^a"}));
        assert_eq!(takes(pattern.clone(), pattern.clone()), Ok(()));
        // Only narrows where the old side had it.
        assert_eq!(takes(s(json!({})), pattern.clone()), Ok(()));
        assert_eq!(
            takes(pattern.clone(), s(json!({}))),
            Err("cannot prove compatible: `pattern` added".to_owned())
        );
        assert_eq!(
            takes(s(json!({"pattern": "^b"})), pattern),
            Err("cannot prove compatible: `pattern` changed".to_owned())
        );
        // A string-only keyword says nothing of integers.
        assert_eq!(
            takes(
                json!({"type": ["integer", "string"], "pattern": "^a"}),
                json!({"type": "integer"})
            ),
            Ok(())
        );
        // A new string format (`String` → `Uuid`).
        assert_eq!(
            takes(s(json!({"format": "uuid"})), s(json!({}))),
            Err("strings that are not `uuid`".to_owned())
        );
        assert_eq!(
            takes(s(json!({"maxLength": 8})), s(json!({"maxLength": 9}))),
            Err("strings of more than 8 characters".to_owned())
        );
    }
}
