//! kombu's message envelope: what `Producer.publish` and
//! `Channel.basic_publish` put in Redis, and how a restore marks it.

use base64::Engine as _;
use serde::Serialize;
use serde_json::Value;

use crate::bus::{Incoming, Outgoing};

/// Standard base64 with padding, as Python's `base64.b64encode`.
fn base64_encode(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Base64 as Python's `base64.b64decode` (not validating): characters
/// outside the alphabet, such as line breaks, are skipped.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let cleaned: String = text
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(cleaned)
        .ok()
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    body: String,
    #[serde(rename = "content-encoding")]
    content_encoding: &'a str,
    #[serde(rename = "content-type")]
    content_type: &'a str,
    headers: serde_json::Map<String, Value>,
    properties: PropertiesOut<'a>,
}

#[derive(Serialize)]
struct PropertiesOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_to: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<std::borrow::Cow<'a, str>>,
    delivery_mode: u8,
    delivery_info: DeliveryInfoOut<'a>,
    priority: u8,
    body_encoding: &'a str,
    delivery_tag: String,
}

#[derive(Serialize)]
struct DeliveryInfoOut<'a> {
    exchange: &'a str,
    routing_key: &'a str,
}

/// The envelope kombu's `Producer.publish` + `Channel.basic_publish` makes
/// of a JSON body.
pub fn envelope(message: &Outgoing<'_>) -> String {
    let mut headers = serde_json::Map::new();
    if let Some(traceparent) = message.traceparent {
        headers.insert(
            crate::trace::HEADER.to_owned(),
            Value::String(traceparent.to_owned()),
        );
    }
    if let Some(deadline) = message.deadline {
        headers.insert(crate::deadline::HEADER.to_owned(), Value::from(deadline));
    }
    let envelope = EnvelopeOut {
        body: base64_encode(message.body),
        content_encoding: "utf-8",
        content_type: "application/json",
        headers,
        properties: PropertiesOut {
            reply_to: message.reply_to,
            // JSON carries text: bytes that are not UTF-8 cannot be sent
            // as they are on Redis (requests carrying them never got here:
            // an envelope is JSON).
            correlation_id: message.correlation_id.map(String::from_utf8_lossy),
            delivery_mode: 2,
            delivery_info: DeliveryInfoOut {
                exchange: message.exchange,
                routing_key: message.routing_key,
            },
            priority: 0,
            body_encoding: "base64",
            delivery_tag: uuid::Uuid::new_v4().to_string(),
        },
    };
    // Serialising strings and maps cannot fail.
    serde_json::to_string(&envelope).unwrap_or_default()
}

/// The delivery an envelope holds, not yet settleable (the consumer adds
/// its settlement).
pub(crate) fn read_envelope(raw: &str) -> Result<Incoming, String> {
    let v: Value = serde_json::from_str(raw).map_err(|e| format!("not JSON: {e}"))?;
    let properties = v
        .get("properties")
        .filter(|p| p.is_object())
        .ok_or("no `properties`")?;
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let info = properties.get("delivery_info");
    // kombu's consumers need one; we tag each take ourselves.
    if text(properties.get("delivery_tag")).is_none() {
        return Err("no `properties.delivery_tag`".to_owned());
    }
    let body = match v.get("body") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(body)) => {
            let encoding = properties.get("body_encoding").and_then(Value::as_str);
            match encoding {
                Some(e) if !e.eq_ignore_ascii_case("utf-8") => {
                    // An undecodable body goes on as it is: the
                    // dispatcher answers it with -32700.
                    base64_decode(body).unwrap_or_else(|| body.clone().into_bytes())
                }
                _ => body.clone().into_bytes(),
            }
        }
        Some(other) => other.to_string().into_bytes(),
    };
    let flag = |v: Option<&Value>| v.and_then(Value::as_bool).unwrap_or(false);
    Ok(Incoming {
        exchange: text(info.and_then(|i| i.get("exchange"))).unwrap_or_default(),
        routing_key: text(info.and_then(|i| i.get("routing_key"))).unwrap_or_default(),
        body,
        reply_to: text(properties.get("reply_to")),
        correlation_id: text(properties.get("correlation_id")).map(String::into_bytes),
        malformed: None,
        traceparent: v
            .get("headers")
            .and_then(|h| h.get(crate::trace::HEADER))
            .and_then(Value::as_str)
            .filter(|t| t.len() <= crate::trace::MAX_HEADER)
            .map(str::to_owned),
        redelivered: flag(info.and_then(|i| i.get("redelivered")))
            || flag(v.get("headers").and_then(|h| h.get("redelivered"))),
        deadline: v
            .get("headers")
            .and_then(|h| h.get(crate::deadline::HEADER))
            .and_then(|d| match d {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => crate::deadline::parse(s),
                _ => None,
            }),
        settlement: None,
    })
}

