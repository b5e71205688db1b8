//! JSON-RPC request parsing and validation, from a routing key and raw
//! body bytes (input: `routing_key\nbody`; without a newline the key is
//! `simple.add`).
//!
//! Properties: every body yields exactly one reply (a result for an
//! accepted request, else one -32700/-32600 error), whose `id` is the
//! request's when it was readable; an accepted request is what a plain
//! `serde_json::Value` reading of the body says it is.
#![no_main]

use commissaire_host::protocol::{error_body, method_of, parse_request, result_body};
use commissaire_plugin_api::RpcError;
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use serde_json::Value;

fn split(data: &[u8]) -> (String, &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(at) if at <= 255 => (
            String::from_utf8_lossy(&data[..at]).into_owned(),
            &data[at + 1..],
        ),
        _ => ("simple.add".to_owned(), data),
    }
}

/// The one reply for `id_json`, read back: it must be a JSON-RPC response
/// object carrying that id, as the request wrote it (an id such as `1e400`
/// is valid JSON that `serde_json::Value` cannot hold: compared as text).
fn check_reply(body: &[u8], id_json: &str) {
    #[derive(serde::Deserialize)]
    struct Reply<'a> {
        jsonrpc: &'a str,
        #[serde(borrow)]
        id: &'a RawValue,
        // Present, even as `null` (a `null` result is a result).
        #[serde(borrow, default, deserialize_with = "present")]
        result: Option<&'a RawValue>,
        #[serde(borrow, default, deserialize_with = "present")]
        error: Option<&'a RawValue>,
    }
    fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
        serde::Deserialize::deserialize(d).map(Some)
    }
    let reply: Reply<'_> = serde_json::from_slice(body).expect("the reply is not JSON");
    assert!(
        !id_json.starts_with(['[', '{']),
        "id {id_json} is not a scalar"
    );
    assert_eq!(reply.jsonrpc, "2.0");
    assert_eq!(reply.id.get(), id_json);
    assert!(reply.result.is_some() != reply.error.is_some());
}

/// The request object a plain reading finds: the body, or the JSON string
/// it holds read once more. `None` when serde_json cannot read it.
fn reference(body: &[u8]) -> Option<Value> {
    match serde_json::from_slice::<Value>(body).ok()? {
        Value::String(inner) => match serde_json::from_str::<Value>(&inner).ok()? {
            // Encoded twice is not decoded twice.
            Value::String(_) => Some(Value::Null),
            v => Some(v),
        },
        v => Some(v),
    }
}

fuzz_target!(|data: &[u8]| {
    let (routing_key, body) = split(data);
    let mut holder = None;
    let parsed = parse_request(body, &routing_key, &mut holder);
    let plain = reference(body);
    match parsed {
        Ok(request) => {
            assert_eq!(request.method, method_of(&routing_key));
            check_reply(&result_body(request.id_json, "null"), request.id_json);
            assert!(request.params.is_empty() || request.params.starts_with(['[', '{']));
            // What was accepted is what the body says.
            if let Some(plain) = plain {
                let object = plain
                    .as_object()
                    .expect("accepted a body that is not an object");
                assert_eq!(
                    object.get("method").and_then(Value::as_str),
                    Some(&*request.method)
                );
                let id: Value = serde_json::from_str(request.id_json).expect("id");
                assert_eq!(object.get("id").unwrap_or(&Value::Null), &id);
                match object.get("params") {
                    None => assert!(request.params.is_empty()),
                    Some(p) => {
                        let got: Value = serde_json::from_str(request.params).expect("params");
                        assert_eq!(&got, p);
                    }
                }
                if let Some(v) = object.get("jsonrpc") {
                    assert_eq!(v, "2.0");
                }
            }
        }
        Err(rejected) => {
            assert!(
                [RpcError::PARSE_ERROR, RpcError::INVALID_REQUEST].contains(&rejected.error.code),
                "code {}",
                rejected.error.code
            );
            check_reply(
                &error_body(rejected.id_json, &rejected.error),
                rejected.id_json,
            );
            // A body a plain reading accepts is refused only for a reason
            // the protocol gives.
            if let Some(Value::Object(o)) = &plain {
                let id_ok = o
                    .get("id")
                    .is_none_or(|id| !id.is_array() && !id.is_object());
                let version_ok = o.get("jsonrpc").is_none_or(|v| v == "2.0");
                let method_ok =
                    o.get("method").and_then(Value::as_str) == Some(method_of(&routing_key));
                let params_ok = o
                    .get("params")
                    .is_none_or(|p| p.is_array() || p.is_object());
                assert!(
                    !(id_ok && version_ok && method_ok && params_ok)
                        || rejected.error.message.contains("duplicate"),
                    "refused a valid request: {}",
                    rejected.error.message
                );
            }
        }
    }
});
