//! The HTTP endpoint: `POST /rpc/{routing_key}` relays a JSON-RPC request
//! over the bus; `GET /openrpc.json` describes what it relays (see
//! [`openrpc`]); `GET /healthz` says whether every service is consuming;
//! `GET /metrics` gives every service's counts in Prometheus text.
//!
//! Before a request is relayed it must carry the bearer token (when one is
//! set), name a routing key the bus can carry and `[http] allow` lets
//! through, declare a JSON body, ask for a sane timeout, find a free
//! in-flight slot and room for its body among those held
//! (`[http] max_buffered_bytes`), and send its body, within size and time,
//! in that order; with `[http] validate`, its params must fit its
//! service's contract. The body is held until the request is on the bus, not
//! while it waits for the reply.

mod budget;
mod connection;
mod guard;
mod openrpc;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
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
use serde_json::value::RawValue;

use tokio::sync::Semaphore;

use crate::protocol::{Envelope, EnvelopeError};
use budget::{BodyBudget, Held};

use crate::client::{RequestError, SharedClient};
use crate::config::HttpSettings;
use crate::discovery::ContractCache;
use crate::error::HostError;
use crate::health::Health;
use crate::metrics::http::{HttpCounts, HttpRefusal};
use crate::metrics::text::{Exporter, CONTENT_TYPE};

pub use connection::IDLE_TIMEOUT;

/// How long a client has to send a request's body once its head arrived.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What a chunked body takes from `[http] max_buffered_bytes` before its
/// first byte: a new body is refused at once when not even this is left.
const FIRST_CHUNK_BYTES: usize = 64 * 1024;

/// Bodies from this size on are published one at a time (see
/// [`AppState::large_publish`]).
const LARGE_BODY_BYTES: usize = 1024 * 1024;

/// How long a service's contract is trusted before it is asked again: a
/// roll's new methods show within this.
pub const CONTRACT_TTL: Duration = Duration::from_secs(30);

/// How long a discovery request may take: a service answers it from
/// memory, so one slower than this is busy or gone.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(3);

/// Services whose contracts are kept at once.
const MAX_CONTRACTS: usize = 256;

#[derive(Clone)]
struct AppState {
    client: Arc<SharedClient>,
    health: Arc<Health>,
    metrics: Arc<dyn Exporter>,
    settings: Arc<HttpSettings>,
    in_flight: Arc<Semaphore>,
    budget: Arc<BodyBudget>,
    /// Publishing copies a request twice more (the bus request body, then
    /// the transport's frames): large ones go one at a time, so that those
    /// copies stay at one body's worth whatever the crowd. They share one
    /// bus connection, so this costs them no throughput.
    large_publish: Arc<Semaphore>,
    counts: Arc<HttpCounts>,
    max_body: usize,
    /// The contracts of the services relayed, as asked over the bus.
    contracts: Arc<ContractCache>,
}

impl AppState {
    fn new(
        client: Arc<SharedClient>,
        health: Arc<Health>,
        metrics: Arc<dyn Exporter>,
        settings: &HttpSettings,
        max_body: usize,
    ) -> Self {
        Self {
            client,
            health,
            metrics,
            settings: Arc::new(settings.clone()),
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
            budget: BodyBudget::new(settings.max_buffered_bytes),
            large_publish: Arc::new(Semaphore::new(1)),
            counts: Arc::default(),
            max_body,
            contracts: Arc::new(ContractCache::new(
                CONTRACT_TTL,
                DISCOVERY_TIMEOUT,
                MAX_CONTRACTS,
            )),
        }
    }
}

/// The endpoint's routes; a body over `max_body` bytes gets 413.
pub fn router(
    client: Arc<SharedClient>,
    health: Arc<Health>,
    metrics: Arc<dyn Exporter>,
    settings: &HttpSettings,
    max_body: usize,
) -> Router {
    routes(AppState::new(client, health, metrics, settings, max_body))
}

fn routes(state: AppState) -> Router {
    let mut rpc_route = post(rpc);
    if !state.settings.cors_origins.is_empty() {
        rpc_route = rpc_route
            .options(preflight)
            .layer(axum::middleware::from_fn_with_state(state.clone(), cors));
    }
    Router::new()
        .route("/rpc/{routing_key}", rpc_route)
        .route("/openrpc.json", get(openrpc_document))
        .route("/healthz", get(healthz))
        .route("/metrics", get(scrape))
        .with_state(state)
}

