//! The HTTP relay decision: path, query, headers and body of a
//! `POST /rpc/{routing_key}` through the real router, over an embedded
//! bus where no service consumes.
//!
//! Properties: the status is the one the checks give, in their documented
//! order (token 401, routing key 400, `[http] allow` 403, content type
//! 415, `?timeout` 400, body 400 with a JSON-RPC error), and a relayed
//! request is answered 404/-32601 (no consumer) or 202 (notification);
//! never a 5xx, and every JSON-RPC error carries the request's id.
#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode};
use axum::Router;
use commissaire_host::bus::memory::MemoryBus;
use commissaire_host::bus::topic::{check_routing_key, matches};
use commissaire_host::client::{RpcClient, SharedClient};
use commissaire_host::config::{HostConfig, Overrides};
use commissaire_host::health::Health;
use commissaire_host::protocol::method_of;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tower::ServiceExt as _;

const TOKEN: &str = "fuzz-token-0123";
const ALLOW: [&str; 2] = ["simple.*", "demo.#"];

#[derive(Arbitrary, Debug)]
struct Input {
    guarded: bool,
    routing_key: Vec<u8>,
    query: String,
    authorization: Option<Vec<u8>>,
    content_type: Option<Vec<u8>>,
    body: Vec<u8>,
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    open: Router,
    guarded: Router,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // Only the guarded endpoint has a token (and an allow-list).
        let router = |toml: &str, token: bool| {
            let env =
                |name: &str| (token && name == "COMMISSAIRE_HTTP_TOKEN").then(|| TOKEN.to_owned());
            let config = HostConfig::load_text(
                Path::new("/nonexistent/host.toml"),
                toml.to_owned(),
                &Overrides::default(),
                env,
            )
            .expect("fixture config");
            runtime.block_on(async {
                let bus = Arc::new(MemoryBus::new());
                let client = RpcClient::start(
                    bus,
                    "commissaire",
                    Duration::from_secs(1),
                    Default::default(),
                )
                .await
                .expect("client");
                commissaire_host::http::router(
                    Arc::new(SharedClient::fixed(client)),
                    Arc::new(Health::default()),
                    Arc::new(commissaire_host::supervise::metrics::MetricsBook::default()),
                    &config.http,
                    64 * 1024,
                )
            })
        };
        let open = router("[bus]\nuri = \"memory://\"\n", false);
        let guarded = router(
            &format!("[bus]\nuri = \"memory://\"\n[http]\nallow = {ALLOW:?}\n"),
            true,
        );
        Fixture {
            runtime,
            open,
            guarded,
        }
    })
}

fn percent_encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `Authorization: Bearer <token>`, by RFC 9110: a case-insensitive
/// scheme, one or more spaces, the token.
fn bearer_ok(value: Option<&[u8]>) -> bool {
    let Some(text) = value.and_then(|v| std::str::from_utf8(v).ok()) else {
        return false;
    };
    let Some((scheme, token)) = text.split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer") && token.trim_matches([' ', '\t']) == TOKEN
}

fn json_ok(value: Option<&[u8]>) -> bool {
    value
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

fuzz_target!(|input: Input| {
    let f = fixture();
    let uri = format!(
        "/rpc/{}?{}",
        percent_encode(&input.routing_key),
        input.query
    );
    let mut request = Request::post(uri.as_str());
    let authorization = input
        .authorization
        .as_deref()
        .filter(|v| HeaderValue::from_bytes(v).is_ok());
    let content_type = input
        .content_type
        .as_deref()
        .filter(|v| HeaderValue::from_bytes(v).is_ok());
    if let Some(v) = authorization {
        request = request.header("authorization", v);
    }
    if let Some(v) = content_type {
        request = request.header("content-type", v);
    }
    let Ok(request) = request.body(Body::from(input.body.clone())) else {
        return; // Not a URI a client could send.
    };
    let router = if input.guarded { &f.guarded } else { &f.open };
    let response = f.runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), router.clone().oneshot(request))
            .await
            .expect("the endpoint did not answer within 5 s")
            .expect("infallible")
    });
    let status = response.status();
    let body = f.runtime.block_on(async {
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body")
    });
    assert!(!status.is_server_error(), "{status} for {input:?}");

    // `/rpc/` with no routing key is no route: the router's 404, before
    // any check of the endpoint's.
    if input.routing_key.is_empty() {
        assert_eq!(status, StatusCode::NOT_FOUND, "{input:?}");
        return;
    }
    // The checks in order; the first failing one decides.
    let key = String::from_utf8(input.routing_key.clone());
    let want = if input.guarded && !bearer_ok(authorization) {
        Some(StatusCode::UNAUTHORIZED)
    } else if key.as_ref().map_or(true, |k| check_routing_key(k).is_err()) {
        Some(StatusCode::BAD_REQUEST)
    } else if input.guarded
        && !ALLOW
            .iter()
            .any(|p| key.as_ref().is_ok_and(|k| matches(p, k)))
    {
        Some(StatusCode::FORBIDDEN)
    } else if !json_ok(content_type) {
        Some(StatusCode::UNSUPPORTED_MEDIA_TYPE)
    } else {
        None
    };
    if let Some(want) = want {
        assert_eq!(status, want, "{input:?}");
        return;
    }
    // Past the header checks: a `?timeout` the endpoint refuses is a 400
    // with a plain message; the rest is JSON-RPC.
    if status == StatusCode::BAD_REQUEST && !body.starts_with(b"{") {
        assert!(input.query.contains("timeout"), "{input:?}: {body:?}");
        return;
    }
    let plain: Option<Value> = serde_json::from_slice(&input.body).ok();
    let object = plain.as_ref().and_then(Value::as_object);
    let key = key.unwrap_or_default();
    match status {
        StatusCode::ACCEPTED => {
            let o = object.expect("202 for a body that is not an object");
            assert!(o.get("id").is_none(), "a request with an id answered 202");
        }
        StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST => {
            let reply: Value = serde_json::from_slice(&body).expect("a JSON-RPC error body");
            let code = reply["error"]["code"].as_i64().expect("an error code");
            let id = object
                .and_then(|o| o.get("id"))
                .cloned()
                .unwrap_or(Value::Null);
            if status == StatusCode::NOT_FOUND {
                assert_eq!(code, -32601);
                assert_eq!(reply["id"], id);
                let o = object.expect("relayed a body that is not an object");
                assert!(o
                    .get("method")
                    .is_none_or(|m| m.as_str() == Some(method_of(&key))));
            } else {
                assert!([-32700, -32600].contains(&code), "code {code}");
                if code == -32700 {
                    assert!(plain.is_none(), "valid JSON refused as unparsable");
                } else {
                    assert_eq!(reply["id"], id);
                }
            }
        }
        other => panic!("unexpected {other} for {input:?}: {body:?}"),
    }
});
