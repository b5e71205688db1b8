//! RabbitMQ as the distributed engine, on the real broker and binary:
//! requests nobody can take are answered at once, requests expire with
//! their caller, queue arguments reach the broker, and a queue that exists
//! with other arguments is one clear startup error.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use commissaire_e2e::host::{amqp_uri, unique, AmqpCaller, HostSpec, ReplyQueue, TestHost};
use commissaire_e2e::host_bin;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use serde_json::json;

/// Runs `command` to its end, which must come within `limit`: a
/// generous deadline, far below what the command would wait otherwise.
fn output_within(command: &mut Command, limit: Duration, what: &str) -> std::process::Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{what}: still running after {limit:?}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn a_call_nobody_can_take_fails_at_once_with_one_line() {
    let host = TestHost::start(HostSpec::amqp());
    // Its timeout is 300 s: ended within 60, it did not wait for it.
    let out = output_within(
        Command::new(host_bin())
            .args(["call", "nobody.home", "[]", "--timeout", "300"])
            .args([
                "--bus-uri",
                &amqp_uri(),
                "--bus-exchange",
                &host.spec.exchange,
            ]),
        Duration::from_secs(60),
        "a call nobody can take waits for its timeout",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = format!(
        "no queue is bound to nobody.home on exchange {}",
        host.spec.exchange
    );
    assert!(stderr.contains(&line), "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "one line: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_s_call_nobody_can_take_is_method_not_found() {
    let spec = HostSpec::amqp();
    // `simple` takes only wordy_add: the `simple.add` it sends has no queue.
    let services = format!(
        "[[service]]\nname = \"simple\"\nqueues = [{{ name = \"{}\", routing_key = \"simple.wordy_add\" }}]\n",
        spec.queue("simple")
    );
    let host = TestHost::start_with_services(spec, &services);
    let caller = AmqpCaller::connect(&host.spec.exchange).await;
    let body = json!({"jsonrpc": "2.0", "id": "w", "method": "wordy_add", "params": [1, 2]});
    let reply = caller
        .call(
            "simple.wordy_add",
            body.to_string().as_bytes(),
            ReplyQueue::AutoDelete,
            None,
        )
        .await;
    caller.close().await;
    assert_eq!(reply.body["error"]["code"], -32601, "{}", reply.body);
    let message = reply.body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!(
            "no queue is bound to simple.add on exchange {}",
            host.spec.exchange
        )),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_to_a_queue_without_consumer_expires_with_its_caller() {
    let host = TestHost::start(HostSpec::amqp());
    let lonely = unique("lonely");
    let conn = Connection::connect(&amqp_uri(), ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        lonely.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    ch.queue_bind(
        lonely.as_str().into(),
        host.spec.exchange.as_str().into(),
        "lonely.*".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    let count = |ch: lapin::Channel, name: String| async move {
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare")
        .message_count()
    };
    // The call waits 5 s, its request as long in the queue: seen there,
    // then gone once it expired with its caller.
    let mut caller = Command::new(host_bin())
        .args(["call", "lonely.x", "[]", "--timeout", "5"])
        .args([
            "--bus-uri",
            &amqp_uri(),
            "--bus-exchange",
            &host.spec.exchange,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run call");
    let mut queued = false;
    while caller.try_wait().expect("try_wait").is_none() {
        if count(ch.clone(), lonely.clone()).await == 1 {
            queued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = tokio::task::spawn_blocking(move || caller.wait())
        .await
        .expect("join")
        .expect("wait for call");
    assert!(
        queued,
        "the request never showed in the queue before its caller gave up"
    );
    assert_eq!(status.code(), Some(1));
    let started = Instant::now();
    while count(ch.clone(), lonely.clone()).await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the request did not expire with its caller within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ch.queue_delete(lonely.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete");
    let _ = conn.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn quorum_queue_arguments_reach_the_broker_and_a_mismatch_is_one_startup_error() {
    let mut spec = HostSpec::amqp();
    spec.plugins = vec!["simple"];
    let queue = spec.queue("simple");
    let services = format!(
        "[[service]]\nname = \"simple\"\nqueues = [{{ name = \"{queue}\", routing_key = \"simple.*\", \
         arguments = {{ \"x-queue-type\" = \"quorum\", \"x-delivery-limit\" = 5 }} }}]\n"
    );
    {
        let host = TestHost::start_with_services(spec.clone(), &services);
        let caller = AmqpCaller::connect(&host.spec.exchange).await;
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "add", "params": [1, 2]});
        let reply = caller
            .call(
                "simple.add",
                body.to_string().as_bytes(),
                ReplyQueue::AutoDelete,
                None,
            )
            .await;
        caller.close().await;
        assert_eq!(reply.body["result"], 3);
        // The broker has it as a quorum queue: a classic declaration of
        // the same name is refused.
        let conn = Connection::connect(&amqp_uri(), ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let classic = ch
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        assert!(classic.is_err(), "the queue is not classic");
        let _ = conn.close(200, "bye".into()).await;
        drop(host);
    }
    // A queue that exists as a quorum queue (declared here, as another
    // deployment would have), now configured classic: one clear error,
    // exit 1.
    let conn = Connection::connect(&amqp_uri(), ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare a quorum queue");
    let _ = conn.close(200, "bye".into()).await;
    let classic = format!(
        "[[service]]\nname = \"simple\"\nqueues = [{{ name = \"{queue}\", routing_key = \"simple.*\" }}]\n"
    );
    let mut host = TestHost::start_expecting_failure(spec.clone(), &classic);
    let status = host.wait(Duration::from_secs(30));
    let log = host.stderr();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains(&format!("declaring queue `{queue}`")), "{log}");
    assert!(log.contains("x-queue-type"), "names the difference: {log}");
    assert!(
        log.matches("refused:").count() <= 3,
        "3 tries, then one line, no retry loop: {log}"
    );
    commissaire_e2e::host::cleanup_broker(&spec.exchange, &[queue]);
}