#[derive(serde::Deserialize)]
struct RpcQuery {
    /// Seconds to wait for the reply.
    timeout: Option<f64>,
}

/// A JSON-RPC error with the caller's `id` as sent (`null` without one).
fn error_response(status: StatusCode, id: Option<&RawValue>, error: RpcError) -> Response {
    /// The members in the order they always had (a `Value`'s, sorted).
    #[derive(serde::Serialize)]
    struct ErrorAnswer<'a> {
        error: RpcError,
        id: Option<&'a RawValue>,
        jsonrpc: &'static str,
    }
    let answer = ErrorAnswer {
        error,
        id,
        jsonrpc: "2.0",
    };
    (status, Json(answer)).into_response()
}

/// A request refused before it was read: no id to answer with.
fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    let message = message.into();
    tracing::debug!(status = status.as_u16(), %message, "HTTP request refused");
    error_response(status, None, RpcError::invalid_request(message))
}

/// A request refused for want of room: 503, to try again in a second.
fn refuse_busy(message: impl Into<String>) -> Response {
    let mut response = refuse(StatusCode::SERVICE_UNAVAILABLE, message);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    response
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
    /// The bodies held already fill `[http] max_buffered_bytes`.
    NoRoom,
    Read(axum::Error),
}

/// The whole body, at most `limit` bytes, within [`BODY_READ_TIMEOUT`],
/// with the bytes of `budget` it holds: a declared length's whole before
/// a byte is read, a chunked body's as its buffer grows (doubling, as a
/// `Vec` would, and as much as is left when doubling does not fit).
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    budget: &Arc<BodyBudget>,
) -> Result<(Vec<u8>, Held), BodyError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let first = match declared {
        Some(n) if n > limit as u64 => return Err(BodyError::TooLarge),
        // At most `limit`, so it fits a `usize`.
        Some(n) => usize::try_from(n).unwrap_or(limit),
        None => FIRST_CHUNK_BYTES.min(limit),
    };
    let mut held = budget.take(first).ok_or(BodyError::NoRoom)?;
    let read = async {
        let mut stream = body.into_data_stream();
        let mut buf = Vec::with_capacity(first);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(BodyError::Read)?;
            let needed = buf.len() + chunk.len();
            if needed > limit {
                return Err(BodyError::TooLarge);
            }
            if needed > held.bytes() {
                let doubled = held.bytes().saturating_mul(2).clamp(needed, limit);
                if !held.grow_to(doubled) && !held.grow_to(needed) {
                    return Err(BodyError::NoRoom);
                }
                buf.reserve_exact(held.bytes() - buf.len());
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf)
    };
    let buf = tokio::time::timeout(BODY_READ_TIMEOUT, read)
        .await
        .unwrap_or(Err(BodyError::TooSlow))?;
    Ok((buf, held))
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
    if let Some(refused) = unauthorized(&state, &parts.headers) {
        return refused;
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
        state.counts.refused(HttpRefusal::InFlightFull);
        crate::throttled!(warn!(
            max_in_flight = state.settings.max_in_flight,
            "HTTP requests refused 503: [http] max_in_flight requests in flight already"
        ));
        return refuse_busy("too many requests in flight ([http] max_in_flight); try again");
    };
    let (body, held) = match read_body(&parts.headers, body, state.max_body, &state.budget).await {
        Ok(read) => read,
        Err(BodyError::NoRoom) => {
            state.counts.refused(HttpRefusal::BufferFull);
            crate::throttled!(warn!(
                max_buffered_bytes = state.budget.max(),
                buffered_bytes = state.budget.used(),
                "HTTP request bodies refused 503: the bodies held already fill \
                 [http] max_buffered_bytes"
            ));
            return refuse_busy(
                "the request bodies held now fill [http] max_buffered_bytes; try again",
            );
        }
        Err(BodyError::TooLarge) => {
            state.counts.refused(HttpRefusal::BodyTooLarge);
            crate::throttled!(info!(
                max_message_bytes = state.max_body,
                "HTTP request bodies refused 413: over [bus] max_message_bytes"
            ));
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the body is over {} bytes ([bus] max_message_bytes)",
                    state.max_body
                ),
            );
        }
        Err(BodyError::TooSlow) => {
            state.counts.refused(HttpRefusal::BodyTimeout);
            crate::throttled!(info!(
                timeout = ?BODY_READ_TIMEOUT,
                "HTTP request bodies refused 408: not arrived in time"
            ));
            return refuse(
                StatusCode::REQUEST_TIMEOUT,
                format!("the body did not arrive within {BODY_READ_TIMEOUT:?}"),
            );
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
    relay(&state, &routing_key, body, held, timeout, parent.as_ref()).await
}

