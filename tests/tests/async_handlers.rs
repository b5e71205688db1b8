//! Async handlers under the real host, on the real brokers: awaited on the
//! worker's runtime with no thread each, cancelled at their timeout with
//! their slot free at once, still caught by the watchdog when they block
//! their thread, and a real async library working inside the plugin.

use std::sync::Arc;
use std::time::Duration;

use commissaire_e2e::host::{redis_uri, unique, HostSpec, TestHost};
use commissaire_e2e::load::{Load, Progress, Report};
use serde_json::{json, Value};

fn run_load(
    spec: &HostSpec,
    total: usize,
    concurrency: usize,
    request: impl Fn(usize) -> (String, Value) + Send + Sync + 'static,
) -> Report {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let report = if spec.bus_uri.starts_with("redis") {
        let load = commissaire_e2e::redis_load::RedisLoad {
            uri: spec.bus_uri.clone(),
            exchange: spec.exchange.clone(),
            total,
            concurrency,
            deadline: Duration::from_secs(120),
            give_up_after: Duration::from_secs(90),
            request: Arc::new(request),
        };
        rt.block_on(load.run(Arc::new(Progress::default())))
    } else {
        let load = Load {
            exchange: spec.exchange.clone(),
            total,
            concurrency,
            deadline: Duration::from_secs(120),
            request: Arc::new(request),
            broker: None,
            give_up_after: None,
        };
        rt.block_on(load.run(Arc::new(Progress::default())))
    };
    eprintln!("{report}");
    report
}

/// `VmRSS` in kB and `Threads` of process `pid`.
fn rss_and_threads(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in {status}"))
    };
    (field("VmRSS:"), field("Threads:"))
}

/// `simple.async_add` served from one queue, awaiting `simple.add` served
/// by another host from another: `total` calls at once, all answered with
/// their sum; returns the calling worker's growth in RSS (kB) and threads.
fn async_burst(spec: HostSpec, total: usize, concurrency: u16) -> (i64, i64) {
    let (calling_queue, called_queue) = (spec.queue("async-add"), spec.queue("add"));
    let queue = |name: &str, key: &str| {
        format!(
            "[[service]]\nname = \"simple\"\nconcurrency = {concurrency}\n\
             queues = [{{ name = \"{name}\", routing_key = \"{key}\" }}]\n"
        )
    };
    let mut calling =
        TestHost::start_with_services(spec.clone(), &queue(&calling_queue, "simple.async_add"));
    calling.also_clean([calling_queue.clone()]);
    let mut called =
        TestHost::start_with_services(spec.clone(), &queue(&called_queue, "simple.add"));
    called.also_clean([called_queue.clone()]);
    let worker = *calling.worker_pids("simple").first().expect("a worker");
    // Warmed up: the plugin's runtime starts with the first async call.
    let warm = run_load(&spec, 50, 50, |i| {
        ("simple.async_add".to_owned(), json!([i, 1]))
    });
    assert_eq!(warm.answered, 50, "{warm}");
    let (rss_before, threads_before) = rss_and_threads(worker);

    let report = run_load(&spec, total, total, |i| {
        ("simple.async_add".to_owned(), json!([i, 1]))
    });
    let (rss_after, threads_after) = rss_and_threads(worker);
    report
        .tally
        .judge(
            &format!("{total} async_add awaiting simple.add"),
            |i, reply| (reply["result"] == json!(i + 1)).then_some("result"),
        )
        .with_context(calling.stderr())
        .each_answered_once()
        .errors_exactly(0);
    assert_eq!(
        calling.worker_pids("simple"),
        [worker],
        "the worker was not replaced"
    );
    for host in [&calling, &called] {
        let log = host.stderr();
        assert!(!log.contains("panicked"), "{log}");
        assert!(!log.contains("max_bus_waits"), "{log}");
    }
    eprintln!(
        "worker {worker}: RSS {rss_before} kB -> {rss_after} kB, threads {threads_before} -> {threads_after}"
    );
    (
        rss_after as i64 - rss_before as i64,
        threads_after as i64 - threads_before as i64,
    )
}

