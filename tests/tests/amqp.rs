//! The host on the real RabbitMQ, through the real binary: docs/protocol.md over
//! the wire.

use std::time::Duration;

use commissaire_e2e::host::{AmqpCaller, HostSpec, ReplyQueue, TestHost};
use lapin::BasicProperties;
use serde_json::{json, Value};

fn request(method: &str, params: Value) -> Vec<u8> {
    json!({"jsonrpc": "2.0", "id": "req-1", "method": method, "params": params})
        .to_string()
        .into_bytes()
}

async fn call(host: &TestHost, routing_key: &str, body: &[u8]) -> Value {
    let caller = AmqpCaller::connect(&host.spec.exchange).await;
    let reply = caller
        .call(routing_key, body, ReplyQueue::AutoDelete, None)
        .await;
    caller.close().await;
    reply.body
}

fn code(reply: &Value) -> i64 {
    reply["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error: {reply}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn add_positional_and_named() {
    let host = TestHost::start(HostSpec::amqp());
    let reply = call(&host, "simple.add", &request("add", json!([1, 2]))).await;
    assert_eq!(reply, json!({"jsonrpc": "2.0", "id": "req-1", "result": 3}));
    let reply = call(
        &host,
        "simple.add",
        &request("add", json!({"x": 40, "y": 2})),
    )
    .await;
    assert_eq!(reply["result"], 42);
}

#[tokio::test(flavor = "multi_thread")]
async fn wordy_add_goes_handler_bus_handler() {
    let host = TestHost::start(HostSpec::amqp());
    let reply = call(
        &host,
        "simple.wordy_add",
        &request("wordy_add", json!([1, 2])),
    )
    .await;
    assert_eq!(reply["result"], "Adding 1 plus 2 results in 3");
}

/// Calls `simple.wordy_add` `n` times at once, each from its own caller,
/// and checks every sentence.
async fn concurrent_wordy_adds(host: &TestHost, n: i64, y: i64) {
    let calls: Vec<_> = (0..n)
        .map(|x| {
            let exchange = host.spec.exchange.clone();
            tokio::spawn(async move {
                let caller = AmqpCaller::connect(&exchange).await;
                let body = request("wordy_add", json!([x, y]));
                let reply = caller
                    .call("simple.wordy_add", &body, ReplyQueue::AutoDelete, None)
                    .await;
                caller.close().await;
                (x, reply.body)
            })
        })
        .collect();
    for call in calls {
        let (x, reply) = call
            .await
            .unwrap_or_else(|e| panic!("caller task: {e}\n{}", host.stderr()));
        assert_eq!(
            reply["result"],
            format!("Adding {x} plus {y} results in {}", x + y),
            "{reply}"
        );
    }
}

/// With one handler slot, a handler that calls its own service over the
/// bus needs a second delivery while it waits: the host raises the
/// broker's prefetch (an overflow consumer) instead of deadlocking until
/// the request times out.
#[tokio::test(flavor = "multi_thread")]
async fn handlers_calling_their_own_service_do_not_deadlock_one_slot() {
    let mut spec = HostSpec::amqp();
    spec.plugins = vec!["simple"];
    spec.service_toml = "concurrency = 1\n".to_owned();
    let host = TestHost::start(spec);
    concurrent_wordy_adds(&host, 4, 0).await;
    concurrent_wordy_adds(&host, 4, 1).await;
}

/// `inline_handlers = true`: handlers run on the runtime threads, and one
/// that calls the bus hands its thread over while it waits, so more such
/// calls than the runtime has threads still complete.
#[tokio::test(flavor = "multi_thread")]
async fn inline_handlers_calling_the_bus_hand_their_thread_over() {
    let mut spec = HostSpec::amqp();
    spec.plugins = vec!["simple"];
    spec.service_toml = "concurrency = 2\ninline_handlers = true\n".to_owned();
    let host = TestHost::start(spec);
    concurrent_wordy_adds(&host, 8, 5).await;
}

/// A method that proved fast runs on the runtime thread. When it then
/// blocks, it is moved off for good, with one warning, and its blocking
/// calls no longer hold up other requests.
#[test]
fn a_fast_method_that_starts_blocking_stops_holding_up_the_others() {
    let mut spec = HostSpec::amqp();
    spec.plugins = vec!["demo"];
    spec.service_toml = "concurrency = 8\n".to_owned();
    spec.log = "info,commissaire_host::serve::placement=debug".to_owned();
    let host = std::sync::Arc::new(TestHost::start(spec));
    let sleep = |ms: u64| {
        let (status, reply) = host.http_call("demo.sleep", &json!({"id": 1, "params": [ms]}));
        assert_eq!(status, 200, "{reply}");
    };
    // Fast calls until the method runs inline (a busy machine may take
    // more than the minimum of 32).
    let mut calls = 0;
    while !host.stderr().contains("now runs on the runtime thread") {
        sleep(0);
        calls += 1;
        assert!(calls < 2000, "never promoted:\n{}", host.stderr());
    }
    assert!(!host.stderr().contains("an inline handler blocked"));
    sleep(200);
    assert!(
        host.stderr()
            .contains("an inline handler blocked the runtime thread"),
        "{}",
        host.stderr()
    );
    // Four long sleeps at once: more than the runtime has threads.
    let sleepers: Vec<_> = (0..4)
        .map(|_| {
            let host = host.clone();
            std::thread::spawn(move || {
                host.http_call("demo.sleep", &json!({"id": 2, "params": [8000]}));
                std::time::Instant::now()
            })
        })
        .collect();
    // All four running (the workers report every second), then greetings.
    let started = std::time::Instant::now();
    while host.metric(r#"commissaire_in_flight{service="demo"}"#) < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the four sleepers not in flight within 30 s:\n{}",
            host.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..5 {
        let (status, reply) = host.http_call("demo.greet", &json!({"id": 3, "params": ["x"]}));
        assert_eq!(status, 200, "{reply}");
    }
    let greeted = std::time::Instant::now();
    for sleeper in sleepers {
        let slept = sleeper.join().expect("sleeper thread");
        assert!(
            greeted < slept,
            "a greeting waited for the blocking handlers to return"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replies_reach_every_kind_of_reply_queue_with_correlation_id_copied() {
    let host = TestHost::start(HostSpec::amqp());
    let caller = AmqpCaller::connect(&host.spec.exchange).await;
    for kind in [
        ReplyQueue::KombuDurable,
        ReplyQueue::AutoDelete,
        ReplyQueue::ExclusiveServerNamed,
        ReplyQueue::DirectReplyTo,
    ] {
        let reply = caller
            .call(
                "simple.add",
                &request("add", json!([2, 2])),
                kind,
                Some("corr-42"),
            )
            .await;
        assert_eq!(reply.body["result"], 4, "{kind:?}");
        assert_eq!(reply.correlation_id.as_deref(), Some("corr-42"), "{kind:?}");
        assert_eq!(
            reply.content_type.as_deref(),
            Some("application/json"),
            "{kind:?}"
        );
    }
    // Commissaire's callers set no correlation id: the reply has none either.
    let reply = caller
        .call(
            "simple.add",
            &request("add", json!([2, 3])),
            ReplyQueue::AutoDelete,
            None,
        )
        .await;
    assert_eq!(
        (reply.body["result"].clone(), reply.correlation_id),
        (json!(5), None)
    );
    caller.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_error_row_over_the_wire() {
    let host = TestHost::start(HostSpec::amqp());
    let cases: Vec<(&str, Vec<u8>, i64, Value)> = vec![
        ("simple.add", b"{not json".to_vec(), -32700, Value::Null),
        ("simple.add", b"[1,2]".to_vec(), -32600, Value::Null),
        (
            "simple.add",
            request("wordy_add", json!([1, 2])),
            -32600,
            json!("req-1"),
        ),
        (
            "simple.add",
            br#"{"jsonrpc":"2.0","id":"req-1","method":"add","params":7}"#.to_vec(),
            -32600,
            json!("req-1"),
        ),
        (
            "simple.sub",
            request("sub", json!([1, 2])),
            -32601,
            json!("req-1"),
        ),
        (
            "simple.add",
            request("add", json!([1])),
            -32602,
            json!("req-1"),
        ),
        (
            "simple.add",
            request("add", json!(["one", 2])),
            -32602,
            json!("req-1"),
        ),
        (
            "simple.add",
            request("add", json!({"x": 1, "y": 2, "z": 3})),
            -32602,
            json!("req-1"),
        ),
        (
            "demo.panic",
            request("panic", json!([])),
            -32603,
            json!("req-1"),
        ),
        (
            "demo.fail",
            request("fail", json!([])),
            -20000,
            json!("req-1"),
        ),
        (
            "demo.raise",
            request("raise", json!([409, "conflict"])),
            409,
            json!("req-1"),
        ),
    ];
    let caller = AmqpCaller::connect(&host.spec.exchange).await;
    for (routing_key, body, expected, id) in cases {
        let reply = caller
            .call(routing_key, &body, ReplyQueue::AutoDelete, None)
            .await
            .body;
        let text = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(code(&reply), expected, "{routing_key} {text}: {reply}");
        assert_eq!(reply["id"], id, "{routing_key} {text}");
        assert_eq!(reply["jsonrpc"], "2.0");
    }
    // The host is still answering after all that.
    let reply = caller
        .call(
            "simple.add",
            &request("add", json!([1, 1])),
            ReplyQueue::DirectReplyTo,
            None,
        )
        .await;
    assert_eq!(reply.body["result"], 2);
    caller.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn double_encoded_and_text_plain_bodies() {
    let host = TestHost::start(HostSpec::amqp());
    let inner = r#"{"jsonrpc":"2.0","id":"d","method":"add","params":[20,22]}"#;
    let double = serde_json::to_vec(inner).unwrap();
    let want = json!({"jsonrpc": "2.0", "id": "d", "result": 42});
    let reply = call(&host, "simple.add", &double).await;
    assert_eq!(reply, want, "double-encoded, application/json");
    // As kombu sends a string it publishes as is: text/plain, the body
    // JSON all the same (once or twice encoded).
    let caller = AmqpCaller::connect(&host.spec.exchange)
        .await
        .with_content_type("text/plain");
    for (body, what) in [(inner.as_bytes(), "plain"), (&double[..], "double-encoded")] {
        let reply = caller
            .call("simple.add", body, ReplyQueue::AutoDelete, None)
            .await;
        assert_eq!(reply.body, want, "{what}, text/plain");
    }
    caller.close().await;
}

/// A notification has no `reply_to` (docs/protocol.md): nowhere a reply
/// could go, so what shows is that its handler ran.
#[tokio::test(flavor = "multi_thread")]
async fn a_notification_runs_its_handler() {
    let host = TestHost::start(HostSpec::amqp());
    // Watch what the handler sends: demo.relay notifies `observe.seen`.
    let caller = AmqpCaller::connect(&host.spec.exchange).await;
    let observer = commissaire_host::bus::connect(&commissaire_e2e::host::amqp_uri())
        .await
        .unwrap();
    let watch = commissaire_e2e::host::unique("observe");
    observer
        .declare_queue(
            &host.spec.exchange,
            &watch,
            "observe.*",
            &Default::default(),
        )
        .await
        .unwrap();
    let (sink, seen) = commissaire_host::bus::channel_sink();
    let _consumer = observer.consume(&watch, 1, sink).await.unwrap();

    let body = json!({"jsonrpc": "2.0", "method": "relay", "params": ["observe.seen", {"k": 1}]});
    caller
        .publish(
            "demo.relay",
            body.to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await;
    let notified = tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("the handler ran")
        .unwrap();
    let notified: Value = serde_json::from_slice(&notified.body).unwrap();
    assert_eq!(
        notified,
        json!({"jsonrpc": "2.0", "method": "seen", "params": {"k": 1}})
    );
    observer.close().await;
    commissaire_e2e::host::cleanup_broker("", &[watch]);
    caller.close().await;
}

/// A handler's `publish` (plugin-api 1.4) puts its body on the
/// deployment's exchange byte for byte, as a notification (no `reply_to`),
/// and refuses an unusable routing key with an error the handler sees.
#[tokio::test(flavor = "multi_thread")]
async fn a_handler_publishes_a_raw_body() {
    let host = TestHost::start(HostSpec::amqp());
    let caller = AmqpCaller::connect(&host.spec.exchange).await;
    let observer = commissaire_host::bus::connect(&commissaire_e2e::host::amqp_uri())
        .await
        .unwrap();
    let watch = commissaire_e2e::host::unique("observe");
    observer
        .declare_queue(
            &host.spec.exchange,
            &watch,
            "observe.*",
            &Default::default(),
        )
        .await
        .unwrap();
    let (sink, seen) = commissaire_host::bus::channel_sink();
    let _consumer = observer.consume(&watch, 1, sink).await.unwrap();

    let call = |params: Value| {
        let body = json!({"jsonrpc": "2.0", "id": "p-1", "method": "announce", "params": params});
        let caller = &caller;
        async move {
            caller
                .call(
                    "demo.announce",
                    body.to_string().as_bytes(),
                    ReplyQueue::AutoDelete,
                    None,
                )
                .await
                .body
        }
    };
    // Python's spacing and key order: kept, as nothing re-encodes it.
    let raw = r#"{"event": "created", "class": "Host", "model": {"b": 1, "a": 2}}"#;
    let reply = call(json!(["observe.raw", raw])).await;
    assert_eq!(reply["result"], json!(null), "{reply}");
    let published = tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("published")
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&published.body), raw);
    assert_eq!(published.routing_key, "observe.raw");
    assert_eq!(published.exchange, host.spec.exchange);
    assert_eq!(published.reply_to, None);

    let reply = call(json!(["", "{}"])).await;
    assert_eq!(reply["error"]["code"], -32603, "{reply}");
    // Nothing else went out.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), seen.recv())
            .await
            .is_err()
    );
    observer.close().await;
    commissaire_e2e::host::cleanup_broker("", &[watch]);
    caller.close().await;
}

#[test]
fn call_and_notify_commands() {
    let host = TestHost::start(HostSpec::amqp());
    let run = |args: &[&str]| {
        std::process::Command::new(commissaire_e2e::host_bin())
            .args(args)
            .args([
                "--bus-uri",
                &host.spec.bus_uri,
                "--bus-exchange",
                &host.spec.exchange,
            ])
            .output()
            .unwrap()
    };
    let out = run(&["call", "simple.add", "[1, 2]"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "3\n");
    let out = run(&["call", "simple.wordy_add", r#"{"x": 1, "y": 2}"#]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "\"Adding 1 plus 2 results in 3\"\n"
    );
    let out = run(&["call", "demo.fail"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error -20000: I was never created {\"exception\":\"NotImplementedError\"}\n"
    );
    // Nobody is bound to it: answered at once, not after the timeout.
    let out = run(&["call", "nobody.home", "[]", "--timeout", "0.5"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no queue is bound to nobody.home"));
    let out = run(&["call", "simple.add", "[1,"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PARAMS_JSON is not JSON"));
    let out = run(&["notify", "demo.ping"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn http_endpoint_on_rabbitmq() {
    let host = TestHost::start(HostSpec::amqp());
    let (status, reply) = host.http_call(
        "simple.add",
        &json!({"jsonrpc": "2.0", "id": 9, "method": "add", "params": [1, 2]}),
    );
    assert_eq!(
        (status, reply),
        (200, json!({"jsonrpc": "2.0", "id": 9, "result": 3}))
    );
    let (status, reply) = host.http_call(
        "simple.wordy_add",
        &json!({"id": "w", "params": {"x": 1, "y": 2}}),
    );
    assert_eq!(
        (status, reply["result"].clone()),
        (200, json!("Adding 1 plus 2 results in 3"))
    );
    let (status, reply) = host.http_call("demo.fail", &json!({"id": 1}));
    assert_eq!((status, code(&reply)), (200, -20000));
    let (status, reply) = host.http_call("simple.add", &json!({"id": 1, "method": "sub"}));
    assert_eq!((status, code(&reply)), (400, -32600));
    let (status, _) = host.http_call("demo.ping", &json!({"params": []}));
    assert_eq!(status, 202, "a request without id is a notification");
    let (status, health) = commissaire_e2e::host::http_get(host.http, "/healthz").unwrap();
    assert_eq!(status, 200, "{health}");
    for service in ["demo", "simple"] {
        let h = &health["services"][service];
        assert_eq!(h["status"], "consuming", "{health}");
        assert_eq!(
            (h["workers"].as_u64(), h["consuming"].as_u64()),
            (Some(1), Some(1)),
            "{health}"
        );
        assert_eq!(h["pids"].as_array().map(Vec::len), Some(1), "{health}");
    }
}

#[test]
fn two_hosts_share_a_queue_and_sigterm_loses_nothing() {
    let mut spec = HostSpec::amqp();
    spec.plugins = vec!["simple"];
    // Each answered request is logged at debug level: count them per host.
    spec.log = "info,commissaire_host::dispatch=debug".to_owned();
    let mut first = TestHost::start(spec.clone());
    let second = TestHost::start(spec.clone());

    let rt = tokio::runtime::Runtime::new().unwrap();
    let total = 600usize;
    let answered = rt.block_on(async {
        let bus = commissaire_host::bus::connect(&spec.bus_uri).await.unwrap();
        let client = commissaire_host::client::RpcClient::start(
            bus,
            &spec.exchange,
            Duration::from_secs(20),
            commissaire_host::bus::ReplyQueueKind::default(),
        )
        .await
        .unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..total {
            let client = client.clone();
            tasks.spawn(async move {
                let params = format!("[{i}, 1]");
                let r = client
                    .request("simple.add", Some(&params), None, None)
                    .await;
                (i, r.map(|r| r.map(|v| v.get().to_owned())))
            });
            if i == total / 3 {
                // Stop one host while requests are in flight.
                first.signal("TERM");
            }
            if i % 32 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let mut answered = 0;
        while let Some(done) = tasks.join_next().await {
            let (i, r) = done.unwrap();
            match r {
                Ok(Ok(v)) => {
                    assert_eq!(v, (i + 1).to_string());
                    answered += 1;
                }
                other => panic!("request {i} was not answered: {other:?}"),
            }
        }
        client.bus().close().await;
        answered
    });
    assert_eq!(answered, total);
    let status = first.wait(Duration::from_secs(20));
    assert!(
        status.success(),
        "SIGTERM exits 0: {status}\n{}",
        first.stderr()
    );
    let handled = |h: &TestHost| h.stderr().matches("handled").count();
    assert!(handled(&first) > 0, "the first host answered some");
    assert!(handled(&second) > 0, "the second host answered some");
    assert!(first.stderr().contains("stopped"));
}

/// The names RabbitMQ gives the connections of process `pid`.
fn connections_of(pid: u32) -> Vec<String> {
    let wanted = format!("commissaire-host pid {pid}");
    let listed = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl");
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    listed
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, properties)| properties.contains(&format!("\"connection_name\",\"{wanted}\"")))
        .map(|(name, _)| name.to_owned())
        .collect()
}

#[test]
fn a_lost_broker_connection_is_reestablished_by_the_worker() {
    let host = TestHost::start(HostSpec::amqp());
    let pid = host.worker_pids("simple")[0];
    let names = connections_of(pid);
    assert!(!names.is_empty(), "no connection of worker {pid}");
    for name in names {
        let closed = std::process::Command::new("rabbitmqctl")
            .args([
                "-q",
                "close_connection",
                &name,
                "test: broker connection lost",
            ])
            .status()
            .expect("rabbitmqctl");
        assert!(closed.success());
    }
    // The same worker reconnects, re-declares and answers again.
    let started = std::time::Instant::now();
    let answer = loop {
        let (status, reply) = host.http_call("simple.add", &json!({"id": 1, "params": [2, 2]}));
        if status == 200 && host.stderr().contains("connected again") {
            break reply;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no recovery:\n{}",
            host.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(answer["result"], 4);
    assert_eq!(
        host.worker_pids("simple"),
        vec![pid],
        "the worker did not exit"
    );
    let log = host.stderr();
    assert!(
        log.contains("lost the bus connection; reconnecting"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}
