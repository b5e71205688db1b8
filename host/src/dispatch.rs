//! Dispatch: from a delivered message (routing key, body bytes,
//! properties) to the plugin's handler, and to the reply to publish, if
//! any. The JSON-RPC rules themselves are [`crate::protocol`]'s.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use abi_stable::std_types::RString;
use commissaire_plugin_api::host::{HostBus, PendingCall, RequestMeta};
use commissaire_plugin_api::RpcError;

use crate::bus::Incoming;
use crate::contract::{Contract, DISCOVER_METHOD};
use crate::plugin::{PluginLibrary, ServiceInstance};
use crate::protocol::{error_body, parse_request, result_body, Rejected, Request};

/// A reply to publish to the default exchange with routing key `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The queue: the request's `reply_to` (the reply copies the
    /// request's `correlation_id`, as sent).
    pub to: String,
    /// The JSON-RPC response body.
    pub body: Vec<u8>,
}

/// What handling one delivery produced.
#[derive(Debug)]
pub struct Handled {
    /// The reply, unless the request was a notification.
    pub reply: Option<Reply>,
    /// How long parsing and the handler took.
    pub took: std::time::Duration,
    /// The error code it was answered with; `None` for a result.
    pub code: Option<i64>,
    /// What the handler's panic said, if it panicked (see
    /// [`crate::quarantine::is_panic`]).
    pub panic: Option<String>,
}

/// One service of one plugin, ready to answer deliveries.
pub struct Service {
    name: String,
    library: PluginLibrary,
    instance: ServiceInstance,
    /// The methods whose handler is an `async fn`.
    async_methods: std::collections::HashSet<String>,
    /// The answer to a discovery request: the service's contract, read
    /// once (the plugin is never asked).
    discovery: RString,
}

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Service").field("name", &self.name).finish()
    }
}

