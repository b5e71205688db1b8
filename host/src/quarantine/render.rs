//! What the `quarantine` commands print. Everything in an entry came from
//! outside: control characters are escaped, passwords and tokens in a JSON
//! body replaced. Pure.

use std::fmt::Write as _;

use super::entry::{Entry, Summary};

/// Keys whose values `show` never prints (a key containing one of these,
/// any case).
const SECRET_KEYS: [&str; 8] = [
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "authorization",
    "credential",
];

/// What a secret's value is shown as.
pub const REDACTED: &str = "«redacted»";

pub use crate::redact::escape;

/// Bytes that may not be UTF-8, escaped: valid text as [`escape`], other
/// bytes as `\xNN`.
pub fn escape_bytes(bytes: &[u8], keep_newlines: bool) -> String {
    let mut out = String::new();
    for chunk in bytes.utf8_chunks() {
        out.push_str(&escape(chunk.valid(), keep_newlines));
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// `value` with the values of secret keys replaced, and passwords in
/// URIs removed.
pub fn redact(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let key = k.to_ascii_lowercase();
                if SECRET_KEYS.iter().any(|s| key.contains(s)) {
                    *v = Value::String(REDACTED.to_owned());
                } else {
                    redact(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        Value::String(s) if s.contains("://") => *s = crate::redact::redact_uri(s),
        _ => {}
    }
}

/// A body as `show` prints it: JSON pretty-printed and redacted, other
/// bytes escaped.
pub fn body(bytes: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(mut value) => {
            redact(&mut value);
            let pretty = serde_json::to_string_pretty(&value).unwrap_or_default();
            escape(&pretty, true)
        }
        Err(_) => escape_bytes(bytes, false),
    }
}

/// A log line as `show` prints it: the values of fields whose names are
/// secret (`password=…`, quoted or not) replaced, passwords in URIs
/// removed, control characters escaped.
pub fn log_line(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while !rest.is_empty() {
        let end = rest.find(' ').map_or(rest.len(), |at| at + 1);
        let token = &rest[..end];
        match token.split_once('=') {
            Some((key, value)) if is_secret(key) => {
                out.push_str(key);
                out.push('=');
                out.push_str(REDACTED);
                // A quoted value runs to its closing quote, spaces and all.
                let skip = if value.starts_with('"') {
                    quoted_len(&rest[key.len() + 1..])
                } else {
                    token.trim_end().len() - key.len() - 1
                };
                rest = &rest[key.len() + 1 + skip..];
                continue;
            }
            _ if token.contains("://") => {
                let uri = token.trim_end();
                out.push_str(&crate::redact::redact_uri(uri));
                out.push_str(&token[uri.len()..]);
            }
            _ => out.push_str(token),
        }
        rest = &rest[end..];
    }
    escape(&out, false)
}

fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_KEYS.iter().any(|s| key.contains(s))
}

/// The length of the Debug-quoted string `text` opens with (to its
/// unescaped closing quote, or all of it).
fn quoted_len(text: &str) -> usize {
    let mut escaped = false;
    for (at, c) in text.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return at + 1,
            _ => {}
        }
    }
    text.len()
}

/// A time in ms since the Unix epoch, as `2026-12-07T15:27:47.123Z`.
pub fn utc(ms: u64) -> String {
    let (days, rest) = ((ms / 86_400_000) as i64, ms % 86_400_000);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, min, s, milli) = (
        rest / 3_600_000,
        rest / 60_000 % 60,
        rest / 1000 % 60,
        rest % 1000,
    );
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

/// One line of `list`: id, last time, reason, method, body size, trace id
/// and count.
pub fn list_line(s: &Summary) -> String {
    let e = &s.latest;
    let size = base64_len(&e.body_base64);
    format!(
        "{}  {}  {:<7}  {}  {} B  trace {}  count {}",
        escape(&e.id(), false),
        utc(e.last_ms),
        e.reason.as_str(),
        escape(&e.method, false),
        size,
        e.trace_id().unwrap_or_else(|| "-".to_owned()),
        s.count
    )
}

fn base64_len(b64: &str) -> usize {
    let pad = b64.bytes().rev().take_while(|b| *b == b'=').count();
    (b64.len() / 4 * 3).saturating_sub(pad)
}

/// `show`: the request in full.
pub fn show(s: &Summary) -> String {
    let e = &s.latest;
    let bytes = e.body();
    let opt = |o: &Option<String>| o.as_deref().map_or("-".to_owned(), |v| escape(v, false));
    let mut out = String::new();
    let _ = writeln!(out, "id:             {}", escape(&e.id(), false));
    let _ = writeln!(out, "service:        {}", escape(&e.service, false));
    let _ = writeln!(out, "reason:         {}", e.reason.as_str());
    let _ = writeln!(out, "detail:         {}", escape(&e.detail, false));
    let _ = writeln!(out, "count:          {}", s.count);
    let _ = writeln!(out, "first:          {}", utc(s.first_ms));
    let _ = writeln!(out, "last:           {}", utc(e.last_ms));
    let _ = writeln!(out, "exchange:       {}", escape(&e.exchange, false));
    let _ = writeln!(out, "routing key:    {}", escape(&e.routing_key, false));
    let _ = writeln!(out, "reply_to:       {}", opt(&e.reply_to));
    let correlation = e
        .correlation_id()
        .map_or("-".to_owned(), |c| escape_bytes(&c, false));
    let _ = writeln!(out, "correlation_id: {correlation}");
    let _ = writeln!(out, "traceparent:    {}", opt(&e.traceparent));
    let deadline = e.deadline.map_or("-".to_owned(), utc);
    let _ = writeln!(out, "deadline:       {deadline}");
    let _ = writeln!(out, "redelivered:    {}", e.redelivered);
    let _ = writeln!(out, "body ({} bytes):", bytes.len());
    out.push_str(&body(&bytes));
    out.push('\n');
    let plural = if e.log.len() == 1 { "" } else { "s" };
    let _ = writeln!(out, "log ({} line{plural}):", e.log.len());
    for line in &e.log {
        let _ = writeln!(out, "  {}", log_line(line));
    }
    out
}

