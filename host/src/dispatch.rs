//! JSON-RPC dispatch, exactly as docs/protocol.md says: from a delivered message
//! (routing key, body bytes, properties) to the reply to publish, if any.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use commissaire_plugin_api::host::{HostBus, RequestMeta};
use commissaire_plugin_api::RpcError;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::plugin::{PluginLibrary, ServiceInstance};

/// A message as the bus delivered it.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// The exchange it came through.
    pub exchange: &'a str,
    /// Its routing key, e.g. `simple.add`.
    pub routing_key: &'a str,
    /// The raw body.
    pub body: &'a [u8],
    /// The `reply_to` property: where the reply goes; none for a
    /// notification.
    pub reply_to: Option<&'a str>,
    /// The `correlation_id` property, for the handler.
    pub correlation_id: Option<&'a str>,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
    /// The `traceparent` of the host's span for it.
    pub traceparent: Option<&'a str>,
}

/// A reply to publish to the default exchange with routing key `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The queue: the request's `reply_to` (the reply copies the
    /// request's `correlation_id`, as sent).
    pub to: String,
    /// The JSON-RPC response body.
    pub body: Vec<u8>,
}

/// What handling one delivery produced.
#[derive(Debug)]
pub struct Handled {
    /// The reply, unless the request was a notification.
    pub reply: Option<Reply>,
    /// How long parsing and the handler took.
    pub took: std::time::Duration,
    /// The error code it was answered with; `None` for a result.
    pub code: Option<i64>,
}

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
    let expected = crate::bus::topic::method_of(routing_key);
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

/// `{"jsonrpc":"2.0","id":…,"result":…}` from raw JSON pieces.
pub fn result_body(id_json: &str, result_json: &str) -> Vec<u8> {
    envelope(id_json, "result", result_json)
}

/// `{"jsonrpc":"2.0","id":…,"error":{…}}`.
pub fn error_body(id_json: &str, error: &RpcError) -> Vec<u8> {
    let error = serde_json::to_string(error).unwrap_or_else(|_| {
        r#"{"code":-32603,"message":"the error could not be encoded"}"#.to_owned()
    });
    envelope(id_json, "error", &error)
}

fn envelope(id_json: &str, member: &str, value: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(32 + id_json.len() + member.len() + value.len());
    body.extend_from_slice(br#"{"jsonrpc":"2.0","id":"#);
    body.extend_from_slice(id_json.as_bytes());
    body.extend_from_slice(b",\"");
    body.extend_from_slice(member.as_bytes());
    body.extend_from_slice(b"\":");
    body.extend_from_slice(value.as_bytes());
    body.push(b'}');
    body
}

/// One service of one plugin, ready to answer deliveries.
pub struct Service {
    name: String,
    library: PluginLibrary,
    instance: ServiceInstance,
}

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Service").field("name", &self.name).finish()
    }
}

impl Service {
    /// Builds the service of `library` with its config section.
    pub fn start(
        library: PluginLibrary,
        config: &serde_json::Value,
    ) -> Result<Arc<Self>, RpcError> {
        let instance = library.instantiate(config)?;
        Ok(Arc::new(Self {
            name: library.service_name.clone(),
            library,
            instance,
        }))
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin it comes from.
    pub fn library(&self) -> &PluginLibrary {
        &self.library
    }

    /// Handles one delivery: parses it, calls the handler (synchronously:
    /// the bus layer runs this where blocking is fine), and builds the reply
    /// when the request had a `reply_to`.
    pub fn handle(&self, delivery: &Delivery<'_>, bus: &dyn HostBus) -> Handled {
        let started = Instant::now();
        let mut holder = None;
        let outcome = match parse_request(delivery.body, delivery.routing_key, &mut holder) {
            Ok(request) => {
                let meta = RequestMeta {
                    exchange: delivery.exchange,
                    routing_key: delivery.routing_key,
                    method: &request.method,
                    id_json: request.id_json,
                    reply_to: delivery.reply_to,
                    correlation_id: delivery.correlation_id,
                    redelivered: delivery.redelivered,
                    traceparent: delivery.traceparent,
                };
                let result = self.instance.call(meta, bus, request.params);
                let latency_us = started.elapsed().as_micros() as u64;
                match &result {
                    Ok(_) => tracing::debug!(
                        service = %self.name, method = %request.method, id = request.id_json,
                        latency_us, "handled"
                    ),
                    // Any caller can make a handler fail: one line per
                    // 10 s, the rest counted (requests_total by code).
                    Err(e) if e.code == RpcError::INTERNAL_ERROR => crate::throttled!(error!(
                        service = %self.name, method = %request.method, id = request.id_json,
                        latency_us, code = e.code, error = %e.message, "handler failed"
                    )),
                    Err(e) => tracing::debug!(
                        service = %self.name, method = %request.method, id = request.id_json,
                        latency_us, code = e.code, error = %e.message, "handled with an error"
                    ),
                }
                match result {
                    Ok(json) => Ok(result_body(request.id_json, json.as_str())),
                    Err(e) => Err((request.id_json.to_owned(), e)),
                }
            }
            Err(rejected) => {
                crate::throttled!(warn!(
                    service = %self.name, routing_key = delivery.routing_key,
                    id = rejected.id_json, code = rejected.error.code,
                    error = %rejected.error.message, "request rejected"
                ));
                Err((rejected.id_json.to_owned(), rejected.error))
            }
        };
        let (body, code) = match outcome {
            Ok(body) => (body, None),
            Err((id, e)) => (error_body(&id, &e), Some(e.code)),
        };
        let reply = delivery.reply_to.map(|to| Reply {
            to: to.to_owned(),
            body,
        });
        Handled {
            reply,
            took: started.elapsed(),
            code,
        }
    }
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

    #[test]
    fn reply_bodies_are_valid_json_rpc() {
        let ok: serde_json::Value = serde_json::from_slice(&result_body("\"x\"", "3")).unwrap();
        assert_eq!(
            ok,
            serde_json::json!({"jsonrpc": "2.0", "id": "x", "result": 3})
        );
        let err: serde_json::Value =
            serde_json::from_slice(&error_body("null", &RpcError::method_not_found("m"))).unwrap();
        assert_eq!(err["error"]["code"], -32601);
        assert_eq!(err["id"], serde_json::Value::Null);
    }
}
