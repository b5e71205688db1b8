//! Coalesced acks (`[bus] ack_window_us`) on the real RabbitMQ, through
//! the real binary: whatever the host answered it also acks, soon and
//! once; a stop sends the acks still waiting.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use commissaire_e2e::host::{unique, HostSpec, TestHost};
use commissaire_e2e::load::{Load, Progress};
use serde_json::{json, Value};

fn spec() -> HostSpec {
    let mut spec = HostSpec::amqp();
    spec.exchange = unique("acks-ex");
    spec.suffix = unique("acks");
    spec
}

/// `(ready, unacked)` of `queue`, as the broker counts them now.
fn queue_counts(queue: &str) -> (u64, u64) {
    let out = Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            (f.next() == Some(queue)).then(|| {
                let mut n = || f.next().and_then(|n| n.trim().parse().ok()).unwrap_or(0);
                (n(), n())
            })
        })
        .next()
        .unwrap_or_else(|| panic!("queue {queue} not listed:\n{text}"))
}

/// Waits (at most 10 s) for `queue` to hold nothing, ready or unacked;
/// returns what it held last.
fn settle(queue: &str) -> (u64, u64) {
    let started = Instant::now();
    loop {
        let counts = queue_counts(queue);
        if counts == (0, 0) || started.elapsed() > Duration::from_secs(10) {
            return counts;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn load(
    host: &TestHost,
    total: usize,
    request: impl Fn(usize) -> (String, Value) + Send + Sync + 'static,
) -> Load {
    Load {
        exchange: host.spec.exchange.clone(),
        total,
        concurrency: 32,
        deadline: Duration::from_secs(60),
        request: Arc::new(request),
        broker: None,
        give_up_after: None,
    }
}

#[test]
fn a_burst_is_answered_once_each_and_leaves_nothing_unacked() {
    let host = TestHost::start(spec());
    // Slow requests among fast ones settle out of order: the fast ones
    // behind a slow one wait for it or for the window, never longer.
    let report = load(&host, 600, |i| match i % 50 {
        0 => ("demo.sleep".to_owned(), json!([150])),
        25 => ("demo.fail".to_owned(), json!([])),
        _ => ("demo.echo".to_owned(), json!([i])),
    });
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let report = rt.block_on(report.run(Arc::new(Progress::default())));
    assert_eq!(report.answered, 600, "{report}");
    assert_eq!(report.duplicates, 0, "{report}");
    for (i, reply) in &report.replies {
        match i % 50 {
            0 => assert_eq!(reply["result"], "slept", "{reply}"),
            25 => assert!(reply["error"]["code"].is_i64(), "{reply}"),
            _ => assert_eq!(reply["result"], json!(i), "{reply}"),
        }
    }
    // Still running, idle: nothing it answered is left unacked.
    assert_eq!(
        settle(&host.spec.queue("demo")),
        (0, 0),
        "{}",
        host.stderr()
    );
}

#[test]
fn sigterm_under_load_leaves_nothing_unacked_and_loses_nothing() {
    let spec = spec();
    let mut first = TestHost::start(spec.clone());
    let second = TestHost::start(spec.clone());
    let queue = spec.queue("simple");
    let total = 3000;
    let load = load(&first, total, |i| ("simple.add".to_owned(), json!([i, 1])));
    let progress = Arc::new(Progress::default());
    let pid = first.pid().expect("pid");
    let driver = {
        let progress = progress.clone();
        std::thread::spawn(move || {
            while progress.answered() < total / 3 {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        })
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let report = rt.block_on(load.run(progress));
    driver.join().expect("driver");
    let status = first.wait(Duration::from_secs(20));
    assert!(
        status.success(),
        "SIGTERM exits 0: {status}\n{}",
        first.stderr()
    );
    assert_eq!(report.answered, total, "{report}");
    assert!(report.unanswered.is_empty(), "{report}");
    // An ack the stopping host dropped would bring its request back to
    // the other host, answered a second time.
    assert_eq!(report.duplicates, 0, "{report}\n{}", first.stderr());
    for (i, reply) in &report.replies {
        assert_eq!(reply["result"], json!(i + 1), "{reply}");
    }
    assert_eq!(settle(&queue), (0, 0), "{}", second.stderr());
}

#[test]
fn a_recycled_worker_sends_its_waiting_acks_before_it_exits() {
    // A long window and one worker: when the hung handler makes the worker
    // recycle itself, acks of requests it already answered are waiting.
    let mut spec = spec();
    spec.plugins = vec!["demo"];
    spec.bus_toml = "ack_window_us = 100000\n".to_owned();
    spec.service_toml = "workers = 1\nhandler_timeout = 1\n".to_owned();
    spec.extra_toml = "\n[host]\nhandler_grace = 1\n".to_owned();
    let host = TestHost::start(spec);
    // Requests of 10 ms each, 8 at a time, take 3.75 s at the very least,
    // however fast the machine: the recycle, 2 s in, happens while they
    // flow.
    let total = 3000;
    let mut load = load(&host, total, |i| match i {
        0 => ("demo.sleep".to_owned(), json!([600_000])),
        _ => ("demo.sleep".to_owned(), json!([10])),
    });
    load.concurrency = 8;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let report = rt.block_on(load.run(Arc::new(Progress::default())));
    let log = host.stderr();
    assert!(log.contains("recycling this worker"), "{log}");
    assert_eq!(report.answered, total, "{report}\n{log}");
    // An ack the recycled worker did not send brings its request back, to
    // be handled and answered a second time.
    assert_eq!(report.duplicates, 0, "{report}\n{log}");
    assert_eq!(report.replies[&0]["error"]["code"], json!(-32603));
    assert_eq!(settle(&host.spec.queue("demo")), (0, 0), "{log}");
}
