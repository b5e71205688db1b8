//! What lapin's frames mean to the host: a delivery's properties read
//! (those that are not UTF-8 found, not fatal), and the properties of an
//! [`Outgoing`] as kombu sets them.

use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};

use super::{lapin_error, short};
use crate::bus::{BusError, Malformed, Outgoing, QueueArguments, MAX_HEADER_DEPTH};

/// What makes a delivery unreadable: the first name or property whose
/// bytes are not UTF-8 (the broker passes any bytes through; the patched
/// parser in `vendor/` keeps them instead of failing the connection), or
/// headers nested deeper than [`MAX_HEADER_DEPTH`] (the patched parser
/// stops descending at 32 levels, so a hostile frame arrives that deep).
pub(crate) fn malformed(
    exchange: &lapin::types::ShortString,
    routing_key: &lapin::types::ShortString,
    p: &BasicProperties,
) -> Option<Malformed> {
    let strings = [
        ("routing_key", Some(routing_key)),
        ("exchange", Some(exchange)),
        ("reply_to", p.reply_to().as_ref()),
        ("correlation_id", p.correlation_id().as_ref()),
        ("message_id", p.message_id().as_ref()),
        ("app_id", p.app_id().as_ref()),
        ("type", p.kind().as_ref()),
        ("user_id", p.user_id().as_ref()),
        ("content_type", p.content_type().as_ref()),
        ("content_encoding", p.content_encoding().as_ref()),
        ("expiration", p.expiration().as_ref()),
        ("cluster_id", p.cluster_id().as_ref()),
    ];
    if let Some((name, _)) = strings
        .iter()
        .find(|(_, s)| s.is_some_and(|s| !s.is_utf8()))
    {
        return Some(Malformed::NotUtf8(name));
    }
    p.headers().as_ref().and_then(|h| table_malformed(h, 1))
}

/// The `traceparent` header of `headers`, as text (a long or a short
/// string: senders use either).
pub(super) fn traceparent(headers: &FieldTable) -> Option<String> {
    use lapin::types::AMQPValue;
    let bytes = match headers.inner().get(crate::trace::HEADER)? {
        AMQPValue::LongString(s) => s.as_bytes(),
        AMQPValue::ShortString(s) => s.as_bytes(),
        _ => return None,
    };
    if bytes.len() > crate::trace::MAX_HEADER {
        return None;
    }
    std::str::from_utf8(bytes).ok().map(str::to_owned)
}

/// The `deadline` header of `headers`: an integer of any width, or its
/// decimal text (see [`crate::deadline`]).
pub(super) fn deadline(headers: &FieldTable) -> Option<u64> {
    use lapin::types::AMQPValue as V;
    match headers.inner().get(crate::deadline::HEADER)? {
        V::LongLongInt(n) => u64::try_from(*n).ok(),
        V::LongUInt(n) => Some(u64::from(*n)),
        V::LongInt(n) => u64::try_from(*n).ok(),
        V::LongString(s) => std::str::from_utf8(s.as_bytes())
            .ok()
            .and_then(crate::deadline::parse),
        V::ShortString(s) => crate::deadline::parse(s.as_str()),
        _ => None,
    }
}

/// The first key or short-string value of `table` and of the tables and
/// arrays in it that is not UTF-8, or [`Malformed::TooDeep`] for a table or
/// array nested past [`MAX_HEADER_DEPTH`] (the headers themselves are at
/// `depth` 1). The recursion stops at that depth.
fn table_malformed(table: &FieldTable, depth: usize) -> Option<Malformed> {
    if depth > MAX_HEADER_DEPTH {
        return Some(Malformed::TooDeep);
    }
    table.inner().iter().find_map(|(k, v)| {
        if k.is_utf8() {
            value_malformed(v, depth)
        } else {
            Some(Malformed::NotUtf8("headers"))
        }
    })
}

/// [`table_malformed`] for one value in a table or array at `depth`.
fn value_malformed(v: &lapin::types::AMQPValue, depth: usize) -> Option<Malformed> {
    use lapin::types::AMQPValue;
    match v {
        AMQPValue::ShortString(s) if !s.is_utf8() => Some(Malformed::NotUtf8("headers")),
        AMQPValue::FieldTable(t) => table_malformed(t, depth + 1),
        AMQPValue::FieldArray(_) if depth + 1 > MAX_HEADER_DEPTH => Some(Malformed::TooDeep),
        AMQPValue::FieldArray(a) => a
            .as_slice()
            .iter()
            .find_map(|v| value_malformed(v, depth + 1)),
        _ => None,
    }
}

/// Queue arguments as an AMQP field table.
pub(super) fn field_table(arguments: &QueueArguments) -> FieldTable {
    use crate::bus::QueueArgument;
    use lapin::types::AMQPValue;
    let mut table = FieldTable::default();
    for (name, value) in arguments {
        let value = match value {
            QueueArgument::Text(s) => AMQPValue::LongString(s.as_str().into()),
            QueueArgument::Integer(i) => AMQPValue::LongLongInt(*i),
            QueueArgument::Bool(b) => AMQPValue::Boolean(*b),
            QueueArgument::Float(f) => AMQPValue::Double(*f),
        };
        if let Ok(name) = lapin::types::ShortString::try_new(name.as_str()) {
            table.insert(name, value);
        }
    }
    table
}

