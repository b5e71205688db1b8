//! The dispatcher with the real `simple` and `demo` plugins: one test per
//! request rule and error row of docs/protocol.md.

use commissaire_e2e::RoutingBus;
use serde_json::{json, Value};
use std::sync::Arc;

fn bus() -> Arc<RoutingBus> {
    RoutingBus::serving(&["simple", "demo"])
}

fn error_code(reply: &Value) -> i64 {
    reply["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error: {reply}"))
}

#[test]
fn positional_params() {
    let reply = bus().call("simple.add", json!([1, 2]));
    assert_eq!(reply, json!({"jsonrpc": "2.0", "id": "t-1", "result": 3}));
}

#[test]
fn named_params() {
    assert_eq!(
        bus().call("simple.add", json!({"x": 40, "y": 2}))["result"],
        42
    );
}

#[test]
fn absent_params_mean_no_arguments() {
    let reply = bus()
        .deliver("demo.ping", br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
        .unwrap();
    assert_eq!(reply["result"], "pong");
}

#[test]
fn option_argument_omitted() {
    let b = bus();
    assert_eq!(b.call("demo.greet", json!([]))["result"], "hello, world!");
    assert_eq!(b.call("demo.greet", json!({}))["result"], "hello, world!");
    assert_eq!(
        b.call("demo.greet", json!(["ann"]))["result"],
        "hello, ann!"
    );
}

#[test]
fn invalid_params_missing_argument() {
    let reply = bus().call("simple.add", json!([1]));
    assert_eq!(error_code(&reply), -32602);
    assert!(
        reply["error"]["message"].as_str().unwrap().contains("`y`"),
        "{reply}"
    );
}

#[test]
fn invalid_params_too_many_arguments() {
    assert_eq!(
        error_code(&bus().call("simple.add", json!([1, 2, 3]))),
        -32602
    );
}

#[test]
fn invalid_params_unknown_named_argument() {
    let reply = bus().call("simple.add", json!({"x": 1, "y": 2, "z": 3}));
    assert_eq!(error_code(&reply), -32602);
    assert!(
        reply["error"]["message"].as_str().unwrap().contains("`z`"),
        "{reply}"
    );
}

#[test]
fn invalid_params_wrong_type() {
    let reply = bus().call("simple.add", json!(["one", 2]));
    assert_eq!(error_code(&reply), -32602);
    assert!(
        reply["error"]["message"].as_str().unwrap().contains("`x`"),
        "{reply}"
    );
}

#[test]
fn parse_error_has_null_id() {
    let reply = bus()
        .deliver("simple.add", b"{\"id\": 1, \"method\": ")
        .unwrap();
    assert_eq!(error_code(&reply), -32700);
    assert_eq!(reply["id"], Value::Null);
    assert_eq!(reply["jsonrpc"], "2.0");
}

#[test]
fn parse_error_for_invalid_utf8() {
    let reply = bus().deliver("simple.add", b"\xff\xfe").unwrap();
    assert_eq!(error_code(&reply), -32700);
}

#[test]
fn invalid_request_not_an_object() {
    let reply = bus().deliver("simple.add", b"[1, 2]").unwrap();
    assert_eq!(error_code(&reply), -32600);
    assert_eq!(reply["id"], Value::Null);
}

#[test]
fn invalid_request_method_missing_or_not_a_string() {
    let b = bus();
    let reply = b
        .deliver("simple.add", br#"{"id":"a","params":[1,2]}"#)
        .unwrap();
    assert_eq!(
        (error_code(&reply), reply["id"].clone()),
        (-32600, json!("a"))
    );
    let reply = b
        .deliver("simple.add", br#"{"id":"a","method":1}"#)
        .unwrap();
    assert_eq!(error_code(&reply), -32600);
}

#[test]
fn invalid_request_params_neither_array_nor_object() {
    let reply = bus()
        .deliver("simple.add", br#"{"id":"a","method":"add","params":"1,2"}"#)
        .unwrap();
    assert_eq!(error_code(&reply), -32600);
}

#[test]
fn invalid_request_wrong_jsonrpc_version() {
    let reply = bus()
        .deliver(
            "simple.add",
            br#"{"jsonrpc":"1.0","id":"a","method":"add","params":[1,2]}"#,
        )
        .unwrap();
    assert_eq!(error_code(&reply), -32600);
}

#[test]
fn invalid_request_method_differs_from_routing_key() {
    let reply = bus()
        .deliver(
            "simple.add",
            br#"{"jsonrpc":"2.0","id":"a","method":"wordy_add","params":[1,2]}"#,
        )
        .unwrap();
    assert_eq!(
        (error_code(&reply), reply["id"].clone()),
        (-32600, json!("a"))
    );
}

#[test]
fn unreadable_id_is_answered_with_null() {
    let reply = bus()
        .deliver(
            "simple.add",
            br#"{"jsonrpc":"2.0","id":{"x":1},"method":"add","params":[1,2]}"#,
        )
        .unwrap();
    assert_eq!(
        (error_code(&reply), reply["id"].clone()),
        (-32600, Value::Null)
    );
}

#[test]
fn method_not_found() {
    let reply = bus().call("simple.sub", json!([1, 2]));
    assert_eq!(error_code(&reply), -32601);
    assert!(reply["error"]["message"].as_str().unwrap().contains("sub"));
}

#[test]
fn handler_error_codes_pass_through() {
    let b = bus();
    let reply = b.call("demo.fail", json!([]));
    assert_eq!(
        reply["error"],
        json!({"code": -20000, "message": "I was never created",
               "data": {"exception": "NotImplementedError"}})
    );
    for code in [-20001, 404, 409] {
        let reply = b.call("demo.raise", json!([code, "custom"]));
        assert_eq!(reply["error"], json!({"code": code, "message": "custom"}));
    }
}

#[test]
fn panic_becomes_internal_error_and_the_next_call_works() {
    let b = bus();
    let reply = b.call("demo.panic", json!([]));
    assert_eq!(error_code(&reply), -32603);
    assert!(
        !reply["error"]["message"].as_str().unwrap().contains("src/"),
        "no stack trace"
    );
    assert_eq!(b.call("demo.ping", json!([]))["result"], "pong");
}

#[test]
fn double_encoded_body() {
    let inner = r#"{"jsonrpc":"2.0","id":"d","method":"add","params":[20,22]}"#;
    let body = serde_json::to_vec(inner).unwrap();
    let reply = bus().deliver("simple.add", &body).unwrap();
    assert_eq!(reply, json!({"jsonrpc": "2.0", "id": "d", "result": 42}));
}

#[test]
fn any_scalar_id_is_echoed() {
    let b = bus();
    for id in [json!(7), json!("uuid-x"), json!(null), json!(1.5)] {
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "add", "params": [1, 1]});
        let reply = b
            .deliver("simple.add", body.to_string().as_bytes())
            .unwrap();
        assert_eq!(reply["id"], id);
    }
}

#[test]
fn notification_runs_the_handler_and_produces_no_reply() {
    let b = bus();
    // Commissaire's notify: no reply_to, no id.
    let body = br#"{"jsonrpc":"2.0","method":"relay","params":["simple.add",[1,2]]}"#;
    assert_eq!(b.deliver_with("demo.relay", body, None), None);
    assert_eq!(b.notified(), vec![("simple.add".to_owned(), json!([1, 2]))]);
    // A bad notification is not answered either.
    assert_eq!(b.deliver_with("demo.relay", b"nonsense", None), None);
}

#[test]
fn message_tells_the_handler_about_its_request() {
    let reply = bus().call("demo.whoami", json!([]));
    assert_eq!(
        reply["result"],
        json!({"routing_key": "demo.whoami", "method": "whoami", "id": "t-1",
               "reply_to": "reply-queue", "correlation_id": "corr-1",
               "redelivered": false, "exchange": "commissaire",
               "trace_id": "0af7651916cd43dd8448eb211c80319c",
               "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
               "remaining_ms": null})
    );
}

#[test]
fn wordy_add_calls_simple_add_over_the_host_bus() {
    let reply = bus().call("simple.wordy_add", json!([1, 2]));
    assert_eq!(reply["result"], "Adding 1 plus 2 results in 3");
}
