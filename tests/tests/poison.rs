//! The poison suite: single hostile or sloppy messages, on the real brokers
//! and the real binary with `workers = 2`. Each costs at most one reply (or
//! one logged drop), never the connection, a loop or the service: after
//! each, 300 ordinary requests are all answered, and the log's reconnect
//! and failed-publish lines are counted.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use commissaire_e2e::host::{
    amqp_uri, redis_command, redis_uri, unique, AmqpCaller, HostSpec, ReplyQueue, TestHost,
};
use commissaire_e2e::load::{Load, Progress, Report};
use commissaire_e2e::tally::Tally;
use commissaire_e2e::{python_with_kombu, workspace_root};
use commissaire_host::bus::{redis::envelope, Outgoing};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use serde_json::{json, Value};

fn spec(plugins: Vec<&'static str>) -> HostSpec {
    let mut spec = HostSpec::amqp();
    spec.plugins = plugins;
    spec.service_toml = "workers = 2\n".to_owned();
    // Handler runs are counted from dispatch's debug lines.
    spec.log = "info,commissaire_host::dispatch=debug".to_owned();
    spec
}

fn run_load(
    exchange: &str,
    total: usize,
    concurrency: usize,
    deadline: Duration,
    request: impl Fn(usize) -> (String, Value) + Send + Sync + 'static,
) -> Report {
    let load = Load {
        exchange: exchange.to_owned(),
        total,
        concurrency,
        deadline,
        request: Arc::new(request),
        broker: None,
        give_up_after: None,
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let report = rt.block_on(load.run(Arc::new(Progress::default())));
    eprintln!("{report}");
    report
}

/// 300 ordinary requests to `routing_key` (`params` from their number):
/// every one answered with `expected(i)`.
fn ordinary_requests_all_answered(
    host: &TestHost,
    routing_key: &'static str,
    expected: impl Fn(usize) -> Value,
) {
    let params = move |i: usize| {
        if routing_key == "demo.echo" {
            json!([i])
        } else {
            json!([i, 1])
        }
    };
    let report = run_load(
        &host.spec.exchange,
        300,
        32,
        Duration::from_secs(60),
        move |i| (routing_key.to_owned(), params(i)),
    );
    report
        .tally
        .judge("300 ordinary requests", |i, reply| {
            (reply["result"] == expected(*i)).then_some("result")
        })
        .with_context(host.stderr())
        .each_answered_once()
        .errors_exactly(0);
}

/// Reconnects and failed publishes in the host's log.
fn trouble_lines(log: &str) -> (usize, usize) {
    (
        log.matches("lost the bus connection").count() + log.matches("reconnecting").count(),
        log.matches("reply not published").count(),
    )
}

fn handler_runs(log: &str, method: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("handled") && l.contains(&format!("method={method}")))
        .count()
}

