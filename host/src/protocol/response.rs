//! Response bodies: writing a result or an error around raw JSON pieces,
//! and reading one back (the caller's side).

use commissaire_plugin_api::RpcError;
use serde_json::value::RawValue;

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

/// A JSON-RPC response, decoded.
#[derive(Debug, serde::Deserialize)]
pub struct Response {
    /// The result, when it succeeded: `Some` whenever the member is
    /// present, `null` included (a Python handler returning `None`).
    #[serde(default, deserialize_with = "present")]
    pub result: Option<Box<RawValue>>,
    /// The error, when it failed.
    pub error: Option<RpcError>,
}

/// A member that is present, whatever its value: serde's `Option` would
/// read `null` as absent.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    serde::Deserialize::deserialize(d).map(Some)
}

/// The result or the error of a reply body; why not, if it has neither.
pub fn read_response(reply: &[u8]) -> Result<Result<Box<RawValue>, RpcError>, String> {
    let response: Response = serde_json::from_slice(reply).map_err(|e| e.to_string())?;
    match (response.result, response.error) {
        (_, Some(error)) => Ok(Err(error)),
        (Some(result), None) => Ok(Ok(result)),
        (None, None) => Err("neither `result` nor `error`".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
