//! Fitting JSON-RPC `params` to a handler's arguments.
//!
//! Used by the code `#[service]` generates; public only for that reason.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::RpcError;

/// The params of one call, split into raw argument values without decoding
/// them: each argument is then decoded straight into its handler type.
#[derive(Debug)]
pub enum Args<'p> {
    /// A JSON array (or no params at all).
    Positional(Vec<&'p RawValue>),
    /// A JSON object.
    Named(Vec<(Cow<'p, str>, &'p RawValue)>),
}

impl<'p> Args<'p> {
    /// Splits `params` (JSON text; empty when the request had none) and
    /// checks its shape against the handler's argument `names`: too many
    /// positional values, or a name the handler does not take, is an error.
    pub fn parse(method: &str, params: &'p str, names: &[&str]) -> Result<Self, RpcError> {
        let text = params.trim_start();
        let invalid =
            |e: serde_json::Error| RpcError::invalid_params(format!("params of `{method}`: {e}"));
        // Values are counted before they are kept: a huge array or object
        // costs no more memory than the handler's arguments.
        let args = if text.is_empty() {
            Args::Positional(Vec::new())
        } else if text.starts_with('[') {
            let mut de = serde_json::Deserializer::from_str(text);
            let (values, total) = de
                .deserialize_seq(BoundedSeq { keep: names.len() })
                .map_err(invalid)?;
            de.end().map_err(invalid)?;
            if total > names.len() {
                return Err(RpcError::invalid_params(format!(
                    "too many params: `{method}` takes {} ({}), got {total}",
                    names.len(),
                    names.join(", "),
                )));
            }
            Args::Positional(values)
        } else if text.starts_with('{') {
            let refused = std::cell::RefCell::new(None);
            let mut de = serde_json::Deserializer::from_str(text);
            let visitor = PairsVisitor {
                method,
                names,
                refused: &refused,
            };
            match de
                .deserialize_map(visitor)
                .and_then(|p| de.end().map(|()| p))
            {
                Ok(pairs) => Args::Named(pairs),
                Err(e) => return Err(refused.into_inner().unwrap_or_else(|| invalid(e))),
            }
        } else {
            return Err(RpcError::invalid_request(
                "`params` must be an array or an object",
            ));
        };
        Ok(args)
    }

    /// Decodes the argument at `index` named `name`. A missing argument is
    /// an error unless it is `optional`, in which case it decodes from
    /// `null` (an `Option` becomes `None`).
    pub fn get<T: DeserializeOwned>(
        &self,
        index: usize,
        name: &str,
        optional: bool,
    ) -> Result<T, RpcError> {
        let raw = match self {
            Args::Positional(values) => values.get(index).copied(),
            Args::Named(pairs) => pairs.iter().find(|(k, _)| k == name).map(|(_, v)| *v),
        };
        match raw {
            Some(raw) => decode(raw.get())
                .map_err(|e| RpcError::invalid_params(format!("invalid argument `{name}`: {e}"))),
            None if optional => serde_json::from_str("null")
                .map_err(|e| RpcError::invalid_params(format!("invalid argument `{name}`: {e}"))),
            None => Err(RpcError::invalid_params(format!(
                "missing argument `{name}`"
            ))),
        }
    }
}

/// Decodes one argument. A float with no fractional part (`2.0`) where
/// the type wants an integer is taken as that integer: the service's
/// contract (JSON Schema, draft 6 on) counts it as one, and a caller who
/// checked their params against it must not then be refused. Only a failed
/// decode is retried, so that a fitting argument, and a `Value` one, decode
/// exactly as sent; a retry that fails too reports the first error.
fn decode<T: DeserializeOwned>(text: &str) -> Result<T, serde_json::Error> {
    let first = match serde_json::from_str(text) {
        Ok(decoded) => return Ok(decoded),
        Err(e) => e,
    };
    // Only a float met where something else was wanted (serde words it
    // "floating point `2.0`") is worth a second decode: another failure (a
    // string, a deep or large wrong value) costs what it did before.
    if !first.to_string().contains("floating point") {
        return Err(first);
    }
    let Ok(mut value) = serde_json::from_str::<Value>(text) else {
        return Err(first);
    };
    if !integral_floats_to_integers(&mut value) {
        return Err(first);
    }
    // Through text, not `T::deserialize(value)`: the same decoder as the
    // first attempt (a `RawValue` inside `T` needs it).
    serde_json::from_str(&value.to_string()).map_err(|_| first)
}

/// Rewrites every float in `value` that is an integer within the 64-bit
/// types' range as that integer; tells whether there was any.
fn integral_floats_to_integers(value: &mut Value) -> bool {
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    const TWO_64: f64 = 18_446_744_073_709_551_616.0;
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // Exact: in these ranges an integral f64 converts without loss
            // (and `-0.0` is 0).
            let integer = if f.fract() != 0.0 {
                None
            } else if (-TWO_63..0.0).contains(&f) {
                Some(Value::from(f as i64))
            } else if (0.0..TWO_64).contains(&f) {
                Some(Value::from(f as u64))
            } else {
                None
            };
            match integer {
                Some(integer) => {
                    *value = integer;
                    true
                }
                None => false,
            }
        }
        // Every member is rewritten: no short cut after the first.
        Value::Array(items) => {
            let mut any = false;
            for item in items {
                any |= integral_floats_to_integers(item);
            }
            any
        }
        Value::Object(members) => {
            let mut any = false;
            for member in members.values_mut() {
                any |= integral_floats_to_integers(member);
            }
            any
        }
        _ => false,
    }
}

/// Keeps the first `keep` values of an array and counts the rest without
/// keeping them.
struct BoundedSeq {
    keep: usize,
}

