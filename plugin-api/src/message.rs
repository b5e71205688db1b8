//! [`Message`] and [`Bus`]: what a handler knows about its request, and its
//! way back onto the bus.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use abi_stable::marker_type::ErasedObject;
use abi_stable::std_types::RResult;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::abi::{log_level, CallCtx, CallResult, Completion};
use crate::RpcError;

/// The request a handler is answering, like `message` in a Python
/// `CommissaireService`. A handler that wants it takes `msg: &Message` right
/// after `&self`:
///
/// ```
/// # use commissaire_plugin_api::prelude::*;
/// # #[derive(Default)] pub struct Inventory;
/// # #[service(name = "inventory")]
/// # impl Inventory {
/// /// Says who asked, and asks `simple.add` for 2 + 3.
/// fn on_whoami(&self, msg: &Message) -> Result<String, RpcError> {
///     let sum: i64 = msg.bus().request("simple.add", [2, 3])?;
///     Ok(format!("{} (id {}) got {sum}", msg.routing_key(), msg.id()))
/// }
/// # }
/// ```
pub struct Message<'a> {
    ctx: CallCtx<'a>,
}

impl<'a> Message<'a> {
    /// Wraps the context the host passed to the plugin.
    pub(crate) fn from_ctx(ctx: &CallCtx<'a>) -> Self {
        Self { ctx: *ctx }
    }

    /// The routing key the request was published with, e.g. `simple.add`.
    pub fn routing_key(&self) -> &'a str {
        (self.ctx.host.routing_key())(self.ctx.data).as_str()
    }

    /// The method, e.g. `add`.
    pub fn method(&self) -> &'a str {
        (self.ctx.host.method())(self.ctx.data).as_str()
    }

    /// The request's `id` as JSON text (`null` for none); Commissaire sends a
    /// quoted uuid4 string.
    pub fn id_json(&self) -> &'a str {
        (self.ctx.host.id_json())(self.ctx.data).as_str()
    }

    /// The request's `id`, decoded; pass it to [`Bus::respond`].
    pub fn id(&self) -> serde_json::Value {
        serde_json::from_str(self.id_json()).unwrap_or(serde_json::Value::Null)
    }

    /// The queue the caller waits on; `None` for a notification.
    pub fn reply_to(&self) -> Option<&'a str> {
        (self.ctx.host.reply_to())(self.ctx.data)
            .into_option()
            .map(|s| s.as_str())
    }

    /// The request's AMQP `correlation_id`, if the caller set one.
    pub fn correlation_id(&self) -> Option<&'a str> {
        (self.ctx.host.correlation_id())(self.ctx.data)
            .into_option()
            .map(|s| s.as_str())
    }

    /// Whether the broker delivered this request before (to a worker that
    /// did not acknowledge it).
    pub fn redelivered(&self) -> bool {
        (self.ctx.host.redelivered())(self.ctx.data)
    }

    /// The exchange the request came through; `None` on hosts older than
    /// plugin-api 1.1.
    pub fn exchange(&self) -> Option<&'a str> {
        self.ctx.host.exchange().map(|f| f(self.ctx.data).as_str())
    }

    /// The W3C `traceparent` of this request's span on hosts from
    /// plugin-api 1.3: `00-<trace id>-<span id>-<flags>`. The host reads
    /// the caller's, opens a span of its own in that trace (or starts a
    /// trace), copies it onto the reply, and makes the handler's own bus
    /// requests children of it. Pass it on to whatever else the handler
    /// calls (an HTTP API, say) to keep one trace.
    pub fn traceparent(&self) -> Option<&'a str> {
        let f = self.ctx.host.traceparent()?;
        Some(f(self.ctx.data).as_str()).filter(|t| !t.is_empty())
    }

    /// When this request's caller stops waiting, on hosts from plugin-api
    /// 1.4: the `deadline` it was sent with, or its arrival plus the
    /// handler's timeout, whichever comes first. The handler's own bus
    /// requests wait no longer than that, and carry it on; a handler with
    /// slow work of its own (an HTTP call, a loop) should bound it by
    /// [`Message::remaining`] too.
    pub fn deadline(&self) -> Option<std::time::SystemTime> {
        let f = self.ctx.host.deadline()?;
        let ms = f(self.ctx.data);
        (ms > 0).then(|| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
    }

    /// The time left until [`Message::deadline`] (zero once it passed);
    /// `None` on hosts older than plugin-api 1.4.
    pub fn remaining(&self) -> Option<std::time::Duration> {
        let deadline = self.deadline()?;
        Some(
            deadline
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default(),
        )
    }

    /// The trace id of [`Message::traceparent`]: 32 hex digits, the same in
    /// the logs of every service the request went through.
    pub fn trace_id(&self) -> Option<&'a str> {
        self.traceparent().and_then(|t| t.get(3..35))
    }

    /// Whether this is a notification (no reply will be sent).
    pub fn is_notification(&self) -> bool {
        self.reply_to().is_none()
    }

    /// The host's bus, to call other services from inside a handler.
    pub fn bus(&self) -> Bus<'a> {
        Bus { ctx: self.ctx }
    }

    /// Logs `message` through the host's logger at info level, tagged with
    /// the service, method and request id. Does nothing on hosts older than
    /// plugin-api 1.1.
    ///
    /// `tracing::info!` (re-exported as [`crate::tracing`]) does the same
    /// with fields, anywhere in the plugin, on hosts from plugin-api 1.2;
    /// these methods remain for older hosts.
    pub fn log_info(&self, message: &str) {
        self.log(log_level::INFO, message);
    }

    /// Like [`Message::log_info`], at warning level.
    pub fn log_warn(&self, message: &str) {
        self.log(log_level::WARN, message);
    }

    /// Like [`Message::log_info`], at error level.
    pub fn log_error(&self, message: &str) {
        self.log(log_level::ERROR, message);
    }

    /// Like [`Message::log_info`], at debug level.
    pub fn log_debug(&self, message: &str) {
        self.log(log_level::DEBUG, message);
    }

    fn log(&self, level: u8, message: &str) {
        if let Some(log) = self.ctx.host.log() {
            log(self.ctx.data, level, message.into());
        }
    }
}

