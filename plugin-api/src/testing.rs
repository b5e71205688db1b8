//! A test kit: call your handlers from your plugin's own `cargo test`,
//! through the same path the host uses (params decoded from JSON, the
//! exported entry point called, the result encoded to JSON), with no host
//! and no broker.
//!
//! ```
//! use commissaire_plugin_api::prelude::*;
//! use commissaire_plugin_api::testing::TestService;
//!
//! #[derive(Default)]
//! pub struct Simple;
//!
//! #[service(name = "simple")]
//! impl Simple {
//!     fn on_add(&self, x: i64, y: i64) -> Result<i64, RpcError> {
//!         Ok(x + y)
//!     }
//!
//!     fn on_wordy_add(&self, msg: &Message, x: i64, y: i64) -> Result<String, RpcError> {
//!         let sum: i64 = msg.bus().request("simple.add", [x, y])?;
//!         msg.bus().notify("audit.added", json!({"sum": sum}))?;
//!         Ok(format!("Adding {x} plus {y} results in {sum}"))
//!     }
//! }
//!
//! // In `#[cfg(test)] mod tests`, as `#[test] fn`s:
//! let svc = TestService::<Simple>::new();
//! assert_eq!(svc.call("add", json!([1, 2])), Ok(json!(3)));
//! // Bus requests to `simple.*` come back into the service itself:
//! assert_eq!(svc.call("wordy_add", json!([1, 2])),
//!            Ok(json!("Adding 1 plus 2 results in 3")));
//! assert_eq!(svc.notifications(), [("audit.added".to_owned(), json!({"sum": 3}))]);
//! ```
//!
//! Log events of the handlers go to the test process's own `tracing`
//! subscriber, if it sets one.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use serde_json::Value;

use crate::abi::{CallResult, ServiceHandle};
use crate::export::{Exports, ServiceImpl};
use crate::host::{start_async, with_call_ctx, HostBus, ReplyTo, RequestMeta};
use crate::RpcError;

/// The handler time every call of the test kit has
/// ([`crate::Message::remaining`] counts down from it).
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The `traceparent` every call of the test kit carries
/// ([`crate::Message::traceparent`]).
pub const TEST_TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

type Route = Arc<dyn Fn(&str, Value) -> Result<Value, RpcError> + Send + Sync>;

/// One service instance under test, with a recording test bus: requests to
/// the service's own `name.*` come back into it, other routes are set with
/// [`TestService::with_route`]; requests, notifications, `respond`s and
/// `publish`es are recorded.
///
/// An `async fn` handler runs on the plugin's runtime, as under the host;
/// [`TestService::call`] waits for it (at most [`TEST_TIMEOUT`]), from a
/// `#[test]` or a `#[tokio::test]` alike.
pub struct TestService<S: ServiceImpl> {
    kit: Arc<Kit<S>>,
}

/// The service and its test bus, shared with the async calls under way.
struct Kit<S: ServiceImpl> {
    /// Itself, for the async calls it starts from its bus.
    me: Weak<Kit<S>>,
    handle: ServiceHandle,
    routes: Mutex<Vec<(String, Route)>>,
    requests: Mutex<Vec<(String, Value, Option<Duration>)>>,
    notifications: Mutex<Vec<(String, Value)>>,
    responses: Mutex<Vec<(String, Value, Value)>>,
    published: Mutex<Vec<(String, String)>>,
    _service: std::marker::PhantomData<S>,
}

impl<S: ServiceImpl> TestService<S> {
    /// Builds the service with an empty config. Panics if it fails to start.
    pub fn new() -> Self {
        match Self::with_config(Value::Object(serde_json::Map::new())) {
            Ok(svc) => svc,
            Err(e) => panic!("`{}` failed to start: {e}", S::NAME),
        }
    }

    /// Builds the service with `config` handed to its `init`.
    pub fn with_config(config: Value) -> Result<Self, RpcError> {
        let config = config.to_string();
        let handle = (Exports::<S>::VTABLE.new_service())(config.as_str().into())
            .into_result()
            .map_err(RpcError::from_abi)?;
        Ok(Self {
            kit: Arc::new_cyclic(|me| Kit {
                me: me.clone(),
                handle,
                routes: Mutex::default(),
                requests: Mutex::default(),
                notifications: Mutex::default(),
                responses: Mutex::default(),
                published: Mutex::default(),
                _service: std::marker::PhantomData,
            }),
        })
    }

    /// Answers bus requests whose routing key matches `pattern` (an exact
    /// key, or `prefix.*`) with `handler(method, params)`.
    #[must_use]
    pub fn with_route(
        self,
        pattern: &str,
        handler: impl Fn(&str, Value) -> Result<Value, RpcError> + Send + Sync + 'static,
    ) -> Self {
        lock(&self.kit.routes).push((pattern.to_owned(), Arc::new(handler)));
        self
    }

