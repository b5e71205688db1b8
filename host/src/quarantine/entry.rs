//! What the quarantine keeps of one request, as stored on the bus: a JSON
//! document per entry, the body as base64 so that its bytes come back as
//! given, UTF-8 or not. Pure: no I/O, tested alone.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::bus::Incoming;

/// The format of [`Entry`]: an entry of another version is shown as
/// unreadable rather than misread.
pub const FORMAT: u32 = 1;

/// The largest entry read back: the body at `max_message_bytes` (16 MiB by
/// default) as base64, and room for the rest. An entry past it is skipped
/// unparsed.
pub const MAX_ENTRY_BYTES: usize = 64 * 1024 * 1024;

/// Why a request was quarantined (counted in `/metrics` by reason).
pub use crate::metrics::QuarantineReason as Reason;

/// One quarantined request, as stored. The same request quarantined again
/// by the same process is stored again with a higher `count`: the latest
/// entry of a fingerprint supersedes the earlier ones of its `origin`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// [`FORMAT`].
    pub format: u32,
    /// The fingerprint: service, routing key and body (see
    /// [`fingerprint`]), as 16 hex digits.
    pub fingerprint: String,
    /// The process that stored it (its repeats are counted per process).
    pub origin: String,
    /// The service.
    pub service: String,
    /// The queue it came from.
    pub queue: String,
    /// Its routing key.
    pub routing_key: String,
    /// The method (the routing key's last segment).
    pub method: String,
    /// Why.
    pub reason: Reason,
    /// What the host said about it (the refusal, the panic's message).
    pub detail: String,
    /// When it was first quarantined by `origin`, ms since the Unix epoch.
    pub first_ms: u64,
    /// When it was last quarantined by `origin`.
    pub last_ms: u64,
    /// How many times `origin` quarantined it.
    pub count: u64,
    /// The body, base64 (standard, padded): the bytes as given.
    pub body_base64: String,
    /// Its exchange.
    pub exchange: String,
    /// `reply_to`.
    pub reply_to: Option<String>,
    /// `correlation_id`, base64.
    pub correlation_id_base64: Option<String>,
    /// The `traceparent` header as sent.
    pub traceparent: Option<String>,
    /// The `deadline` header.
    pub deadline: Option<u64>,
    /// Whether the broker had delivered it before.
    pub redelivered: bool,
    /// The worker's last log lines about it (see
    /// [`super::capture`]), oldest first, as logged: escape and redact
    /// them to show them. Absent from entries stored before it was kept
    /// (read as none).
    #[serde(default)]
    pub log: Vec<String>,
}

/// A request's fingerprint: FNV-1a (stable across processes and builds,
/// unlike `DefaultHasher`) over the service, the routing key and the body
/// without its JSON-RPC `id`, each part with its length. The id is the
/// caller's bookkeeping: the same poison sent by a thousand callers, or
/// retried, is one fingerprint; a body that is not a JSON-RPC request is
/// taken whole.
pub fn fingerprint(service: &str, routing_key: &str, body: &[u8]) -> u64 {
    let mut holder = None;
    let id = match crate::protocol::parse_request(body, routing_key, &mut holder) {
        Ok(request) => request.id_json,
        Err(rejected) => rejected.id_json,
    };
    // The id's place in the body, when it was read from it (not from a
    // body encoded twice, nor the "null" of a request without one).
    let (start, base) = (id.as_ptr() as usize, body.as_ptr() as usize);
    if start >= base && start + id.len() <= base + body.len() {
        let at = start - base;
        let (before, after) = (&body[..at], &body[at + id.len()..]);
        return fnv(&[service.as_bytes(), routing_key.as_bytes(), before, after]);
    }
    fnv(&[service.as_bytes(), routing_key.as_bytes(), body])
}

fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in (part.len() as u64).to_le_bytes().iter().chain(*part) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl Entry {
    /// The entry for `incoming`, first quarantined now by `origin`.
    pub fn of(
        service: &str,
        queue: &str,
        incoming: &Incoming,
        reason: Reason,
        detail: &str,
        origin: &str,
        now_ms: u64,
    ) -> Self {
        let fp = fingerprint(service, &incoming.routing_key, &incoming.body);
        Self {
            format: FORMAT,
            fingerprint: format!("{fp:016x}"),
            origin: origin.to_owned(),
            service: service.to_owned(),
            queue: queue.to_owned(),
            routing_key: incoming.routing_key.clone(),
            method: crate::protocol::method_of(&incoming.routing_key).to_owned(),
            reason,
            detail: detail.to_owned(),
            first_ms: now_ms,
            last_ms: now_ms,
            count: 1,
            body_base64: b64().encode(&incoming.body),
            exchange: incoming.exchange.clone(),
            reply_to: incoming.reply_to.clone(),
            correlation_id_base64: incoming.correlation_id.as_ref().map(|c| b64().encode(c)),
            traceparent: incoming.traceparent.clone(),
            deadline: incoming.deadline,
            redelivered: incoming.redelivered,
            log: Vec::new(),
        }
    }

    /// Its stored form.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// An entry read back; `None` if it is not one (too large, not JSON,
    /// another format).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() > MAX_ENTRY_BYTES {
            return None;
        }
        serde_json::from_slice::<Self>(bytes)
            .ok()
            .filter(|e| e.format == FORMAT)
    }

    /// The body's bytes, as given.
    pub fn body(&self) -> Vec<u8> {
        b64().decode(&self.body_base64).unwrap_or_default()
    }

    /// The correlation id's bytes.
    pub fn correlation_id(&self) -> Option<Vec<u8>> {
        self.correlation_id_base64
            .as_ref()
            .and_then(|c| b64().decode(c).ok())
    }

    /// The trace id of its `traceparent`, if it has a valid one.
    pub fn trace_id(&self) -> Option<String> {
        let parsed = self
            .traceparent
            .as_deref()
            .and_then(crate::trace::TraceContext::parse)?;
        Some(parsed.trace_id().to_string())
    }

    /// Its id for the commands: `<queue>:<fingerprint>`.
    pub fn id(&self) -> String {
        format!("{}:{}", self.queue, self.fingerprint)
    }
}

/// An id of the commands: the quarantine's queue, and the fingerprint.
pub fn parse_id(id: &str) -> Option<(&str, &str)> {
    let (queue, fp) = id.rsplit_once(':')?;
    let hex = fp.len() == 16 && fp.bytes().all(|b| b.is_ascii_hexdigit());
    (hex && !queue.is_empty()).then_some((queue, fp))
}

/// One fingerprint of a quarantine, as `list` shows it: its latest entry,
/// with the count summed over the processes that stored it.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The latest entry (its `count` is that of its own process).
    pub latest: Entry,
    /// How many times it was quarantined, every process together.
    pub count: u64,
    /// When it was first quarantined.
    pub first_ms: u64,
}

