//! The kombu Redis envelope: JSON, base64 body, properties, headers,
//! `delivery_info`.
//!
//! Properties: any bytes are read or refused with a reason, never a
//! panic; a read envelope had `properties` and a `delivery_tag` string;
//! marking it redelivered changes nothing else; and what the host writes
//! (`envelope`) reads back field for field, whatever the body's bytes.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use commissaire_host::bus::redis::envelope;
use commissaire_host::bus::Outgoing;
use commissaire_host::fuzzing::{mark_redelivered, read_redis_envelope};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

#[derive(Arbitrary, Debug)]
struct Written {
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    reply_to: Option<String>,
    correlation_id: Option<String>,
}

fuzz_target!(|data: &[u8]| {
    // As the consumer: the bytes Redis gave, read lossily.
    let raw = String::from_utf8_lossy(data);
    if let Ok(read) = read_redis_envelope(&raw) {
        let v: Value = serde_json::from_str(&raw).expect("read an envelope that is not JSON");
        let properties = v
            .get("properties")
            .expect("read an envelope without properties");
        assert!(properties.is_object());
        assert!(properties.get("delivery_tag").is_some_and(Value::is_string));
        let mut marked = v.clone();
        mark_redelivered(&mut marked);
        let again = read_redis_envelope(&marked.to_string()).expect("a marked envelope is refused");
        assert!(again.redelivered);
        assert_eq!(again.body, read.body);
        assert_eq!(
            (
                &again.exchange,
                &again.routing_key,
                &again.reply_to,
                &again.correlation_id
            ),
            (
                &read.exchange,
                &read.routing_key,
                &read.reply_to,
                &read.correlation_id
            )
        );
    }

    // As the publisher: what the host writes reads back.
    let Ok(w) = Written::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let text = envelope(&Outgoing {
        exchange: &w.exchange,
        routing_key: &w.routing_key,
        body: &w.body,
        reply_to: w.reply_to.as_deref(),
        correlation_id: w.correlation_id.as_deref().map(str::as_bytes),
        durable: false,
        confirm: false,
        expires: None,
        traceparent: None,
        deadline: None,
        reply_ttl: None,
    });
    let back = read_redis_envelope(&text).expect("the host's own envelope is refused");
    assert_eq!(back.body, w.body);
    assert_eq!(back.exchange, w.exchange);
    assert_eq!(back.routing_key, w.routing_key);
    assert_eq!(back.reply_to, w.reply_to);
    assert_eq!(
        back.correlation_id,
        w.correlation_id.map(String::into_bytes)
    );
    assert!(!back.redelivered);
});
