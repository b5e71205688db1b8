//! Reading a request body, and writing one: the JSON-RPC request rules of
//! docs/protocol.md (parse errors, invalid requests, the id to answer
//! with, the method the routing key names).

use std::borrow::Cow;
use std::fmt;

use commissaire_plugin_api::RpcError;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// A request's members, borrowed from the body.
#[derive(Debug)]
pub struct Request<'a> {
    /// The method.
    pub method: Cow<'a, str>,
    /// The id as JSON text (`null` when absent).
    pub id_json: &'a str,
    /// The params' JSON text; empty when absent.
    pub params: &'a str,
}

/// Why a body could not be dispatched, with the id to answer with.
#[derive(Debug)]
pub struct Rejected<'a> {
    /// The id as JSON text, `null` when unreadable.
    pub id_json: &'a str,
    /// The error.
    pub error: RpcError,
}

enum Body<'a> {
    Object(Members<'a>),
    /// A JSON string: the request, encoded once more.
    Encoded(String),
    Other,
}

#[derive(Default)]
struct Members<'a> {
    jsonrpc: Option<&'a RawValue>,
    method: Option<&'a RawValue>,
    params: Option<&'a RawValue>,
    id: Option<&'a RawValue>,
}

/// Parses a request body: one pass, members kept as raw slices of `body`.
///
/// A body that is a JSON string is decoded once more, as the Python
/// service did; the decoded text is returned in `holder`'s place so that
/// the request can borrow from it.
pub fn parse_request<'a>(
    body: &'a [u8],
    routing_key: &str,
    holder: &'a mut Option<String>,
) -> Result<Request<'a>, Rejected<'a>> {
    let reject = |id_json, error| Rejected { id_json, error };
    let text = std::str::from_utf8(body).map_err(|e| {
        reject(
            "null",
            RpcError::parse_error(format!("body is not UTF-8: {e}")),
        )
    })?;
    let members = match parse_body(text).map_err(|e| reject("null", e))? {
        Body::Object(m) => m,
        Body::Encoded(inner) => {
            let inner: &'a str = holder.insert(inner);
            match parse_body(inner).map_err(|e| reject("null", e))? {
                Body::Object(m) => m,
                Body::Encoded(_) | Body::Other => {
                    return Err(reject("null", not_an_object()));
                }
            }
        }
        Body::Other => return Err(reject("null", not_an_object())),
    };

    let id_json = match members.id {
        None => "null",
        Some(id) if is_scalar(id) => id.get(),
        Some(_) => {
            return Err(reject(
                "null",
                RpcError::invalid_request("`id` must be a string, a number or null"),
            ))
        }
    };
    if let Some(version) = members.jsonrpc {
        if serde_json::from_str::<Cow<'_, str>>(version.get())
            .ok()
            .as_deref()
            != Some("2.0")
        {
            return Err(reject(
                id_json,
                RpcError::invalid_request("`jsonrpc` must be \"2.0\""),
            ));
        }
    }
    let method: Cow<'a, str> = match members.method {
        None => {
            return Err(reject(
                id_json,
                RpcError::invalid_request("the request has no `method`"),
            ))
        }
        Some(raw) => serde_json::from_str(raw.get()).map_err(|_| {
            reject(
                id_json,
                RpcError::invalid_request("`method` must be a string"),
            )
        })?,
    };
    let params = match members.params {
        None => "",
        Some(raw) if raw.get().starts_with(['[', '{']) => raw.get(),
        Some(_) => {
            return Err(reject(
                id_json,
                RpcError::invalid_request("`params` must be an array or an object"),
            ))
        }
    };
    let expected = super::method_of(routing_key);
    if method != expected {
        return Err(reject(
            id_json,
            RpcError::invalid_request(format!(
                "method `{method}` does not match routing key `{routing_key}`"
            )),
        ));
    }
    Ok(Request {
        method,
        id_json,
        params,
    })
}

fn not_an_object() -> RpcError {
    RpcError::invalid_request("the body is not a JSON-RPC request object")
}

fn is_scalar(raw: &RawValue) -> bool {
    !raw.get().starts_with(['{', '['])
}