impl fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("routing_key", &self.routing_key())
            .field("id", &self.id_json())
            .field("reply_to", &self.reply_to())
            .field("correlation_id", &self.correlation_id())
            .field("redelivered", &self.redelivered())
            .field("traceparent", &self.traceparent())
            .finish()
    }
}

/// The host's bus as seen from a handler: `request`, `notify` and
/// `respond`, like Commissaire's `BusMixin`, and `publish` for a body that
/// is not a JSON-RPC message.
#[derive(Clone, Copy)]
pub struct Bus<'a> {
    ctx: CallCtx<'a>,
}

impl<'a> Bus<'a> {
    /// Sends a request to `routing_key` (e.g. `simple.add`) and waits for its
    /// reply, up to the host's default timeout (10 s unless configured).
    /// Returns the decoded result, or the error the other service answered
    /// with (-32603 when no reply came in time).
    pub fn request<R: DeserializeOwned>(
        &self,
        routing_key: &str,
        params: impl Serialize,
    ) -> Result<R, RpcError> {
        // 0 is the ABI's "the host's default".
        self.request_ms(routing_key, &params, 0)
    }

    /// Like [`Bus::request`], waiting up to `timeout` instead of the host's
    /// default. The host counts in milliseconds: a timeout is rounded up to
    /// the next millisecond, so `Duration::ZERO` waits 1 ms.
    pub fn request_with_timeout<R: DeserializeOwned>(
        &self,
        routing_key: &str,
        params: impl Serialize,
        timeout: Duration,
    ) -> Result<R, RpcError> {
        let ms = timeout.as_nanos().div_ceil(1_000_000).max(1);
        self.request_ms(routing_key, &params, u64::try_from(ms).unwrap_or(u64::MAX))
    }

    fn request_ms<R: DeserializeOwned>(
        &self,
        routing_key: &str,
        params: &impl Serialize,
        timeout_ms: u64,
    ) -> Result<R, RpcError> {
        let params = encode("params", params)?;
        let reply = (self.ctx.host.request())(
            self.ctx.data,
            routing_key.into(),
            params.as_str().into(),
            timeout_ms,
        );
        decode_reply(routing_key, reply)
    }

