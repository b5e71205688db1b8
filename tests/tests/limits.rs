//! The bounds the README's "Reliability" and "Configuration" sections
//! promise, on the real binary and RabbitMQ: a non-default `crash_limit`;
//! a request delivered more than `crash_limit + 3` times refused; a quorum
//! queue's `x-delivery-limit` sending a request that kills every worker to
//! its dead-letter exchange; `[bus] request_timeout` and the handler's
//! default request timeout of 10 s.

use std::time::Duration;

use commissaire_e2e::host::{amqp_uri, cleanup_broker, unique, TestHost};
use commissaire_e2e::probe::{
    amqp_addr, amqp_uri_via, metric, ready_messages, request, spec, wait_for_host, CuttableProxy,
    RawCaller,
};
use futures_util::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::{json, Value};

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
        reply.body["error"]["message"],
        "request crashed the worker 1 times",
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

/// Waits until `queue` holds `ready` messages ready for delivery.
async fn wait_ready(queue: &str, ready: u32, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while ready_messages(queue).await != ready {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A request whose worker loses its connection while the handler runs
/// comes back, again and again, with no worker dying: the
/// `crash_limit + 3` bound (here 1 + 3) ends it. The connection is lost
/// through a proxy the test cuts, never by touching the broker.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_delivered_more_than_crash_limit_plus_3_times_is_refused() {
    let proxy = CuttableProxy::start(amqp_addr());
    let mut spec = spec(&["demo"]);
    spec.bus_uri = amqp_uri_via(&proxy);
    spec.service_toml = "crash_limit = 1\n".to_owned();
    spec.extra_toml = "\n[host]\nshutdown_timeout = 1\n".to_owned();
    let host = TestHost::start(spec);
    let queue = host.spec.queue("demo");
    // The caller talks to the broker itself: the cuts do not reach it.
    let mut caller = RawCaller::connect(&host.spec.exchange).await;
    caller
        .send(
            "demo.sleep",
            &request("stuck", "sleep", json!([120_000])),
            None,
        )
        .await;
    // The first delivery, then four redeliveries the host runs: each time
    // its connection goes while the handler sleeps.
    for delivery in 1..=5 {
        wait_ready(&queue, 0, &format!("delivery {delivery} taken")).await;
        proxy.cut();
        wait_ready(&queue, 1, &format!("delivery {delivery} back in the queue")).await;
        proxy.restore();
    }
    // The fifth redelivery is over the bound.
    let reply = caller.next(Duration::from_secs(60)).await;
    assert_eq!(reply.body["id"], "stuck", "{}", reply.body);
    assert_eq!(reply.body["error"]["code"], -32603, "{}", reply.body);
    assert_eq!(
        reply.body["error"]["message"],
        "request delivered 5 times without being answered",
        "{}\n{}",
        reply.body,
        host.stderr()
    );
    caller.close().await;
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
    let _cleanup = Deleted {
        exchange: dlx.clone(),
        queue: dead.clone(),
    };
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
    let caller = RawCaller::connect(&host.spec.exchange).await;
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
    wait_for_host(&host, Duration::from_secs(30), "3 crashes counted", || {
        metric(host.http, crashes).is_some_and(|n| n >= 3.0)
    });
    assert!(
        !host.stderr().contains("refusing a request"),
        "the host refused nothing:\n{}",
        host.stderr()
    );

    caller.close().await;
    let _ = conn.close(200, "bye".into()).await;
    drop(host);
}

/// Deletes an exchange and a queue of the test's own when dropped, also
/// when the test fails.
struct Deleted {
    exchange: String,
    queue: String,
}

impl Drop for Deleted {
    fn drop(&mut self) {
        cleanup_broker(&self.exchange, std::slice::from_ref(&self.queue));
    }
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