fn wait_until(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Publishes `body` through `exchange` to `routing_key` with `property`
/// set to `value` (raw_amqp_request.py says how; py-amqp passes bytes
/// through), replies to `reply_to`: the script's output.
fn publish_raw(
    exchange: &str,
    routing_key: &str,
    body: &str,
    reply_to: &str,
    property: &str,
    value: &str,
) -> std::process::Output {
    let script = workspace_root().join("tests/python/raw_amqp_request.py");
    Command::new(python_with_kombu())
        .arg(&script)
        .args([exchange, routing_key, body, reply_to, property, value])
        .output()
        .expect("run raw_amqp_request.py")
}

/// Publishes `body` to `routing_key` with `property` set to `hex` bytes
/// (py-amqp passes them through), and returns the reply and its
/// correlation id's bytes, read with the (patched) lapin: `null` if none
/// came within `wait`.
fn raw_request(
    host: &TestHost,
    routing_key: &str,
    body: &str,
    property: &str,
    hex: &str,
    wait: Duration,
) -> (Value, Option<Vec<u8>>) {
    let reply_to = unique("raw-reply");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let conn = Connection::connect(&amqp_uri(), ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        ch.queue_declare(
            reply_to.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare the reply queue");
        let output = publish_raw(
            &host.spec.exchange,
            routing_key,
            body,
            &reply_to,
            property,
            hex,
        );
        assert!(
            output.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&output.stderr),
            host.stderr()
        );
        let started = Instant::now();
        let mut got = (Value::Null, None);
        while started.elapsed() < wait {
            let message = ch
                .basic_get(
                    reply_to.as_str().into(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
                .expect("basic.get");
            if let Some(m) = message {
                let correlation_id = m
                    .delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|c| c.as_bytes().to_vec());
                got = (
                    serde_json::from_slice(&m.delivery.data).expect("reply is JSON"),
                    correlation_id,
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ch.queue_delete(reply_to.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete the reply queue");
        let _ = conn.close(200, "bye".into()).await;
        got
    })
}

/// Nestings a frame can carry on RabbitMQ: its frames are at most 128 KiB,
/// so about 18,700 levels of tables (7 bytes each); the parser stops
/// descending at 32 whatever the depth.
const DEEP: [(&str, &str); 6] = [
    ("deep_tables", "17"),
    ("deep_tables", "100"),
    ("deep_tables", "1000"),
    ("deep_tables", "18000"),
    ("deep_arrays", "1000"),
    ("deep_arrays", "18000"),
];

/// Headers nested 100,000 deep: 700 KB in one frame, which RabbitMQ
/// refuses to the publisher (frame_too_large) before any consumer sees it.
fn a_100_000_deep_frame_is_refused_by_the_broker(exchange: &str, routing_key: &str) {
    let output = publish_raw(exchange, routing_key, "{}", "x", "deep_tables", "100000");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("frame_too_large"),
        "the broker took a 700 KB header frame: {stderr}"
    );
}

/// Headers nested past 16 levels, up to what a frame can hold: each
/// request answered -32600 naming the reason, by the same two workers
/// (no stack overflow, no restart), and the service serves on.
#[test]
fn headers_nested_too_deep_cost_one_answer_each_and_never_a_worker() {
    let host = TestHost::start(spec(vec!["demo"]));
    let workers = host.worker_pids("demo");
    assert_eq!(workers.len(), 2, "{}", host.stderr());
    let body = r#"{"jsonrpc": "2.0", "id": "p1", "method": "echo", "params": [1]}"#;
    for (kind, depth) in DEEP {
        let (reply, _) = raw_request(
            &host,
            "demo.echo",
            body,
            kind,
            depth,
            Duration::from_secs(10),
        );
        assert_eq!(reply["id"], "p1", "{kind} {depth}: {reply}");
        assert_eq!(reply["error"]["code"], -32600, "{kind} {depth}: {reply}");
        assert_eq!(
            reply["error"]["message"], "the request's headers nest deeper than 16 levels",
            "{kind} {depth}: {reply}"
        );
    }
    // At the limit, headers are read and the request handled.
    let (reply, _) = raw_request(
        &host,
        "demo.echo",
        body,
        "deep_tables",
        "16",
        Duration::from_secs(10),
    );
    assert_eq!(reply["result"], 1, "{reply}");
    a_100_000_deep_frame_is_refused_by_the_broker(&host.spec.exchange, "demo.echo");

    ordinary_requests_all_answered(&host, "demo.echo", |i| json!(i));
    assert_eq!(host.worker_pids("demo"), workers, "a worker was replaced");
    let log = host.stderr();
    assert!(!log.contains("overflowed its stack"), "{log}");
    assert_eq!(trouble_lines(&log), (0, 0), "{log}");
    assert_eq!(
        handler_runs(&log, "echo"),
        301,
        "no request nested too deep reached the handler"
    );
}

/// `queue`'s ready and unacked messages, as the broker lists them; `None`
/// while it is not listed.
fn queue_counts(queue: &str) -> Option<(u64, u64)> {
    let out = Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "--no-table-headers",
        ])
        .output()
        .expect("rabbitmqctl list_queues");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut fields = l.split('\t');
        if fields.next()? != queue {
            return None;
        }
        let mut n = || -> u64 {
            fields
                .next()
                .and_then(|n| n.trim().parse().ok())
                .expect("a count")
        };
        Some((n(), n()))
    })
}

