//! Discovery: a running service answers `<service>.rpc_discover` with its
//! contract (docs/protocol.md, "Discovery"), on RabbitMQ and on Redis, to
//! the host's own callers and to an original Python one; `describe` prints
//! it, `GET /openrpc.json` combines what the HTTP endpoint relays, and
//! `call --check` and `[http] validate` refuse params that do not fit
//! before anything reaches the service.
//!
//! Needs the Python of `COMMISSAIRE_TEST_PYTHON`, or `<workspace>/.venv`
//! with kombu and redis installed (`scripts/test.sh` creates it).

use std::process::{Command, Output};

use commissaire_e2e::host::{
    http_get, redis_keys, redis_uri, AmqpCaller, HostSpec, ReplyQueue, TestHost,
};
use commissaire_e2e::probe::{request, wait_for};
use commissaire_e2e::{host_bin, python_with_kombu, workspace_root};
use serde_json::{json, Value};

/// This file's Redis database.
const REDIS_DB: u8 = 15;

/// The schema of an `i64` argument or result, as `#[service]` writes it.
fn int64() -> Value {
    json!({
        "type": "integer",
        "format": "int64",
        "minimum": i64::MIN,
        "maximum": i64::MAX,
    })
}

/// Asserts that `doc` is the simple plugin's contract.
fn assert_simple_contract(doc: &Value) {
    assert_eq!(doc["openrpc"], "1.3.2", "{doc}");
    assert_eq!(doc["info"]["title"], "simple", "{doc}");
    let methods: Vec<&str> = doc["methods"]
        .as_array()
        .unwrap_or_else(|| panic!("no methods: {doc}"))
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(
        methods,
        ["add", "wordy_add", "add_async", "async_add"],
        "{doc}"
    );
    let add = &doc["methods"][0];
    assert_eq!(
        add["params"],
        json!([
            {"name": "x", "required": true, "schema": int64()},
            {"name": "y", "required": true, "schema": int64()},
        ]),
        "{doc}"
    );
    assert_eq!(add["result"]["schema"], int64(), "{doc}");
    assert_eq!(add["description"], "Adds two integers.", "{doc}");
    assert_eq!(doc["methods"][3]["x-async"], true, "async_add: {doc}");
    assert!(doc.get("x-derived").is_none(), "its own contract: {doc}");
}

