//! The HTTP endpoint: `POST /rpc/{routing_key}` relays a JSON-RPC request
//! over the bus; `GET /healthz` says whether every service is consuming;
//! `GET /metrics` gives every service's counts in Prometheus text.
//!
//! Before a request is relayed it must carry the bearer token (when one is
//! set), name a routing key the bus can carry and `[http] allow` lets
//! through, declare a JSON body, ask for a sane timeout, find a free
//! in-flight slot and send its body, within size and time, in that order.

mod connection;
mod guard;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, CONTENT_LENGTH, RETRY_AFTER, VARY,
    WWW_AUTHENTICATE,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use commissaire_plugin_api::RpcError;
use futures_util::StreamExt as _;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::client::{RequestError, SharedClient};
use crate::config::HttpSettings;
use crate::error::HostError;
use crate::health::Health;
use crate::metrics::text::{Exporter, CONTENT_TYPE};

pub use connection::{HEADER_READ_TIMEOUT, IDLE_TIMEOUT};

/// How long a client has to send a request's body once its head arrived.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct AppState {
    client: Arc<SharedClient>,
    health: Arc<Health>,
    metrics: Arc<dyn Exporter>,
    settings: Arc<HttpSettings>,
    in_flight: Arc<Semaphore>,
    max_body: usize,
}

/// The endpoint's routes; a body over `max_body` bytes gets 413.
pub fn router(
    client: Arc<SharedClient>,
    health: Arc<Health>,
    metrics: Arc<dyn Exporter>,
    settings: &HttpSettings,
    max_body: usize,
) -> Router {
    let state = AppState {
        client,
        health,
        metrics,
        settings: Arc::new(settings.clone()),
        in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
        max_body,
    };
    let mut rpc_route = post(rpc);
    if !settings.cors_origins.is_empty() {
        rpc_route = rpc_route
            .options(preflight)
            .layer(axum::middleware::from_fn_with_state(state.clone(), cors));
    }
    Router::new()
        .route("/rpc/{routing_key}", rpc_route)
        .route("/healthz", get(healthz))
        .route("/metrics", get(scrape))
        .with_state(state)
}

#[derive(serde::Deserialize)]
struct RpcQuery {
    /// Seconds to wait for the reply.
    timeout: Option<f64>,
}

fn error_response(status: StatusCode, id: &Value, error: RpcError) -> Response {
    (
        status,
        Json(json!({"jsonrpc": "2.0", "id": id, "error": error})),
    )
        .into_response()
}

/// A request refused before it was read: no id to answer with.
fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    let message = message.into();
    tracing::debug!(status = status.as_u16(), %message, "HTTP request refused");
    error_response(status, &Value::Null, RpcError::invalid_request(message))
}

/// `[http] cors_origins` is set: listed origins get
/// `Access-Control-Allow-Origin` on every `/rpc/*` answer.
async fn cors(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let origin = guard::listed_origin(request.headers(), &state.settings.cors_origins).cloned();
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.append(VARY, HeaderValue::from_static("origin"));
    if let Some(origin) = origin {
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(
            ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("retry-after, www-authenticate"),
        );
    }
    response
}

/// A browser asks whether it may POST here (`[http] cors_origins` set).
async fn preflight(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if guard::listed_origin(&headers, &state.settings.cors_origins).is_none() {
        return StatusCode::FORBIDDEN.into_response();
    }
    (
        StatusCode::NO_CONTENT,
        [
            (ACCESS_CONTROL_ALLOW_METHODS, "POST"),
            (ACCESS_CONTROL_ALLOW_HEADERS, "authorization, content-type"),
            (ACCESS_CONTROL_MAX_AGE, "600"),
        ],
    )
        .into_response()
}

/// Why a request's body could not be read.
enum BodyError {
    TooLarge,
    TooSlow,
    Read(axum::Error),
}

/// The whole body, at most `limit` bytes, within [`BODY_READ_TIMEOUT`].
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, BodyError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge);
    }
    let read = async {
        let mut stream = body.into_data_stream();
        let mut buf = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(BodyError::Read)?;
            if buf.len() + chunk.len() > limit {
                return Err(BodyError::TooLarge);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(buf))
    };
    tokio::time::timeout(BODY_READ_TIMEOUT, read)
        .await
        .unwrap_or(Err(BodyError::TooSlow))
}

