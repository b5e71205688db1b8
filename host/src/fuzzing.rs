//! Entry points for the fuzz targets in `fuzz/`: not an API (hidden from
//! the docs, changed at will). Each wraps, without copying, a decoder of
//! outside bytes that is private to its module, so that the targets
//! exercise exactly the code the host runs.

use lapin::types::ShortString;
use lapin::BasicProperties;

/// Reads a Redis envelope as the consumer does (the delivery it holds,
/// unsettleable); `Err` says why it is dropped.
pub fn read_redis_envelope(raw: &str) -> Result<crate::bus::Incoming, String> {
    crate::bus::redis::envelope::read_envelope(raw)
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

/// The bytes of AMQP basic properties holding only headers, `depth` levels
/// deep: tables in tables (`{"a": {"a": ...}}`) with `leaf_key` -> void in
/// the innermost, or with `arrays` a table holding arrays in arrays (the
/// key cut to 255 bytes). Written backwards from the innermost level out
/// (each level's length is what lies inside it), then turned round: no
/// recursion, whatever the depth.
pub fn nested_headers(depth: usize, arrays: bool, leaf_key: &[u8]) -> Vec<u8> {
    let leaf_key = &leaf_key[..leaf_key.len().min(255)];
    let mut rev: Vec<u8> = Vec::new();
    let push = |rev: &mut Vec<u8>, bytes: &[u8]| rev.extend(bytes.iter().rev());
    if !arrays || depth <= 1 {
        let len = [u8::try_from(leaf_key.len()).unwrap_or(u8::MAX)];
        push(&mut rev, &[&len[..], leaf_key, b"V"].concat());
    }
    for level in (1..depth).rev() {
        let len = u32::try_from(rev.len()).unwrap_or(u32::MAX).to_be_bytes();
        push(&mut rev, &len);
        match (arrays, level) {
            (true, 1) => push(&mut rev, b"\x01aA"),
            (true, _) => push(&mut rev, b"A"),
            (false, _) => push(&mut rev, b"\x01aF"),
        }
    }
    let len = u32::try_from(rev.len()).unwrap_or(u32::MAX).to_be_bytes();
    push(&mut rev, &len);
    push(&mut rev, &0x2000u16.to_be_bytes());
    rev.reverse();
    rev
}
