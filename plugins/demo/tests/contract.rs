//! The `demo` service's contract: a valid OpenRPC 1.x document that says
//! what its handlers take and give, whose param schemas accept exactly the
//! params its real handlers bind.

#[path = "../../../tests/fixtures/openrpc/conformance.rs"]
mod conformance;

use commissaire_plugin_api::prelude::*;
use commissaire_plugin_api::testing::TestService;
use conformance::{Case, Params};
use demo::Demo;

#[test]
fn the_contract_is_an_openrpc_1_x_document() {
    conformance::assert_valid_openrpc(&TestService::<Demo>::contract());
}

#[test]
fn every_handler_is_a_method_described_from_its_signature() {
    let doc = TestService::<Demo>::contract();
    assert_eq!(doc["info"]["title"], "demo");
    assert_eq!(
        doc["info"]["description"],
        "The service guide's example service."
    );
    assert_eq!(
        conformance::method_names(&doc),
        [
            "ping",
            "echo",
            "fail",
            "greet",
            "raise",
            "panic",
            "log_and_panic",
            "abort",
            "sleep",
            "nap",
            "block",
            "redis_incr",
            "whoami",
            "parse",
            "chatter",
            "print",
            "relay",
            "announce",
            "ask",
            "later",
        ]
    );

    let greet = conformance::method(&doc, "greet");
    assert_eq!(
        greet["params"],
        json!([{"name": "name", "required": false, "schema": {"type": ["string", "null"]}}])
    );
    assert_eq!(greet["result"]["schema"], json!({"type": "string"}));

    // `Value` takes and gives anything.
    let echo = conformance::method(&doc, "echo");
    assert_eq!(echo["params"][0]["schema"], true);
    assert_eq!(echo["params"][0]["required"], true);
    assert_eq!(echo["result"]["schema"], true);

    let ask = conformance::method(&doc, "ask");
    let required: Vec<(&Value, &Value)> = ask["params"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| (&p["name"], &p["required"]))
        .collect();
    assert_eq!(
        required,
        [
            (&json!("routing_key"), &json!(true)),
            (&json!("params"), &json!(true)),
            (&json!("timeout_ms"), &json!(false)),
        ]
    );
    assert_eq!(
        ask["params"][2]["schema"]["type"],
        json!(["integer", "null"])
    );
    assert_eq!(ask["params"][2]["schema"]["minimum"], 0);

    assert_eq!(conformance::method(&doc, "fail")["params"], json!([]));
    assert_eq!(
        conformance::method(&doc, "sleep")["params"][0]["schema"],
        json!({"type": "integer", "format": "uint64", "minimum": 0, "maximum": u64::MAX})
    );
}

#[test]
fn the_summary_is_the_first_sentence_and_the_description_all_of_it() {
    let doc = TestService::<Demo>::contract();
    let parse = conformance::method(&doc, "parse");
    assert_eq!(parse["summary"], "Parses `text` as JSON.");
    assert_eq!(
        parse["description"],
        "Parses `text` as JSON.\n\nA `serde_json::Error` becomes -32603 with its text."
    );
    let ping = conformance::method(&doc, "ping");
    assert_eq!(ping["summary"], "Answers \"pong\".");
}

#[test]
fn async_handlers_are_marked_async() {
    let doc = TestService::<Demo>::contract();
    let marked: Vec<&str> = conformance::method_names(&doc)
        .into_iter()
        .filter(|name| conformance::method(&doc, name).get("x-async") == Some(&json!(true)))
        .collect();
    assert_eq!(marked, ["nap", "block", "redis_incr"]);
}

/// How the property treats each method: called with generated params, or
/// skipped for the reason given.
fn cases() -> Vec<Case> {
    vec![
        Case::call("ping"),
        Case::call("echo"),
        Case::call("fail"),
        Case::call("greet"),
        Case::call("raise").refusing_when(asks_for_invalid_params),
        Case::skip("panic", "panics on purpose"),
        Case::skip("log_and_panic", "panics on purpose"),
        Case::skip("abort", "aborts the test process on purpose"),
        Case::call("sleep").small(&["ms"]),
        Case::call("nap").small(&["ms"]),
        Case::call("block").small(&["ms"]),
        Case::skip(
            "redis_incr",
            "reaches Redis over the network (and answers -32602 to a URL its client cannot parse)",
        ),
        Case::call("whoami"),
        Case::call("parse"),
        Case::call("chatter"),
        Case::skip("print", "writes to the test's stdout"),
        Case::call("relay"),
        Case::call("announce"),
        Case::call("ask"),
        Case::call("later"),
    ]
}

/// `raise` answers with the code it is given: -32602 when asked for it.
/// The contract (any `i64`) cannot say it.
fn asks_for_invalid_params(args: &conformance::Args) -> bool {
    conformance::integer(&args["code"]) == Some(RpcError::INVALID_PARAMS.into())
}

#[test]
fn the_param_schemas_accept_exactly_what_the_handlers_bind() {
    let svc = TestService::<Demo>::new();
    conformance::assert_params_match_handlers(
        &TestService::<Demo>::contract(),
        &cases(),
        |method, params| svc.call(method, params),
    );
}

#[test]
fn raise_refuses_by_meaning_only_when_asked_to() {
    let doc = TestService::<Demo>::contract();
    let svc = TestService::<Demo>::new();
    let params = json!([RpcError::INVALID_PARAMS, "as asked"]);
    assert_eq!(Params::of(&doc, "raise").refusal(&params), None);
    assert_eq!(
        svc.call("raise", params),
        Err(RpcError::new(RpcError::INVALID_PARAMS, "as asked"))
    );
}
