//! The host on Redis, against Python Commissaire code on kombu (from PyPI)
//! and the real Redis: a `BusMixin.request`-style caller, a kombu
//! `ConsumerMixin` service that our host calls and that calls our host,
//! and a worker killed mid-request whose request comes back after the
//! visibility timeout. Each test has a Redis database of its own and
//! checks that it leaves no key behind.
//!
//! Needs the Python of `COMMISSAIRE_TEST_PYTHON`, or `<workspace>/.venv`
//! with kombu and redis installed (`scripts/test.sh` creates it).

use std::collections::BTreeSet;
use std::io::BufRead as _;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use commissaire_e2e::host::{redis_command, redis_keys, redis_uri, HostSpec, TestHost};
use commissaire_e2e::{host_bin, workspace_root};
use commissaire_host::bus::redis::{binding_key, binding_member, binding_permanent_key};
use serde_json::{json, Value};

/// Asserts that the database holds no key it did not hold `before`.
fn assert_nothing_left(uri: &str, before: &BTreeSet<String>) {
    let after = redis_keys(uri);
    let left: Vec<&String> = after.difference(before).collect();
    assert!(left.is_empty(), "left behind in {uri}: {left:?}");
}

/// What `commissaire_request.py` printed.
#[derive(Debug)]
struct KombuReply {
    payload: Value,
    request: Value,
    stderr: String,
}

fn request_command(
    uri: &str,
    exchange: &str,
    routing_key: &str,
    method: &str,
    params: &Value,
) -> Command {
    let mut command = Command::new(commissaire_e2e::python_with_kombu());
    command
        .arg(workspace_root().join("tests/python/commissaire_request.py"))
        .arg(uri)
        .arg(exchange)
        .arg(routing_key)
        .arg(method)
        .arg(params.to_string());
    command
}

fn parse_reply(what: &str, output: &std::process::Output, host: &TestHost) -> KombuReply {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "{what} via kombu: {}\nstdout:\n{stdout}\nstderr:\n{stderr}\nhost stderr:\n{}",
        output.status,
        host.stderr()
    );
    let payload = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{what}: stdout is not JSON ({e}):\n{stdout}\n{stderr}"));
    let request = stderr
        .lines()
        .find_map(|l| l.strip_prefix("request: "))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("the script did not log its request:\n{stderr}"));
    KombuReply {
        payload,
        request,
        stderr,
    }
}

/// One request as Commissaire's `BusMixin.request` makes it, on Redis; a
/// `raw_body` replaces the request the script would build.
fn kombu_call(
    host: &TestHost,
    routing_key: &str,
    method: &str,
    params: Value,
    raw_body: Option<Value>,
) -> KombuReply {
    let mut command = request_command(
        &host.spec.bus_uri,
        &host.spec.exchange,
        routing_key,
        method,
        &params,
    );
    if let Some(body) = raw_body {
        command.arg("--raw-body").arg(body.to_string());
    }
    let output = command.output().expect("run commissaire_request.py");
    parse_reply(routing_key, &output, host)
}

fn error_code(reply: &KombuReply) -> &Value {
    let e = &reply.payload["error"];
    assert!(
        e.is_object() && reply.payload.get("result").is_none(),
        "not an error reply: {}\nstderr:\n{}",
        reply.payload,
        reply.stderr
    );
    &e["code"]
}

