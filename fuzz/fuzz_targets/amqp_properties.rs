//! AMQP delivery properties and headers, from a content-header frame as
//! the (patched, see vendor/README.md) parser reads it off the wire, into
//! the request metadata the host keeps.
//!
//! Input: exchange and routing key bytes (one length byte each), then the
//! frame.
//!
//! Properties: no frame fails other than with a parse error; `not_utf8`
//! names a property exactly when one of the strings the host reads (or a
//! header key or string, to 16 levels) is not UTF-8; every string keeps
//! its bytes as sent, and a frame written back reads back the same (a
//! reply copies `correlation_id` byte for byte).
#![no_main]

use amq_protocol::frame::{gen_frame, parse_frame, AMQPFrame};
use commissaire_host::fuzzing::amqp_not_utf8;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;
use libfuzzer_sys::fuzz_target;

fn take<'a>(data: &mut &'a [u8]) -> &'a [u8] {
    let Some((&n, rest)) = data.split_first() else {
        return &[];
    };
    let n = usize::from(n).min(rest.len());
    let (taken, rest) = rest.split_at(n);
    *data = rest;
    taken
}

/// Whether every key and short string of `t`, to `depth` 16, is UTF-8: by
/// the definition, over the bytes.
fn table_utf8(t: &FieldTable, depth: u8) -> bool {
    fn value_utf8(v: &AMQPValue, depth: u8) -> bool {
        match v {
            AMQPValue::ShortString(s) => std::str::from_utf8(s.as_bytes()).is_ok(),
            AMQPValue::FieldTable(t) => table_utf8(t, depth + 1),
            AMQPValue::FieldArray(a) => a.as_slice().iter().all(|v| value_utf8(v, depth + 1)),
            _ => true,
        }
    }
    depth < 16
        && t.inner()
            .iter()
            .all(|(k, v)| std::str::from_utf8(k.as_bytes()).is_ok() && value_utf8(v, depth))
}

fn strings(p: &BasicProperties) -> Vec<&ShortString> {
    [
        p.reply_to(),
        p.correlation_id(),
        p.message_id(),
        p.app_id(),
        p.kind(),
        p.user_id(),
        p.content_type(),
        p.content_encoding(),
        p.expiration(),
        p.cluster_id(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let exchange = take(&mut data).to_vec();
    let routing_key = take(&mut data).to_vec();
    let (Ok(exchange), Ok(routing_key)) = (
        ShortString::try_from_bytes(exchange),
        ShortString::try_from_bytes(routing_key),
    ) else {
        return;
    };
    let Ok((_, frame)) = parse_frame(data) else {
        return;
    };
    let AMQPFrame::Header(_, header) = &frame else {
        return;
    };
    let p = &header.properties;

    let all_utf8 = [&exchange, &routing_key]
        .into_iter()
        .chain(strings(p))
        .all(|s| std::str::from_utf8(s.as_bytes()).is_ok())
        && p.headers().as_ref().is_none_or(|h| table_utf8(h, 0));
    let found = amqp_not_utf8(&exchange, &routing_key, p);
    assert_eq!(found.is_none(), all_utf8, "not_utf8 said {found:?}");
    for s in strings(p) {
        assert_eq!(s.is_utf8(), std::str::from_utf8(s.as_bytes()).is_ok());
        if s.is_utf8() {
            assert_eq!(s.as_str().as_bytes(), s.as_bytes());
        }
    }

    // Written back (a reply, a requeue): the same bytes again.
    let written = match cookie_factory::gen_simple(gen_frame(&frame), Vec::new()) {
        Ok(bytes) => bytes,
        Err(e) => panic!("a parsed frame cannot be written: {e:?}"),
    };
    let (_, again) = parse_frame(written.as_slice()).expect("a written frame does not parse");
    // Debug, not ==: a NaN float header is equal to itself here.
    assert_eq!(format!("{again:?}"), format!("{frame:?}"));
    if let (AMQPFrame::Header(_, h2), Some(cid)) = (&again, p.correlation_id()) {
        let cid2 = h2
            .properties
            .correlation_id()
            .as_ref()
            .map(ShortString::as_bytes);
        assert_eq!(cid2, Some(cid.as_bytes()));
    }
});
