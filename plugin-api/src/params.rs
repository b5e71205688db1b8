//! Fitting JSON-RPC `params` to a handler's arguments.
//!
//! Used by the code `#[service]` generates; public only for that reason.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

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
            Some(raw) => serde_json::from_str(raw.get())
                .map_err(|e| RpcError::invalid_params(format!("invalid argument `{name}`: {e}"))),
            None if optional => serde_json::from_str("null")
                .map_err(|e| RpcError::invalid_params(format!("invalid argument `{name}`: {e}"))),
            None => Err(RpcError::invalid_params(format!(
                "missing argument `{name}`"
            ))),
        }
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
    fn escaped_names_are_matched() {
        assert_eq!(xy(r#"{"\u0078": 5}"#), Ok((5, None)));
    }
}
