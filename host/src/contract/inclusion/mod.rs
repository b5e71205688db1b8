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

use serde_json::{json, Map, Value};

use super::validate::shown_value;
use keywords::*;
use range::*;

mod keywords;
mod range;
#[cfg(test)]
mod tests;

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
    /// Comparisons made: past [`MOST_STEPS`], nothing more is proven (a
    /// schema shared many times over is compared as often as it is met).
    steps: usize,
    /// [`Walk::same`] sets annotations aside.
    loose: bool,
}

/// The comparisons one question may take. What the plugins write needs a
/// few hundred; a document made to be slow (a schema shared at every
/// level, huge enums) is "cannot prove" instead of a stalled roll.
const MOST_STEPS: usize = 200_000;

/// Values of an `enum` tried one by one, at most.
const MOST_VALUES: usize = 1024;

impl<'d> Walk<'d> {
    fn new(wide_doc: &'d Value, narrow_doc: &'d Value, loose: bool) -> Self {
        Self {
            wide_doc,
            narrow_doc,
            in_progress: HashSet::new(),
            equal_in_progress: HashSet::new(),
            depth: 0,
            steps: 0,
            loose,
        }
    }

    /// Counts one comparison; `false` once the budget is spent.
    fn step(&mut self) -> bool {
        self.steps += 1;
        self.steps <= MOST_STEPS
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
        if !self.step() {
            return Err(unproven(at, "the schemas are too large to compare"));
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
        // A type the plugin could not describe (no `JsonSchema`) is said
        // "any" without being any: when its author derives the schema the
        // handler takes and returns what it did, so nothing is known to
        // have changed (as between a derived contract and a typed one).
        if undescribed(wide) || undescribed(narrow) {
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
            if finite.len() > MOST_VALUES {
                return Err(unproven(at, "an `enum` too long to try"));
            }
            // The checker asserts no format, and the handler's reading of
            // one (a date, a UUID) is its own: not provable by trying.
            if let Some(format) = opaque_format(wide, self.wide_doc) {
                return Err(unproven(at, &format!("a `{format}` format")));
            }
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
        if self.depth >= DEEPEST || !self.step() {
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

/// Marked by plugin-api as the schema of a type without one.
fn undescribed(schema: &Value) -> bool {
    schema.get("x-undescribed") == Some(&Value::Bool(true))
}

/// A `format` in `schema` (or, when it has a `$ref`, anywhere in `doc`'s
/// components) that says more than a number's range.
fn opaque_format(schema: &Value, doc: &Value) -> Option<String> {
    fn find(v: &Value, refs: &mut bool) -> Option<String> {
        match v {
            Value::Object(m) => {
                *refs |= m.contains_key("$ref");
                if let Some(Value::String(f)) = m.get("format") {
                    if numeric_format(f).is_none() {
                        return Some(f.clone());
                    }
                }
                m.values().find_map(|v| find(v, refs))
            }
            Value::Array(a) => a.iter().find_map(|v| find(v, refs)),
            _ => None,
        }
    }
    let mut refs = false;
    find(schema, &mut refs).or_else(|| {
        if refs {
            find(&doc["components"], &mut false)
        } else {
            None
        }
    })
}

pub(super) fn values(at: &str, what: &str) -> Gap {
    Gap::Values {
        at: at.to_owned(),
        what: what.to_owned(),
    }
}

pub(super) fn unproven(at: &str, why: &str) -> Gap {
    Gap::Unproven {
        at: at.to_owned(),
        why: why.to_owned(),
    }
}