    /// The awaitable [`Bus::request`], for an `async fn` handler: the
    /// request is sent at once, and no thread waits for its reply.
    ///
    /// ```
    /// # use commissaire_plugin_api::prelude::*;
    /// # #[derive(Default)] pub struct Inventory;
    /// # #[service(name = "inventory")]
    /// # impl Inventory {
    /// /// Asks `simple.add` for 2 + 3, without holding a thread meanwhile.
    /// async fn on_sum(&self, msg: &Message) -> Result<i64, RpcError> {
    ///     msg.bus().request_async("simple.add", [2, 3]).await
    /// }
    /// # }
    /// ```
    ///
    /// On hosts older than plugin-api 1.5 (which run an async handler to
    /// its end on their own thread) it is the blocking [`Bus::request`].
    pub fn request_async<R: DeserializeOwned>(
        &self,
        routing_key: &str,
        params: impl Serialize,
    ) -> impl Future<Output = Result<R, RpcError>> + Send + 'a {
        self.request_async_ms(routing_key, &params, 0)
    }

    /// Like [`Bus::request_async`], waiting up to `timeout` instead of the
    /// host's default (rounded up to whole milliseconds, as
    /// [`Bus::request_with_timeout`]).
    pub fn request_async_with_timeout<R: DeserializeOwned>(
        &self,
        routing_key: &str,
        params: impl Serialize,
        timeout: Duration,
    ) -> impl Future<Output = Result<R, RpcError>> + Send + 'a {
        let ms = timeout.as_nanos().div_ceil(1_000_000).max(1);
        self.request_async_ms(routing_key, &params, u64::try_from(ms).unwrap_or(u64::MAX))
    }

    /// Sends now (the params are encoded before the first `.await`, so the
    /// future holds none of the caller's borrows), awaits the reply.
    fn request_async_ms<R: DeserializeOwned>(
        &self,
        routing_key: &str,
        params: &impl Serialize,
        timeout_ms: u64,
    ) -> impl Future<Output = Result<R, RpcError>> + Send + 'a {
        let ctx = self.ctx;
        let routing_key = routing_key.to_owned();
        let sent = encode("params", params).map(|params| match ctx.host.request_async() {
            Some(start) => {
                let (tx, rx) = tokio::sync::oneshot::channel::<CallResult>();
                let data = Box::into_raw(Box::new(tx)).cast::<ErasedObject>();
                let done = Completion {
                    data,
                    done: reply_arrived,
                };
                start(
                    ctx.data,
                    routing_key.as_str().into(),
                    params.as_str().into(),
                    timeout_ms,
                    done,
                );
                Ok(rx)
            }
            // An older host runs the whole handler on a thread of its own.
            None => Err((ctx.host.request())(
                ctx.data,
                routing_key.as_str().into(),
                params.as_str().into(),
                timeout_ms,
            )),
        });
        async move {
            let reply = match sent? {
                Ok(rx) => rx.await.unwrap_or_else(|_| {
                    RResult::RErr(
                        RpcError::internal_error("the host dropped the request").into_abi(),
                    )
                }),
                Err(reply) => reply,
            };
            decode_reply(&routing_key, reply)
        }
    }

    /// Sends a notification: the other service runs its handler and sends
    /// nothing back.
    pub fn notify(&self, routing_key: &str, params: impl Serialize) -> Result<(), RpcError> {
        let params = encode("params", &params)?;
        (self.ctx.host.notify())(self.ctx.data, routing_key.into(), params.as_str().into())
            .into_result()
            .map_err(RpcError::from_abi)
    }

    /// Sends `result` as the reply to request `id` on `queue`, outside the
    /// request/reply cycle (for work that finishes later). `id` is the
    /// request's id as [`Message::id`] gives it (any `Serialize` value: a
    /// `serde_json::Value`, a `&str` for a string id, the `&RawValue` of
    /// plugin-api 1.1); not [`Message::id_json`], which is JSON text.
    ///
    /// ```
    /// # use commissaire_plugin_api::prelude::*;
    /// # #[derive(Default)] pub struct Jobs;
    /// # #[service(name = "jobs")]
    /// # impl Jobs {
    /// /// Answers now, and once more when the work is done.
    /// fn on_start(&self, msg: &Message) -> Result<&'static str, RpcError> {
    ///     if let Some(queue) = msg.reply_to() {
    ///         msg.bus().respond(queue, msg.id(), json!({"done": true}))?;
    ///     }
    ///     Ok("started")
    /// }
    /// # }
    /// ```
    pub fn respond(
        &self,
        queue: &str,
        id: impl Serialize,
        result: impl Serialize,
    ) -> Result<(), RpcError> {
        let id = encode("id", &id)?;
        let result = encode("result", &result)?;
        (self.ctx.host.respond())(
            self.ctx.data,
            queue.into(),
            id.as_str().into(),
            result.as_str().into(),
        )
        .into_result()
        .map_err(RpcError::from_abi)
    }

    /// Publishes `body` exactly as given on the deployment's exchange under
    /// `routing_key`, with no reply queue and no JSON-RPC envelope: what
    /// Commissaire services sent with kombu's `producer.publish`, such as
    /// the storage service's `notify.storage.<Class>.<event>` bodies
    /// (`{"event": …, "class": …, "model": …}`). Use [`Bus::notify`] to
    /// call another service's handler instead.
    ///
    /// The body is text (Commissaire's bodies are JSON, sent as
    /// `application/json`); for a `serde` value, pass
    /// `&serde_json::to_string(&value)?`, or format the text yourself when
    /// its spacing or key order matters to its consumers. The host refuses
    /// a body over its `[bus] max_message_bytes` and a routing key the bus
    /// cannot carry.
    ///
    /// On hosts older than plugin-api 1.4 it fails with
    /// [`RpcError::HOST_UNSUPPORTED`] (-32000) and publishes nothing.
    ///
    /// ```
    /// # use commissaire_plugin_api::prelude::*;
    /// # #[derive(Default)] pub struct Inventory;
    /// # #[service(name = "inventory")]
    /// # impl Inventory {
    /// /// Announces a new item to whoever listens on `notify.inventory.*`.
    /// fn on_add(&self, msg: &Message, name: String) -> Result<(), RpcError> {
    ///     let body = json!({"event": "created", "name": name}).to_string();
    ///     msg.bus().publish("notify.inventory.created", &body)
    /// }
    /// # }
    /// ```
    pub fn publish(&self, routing_key: &str, body: &str) -> Result<(), RpcError> {
        let Some(publish) = self.ctx.host.publish() else {
            return Err(RpcError::host_unsupported("publish"));
        };
        // An empty exchange is the ABI's "the deployment's exchange".
        publish(self.ctx.data, "".into(), routing_key.into(), body.into())
            .into_result()
            .map_err(RpcError::from_abi)
    }
}

