//! Reading a request body as the HTTP endpoint relays it (leniently: its
//! members as sent, for the relay to check), without copying it: the members the
//! relay needs (`id`, `method`, `params`), each left as the text it is in
//! the body. A body of 16 MiB costs 16 MiB: read into a `serde_json::Value`
//! it cost that again, and far more for a long array (a `Value` takes 32
//! bytes for a 2-byte `0,`), whichever member held it.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// Why a body is not a request the relay can send.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// Not JSON (-32700).
    #[error("body is not valid JSON: {0}")]
    NotJson(serde_json::Error),
    /// JSON, but not an object (-32600).
    #[error("the body is not a JSON-RPC request object")]
    NotAnObject,
}

/// The members of a request object the relay reads, as sent (any JSON
/// value: the caller checks them). As a `Value` would read them: a member
/// present twice counts as its last value, and `null` counts as present.
#[derive(Debug, Default)]
pub struct Envelope<'a> {
    /// `id`, if present.
    pub id: Option<&'a RawValue>,
    /// `method`, if present.
    pub method: Option<&'a RawValue>,
    /// `params`, if present.
    pub params: Option<&'a RawValue>,
}

impl Envelope<'_> {
    /// Whether `method` is absent or the string `expected`.
    pub fn method_is(&self, expected: &str) -> bool {
        self.method.is_none_or(|m| {
            serde_json::from_str::<std::borrow::Cow<'_, str>>(m.get()).is_ok_and(|m| m == expected)
        })
    }
}

impl<'a> Envelope<'a> {
    /// Reads `body`: JSON as `serde_json::Value` accepts it (numbers
    /// within range, depth at most 128), holding an object.
    pub fn read(body: &'a [u8]) -> Result<Self, EnvelopeError> {
        // A first pass checks the whole body as `Value` would, allocating
        // nothing: what it refuses is -32700, as before this reader
        // existed; the second pass cannot fail but on the body's shape.
        serde_json::from_slice::<Checked>(body).map_err(EnvelopeError::NotJson)?;
        serde_json::from_slice::<Self>(body).map_err(|_| EnvelopeError::NotAnObject)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Envelope<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Members<'a> {
            type Value = Envelope<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON-RPC request object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope<'a>, A::Error> {
                let mut envelope = Envelope::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match &*key {
                        "id" => envelope.id = Some(map.next_value::<&'de RawValue>()?),
                        "method" => envelope.method = Some(map.next_value::<&'de RawValue>()?),
                        "params" => envelope.params = Some(map.next_value::<&'de RawValue>()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(envelope)
            }
        }
        d.deserialize_map(Members(std::marker::PhantomData))
    }
}

/// Any JSON value, read as `serde_json::Value` would read it (every
/// number parsed, so one out of range is refused) and kept nowhere.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Checked)
    }
}

impl<'de> Visitor<'de> for Checked {
    type Value = Checked;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Checked)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    /// `id`, `method` and `params`, when present.
    type Members = (Option<Value>, Option<Value>, Option<Value>);

    /// What the relay read before: a `Value`, then its members.
    fn as_value(body: &[u8]) -> Result<Members, String> {
        let v: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        let o = v.as_object().ok_or("not an object")?;
        Ok((
            o.get("id").cloned(),
            o.get("method").cloned(),
            o.get("params").cloned(),
        ))
    }

    #[test]
    fn it_reads_what_a_value_reads() {
        for body in [
            r#"{"id": 1, "params": [1, 2]}"#,
            r#"{"id": null, "method": "add", "params": {"x": [1, {"y": "z"}]}}"#,
            r#"{"id": [1, [2]], "method": "\u0061dd"}"#,
            r#"{"method": "sub"}"#,
            r#"{"method": ["add"]}"#,
            r#"{"id": "a", "id": "b", "params": [1], "params": [2]}"#,
            r#"{"p\u0061rams": [3], "jsonrpc": "2.0", "extra": {"deep": [[[1.5e3]]]}}"#,
            r#"{"params": null}"#,
            r#"{"params": "text"}"#,
            r#"{}"#,
            r#"  {"id": 7}  "#,
            r#"[1, 2]"#,
            r#""a string""#,
            r#"{"id": 1, "params": [1e400]}"#,
            r#"{"id": 1, "other": [1e400]}"#,
            r#"{"id": 1"#,
            r#"{"id": 1} x"#,
            r#"{"id": "\ud800"}"#,
            "",
        ] {
            let expected = as_value(body.as_bytes());
            let got = Envelope::read(body.as_bytes());
            match (&expected, &got) {
                (Ok((id, method, params)), Ok(e)) => {
                    let value = |raw: Option<&RawValue>| {
                        raw.map(|r| serde_json::from_str::<Value>(r.get()).unwrap())
                    };
                    assert_eq!(&value(e.id), id, "{body}");
                    assert_eq!(&value(e.method), method, "{body}");
                    assert_eq!(&value(e.params), params, "{body}");
                    assert_eq!(
                        e.method_is("add"),
                        method.as_ref().is_none_or(|m| m == "add"),
                        "{body}"
                    );
                }
                (Err(why), Err(EnvelopeError::NotAnObject)) => {
                    assert_eq!(why, "not an object", "{body}");
                }
                (Err(why), Err(EnvelopeError::NotJson(_))) => {
                    assert_ne!(why, "not an object", "{body}");
                }
                _ => panic!("{body}: {expected:?} vs {got:?}"),
            }
        }
    }

    #[test]
    fn params_are_the_bodys_own_bytes() {
        let body = br#"{"id": 1, "params": [ "x" ,  2 ]}"#;
        let e = Envelope::read(body).unwrap();
        let params = e.params.unwrap().get();
        assert_eq!(params, r#"[ "x" ,  2 ]"#);
        let offset = params.as_ptr() as usize - body.as_ptr() as usize;
        assert_eq!(&body[offset..offset + params.len()], params.as_bytes());
    }
}
