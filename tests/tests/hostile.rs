//! The hostile-input catalogue (issue 14): inputs chosen to hurt a
//! decoder, each sent to the real binary over a real broker. Each gets the
//! answer docs/protocol.md gives (one reply, or one logged drop), and the
//! host still answers an ordinary request afterwards, with nothing left
//! unacked.
//!
//! Bugs found while writing the fuzz targets (fuzz/) and by running them
//! are fixed with regression tests beside the code (`redact`,
//! `bus::topic`, `http`). Not covered here: a plugin printing lines that
//! look like the control protocol (`@commissaire …`) on its stdout, as no
//! plugin or fixture prints to stdout.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use commissaire_e2e::host::{
    http_get, redis_command, redis_uri, unique, AmqpCaller, HostSpec, ReplyQueue, Resp, TestHost,
};
use commissaire_host::bus::{redis::envelope, Outgoing};
use serde_json::value::RawValue;
use serde_json::{json, Value};

/// Redis database of this file's tests (each test file has its own).
const REDIS_DB: u8 = 4;

fn amqp_spec() -> HostSpec {
    let mut spec = HostSpec::amqp();
    spec.exchange = unique("fuzzcat-ex");
    spec.suffix = unique("fuzzcat-q");
    spec.plugins = vec!["simple"];
    spec
}

fn nested(depth: usize, inner: &str) -> String {
    format!("{}{inner}{}", "[".repeat(depth), "]".repeat(depth))
}

fn request_with(id: &str, params: &str, extra: &str) -> Vec<u8> {
    format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"add","params":{params}{extra}}}"#).into_bytes()
}

fn code(reply: &Value) -> i64 {
    reply["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error: {:.300}", reply.to_string()))
}

/// What PROTOCOL.md answers to a body.
enum Want {
    /// A result (`simple.add` of 1 and 2), the id echoed as it was written.
    Result(String),
    /// An error with this code and id.
    Error(i64, Value),
}

/// A reply's members, read without `serde_json::Value`, which cannot hold
/// every id a request may carry (`1e400`).
type RawReply = BTreeMap<String, Box<RawValue>>;

/// Every body gets exactly one reply with the code and id PROTOCOL.md
/// gives; an ordinary request is answered after each.
#[test]
fn hostile_bodies_over_amqp_get_one_reply_each() {
    let spec = amqp_spec();
    let exchange = spec.exchange.clone();
    let host = TestHost::start(spec);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let caller = AmqpCaller::connect(&exchange).await;
        let big_id = format!("\"{}\"", "i".repeat(10 * 1024 * 1024));
        let zeros = format!("[{}0]", "0,".repeat(10 * 1024 * 1024));
        // "`id` is any JSON scalar": accepted and echoed as written, even
        // a number no f64 holds. Valid JSON nested deeper than a parser's
        // recursion limit is still valid JSON: an `id` that is an array is
        // not a request (-32600), deep `params` do not fit the handler
        // (-32602), and an ignored member is ignored.
        let cases: Vec<(&str, Vec<u8>, Want)> = vec![
            (
                "an id of 10 MB",
                request_with(&big_id, "[1,2]", ""),
                Want::Result(big_id.clone()),
            ),
            (
                "id true",
                request_with("true", "[1,2]", ""),
                Want::Result("true".into()),
            ),
            (
                "id 1e400",
                request_with("1e400", "[1,2]", ""),
                Want::Result("1e400".into()),
            ),
            (
                "an id nested 10,000 deep",
                request_with(&nested(10_000, "1"), "[1,2]", ""),
                Want::Error(-32600, Value::Null),
            ),
            (
                "params nested 10,000 deep",
                request_with("1", &nested(10_000, ""), ""),
                Want::Error(-32602, json!(1)),
            ),
            (
                "an ignored member nested 100,000 deep",
                request_with("1", "[1,2]", &format!(",\"x\":{}", nested(100_000, ""))),
                Want::Result("1".into()),
            ),
            (
                "an empty body",
                Vec::new(),
                Want::Error(-32700, Value::Null),
            ),
            (
                "a 20 MB params array (over max_message_bytes)",
                request_with("1", &zeros, ""),
                Want::Error(-32600, Value::Null),
            ),
        ];
        for (what, body, want) in cases {
            let cid = unique("fuzzcat-cid");
            let (raw, reply) = tokio::time::timeout(
                Duration::from_secs(60),
                caller.call_raw("simple.add", &body, ReplyQueue::DirectReplyTo, Some(&cid)),
            )
            .await
            .unwrap_or_else(|_| panic!("{what}: no reply within 60 s"));
            assert_eq!(
                reply.correlation_id.as_deref(),
                Some(cid.as_str()),
                "{what}"
            );
            let shown = String::from_utf8_lossy(&raw[..raw.len().min(300)]).into_owned();
            match want {
                Want::Result(id) => {
                    let got: RawReply = serde_json::from_slice(&raw)
                        .unwrap_or_else(|e| panic!("{what}: {e}: {shown}"));
                    let member = |name: &str| got.get(name).map(|v| v.get());
                    assert_eq!(member("result"), Some("3"), "{what}: {shown}");
                    assert!(
                        member("id") == Some(id.as_str()),
                        "{what}: id not echoed: {shown}"
                    );
                }
                Want::Error(want_code, want_id) => {
                    let body: Value = serde_json::from_slice(&raw)
                        .unwrap_or_else(|e| panic!("{what}: {e}: {shown}"));
                    assert_eq!(code(&body), want_code, "{what}: {shown}");
                    assert_eq!(body["id"], want_id, "{what}");
                }
            }
            let ok = caller
                .call(
                    "simple.add",
                    &request_with("\"after\"", "[40,2]", ""),
                    ReplyQueue::DirectReplyTo,
                    Some("after"),
                )
                .await;
            assert_eq!(ok.body["result"], 42, "after {what}: {}", ok.body);
        }
        caller.close().await;
    });
    drop(host);
}

