//! What a reply is, as docs/protocol.md ("Reply", "Hostile input and
//! limits") and the README ("Traces") promise it, on the real binary and
//! brokers: published persistent as JSON, a reply over `max_message_bytes`
//! replaced by -32603, a handler's `respond` sent outside the request's
//! reply, and the caller's trace carried on HTTP `/rpc/*` and on Redis
//! replies.
//!
//! Redis: database 14, names of each test's own.

use std::time::Duration;

use base64::Engine as _;
use commissaire_e2e::host::{redis_command, unique, HostSpec, Resp, TestHost};
use commissaire_e2e::probe::{request, spec, RawCaller};
use serde_json::{json, Value};

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const PARENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

/// The Redis database of these tests.
const DB: u8 = 14;

fn redis_spec(plugins: &[&'static str]) -> HostSpec {
    HostSpec {
        bus_uri: commissaire_e2e::host::redis_uri(DB, ""),
        ..spec(plugins)
    }
}

/// (trace id, span id) of a version-00 `traceparent`.
fn ids(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "not a traceparent: {traceparent}");
    assert_eq!((parts[0], parts[1].len(), parts[2].len()), ("00", 32, 16));
    (parts[1].to_owned(), parts[2].to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_over_max_message_bytes_is_replaced_by_minus_32603_naming_its_size() {
    let mut spec = spec(&["demo"]);
    spec.bus_toml = "max_message_bytes = 1024\n".to_owned();
    // A greeting of 2000 characters makes every `greet` reply too large.
    spec.service_toml = format!("config = {{ greeting = \"{}\" }}\n", "g".repeat(2000));
    let host = TestHost::start(spec);
    let mut caller = RawCaller::connect(&host.spec.exchange).await;

    caller
        .send("demo.greet", &request("big", "greet", json!(["bob"])), None)
        .await;
    let reply = caller.next(Duration::from_secs(30)).await;
    assert_eq!(reply.body["id"], "big", "{}", reply.body);
    assert_eq!(reply.body["error"]["code"], -32603, "{}", reply.body);
    let message = reply.body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("the reply of ")
            && message.ends_with(" bytes exceeds max_message_bytes (1024)"),
        "{message}"
    );
    let size: usize = message
        .trim_start_matches("the reply of ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size in {message:?}"));
    assert!(size > 2000, "the size named is the reply's: {message}");
    assert!(
        host.stderr()
            .contains("reply too large: answering -32603 instead"),
        "one error line:\n{}",
        host.stderr()
    );

    // The request was settled, not dropped or left to come back: the
    // service goes on answering, and nothing else arrives for `big`.
    caller
        .send("demo.ping", &request("after", "ping", json!([])), None)
        .await;
    let next = caller.next(Duration::from_secs(30)).await;
    assert_eq!(next.body["id"], "after", "{}", next.body);
    assert_eq!(next.body["result"], "pong");
    caller.close().await;
    drop(host);
}

#[tokio::test(flavor = "multi_thread")]
async fn replies_are_persistent_and_json() {
    let host = TestHost::start(spec(&["simple"]));
    let mut caller = RawCaller::connect(&host.spec.exchange).await;
    caller
        .send("simple.add", &request("p", "add", json!([1, 2])), None)
        .await;
    let reply = caller.next(Duration::from_secs(30)).await;
    assert_eq!(reply.body["result"], 3, "{}", reply.body);
    assert_eq!(
        reply.properties.delivery_mode(),
        &Some(2),
        "replies are published persistent (delivery mode 2, as kombu does)"
    );
    assert_eq!(
        reply
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.to_string()),
        Some("application/json".to_owned())
    );
    // An error reply too.
    caller
        .send("simple.add", &request("e", "add", json!([1])), None)
        .await;
    let error = caller.next(Duration::from_secs(30)).await;
    assert_eq!(error.body["error"]["code"], -32602, "{}", error.body);
    assert_eq!(error.properties.delivery_mode(), &Some(2));
    caller.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_s_respond_reaches_the_queue_it_names_in_the_request_s_trace() {
    let host = TestHost::start(spec(&["demo"]));
    let mut caller = RawCaller::connect(&host.spec.exchange).await;
    // Another party's queue, as a job's requester would wait on.
    let mut waiting = RawCaller::connect(&host.spec.exchange).await;
    let params = json!([waiting.reply_queue(), {"done": true}]);
    caller
        .send(
            "demo.later",
            &request("job-1", "later", params),
            Some(PARENT),
        )
        .await;
    let reply = caller.next(Duration::from_secs(30)).await;
    assert_eq!(reply.body["result"], "responded", "{}", reply.body);

    let responded = waiting.next(Duration::from_secs(30)).await;
    assert_eq!(
        responded.body,
        json!({"jsonrpc": "2.0", "id": "job-1", "result": {"done": true}})
    );
    let on_respond = responded
        .header("traceparent")
        .expect("the response carries a traceparent");
    let (trace, span) = ids(&on_respond);
    assert_eq!(trace, PARENT_TRACE, "a child of the request's trace");
    assert_ne!(span, PARENT_SPAN);
    // Sent once: the caller got the reply only.
    assert!(
        caller
            .next_within(Duration::from_millis(500))
            .await
            .is_none(),
        "the response went to the queue it named, not to the caller"
    );
    caller.close().await;
    waiting.close().await;
}