impl Service {
    /// Builds the service of `library` with its config section.
    pub fn start(
        library: PluginLibrary,
        config: &serde_json::Value,
    ) -> Result<Arc<Self>, RpcError> {
        let instance = library.instantiate(config)?;
        let async_methods = library
            .methods
            .iter()
            .filter(|m| m.is_async)
            .map(|m| m.name.clone())
            .collect();
        let discovery = RString::from(Contract::of(&library).to_json());
        Ok(Arc::new(Self {
            name: library.service_name.clone(),
            library,
            instance,
            async_methods,
            discovery,
        }))
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin it comes from.
    pub fn library(&self) -> &PluginLibrary {
        &self.library
    }

    /// Whether `routing_key` names the discovery method, which the host
    /// answers itself at once (see [`DISCOVER_METHOD`]).
    pub fn is_discovery(routing_key: &str) -> bool {
        crate::protocol::method_of(routing_key) == DISCOVER_METHOD
    }

    /// Whether the handler of `routing_key`'s method is an `async fn`
    /// (run with [`Service::handle_async`]).
    pub fn runs_async(&self, routing_key: &str) -> bool {
        !self.async_methods.is_empty()
            && self
                .async_methods
                .contains(crate::protocol::method_of(routing_key))
    }

    /// Handles one delivery: parses it, calls the handler (synchronously:
    /// the bus layer runs this where blocking is fine), and builds the reply
    /// when the request had a `reply_to`. `traceparent` is the host's span
    /// for it, which the handler's own bus requests are children of.
    pub fn handle(
        &self,
        delivery: &Incoming,
        traceparent: Option<&str>,
        bus: &dyn HostBus,
    ) -> Handled {
        let started = Instant::now();
        let mut holder = None;
        let outcome = match parse_request(&delivery.body, &delivery.routing_key, &mut holder) {
            Ok(request) => {
                // Set by the request's life around its handler (see
                // `crate::deadline`), else the header as sent.
                let result = if request.method == DISCOVER_METHOD {
                    Ok(self.discovery.clone())
                } else {
                    let deadline = crate::deadline::current().or(delivery.deadline);
                    let meta = request_meta(delivery, &request, traceparent, deadline);
                    self.instance.call(meta, bus, request.params)
                };
                self.judge(&request, result, started)
            }
            Err(rejected) => self.rejected(delivery, rejected),
        };
        reply(delivery, outcome, started)
    }

    /// Handles one delivery whose handler is an `async fn`: as
    /// [`Service::handle`], awaiting the handler on the plugin's runtime
    /// with no thread held, until `limit`. Past it the handler is still
    /// running, and its call is handed back to be cancelled. With
    /// `poll_here`, the handler's first poll runs on this thread: for a
    /// method proven quick, which then ends with no hop between threads.
    pub async fn handle_async(
        &self,
        delivery: &Incoming,
        traceparent: Option<&str>,
        bus: Arc<dyn HostBus>,
        deadline: Option<u64>,
        limit: tokio::time::Instant,
        poll_here: bool,
    ) -> Ran {
        let started = Instant::now();
        let mut holder = None;
        let outcome = match parse_request(&delivery.body, &delivery.routing_key, &mut holder) {
            Ok(request) if request.method == DISCOVER_METHOD => {
                self.judge(&request, Ok(self.discovery.clone()), started)
            }
            Ok(request) => {
                let meta = request_meta(delivery, &request, traceparent, deadline);
                let call = self
                    .instance
                    .call_async(meta, bus, request.params, poll_here);
                let result = match call {
                    Some(mut pending) => match pending.ended() {
                        Some(result) => result,
                        None => match tokio::time::timeout_at(limit, &mut pending).await {
                            Ok(result) => result,
                            Err(_) => return Ran::TimedOut(pending),
                        },
                    },
                    None => Err(RpcError::internal_error(format!(
                        "the plugin of `{}` cannot run async handlers",
                        self.name
                    ))),
                };
                self.judge(&request, result, started)
            }
            Err(rejected) => self.rejected(delivery, rejected),
        };
        Ran::Done(reply(delivery, outcome, started))
    }

    /// Logs what a handler did; its result or error, with the request's id.
    fn judge(
        &self,
        request: &Request<'_>,
        result: Result<RString, RpcError>,
        started: Instant,
    ) -> Outcome {
        let latency_us = started.elapsed().as_micros() as u64;
        match &result {
            Ok(_) => tracing::debug!(
                service = %self.name, method = %request.method, id = request.id_json,
                latency_us, "handled"
            ),
            // Any caller can make a handler fail: one line per
            // 10 s, the rest counted (requests_total by code).
            Err(e) if e.code == RpcError::INTERNAL_ERROR => crate::throttled!(error!(
                service = %self.name, method = %request.method, id = request.id_json,
                latency_us, code = e.code, error = %e.message, "handler failed"
            )),
            Err(e) => tracing::debug!(
                service = %self.name, method = %request.method, id = request.id_json,
                latency_us, code = e.code, error = %e.message, "handled with an error"
            ),
        }
        match result {
            Ok(json) => Ok(result_body(request.id_json, json.as_str())),
            Err(e) => Err((request.id_json.to_owned(), e)),
        }
    }

    /// Logs a request refused before its handler.
    fn rejected(&self, delivery: &Incoming, rejected: Rejected<'_>) -> Outcome {
        crate::throttled!(warn!(
            service = %self.name, routing_key = %delivery.routing_key,
            id = rejected.id_json, code = rejected.error.code,
            error = %rejected.error.message, "request rejected"
        ));
        Err((rejected.id_json.to_owned(), rejected.error))
    }
}

/// What an async handler did by its time limit.
pub enum Ran {
    /// It ended (or never ran: a malformed request).
    Done(Handled),
    /// It is still running: cancel it.
    TimedOut(PendingCall),
}

/// A reply body, or the id and error to answer with.
type Outcome = Result<Vec<u8>, (String, RpcError)>;

/// What the handler sees of `delivery`.
fn request_meta<'a>(
    delivery: &'a Incoming,
    request: &'a Request<'a>,
    traceparent: Option<&'a str>,
    deadline: Option<u64>,
) -> RequestMeta<'a> {
    RequestMeta {
        exchange: &delivery.exchange,
        routing_key: &delivery.routing_key,
        method: &request.method,
        id_json: request.id_json,
        reply_to: delivery.reply_to.as_deref(),
        correlation_id: delivery
            .correlation_id
            .as_deref()
            .and_then(|c| std::str::from_utf8(c).ok()),
        redelivered: delivery.redelivered,
        traceparent,
        deadline,
    }
}

/// The reply to `delivery`, if it wants one, and what it took.
fn reply(delivery: &Incoming, outcome: Outcome, started: Instant) -> Handled {
    let mut panic = None;
    let (body, code) = match outcome {
        Ok(body) => (body, None),
        Err((id, e)) => {
            if crate::quarantine::is_panic(e.code, &e.message) {
                panic = Some(e.message.clone());
            }
            (error_body(&id, &e), Some(e.code))
        }
    };
    let reply = delivery.reply_to.as_ref().map(|to| Reply {
        to: to.clone(),
        body,
    });
    Handled {
        reply,
        took: started.elapsed(),
        code,
        panic,
    }
}