impl<'de> Visitor<'de> for BoundedSeq {
    type Value = (Vec<&'de RawValue>, usize);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of positional arguments")
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut values = Vec::with_capacity(self.keep);
        while values.len() < self.keep {
            match seq.next_element::<&'de RawValue>()? {
                Some(v) => values.push(v),
                None => {
                    let total = values.len();
                    return Ok((values, total));
                }
            }
        }
        let mut total = values.len();
        while seq.next_element::<de::IgnoredAny>()?.is_some() {
            total += 1;
        }
        Ok((values, total))
    }
}

/// Collects an object's members as (name, raw value) pairs, in order,
/// refusing (in `refused`) the first name the handler does not take or
/// that comes twice, before going on.
struct PairsVisitor<'a> {
    method: &'a str,
    names: &'a [&'a str],
    refused: &'a std::cell::RefCell<Option<RpcError>>,
}

impl<'de> Visitor<'de> for PairsVisitor<'_> {
    type Value = Vec<(Cow<'de, str>, &'de RawValue)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of named arguments")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut pairs: Self::Value = Vec::with_capacity(self.names.len());
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let key = key.0;
            let refusal = if !self.names.contains(&key.as_ref()) {
                Some(format!(
                    "unknown argument `{key}` for `{}` (takes: {})",
                    self.method,
                    self.names.join(", ")
                ))
            } else if pairs.iter().any(|(k, _)| *k == key) {
                Some(format!("argument `{key}` given twice"))
            } else {
                None
            };
            if let Some(refusal) = refusal {
                *self.refused.borrow_mut() = Some(RpcError::invalid_params(refusal.clone()));
                return Err(de::Error::custom(refusal));
            }
            let value: &'de RawValue = map.next_value()?;
            pairs.push((key, value));
        }
        Ok(pairs)
    }
}

/// A member name, borrowed when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an argument name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xy(params: &str) -> Result<(i64, Option<i64>), RpcError> {
        let args = Args::parse("add", params, &["x", "y"])?;
        Ok((args.get(0, "x", false)?, args.get(1, "y", true)?))
    }

    #[test]
    fn positional_and_named_fill_the_same_arguments() {
        assert_eq!(xy("[1, 2]"), Ok((1, Some(2))));
        assert_eq!(xy(r#"{"y": 2, "x": 1}"#), Ok((1, Some(2))));
    }

    #[test]
    fn optional_argument_may_be_left_out() {
        assert_eq!(xy("[1]"), Ok((1, None)));
        assert_eq!(xy(r#"{"x": 1}"#), Ok((1, None)));
    }

    #[test]
    fn mismatches_are_invalid_params_naming_the_argument() {
        for (params, needle) in [
            ("[]", "missing argument `x`"),
            ("[1, 2, 3]", "too many params"),
            (r#"{"x": 1, "z": 3}"#, "unknown argument `z`"),
            (r#"["a", 2]"#, "invalid argument `x`"),
            (r#"{"x": 1, "x": 2}"#, "given twice"),
        ] {
            let err = xy(params)
                .err()
                .unwrap_or_else(|| panic!("{params} accepted"));
            assert_eq!(err.code, RpcError::INVALID_PARAMS, "{params}");
            assert!(err.message.contains(needle), "{params}: {}", err.message);
        }
    }

    #[test]
    fn a_huge_params_array_is_counted_not_kept() {
        let params = format!("[{}0]", "0,".repeat(999_999));
        let err = xy(&params).expect_err("too many");
        assert_eq!(
            err.message,
            "too many params: `add` takes 2 (x, y), got 1000000"
        );
        assert!(xy("[1, 2] trailing").is_err());
    }

    #[test]
    fn an_unknown_name_is_refused_as_it_is_met() {
        let err = xy(r#"{"z": [1, 2, 3], "x": 1}"#).expect_err("refused");
        assert_eq!(err.message, "unknown argument `z` for `add` (takes: x, y)");
    }

    #[test]
    fn an_integral_float_is_the_integer_the_contract_counts_it() {
        assert_eq!(xy("[2.0, -0.0]"), Ok((2, Some(0))));
        assert_eq!(xy(r#"{"x": 1e3, "y": null}"#), Ok((1000, None)));
        assert_eq!(xy("[-9223372036854775808.0]"), Ok((i64::MIN, None)));
        // Not integers, or not `i64`s: refused with the first decode's error.
        for params in ["[2.5]", "[9223372036854775808.0]", "[1e30]", r#"["2.0"]"#] {
            let err = xy(params).expect_err(params);
            assert_eq!(err.code, RpcError::INVALID_PARAMS, "{params}");
            assert!(
                err.message
                    .starts_with("invalid argument `x`: invalid type:"),
                "{params}: {}",
                err.message
            );
        }
    }

    #[test]
    fn integral_floats_are_integers_inside_arguments_too_but_values_stay_as_sent() {
        let params = "[[1.0, 2.0], 18446744073709549568.0]";
        let args = Args::parse("m", params, &["v", "u"]).expect("two arguments");
        assert_eq!(args.get::<Vec<i64>>(0, "v", false), Ok(vec![1, 2]));
        assert_eq!(
            args.get::<u64>(1, "u", false),
            Ok(18_446_744_073_709_549_568)
        );
        assert_eq!(
            args.get::<Value>(0, "v", false),
            Ok(serde_json::json!([1.0, 2.0]))
        );
        assert_eq!(
            args.get::<f64>(1, "u", false),
            Ok(18_446_744_073_709_549_568.0)
        );
    }

    #[test]
    fn escaped_names_are_matched() {
        assert_eq!(xy(r#"{"\u0078": 5}"#), Ok((5, None)));
    }
}
