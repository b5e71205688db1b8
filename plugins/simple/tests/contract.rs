//! The `simple` service's contract: a valid OpenRPC 1.x document that says
//! what its handlers take and give, whose param schemas accept exactly the
//! params its real handlers bind.

#[path = "../../../tests/fixtures/openrpc/conformance.rs"]
mod conformance;

use commissaire_plugin_api::prelude::*;
use commissaire_plugin_api::testing::TestService;
use conformance::{Case, Params};
use simple::Simple;

#[test]
fn the_contract_is_an_openrpc_1_x_document() {
    conformance::assert_valid_openrpc(&TestService::<Simple>::contract());
}

#[test]
fn add_is_described_from_its_signature_and_doc_comment() {
    let doc = TestService::<Simple>::contract();
    assert_eq!(doc["openrpc"], commissaire_plugin_api::OPENRPC_VERSION);
    assert_eq!(doc["info"]["title"], "simple");
    assert_eq!(
        doc["info"]["description"],
        "Adds numbers, directly or by asking itself over the bus."
    );
    assert_eq!(
        conformance::method_names(&doc),
        ["add", "wordy_add", "add_async", "async_add"]
    );

    let add = conformance::method(&doc, "add");
    assert_eq!(add["summary"], "Adds two integers.");
    let i64_schema = json!({
        "type": "integer",
        "format": "int64",
        "minimum": i64::MIN,
        "maximum": i64::MAX,
    });
    assert_eq!(
        add["params"],
        json!([
            {"name": "x", "required": true, "schema": i64_schema},
            {"name": "y", "required": true, "schema": i64_schema},
        ])
    );
    assert_eq!(add["result"]["schema"], i64_schema);
    assert_eq!(
        conformance::method(&doc, "wordy_add")["result"]["schema"],
        json!({"type": "string"})
    );
}

#[test]
fn async_handlers_are_marked_async() {
    let doc = TestService::<Simple>::contract();
    for name in conformance::method_names(&doc) {
        let marked = conformance::method(&doc, name).get("x-async") == Some(&json!(true));
        assert_eq!(
            marked,
            name.ends_with("async") || name.starts_with("async"),
            "{name}"
        );
    }
    assert_eq!(conformance::method(&doc, "async_add")["x-async"], true);
}

/// Whether `x + y` overflows an `i64`: `add` answers -32602 to it, and the
/// methods that call `add` pass that on. The contract cannot say it.
fn sum_overflows(args: &conformance::Args) -> bool {
    match (
        conformance::integer(&args["x"]),
        conformance::integer(&args["y"]),
    ) {
        (Some(x), Some(y)) => i64::try_from(x + y).is_err(),
        _ => false,
    }
}

#[test]
fn the_param_schemas_accept_exactly_what_the_handlers_bind() {
    let svc = TestService::<Simple>::new();
    let cases = ["add", "wordy_add", "add_async", "async_add"]
        .map(|method| Case::call(method).refusing_when(sum_overflows));
    conformance::assert_params_match_handlers(
        &TestService::<Simple>::contract(),
        &cases,
        |method, params| svc.call(method, params),
    );
}

#[test]
fn an_overflowing_sum_is_refused_by_meaning_not_by_the_contract() {
    let doc = TestService::<Simple>::contract();
    let svc = TestService::<Simple>::new();
    for method in conformance::method_names(&doc) {
        let params = json!({"x": i64::MAX, "y": 1});
        assert_eq!(Params::of(&doc, method).refusal(&params), None, "{method}");
        let refused = svc.call(method, params).expect_err(method);
        assert_eq!(refused.code, RpcError::INVALID_PARAMS, "{method}");
        assert!(
            refused.message.contains("overflows"),
            "{method}: {refused:?}"
        );
    }
}