/// Messages in `queue` (ready and unacked), as the broker lists them;
/// `None` while it is not listed.
fn queue_messages(queue: &str) -> Option<u64> {
    let out = Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "name",
            "messages",
            "--no-table-headers",
        ])
        .output()
        .expect("rabbitmqctl list_queues");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let (name, n) = l.split_once('\t')?;
        (name == queue).then(|| n.trim().parse().expect("a message count"))
    })
}

/// The reply queues of the supervisor (its HTTP relay's) with process id
/// `pid`, as the broker lists them.
fn reply_queues_of(pid: u32) -> Vec<String> {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name", "messages"])
        .output()
        .expect("rabbitmqctl list_queues");
    assert!(out.status.success(), "{out:?}");
    let marker = format!("-{pid}-");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split('\t').next())
        .filter(|name| name.starts_with("commissaire-host-reply-") && name.contains(&marker))
        .map(str::to_owned)
        .collect()
}

/// The name of every HTTP-relayed request's `reply_to` is no secret:
/// headers nested too deep sent there cost the supervisor nothing (it
/// once aborted, taking every worker and the endpoint with it).
#[test]
fn headers_nested_too_deep_on_the_supervisor_s_reply_queue_cost_it_nothing() {
    let host = TestHost::start(spec(vec!["simple"]));
    let (status, reply) = host.http_call("simple.add", &json!({"id": 1, "params": [1, 2]}));
    assert_eq!((status, &reply["result"]), (200, &json!(3)), "{reply}");
    let supervisor = host.pid().expect("the host runs");
    let queues = reply_queues_of(supervisor);
    assert_eq!(queues.len(), 1, "{queues:?}\n{}", host.stderr());
    let queue = &queues[0];
    let workers = host.worker_pids("simple");
    for (kind, depth) in DEEP {
        let output = publish_raw("", queue, r#"{"id": 9, "result": 0}"#, "x", kind, depth);
        assert!(output.status.success(), "{output:?}");
    }
    a_100_000_deep_frame_is_refused_by_the_broker("", queue);
    // The relay still answers, by the same process and workers.
    for i in 0..20 {
        let (status, reply) = host.http_call("simple.add", &json!({"id": i, "params": [i, 1]}));
        assert_eq!((status, &reply["result"]), (200, &json!(i + 1)), "{reply}");
    }
    ordinary_requests_all_answered(&host, "simple.add", |i| json!(i + 1));
    assert_eq!(host.worker_pids("simple"), workers, "a worker was replaced");
    assert_eq!(
        reply_queues_of(supervisor),
        queues,
        "the reply queue changed"
    );
    let log = host.stderr();
    assert!(!log.contains("overflowed its stack"), "{log}");
    assert_eq!(trouble_lines(&log), (0, 0), "{log}");
}

#[test]
fn properties_that_are_not_utf8_cost_one_answer_each_and_never_the_connection() {
    let host = TestHost::start(spec(vec!["demo"]));
    let body = r#"{"jsonrpc": "2.0", "id": "p1", "method": "echo", "params": [1]}"#;
    for property in [
        "correlation_id",
        "message_id",
        "app_id",
        "type",
        "header_key",
    ] {
        let (reply, correlation_id) = raw_request(
            &host,
            "demo.echo",
            body,
            property,
            "fffe01",
            Duration::from_secs(10),
        );
        let name = if property == "header_key" {
            "headers"
        } else {
            property
        };
        assert_eq!(reply["id"], "p1", "{property}: {reply}");
        assert_eq!(reply["error"]["code"], -32600, "{property}: {reply}");
        assert_eq!(
            reply["error"]["message"],
            format!("the request's {name} is not valid UTF-8"),
            "{property}: {reply}"
        );
        if property == "correlation_id" {
            assert_eq!(
                correlation_id.as_deref(),
                Some(&[0xff, 0xfe, 0x01][..]),
                "the reply copies the bytes as sent"
            );
        }
    }
    // No address to answer: dropped with one warning, acked.
    let (reply, _) = raw_request(
        &host,
        "demo.echo",
        body,
        "reply_to",
        "fffe01",
        Duration::from_secs(2),
    );
    assert_eq!(reply, Value::Null);
    wait_until(Duration::from_secs(5), "the drop is logged", || {
        host.stderr().contains("dropped without a reply")
    });

    ordinary_requests_all_answered(&host, "demo.echo", |i| json!(i));
    let log = host.stderr();
    assert_eq!(trouble_lines(&log), (0, 0), "{log}");
    assert_eq!(log.matches("dropped without a reply").count(), 1, "{log}");
    assert_eq!(
        handler_runs(&log, "echo"),
        300,
        "no poison request reached the handler"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// A flood of poison messages costs one answer (or one drop) each, and a
/// line or two in the log, not one line each.
#[test]
fn a_flood_of_poison_messages_is_answered_each_and_logged_once() {
    const FLOOD: usize = 500;
    let host = TestHost::start(spec(vec!["demo"]));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tally = rt.block_on(async {
        let conn = Connection::connect(&amqp_uri(), ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let reply_to = unique("flood-reply");
        ch.queue_declare(
            reply_to.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("reply queue");
        let bad = || {
            lapin::types::ShortString::try_from_bytes(vec![0xff, 0xfe, 0x01])
                .expect("a short string of 3 bytes")
        };
        for i in 0..FLOOD {
            let body = json!({"jsonrpc": "2.0", "id": i, "method": "echo", "params": [i]});
            let base =
                lapin::BasicProperties::default().with_content_type("application/json".into());
            // Every other one cannot be answered at all.
            let properties = if i % 2 == 0 {
                base.with_reply_to(reply_to.as_str().into())
                    .with_correlation_id(bad())
            } else {
                base.with_reply_to(bad())
            };
            ch.basic_publish(
                host.spec.exchange.as_str().into(),
                "demo.echo".into(),
                lapin::options::BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                properties,
            )
            .await
            .expect("publish");
        }
        // Every request handled (acked: its reply went first), then every
        // reply read: a second answer to any of them would be among them.
        let mut tally = Tally::new(FLOOD / 2);
        for i in (0..FLOOD).step_by(2) {
            tally.sent(i);
        }
        let service_queue = host.spec.queue("demo");
        wait_until(Duration::from_secs(60), "the flood handled", || {
            queue_messages(&service_queue) == Some(0)
        });
        let started = Instant::now();
        loop {
            let got = ch
                .basic_get(
                    reply_to.as_str().into(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
                .expect("basic.get");
            match got {
                Some(m) => {
                    let reply: Value = serde_json::from_slice(&m.delivery.data).expect("JSON");
                    let id = reply["id"]
                        .as_u64()
                        .and_then(|i| usize::try_from(i).ok())
                        .unwrap_or_else(|| panic!("a reply without the request's id: {reply}"));
                    tally.reply(id, reply, false);
                }
                None if tally.unanswered().is_empty() => break,
                None => {
                    assert!(
                        started.elapsed() < Duration::from_secs(30),
                        "{} answerable requests unanswered within 30 s of the flood handled:\n{}",
                        tally.unanswered().len(),
                        host.stderr()
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        ch.queue_delete(reply_to.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete the reply queue");
        let _ = conn.close(200, "bye".into()).await;
        tally
    });
    // Each answerable one (even ids) answered once, -32600; the others
    // (odd ids: no address) never.
    tally
        .judge("the flood's answerable half", |_, reply| {
            (reply["error"]["code"] == -32600).then_some("-32600")
        })
        .with_context(host.stderr())
        .each_answered_once()
        .outcome_exactly("-32600", FLOOD / 2);

    ordinary_requests_all_answered(&host, "demo.echo", |i| json!(i));
    let log = host.stderr();
    // Two workers, each logging a kind once per 10 s, and the flood may
    // straddle a window: at most 4 lines of each kind.
    let refused = log
        .matches("request with unreadable properties: answering -32600")
        .count();
    let dropped = log.matches("dropped without a reply").count();
    assert!(
        (1..=4).contains(&refused),
        "{refused} refusal lines:\n{log}"
    );
    assert!((1..=4).contains(&dropped), "{dropped} drop lines:\n{log}");
    assert_eq!(trouble_lines(&log), (0, 0), "{log}");
    assert_eq!(
        handler_runs(&log, "echo"),
        300,
        "no poison reached a handler"
    );
}

#[test]
fn a_24_mb_request_is_answered_without_being_parsed() {
    let host = TestHost::start(spec(vec!["demo"]));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let reply = rt.block_on(async {
        let caller = AmqpCaller::connect(&host.spec.exchange).await;
        let mut body =
            br#"{"jsonrpc": "2.0", "id": "big", "method": "echo", "params": [""#.to_vec();
        body.resize(24 * 1024 * 1024 - 3, b'x');
        body.extend_from_slice(br#""]}"#);
        let reply = caller
            .call("demo.echo", &body, ReplyQueue::ExclusiveServerNamed, None)
            .await;
        caller.close().await;
        reply
    });
    assert_eq!(
        reply.body["id"],
        Value::Null,
        "not parsed, so no id: {}",
        reply.body
    );
    assert_eq!(reply.body["error"]["code"], -32600);
    assert_eq!(
        reply.body["error"]["message"],
        "request of 25165824 bytes exceeds max_message_bytes (16777216)"
    );
    ordinary_requests_all_answered(&host, "demo.echo", |i| json!(i));
    let log = host.stderr();
    assert_eq!(trouble_lines(&log), (0, 0), "{log}");
    assert_eq!(handler_runs(&log, "echo"), 300);
}

#[test]
fn a_reply_the_broker_refuses_is_tried_3_times_then_the_request_is_dropped() {
    let mut spec = spec(vec!["demo"]);
    spec.bus_toml = "confirm_replies = true\n".to_owned();
    let host = TestHost::start(spec);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let full = unique("full");
    rt.block_on(async {
        let conn = Connection::connect(&amqp_uri(), ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongInt(0));
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        ch.queue_declare(
            full.as_str().into(),
            QueueDeclareOptions {
                auto_delete: false,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("declare the full queue");
        let caller = AmqpCaller::connect(&host.spec.exchange).await;
        caller
            .publish(
                "demo.echo",
                br#"{"jsonrpc": "2.0", "id": "nack", "method": "echo", "params": [1]}"#,
                lapin::BasicProperties::default().with_reply_to(full.as_str().into()),
            )
            .await;
        caller.close().await;
        wait_until(Duration::from_secs(15), "the request is dropped", || {
            host.stderr()
                .contains("reply not published; the request is acked and dropped")
        });
        ch.queue_delete(full.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete the full queue");
        let _ = conn.close(200, "bye".into()).await;
    });
    ordinary_requests_all_answered(&host, "demo.echo", |i| json!(i));
    let log = host.stderr();
    assert_eq!(trouble_lines(&log), (0, 1), "{log}");
    assert_eq!(
        handler_runs(&log, "echo"),
        301,
        "the refused one ran once: {log}"
    );
}

#[test]
fn a_redis_reply_to_a_set_is_refused_at_once_and_the_request_is_dropped() {
    let uri = redis_uri(5, "");
    let mut spec = HostSpec::redis(5);
    spec.plugins = vec!["demo"];
    spec.service_toml = "workers = 2\n".to_owned();
    spec.log = "info,commissaire_host::dispatch=debug".to_owned();
    let host = TestHost::start(spec.clone());
    let set = format!("_kombu.binding.{}", spec.exchange);
    let body = br#"{"jsonrpc": "2.0", "id": "set", "method": "echo", "params": [1]}"#;
    let message = envelope(&Outgoing {
        exchange: &spec.exchange,
        routing_key: "demo.echo",
        body,
        reply_to: Some(&set),
        correlation_id: None,
        durable: true,
        confirm: false,
        expires: None,
        traceparent: None,
        deadline: None,
        reply_ttl: None,
    });
    redis_command(&uri, &["LPUSH", &spec.queue("demo"), &message]);
    wait_until(Duration::from_secs(15), "the request is dropped", || {
        host.stderr()
            .contains("reply refused by the broker; the request is acked and dropped")
    });
    assert_eq!(
        redis_command(&uri, &["TYPE", &set]),
        commissaire_e2e::host::Resp::Str("set".into()),
        "the set is left as it was"
    );

    let report = run_load_redis(&host);
    assert_eq!(report, 300);
    let log = host.stderr();
    // Refused by the script that pushes replies: not tried again.
    assert_eq!(log.matches("reply refused").count(), 1, "{log}");
    assert_eq!(log.matches("reply not published").count(), 0, "{log}");
    assert_eq!(
        handler_runs(&log, "echo"),
        301,
        "the refused one ran once: {log}"
    );
}

/// 300 `demo.echo` over Redis through `call` (the load client speaks AMQP).
fn run_load_redis(host: &TestHost) -> usize {
    let mut answered = 0;
    for i in 0..300 {
        let (status, reply) = host.http_call("demo.echo", &json!({"id": i, "params": [i]}));
        if status == 200 && reply["result"] == json!(i) {
            answered += 1;
        }
    }
    answered
}

#[test]
fn five_thousand_self_calls_at_once_are_all_answered_and_the_service_keeps_serving() {
    let host = TestHost::start(spec(vec!["simple"]));
    let report = run_load(
        &host.spec.exchange,
        5000,
        5000,
        Duration::from_secs(90),
        |i| ("simple.wordy_add".to_owned(), json!([i, 1])),
    );
    // Each answered once, with its result: beyond max_bus_waits handlers
    // waiting, the calls run in their callers' threads instead of being
    // refused.
    report
        .tally
        .judge("5000 wordy_add at once", |i, reply| {
            (reply["result"] == format!("Adding {i} plus 1 results in {}", i + 1))
                .then_some("result")
        })
        .with_context(host.stderr())
        .each_answered_once()
        .errors_exactly(0);
    ordinary_requests_all_answered(&host, "simple.add", |i| json!(i + 1));
    let log = host.stderr();
    assert_eq!(trouble_lines(&log).0, 0, "{log}");
    assert!(
        log.matches("calls to the service itself run in their caller's thread")
            .count()
            <= 2 * 90,
        "at most one line per 10 s"
    );
}

/// 2,000 requests at once to a service whose handlers call another
/// service on another queue (Commissaire's everyday pattern: containermgr
/// and clusterexec call storage on every request): every one answered with
/// its result. Past `max_bus_waits` waiting handlers the service takes no
/// more deliveries until some finish; the broker keeps the burst.
#[test]
fn a_burst_calling_another_service_queues_and_is_all_answered() {
    burst_calling_another_service(spec(vec!["simple"]));
}

/// The same on Redis.
#[test]
fn a_burst_calling_another_service_queues_and_is_all_answered_on_redis() {
    let mut spec = HostSpec::redis(5);
    spec.plugins = vec!["simple"];
    burst_calling_another_service(spec);
}

fn burst_calling_another_service(spec: HostSpec) {
    let (wordy, add) = (spec.queue("wordy"), spec.queue("add"));
    let queue = |name: &str, key: &str| {
        format!(
            "[[service]]\nname = \"simple\"\nqueues = [{{ name = \"{name}\", routing_key = \"{key}\" }}]\n"
        )
    };
    let mut calling =
        TestHost::start_with_services(spec.clone(), &queue(&wordy, "simple.wordy_add"));
    calling.also_clean([wordy.clone()]);
    let mut called = TestHost::start_with_services(spec.clone(), &queue(&add, "simple.add"));
    called.also_clean([add.clone()]);
    let request = |i| ("simple.wordy_add".to_owned(), json!([i, 1]));
    let report = if spec.bus_uri.starts_with("redis") {
        let load = commissaire_e2e::redis_load::RedisLoad {
            uri: spec.bus_uri.clone(),
            exchange: spec.exchange.clone(),
            total: 2000,
            concurrency: 2000,
            deadline: Duration::from_secs(90),
            give_up_after: Duration::from_secs(60),
            request: Arc::new(request),
        };
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let report = rt.block_on(load.run(Arc::new(Progress::default())));
        eprintln!("{report}");
        report
    } else {
        run_load(&spec.exchange, 2000, 2000, Duration::from_secs(90), request)
    };
    report
        .tally
        .judge(
            "2000 wordy_add calling simple.add on another queue",
            |i, reply| {
                (reply["result"] == format!("Adding {i} plus 1 results in {}", i + 1))
                    .then_some("result")
            },
        )
        .with_context(calling.stderr())
        .each_answered_once()
        .errors_exactly(0);
    for host in [&calling, &called] {
        let log = host.stderr();
        assert_eq!(trouble_lines(&log).0, 0, "{log}");
        assert!(!log.contains("panicked"), "{log}");
    }
}

/// A worker killed while it holds requests (two running, more waiting for
/// its slots) costs nobody an answer: what it held is redelivered and
/// answered, and no request beside the dead worker's is refused as a
/// poison one.
#[test]
fn a_worker_killed_while_requests_wait_for_its_slots_loses_and_blames_nothing() {
    let mut spec = spec(vec!["demo"]);
    spec.service_toml = "workers = 2\nconcurrency = 2\n".to_owned();
    let host = TestHost::start(spec);
    let victim = *host.worker_pids("demo").first().expect("a demo worker");
    let exchange = host.spec.exchange.clone();
    let queue = host.spec.queue("demo");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let replies = rt.block_on(async move {
        let call = |i: usize| {
            let exchange = exchange.clone();
            tokio::spawn(async move {
                // The sleeps outlast the set-up below (twenty callers
                // connecting, rabbitmqctl polls) on a loaded machine.
                let (key, params) = if i < 4 {
                    ("demo.sleep", json!([15000]))
                } else {
                    ("demo.echo", json!([i]))
                };
                let method = key.rsplit('.').next().unwrap_or_default();
                let body = json!({"jsonrpc": "2.0", "id": i, "method": method, "params": params});
                // The killed worker's two sleeps are suspects when they
                // come back: each runs alone, one after the other.
                let caller = AmqpCaller::connect(&exchange)
                    .await
                    .with_reply_timeout(Duration::from_secs(90));
                let reply = caller
                    .call(
                        key,
                        body.to_string().as_bytes(),
                        ReplyQueue::AutoDelete,
                        None,
                    )
                    .await;
                caller.close().await;
                (i, reply.body)
            })
        };
        // The four sleeps fill every slot (2 workers, 2 each: the prefetch
        // is the concurrency), the echoes then wait on the queue.
        let mut calls: Vec<_> = (0..4).map(call).collect();
        let q = queue.clone();
        tokio::task::spawn_blocking(move || {
            wait_until(Duration::from_secs(30), "the four sleeps taken", || {
                queue_counts(&q) == Some((0, 4))
            });
        })
        .await
        .expect("waiting");
        calls.extend((4..24).map(call));
        tokio::task::spawn_blocking(move || {
            wait_until(
                Duration::from_secs(30),
                "twenty echoes waiting while the sleeps run",
                || queue_counts(&queue) == Some((20, 4)),
            );
        })
        .await
        .expect("waiting");
        let killed = Command::new("kill")
            .args(["-KILL", &victim.to_string()])
            .status()
            .expect("kill");
        assert!(killed.success());
        let mut replies = Vec::new();
        for call in calls {
            replies.push(call.await.expect("caller task"));
        }
        replies
    });
    for (i, reply) in replies {
        let expected = if i < 4 { json!("slept") } else { json!(i) };
        assert_eq!(reply["result"], expected, "request {i}: {reply}");
    }
    wait_until(Duration::from_secs(10), "the worker is replaced", || {
        host.worker_pids("demo").len() == 2
    });
    ordinary_requests_all_answered(&host, "demo.echo", |i| json!(i));
    let log = host.stderr();
    assert!(!log.contains("refusing a request"), "{log}");
}
