//! The host's own requests: from handlers, from `call`, from the HTTP
//! endpoint. One reply queue per connection and a map of pending requests;
//! never a queue per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use commissaire_plugin_api::RpcError;
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use crate::bus::{BusError, BusTransport, Incoming, Outgoing, ReplyQueueKind};
use crate::protocol::{read_response, request_body};
use crate::trace::TraceContext;

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>>;

/// Why a request got no usable reply.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No reply within the deadline.
    #[error("no reply from `{routing_key}` within {timeout:?}")]
    Timeout {
        /// Where the request went.
        routing_key: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The reply is not a JSON-RPC response.
    #[error("unreadable reply from `{routing_key}`: {reason}")]
    BadReply {
        /// Where the request went.
        routing_key: String,
        /// Why.
        reason: String,
    },
}

impl From<RequestError> for RpcError {
    /// A request nobody can take is -32601 (no handler for the method);
    /// any other failure -32603.
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Bus(
                unroutable @ (BusError::Unroutable { .. } | BusError::NoExchange { .. }),
            ) => RpcError::new(RpcError::METHOD_NOT_FOUND, unroutable.to_string()),
            e => RpcError::internal_error(e.to_string()),
        }
    }
}

/// Sends requests and matches replies to them.
pub struct RpcClient {
    bus: Arc<dyn BusTransport>,
    exchange: String,
    reply_to: String,
    pending: Pending,
    default_timeout: Duration,
    closed: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcClient")
            .field("exchange", &self.exchange)
            .field("reply_to", &self.reply_to)
            .finish_non_exhaustive()
    }
}

impl RpcClient {
    /// Opens the connection's reply queue (of `reply_queue` kind, where
    /// the bus has a choice) and starts routing replies.
    pub async fn start(
        bus: Arc<dyn BusTransport>,
        exchange: &str,
        default_timeout: Duration,
        reply_queue: ReplyQueueKind,
    ) -> Result<Arc<Self>, BusError> {
        let (reply_to, replies) = bus.reply_queue(reply_queue).await?;
        let pending: Pending = Arc::default();
        let closed = tokio_util::sync::CancellationToken::new();
        let routed = route_replies(replies, pending.clone());
        let done = closed.clone();
        tokio::spawn(async move {
            routed.await;
            done.cancel();
        });
        Ok(Arc::new(Self {
            bus,
            exchange: exchange.to_owned(),
            reply_to,
            pending,
            default_timeout,
            closed,
        }))
    }

    /// Whether its reply queue is gone (the connection was lost or closed).
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// The bus this client uses.
    pub fn bus(&self) -> &Arc<dyn BusTransport> {
        &self.bus
    }

    /// The default deadline.
    pub fn default_timeout(&self) -> Duration {
        self.default_timeout
    }

    /// Sends a request with raw `params` JSON text (or none) and returns the
    /// raw reply body. The request's id is a fresh uuid, also sent as the
    /// correlation id. It carries a `traceparent`: a span in `parent`'s
    /// trace, or the root of a new one.
    pub async fn request_raw(
        &self,
        routing_key: &str,
        params: Option<&str>,
        timeout: Option<Duration>,
        parent: Option<&TraceContext>,
    ) -> Result<Vec<u8>, RequestError> {
        self.send_request(routing_key, params, timeout, parent)
            .await?
            .reply()
            .await
    }