    /// The service's contract, the OpenRPC document the host serves for
    /// it (see [Contracts](crate#contracts)), as the plugin exports it.
    pub fn contract() -> Value {
        let text = (Exports::<S>::VTABLE.contract().map_or("", |f| f().as_str())).to_owned();
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Calls `method` with `params` (an array, an object, or `Value::Null`
    /// for none) as a request, returning the decoded result or error.
    pub fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        let params = if params.is_null() {
            String::new()
        } else {
            params.to_string()
        };
        let text = self.call_raw(method, &params, Some("test-reply"))?;
        serde_json::from_str(&text)
            .map_err(|e| RpcError::internal_error(format!("result is not JSON: {e}")))
    }

    /// Calls `method` as a notification (no `reply_to`).
    pub fn notify(&self, method: &str, params: Value) -> Result<(), RpcError> {
        self.call_raw(method, &params.to_string(), None).map(drop)
    }

    /// Calls `method` with raw params text (empty for none) as a request when
    /// `reply_to` is set, else as a notification; returns the raw result
    /// text.
    pub fn call_raw(
        &self,
        method: &str,
        params: &str,
        reply_to: Option<&str>,
    ) -> Result<String, RpcError> {
        self.kit.call_raw(method, params, reply_to)
    }

    /// The requests handlers sent over the bus: (routing key, params,
    /// timeout; `None` for the host's default).
    pub fn requests(&self) -> Vec<(String, Value, Option<Duration>)> {
        self.kit.requests()
    }

    /// The notifications handlers sent: (routing key, params).
    pub fn notifications(&self) -> Vec<(String, Value)> {
        lock(&self.kit.notifications).clone()
    }

    /// The results handlers sent with `respond`: (queue, id, result).
    pub fn responses(&self) -> Vec<(String, Value, Value)> {
        lock(&self.kit.responses).clone()
    }

    /// The bodies handlers sent with `publish`: (routing key, body).
    pub fn published(&self) -> Vec<(String, String)> {
        lock(&self.kit.published).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The meta of a test call of `method`.
fn meta<'a>(routing_key: &'a str, method: &'a str, reply_to: Option<&'a str>) -> RequestMeta<'a> {
    RequestMeta {
        exchange: "commissaire",
        routing_key,
        method,
        id_json: "\"test\"",
        reply_to,
        correlation_id: None,
        redelivered: false,
        traceparent: Some(TEST_TRACEPARENT),
        // As a host gives a request without a deadline of its own: its
        // arrival plus the default handler timeout.
        deadline: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|now| u64::try_from((now + TEST_TIMEOUT).as_millis()).ok()),
    }
}

impl<S: ServiceImpl> Kit<S> {
    fn call_raw(
        &self,
        method: &str,
        params: &str,
        reply_to: Option<&str>,
    ) -> Result<String, RpcError> {
        let routing_key = format!("{}.{method}", S::NAME);
        let meta = meta(&routing_key, method, reply_to);
        if S::is_async(method) {
            let (tx, rx) = std::sync::mpsc::sync_channel::<CallResult>(1);
            // Polled first on this thread, as the host does for a method
            // proven quick (a self-route below is not).
            let running = self.start(meta, params, true, move |result| {
                let _ = tx.send(result);
            })?;
            // Waits here, on the test's thread, never on the runtime's.
            let result = rx.recv_timeout(TEST_TIMEOUT);
            running.end(result.is_err());
            return match result {
                Ok(result) => result
                    .into_result()
                    .map(String::from)
                    .map_err(RpcError::from_abi),
                Err(_) => Err(RpcError::internal_error(format!(
                    "`{method}` did not end within {}s",
                    TEST_TIMEOUT.as_secs()
                ))),
            };
        }
        with_call_ctx(S::NAME, meta, self, |ctx| {
            (Exports::<S>::VTABLE.call())(self.handle, ctx, method.into(), params.into())
                .into_result()
                .map(String::from)
                .map_err(RpcError::from_abi)
        })
    }

    /// Starts async `meta.method`; `on_done` gets its result.
    fn start(
        &self,
        meta: RequestMeta<'_>,
        params: &str,
        poll_here: bool,
        on_done: impl FnOnce(CallResult) + Send + 'static,
    ) -> Result<crate::host::RunningCall, RpcError> {
        let bus: Arc<dyn HostBus> = self
            .me
            .upgrade()
            .ok_or_else(|| RpcError::internal_error("the test service is gone"))?;
        start_async(
            Exports::<S>::VTABLE,
            self.handle,
            S::NAME,
            meta,
            bus,
            params,
            poll_here,
            Box::new(on_done),
        )
        .ok_or_else(|| RpcError::internal_error("this plugin-api has no async calls"))
    }

    fn requests(&self) -> Vec<(String, Value, Option<Duration>)> {
        lock(&self.requests).clone()
    }

