//! Numeric ranges and counts: whether one schema's bounds (its keywords
//! and its integer format's range) lie within another's.

use std::fmt;

use serde_json::{Map, Number, Value};

use super::*;

/// One end of a numeric range.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bound {
    value: Exact,
    exclusive: bool,
}

/// A JSON number compared without losing the integers' precision.
#[derive(Debug, Clone, Copy)]
pub(super) enum Exact {
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
pub(super) fn bound(schema: &Map<String, Value>, upper: bool) -> Option<Bound> {
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
pub(super) fn within_range(
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
pub(super) fn counts_within(
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
