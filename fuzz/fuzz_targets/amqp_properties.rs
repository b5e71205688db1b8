//! AMQP delivery properties and headers, from a content-header frame as
//! the (patched, see vendor/README.md) parser reads it off the wire, into
//! the request metadata the host keeps.
//!
//! Input: exchange and routing key bytes (one length byte each), then the
//! frame.
//!
//! Properties: no frame fails other than with a parse error, however deep
//! its headers nest; `malformed` names a property exactly when one of the
//! strings the host reads (or a header key or string, to 16 levels) is not
//! UTF-8, and says "too deep" exactly when the headers nest past 16 levels
//! and nothing shallower is wrong; every string keeps its bytes as sent,
//! and a frame written back reads back the same (a reply copies
//! `correlation_id` byte for byte).
//!
//! Deep nesting is generated, not left to luck: input starting with `D`
//! wraps the rest in headers nested as deep as its next two bytes say (up
//! to 65,535 levels, tables or arrays), which random frames never reach.
#![no_main]

use amq_protocol::frame::{gen_frame, parse_frame, AMQPFrame};
use commissaire_host::bus::{Malformed, MAX_HEADER_DEPTH};
use commissaire_host::fuzzing::{amqp_malformed, nested_headers};
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

/// What is wrong in the headers `t` at `depth` (1 for the headers), by
/// the definition: the first key or short string that is not UTF-8, else
/// whether a table or array nests past the limit.
fn headers_model(t: &FieldTable, depth: usize) -> (bool, bool) {
    fn value(v: &AMQPValue, depth: usize) -> (bool, bool) {
        match v {
            AMQPValue::ShortString(s) => (std::str::from_utf8(s.as_bytes()).is_err(), false),
            AMQPValue::FieldTable(t) => headers_model(t, depth + 1),
            AMQPValue::FieldArray(_) if depth + 1 > MAX_HEADER_DEPTH => (false, true),
            AMQPValue::FieldArray(a) => a.as_slice().iter().fold((false, false), |acc, v| {
                let (bad, deep) = value(v, depth + 1);
                (acc.0 || bad, acc.1 || deep)
            }),
            _ => (false, false),
        }
    }
    if depth > MAX_HEADER_DEPTH {
        return (false, true);
    }
    t.inner().iter().fold((false, false), |acc, (k, v)| {
        let (bad, deep) = value(v, depth);
        (
            acc.0 || bad || std::str::from_utf8(k.as_bytes()).is_err(),
            acc.1 || deep,
        )
    })
}

/// A content-header frame whose headers nest `depth` levels (arrays in
/// arrays under one key when `arrays`), `rest` as the innermost key.
fn deep_frame(depth: usize, arrays: bool, rest: &[u8]) -> Vec<u8> {
    let properties = nested_headers(depth, arrays, rest);
    // Frame type 2 on channel 1; class 60 (basic), weight 0, body size 0.
    let mut payload = Vec::with_capacity(properties.len() + 12);
    payload.extend_from_slice(&60u16.to_be_bytes());
    payload.extend_from_slice(&0u16.to_be_bytes());
    payload.extend_from_slice(&0u64.to_be_bytes());
    payload.extend_from_slice(&properties);
    let mut frame = vec![2];
    frame.extend_from_slice(&1u16.to_be_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame.push(0xCE);
    frame
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
    if let [b'D', hi, lo, flavour, rest @ ..] = data {
        let depth = usize::from(u16::from_be_bytes([*hi, *lo]));
        let frame = deep_frame(depth, flavour & 1 == 1, rest);
        check(b"ex", b"rk", &frame);
        return;
    }
    let mut data = data;
    let exchange = take(&mut data).to_vec();
    let routing_key = take(&mut data).to_vec();
    check(&exchange, &routing_key, data);
});

fn check(exchange: &[u8], routing_key: &[u8], data: &[u8]) {
    let (Ok(exchange), Ok(routing_key)) = (
        ShortString::try_from_bytes(exchange.to_vec()),
        ShortString::try_from_bytes(routing_key.to_vec()),
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

    let strings_utf8 = [&exchange, &routing_key]
        .into_iter()
        .chain(strings(p))
        .all(|s| std::str::from_utf8(s.as_bytes()).is_ok());
    let (headers_bad, too_deep) = p
        .headers()
        .as_ref()
        .map_or((false, false), |h| headers_model(h, 1));
    let found = amqp_malformed(&exchange, &routing_key, p);
    match found {
        None => assert!(strings_utf8 && !headers_bad && !too_deep),
        Some(Malformed::TooDeep) => assert!(strings_utf8 && too_deep),
        Some(Malformed::NotUtf8("headers")) => assert!(strings_utf8 && headers_bad),
        Some(Malformed::NotUtf8(_)) => assert!(!strings_utf8),
        Some(Malformed::NotAnEnvelope) => panic!("an AMQP delivery is never an envelope"),
    }
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
}