/// The message properties of `m`, as kombu sets them.
fn properties(m: &Outgoing<'_>) -> Result<BasicProperties, BusError> {
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(if m.durable { 2 } else { 1 });
    if let Some(reply_to) = m.reply_to {
        properties = properties.with_reply_to(short("reply_to", reply_to)?);
    }
    if let Some(ttl) = m.expires {
        // At least 1 ms: 0 would mean "deliver now or drop".
        let ms = ttl.as_millis().clamp(1, u128::from(u32::MAX));
        properties = properties.with_expiration(ms.to_string().into());
    }
    if let Some(correlation_id) = m.correlation_id {
        let id =
            lapin::types::ShortString::try_from_bytes(correlation_id.to_vec()).map_err(|_| {
                BusError::TooLong {
                    what: "correlation_id",
                    shown: String::from_utf8_lossy(&correlation_id[..40.min(correlation_id.len())])
                        .into_owned(),
                    len: correlation_id.len(),
                }
            })?;
        properties = properties.with_correlation_id(id);
    }
    if m.traceparent.is_some() || m.deadline.is_some() {
        let mut headers = FieldTable::default();
        if let Some(traceparent) = m.traceparent {
            headers.insert(
                crate::trace::HEADER.into(),
                lapin::types::AMQPValue::LongString(traceparent.into()),
            );
        }
        if let Some(deadline) = m.deadline.and_then(|d| i64::try_from(d).ok()) {
            headers.insert(
                crate::deadline::HEADER.into(),
                lapin::types::AMQPValue::LongLongInt(deadline),
            );
        }
        properties = properties.with_headers(headers);
    }
    Ok(properties)
}

/// Publishes `m` on `channel`; the confirm is the caller's to await (in
/// confirm mode).
pub(super) async fn publish_on(
    channel: &Channel,
    m: &Outgoing<'_>,
) -> Result<lapin::PublisherConfirm, BusError> {
    let (exchange, routing_key) = (
        short("exchange", m.exchange)?,
        short("routing key", m.routing_key)?,
    );
    channel
        .basic_publish(
            exchange,
            routing_key,
            BasicPublishOptions {
                mandatory: m.expires.is_some(),
                ..BasicPublishOptions::default()
            },
            m.body,
            properties(m)?,
        )
        .await
        .map_err(|e| publish_error(m, &e))
}

/// A failed publish: to an exchange nobody declared (NOT_FOUND), or on a
/// connection that is gone.
pub(super) fn publish_error(m: &Outgoing<'_>, e: &lapin::Error) -> BusError {
    if super::is_not_found(e) {
        return BusError::NoExchange {
            exchange: m.exchange.to_owned(),
        };
    }
    lapin_error(format!("publishing to `{}`", m.routing_key), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::fuzzing::nested_headers;

    fn check(bytes: &[u8]) -> Option<Malformed> {
        let (_, p) = lapin::protocol::basic::parse_properties(bytes).expect("the frame parses");
        malformed(&"ex".into(), &"rk".into(), &p)
    }

    #[test]
    fn the_deadline_header_is_written_and_read_back() {
        let out = Outgoing {
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
        };
        let p = properties(&out).unwrap();
        assert_eq!(
            p.headers().as_ref().and_then(deadline),
            Some(1_765_100_000_123)
        );
        let mut text = FieldTable::default();
        text.insert(
            crate::deadline::HEADER.into(),
            lapin::types::AMQPValue::LongString("1765100000999".into()),
        );
        assert_eq!(deadline(&text), Some(1_765_100_000_999));
        let mut negative = FieldTable::default();
        negative.insert(
            crate::deadline::HEADER.into(),
            lapin::types::AMQPValue::LongLongInt(-1),
        );
        assert_eq!(deadline(&negative), None);
    }

    #[test]
    fn headers_nested_to_the_limit_are_read() {
        assert_eq!(check(&nested_headers(1, false, b"k")), None);
        assert_eq!(check(&nested_headers(MAX_HEADER_DEPTH, false, b"k")), None);
        assert_eq!(check(&nested_headers(MAX_HEADER_DEPTH, true, b"k")), None);
    }

    #[test]
    fn a_key_that_is_not_utf8_is_found_at_any_depth_within_the_limit() {
        for depth in [1, 3, MAX_HEADER_DEPTH] {
            assert_eq!(
                check(&nested_headers(depth, false, b"\xff\xfe")),
                Some(Malformed::NotUtf8("headers")),
                "depth {depth}"
            );
        }
    }

    /// Upstream's parser recursed into every level and overflowed the
    /// stack of lapin's I/O thread at about 1,000 (this test's thread has
    /// the same 2 MiB); the patched one stops at 32 levels, and the host
    /// refuses anything past 16.
    #[test]
    fn headers_nested_past_the_limit_are_too_deep_however_deep() {
        for depth in [MAX_HEADER_DEPTH + 1, 100, 1_000, 100_000] {
            for arrays in [false, true] {
                assert_eq!(
                    check(&nested_headers(depth, arrays, b"k")),
                    Some(Malformed::TooDeep),
                    "depth {depth}, arrays {arrays}"
                );
            }
        }
    }
}