#[test]
fn bus_mixin_requests_get_every_answer_over_redis() {
    let uri = redis_uri(9, "");
    let before = redis_keys(&uri);
    {
        let mut host = TestHost::start(HostSpec::redis(9));

        let reply = kombu_call(&host, "simple.add", "add", json!([1, 2]), None);
        let id = reply.request["id"]
            .as_str()
            .expect("a string id")
            .to_owned();
        assert!(uuid::Uuid::parse_str(&id).is_ok());
        assert_eq!(
            reply.payload,
            json!({"jsonrpc": "2.0", "id": id, "result": 3}),
            "{}",
            reply.stderr
        );

        let reply = kombu_call(&host, "simple.add", "add", json!({"x": 40, "y": 2}), None);
        assert_eq!(reply.payload["result"], 42, "{}", reply.stderr);
        assert_eq!(reply.payload["id"], reply.request["id"]);

        let reply = kombu_call(&host, "simple.wordy_add", "wordy_add", json!([1, 2]), None);
        assert_eq!(
            reply.payload["result"], "Adding 1 plus 2 results in 3",
            "{}",
            reply.stderr
        );

        // Every row of docs/protocol.md's error table.
        let rows: [(&str, &str, Value, i64); 7] = [
            ("simple.sub", "sub", json!([1, 2]), -32601),
            ("simple.add", "add", json!([1]), -32602),
            ("simple.add", "add", json!(["a", 2]), -32602),
            ("simple.add", "wordy_add", json!([1, 2]), -32600),
            ("demo.panic", "panic", json!([]), -32603),
            ("demo.fail", "fail", json!([]), -20000),
            ("demo.raise", "raise", json!([404, "nope"]), 404),
        ];
        for (routing_key, method, params, code) in rows {
            let reply = kombu_call(&host, routing_key, method, params.clone(), None);
            assert_eq!(
                error_code(&reply),
                code,
                "{routing_key} {method} {params}: {}\n{}",
                reply.payload,
                reply.stderr
            );
            assert_eq!(reply.payload["jsonrpc"], "2.0");
            assert_eq!(reply.payload["id"], reply.request["id"]);
        }
        let reply = kombu_call(&host, "demo.raise", "raise", json!([404, "nope"]), None);
        assert_eq!(reply.payload["error"]["message"], "nope");

        // Not a request object (kombu sends the dict as JSON).
        let body = json!({"jsonrpc": "1.0", "id": "raw-1", "method": "add", "params": [1, 2]});
        let reply = kombu_call(&host, "simple.add", "add", json!([]), Some(body));
        assert_eq!(error_code(&reply), -32600, "{}", reply.stderr);
        assert_eq!(reply.payload["id"], "raw-1");
        // Not JSON at all (kombu sends a str as text/plain, as is).
        let reply = kombu_call(
            &host,
            "simple.add",
            "add",
            json!([]),
            Some(json!("{not json")),
        );
        assert_eq!(error_code(&reply), -32700, "{}", reply.stderr);
        assert_eq!(reply.payload["id"], Value::Null);
        // Double-encoded: decoded once more.
        let inner = json!({"jsonrpc": "2.0", "id": "dbl", "method": "add", "params": [2, 2]});
        let reply = kombu_call(
            &host,
            "simple.add",
            "add",
            json!([]),
            Some(Value::String(inner.to_string())),
        );
        assert_eq!(reply.payload["result"], 4, "{}", reply.stderr);

        // What the handler sees of a kombu message.
        let reply = kombu_call(&host, "demo.whoami", "whoami", json!([]), None);
        let seen = &reply.payload["result"];
        assert_eq!(seen["routing_key"], "demo.whoami", "{}", reply.stderr);
        assert_eq!(seen["exchange"], host.spec.exchange.as_str());
        assert_eq!(seen["redelivered"], false);
        assert!(seen["reply_to"]
            .as_str()
            .is_some_and(|r| r.starts_with("response-")));

        // The host's own requests (HTTP endpoint, through its one reply list).
        for i in 0..5 {
            let (status, reply) =
                host.http_call("simple.wordy_add", &json!({"id": i, "params": [i, 1]}));
            assert_eq!(status, 200);
            assert_eq!(
                reply["result"],
                format!("Adding {i} plus 1 results in {}", i + 1)
            );
        }
        host.signal("TERM");
        assert!(host.wait(Duration::from_secs(10)).success());
    }
    // The kombu client's SimpleQueue bindings (deleted by the script), our
    // service bindings (deleted by the test), the host's reply list
    // (deleted at close): nothing stays.
    assert_nothing_left(&uri, &before);
}

/// The Python kombu service, printing one JSON line per message.
struct PyService {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl PyService {
    fn start(uri: &str, exchange: &str, bindings: &[(&str, &str)]) -> Self {
        let mut command = Command::new(commissaire_e2e::python_with_kombu());
        command
            .arg(workspace_root().join("tests/python/redis_service.py"))
            .args(["serve", uri, exchange]);
        for (queue, key) in bindings {
            command.arg(format!("{queue}={key}"));
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start redis_service.py");
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
        let service = Self { child, lines };
        assert_eq!(service.line(), "ready");
        service
    }

    fn line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(10))
            .expect("a line from the Python service within 10 s")
    }

    fn message(&self) -> Value {
        let line = self.line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "the Python service exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the Python service did not stop on SIGTERM");
    }
}

