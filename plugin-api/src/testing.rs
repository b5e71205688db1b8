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
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde_json::Value;

use crate::abi::ServiceHandle;
use crate::export::{Exports, ServiceImpl};
use crate::host::{with_call_ctx, HostBus, RequestMeta};
use crate::RpcError;

/// The handler time every call of the test kit has
/// ([`crate::Message::remaining`] counts down from it).
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The `traceparent` every call of the test kit carries
/// ([`crate::Message::traceparent`]).
pub const TEST_TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

type Route = Box<dyn Fn(&str, Value) -> Result<Value, RpcError> + Send + Sync>;

/// One service instance under test, with a recording test bus: requests to
/// the service's own `name.*` come back into it, other routes are set with
/// [`TestService::with_route`]; requests, notifications, `respond`s and
/// `publish`es are recorded.
pub struct TestService<S: ServiceImpl> {
    handle: ServiceHandle,
    routes: Vec<(String, Route)>,
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
            handle,
            routes: Vec::new(),
            requests: Mutex::default(),
            notifications: Mutex::default(),
            responses: Mutex::default(),
            published: Mutex::default(),
            _service: std::marker::PhantomData,
        })
    }

    /// Answers bus requests whose routing key matches `pattern` (an exact
    /// key, or `prefix.*`) with `handler(method, params)`.
    #[must_use]
    pub fn with_route(
        mut self,
        pattern: &str,
        handler: impl Fn(&str, Value) -> Result<Value, RpcError> + Send + Sync + 'static,
    ) -> Self {
        self.routes.push((pattern.to_owned(), Box::new(handler)));
        self
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
        let routing_key = format!("{}.{method}", S::NAME);
        let meta = RequestMeta {
            exchange: "commissaire",
            routing_key: &routing_key,
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
        };
        with_call_ctx(S::NAME, meta, self, |ctx| {
            (Exports::<S>::VTABLE.call())(self.handle, ctx, method.into(), params.into())
                .into_result()
                .map(String::from)
                .map_err(RpcError::from_abi)
        })
    }

    /// The requests handlers sent over the bus: (routing key, params,
    /// timeout; `None` for the host's default).
    pub fn requests(&self) -> Vec<(String, Value, Option<Duration>)> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The notifications handlers sent: (routing key, params).
    pub fn notifications(&self) -> Vec<(String, Value)> {
        self.notifications
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The results handlers sent with `respond`: (queue, id, result).
    pub fn responses(&self) -> Vec<(String, Value, Value)> {
        self.responses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The raw bodies handlers sent with `publish`: (routing key, body as
    /// given).
    pub fn published(&self) -> Vec<(String, String)> {
        self.published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl<S: ServiceImpl> Default for TestService<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: ServiceImpl> Drop for TestService<S> {
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

impl<S: ServiceImpl> HostBus for TestService<S> {
    fn request(
        &self,
        _caller: &RequestMeta<'_>,
        routing_key: &str,
        params_json: &str,
        timeout: Option<Duration>,
    ) -> Result<String, RpcError> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((
                routing_key.to_owned(),
                decode("params", params_json)?,
                timeout,
            ));
        let method = routing_key.rsplit('.').next().unwrap_or(routing_key);
        if let Some((_, route)) = self.routes.iter().find(|(p, _)| matches(p, routing_key)) {
            let result = route(method, decode("params", params_json)?)?;
            return Ok(result.to_string());
        }
        if matches(&format!("{}.*", S::NAME), routing_key) {
            return self.call_raw(method, params_json, Some("test-reply"));
        }
        Err(RpcError::method_not_found(&format!(
            "{routing_key} (no route in the test bus)"
        )))
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