fn parse_body(text: &str) -> Result<Body<'_>, RpcError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let body = (&mut de).deserialize_any(BodyVisitor).and_then(|b| {
        de.end()?;
        Ok(b)
    });
    body.map_err(|e| match e.classify() {
        serde_json::error::Category::Data => RpcError::invalid_request(e.to_string()),
        _ => RpcError::parse_error(format!("body is not valid JSON: {e}")),
    })
}

struct BodyVisitor;

impl<'de> Visitor<'de> for BodyVisitor {
    type Value = Body<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON-RPC request object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut m = Members::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let slot = match key.as_ref() {
                "jsonrpc" => &mut m.jsonrpc,
                "method" => &mut m.method,
                "params" => &mut m.params,
                "id" => &mut m.id,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            if slot.is_some() {
                return Err(de::Error::custom(format_args!("duplicate member `{key}`")));
            }
            *slot = Some(map.next_value()?);
        }
        Ok(Body::Object(m))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Body::Encoded(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Body::Encoded(v))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Body::Other)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Body::Other)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Body::Other)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Body::Other)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Body::Other)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Body::Other)
    }
}

/// `{"jsonrpc":"2.0","id":…,"method":…,"params":…}`; the method is the
/// routing key's last segment.
pub fn request_body(routing_key: &str, id: Option<&str>, params: Option<&str>) -> Vec<u8> {
    let method = super::method_of(routing_key);
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "null".to_owned());
    let (method, id) = (quote(method), id.map(quote));
    // Allocated once, at its size: params may be a 16 MiB HTTP body, and
    // growing by doubling would hold up to twice that.
    let mut body = String::with_capacity(
        64 + method.len() + id.as_ref().map_or(0, String::len) + params.map_or(0, str::len),
    );
    body.push_str(r#"{"jsonrpc":"2.0","method":"#);
    body.push_str(&method);
    if let Some(id) = id {
        body.push_str(r#","id":"#);
        body.push_str(&id);
    }
    if let Some(params) = params {
        body.push_str(r#","params":"#);
        body.push_str(params);
    }
    body.push('}');
    body.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str, rk: &str) -> Result<(String, String, String), (String, i64)> {
        let mut holder = None;
        parse_request(body.as_bytes(), rk, &mut holder)
            .map(|r| {
                (
                    r.method.into_owned(),
                    r.id_json.to_owned(),
                    r.params.to_owned(),
                )
            })
            .map_err(|r| (r.id_json.to_owned(), r.error.code))
    }

    #[test]
    fn a_plain_request() {
        let r = parse(
            r#"{"jsonrpc":"2.0","id":"a","method":"add","params":[1,2]}"#,
            "simple.add",
        );
        assert_eq!(r, Ok(("add".into(), "\"a\"".into(), "[1,2]".into())));
    }

    #[test]
    fn double_encoded_body_is_decoded_once_more() {
        let inner = r#"{"jsonrpc":"2.0","id":7,"method":"add","params":{"x":1}}"#;
        let body = serde_json::to_string(inner).unwrap();
        assert_eq!(
            parse(&body, "simple.add"),
            Ok(("add".into(), "7".into(), r#"{"x":1}"#.into()))
        );
    }

    #[test]
    fn error_rows() {
        let cases = [
            ("{nope", "null", -32700),
            ("\u{0}", "null", -32700),
            ("[1,2]", "null", -32600),
            ("42", "null", -32600),
            (r#"{"id":1,"params":[]}"#, "1", -32600),
            (r#"{"id":1,"method":5}"#, "1", -32600),
            (r#"{"id":1,"method":"add","params":3}"#, "1", -32600),
            (r#"{"id":1,"method":"add","params":null}"#, "1", -32600),
            (r#"{"id":1,"jsonrpc":"1.0","method":"add"}"#, "1", -32600),
            (r#"{"id":1,"method":"sub"}"#, "1", -32600),
            (r#"{"id":{"a":1},"method":"add"}"#, "null", -32600),
            (r#"{"id":1,"method":"add","method":"add"}"#, "null", -32600),
        ];
        for (body, id, code) in cases {
            assert_eq!(parse(body, "simple.add"), Err((id.into(), code)), "{body}");
        }
    }

    #[test]
    fn invalid_utf8_is_a_parse_error() {
        let mut holder = None;
        let r = parse_request(b"{\"method\":\"\xff\"}", "a.b", &mut holder).unwrap_err();
        assert_eq!(r.error.code, RpcError::PARSE_ERROR);
    }
}
