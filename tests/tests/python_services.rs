//! The host and original Python Commissaire services on one bus, both
//! ways, on RabbitMQ and on Redis, during a migration one service at a
//! time. The Python side is a double of the original service
//! (`tests/python/commissaire_service.py`, which replies through
//! `connection.SimpleQueue(reply_to)` and so declares the host's reply
//! queue again) and of `BusMixin.request`
//! (`tests/python/commissaire_request.py`). After each test nothing of the
//! host's is left on the broker: on RabbitMQ no queue or exchange named
//! after one of its processes, on Redis no key the test's database did
//! not hold before.
//!
//! Needs the Python of `COMMISSAIRE_TEST_PYTHON`, or `<workspace>/.venv`
//! with kombu and redis installed (`scripts/test.sh` creates it), and
//! `rabbitmqctl`.

use std::collections::BTreeSet;
use std::io::BufRead as _;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use commissaire_e2e::host::{
    cleanup_broker, cleanup_redis, redis_command, redis_keys, HostSpec, TestHost,
};
use commissaire_e2e::{host_bin, python_with_kombu, workspace_root};
use commissaire_host::bus::reply_names::local_prefix;
use commissaire_host::bus::ReplyQueueKind;
use serde_json::{json, Value};

/// The broker a test runs on; a Redis test has a database of its own.
#[derive(Debug, Clone, Copy)]
enum Broker {
    Amqp,
    Redis(u8),
}

impl Broker {
    fn spec(self) -> HostSpec {
        match self {
            Broker::Amqp => HostSpec::amqp(),
            Broker::Redis(db) => HostSpec::redis(db),
        }
    }
}

/// What of the host's is on the broker: on RabbitMQ the queues and
/// exchanges named after processes `pids` (no pids: of any process of
/// this machine, for a snapshot before they start: after 32,768 processes
/// a pid comes back, and another test's killed caller may have left a
/// queue under it), on Redis every key the database holds.
fn host_objects(broker: Broker, uri: &str, pids: &[u32]) -> BTreeSet<String> {
    match broker {
        Broker::Amqp => {
            let mut prefixes: Vec<String> = pids
                .iter()
                .map(|pid| format!("{}{pid}-", local_prefix()))
                .collect();
            if pids.is_empty() {
                prefixes.push(local_prefix());
            }
            let mut found = BTreeSet::new();
            for what in ["list_queues", "list_exchanges"] {
                let listed = Command::new("rabbitmqctl")
                    .args(["-q", what, "name"])
                    .output()
                    .expect("run rabbitmqctl");
                assert!(listed.status.success(), "rabbitmqctl {what}");
                for name in String::from_utf8_lossy(&listed.stdout).lines() {
                    if prefixes.iter().any(|p| name.starts_with(p.as_str())) {
                        found.insert(format!("{what}: {name}"));
                    }
                }
            }
            found
        }
        Broker::Redis(_) => redis_keys(uri),
    }
}

/// Asserts that the host left nothing on the broker: nothing of `pids`
/// (RabbitMQ), no key that was not there `before` (Redis).
fn assert_nothing_left(broker: Broker, uri: &str, pids: &[u32], before: &BTreeSet<String>) {
    let after = host_objects(broker, uri, pids);
    let left: Vec<&String> = after.difference(before).collect();
    assert!(left.is_empty(), "left behind on {uri}: {left:?}");
}

fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The Python service double, printing one JSON line per message.
struct PyService {
    child: Child,
    lines: mpsc::Receiver<String>,
    broker: Broker,
    uri: String,
    exchange: String,
    queues: Vec<String>,
}

impl PyService {
    fn start(broker: Broker, spec: &HostSpec, bindings: &[(&str, &str)]) -> Self {
        let mut command = Command::new(python_with_kombu());
        command
            .arg(workspace_root().join("tests/python/commissaire_service.py"))
            .args(["serve", &spec.bus_uri, &spec.exchange]);
        for (queue, key) in bindings {
            command.arg(format!("{queue}={key}"));
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start commissaire_service.py");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let service = Self {
            child,
            lines,
            broker,
            uri: spec.bus_uri.clone(),
            exchange: spec.exchange.clone(),
            queues: bindings.iter().map(|(q, _)| (*q).to_owned()).collect(),
        };
        assert_eq!(
            service.lines.recv_timeout(Duration::from_secs(20)).ok(),
            Some("ready".to_owned()),
            "the Python service did not start"
        );
        service
    }