    /// Records a request and finds what answers it: a route's answer, or
    /// the method of the service itself to call.
    fn route(
        &self,
        routing_key: &str,
        params_json: &str,
        timeout: Option<Duration>,
    ) -> Result<Routed, RpcError> {
        lock(&self.requests).push((
            routing_key.to_owned(),
            decode("params", params_json)?,
            timeout,
        ));
        let method = routing_key.rsplit('.').next().unwrap_or(routing_key);
        // Out of the lock: a route may take its time.
        let route = lock(&self.routes)
            .iter()
            .find(|(p, _)| matches(p, routing_key))
            .map(|(_, route)| route.clone());
        if let Some(route) = route {
            let result = route(method, decode("params", params_json)?)?;
            return Ok(Routed::Answer(result.to_string()));
        }
        if matches(&format!("{}.*", S::NAME), routing_key) {
            return Ok(Routed::Itself(method.to_owned()));
        }
        Err(RpcError::method_not_found(&format!(
            "{routing_key} (no route in the test bus)"
        )))
    }
}

/// Where the test bus sends a request.
enum Routed {
    /// A route answered this.
    Answer(String),
    /// This method of the service under test answers it.
    Itself(String),
}

impl<S: ServiceImpl> Default for TestService<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: ServiceImpl> Drop for Kit<S> {
    fn drop(&mut self) {
        (Exports::<S>::VTABLE.drop_service())(self.handle);
    }
}

impl<S: ServiceImpl> fmt::Debug for TestService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestService")
            .field("service", &S::NAME)
            .finish()
    }
}

fn matches(pattern: &str, routing_key: &str) -> bool {
    match pattern.strip_suffix(".*") {
        Some(prefix) => routing_key
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|m| !m.contains('.')),
        None => pattern == routing_key,
    }
}

fn decode(what: &str, text: &str) -> Result<Value, RpcError> {
    serde_json::from_str(text)
        .map_err(|e| RpcError::invalid_params(format!("{what} is not JSON: {e}")))
}

impl<S: ServiceImpl> HostBus for Kit<S> {
    fn request(
        &self,
        _caller: &RequestMeta<'_>,
        routing_key: &str,
        params_json: &str,
        timeout: Option<Duration>,
    ) -> Result<String, RpcError> {
        match self.route(routing_key, params_json, timeout)? {
            Routed::Answer(json) => Ok(json),
            Routed::Itself(method) => self.call_raw(&method, params_json, Some("test-reply")),
        }
    }

    /// A request to an async method of the service itself is started, not
    /// waited for: the runtime's threads are never blocked.
    fn request_async(
        &self,
        _caller: &RequestMeta<'_>,
        routing_key: &str,
        params_json: &str,
        timeout: Option<Duration>,
        reply: ReplyTo,
    ) {
        let method = match self.route(routing_key, params_json, timeout) {
            Ok(Routed::Itself(method)) if S::is_async(&method) => method,
            // A sync handler, off the runtime's threads, as the host runs
            // it.
            Ok(Routed::Itself(method)) => {
                let (Some(kit), Ok(runtime)) =
                    (self.me.upgrade(), crate::runtime::runtime(S::NAME))
                else {
                    return reply.send(Err(RpcError::internal_error("the test service is gone")));
                };
                let params = params_json.to_owned();
                runtime.spawn_blocking(move || {
                    reply.send(kit.call_raw(&method, &params, Some("test-reply")));
                });
                return;
            }
            Ok(Routed::Answer(json)) => return reply.send(Ok(json)),
            Err(e) => return reply.send(Err(e)),
        };
        let routing_key = format!("{}.{method}", S::NAME);
        let meta = meta(&routing_key, &method, Some("test-reply"));
        let started = self.start(meta, params_json, false, move |result| {
            reply.send(
                result
                    .into_result()
                    .map(String::from)
                    .map_err(RpcError::from_abi),
            );
        });
        // The handle ends at once: the call runs on, and answers `reply`.
        match started {
            Ok(running) => running.end(false),
            Err(e) => tracing::error!(error = %e, "cannot start an async call"),
        }
    }

    fn notify(
        &self,
        _caller: &RequestMeta<'_>,
        routing_key: &str,
        params_json: &str,
    ) -> Result<(), RpcError> {
        let params = decode("params", params_json)?;
        self.notifications
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((routing_key.to_owned(), params));
        Ok(())
    }

    fn respond(
        &self,
        _caller: &RequestMeta<'_>,
        queue: &str,
        id_json: &str,
        result_json: &str,
    ) -> Result<(), RpcError> {
        let entry = (
            queue.to_owned(),
            decode("id", id_json)?,
            decode("result", result_json)?,
        );
        self.responses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(entry);
        Ok(())
    }

    fn publish(
        &self,
        _caller: &RequestMeta<'_>,
        exchange: &str,
        routing_key: &str,
        body: &str,
    ) -> Result<(), RpcError> {
        if !exchange.is_empty() {
            return Err(RpcError::invalid_params(format!(
                "the test bus publishes on the deployment's exchange only, not `{exchange}`"
            )));
        }
        self.published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((routing_key.to_owned(), body.to_owned()));
        Ok(())
    }
}
