//! Dispatch: from a delivered message (routing key, body bytes,
//! properties) to the plugin's handler, and to the reply to publish, if
//! any. The JSON-RPC rules themselves are [`crate::protocol`]'s.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use commissaire_plugin_api::host::{HostBus, RequestMeta};
use commissaire_plugin_api::RpcError;

use crate::bus::Incoming;
use crate::plugin::{PluginLibrary, ServiceInstance};
use crate::protocol::{error_body, parse_request, result_body};

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
        Ok(Arc::new(Self {
            name: library.service_name.clone(),
            library,
            instance,
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
                let meta = RequestMeta {
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
                    // Set by the request's life around its handler (see
                    // `crate::deadline`), else the header as sent.
                    deadline: crate::deadline::current().or(delivery.deadline),
                };
                let result = self.instance.call(meta, bus, request.params);
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
            Err(rejected) => {
                crate::throttled!(warn!(
                    service = %self.name, routing_key = %delivery.routing_key,
                    id = rejected.id_json, code = rejected.error.code,
                    error = %rejected.error.message, "request rejected"
                ));
                Err((rejected.id_json.to_owned(), rejected.error))
            }
        };
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
}