/// The Rust type a plugin of `service` most likely has: its name in
/// CamelCase (`demo` → `Demo`, `word_count` → `WordCount`).
pub fn type_name(service: &str) -> String {
    service
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut cs = w.chars();
            cs.next()
                .map(|c| c.to_ascii_uppercase().to_string() + cs.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// `test`: a `#[test]` calling the handler through plugin-api's
/// `TestService` with exactly the request's params (their JSON text as
/// sent), for the plugin's own test suite. `None` if the body is not a
/// JSON-RPC request (the handler never saw it).
pub fn test(e: &Entry, service_type: &str) -> Option<String> {
    let bytes = e.body();
    let mut holder = None;
    let request = crate::protocol::parse_request(&bytes, &e.routing_key, &mut holder).ok()?;
    let method = request.method.to_string();
    let params = request.params;
    // A raw string needs one more `#` than the longest run after a quote.
    let mut hashes = 1;
    while params.contains(&format!("\"{}", "#".repeat(hashes))) {
        hashes += 1;
    }
    let h = "#".repeat(hashes);
    let ident: String = method
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let what = match e.reason {
        super::Reason::Poison => "crashed its worker",
        super::Reason::Panic => "panicked",
        super::Reason::Timeout => "timed out",
    };
    Some(format!(
        "/// Quarantined {when}: `{rk}` {what} ({count}×). From\n\
         /// `commissaire-host quarantine test {id}`.\n\
         #[test]\n\
         fn quarantined_{ident}_{fp}() {{\n\
         \x20   let svc = commissaire_plugin_api::testing::TestService::<{ty}>::new();\n\
         \x20   let params = r{h}\"{params}\"{h};\n\
         \x20   let answer = svc.call_raw({method:?}, params, Some(\"test-reply\"));\n\
         \x20   assert!(answer.is_ok(), \"{{answer:?}}\");\n\
         }}\n",
        when = utc(e.last_ms),
        rk = escape(&e.routing_key, false),
        count = e.count,
        id = escape(&e.id(), false),
        fp = e.fingerprint,
        ty = service_type,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn control_characters_and_overrides_are_escaped() {
        assert_eq!(
            escape("a\x1b[2Jb\u{202e}c\nd", false),
            "a\\u{1b}[2Jb\\u{202e}c\\nd"
        );
        assert_eq!(escape("a\nb", true), "a\nb");
        assert_eq!(escape_bytes(b"ok\xff\x00", false), "ok\\xff\\u{0}");
    }

    #[test]
    fn secrets_are_never_shown() {
        let shown = body(
            json!({"user": "u", "Password": "hunter2", "auth": {"api_token": "t0k"},
                   "uri": "amqp://guest:s3cret@h/", "list": [{"secret": 1}]})
            .to_string()
            .as_bytes(),
        );
        for secret in ["hunter2", "t0k", "s3cret", ": 1"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("\"user\": \"u\""), "{shown}");
    }

    #[test]
    fn log_lines_are_redacted_and_escaped() {
        let line = "2026-12-07T15:27:47.123Z ERROR demo: failed \x1b[2J password=\"a b\\\" c\" \
                    api_token=t0k uri=amqp://guest:s3cret@h/ n=1";
        let shown = log_line(line);
        for secret in ["a b", " c", "t0k", "s3cret", "\x1b"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(
            shown.contains("password=«redacted» api_token=«redacted» "),
            "{shown}"
        );
        assert!(shown.contains("uri=amqp://guest:***@h/ n=1"), "{shown}");
        assert!(shown.contains("failed \\u{1b}[2J"), "{shown}");
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(1_796_657_267_123), "2026-12-07T15:27:47.123Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn a_test_carries_the_params_as_sent() {
        let incoming = crate::bus::Incoming {
            exchange: "commissaire".into(),
            routing_key: "demo.echo".into(),
            body: br##"{"jsonrpc":"2.0","method":"echo","params":["a\"#b"],"id":1}"##.to_vec(),
            reply_to: None,
            correlation_id: None,
            malformed: None,
            traceparent: None,
            deadline: None,
            redelivered: false,
            settlement: None,
        };
        let e = Entry::of(
            "demo",
            "demo",
            &incoming,
            super::super::Reason::Panic,
            "",
            "o",
            0,
        );
        let t = test(&e, &type_name("demo")).unwrap();
        assert!(t.contains("TestService::<Demo>"), "{t}");
        assert!(t.contains(r###"r##"["a\"#b"]"##"###), "{t}");
        assert!(t.contains("call_raw(\"echo\""), "{t}");
        assert_eq!(type_name("word_count"), "WordCount");
    }
}
