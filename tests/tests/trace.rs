//! W3C trace context across services, on the real brokers and binary: a
//! `traceparent` sent in reaches the handler, comes back on the reply,
//! is the parent of the handler's own requests, and names the request in
//! the host's log; a request without one (or with a broken one) starts a
//! trace of its own.

use std::process::Command;
use std::time::Duration;

use commissaire_e2e::host::{amqp_uri, unique, HostSpec, TestHost};
use commissaire_e2e::host_bin;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde_json::{json, Value};

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const PARENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

/// (trace id, span id) of a valid version-00 header.
fn ids(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "not a traceparent: {traceparent}");
    assert_eq!((parts[0], parts[1].len(), parts[2].len()), ("00", 32, 16));
    (parts[1].to_owned(), parts[2].to_owned())
}

fn header(properties: &BasicProperties) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get("traceparent")? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

struct Caller {
    conn: Connection,
    channel: Channel,
    exchange: String,
    reply_queue: String,
    replies: Consumer,
}

impl Caller {
    async fn connect(exchange: &str) -> Self {
        let conn = Connection::connect(&amqp_uri(), ConnectionProperties::default())
            .await
            .expect("connect");
        let channel = conn.create_channel().await.expect("channel");
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        };
        let q = channel
            .queue_declare("".into(), exclusive, FieldTable::default())
            .await
            .expect("reply queue");
        let replies = consume(&channel, q.name().as_str()).await;
        Self {
            conn,
            channel,
            exchange: exchange.to_owned(),
            reply_queue: q.name().to_string(),
            replies,
        }
    }

    /// Sends `method` with `params` to `routing_key`, with `traceparent`
    /// as a header if given; returns the reply's body and traceparent.
    async fn call(
        &mut self,
        routing_key: &str,
        params: Value,
        traceparent: Option<&str>,
    ) -> (Value, Option<String>) {
        let mut headers = FieldTable::default();
        if let Some(t) = traceparent {
            headers.insert("traceparent".into(), AMQPValue::LongString(t.into()));
        }
        self.call_with(routing_key, params, headers).await
    }

    /// As [`Caller::call`], with these headers.
    async fn call_with(
        &mut self,
        routing_key: &str,
        params: Value,
        headers: FieldTable,
    ) -> (Value, Option<String>) {
        let method = routing_key.rsplit('.').next().unwrap_or_default();
        let body = json!({"jsonrpc": "2.0", "id": "t", "method": method, "params": params});
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_reply_to(self.reply_queue.as_str().into());
        if !headers.inner().is_empty() {
            properties = properties.with_headers(headers);
        }
        self.channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                properties,
            )
            .await
            .expect("publish");
        let delivery = next(&mut self.replies).await;
        (
            serde_json::from_slice(&delivery.data).expect("JSON reply"),
            header(&delivery.properties),
        )
    }
}