/// 401 for a request without the endpoint's token, when it has one.
fn unauthorized(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    let token = state.settings.token.as_ref()?;
    if guard::bearer_matches(headers, token) {
        return None;
    }
    let mut response = refuse(
        StatusCode::UNAUTHORIZED,
        "this endpoint needs `Authorization: Bearer <token>`",
    );
    response
        .headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(response)
}

/// `GET /openrpc.json`: the methods relayed here, from the contracts of
/// the services this host serves and those `[http] allow` names. A service
/// that does not answer discovery is left out.
async fn openrpc_document(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(refused) = unauthorized(&state, &headers) {
        return refused;
    }
    let client = match state.client.get().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "GET /openrpc.json: the bus is unreachable");
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                RpcError::internal_error("the bus is unreachable"),
            );
        }
    };
    let allow = state.settings.allow.as_deref();
    let services = openrpc::candidates(state.health.snapshot().into_keys(), allow);
    let asked = services.into_iter().map(|service| {
        let (client, contracts) = (client.clone(), state.contracts.clone());
        async move {
            let contract = contracts.get(&client, &service).await?;
            Some((service, contract))
        }
    });
    let found: Vec<_> = futures_util::future::join_all(asked)
        .await
        .into_iter()
        .flatten()
        .collect();
    let doc = openrpc::combined(&found, |key| guard::is_allowed(allow, key));
    (StatusCode::OK, Json(doc)).into_response()
}

/// Sends a checked request over the bus and answers with its reply. The
/// body, and the bytes it `held` of the budget, are let go once the
/// request is on the bus.
async fn relay(
    state: &AppState,
    routing_key: &str,
    body: Vec<u8>,
    mut held: Held,
    timeout: Option<Duration>,
    parent: Option<&crate::trace::TraceContext>,
) -> Response {
    let envelope = match Envelope::read(&body) {
        Ok(e) => e,
        Err(e @ EnvelopeError::NotJson(_)) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                None,
                RpcError::parse_error(e.to_string()),
            )
        }
        Err(e @ EnvelopeError::NotAnObject) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                None,
                RpcError::invalid_request(e.to_string()),
            )
        }
    };
    let id = envelope.id;
    if !envelope.method_is(crate::protocol::method_of(routing_key)) {
        let method = envelope.method.map_or("null", RawValue::get);
        return error_response(
            StatusCode::BAD_REQUEST,
            id,
            RpcError::invalid_request(format!(
                "method {method} does not match routing key `{routing_key}`"
            )),
        );
    }
    // As sent: an array or an object, passed on without a copy.
    let params = match envelope.params.map(RawValue::get) {
        None => None,
        Some(p) if p.starts_with(['[', '{']) => Some(p),
        Some(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                id,
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
                id,
                RpcError::internal_error("the bus is unreachable"),
            );
        }
    };
    let Some(id) = id else {
        // A notification: sent, nothing to wait for.
        let notified = {
            let _turn = large_publish_turn(state, params).await;
            client.notify(routing_key, params, parent).await
        };
        return match notified {
            Ok(()) => StatusCode::ACCEPTED.into_response(),
            Err(e) => error_response(
                StatusCode::BAD_GATEWAY,
                None,
                RpcError::internal_error(e.to_string()),
            ),
        };
    };
    if state.settings.validate {
        if let Some(refused) = check_params(state, &client, routing_key, params, id).await {
            return refused;
        }
    }
    // The body goes before the reply comes: the id is kept apart.
    let id = id.to_owned();
    let sent = {
        let _turn = large_publish_turn(state, params).await;
        client
            .send_request(routing_key, params, timeout, parent)
            .await
    };
    // On the bus (or not sent at all): the body is no longer needed while
    // the reply is awaited, which may take minutes; the id is, and stays
    // counted.
    drop(body);
    held.shrink_to(id.get().len());
    let reply = match sent {
        Ok(awaited) => awaited.reply().await,
        Err(e) => Err(e),
    };
    answer(&id, reply)
}

/// Params larger than this are not checked under `[http] validate`.
const MAX_CHECKED_PARAMS_BYTES: usize = 64 * 1024;

/// A contract that refuses a call is asked again first when older than
/// this (see [`ContractCache::get_fresh`]).
const RECHECK_AFTER: Duration = Duration::from_secs(2);

