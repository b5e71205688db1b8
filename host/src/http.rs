//! The HTTP endpoint: `POST /rpc/{routing_key}` relays a JSON-RPC request
//! over the bus; `GET /healthz` says whether every service is consuming.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use commissaire_plugin_api::RpcError;
use serde_json::{json, Value};

use crate::client::{RequestError, SharedClient};
use crate::error::HostError;
use crate::health::Health;

#[derive(Clone)]
struct AppState {
    client: Arc<SharedClient>,
    health: Arc<Health>,
}

/// The endpoint's routes.
/// The endpoint's routes; a body over `max_body` bytes gets 413.
pub fn router(client: Arc<SharedClient>, health: Arc<Health>, max_body: usize) -> Router {
    Router::new()
        .route("/rpc/{routing_key}", post(rpc))
        .route("/healthz", get(healthz))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(AppState { client, health })
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

async fn rpc(
    State(state): State<AppState>,
    Path(routing_key): Path<String>,
    Query(query): Query<RpcQuery>,
    body: Bytes,
) -> Response {
    let null = Value::Null;
    let request: Value = match serde_json::from_slice(&body) {
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
    let expected = crate::bus::topic::method_of(&routing_key);
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
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                id.as_ref().unwrap_or(&null),
                RpcError::internal_error(format!("the bus is unreachable: {e}")),
            )
        }
    };
    let Some(id) = id else {
        // A notification: sent, nothing to wait for.
        return match client.notify(&routing_key, params.as_deref()).await {
            Ok(()) => StatusCode::ACCEPTED.into_response(),
            Err(e) => error_response(
                StatusCode::BAD_GATEWAY,
                &null,
                RpcError::internal_error(e.to_string()),
            ),
        };
    };
    let timeout = query
        .timeout
        .filter(|t| t.is_finite() && *t > 0.0)
        .map(Duration::from_secs_f64);
    match client
        .request_raw(&routing_key, params.as_deref(), timeout)
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
    (status, Json(state.health.to_json())).into_response()
}

/// Serves the HTTP endpoint until `stop`; returns its bound address.
pub async fn serve(
    addr: SocketAddr,
    client: Arc<SharedClient>,
    health: Arc<Health>,
    max_body: usize,
    stop: tokio_util::sync::CancellationToken,
) -> Result<SocketAddr, HostError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HostError::Http { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| HostError::Http { addr, source })?;
    let app = router(client, health, max_body);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP endpoint failed");
        }
    });
    tracing::info!(listen = %bound, "HTTP endpoint ready");
    Ok(bound)
}