/// 10,000 at once to an async handler awaiting another service, 1,000 in
/// flight in the worker at a time: all answered, and waiting holds no
/// thread (the worker's thread count does not move with the waits) and
/// little memory.
#[test]
fn ten_thousand_async_waits_are_answered_with_no_thread_each() {
    let mut spec = HostSpec::amqp();
    spec.plugins = vec!["simple"];
    let (rss_kb, threads) = async_burst(spec, 10_000, 1000);
    assert!(rss_kb <= 64 * 1024, "RSS grew by {rss_kb} kB");
    // Tokio's blocking pool may start a thread or two for the reply
    // publishing of a burst; a thread per waiting handler would be 1,000.
    assert!(threads <= 8, "{threads} more threads");
}

#[test]
fn an_async_burst_is_answered_on_redis() {
    let mut spec = HostSpec::redis(8);
    spec.plugins = vec!["simple"];
    async_burst(spec, 2000, 256);
}

/// An async handler awaiting 60 s under `handler_timeout = 1`: answered
/// -32603 at its timeout, its future dropped, its slot (the only one)
/// free for the next request at once, and the worker the same.
#[test]
fn an_async_handler_past_its_timeout_is_cancelled_and_its_slot_reused() {
    let mut spec = HostSpec::amqp();
    spec.plugins = vec!["demo"];
    spec.service_toml = "workers = 1\nconcurrency = 1\nhandler_timeout = 1\n".to_owned();
    let host = TestHost::start(spec);
    let worker = host.worker_pids("demo");
    let (status, reply) = host.http_call("demo.nap", &json!({"id": 1, "params": [60_000]}));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["error"]["code"], -32603, "{reply}");
    assert_eq!(
        reply["error"]["message"], "the handler did not return within 1s",
        "{reply}"
    );
    // With one slot, this waits for the nap unless it was let go.
    let (_, pong) = host.http_call("demo.nap", &json!({"id": 2, "params": [1]}));
    assert_eq!(pong["result"], "napped", "{pong}");
    assert_eq!(host.worker_pids("demo"), worker, "no recycle");
    let log = host.stderr();
    assert!(!log.contains("recycling this worker"), "{log}");
}

/// An async handler that blocks its thread cannot be cancelled: its caller
/// is answered at the timeout, and the watchdog recycles the worker once
/// the grace period is over, as for a hung sync handler.
#[test]
fn an_async_handler_blocking_its_thread_is_still_the_watchdogs() {
    let mut spec = HostSpec::amqp();
    spec.plugins = vec!["demo"];
    spec.service_toml = "workers = 1\nhandler_timeout = 1\n".to_owned();
    spec.extra_toml = "\n[host]\nhandler_grace = 1\n".to_owned();
    let host = TestHost::start(spec);
    let (_, reply) = host.http_call("demo.block", &json!({"id": 1, "params": [30_000]}));
    assert_eq!(reply["error"]["code"], -32603, "{reply}");
    let started = std::time::Instant::now();
    while !host.stderr().contains("recycling this worker") {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no recycle: {}",
            host.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The next worker answers.
    let (_, pong) = host.http_call("demo.ping", &json!({"id": 2, "params": []}));
    assert_eq!(pong["result"], "pong", "{pong}");
}

/// A real async client (redis-rs on tokio) inside an async handler: the
/// plugin's runtime gives it its reactor.
#[test]
fn an_async_library_works_inside_a_plugin() {
    let mut spec = HostSpec::amqp();
    spec.plugins = vec!["demo"];
    let host = TestHost::start(spec);
    let key = unique("commissaire-test-async");
    let url = redis_uri(9, "");
    for expected in 1..=3 {
        let (_, reply) = host.http_call(
            "demo.redis_incr",
            &json!({"id": expected, "params": [url, key]}),
        );
        assert_eq!(reply["result"], expected, "{reply}");
    }
    commissaire_e2e::host::redis_command(&url, &["DEL", &key]);
    let (_, reply) = host.http_call("demo.nap", &json!({"id": 9, "params": [10]}));
    assert_eq!(reply["result"], "napped", "{reply}");
}