impl fmt::Debug for Bus<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Bus")
    }
}

/// The [`Completion`] of `request_async`: hands the reply to the awaiting
/// future, if it is still there.
extern "C" fn reply_arrived(data: *const ErasedObject, result: CallResult) {
    // SAFETY: `data` was made by `request_async_ms` from a
    // `Box<oneshot::Sender>`, and the host calls this exactly once.
    let tx = unsafe {
        Box::from_raw(
            data.cast::<tokio::sync::oneshot::Sender<CallResult>>()
                .cast_mut(),
        )
    };
    // The handler may have been cancelled meanwhile: nobody to tell.
    let _ = tx.send(result);
}

fn decode_reply<R: DeserializeOwned>(routing_key: &str, reply: CallResult) -> Result<R, RpcError> {
    let reply = reply.into_result().map_err(RpcError::from_abi)?;
    serde_json::from_str(reply.as_str()).map_err(|e| {
        RpcError::internal_error(format!(
            "the reply of `{routing_key}` does not fit the expected type: {e}"
        ))
    })
}

fn encode(what: &str, value: &impl Serialize) -> Result<String, RpcError> {
    serde_json::to_string(value)
        .map_err(|e| RpcError::internal_error(format!("cannot encode {what}: {e}")))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::prelude::*;
    use crate::testing::TestService;

    #[derive(Default)]
    struct Caller;

    #[service(name = "caller")]
    impl Caller {
        fn on_ask(&self, msg: &Message, timeout_us: Option<u64>) -> Result<i64, RpcError> {
            let bus = msg.bus();
            match timeout_us {
                None => bus.request("calc.add", [1, 2]),
                Some(us) => bus.request_with_timeout("calc.add", [1, 2], Duration::from_micros(us)),
            }
        }

        fn on_later(&self, msg: &Message) -> Result<(), RpcError> {
            let queue = msg.reply_to().unwrap_or("nowhere");
            msg.bus().respond(queue, msg.id(), json!({"done": true}))
        }

        fn on_announce(&self, msg: &Message, body: String) -> Result<(), RpcError> {
            msg.bus().publish("notify.caller.announced", &body)
        }
    }

    fn caller() -> TestService<Caller> {
        TestService::<Caller>::new().with_route("calc.*", |_, _| Ok(json!(3)))
    }

    #[test]
    fn request_uses_the_hosts_default_timeout() {
        let svc = caller();
        assert_eq!(svc.call("ask", json!([])), Ok(json!(3)));
        assert_eq!(
            svc.requests(),
            [("calc.add".to_owned(), json!([1, 2]), None)]
        );
    }

    #[test]
    fn request_with_timeout_is_that_timeout_even_zero() {
        let svc = caller();
        for us in [2_000_000, 1_500, 0] {
            assert_eq!(svc.call("ask", json!([us])), Ok(json!(3)));
        }
        let timeouts: Vec<_> = svc.requests().into_iter().map(|(_, _, t)| t).collect();
        assert_eq!(
            timeouts,
            [
                Some(Duration::from_secs(2)),
                Some(Duration::from_millis(2)),
                Some(Duration::from_millis(1)),
            ]
        );
    }

    #[test]
    fn publish_sends_the_body_as_given() {
        let svc = caller();
        let body = r#"{"event": "created", "class": "Host"}"#;
        assert_eq!(svc.call("announce", json!([body])), Ok(json!(null)));
        assert_eq!(
            svc.published(),
            [("notify.caller.announced".to_owned(), body.to_owned())]
        );
        assert!(svc.notifications().is_empty());
    }

    #[test]
    fn respond_takes_the_id_as_the_message_gives_it() {
        let svc = caller();
        assert_eq!(svc.call("later", json!([])), Ok(json!(null)));
        assert_eq!(
            svc.responses(),
            [(
                "test-reply".to_owned(),
                json!("test"),
                json!({"done": true})
            )]
        );
    }
}
