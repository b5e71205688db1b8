//! W3C trace context (`traceparent`) across services: read from each
//! request, given to its handler and its logs, copied onto its reply, and
//! carried on to the handler's own requests as their parent.
//!
//! Only the `traceparent` header is kept; `tracestate` is vendor data the
//! host has no use for. A header that does not parse is treated as absent
//! (the specification's rule), so a request with a broken one starts a
//! trace of its own.

use std::fmt;

/// The header's name, on AMQP headers and in kombu's `headers`.
pub const HEADER: &str = "traceparent";

/// The longest header read: version 00 is 55 bytes; later versions may
/// append fields, which are ignored. Transports drop a longer one before
/// copying it.
pub const MAX_HEADER: usize = 256;

/// One span's place in a trace: the trace it belongs to, its own id and the
/// trace flags (bit 0: sampled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: u128,
    span_id: u64,
    flags: u8,
}

impl TraceContext {
    /// Reads a `traceparent` header; `None` when it is not one.
    pub fn parse(header: &str) -> Option<Self> {
        let h = header.trim_matches([' ', '\t']);
        if h.len() > MAX_HEADER || h.len() < 55 || !h.is_ascii() {
            return None;
        }
        let b = h.as_bytes();
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = hex(&h[0..2])? as u8;
        // Version ff is forbidden; 00 is exactly 55 bytes; a later version
        // may carry more fields after a dash.
        if version == 0xff || (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
            return None;
        }
        let trace_id = hex(&h[3..35])?;
        let span_id = hex(&h[36..52])? as u64;
        let flags = hex(&h[53..55])? as u8;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A span of its own for work done on behalf of `parent`: in its trace,
    /// with its flags, or the root of a new, sampled trace.
    pub fn child_of(parent: Option<&Self>) -> Self {
        let span_id = fastrand::u64(1..);
        match parent {
            Some(p) => Self {
                trace_id: p.trace_id,
                span_id,
                flags: p.flags,
            },
            None => Self {
                trace_id: fastrand::u128(1..),
                span_id,
                flags: 0x01,
            },
        }
    }

    /// The trace id: 32 lowercase hex digits when displayed.
    pub fn trace_id(&self) -> TraceId {
        TraceId(self.trace_id)
    }

    /// The `traceparent` header naming this span.
    pub fn header(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

/// A trace id, shown as the 32 hex digits of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceId(u128);

impl TraceId {
    /// Its 128 bits.
    pub fn value(self) -> u128 {
        self.0
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Lowercase hex only, as the specification requires.
fn hex(s: &str) -> Option<u128> {
    if !s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u128::from_str_radix(s, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_header_reads_back_as_it_was_written() {
        let t = TraceContext::parse(GOOD).expect("valid");
        assert_eq!(t.header(), GOOD);
        assert_eq!(t.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn invalid_headers_are_absent() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é",
            "0é-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_may_carry_more_fields() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-next";
        assert!(TraceContext::parse(later).is_some());
        let glued = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x";
        assert_eq!(TraceContext::parse(glued), None);
    }

    #[test]
    fn a_child_keeps_the_trace_and_flags_with_a_span_of_its_own() {
        let parent = TraceContext::parse(GOOD).expect("valid");
        let child = TraceContext::child_of(Some(&parent));
        assert_eq!(child.trace_id(), parent.trace_id());
        assert_ne!(child.span_id, parent.span_id);
        assert_eq!(child.flags, parent.flags);
        let root = TraceContext::child_of(None);
        assert_ne!(root.trace_id(), parent.trace_id());
        assert_eq!(TraceContext::parse(&root.header()), Some(root));
    }
}