    /// Sends a request as [`RpcClient::request_raw`] does, and returns once
    /// it is published: the caller may drop what `params` borrows from (a
    /// large HTTP body) before it waits for the reply.
    pub async fn send_request(
        &self,
        routing_key: &str,
        params: Option<&str>,
        timeout: Option<Duration>,
        parent: Option<&TraceContext>,
    ) -> Result<AwaitedReply, RequestError> {
        crate::bus::topic::check_routing_key(routing_key).map_err(BusError::from)?;
        let timeout = timeout.unwrap_or(self.default_timeout);
        // A handler's request (this runs on its thread, before the first
        // await) never outlives the request it serves.
        let deadline = crate::deadline::after(timeout);
        let deadline = crate::deadline::current().map_or(deadline, |d| d.min(deadline));
        let traceparent = TraceContext::child_of(parent).header();
        let id = uuid::Uuid::new_v4().to_string();
        let body = request_body(routing_key, Some(&id), params);
        let (tx, rx) = oneshot::channel();
        self.pending_map().insert(id.clone(), tx);
        // Removes the entry however this ends: reply, timeout, a failed
        // publish, or dropped by its caller (an HTTP client that went
        // away).
        let entry = PendingEntry {
            pending: self.pending.clone(),
            id,
        };
        self.bus
            .publish(Outgoing {
                exchange: &self.exchange,
                routing_key,
                body: &body,
                reply_to: Some(&self.reply_to),
                correlation_id: Some(entry.id.as_bytes()),
                durable: false,
                confirm: false,
                expires: Some(timeout),
                traceparent: Some(&traceparent),
                deadline: Some(deadline),
                reply_ttl: None,
            })
            .await?;
        Ok(AwaitedReply {
            rx,
            _entry: entry,
            routing_key: routing_key.to_owned(),
            timeout,
        })
    }

    /// Sends a request and returns its result's JSON text, or the error the
    /// service answered with (`parent`: as for [`RpcClient::request_raw`]).
    pub async fn request(
        &self,
        routing_key: &str,
        params: Option<&str>,
        timeout: Option<Duration>,
        parent: Option<&TraceContext>,
    ) -> Result<Result<Box<RawValue>, RpcError>, RequestError> {
        let reply = self
            .request_raw(routing_key, params, timeout, parent)
            .await?;
        let bad = |reason: String| RequestError::BadReply {
            routing_key: routing_key.to_owned(),
            reason,
        };
        read_response(&reply).map_err(bad)
    }

    /// Sends a notification (no `reply_to`, no `id`, as Commissaire's
    /// `notify`), in `parent`'s trace or a new one.
    pub async fn notify(
        &self,
        routing_key: &str,
        params: Option<&str>,
        parent: Option<&TraceContext>,
    ) -> Result<(), BusError> {
        crate::bus::topic::check_routing_key(routing_key)?;
        let body = request_body(routing_key, None, params);
        let traceparent = TraceContext::child_of(parent).header();
        self.bus
            .publish(Outgoing {
                exchange: &self.exchange,
                routing_key,
                body: &body,
                reply_to: None,
                correlation_id: None,
                durable: false,
                confirm: false,
                expires: None,
                traceparent: Some(&traceparent),
                deadline: None,
                reply_ttl: None,
            })
            .await
    }

    /// The exchange requests, notifications and publications go through.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// Publishes `body` unchanged on the exchange under `routing_key`, as a
    /// notification goes (no `reply_to`, not persistent), in `parent`'s
    /// trace or a new one: the raw bodies of Commissaire's
    /// `producer.publish`, not JSON-RPC.
    pub async fn publish_raw(
        &self,
        routing_key: &str,
        body: &[u8],
        parent: Option<&TraceContext>,
    ) -> Result<(), BusError> {
        crate::bus::topic::check_routing_key(routing_key)?;
        let traceparent = TraceContext::child_of(parent).header();
        self.bus
            .publish(Outgoing {
                exchange: &self.exchange,
                routing_key,
                body,
                reply_to: None,
                correlation_id: None,
                durable: false,
                confirm: false,
                expires: None,
                traceparent: Some(&traceparent),
                deadline: None,
                reply_ttl: None,
            })
            .await
    }