    /// The next message it handled.
    fn handled(&self) -> Value {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(10))
            .expect("a message for the Python service within 10 s");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// Every message it handled since the last look, up to the end of its
    /// output (once it stopped).
    fn handled_to_the_end(&self) -> Vec<Value> {
        let mut handled = Vec::new();
        loop {
            match self.lines.recv_timeout(Duration::from_secs(10)) {
                Ok(line) => handled
                    .push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))),
                Err(mpsc::RecvTimeoutError::Disconnected) => return handled,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("the Python service's output did not end within 10 s of its exit")
                }
            }
        }
    }

    /// Stops it (SIGTERM): it deletes its queues.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        wait_until(Duration::from_secs(10), "the Python service stops", || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
    }
}

impl Drop for PyService {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        match self.broker {
            Broker::Amqp => cleanup_broker(&self.exchange, &self.queues),
            Broker::Redis(_) => cleanup_redis(&self.uri, &self.exchange, &self.queues),
        }
    }
}

/// What `commissaire-host call` did, and its process id.
#[derive(Debug)]
struct Called {
    pid: u32,
    success: bool,
    stdout: String,
    stderr: String,
}

fn call_with(spec: &HostSpec, args: &[&str], extra: &[&str]) -> Called {
    let child = Command::new(host_bin())
        .arg("call")
        .args(args)
        .args(["--bus-uri", &spec.bus_uri, "--bus-exchange", &spec.exchange])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run commissaire-host call");
    let pid = child.id();
    let out = child
        .wait_with_output()
        .expect("commissaire-host call ends");
    Called {
        pid,
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn call(spec: &HostSpec, routing_key: &str, params: &str) -> Called {
    call_with(spec, &[routing_key, params], &[])
}

/// Asserts that `reply_to` is a reply queue of process `pid`.
fn assert_reply_queue_of(pid: u32, seen: &Value) {
    let prefix = format!("{}{pid}-", local_prefix());
    assert!(
        seen["reply_to"]
            .as_str()
            .is_some_and(|r| r.starts_with(&prefix)),
        "expected a reply queue of process {pid}: {seen}"
    );
}

fn call_reaches_a_python_service(broker: Broker) {
    let spec = broker.spec();
    let before = host_objects(broker, &spec.bus_uri, &[]);
    let mut pids = Vec::new();
    {
        let py_queue = format!("py-{}", spec.suffix);
        let mut service = PyService::start(broker, &spec, &[(&py_queue, "pysvc.*")]);

        let sum = call(&spec, "pysvc.add", "[1, 2]");
        assert!(sum.success, "{sum:?}");
        assert_eq!(sum.stdout, "3\n");
        assert_reply_queue_of(sum.pid, &service.handled());
        pids.push(sum.pid);

        // A Python method returning None: a success whose result is null.
        let nothing = call(&spec, "pysvc.nothing", r#"{"node": "n1"}"#);
        assert!(nothing.success, "{nothing:?}");
        assert_eq!(nothing.stdout, "null\n");
        let seen = service.handled();
        assert_eq!(seen["params"], json!({"node": "n1"}));
        assert_reply_queue_of(nothing.pid, &seen);
        pids.push(nothing.pid);

        let missing = call(&spec, "pysvc.sub", "[1, 2]");
        assert!(!missing.success);
        assert!(missing.stderr.contains("error -32601"), "{missing:?}");
        service.handled();
        pids.push(missing.pid);
        service.stop();
    }
    assert_nothing_left(broker, &spec.bus_uri, &pids, &before);
}

#[test]
fn call_reaches_a_python_service_on_rabbitmq() {
    call_reaches_a_python_service(Broker::Amqp);
}

#[test]
fn call_reaches_a_python_service_on_redis() {
    call_reaches_a_python_service(Broker::Redis(11));
}

/// The host's pids: its supervisor and the workers of `services`.
fn pids_of(host: &TestHost, services: &[&str]) -> Vec<u32> {
    let mut pids: Vec<u32> = host.pid().into_iter().collect();
    for service in services {
        pids.extend(host.worker_pids(service));
    }
    pids
}

fn a_handler_s_request_reaches_a_python_service(broker: Broker) {
    let mut spec = broker.spec();
    spec.plugins = vec!["simple"];
    let before = host_objects(broker, &spec.bus_uri, &[]);
    let mut pids = Vec::new();
    {
        // The host serves `simple.wordy_add`, the Python service the
        // `simple.add` its handler asks for.
        let services = format!(
            "[[service]]\nname = \"simple\"\nqueues = [{{ name = \"{}\", routing_key = \"simple.wordy_add\" }}]\n",
            spec.queue("simple")
        );
        let mut host = TestHost::start_with_services(spec.clone(), &services);
        let py_queue = format!("pyadd-{}", spec.suffix);
        let mut service = PyService::start(broker, &spec, &[(&py_queue, "simple.add")]);
        pids.extend(pids_of(&host, &["simple"]));

        for (x, y) in [(20, 22), (1, 2)] {
            let said = call(&spec, "simple.wordy_add", &format!("[{x}, {y}]"));
            assert!(said.success, "{said:?}\nhost:\n{}", host.stderr());
            assert_eq!(
                said.stdout,
                format!("\"Adding {x} plus {y} results in {}\"\n", x + y)
            );
            pids.push(said.pid);
            let seen = service.handled();
            assert_eq!(seen["params"], json!([x, y]));
            assert_reply_queue_of(host.worker_pids("simple")[0], &seen);
        }
        service.stop();
        host.signal("TERM");
        assert!(host.wait(Duration::from_secs(20)).success());
    }
    assert_nothing_left(broker, &spec.bus_uri, &pids, &before);
}

#[test]
fn a_handler_s_request_reaches_a_python_service_on_rabbitmq() {
    a_handler_s_request_reaches_a_python_service(Broker::Amqp);
}

#[test]
fn a_handler_s_request_reaches_a_python_service_on_redis() {
    a_handler_s_request_reaches_a_python_service(Broker::Redis(12));
}

/// `BusMixin.request` through `commissaire_request.py`: the reply payload.
fn bus_mixin_request(spec: &HostSpec, routing_key: &str, params: &Value) -> Value {
    let method = routing_key.rsplit('.').next().unwrap_or_default();
    let out = Command::new(python_with_kombu())
        .arg(workspace_root().join("tests/python/commissaire_request.py"))
        .args([&spec.bus_uri, &spec.exchange, routing_key, method])
        .arg(params.to_string())
        .output()
        .expect("run commissaire_request.py");
    assert!(
        out.status.success(),
        "{routing_key}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the reply payload is JSON")
}

fn a_python_caller_reaches_the_host(broker: Broker) {
    let spec = broker.spec();
    let before = host_objects(broker, &spec.bus_uri, &[]);
    let pids;
    {
        let mut host = TestHost::start(spec.clone());
        pids = pids_of(&host, &["simple", "demo"]);
        assert_eq!(
            bus_mixin_request(&spec, "simple.add", &json!([1, 2]))["result"],
            3
        );
        // Our `demo.relay` answers `null`, as a Python method returning
        // None did.
        let reply = bus_mixin_request(&spec, "demo.relay", &json!(["nowhere.seen", {}]));
        assert_eq!(reply.get("result"), Some(&Value::Null), "{reply}");
        assert_eq!(reply.get("error"), None, "{reply}");
        // Through our handler's own request to our own service.
        assert_eq!(
            bus_mixin_request(&spec, "simple.wordy_add", &json!([2, 3]))["result"],
            "Adding 2 plus 3 results in 5"
        );
        host.signal("TERM");
        assert!(host.wait(Duration::from_secs(20)).success());
    }
    assert_nothing_left(broker, &spec.bus_uri, &pids, &before);
}

#[test]
fn a_python_caller_reaches_the_host_on_rabbitmq() {
    a_python_caller_reaches_the_host(Broker::Amqp);
}

#[test]
fn a_python_caller_reaches_the_host_on_redis() {
    a_python_caller_reaches_the_host(Broker::Redis(3));
}

fn the_host_and_a_python_service_share_a_queue(broker: Broker) {
    const CALLS: i64 = 200;
    let mut spec = broker.spec();
    spec.plugins = vec!["simple"];
    spec.log = "info,commissaire_host::dispatch=debug".to_owned();
    let before = host_objects(broker, &spec.bus_uri, &[]);
    let mut pids = vec![std::process::id()];
    let (host_log, python_ids) = {
        let mut host = TestHost::start(spec.clone());
        pids.extend(pids_of(&host, &["simple"]));
        let shared = spec.queue("simple");
        let mut service = PyService::start(broker, &spec, &[(&shared, "simple.*")]);

        let rt = tokio::runtime::Runtime::new().expect("a runtime");
        let results = rt.block_on(async {
            let bus = commissaire_host::bus::connect(&spec.bus_uri)
                .await
                .expect("connect");
            // Python takes what RabbitMQ gives it (kombu sets no prefetch)
            // and declares a queue per reply: on a loaded machine its half
            // of the 200 may take a while.
            let client = commissaire_host::client::RpcClient::start(
                bus,
                &spec.exchange,
                Duration::from_secs(60),
                ReplyQueueKind::Named,
            )
            .await
            .expect("reply queue");
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..CALLS {
                let client = client.clone();
                tasks.spawn(async move {
                    let params = format!("[{i}, 1000]");
                    let reply = client
                        .request("simple.add", Some(&params), None, None)
                        .await;
                    (i, reply.map(|r| r.map(|v| v.get().to_owned())))
                });
            }
            let mut results = Vec::new();
            while let Some(done) = tasks.join_next().await {
                results.push(done.expect("a request task"));
            }
            client.bus().close().await;
            results
        });
        for (i, result) in &results {
            match result {
                Ok(Ok(sum)) => assert_eq!(sum, &(i + 1000).to_string(), "call {i}"),
                other => panic!("call {i} was not answered: {other:?}"),
            }
        }
        // Both stopped, nothing can be handled any more: their logs are
        // complete, a request handled twice is in them.
        service.stop();
        host.signal("TERM");
        assert!(host.wait(Duration::from_secs(20)).success());
        let python_ids: Vec<String> = service
            .handled_to_the_end()
            .iter()
            .map(|seen| seen["id"].to_string())
            .collect();
        (host.stderr(), python_ids)
    };
    let by_host = host_log
        .lines()
        .filter(|l| l.contains("dispatch: handled ") && l.contains("method=add"))
        .count();
    let by_python = python_ids.len();
    let distinct: BTreeSet<&String> = python_ids.iter().collect();
    assert_eq!(distinct.len(), by_python, "Python handled some twice");
    assert!(
        by_host > 0 && by_python > 0,
        "host {by_host}, Python {by_python}"
    );
    assert_eq!(
        by_host + by_python,
        usize::try_from(CALLS).unwrap_or_default(),
        "handled by the host {by_host}, by Python {by_python}"
    );
    assert_nothing_left(broker, &spec.bus_uri, &pids, &before);
}

#[test]
fn the_host_and_a_python_service_share_a_queue_on_rabbitmq() {
    the_host_and_a_python_service_share_a_queue(Broker::Amqp);
}

#[test]
fn the_host_and_a_python_service_share_a_queue_on_redis() {
    the_host_and_a_python_service_share_a_queue(Broker::Redis(4));
}

/// A caller killed while it waits: its reply queue stays, a Python reply
/// arrives there, and the next host started on the machine deletes all of
/// it.
fn a_killed_caller_s_reply_queue_is_swept(broker: Broker) {
    let mut spec = broker.spec();
    spec.plugins = vec!["simple"];
    let before = host_objects(broker, &spec.bus_uri, &[]);
    let py_queue = format!("py-{}", spec.suffix);
    let service = PyService::start(broker, &spec, &[(&py_queue, "pysvc.*")]);
    // The caller notes its reply queue in its TMPDIR, where the next host
    // finds it: one of this test's own, so that no other host on the
    // machine (of another test, or another checkout) sweeps it first.
    let notes = tempfile::tempdir().expect("a temp dir");
    spec.tmpdir = Some(notes.path().to_owned());
    let mut caller = Command::new(host_bin())
        .args(["call", "pysvc.slow", "[1]"])
        .args(["--bus-uri", &spec.bus_uri, "--bus-exchange", &spec.exchange])
        .env("TMPDIR", notes.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run commissaire-host call");
    let dead = caller.id();
    let seen = service.handled();
    assert_reply_queue_of(dead, &seen);
    let _ = caller.kill();
    let _ = caller.wait();
    let reply_to = seen["reply_to"].as_str().unwrap_or_default().to_owned();

    // The service replies a second later, declaring the queue again.
    match broker {
        Broker::Amqp => wait_until(
            Duration::from_secs(15),
            "the reply reaches the queue",
            || {
                let listed = Command::new("rabbitmqctl")
                    .args(["-q", "list_queues", "name", "messages"])
                    .output()
                    .expect("run rabbitmqctl");
                String::from_utf8_lossy(&listed.stdout)
                    .lines()
                    .any(|l| l == format!("{reply_to}\t1"))
            },
        ),
        Broker::Redis(_) => {
            wait_until(
                Duration::from_secs(15),
                "the reply reaches the list",
                || redis_command(&spec.bus_uri, &["LLEN", &reply_to]).int() == 1,
            );
            let bound = redis_keys(&spec.bus_uri);
            assert!(
                bound.contains(&format!("_kombu.binding.{reply_to}")),
                "{bound:?}"
            );
        }
    }
    assert!(
        !host_objects(broker, &spec.bus_uri, &[dead])
            .difference(&before)
            .collect::<Vec<_>>()
            .is_empty(),
        "the killed caller's reply queue is there"
    );

    let mut host = TestHost::start(spec.clone());
    wait_until(
        Duration::from_secs(15),
        "the next host deletes the killed caller's reply queue",
        || {
            host_objects(broker, &spec.bus_uri, &[dead])
                .difference(&before)
                .all(|k| !k.contains(&reply_to))
        },
    );
    let pids = [vec![dead], pids_of(&host, &["simple"])].concat();
    host.signal("TERM");
    assert!(host.wait(Duration::from_secs(20)).success());
    drop(service);
    assert_nothing_left(broker, &spec.bus_uri, &pids, &before);
}

#[test]
fn a_killed_caller_s_reply_queue_is_swept_on_rabbitmq() {
    a_killed_caller_s_reply_queue_is_swept(Broker::Amqp);
}

#[test]
fn a_killed_caller_s_reply_queue_is_swept_on_redis() {
    a_killed_caller_s_reply_queue_is_swept(Broker::Redis(5));
}

#[test]
fn direct_reply_to_stays_available_on_rabbitmq() {
    let spec = Broker::Amqp.spec();
    let host = TestHost::start(spec.clone());
    let dir = tempfile::tempdir().expect("a temp dir");
    let config = dir.path().join("direct.toml");
    std::fs::write(&config, "[bus]\nreply_queue = \"direct\"\n").expect("write the config");
    let config = config.to_str().unwrap_or_default();

    let direct = call_with(&spec, &["demo.whoami", "[]"], &["--config", config]);
    assert!(direct.success, "{direct:?}");
    let seen: Value = serde_json::from_str(&direct.stdout).expect("JSON");
    assert!(
        seen["reply_to"]
            .as_str()
            .is_some_and(|r| r.starts_with("amq.rabbitmq.reply-to")),
        "{seen}"
    );
    let sum = call_with(&spec, &["simple.add", "[1, 2]"], &["--config", config]);
    assert_eq!(sum.stdout, "3\n", "{sum:?}");

    // The default: a queue of the caller's own.
    let named = call(&spec, "demo.whoami", "[]");
    assert!(named.success, "{named:?}");
    let seen: Value = serde_json::from_str(&named.stdout).expect("JSON");
    assert_reply_queue_of(named.pid, &seen);
    drop(host);
    assert_nothing_left(
        Broker::Amqp,
        &spec.bus_uri,
        &[direct.pid, sum.pid, named.pid],
        &BTreeSet::new(),
    );
}
