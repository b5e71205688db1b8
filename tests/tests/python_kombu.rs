//! A real Python kombu client (kombu from PyPI) calls the real host over the
//! real RabbitMQ, the way Commissaire's `BusMixin.request` does: a durable
//! topic exchange declared by the caller, an auto-delete `response-<uuid>`
//! reply queue, the request published as a kombu-serialised dict.
//!
//! Needs the Python of `COMMISSAIRE_TEST_PYTHON`, or `<workspace>/.venv`
//! with kombu installed (`scripts/test.sh` creates it).

use std::process::Command;

use commissaire_e2e::host::{HostSpec, TestHost};
use commissaire_e2e::workspace_root;
use serde_json::{json, Value};

/// What the script printed: the reply's payload, and the request it sent.
#[derive(Debug)]
struct KombuReply {
    payload: Value,
    request: Value,
    stderr: String,
}

/// Runs `commissaire_request.py` against `host`; `raw_body` replaces the
/// request the script would build.
fn kombu_call(
    host: &TestHost,
    routing_key: &str,
    method: &str,
    params: &Value,
    raw_body: Option<&Value>,
) -> KombuReply {
    let script = workspace_root().join("tests/python/commissaire_request.py");
    let mut command = Command::new(commissaire_e2e::python_with_kombu());
    command
        .arg(&script)
        .arg(&host.spec.bus_uri)
        .arg(&host.spec.exchange)
        .arg(routing_key)
        .arg(method)
        .arg(params.to_string());
    if let Some(body) = raw_body {
        command.arg("--raw-body").arg(body.to_string());
    }
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "{routing_key} via kombu: {}\nstdout:\n{stdout}\nstderr:\n{stderr}\nhost stderr:\n{}",
        output.status,
        host.stderr()
    );
    let payload = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("{routing_key} via kombu: stdout is not JSON ({e}):\n{stdout}\nstderr:\n{stderr}")
    });
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

/// A call with the request built by the script.
fn call(host: &TestHost, routing_key: &str, method: &str, params: Value) -> KombuReply {
    kombu_call(host, routing_key, method, &params, None)
}

/// The `error` member of an error reply.
fn error(reply: &KombuReply) -> &Value {
    let e = &reply.payload["error"];
    assert!(
        e.is_object() && reply.payload.get("result").is_none(),
        "not an error reply: {}\nstderr:\n{}",
        reply.payload,
        reply.stderr
    );
    e
}

#[test]
fn add_positional_echoes_the_uuid_id() {
    let host = TestHost::start(HostSpec::amqp());
    let reply = call(&host, "simple.add", "add", json!([1, 2]));
    let id = reply.request["id"]
        .as_str()
        .expect("the script sends a string id");
    assert!(uuid::Uuid::parse_str(id).is_ok(), "not a uuid: {id}");
    assert_eq!(
        reply.payload,
        json!({"jsonrpc": "2.0", "id": id, "result": 3}),
        "stderr:\n{}",
        reply.stderr
    );
}

#[test]
fn add_named() {
    let host = TestHost::start(HostSpec::amqp());
    let reply = call(&host, "simple.add", "add", json!({"x": 40, "y": 2}));
    assert_eq!(reply.payload["jsonrpc"], "2.0", "stderr:\n{}", reply.stderr);
    assert_eq!(reply.payload["id"], reply.request["id"]);
    assert_eq!(reply.payload["result"], 42, "stderr:\n{}", reply.stderr);
}

#[test]
fn wordy_add_calls_add_over_the_bus() {
    let host = TestHost::start(HostSpec::amqp());
    let reply = call(&host, "simple.wordy_add", "wordy_add", json!([1, 2]));
    assert_eq!(
        reply.payload["result"], "Adding 1 plus 2 results in 3",
        "stderr:\n{}",
        reply.stderr
    );
    assert_eq!(reply.payload["id"], reply.request["id"]);
}

#[test]
fn error_rows_over_the_wire() {
    let host = TestHost::start(HostSpec::amqp());
    let rows: [(&str, &str, Value, i64); 4] = [
        ("simple.sub", "sub", json!([1, 2]), -32601),
        ("simple.add", "add", json!([1]), -32602),
        ("simple.add", "add", json!(["a", 2]), -32602),
        ("simple.add", "wordy_add", json!([1, 2]), -32600),
    ];
    for (routing_key, method, params, code) in rows {
        let reply = call(&host, routing_key, method, params.clone());
        assert_eq!(
            error(&reply)["code"],
            code,
            "{routing_key} {method} {params}: {}\nstderr:\n{}",
            reply.payload,
            reply.stderr
        );
        assert_eq!(reply.payload["jsonrpc"], "2.0");
        assert_eq!(
            reply.payload["id"], reply.request["id"],
            "{routing_key} {method}: the request's id is echoed"
        );
    }
}

#[test]
fn handler_errors_over_the_wire() {
    let host = TestHost::start(HostSpec::amqp());
    let reply = call(&host, "demo.fail", "fail", json!([]));
    let e = error(&reply);
    assert_eq!(
        (&e["code"], &e["message"]),
        (&json!(-20000), &json!("I was never created")),
        "{}",
        reply.stderr
    );

    let reply = call(&host, "demo.raise", "raise", json!([404, "nope"]));
    let e = error(&reply);
    assert_eq!(
        (&e["code"], &e["message"]),
        (&json!(404), &json!("nope")),
        "{}",
        reply.stderr
    );

    let reply = call(&host, "demo.panic", "panic", json!([]));
    assert_eq!(error(&reply)["code"], -32603, "{}", reply.stderr);
    assert_eq!(reply.payload["id"], reply.request["id"]);
}

#[test]
fn malformed_request_through_kombu() {
    let host = TestHost::start(HostSpec::amqp());
    let body = json!({"jsonrpc": "1.0", "id": "raw-1", "method": "add", "params": [1, 2]});
    let reply = kombu_call(&host, "simple.add", "add", &json!([]), Some(&body));
    assert_eq!(error(&reply)["code"], -32600, "{}", reply.stderr);
    assert_eq!(reply.payload["id"], "raw-1");
}