    /// Sends `{"jsonrpc":"2.0","id":…,"result":…}` to `queue`, in
    /// `parent`'s trace or a new one.
    pub async fn respond(
        &self,
        queue: &str,
        id_json: &str,
        result_json: &str,
        parent: Option<&TraceContext>,
    ) -> Result<(), BusError> {
        let body = crate::protocol::result_body(id_json, result_json);
        let traceparent = TraceContext::child_of(parent).header();
        self.bus
            .publish(Outgoing {
                exchange: "",
                routing_key: queue,
                body: &body,
                reply_to: None,
                correlation_id: None,
                durable: true,
                confirm: true,
                expires: None,
                traceparent: Some(&traceparent),
                deadline: None,
                reply_ttl: Some(crate::bus::REPLY_TTL),
            })
            .await
    }

    /// Requests waiting for their reply now.
    pub fn pending_requests(&self) -> usize {
        self.pending_map().len()
    }

    fn pending_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Vec<u8>>>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A request's entry in the pending map, removed on drop.
struct PendingEntry {
    pending: Pending,
    id: String,
}

impl Drop for PendingEntry {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// A request sent, its reply still to come ([`RpcClient::send_request`]).
pub struct AwaitedReply {
    rx: oneshot::Receiver<Vec<u8>>,
    _entry: PendingEntry,
    routing_key: String,
    timeout: Duration,
}

impl std::fmt::Debug for AwaitedReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwaitedReply")
            .field("routing_key", &self.routing_key)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl AwaitedReply {
    /// The raw reply body, within the request's timeout.
    pub async fn reply(self) -> Result<Vec<u8>, RequestError> {
        match tokio::time::timeout(self.timeout, self.rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(BusError::Closed.into()),
            Err(_) => Err(RequestError::Timeout {
                routing_key: self.routing_key,
                timeout: self.timeout,
            }),
        }
    }
}

/// The longest a caller may wait for a reply (HTTP `?timeout`, `call
/// --timeout`).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(300);

/// A timeout a caller asked for that is out of range.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error(
    "the timeout must be more than 0 and at most {max} seconds, not {secs:?}",
    max = MAX_TIMEOUT.as_secs(),
    secs = .0
)]
pub struct BadTimeout(pub f64);

/// A caller's timeout in seconds, as a duration: in (0, [`MAX_TIMEOUT`]].
pub fn timeout_from_secs(secs: f64) -> Result<Duration, BadTimeout> {
    if secs.is_finite() && secs > 0.0 && secs <= MAX_TIMEOUT.as_secs_f64() {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(BadTimeout(secs))
    }
}

