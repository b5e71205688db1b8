//! The bounds the README's "Reliability" and "Configuration" sections
//! promise, on the real binary and brokers: a non-default `crash_limit`;
//! a request delivered more than `crash_limit + 3` times refused; a quorum
//! queue's `x-delivery-limit` sending a request that kills every worker to
//! its dead-letter exchange; `[bus] request_timeout` and the handler's
//! default request timeout of 10 s.
//!
//! Redis: database 14, names of each test's own.

use std::time::Duration;

use base64::Engine as _;
use commissaire_e2e::host::{amqp_uri, redis_command, redis_uri, unique, HostSpec, Resp, TestHost};
use commissaire_e2e::probe::{metric, wait_for, RawCaller};
use futures_util::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::{json, Value};

fn spec(plugins: &[&'static str]) -> HostSpec {
    let mut spec = HostSpec::amqp();
    spec.plugins = plugins.to_vec();
    spec.suffix = unique("gap");
    spec.exchange = unique("gap-ex");
    spec
}

fn request(id: &str, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_limit_of_1_refuses_a_request_after_its_first_crash() {
    let mut spec = spec(&["demo"]);
    spec.service_toml = "workers = 2\ncrash_limit = 1\n".to_owned();
    let host = TestHost::start(spec);
    let mut caller = RawCaller::connect(&host.spec.exchange).await;
    caller
        .send("demo.abort", &request("a", "abort", json!([])), None)
        .await;
    let reply = caller.next(Duration::from_secs(60)).await;
    assert_eq!(reply.body["id"], "a", "{}", reply.body);
    assert_eq!(reply.body["error"]["code"], -32603, "{}", reply.body);
    assert_eq!(
        reply.body["error"]["message"], "request crashed the worker 1 times",
        "{}\n{}",
        reply.body,
        host.stderr()
    );
    caller
        .send("demo.ping", &request("p", "ping", json!([])), None)
        .await;
    assert_eq!(
        caller.next(Duration::from_secs(60)).await.body["result"],
        "pong"
    );
    caller.close().await;
}

/// A kombu envelope of `body` for `routing_key` on `exchange`.
fn kombu_envelope(exchange: &str, routing_key: &str, body: &Value, reply_to: &str) -> String {
    json!({
        "body": base64::engine::general_purpose::STANDARD.encode(body.to_string()),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {},
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

/// A request whose handler outlives Redis's visibility timeout comes back
/// again and again, with no worker dying: the `crash_limit + 3` bound
/// (here 1 + 3) ends it.
#[test]
fn a_request_delivered_more_than_crash_limit_plus_3_times_is_refused() {
    let mut spec = spec(&["demo"]);
    spec.bus_uri = redis_uri(14, "?visibility_timeout=1&unacked_restore_interval=0.2");
    spec.service_toml = "crash_limit = 1\nhandler_timeout = 300\n".to_owned();
    spec.extra_toml = "\n[host]\nshutdown_timeout = 1\n".to_owned();
    let host = TestHost::start(spec);
    let uri = host.spec.bus_uri.clone();
    let reply_list = unique("gap-reply");
    let envelope = kombu_envelope(
        &host.spec.exchange,
        "demo.sleep",
        &request("stuck", "sleep", json!([120_000])),
        &reply_list,
    );
    let pushed = redis_command(&uri, &["LPUSH", &host.spec.queue("demo"), &envelope]);
    assert_eq!(pushed, Resp::Int(1));
    let popped = redis_command(&uri, &["BRPOP", &reply_list, "60"]);
    let Resp::Array(items) = &popped else {
        panic!("no reply within 60 s: {popped:?}\n{}", host.stderr());
    };
    let Some(Resp::Str(raw)) = items.get(1) else {
        panic!("BRPOP answered {popped:?}");
    };
    let envelope: Value = serde_json::from_str(raw).expect("a JSON envelope");
    let body = base64::engine::general_purpose::STANDARD
        .decode(envelope["body"].as_str().unwrap_or_default())
        .expect("base64");
    let reply: Value = serde_json::from_slice(&body).expect("a JSON reply");
    assert_eq!(reply["id"], "stuck", "{reply}");
    assert_eq!(reply["error"]["code"], -32603, "{reply}");
    assert_eq!(
        reply["error"]["message"], "request delivered 5 times without being answered",
        "{reply}"
    );
    redis_command(&uri, &["DEL", &reply_list]);
    drop(host);
}

/// The broker's own bound: with `crash_limit` out of the way, a request
/// that kills every worker it reaches goes to the quorum queue's
/// dead-letter exchange after `x-delivery-limit` redeliveries.
#[tokio::test(flavor = "multi_thread")]
async fn a_quorum_queue_dead_letters_a_request_past_its_delivery_limit() {
    let mut spec = spec(&["demo"]);
    let queue = spec.queue("demo");
    let dlx = unique("gap-dlx");
    let dead = unique("gap-dead");
    // The dead-letter exchange and a queue to see what reaches it.
    let conn = Connection::connect(&amqp_uri(), ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.exchange_declare(
        dlx.as_str().into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare the dead-letter exchange");
    ch.queue_declare(
        dead.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare the dead-letter queue");
    ch.queue_bind(
        dead.as_str().into(),
        dlx.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    let mut dead_letters = ch
        .basic_consume(
            dead.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume the dead letters");

    spec.plugins = vec!["demo"];
    let services = format!(
        "[[service]]\nname = \"demo\"\nworkers = 2\ncrash_limit = 100\n\
         queues = [{{ name = \"{queue}\", routing_key = \"demo.*\", arguments = {{ \
         \"x-queue-type\" = \"quorum\", \"x-delivery-limit\" = 2, \
         \"x-dead-letter-exchange\" = \"{dlx}\" }} }}]\n"
    );
    let host = TestHost::start_with_services(spec, &services);
    let mut caller = RawCaller::connect(&host.spec.exchange).await;
    let body = request("doomed", "abort", json!([]));
    caller.send("demo.abort", &body, None).await;

    let letter = tokio::time::timeout(Duration::from_secs(120), dead_letters.next())
        .await
        .unwrap_or_else(|_| panic!("nothing dead-lettered within 120 s:\n{}", host.stderr()))
        .expect("the dead-letter consumer is open")
        .expect("a delivery");
    let dead_body: Value = serde_json::from_slice(&letter.data).expect("JSON");
    assert_eq!(dead_body, body, "the request itself is dead-lettered");
    // Workers died for it: the delivery limit, not the host, ended it
    // (with crash_limit 100 the host would have gone on).
    let crashes = "commissaire_crashes_total{service=\"demo\"}";
    wait_for(Duration::from_secs(30), "3 crashes counted", || {
        metric(host.http, crashes).is_some_and(|n| n >= 3.0)
    });
    assert!(
        !host.stderr().contains("refusing a request"),
        "the host refused nothing:\n{}",
        host.stderr()
    );

    caller.close().await;
    drop(host);
    let ch = conn.create_channel().await.expect("channel");
    let _ = ch
        .queue_delete(dead.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(dlx.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn request_timeout_bounds_a_handler_s_requests_and_the_http_endpoint_s() {
    let mut spec = spec(&["demo"]);
    spec.bus_toml = "request_timeout = 1\n".to_owned();
    let host = TestHost::start(spec);
    let mut caller = RawCaller::connect(&host.spec.exchange).await;
    caller
        .send(
            "demo.ask",
            &request("t1", "ask", json!(["demo.sleep", [5000]])),
            None,
        )
        .await;
    let reply = caller.next(Duration::from_secs(60)).await;
    assert_eq!(reply.body["error"]["code"], -32603, "{}", reply.body);
    assert_eq!(
        reply.body["error"]["message"], "no reply from `demo.sleep` within 1s",
        "{}",
        reply.body
    );
    // A handler's own timeout wins.
    caller
        .send(
            "demo.ask",
            &request("t2", "ask", json!(["demo.sleep", [5000], 300])),
            None,
        )
        .await;
    let reply = caller.next(Duration::from_secs(60)).await;
    assert_eq!(
        reply.body["error"]["message"], "no reply from `demo.sleep` within 300ms",
        "{}",
        reply.body
    );
    // The HTTP endpoint's default too: 504.
    let (status, body) = host.http_call(
        "demo.sleep",
        &json!({"jsonrpc": "2.0", "id": "h", "params": [5000]}),
    );
    assert_eq!(status, 504, "{body}");
    caller.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_s_request_waits_10_s_by_default() {
    let host = TestHost::start(spec(&["demo"]));
    let mut caller = RawCaller::connect(&host.spec.exchange).await;
    caller
        .send(
            "demo.ask",
            &request("d", "ask", json!(["demo.sleep", [13_000]])),
            None,
        )
        .await;
    let reply = caller.next(Duration::from_secs(60)).await;
    assert_eq!(
        reply.body["error"]["message"], "no reply from `demo.sleep` within 10s",
        "{}",
        reply.body
    );
    caller.close().await;
}