async fn rpc(
    State(state): State<AppState>,
    // Taken as a `Result` so that a key that is not UTF-8 once
    // percent-decoded is refused after the token check, as any other bad
    // key (the extractor's own rejection came first, and in plain text).
    routing_key: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    if let Some(token) = &state.settings.token {
        if !guard::bearer_matches(&parts.headers, token) {
            let mut response = refuse(
                StatusCode::UNAUTHORIZED,
                "this endpoint needs `Authorization: Bearer <token>`",
            );
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    let routing_key = match routing_key {
        Ok(Path(key)) => key,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.body_text()),
    };
    if let Err(e) = crate::bus::topic::check_routing_key(&routing_key) {
        return refuse(StatusCode::BAD_REQUEST, e.to_string());
    }
    if !guard::is_allowed(state.settings.allow.as_deref(), &routing_key) {
        return refuse(
            StatusCode::FORBIDDEN,
            format!("routing key `{routing_key}` is not relayed here ([http] allow)"),
        );
    }
    if !guard::is_json(&parts.headers) {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the request with `Content-Type: application/json`",
        );
    }
    let timeout = match Query::<RpcQuery>::try_from_uri(&parts.uri) {
        Ok(Query(RpcQuery { timeout: None })) => None,
        Ok(Query(RpcQuery {
            timeout: Some(secs),
        })) => match crate::client::timeout_from_secs(secs) {
            Ok(timeout) => Some(timeout),
            Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("?timeout: {e}")),
        },
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("bad ?timeout: {e}")),
    };
    let Ok(_slot) = state.in_flight.clone().try_acquire_owned() else {
        let mut response = refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests in flight ([http] max_in_flight); try again",
        );
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    let body = match read_body(&parts.headers, body, state.max_body).await {
        Ok(body) => body,
        Err(BodyError::TooLarge) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the body is over {} bytes ([bus] max_message_bytes)",
                    state.max_body
                ),
            )
        }
        Err(BodyError::TooSlow) => {
            return refuse(
                StatusCode::REQUEST_TIMEOUT,
                format!("the body did not arrive within {BODY_READ_TIMEOUT:?}"),
            )
        }
        Err(BodyError::Read(e)) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            )
        }
    };
    // The caller's trace, when it sent one: the bus request is its child.
    let parent = parts
        .headers
        .get(crate::trace::HEADER)
        .and_then(|h| h.to_str().ok())
        .and_then(crate::trace::TraceContext::parse);
    relay(&state, &routing_key, &body, timeout, parent.as_ref()).await
}

/// Sends a checked request over the bus and answers with its reply.
async fn relay(
    state: &AppState,
    routing_key: &str,
    body: &[u8],
    timeout: Option<Duration>,
    parent: Option<&crate::trace::TraceContext>,
) -> Response {
    let null = Value::Null;
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &null,
                RpcError::parse_error(format!("body is not valid JSON: {e}")),
            )
        }
    };
    let Some(object) = request.as_object() else {
        return error_response(
            StatusCode::BAD_REQUEST,
            &null,
            RpcError::invalid_request("the body is not a JSON-RPC request object"),
        );
    };
    let id = object.get("id").cloned();
    let expected = crate::bus::topic::method_of(routing_key);
    if let Some(method) = object.get("method") {
        if method.as_str() != Some(expected) {
            return error_response(
                StatusCode::BAD_REQUEST,
                id.as_ref().unwrap_or(&null),
                RpcError::invalid_request(format!(
                    "method {method} does not match routing key `{routing_key}`"
                )),
            );
        }
    }
    let params = match object.get("params") {
        None => None,
        Some(p @ (Value::Array(_) | Value::Object(_))) => Some(p.to_string()),
        Some(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                id.as_ref().unwrap_or(&null),
                RpcError::invalid_request("`params` must be an array or an object"),
            )
        }
    };
    let client = match state.client.get().await {
        Ok(c) => c,
        Err(e) => {
            // The error names the broker (host, user): logged, not answered.
            tracing::warn!(error = %e, "HTTP request: the bus is unreachable");
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                id.as_ref().unwrap_or(&null),
                RpcError::internal_error("the bus is unreachable"),
            );
        }
    };
    let Some(id) = id else {
        // A notification: sent, nothing to wait for.
        return match client.notify(routing_key, params.as_deref(), parent).await {
            Ok(()) => StatusCode::ACCEPTED.into_response(),
            Err(e) => error_response(
                StatusCode::BAD_GATEWAY,
                &null,
                RpcError::internal_error(e.to_string()),
            ),
        };
    };
    match client
        .request_raw(routing_key, params.as_deref(), timeout, parent)
        .await
    {
        Ok(reply) => match serde_json::from_slice::<Value>(&reply) {
            Ok(mut response) => {
                // The bus request carried our own id; answer with the caller's.
                if let Some(o) = response.as_object_mut() {
                    o.insert("id".to_owned(), id);
                }
                (StatusCode::OK, Json(response)).into_response()
            }
            Err(e) => error_response(
                StatusCode::BAD_GATEWAY,
                &id,
                RpcError::internal_error(format!("unreadable reply: {e}")),
            ),
        },
        Err(e @ RequestError::Timeout { .. }) => error_response(
            StatusCode::GATEWAY_TIMEOUT,
            &id,
            RpcError::internal_error(e.to_string()),
        ),
        // No queue takes this routing key: -32601, as the client maps it.
        Err(e @ RequestError::Bus(crate::bus::BusError::Unroutable { .. })) => {
            error_response(StatusCode::NOT_FOUND, &id, RpcError::from(e))
        }
        Err(e) => error_response(
            StatusCode::BAD_GATEWAY,
            &id,
            RpcError::internal_error(e.to_string()),
        ),
    }
}