/// Marks an envelope redelivered, as kombu's `_do_restore_message` does,
/// and also when it has no `headers` (kombu then marks nothing, and the
/// message would escape `crash_limit`).
pub(crate) fn mark_redelivered(payload: &mut Value) {
    let Some(envelope) = payload.as_object_mut() else {
        return;
    };
    let headers = envelope
        .entry("headers")
        .or_insert_with(|| Value::Object(serde_json::Map::new()));
    if !headers.is_object() {
        *headers = Value::Object(serde_json::Map::new());
    }
    if let Some(headers) = headers.as_object_mut() {
        headers.insert("redelivered".to_owned(), Value::Bool(true));
    }
    if let Some(info) = envelope
        .get_mut("properties")
        .and_then(|p| p.get_mut("delivery_info"))
        .and_then(Value::as_object_mut)
    {
        info.insert("redelivered".to_owned(), Value::Bool(true));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message as kombu 5.7's `Producer.publish` left it in Redis.
    const KOMBU_MESSAGE: &str = r#"{"body": "eyJqc29ucnBjIjogIjIuMCIsICJpZCI6ICIxIiwgIm1ldGhvZCI6ICJhZGQiLCAicGFyYW1zIjogWzEsIDJdfQ==", "content-encoding": "utf-8", "content-type": "application/json", "headers": {}, "properties": {"reply_to": "response-x", "delivery_mode": 2, "delivery_info": {"exchange": "probe-ex", "routing_key": "simple.add"}, "priority": 0, "body_encoding": "base64", "delivery_tag": "646a1a65-5d79-4eb5-837b-72785f2f2cb2"}}"#;

    #[test]
    fn reads_a_kombu_message() {
        let r = read_envelope(KOMBU_MESSAGE).unwrap();
        assert_eq!(
            String::from_utf8(r.body).unwrap(),
            r#"{"jsonrpc": "2.0", "id": "1", "method": "add", "params": [1, 2]}"#
        );
        assert_eq!(
            (r.exchange.as_str(), r.routing_key.as_str()),
            ("probe-ex", "simple.add")
        );
        assert_eq!(r.reply_to.as_deref(), Some("response-x"));
        assert_eq!(r.correlation_id, None);
        assert!(!r.redelivered);
    }

    #[test]
    fn writes_what_kombu_writes() {
        let text = envelope(&Outgoing {
            exchange: "ex",
            routing_key: "simple.add",
            body: br#"{"r": 1}"#,
            reply_to: Some("response-x"),
            correlation_id: Some(b"cid"),
            durable: false,
            confirm: false,
            expires: None,
            traceparent: None,
            deadline: None,
            reply_ttl: None,
        });
        let v: Value = serde_json::from_str(&text).unwrap();
        let tag = v["properties"]["delivery_tag"].as_str().unwrap().to_owned();
        assert!(uuid::Uuid::parse_str(&tag).is_ok());
        assert_eq!(
            v,
            serde_json::json!({
                "body": "eyJyIjogMX0=",
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": {},
                "properties": {
                    "reply_to": "response-x",
                    "correlation_id": "cid",
                    "delivery_mode": 2,
                    "delivery_info": {"exchange": "ex", "routing_key": "simple.add"},
                    "priority": 0,
                    "body_encoding": "base64",
                    "delivery_tag": tag,
                }
            })
        );
        let back = read_envelope(&text).unwrap();
        assert_eq!(back.body, br#"{"r": 1}"#);
    }

    #[test]
    fn the_deadline_goes_in_kombu_s_headers_and_comes_back() {
        let text = envelope(&Outgoing {
            exchange: "ex",
            routing_key: "simple.add",
            body: b"{}",
            reply_to: None,
            correlation_id: None,
            durable: false,
            confirm: false,
            expires: None,
            traceparent: None,
            deadline: Some(1_765_100_000_123),
            reply_ttl: None,
        });
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["headers"]["deadline"], 1_765_100_000_123_u64);
        assert_eq!(
            read_envelope(&text).unwrap().deadline,
            Some(1_765_100_000_123)
        );
        let mut kombu: Value = serde_json::from_str(KOMBU_MESSAGE).unwrap();
        assert_eq!(read_envelope(&kombu.to_string()).unwrap().deadline, None);
        kombu["headers"]["deadline"] = Value::from("1765100000999");
        assert_eq!(
            read_envelope(&kombu.to_string()).unwrap().deadline,
            Some(1_765_100_000_999)
        );
        kombu["headers"]["deadline"] = Value::from(-5);
        assert_eq!(read_envelope(&kombu.to_string()).unwrap().deadline, None);
    }

    #[test]
    fn restored_messages_are_marked_redelivered() {
        let mut v: Value = serde_json::from_str(KOMBU_MESSAGE).unwrap();
        mark_redelivered(&mut v);
        let r = read_envelope(&v.to_string()).unwrap();
        assert!(r.redelivered);
        assert_eq!(v["headers"]["redelivered"], true);
        assert_eq!(v["properties"]["delivery_info"]["redelivered"], true);
    }

    #[test]
    fn an_envelope_without_headers_is_marked_redelivered_too() {
        let mut v: Value = serde_json::from_str(KOMBU_MESSAGE).unwrap();
        v.as_object_mut().unwrap().remove("headers");
        assert!(!read_envelope(&v.to_string()).unwrap().redelivered);
        mark_redelivered(&mut v);
        assert!(read_envelope(&v.to_string()).unwrap().redelivered);
    }

    #[test]
    fn base64_as_python() {
        for (plain, encoded) in [
            ("", ""),
            ("a", "YQ=="),
            ("ab", "YWI="),
            ("abc", "YWJj"),
            ("a string", "YSBzdHJpbmc="),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded).unwrap(), plain.as_bytes());
        }
        assert_eq!(base64_decode("YSBz\ndHJpbmc=").unwrap(), b"a string");
        assert_eq!(base64_decode("YSBzd"), None);
    }
}