/// The entries of a quarantine, one per fingerprint, the most recent
/// first: per process the highest count wins (later entries supersede),
/// summed over processes.
pub fn summarize(entries: impl IntoIterator<Item = Entry>) -> Vec<Summary> {
    use std::collections::BTreeMap;
    let mut by_fp: BTreeMap<String, (Entry, BTreeMap<String, u64>, u64)> = BTreeMap::new();
    for e in entries {
        let slot = by_fp
            .entry(e.fingerprint.clone())
            .or_insert_with(|| (e.clone(), BTreeMap::new(), e.first_ms));
        let per_origin = slot.1.entry(e.origin.clone()).or_default();
        *per_origin = (*per_origin).max(e.count);
        slot.2 = slot.2.min(e.first_ms);
        if (e.last_ms, e.count) >= (slot.0.last_ms, slot.0.count) {
            slot.0 = e;
        }
    }
    let mut out: Vec<Summary> = by_fp
        .into_values()
        .map(|(latest, origins, first_ms)| Summary {
            count: origins.values().sum(),
            latest,
            first_ms,
        })
        .collect();
    out.sort_by_key(|s| std::cmp::Reverse(s.latest.last_ms));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(body: &[u8]) -> Incoming {
        Incoming {
            exchange: "commissaire".into(),
            routing_key: "demo.abort".into(),
            body: body.to_vec(),
            reply_to: Some("r".into()),
            correlation_id: Some(vec![0xff, 1]),
            malformed: None,
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            deadline: None,
            redelivered: true,
            settlement: None,
        }
    }

    #[test]
    fn an_entry_keeps_the_bytes_as_given() {
        let body = b"{\"id\":1}\xff\x00";
        let e = Entry::of("demo", "demo", &incoming(body), Reason::Poison, "d", "o", 5);
        let back = Entry::from_bytes(&e.to_bytes()).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.body(), body);
        assert_eq!(back.correlation_id(), Some(vec![0xff, 1]));
        assert_eq!(back.method, "abort");
        assert_eq!(
            back.trace_id().as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(parse_id(&e.id()), Some(("demo", e.fingerprint.as_str())));
    }

    #[test]
    fn an_entry_stored_before_log_lines_were_kept_reads_back() {
        let mut e = Entry::of("demo", "demo", &incoming(b"{}"), Reason::Panic, "d", "o", 5);
        e.log = vec!["a line".into()];
        let mut stored: serde_json::Value = serde_json::from_slice(&e.to_bytes()).unwrap();
        stored.as_object_mut().unwrap().remove("log");
        let old = Entry::from_bytes(&serde_json::to_vec(&stored).unwrap()).unwrap();
        assert!(old.log.is_empty());
        assert_eq!(
            Entry {
                log: e.log.clone(),
                ..old
            },
            e
        );
    }

    #[test]
    fn what_is_not_an_entry_is_not_read() {
        assert!(Entry::from_bytes(b"not json").is_none());
        assert!(Entry::from_bytes(b"{\"format\":2}").is_none());
        assert!(parse_id("demo:xyz").is_none());
        assert!(parse_id(":0123456789abcdef").is_none());
        assert_eq!(
            parse_id("a:b:0123456789abcdef"),
            Some(("a:b", "0123456789abcdef"))
        );
    }

    #[test]
    fn fingerprints_tell_service_key_and_body_apart() {
        let a = fingerprint("s", "s.m", b"x");
        assert_eq!(a, fingerprint("s", "s.m", b"x"));
        assert_ne!(a, fingerprint("s", "s.m", b"y"));
        assert_ne!(a, fingerprint("t", "s.m", b"x"));
        // Lengths are hashed: moving bytes between parts changes it.
        assert_ne!(fingerprint("ab", "c", b""), fingerprint("a", "bc", b""));
        // The caller's id is not the request's.
        let call = |id: &str, params: &str| {
            let body = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"m","params":{params}}}"#);
            fingerprint("s", "s.m", body.as_bytes())
        };
        assert_eq!(call("1", "[1]"), call("\"other\"", "[1]"));
        assert_ne!(call("1", "[1]"), call("1", "[2]"));
        assert_ne!(call("1", "[1]"), call("1", "[1 ]"));
    }

    #[test]
    fn a_summary_takes_the_latest_per_process_and_adds_processes_up() {
        let base = Entry::of(
            "demo",
            "demo",
            &incoming(b"{}"),
            Reason::Panic,
            "d",
            "p1",
            10,
        );
        let mut later = base.clone();
        (later.count, later.last_ms) = (40, 20);
        let mut other = base.clone();
        (other.origin, other.count, other.last_ms) = ("p2".into(), 2, 15);
        let different = Entry::of(
            "demo",
            "demo",
            &incoming(b"[]"),
            Reason::Panic,
            "d",
            "p1",
            30,
        );
        let list = summarize([base, later.clone(), other, different.clone()]);
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].latest, different);
        assert_eq!(list[1].latest, later);
        assert_eq!(list[1].count, 42);
        assert_eq!(list[1].first_ms, 10);
    }
}