async fn healthz(State(state): State<AppState>) -> Response {
    let status = if state.health.all_consuming() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = state.health.to_json();
    if let Some(o) = body.as_object_mut() {
        // Requests relayed through this endpoint (or made by this process's
        // handlers, on the embedded bus) still waiting for their reply.
        o.insert(
            "pending_requests".to_owned(),
            state.client.pending_requests().into(),
        );
    }
    (status, Json(body)).into_response()
}

/// `GET /metrics`: every service's counts, in Prometheus text.
async fn scrape(State(state): State<AppState>) -> Response {
    let exporter = state.metrics.clone();
    // Reading `/proc` for each worker: off the runtime's threads.
    match tokio::task::spawn_blocking(move || exporter.render()).await {
        Ok(text) => ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Serves the HTTP endpoint until `stop`; returns its bound address.
pub async fn serve(
    addr: SocketAddr,
    client: Arc<SharedClient>,
    health: Arc<Health>,
    metrics: Arc<dyn Exporter>,
    settings: &HttpSettings,
    max_body: usize,
    stop: tokio_util::sync::CancellationToken,
) -> Result<SocketAddr, HostError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HostError::Http { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| HostError::Http { addr, source })?;
    if settings.token.is_none() && !bound.ip().is_loopback() {
        tracing::warn!(
            listen = %bound,
            "the HTTP endpoint listens beyond this machine without a token: whoever reaches \
             it can call every service it relays; set COMMISSAIRE_HTTP_TOKEN (or [http] token)"
        );
    }
    let app = router(client, health, metrics, settings, max_body);
    tokio::spawn(connection::accept_loop(
        listener,
        app,
        settings.max_connections,
        stop,
    ));
    tracing::info!(
        listen = %bound,
        token = settings.token.is_some(),
        "HTTP endpoint ready"
    );
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    async fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer).await;
        answer
    }

    #[tokio::test]
    async fn an_unreachable_bus_is_not_described_to_http_clients() {
        let client = Arc::new(SharedClient::reconnecting(
            "amqp://alice:pw@127.0.0.1:1/%2f",
            "commissaire",
            Duration::from_secs(1),
            crate::bus::ReplyQueueKind::default(),
        ));
        let stop = tokio_util::sync::CancellationToken::new();
        let addr = serve(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            client,
            Arc::new(Health::default()),
            Arc::new(crate::supervise::metrics::MetricsBook::default()),
            &HttpSettings::default(),
            1 << 20,
            stop.clone(),
        )
        .await
        .unwrap();
        let body = r#"{"id":1,"params":[1,2]}"#;
        let rpc = format!(
            "POST /rpc/simple.add HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let healthz = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        for request in [rpc.as_str(), healthz] {
            let answer = exchange(addr, request).await;
            assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
            for secret in ["alice", "pw", "127.0.0.1:1"] {
                assert!(!answer.contains(secret), "{secret} in {answer}");
            }
        }
        stop.cancel();
    }

    /// Found by fuzzing: a routing key that is not UTF-8 once
    /// percent-decoded was refused by the path extractor, before the token
    /// check and in plain text.
    #[tokio::test]
    async fn the_token_is_checked_before_a_key_that_is_not_utf8() {
        let client = Arc::new(SharedClient::reconnecting(
            "amqp://127.0.0.1:1/%2f",
            "commissaire",
            Duration::from_secs(1),
            crate::bus::ReplyQueueKind::default(),
        ));
        let settings = HttpSettings {
            token: Some(crate::config::HttpToken::parse("t0ken").unwrap()),
            ..HttpSettings::default()
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let addr = serve(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            client,
            Arc::new(Health::default()),
            Arc::new(crate::supervise::metrics::MetricsBook::default()),
            &settings,
            1 << 20,
            stop.clone(),
        )
        .await
        .unwrap();
        let request = |auth: &str| {
            format!(
                "POST /rpc/simple.%D4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\
                 Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
            )
        };
        let answer = exchange(addr, &request("")).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        let answer = exchange(addr, &request("Authorization: Bearer t0ken\r\n")).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains(r#""code":-32600"#), "{answer}");
        stop.cancel();
    }
}