/// `[http] validate`: the answer to a request whose params its service's
/// contract refuses, as the service would give it (-32602 naming the
/// parameter), or `None` to relay it. A service without a contract, and a
/// method its contract lacks, go to the bus: the service is the judge of
/// what it has (a method a roll just added may not be in the contract
/// kept here yet).
async fn check_params(
    state: &AppState,
    client: &crate::client::RpcClient,
    routing_key: &str,
    params: Option<&str>,
    id: &RawValue,
) -> Option<Response> {
    // A large body is relayed unchecked: reading it into values would
    // cost many times its size outside the endpoint's byte budget, and
    // the service checks it anyway.
    if params.is_some_and(|p| p.len() > MAX_CHECKED_PARAMS_BYTES) {
        return None;
    }
    let service = crate::protocol::service_of(routing_key);
    let method = crate::protocol::method_of(routing_key);
    let contract = state.contracts.get(client, service).await?;
    contract.method(method)?;
    // Read into values only here: relaying passes the text on as sent.
    let params: Option<serde_json::Value> = match params.map(serde_json::from_str).transpose() {
        Ok(params) => params,
        Err(_) => return None,
    };
    let refused = |contract: &crate::contract::Contract| match contract
        .check_params(method, params.as_ref())
    {
        Ok(()) | Err(crate::contract::ParamProblem::UnknownMethod { .. }) => None,
        Err(problem) => Some(problem),
    };
    refused(&contract)?;
    // Refused by the contract kept here: unless it is quite new, ask the
    // service again first, since a roll may have widened its params.
    let contract = state
        .contracts
        .get_fresh(client, service, RECHECK_AFTER)
        .await?;
    let problem = refused(&contract)?;
    state.counts.refused(HttpRefusal::InvalidParams);
    tracing::debug!(%routing_key, error = %problem, "HTTP request refused: its params do not fit the contract");
    Some(error_response(
        StatusCode::OK,
        Some(id),
        problem.to_rpc_error(),
    ))
}

/// The caller's turn to publish `params`, when they are large: waiting
/// for it, the body still holds its bytes of the budget.
async fn large_publish_turn<'s>(
    state: &'s AppState,
    params: Option<&str>,
) -> Option<tokio::sync::SemaphorePermit<'s>> {
    match params {
        Some(p) if p.len() >= LARGE_BODY_BYTES => state.large_publish.acquire().await.ok(),
        _ => None,
    }
}