/// Hands each reply to its waiting request: by correlation id, or by the
/// JSON-RPC id for services that do not copy the correlation id (as the
/// Python one did not).
async fn route_replies(replies: async_channel::Receiver<Incoming>, pending: Pending) {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: Option<String>,
    }
    while let Ok(reply) = replies.recv().await {
        let correlation_id = reply
            .correlation_id
            .as_deref()
            .and_then(|c| std::str::from_utf8(c).ok());
        let key = correlation_id.map(str::to_owned).or_else(|| {
            serde_json::from_slice::<IdOnly>(&reply.body)
                .ok()
                .and_then(|r| r.id)
        });
        let waiter = key.and_then(|k| {
            pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&k)
        });
        match waiter {
            Some(tx) => {
                let _ = tx.send(reply.body);
            }
            None => tracing::debug!(
                correlation_id,
                "reply for no pending request (late, after its timeout?)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_out_of_range_are_refused_not_panicked_on() {
        assert_eq!(timeout_from_secs(0.5), Ok(Duration::from_millis(500)));
        assert_eq!(timeout_from_secs(300.0), Ok(MAX_TIMEOUT));
        for bad in [0.0, -1.0, 300.001, 1e20, f64::NAN, f64::INFINITY] {
            assert!(timeout_from_secs(bad).is_err(), "{bad}");
        }
        assert_eq!(
            BadTimeout(1e20).to_string(),
            "the timeout must be more than 0 and at most 300 seconds, not 1e20"
        );
    }

    #[test]
    fn request_bodies() {
        let body = request_body("simple.add", Some("u"), Some("[1,2]"));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"jsonrpc":"2.0","method":"add","id":"u","params":[1,2]})
        );
        let body = request_body("simple.ping", None, None);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v, serde_json::json!({"jsonrpc":"2.0","method":"ping"}));
    }

    fn result_text(reply: &str) -> Result<Result<String, RpcError>, String> {
        read_response(reply.as_bytes()).map(|r| r.map(|raw| raw.get().to_owned()))
    }

    #[test]
    fn a_null_result_is_a_result() {
        let null = r#"{"jsonrpc": "2.0", "id": "n1", "result": null}"#;
        assert_eq!(result_text(null), Ok(Ok("null".to_owned())));
        let with_null_error = r#"{"id": "n1", "result": null, "error": null}"#;
        assert_eq!(result_text(with_null_error), Ok(Ok("null".to_owned())));
        assert_eq!(
            result_text(r#"{"id": "n1", "result": 3}"#),
            Ok(Ok("3".to_owned()))
        );
    }

    #[test]
    fn an_error_wins_and_neither_is_refused() {
        let error = r#"{"id": 1, "result": null, "error": {"code": 404, "message": "gone"}}"#;
        assert_eq!(result_text(error), Ok(Err(RpcError::new(404, "gone"))));
        assert!(result_text(r#"{"jsonrpc": "2.0", "id": 1}"#).is_err_and(|e| e.contains("neither")));
        assert!(result_text("[1]").is_err());
    }
}

/// A client that reconnects: the supervisor's HTTP endpoint keeps serving
/// across a broker restart.
#[derive(Debug)]
pub struct SharedClient {
    uri: Option<String>,
    exchange: String,
    timeout: Duration,
    reply_queue: ReplyQueueKind,
    current: tokio::sync::Mutex<Option<Arc<RpcClient>>>,
}

impl SharedClient {
    /// Always `client`.
    pub fn fixed(client: Arc<RpcClient>) -> Self {
        Self {
            uri: None,
            exchange: String::new(),
            timeout: client.default_timeout,
            reply_queue: ReplyQueueKind::default(),
            current: tokio::sync::Mutex::new(Some(client)),
        }
    }

    /// Connects to `uri` when first needed, and again after a loss.
    pub fn reconnecting(
        uri: &str,
        exchange: &str,
        timeout: Duration,
        reply_queue: ReplyQueueKind,
    ) -> Self {
        Self {
            uri: Some(uri.to_owned()),
            exchange: exchange.to_owned(),
            timeout,
            reply_queue,
            current: tokio::sync::Mutex::new(None),
        }
    }

    /// A usable client.
    pub async fn get(&self) -> Result<Arc<RpcClient>, BusError> {
        let mut current = self.current.lock().await;
        if let Some(client) = &*current {
            if !client.is_closed() || self.uri.is_none() {
                return Ok(client.clone());
            }
        }
        let Some(uri) = &self.uri else {
            return Err(BusError::Closed);
        };
        if let Some(lost) = current.take() {
            // Its reply queue: deleted if the broker still answers, else
            // no longer in use, so that the sweep of the next connection
            // deletes it.
            lost.bus().close().await;
        }
        let bus = crate::bus::connect(uri).await?;
        let client = RpcClient::start(bus, &self.exchange, self.timeout, self.reply_queue).await?;
        *current = Some(client.clone());
        Ok(client)
    }

    /// Requests of the current connection waiting for their reply; `None`
    /// while it is being (re)connected.
    pub fn pending_requests(&self) -> Option<usize> {
        self.current
            .try_lock()
            .ok()
            .map(|c| c.as_ref().map_or(0, |c| c.pending_requests()))
    }

    /// Closes the connection, if any.
    pub async fn close(&self) {
        if let Some(client) = self.current.lock().await.take() {
            client.bus().close().await;
        }
    }
}