/// A queue of the caller's own bound to `key` on `exchange`: what the
/// host sends there is seen (and answered by nobody).
async fn capture(caller: &Caller, exchange: &str, key: &str) -> String {
    let q = caller
        .channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("capture queue");
    caller
        .channel
        .queue_bind(
            q.name().as_str().into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    q.name().to_string()
}

async fn consume(channel: &Channel, queue: &str) -> Consumer {
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume")
}

async fn next(consumer: &mut Consumer) -> lapin::message::Delivery {
    tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a message within 10 s")
        .expect("consumer open")
        .expect("delivery")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_traceparent_reaches_the_handler_its_reply_its_requests_and_the_log() {
    let host = TestHost::start(HostSpec::amqp());
    let mut caller = Caller::connect(&host.spec.exchange).await;

    // The handler sees a span of the host's own, in the caller's trace;
    // the reply names that span.
    let (reply, on_reply) = caller.call("demo.whoami", json!([]), Some(PARENT)).await;
    let on_reply = on_reply.expect("the reply carries a traceparent");
    let (trace, span) = ids(&on_reply);
    assert_eq!(trace, PARENT_TRACE);
    assert_ne!(span, PARENT_SPAN, "the host's span is its own");
    assert_eq!(reply["result"]["trace_id"], PARENT_TRACE);
    assert_eq!(reply["result"]["traceparent"], on_reply.as_str());

    // The handler's own request (demo.relay notifies a key we listen on)
    // is in the same trace, as a span of its own.
    let listen = format!("{}.seen", unique("trace-cap"));
    let captured = capture(&caller, &host.spec.exchange, &listen).await;
    let mut seen = consume(&caller.channel, &captured).await;
    let (reply, on_reply) = caller
        .call(
            "demo.relay",
            json!({"routing_key": listen, "params": [1]}),
            Some(PARENT),
        )
        .await;
    assert_eq!(reply["result"], Value::Null, "{reply}");
    let relayed = next(&mut seen).await;
    let relayed = header(&relayed.properties).expect("the handler's request carries one");
    let (relayed_trace, relayed_span) = ids(&relayed);
    assert_eq!(relayed_trace, PARENT_TRACE);
    let (_, request_span) = ids(&on_reply.expect("reply traceparent"));
    assert_ne!(relayed_span, request_span);
    assert_ne!(relayed_span, PARENT_SPAN);

    // Every event of the request names the trace, the plugin's included.
    let (reply, _) = caller
        .call("demo.chatter", json!(["traced words"]), Some(PARENT))
        .await;
    assert_eq!(reply["result"], "logged");
    let log = host.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("log_info: traced words"))
        .unwrap_or_else(|| panic!("the plugin's event is logged:\n{log}"));
    assert!(line.contains(&format!("trace_id={PARENT_TRACE}")), "{line}");

    let _ = caller.conn.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_valid_traceparent_a_request_starts_its_own_trace() {
    let host = TestHost::start(HostSpec::amqp());
    let mut caller = Caller::connect(&host.spec.exchange).await;
    let mut traces = Vec::new();
    for sent in [None, Some("garbage"), Some(&PARENT.to_uppercase()[..])] {
        let (reply, on_reply) = caller.call("demo.whoami", json!([]), sent).await;
        let on_reply = on_reply.expect("the reply carries a traceparent");
        let (trace, _) = ids(&on_reply);
        assert_ne!(trace, PARENT_TRACE, "sent {sent:?}");
        assert_eq!(reply["result"]["trace_id"], trace.as_str());
        traces.push(trace);
    }
    traces.dedup();
    assert_eq!(traces.len(), 3, "each request a trace of its own");
    let _ = caller.conn.close(200, "bye".into()).await;
}

/// An async handler still running at its caller's deadline, well before
/// `handler_timeout`, is cancelled then and its caller answered: nobody
/// waits for it any more, and its slot is free.
#[tokio::test(flavor = "multi_thread")]
async fn an_async_handler_is_cancelled_at_its_callers_deadline() {
    let mut spec = HostSpec::amqp();
    spec.service_toml = "workers = 1\nconcurrency = 1\n".to_owned();
    let host = TestHost::start(spec);
    let mut caller = Caller::connect(&host.spec.exchange).await;
    let (reply, _) = caller
        .call_with(
            "demo.nap",
            json!([60_000]),
            deadline_header(now_ms() + 1_500),
        )
        .await;
    assert_eq!(reply["error"]["code"], -32603, "{reply}");
    assert_eq!(
        reply["error"]["message"], "deadline passed while the handler ran: it was cancelled",
        "{reply}"
    );
    // The only slot is free: this one runs.
    let (reply, _) = caller.call("demo.nap", json!([1]), None).await;
    assert_eq!(reply["result"], "napped", "{reply}");
    let _ = caller.conn.close(200, "bye".into()).await;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

fn deadline_header(deadline: u64) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert("deadline".into(), AMQPValue::LongLongInt(deadline as i64));
    headers
}

fn deadline_of(properties: &BasicProperties) -> Option<u64> {
    match properties.headers().as_ref()?.inner().get("deadline")? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// A request's `deadline` (docs/protocol.md): one already passed is
/// answered -32603 without running; a handler's own request carries what
/// is left of its request's, and waits no longer.
#[tokio::test(flavor = "multi_thread")]
async fn a_deadline_follows_the_call_chain_and_a_passed_one_runs_nothing() {
    let host = TestHost::start(HostSpec::amqp());
    let mut caller = Caller::connect(&host.spec.exchange).await;

    let (reply, _) = caller
        .call_with(
            "demo.echo",
            json!(["never run"]),
            deadline_header(now_ms() - 1_000),
        )
        .await;
    assert_eq!(reply["error"]["code"], -32603, "{reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("deadline passed"), "{reply}");
    assert!(
        host.stderr().contains(
            "request whose caller's deadline passed: answering -32603 without running it"
        ),
        "{}",
        host.stderr()
    );

    // A handler's request to a key nobody answers: captured here.
    let listen = format!("{}.nobody", unique("deadline-cap"));
    let captured = capture(&caller, &host.spec.exchange, &listen).await;
    let mut seen = consume(&caller.channel, &captured).await;
    let deadline = now_ms() + 3_000;
    let (reply, _) = caller
        .call_with(
            "demo.ask",
            json!({"routing_key": listen, "params": [1]}),
            deadline_header(deadline),
        )
        .await;
    assert_eq!(reply["error"]["code"], -32603, "no answer came: {reply}");
    let inner = next(&mut seen).await;
    let inner_deadline = deadline_of(&inner.properties).expect("the inner request carries one");
    assert!(inner_deadline <= deadline, "{inner_deadline} > {deadline}");
    // It expires with what was left (`[bus] request_timeout` is 10 s).
    let expiration: u64 = inner
        .properties
        .expiration()
        .as_ref()
        .and_then(|e| e.as_str().parse().ok())
        .expect("an expiration");
    assert!(
        expiration <= 3_000,
        "waited {expiration} ms, more than was left"
    );

    // The handler sees what is left of it.
    let (reply, _) = caller
        .call_with("demo.whoami", json!([]), deadline_header(now_ms() + 5_000))
        .await;
    let left = reply["result"]["remaining_ms"]
        .as_u64()
        .expect("remaining_ms");
    assert!(left > 0 && left <= 5_000, "{reply}");
    let (reply, _) = caller.call("demo.whoami", json!([]), None).await;
    let left = reply["result"]["remaining_ms"]
        .as_u64()
        .expect("remaining_ms");
    assert!(left > 5_000 && left <= 60_000, "handler_timeout's: {reply}");

    // Without one, the handler's request has the handler's own time.
    let (reply, _) = caller
        .call(
            "demo.ask",
            json!({"routing_key": listen, "params": [2], "timeout_ms": 300}),
            None,
        )
        .await;
    assert_eq!(reply["error"]["code"], -32603, "{reply}");
    let inner = next(&mut seen).await;
    let inner_deadline = deadline_of(&inner.properties).expect("the inner request carries one");
    assert!(inner_deadline > now_ms() - 10_000 && inner_deadline <= now_ms() + 300);
    let _ = caller.conn.close(200, "bye".into()).await;
}

/// Redis database of this file's tests, its own (never 0, the
/// machine's default).
const REDIS_DB: u8 = 1;

/// `call` joins `TRACEPARENT`; on Redis the context travels in kombu's
/// `headers`, both ways.
#[test]
fn call_joins_the_trace_in_its_environment_on_redis_too() {
    for spec in [HostSpec::amqp(), HostSpec::redis(REDIS_DB)] {
        let host = TestHost::start(spec);
        let out = Command::new(host_bin())
            .args(["call", "demo.whoami", "[]", "--bus-uri"])
            .arg(&host.spec.bus_uri)
            .args(["--bus-exchange", &host.spec.exchange])
            .env("TRACEPARENT", PARENT)
            .output()
            .expect("run call");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let result: Value = serde_json::from_slice(&out.stdout).expect("JSON result");
        assert_eq!(result["trace_id"], PARENT_TRACE, "{}", host.spec.bus_uri);
        let (_, span) = ids(result["traceparent"].as_str().expect("traceparent"));
        assert_ne!(span, PARENT_SPAN);
    }
}