/// Runs the host binary with `args`, then the test host's config and bus.
fn command(host: &TestHost, args: &[&str]) -> Output {
    Command::new(host_bin())
        .args(args)
        .arg("--config")
        .arg(&host.config)
        .args(["--bus-uri", &host.spec.bus_uri])
        .env("COMMISSAIRE_LOG", "warn")
        .env_remove("COMMISSAIRE_BUS_URI")
        .output()
        .expect("run commissaire-host")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The value of a `/metrics` series, 0 while it is not there.
fn metric_or_zero(host: &TestHost, series: &str) -> u64 {
    let (_, text) = http_get(host.http, "/metrics").expect("GET /metrics");
    text.as_str()
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

const ADD_OK: &str =
    r#"commissaire_requests_total{service="simple",method="add",outcome="ok",code=""}"#;
const ADD_REFUSED: &str =
    r#"commissaire_requests_total{service="simple",method="add",outcome="error",code="-32602"}"#;

/// Once an add sent after `what` has been counted, asserts that the
/// service counted no -32602 for add: what was refused before it never
/// reached the service. (Each caller waited for its answer before the
/// next one started, and a worker reports all its counts at once.)
fn assert_never_reached_the_service(host: &TestHost, what: &str) {
    let out = command(host, &["call", "simple.add", "[1,2]"]);
    assert_eq!(text(&out.stdout), "3\n", "{}", text(&out.stderr));
    wait_for(
        std::time::Duration::from_secs(20),
        "the add to be counted",
        || metric_or_zero(host, ADD_OK) >= 1,
    );
    assert_eq!(
        metric_or_zero(host, ADD_REFUSED),
        0,
        "{what} reached the service"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_answers_discovery_with_its_contract_over_rabbitmq() {
    let host = TestHost::start(HostSpec::amqp());
    let caller = AmqpCaller::connect(&host.spec.exchange).await;
    // Params are ignored; a caller may send none or any.
    for params in [json!([]), json!({"anything": 1})] {
        let body = request("d1", "rpc_discover", params)
            .to_string()
            .into_bytes();
        let reply = caller
            .call("simple.rpc_discover", &body, ReplyQueue::AutoDelete, None)
            .await;
        assert_eq!(reply.body["id"], "d1", "{}", reply.body);
        assert_simple_contract(&reply.body["result"]);
    }
    let body = request("d2", "rpc_discover", json!([]))
        .to_string()
        .into_bytes();
    let reply = caller
        .call("demo.rpc_discover", &body, ReplyQueue::KombuDurable, None)
        .await;
    let greet = reply.body["result"]["methods"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "greet"))
        .unwrap_or_else(|| panic!("no greet: {}", reply.body))
        .clone();
    assert_eq!(
        greet["params"],
        json!([{"name": "name", "required": false, "schema": {"type": ["string", "null"]}}])
    );
    caller.close().await;
}

#[test]
fn an_original_python_caller_discovers_over_redis() {
    let uri = redis_uri(REDIS_DB, "");
    let before = redis_keys(&uri);
    {
        let host = TestHost::start(HostSpec::redis(REDIS_DB));
        let output = Command::new(python_with_kombu())
            .arg(workspace_root().join("tests/python/commissaire_request.py"))
            .args([
                host.spec.bus_uri.as_str(),
                host.spec.exchange.as_str(),
                "simple.rpc_discover",
                "rpc_discover",
                "[]",
            ])
            .output()
            .expect("run commissaire_request.py");
        let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
        assert!(
            output.status.success(),
            "{stdout}\n{stderr}\nhost:\n{}",
            host.stderr()
        );
        let reply: Value = serde_json::from_str(&stdout).expect("the reply as JSON");
        assert_simple_contract(&reply["result"]);
    }
    let after = redis_keys(&uri);
    let left: Vec<&String> = after.difference(&before).collect();
    assert!(left.is_empty(), "left behind in {uri}: {left:?}");
}

#[test]
fn describe_prints_each_method_as_a_signature() {
    let mut spec = HostSpec::amqp();
    spec.plugins = vec!["simple", "demo", "fixture_older"];
    let host = TestHost::start(spec);

    let out = command(&host, &["describe", "simple"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.starts_with("service simple, version 0.1.0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\nadd(x: integer, y: integer) -> integer\n    Adds two integers.\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\nasync_add(x: integer, y: integer) -> integer  [async]\n"),
        "{stdout}"
    );

    let out = command(&host, &["describe", "demo.greet"]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("\ngreet(name?: string | null) -> string\n"),
        "{stdout}"
    );
    assert!(!stdout.contains("ping("), "one method only: {stdout}");

    let out = command(&host, &["describe", "simple.add", "--json"]);
    let doc: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_simple_contract(&doc);

    let out = command(&host, &["describe", "older"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("no contract: derived from the method list"),
        "{stdout}"
    );

    let out = command(&host, &["describe", "simple.nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("service `simple` has no method `nope` (its methods: add,"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn openrpc_json_lists_what_the_endpoint_relays_behind_its_token() {
    let mut spec = HostSpec::amqp();
    spec.http_toml = "allow = [\"simple.*\"]\n".to_owned();
    spec.env = vec![("COMMISSAIRE_HTTP_TOKEN".to_owned(), "s3cret".to_owned())];
    let host = TestHost::start(spec);
    let get = |auth: &str| {
        commissaire_e2e::http::send(host.http, &format!("GET /openrpc.json HTTP/1.1{auth}"), b"")
    };

    let refused = get("");
    assert_eq!(refused.status, 401, "{:?}", refused.body);
    assert_eq!(
        refused.headers.get("www-authenticate").map(String::as_str),
        Some("Bearer")
    );
    assert!(refused.body.get("methods").is_none(), "{}", refused.body);
    let wrong = get("\r\nAuthorization: Bearer wrong");
    assert_eq!(wrong.status, 401, "{:?}", wrong.body);

    let answer = get("\r\nAuthorization: Bearer s3cret");
    assert_eq!(answer.status, 200, "{:?}\n{}", answer.body, host.stderr());
    let doc = &answer.body;
    let names: Vec<&str> = doc["methods"]
        .as_array()
        .unwrap_or_else(|| panic!("no methods: {doc}"))
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "simple.add",
            "simple.wordy_add",
            "simple.add_async",
            "simple.async_add"
        ],
        "only what [http] allow relays: {doc}"
    );
    assert_eq!(doc["methods"][0]["params"][0]["schema"], int64());
    assert_eq!(doc["x-services"]["simple"]["version"], "0.1.0", "{doc}");
    assert!(doc["x-services"].get("demo").is_none(), "{doc}");
}

#[test]
fn call_check_names_the_wrong_parameter_and_sends_nothing() {
    let host = TestHost::start(HostSpec::amqp());

    let out = command(&host, &["call", "--check", "simple.add", r#"[1, "two"]"#]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    assert!(
        stderr.starts_with("error -32602: invalid argument `y`"),
        "{stderr}"
    );
    assert!(stderr.contains("not sent"), "{stderr}");

    let out = command(
        &host,
        &["call", "--check", "simple.add", r#"{"x": 1, "z": 2}"#],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("error -32602: unknown argument `z`"),
        "{stderr}"
    );

    let out = command(
        &host,
        &["call", "--check", "simple.add", r#"{"x": 40, "y": 2}"#],
    );
    assert_eq!(text(&out.stdout), "42\n", "{}", text(&out.stderr));

    assert_never_reached_the_service(&host, "a call --check refused");
}

#[test]
fn http_validate_answers_minus_32602_naming_the_parameter() {
    let mut spec = HostSpec::amqp();
    spec.http_toml = "validate = true\n".to_owned();
    let host = TestHost::start(spec);

    let (status, body) = host.http_call("simple.add", &json!({"id": 7, "params": [1, "two"]}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], 7, "{body}");
    assert_eq!(body["error"]["code"], -32602, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("`y`"), "{body}");

    let (_, body) = host.http_call("simple.add", &json!({"id": 8, "params": {"x": 1}}));
    assert_eq!(body["error"]["code"], -32602, "{body}");
    assert_eq!(body["error"]["message"], "missing argument `y`", "{body}");

    // A method the contract lacks is still the service's to answer.
    let (_, body) = host.http_call("simple.nope", &json!({"id": 9, "params": []}));
    assert_eq!(body["error"]["code"], -32601, "{body}");

    let (_, body) = host.http_call("simple.add", &json!({"id": 10, "params": [40, 2]}));
    assert_eq!(body["result"], 42, "{body}");

    assert_eq!(
        metric_or_zero(
            &host,
            r#"commissaire_http_refused_total{reason="invalid_params"}"#
        ),
        2
    );
    assert_never_reached_the_service(&host, "a request [http] validate refused");
}

#[test]
fn plugins_openrpc_prints_offline_what_discovery_answers() {
    let mut spec = HostSpec::amqp();
    spec.plugins = vec!["simple", "fixture_older"];
    let host = TestHost::start(spec);
    let offline = Command::new(host_bin())
        .args(["plugins", "--openrpc"])
        .arg(host.plugins_dir())
        .output()
        .expect("run plugins --openrpc");
    assert!(offline.status.success(), "{}", text(&offline.stderr));
    let offline: Value = serde_json::from_slice(&offline.stdout).expect("JSON");
    assert_simple_contract(&offline["simple"]);
    assert_eq!(offline["older"]["x-derived"], true, "{offline}");
    for service in ["simple", "older"] {
        let out = command(&host, &["describe", service, "--json"]);
        let online: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{service}: {e}: {}", text(&out.stderr)));
        assert_eq!(online, offline[service], "{service}");
    }
}
