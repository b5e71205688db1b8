//! Entry points for the fuzz targets in `fuzz/`: not an API (hidden from
//! the docs, changed at will). Each wraps, without copying, a decoder of
//! outside bytes that is private to its module, so that the targets
//! exercise exactly the code the host runs.

use lapin::types::ShortString;
use lapin::BasicProperties;

/// A kombu envelope as the Redis consumer reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// `properties.delivery_info.exchange`.
    pub exchange: String,
    /// `properties.delivery_info.routing_key`.
    pub routing_key: String,
    /// The body, base64-decoded when `body_encoding` says so.
    pub body: Vec<u8>,
    /// `properties.reply_to`.
    pub reply_to: Option<String>,
    /// `properties.correlation_id`.
    pub correlation_id: Option<String>,
    /// Marked redelivered (by kombu's restore or ours).
    pub redelivered: bool,
}

/// Reads a Redis envelope as the consumer does; `Err` says why it is
/// dropped.
pub fn read_redis_envelope(raw: &str) -> Result<Envelope, String> {
    crate::bus::redis::envelope::read_envelope(raw).map(|r| Envelope {
        exchange: r.exchange,
        routing_key: r.routing_key,
        body: r.body,
        reply_to: r.reply_to,
        correlation_id: r.correlation_id,
        redelivered: r.redelivered,
    })
}

/// Marks a parsed envelope redelivered, as a restore does.
pub fn mark_redelivered(payload: &mut serde_json::Value) {
    crate::bus::redis::envelope::mark_redelivered(payload);
}

/// What makes an AMQP delivery's properties unreadable: a name or
/// property whose bytes are not UTF-8, or headers nested too deep (such a
/// request is refused before it is parsed).
pub fn amqp_malformed(
    exchange: &ShortString,
    routing_key: &ShortString,
    properties: &BasicProperties,
) -> Option<crate::bus::Malformed> {
    crate::bus::amqp::malformed(exchange, routing_key, properties)
}