/// The HTTP answer to a relayed request with the caller's `id`.
fn answer(id: &RawValue, reply: Result<Vec<u8>, RequestError>) -> Response {
    match reply {
        Ok(reply) => {
            let unreadable = |e: serde_json::Error| {
                error_response(
                    StatusCode::BAD_GATEWAY,
                    Some(id),
                    RpcError::internal_error(format!("unreadable reply: {e}")),
                )
            };
            let whole = match serde_json::from_slice::<&RawValue>(&reply) {
                Ok(whole) => whole,
                Err(e) => return unreadable(e),
            };
            // Each member as it came, but the id: the bus request carried
            // our own. A reply that is no object is relayed as it is.
            let Ok(mut members) =
                serde_json::from_slice::<BTreeMap<Cow<'_, str>, &RawValue>>(&reply)
            else {
                return (
                    StatusCode::OK,
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    whole.get().to_owned(),
                )
                    .into_response();
            };
            members.insert(Cow::Borrowed("id"), id);
            (StatusCode::OK, Json(members)).into_response()
        }
        Err(e @ RequestError::Timeout { .. }) => error_response(
            StatusCode::GATEWAY_TIMEOUT,
            Some(id),
            RpcError::internal_error(e.to_string()),
        ),
        // No queue takes this routing key: -32601, as the client maps it.
        Err(
            e @ RequestError::Bus(
                crate::bus::BusError::Unroutable { .. } | crate::bus::BusError::NoExchange { .. },
            ),
        ) => error_response(StatusCode::NOT_FOUND, Some(id), RpcError::from(e)),
        Err(e) => error_response(
            StatusCode::BAD_GATEWAY,
            Some(id),
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
    let http = state.counts.snapshot(state.budget.used() as u64);
    // Reading `/proc` for each worker: off the runtime's threads.
    match tokio::task::spawn_blocking(move || exporter.render(&http)).await {
        Ok(text) => ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Raises the process's open-file limit to hold `max_connections` and the
/// rest ([`crate::fd_limit::HEADROOM`]), as far as the hard limit allows;
/// says so when it cannot: connections beyond fail in `accept`.
fn hold_enough_descriptors(max_connections: usize) {
    let wanted = max_connections as u64 + crate::fd_limit::HEADROOM;
    match crate::fd_limit::raise_to(wanted) {
        Ok(limit) if limit.allows(wanted) => {
            if limit.before != limit.now {
                tracing::debug!(
                    before = ?limit.before,
                    now = ?limit.now,
                    "raised the open-file limit for [http] max_connections"
                );
            }
        }
        Ok(limit) => tracing::warn!(
            max_connections,
            open_file_limit = ?limit.now,
            wanted,
            "the open-file limit is too low for [http] max_connections: raise the hard limit \
             (LimitNOFILE= in a systemd unit, ulimit -Hn) or lower max_connections"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            wanted,
            "cannot raise the open-file limit for [http] max_connections"
        ),
    }
}

/// Takes `addr` for the HTTP endpoint: done before anything starts, so
/// that a port already in use ends the host before any service says it is
/// ready.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, HostError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HostError::Http { addr, source })
}

/// Serves the HTTP endpoint on `listener` (from [`bind`]) until `stop`;
/// returns its bound address.
pub async fn serve(
    listener: tokio::net::TcpListener,
    client: Arc<SharedClient>,
    health: Arc<Health>,
    metrics: Arc<dyn Exporter>,
    settings: &HttpSettings,
    max_body: usize,
    stop: tokio_util::sync::CancellationToken,
) -> Result<SocketAddr, HostError> {
    let bound = listener.local_addr().map_err(|source| HostError::Http {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    if settings.token.is_none() && !bound.ip().is_loopback() {
        tracing::warn!(
            listen = %bound,
            "the HTTP endpoint listens beyond this machine without a token: whoever reaches \
             it can call every service it relays; set COMMISSAIRE_HTTP_TOKEN (or [http] token)"
        );
    }
    hold_enough_descriptors(settings.max_connections);
    let state = AppState::new(client, health, metrics, settings, max_body);
    let connections = connection::Connections::new(
        settings.max_connections,
        settings.header_timeout,
        state.counts.clone(),
    );
    tokio::spawn(connection::accept_loop(
        listener,
        routes(state),
        connections,
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
            bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .expect("bind"),
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
            bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .expect("bind"),
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

    /// The endpoint on a bus it cannot reach, with `settings`.
    async fn unreachable(
        settings: &HttpSettings,
    ) -> (SocketAddr, tokio_util::sync::CancellationToken) {
        let client = Arc::new(SharedClient::reconnecting(
            "amqp://127.0.0.1:1/%2f",
            "commissaire",
            Duration::from_secs(1),
            crate::bus::ReplyQueueKind::default(),
        ));
        let stop = tokio_util::sync::CancellationToken::new();
        let addr = serve(
            bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .expect("bind"),
            client,
            Arc::new(Health::default()),
            Arc::new(crate::supervise::metrics::MetricsBook::default()),
            settings,
            1 << 20,
            stop.clone(),
        )
        .await
        .unwrap();
        (addr, stop)
    }

    #[tokio::test]
    async fn a_body_that_cannot_fit_the_budget_is_refused_before_it_is_sent() {
        let settings = HttpSettings {
            max_buffered_bytes: 4096,
            ..HttpSettings::default()
        };
        let (addr, stop) = unreachable(&settings).await;
        // The head alone: the refusal does not wait for the body.
        let answer = exchange(
            addr,
            "POST /rpc/simple.add HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: 5000\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("retry-after: 1"), "{answer}");
        assert!(answer.contains(r#""code":-32600"#), "{answer}");
        assert!(answer.contains("max_buffered_bytes"), "{answer}");
        let metrics = exchange(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            metrics.contains(r#"commissaire_http_refused_total{reason="buffer_full"} 1"#),
            "{metrics}"
        );
        assert!(
            metrics.contains("commissaire_http_buffered_bytes 0"),
            "{metrics}"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn a_request_head_over_64_kib_is_refused() {
        let (addr, stop) = unreachable(&HttpSettings::default()).await;
        let head = |pad: usize| {
            let start = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: ";
            let end = "\r\n\r\n";
            format!("{start}{}{end}", "a".repeat(pad - start.len() - end.len()))
        };
        let answer = exchange(addr, &head(connection::MAX_HEAD_BYTES + 1)).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        let answer = exchange(addr, &head(connection::MAX_HEAD_BYTES - 1)).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "healthz: {answer}");
        stop.cancel();
    }
}
