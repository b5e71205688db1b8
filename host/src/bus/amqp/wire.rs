//! What lapin's frames mean to the host: an [`Incoming`] from a delivery
//! (with the properties that are not UTF-8 found, not fatal), and the
//! properties of an [`Outgoing`] as kombu sets them.

use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};

use super::consume::{AmqpAcker, Settling};
use super::{lapin_error, short};
use crate::bus::{BusError, Incoming, Outgoing, QueueArguments};

/// A lapin delivery as the host sees it; how to settle it, if it must be.
pub(super) fn incoming(
    delivery: lapin::message::Delivery,
    settling: Option<&Settling>,
) -> Incoming {
    let properties = &delivery.properties;
    Incoming {
        exchange: delivery.exchange.to_string(),
        routing_key: delivery.routing_key.to_string(),
        reply_to: properties.reply_to().as_ref().map(|s| s.to_string()),
        correlation_id: properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_bytes().to_vec()),
        not_utf8: not_utf8(&delivery.exchange, &delivery.routing_key, properties),
        traceparent: properties.headers().as_ref().and_then(traceparent),
        redelivered: delivery.redelivered,
        acker: settling.map(|settling| {
            AmqpAcker::boxed(delivery.delivery_tag, delivery.acker, settling.clone())
        }),
        body: delivery.data,
    }
}

/// The first name or property of a delivery whose bytes are not UTF-8
/// (the broker passes any bytes through; the patched parser in `vendor/`
/// keeps them instead of failing the connection).
pub(crate) fn not_utf8(
    exchange: &lapin::types::ShortString,
    routing_key: &lapin::types::ShortString,
    p: &BasicProperties,
) -> Option<&'static str> {
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
        return Some(name);
    }
    p.headers()
        .as_ref()
        .is_some_and(|h| !table_is_utf8(h, 0))
        .then_some("headers")
}

/// The `traceparent` header of `headers`, as text (a long or a short
/// string: senders use either).
fn traceparent(headers: &FieldTable) -> Option<String> {
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

/// Whether every key (and short-string value) of `table` and the tables
/// in it is UTF-8; nesting past 16 levels counts as not.
fn table_is_utf8(table: &FieldTable, depth: u8) -> bool {
    use lapin::types::AMQPValue;
    fn value_is_utf8(v: &AMQPValue, depth: u8) -> bool {
        match v {
            AMQPValue::ShortString(s) => s.is_utf8(),
            AMQPValue::FieldTable(t) => table_is_utf8(t, depth + 1),
            AMQPValue::FieldArray(a) => a.as_slice().iter().all(|v| value_is_utf8(v, depth + 1)),
            _ => true,
        }
    }
    depth < 16
        && table
            .inner()
            .iter()
            .all(|(k, v)| k.is_utf8() && value_is_utf8(v, depth))
}

/// Queue arguments as an AMQP field table.
pub(super) fn field_table(arguments: &QueueArguments) -> FieldTable {
    use crate::config::QueueArgument;
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
    if let Some(traceparent) = m.traceparent {
        let mut headers = FieldTable::default();
        headers.insert(
            crate::trace::HEADER.into(),
            lapin::types::AMQPValue::LongString(traceparent.into()),
        );
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
        .map_err(|e| lapin_error(format!("publishing to `{}`", m.routing_key), &e))
}