fn redis_spec() -> HostSpec {
    let mut spec = HostSpec::redis(REDIS_DB);
    spec.exchange = unique("fuzzcat-ex");
    spec.suffix = unique("fuzzcat-q");
    spec.plugins = vec!["simple"];
    spec
}

/// Waits for one message on the list `reply_to` and returns its body.
fn reply_on(uri: &str, list: &str, limit: Duration) -> Option<Value> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Resp::Str(raw) = redis_command(uri, &["RPOP", list]) {
            let v: Value = serde_json::from_str(&raw).expect("an envelope");
            let body = v["body"].as_str().expect("a body");
            let decoded = base64_decode(body);
            return Some(serde_json::from_slice(&decoded).expect("a JSON reply"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64")
}

fn kombu_envelope(spec: &HostSpec, body: &[u8], reply_to: Option<&str>) -> Value {
    let text = envelope(&Outgoing {
        exchange: &spec.exchange,
        routing_key: "simple.add",
        body,
        reply_to,
        correlation_id: None,
        durable: true,
        confirm: false,
        expires: None,
        traceparent: None,
        deadline: None,
        reply_ttl: None,
    });
    serde_json::from_str(&text).expect("envelope")
}

/// Envelopes kombu would never write: each is dropped once (logged) or
/// answered once, and then the host still serves, with nothing unacked.
#[test]
fn hostile_redis_envelopes_are_answered_or_dropped_once() {
    let uri = redis_uri(REDIS_DB, "");
    let spec = redis_spec();
    let queue = spec.queue("simple");
    let host = TestHost::start(spec.clone());
    let good = br#"{"jsonrpc":"2.0","id":1,"method":"add","params":[1,2]}"#;
    let push = |v: &Value| {
        redis_command(&uri, &["LPUSH", &queue, &v.to_string()]);
    };

    // Dropped: no `properties`; a numeric `delivery_tag`.
    let mut no_properties = kombu_envelope(&spec, good, Some("x"));
    no_properties
        .as_object_mut()
        .expect("object")
        .remove("properties");
    push(&no_properties);
    let mut numeric_tag = kombu_envelope(&spec, good, Some("x"));
    numeric_tag["properties"]["delivery_tag"] = json!(5);
    push(&numeric_tag);

    // Headers nested 100,000 deep (serde_json reads 128 levels at most, so
    // nothing recurses further): not an envelope, dropped once. Written as
    // text: a `Value` that deep would overflow the stack being printed.
    let plain = kombu_envelope(&spec, good, Some("x")).to_string();
    let at = plain.find("\"headers\":{").expect("headers") + "\"headers\":{".len();
    let comma = if plain[at..].starts_with('}') {
        ""
    } else {
        ","
    };
    let deep_headers = format!(
        "{}\"deep\":{}1{}{comma}{}",
        &plain[..at],
        "[".repeat(100_000),
        "]".repeat(100_000),
        &plain[at..]
    );
    assert!(deep_headers.len() > 200_000, "the headers were not nested");
    redis_command(&uri, &["LPUSH", &queue, &deep_headers]);

    // Params nested 100,000 deep: the host hands params on as raw JSON
    // without walking them, and the handler's binding (serde_json, 128
    // levels at most) refuses them: one -32602, no stack overflow.
    let deep_reply = unique("fuzzcat-reply");
    let deep_body = format!(
        r#"{{"jsonrpc":"2.0","id":7,"method":"add","params":{}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    push(&kombu_envelope(
        &spec,
        deep_body.as_bytes(),
        Some(&deep_reply),
    ));
    let reply =
        reply_on(&uri, &deep_reply, Duration::from_secs(15)).expect("a reply to a deep body");
    assert_eq!((code(&reply), &reply["id"]), (-32602, &json!(7)), "{reply}");

    // `reply_to: 5` is no reply address: handled as a notification.
    let mut numeric_reply_to = kombu_envelope(&spec, good, None);
    numeric_reply_to["properties"]["reply_to"] = json!(5);
    push(&numeric_reply_to);

    // Invalid base64: the body goes on as it is, and is not JSON: -32700.
    let invalid = unique("fuzzcat-reply");
    let mut bad_base64 = kombu_envelope(&spec, good, Some(&invalid));
    bad_base64["body"] = json!("!!!not base64");
    push(&bad_base64);
    let reply = reply_on(&uri, &invalid, Duration::from_secs(15)).expect("a reply to bad base64");
    assert_eq!(code(&reply), -32700, "{reply}");

    // Two messages sharing one delivery tag: both answered.
    let twins = unique("fuzzcat-reply");
    let first = kombu_envelope(&spec, good, Some(&twins));
    let mut second = kombu_envelope(
        &spec,
        br#"{"jsonrpc":"2.0","id":2,"method":"add","params":[2,2]}"#,
        Some(&twins),
    );
    second["properties"]["delivery_tag"] = first["properties"]["delivery_tag"].clone();
    push(&first);
    push(&second);
    let mut results: Vec<i64> = (0..2)
        .map(|_| {
            let r = reply_on(&uri, &twins, Duration::from_secs(15)).expect("a reply to each twin");
            r["result"].as_i64().expect("a result")
        })
        .collect();
    results.sort_unstable();
    assert_eq!(results, [3, 4]);

    // Still serving, and nothing left behind: the queue is empty, nothing
    // is unacked, each unreadable envelope was logged once.
    let after = unique("fuzzcat-reply");
    push(&kombu_envelope(&spec, good, Some(&after)));
    let reply = reply_on(&uri, &after, Duration::from_secs(15)).expect("an ordinary reply");
    assert_eq!(reply["result"], 3);
    assert_eq!(redis_command(&uri, &["LLEN", &queue]).int(), 0);
    let started = Instant::now();
    while redis_command(&uri, &["HLEN", "unacked"]).int() != 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "deliveries left unacked"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Each unreadable envelope counted, and logged once per 10 s and
    // worker (two of them here), not once each.
    let counted = "commissaire_not_an_envelope_dropped_total{service=\"simple\"} 3";
    let started = Instant::now();
    loop {
        let (_, scrape) = http_get(host.http, "/metrics").expect("GET /metrics");
        let text = scrape.as_str().unwrap_or_default().to_owned();
        if text.lines().any(|l| l == counted) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "never `{counted}`:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = host.stderr();
    let lines = log
        .matches("not a kombu envelope: dropped without a reply")
        .count();
    assert!((1..=2).contains(&lines), "{lines} lines:\n{log}");
    for key in [&invalid, &twins, &after, &deep_reply] {
        redis_command(&uri, &["DEL", key]);
    }
    drop(host);
}

/// A bus URI whose password holds URI delimiters: nothing of the password
/// in any log line, though the connection is refused and retried.
#[test]
fn passwords_with_delimiters_never_reach_the_log() {
    // Pieces no log line would hold by chance.
    for password in ["Qz7/Wk3?Xv9#Jm2@Pt5", "Rb8;Hn4@Cx6/?#Lq1"] {
        let mut spec = amqp_spec();
        spec.bus_uri = format!("amqp://guest:{password}@127.0.0.1:5672/%2f");
        let mut host = TestHost::start_expecting_failure(spec, "");
        std::thread::sleep(Duration::from_secs(3));
        host.signal("TERM");
        let _ = host.wait(Duration::from_secs(10));
        let log = host.stderr();
        assert!(!log.is_empty(), "the host logged nothing");
        for piece in password
            .split(['/', ';', '?', '#', '@'])
            .filter(|p| !p.is_empty())
        {
            assert!(
                !log.contains(piece),
                "`{piece}` of the password logged: {log}"
            );
        }
    }
}