#[test]
fn http_rpc_joins_the_caller_s_trace() {
    let host = TestHost::start(spec(&["demo"]));
    let body = request("h", "whoami", json!([])).to_string();
    let reply = commissaire_e2e::http::send(
        host.http,
        &format!(
            "POST /rpc/demo.whoami HTTP/1.1\r\nContent-Type: application/json\r\ntraceparent: {PARENT}"
        ),
        body.as_bytes(),
    );
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let result = &reply.body["result"];
    assert_eq!(result["trace_id"], PARENT_TRACE, "{}", reply.body);
    let (trace, span) = ids(result["traceparent"].as_str().expect("a traceparent"));
    assert_eq!(trace, PARENT_TRACE);
    assert_ne!(
        span, PARENT_SPAN,
        "the handler runs in a span of the host's"
    );

    // Without the header, a trace of its own.
    let reply = commissaire_e2e::http::send(
        host.http,
        "POST /rpc/demo.whoami HTTP/1.1\r\nContent-Type: application/json",
        body.as_bytes(),
    );
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let trace = reply.body["result"]["trace_id"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(trace.len(), 32, "{}", reply.body);
    assert_ne!(trace, PARENT_TRACE);
}

/// A kombu envelope of `body` for `routing_key` on `exchange`, as
/// kombu's `Producer.publish` makes it, with `headers`.
fn kombu_envelope(
    exchange: &str,
    routing_key: &str,
    body: &Value,
    reply_to: &str,
    headers: Value,
) -> String {
    json!({
        "body": base64::engine::general_purpose::STANDARD.encode(body.to_string()),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "reply_to": reply_to,
            "delivery_mode": 2,
            "delivery_info": {"exchange": exchange, "routing_key": routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": uuid::Uuid::new_v4().to_string(),
        },
    })
    .to_string()
}

/// Pops the envelope on list `list` (within 30 s) and decodes it:
/// (envelope, body).
fn pop_envelope(uri: &str, list: &str) -> (Value, Value) {
    let popped = redis_command(uri, &["BRPOP", list, "30"]);
    let Resp::Array(items) = &popped else {
        panic!("no reply on {list} within 30 s: {popped:?}");
    };
    let Some(Resp::Str(raw)) = items.get(1) else {
        panic!("BRPOP answered {popped:?}");
    };
    let envelope: Value = serde_json::from_str(raw).expect("a JSON envelope");
    let body = base64::engine::general_purpose::STANDARD
        .decode(envelope["body"].as_str().expect("a base64 body"))
        .expect("base64");
    let body = serde_json::from_slice(&body).expect("a JSON body");
    (envelope, body)
}

#[test]
fn a_redis_reply_carries_the_host_s_span_of_the_caller_s_trace() {
    let host = TestHost::start(redis_spec(&["demo"]));
    let uri = host.spec.bus_uri.clone();
    let reply_list = unique("gap-reply");
    let envelope = kombu_envelope(
        &host.spec.exchange,
        "demo.whoami",
        &request("r", "whoami", json!([])),
        &reply_list,
        json!({"traceparent": PARENT}),
    );
    let pushed = redis_command(&uri, &["LPUSH", &host.spec.queue("demo"), &envelope]);
    assert_eq!(pushed, Resp::Int(1), "LPUSH onto the service queue");
    let (reply, body) = pop_envelope(&uri, &reply_list);
    let on_reply = reply["headers"]["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("the reply carries a traceparent: {reply}"));
    let (trace, span) = ids(on_reply);
    assert_eq!(trace, PARENT_TRACE, "{reply}");
    assert_ne!(span, PARENT_SPAN);
    assert_eq!(
        body["result"]["traceparent"], on_reply,
        "the reply's header is the span the handler ran in"
    );
    assert_eq!(reply["properties"]["delivery_mode"], 2, "{reply}");
    assert_eq!(reply["content-type"], "application/json", "{reply}");
    redis_command(&uri, &["DEL", &reply_list]);
}

#[test]
fn a_handler_s_respond_reaches_the_list_it_names_on_redis() {
    let host = TestHost::start(redis_spec(&["demo"]));
    let uri = host.spec.bus_uri.clone();
    let (reply_list, job_list) = (unique("gap-reply"), unique("gap-job"));
    let envelope = kombu_envelope(
        &host.spec.exchange,
        "demo.later",
        &request("job-2", "later", json!([job_list, [1, 2]])),
        &reply_list,
        json!({"traceparent": PARENT}),
    );
    redis_command(&uri, &["LPUSH", &host.spec.queue("demo"), &envelope]);
    let (_, reply) = pop_envelope(&uri, &reply_list);
    assert_eq!(reply["result"], "responded", "{reply}");
    let (envelope, responded) = pop_envelope(&uri, &job_list);
    assert_eq!(
        responded,
        json!({"jsonrpc": "2.0", "id": "job-2", "result": [1, 2]})
    );
    let (trace, _) = ids(envelope["headers"]["traceparent"]
        .as_str()
        .unwrap_or_default());
    assert_eq!(trace, PARENT_TRACE, "{envelope}");
    redis_command(&uri, &["DEL", &reply_list, &job_list]);
}