impl Drop for PyService {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn cli(host: &TestHost, args: &[&str]) -> std::process::Output {
    Command::new(host_bin())
        .args(args)
        .args([
            "--bus-uri",
            &host.spec.bus_uri,
            "--bus-exchange",
            &host.spec.exchange,
        ])
        .output()
        .expect("run commissaire-host")
}

#[test]
fn a_python_service_and_the_host_call_each_other_over_redis() {
    let uri = redis_uri(8, "");
    let before = redis_keys(&uri);
    {
        let spec = HostSpec::redis(8);
        // Our host serves `simple.wordy_add` and `demo.*`; the Python service
        // serves `simple.add` and watches `observe.*`.
        let services = format!(
            "[[service]]\nname = \"simple\"\nqueues = [{{ name = \"{}\", routing_key = \"simple.wordy_add\" }}]\n\n\
             [[service]]\nname = \"demo\"\nqueues = [{{ name = \"{}\", routing_key = \"demo.*\" }}]\n",
            spec.queue("simple"),
            spec.queue("demo")
        );
        let mut host = TestHost::start_with_services(spec.clone(), &services);
        let py_add = format!("pyadd-{}", spec.suffix);
        let py_observe = format!("pyobserve-{}", spec.suffix);
        let mut service = PyService::start(
            &uri,
            &spec.exchange,
            &[(&py_add, "simple.add"), (&py_observe, "observe.*")],
        );

        // `commissaire-host call` answered by the Python service.
        let out = cli(&host, &["call", "simple.add", "[1, 2]"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "3\n");
        let seen = service.message();
        assert_eq!(seen["routing_key"], "simple.add");
        assert_eq!(seen["body"]["params"], json!([1, 2]));
        assert!(
            seen["reply_to"]
                .as_str()
                .is_some_and(|r| r.starts_with("commissaire-host-reply-")),
            "{seen}"
        );

        // Our handler's bus request answered by the Python service.
        let out = cli(
            &host,
            &["call", "simple.wordy_add", r#"{"x": 20, "y": 22}"#],
        );
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            host.stderr()
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "\"Adding 20 plus 22 results in 42\"\n"
        );
        let seen = service.message();
        assert_eq!(seen["routing_key"], "simple.add");
        assert_eq!(seen["body"]["params"], json!([20, 22]));

        // A notification from Python reaches our handler (demo.relay), whose
        // own notification reaches the Python service.
        let notified = Command::new(commissaire_e2e::python_with_kombu())
            .arg(workspace_root().join("tests/python/redis_service.py"))
            .args([
                "notify",
                &uri,
                &spec.exchange,
                "demo.relay",
                r#"["observe.seen", {"k": 1}]"#,
            ])
            .status()
            .expect("run redis_service.py notify");
        assert!(notified.success());
        let seen = service.message();
        assert_eq!(
            seen,
            json!({
                "routing_key": "observe.seen",
                "reply_to": null,
                "body": {"jsonrpc": "2.0", "method": "seen", "params": {"k": 1}},
            })
        );
        service.stop();
        host.signal("TERM");
        assert!(host.wait(Duration::from_secs(10)).success());
    }
    assert_nothing_left(&uri, &before);
}

fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_worker_s_request_comes_back_after_the_visibility_timeout() {
    let uri = redis_uri(10, "");
    let before = redis_keys(&uri);
    {
        let mut spec = HostSpec::redis(10);
        spec.plugins = vec!["simple"];
        // The first worker serves only `simple.wordy_add`: the `simple.add`
        // its handler sends waits, unserved, on `park`, so the worker is
        // mid-request when it is killed.
        let park = format!("park-{}", spec.suffix);
        let park_member = binding_member("simple.add", &park);
        for key in [
            binding_key(&spec.exchange),
            binding_permanent_key(&spec.exchange),
        ] {
            redis_command(&uri, &["SADD", &key, &park_member]);
        }
        let services = format!(
            "[[service]]\nname = \"simple\"\nqueues = [{{ name = \"{}\", routing_key = \"simple.wordy_add\" }}]\n",
            spec.queue("simple")
        );
        let mut first = TestHost::start_with_services(spec.clone(), &services);
        let caller = request_command(
            &uri,
            &spec.exchange,
            "simple.wordy_add",
            "wordy_add",
            &json!([1, 2]),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start commissaire_request.py");
        wait_until(
            Duration::from_secs(10),
            "the first worker takes the request",
            || redis_command(&uri, &["LLEN", &park]).int() == 1,
        );
        assert_eq!(redis_command(&uri, &["HLEN", "unacked"]).int(), 1);
        first.signal("KILL");
        first.wait(Duration::from_secs(10));
        for key in [
            binding_key(&spec.exchange),
            binding_permanent_key(&spec.exchange),
        ] {
            redis_command(&uri, &["SREM", &key, &park_member]);
        }
        redis_command(&uri, &["DEL", &park]);

        // A second worker on the same queue, `simple.*`, with a visibility
        // timeout of 2 s: it restores the request and answers it.
        let mut second_spec = spec.clone();
        second_spec.bus_uri = redis_uri(10, "?visibility_timeout=2");
        // Handlers that may run longer than the visibility timeout are a
        // configuration error.
        second_spec.service_toml = "handler_timeout = 1\n".to_owned();
        second_spec.extra_toml = "\n[host]\nhandler_grace = 1\n".to_owned();
        let mut second = TestHost::start(second_spec);
        let output = caller.wait_with_output().expect("the caller ends");
        let reply = parse_reply("simple.wordy_add", &output, &second);
        assert_eq!(
            reply.payload["result"],
            "Adding 1 plus 2 results in 3",
            "{}\nfirst:\n{}",
            reply.stderr,
            first.stderr()
        );
        assert_eq!(reply.payload["id"], reply.request["id"]);
        assert!(
            second.stderr().contains("went back to their queues"),
            "{}",
            second.stderr()
        );
        wait_until(Duration::from_secs(5), "the second worker acks", || {
            redis_command(&uri, &["HLEN", "unacked"]).int() == 0
        });
        second.signal("TERM");
        assert!(second.wait(Duration::from_secs(10)).success());
    }
    assert_nothing_left(&uri, &before);
}
