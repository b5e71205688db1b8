//! The bus as handlers see it: blocking calls on the host's client.
//!
//! While a handler waits for a reply, its slot does not count: the
//! service's consumers may take one more delivery each, for it may be the
//! very request the handler waits for (`wordy_add` calling `simple.add` on
//! its own queue). That raise is capped by `max_bus_waits`, which bounds
//! the threads waiting handlers hold. Beyond it a call is never refused:
//! - to another service, it waits for its reply without raising the
//!   prefetch: the service takes no more deliveries until handlers finish
//!   (the broker keeps the burst);
//! - to this service itself, it runs here, on the calling handler's
//!   thread: sent, it would queue behind the very deliveries whose handlers
//!   wait, until their timeouts. At most [`MAX_NESTED`] deep; past that it
//!   goes to the bus.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use commissaire_plugin_api::host::{HostBus, ReplyTo, RequestMeta};
use commissaire_plugin_api::RpcError;

use std::cell::Cell;

use crate::bus::{Incoming, Prefetch};
use crate::client::RpcClient;
use crate::config::ServiceSettings;
use crate::dispatch::{Handled, Ran, Service};
use crate::trace::TraceContext;

/// How deep calls to the service itself run on their caller's thread
/// (each inside the one before) once `max_bus_waits` handlers wait.
pub const MAX_NESTED: u8 = 8;

thread_local! {
    /// Calls to the service itself running on this thread, one in another.
    static NESTED: Cell<u8> = const { Cell::new(0) };
}

/// The bus of one service's handlers.
pub struct HandlerBus {
    /// Itself, for the calls to the service itself that async handlers
    /// make past the cap (set by [`HandlerBus::shared`]).
    me: Weak<HandlerBus>,
    client: Arc<RpcClient>,
    runtime: tokio::runtime::Handle,
    service: Arc<str>,
    /// The service, to run calls to itself here when the bus waits are
    /// all taken (none: they go to the bus).
    serving: Option<Arc<Service>>,
    /// Its queues' binding keys: a call they match is a call to itself.
    bindings: Vec<String>,
    /// The prefetch raise of waiting handlers.
    raise: Arc<Raise>,
    /// The largest body a handler may `publish` (`[bus] max_message_bytes`).
    max_message_bytes: usize,
    /// On the multi-threaded runtime, where a handler may be running on a
    /// runtime thread (see `placement`): a bus call first hands the
    /// thread's other work over (a no-op if the handler already did).
    multi_thread: bool,
    metrics: Arc<crate::metrics::ServiceMetrics>,
}

/// The prefetch raise: while handlers wait on the bus, the service's
/// consumers take one more delivery each, up to `max_bus_waits`.
struct Raise {
    service: Arc<str>,
    /// The service's consumers' prefetch limits (set once they consume).
    prefetch: OnceLock<Vec<Arc<dyn Prefetch>>>,
    concurrency: u16,
    max_waits: u16,
    /// Handlers now waiting in a bus request.
    waiting: AtomicU16,
    /// The prefetch limit last set.
    limit: tokio::sync::Mutex<u16>,
}

/// Counts a handler out of the waiting ones when its call ends, however
/// it ends.
struct Waiting(Arc<Raise>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HandlerBus {
    /// The bus for `service`'s handlers, with `settings.concurrency`
    /// handler slots and at most `settings.max_bus_waits` of them waiting
    /// on the bus at once, and raw bodies of at most `max_message_bytes`.
    pub fn new(
        client: Arc<RpcClient>,
        service: Arc<str>,
        settings: &ServiceSettings,
        max_message_bytes: usize,
        metrics: Arc<crate::metrics::ServiceMetrics>,
    ) -> Self {
        let (concurrency, max_waits) = (settings.concurrency, settings.max_bus_waits);
        let multi_thread = tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread;
        Self {
            me: Weak::new(),
            client,
            runtime: tokio::runtime::Handle::current(),
            service: service.clone(),
            serving: None,
            bindings: settings
                .queues
                .iter()
                .map(|q| q.routing_key.clone())
                .collect(),
            raise: Arc::new(Raise {
                service: service.clone(),
                prefetch: OnceLock::new(),
                concurrency,
                max_waits,
                waiting: AtomicU16::new(0),
                limit: tokio::sync::Mutex::new(concurrency),
            }),
            max_message_bytes,
            multi_thread,
            metrics,
        }
    }

    /// Lets calls to `serving` itself run on their caller's thread once
    /// `max_bus_waits` handlers wait.
    pub fn serving(mut self, serving: Arc<Service>) -> Self {
        self.serving = Some(serving);
        self
    }

    /// Shares it, knowing itself: async handlers' calls to the service
    /// itself past the cap run here too.
    pub fn shared(self) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            ..self
        })
    }

    /// Whether handlers may run on a runtime thread (see `placement`).
    pub fn multi_thread(&self) -> bool {
        self.multi_thread
    }

    /// Sets, once, the prefetch limits a waiting handler raises; a handler
    /// calling the bus before (deliveries start with the first consumer)
    /// raises nothing.
    pub fn set_prefetch(&self, prefetch: Vec<Arc<dyn Prefetch>>) {
        let _ = self.raise.prefetch.set(prefetch);
    }

    /// Runs `f`, which blocks on the runtime, from a handler.
    fn blocking<T>(&self, f: impl FnOnce() -> T) -> T {
        if self.multi_thread {
            tokio::task::block_in_place(f)
        } else {
            f()
        }
    }

    /// Counts the calling handler in, unless `max_bus_waits` already wait.
    fn enter(&self) -> Option<Waiting> {
        let max = self.raise.max_waits;
        self.raise
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < max).then_some(w + 1)
            })
            .ok()
            .map(|_| Waiting(self.raise.clone()))
    }

    /// Whether the broker would route `routing_key` to this service's own
    /// queues (by AMQP's rules and kombu's alike, so that a call runs here
    /// only where either broker would have brought it).
    fn is_own(&self, routing_key: &str) -> bool {
        self.bindings.iter().any(|b| {
            crate::bus::topic::matches(b, routing_key)
                && crate::bus::topic::kombu_matches(b, routing_key) == Some(true)
        })
    }

    /// Runs a call to this service on this thread, as its handler would
    /// run it from the bus: counted under its method, its result or error
    /// returned.
    fn run_here(
        &self,
        serving: &Service,
        caller: &RequestMeta<'_>,
        routing_key: &str,
        params_json: &str,
    ) -> Result<String, RpcError> {
        let id = uuid::Uuid::new_v4().to_string();
        let parent = parent(caller);
        let incoming = Incoming {
            exchange: self.client.exchange().to_owned(),
            routing_key: routing_key.to_owned(),
            body: crate::protocol::request_body(routing_key, Some(&id), Some(params_json)),
            reply_to: Some(String::new()),
            correlation_id: None,
            malformed: None,
            traceparent: None,
            redelivered: false,
            deadline: crate::deadline::current(),
            settlement: None,
        };
        let traceparent = TraceContext::child_of(parent.as_ref()).header();
        NESTED.with(|n| n.set(n.get() + 1));
        let handled = self.blocking(|| serving.handle(&incoming, Some(&traceparent), self));
        NESTED.with(|n| n.set(n.get().saturating_sub(1)));
        self.answer(routing_key, handled)
    }

    /// A call run here, counted under its method: its result or error.
    fn answer(&self, routing_key: &str, handled: Handled) -> Result<String, RpcError> {
        self.metrics.request(routing_key, handled.code);
        self.metrics.took(routing_key, handled.took);
        let reply = handled.reply.map(|r| r.body).unwrap_or_default();
        match crate::protocol::read_response(&reply) {
            Ok(Ok(result)) => Ok(result.get().to_owned()),
            Ok(Err(error)) => Err(error),
            Err(why) => Err(RpcError::internal_error(format!(
                "`{routing_key}` answered what is not a response: {why}"
            ))),
        }
    }

    /// Runs an async handler's call to this service here, as its handler
    /// would run it from the bus, within `timeout`: an async one awaited,
    /// a sync one on the blocking pool.
    async fn run_here_async(
        self: Arc<Self>,
        serving: Arc<Service>,
        parent: Option<TraceContext>,
        routing_key: &str,
        params_json: &str,
        deadline: Option<u64>,
        timeout: Duration,
    ) -> Result<String, RpcError> {
        let id = uuid::Uuid::new_v4().to_string();
        let incoming = Incoming {
            exchange: self.client.exchange().to_owned(),
            routing_key: routing_key.to_owned(),
            body: crate::protocol::request_body(routing_key, Some(&id), Some(params_json)),
            reply_to: Some(String::new()),
            correlation_id: None,
            malformed: None,
            traceparent: None,
            redelivered: false,
            deadline,
            settlement: None,
        };
        let traceparent = TraceContext::child_of(parent.as_ref()).header();
        let handled = if serving.runs_async(routing_key) {
            let bus: Arc<dyn HostBus> = self.clone();
            let limit = tokio::time::Instant::now() + timeout;
            match serving
                .handle_async(&incoming, Some(&traceparent), bus, deadline, limit)
                .await
            {
                Ran::Done(handled) => handled,
                // Dropped: cancelled.
                Ran::TimedOut(_) => {
                    return Err(RpcError::internal_error(format!(
                        "`{routing_key}` did not answer within {}s",
                        timeout.as_secs_f64()
                    )))
                }
            }
        } else {
            let me = self.clone();
            let ran = tokio::task::spawn_blocking(move || {
                crate::deadline::with(deadline, || {
                    serving.handle(&incoming, Some(&traceparent), &*me)
                })
            });
            ran.await
                .map_err(|e| RpcError::internal_error(format!("the handler's task failed: {e}")))?
        };
        self.answer(routing_key, handled)
    }
}

impl Raise {
    /// Brings the consumers' prefetch in line with the waiting handlers:
    /// raised ahead (twice what is needed) and lowered only once it is
    /// `concurrency` above what is needed, since a change costs a broker
    /// round trip that a service calling the bus should not pay per call.
    async fn adjust_prefetch(&self) {
        let mut limit = self.limit.lock().await;
        let waiting = self.waiting.load(Ordering::Acquire);
        let needed = self.concurrency.saturating_add(waiting);
        let cap = self.concurrency.saturating_add(self.max_waits);
        let new_limit = if needed > *limit {
            self.concurrency
                .saturating_add(waiting.saturating_mul(2))
                .min(cap)
        } else if needed.saturating_add(self.concurrency) < *limit {
            needed
        } else {
            return;
        };
        if new_limit == *limit {
            return;
        }
        *limit = new_limit;
        for p in self.prefetch.get().into_iter().flatten() {
            if let Err(e) = p.set(new_limit).await {
                tracing::warn!(service = &*self.service, error = %e, "cannot change the prefetch");
            }
        }
    }
}

/// The trace context of the request whose handler calls the bus.
fn parent(caller: &RequestMeta<'_>) -> Option<TraceContext> {
    caller.traceparent.and_then(TraceContext::parse)
}

impl HostBus for HandlerBus {
    fn request(
        &self,
        caller: &RequestMeta<'_>,
        routing_key: &str,
        params_json: &str,
        timeout: Option<Duration>,
    ) -> Result<String, RpcError> {
        let parent = parent(caller);
        // No longer than what is left of the request that calls.
        let timeout = crate::deadline::bounded(timeout.unwrap_or(self.client.default_timeout()));
        if timeout.is_zero() {
            self.metrics.bus_call(routing_key, false);
            return Err(RpcError::internal_error(format!(
                "not sent to `{routing_key}`: the calling request's deadline passed"
            )));
        }
        let waiting = self.enter();
        let here = self.serving.as_ref().filter(|_| {
            waiting.is_none() && self.is_own(routing_key) && NESTED.with(Cell::get) < MAX_NESTED
        });
        if let Some(serving) = here {
            crate::throttled!(info!(
                service = &*self.service,
                max_bus_waits = self.raise.max_waits,
                "max_bus_waits handlers wait on the bus: calls to the service itself run in their caller's thread"
            ));
            let result = self.run_here(serving, caller, routing_key, params_json);
            self.metrics.bus_call(routing_key, result.is_ok());
            return result;
        }
        let raised = waiting.is_some();
        let reply = self.blocking(|| {
            self.runtime.block_on(async {
                // Past the cap the call waits without a raise: the service
                // takes no more deliveries until handlers finish.
                if raised {
                    self.raise.adjust_prefetch().await;
                }
                let reply = self
                    .client
                    .request(
                        routing_key,
                        Some(params_json),
                        Some(timeout),
                        parent.as_ref(),
                    )
                    .await;
                drop(waiting);
                if raised {
                    self.raise.adjust_prefetch().await;
                }
                reply
            })
        });
        self.metrics
            .bus_call(routing_key, matches!(reply, Ok(Ok(_))));
        reply?.map(|raw| raw.get().to_owned())
    }

    /// As [`HandlerBus::request`], on the runtime: no thread waits. A
    /// call to the service itself raises the prefetch as a sync handler's
    /// does; past the cap it runs here, awaited (or on the blocking pool,
    /// to a sync handler), not queued behind the deliveries whose handlers
    /// wait for it.
    fn request_async(
        &self,
        caller: &RequestMeta<'_>,
        routing_key: &str,
        params_json: &str,
        timeout: Option<Duration>,
        reply: ReplyTo,
    ) {
        let parent = parent(caller);
        let timeout = timeout.unwrap_or(self.client.default_timeout());
        // No longer than what is left of the request that calls.
        let timeout = caller
            .deadline
            .map_or(timeout, |d| timeout.min(crate::deadline::remaining(d)));
        if timeout.is_zero() {
            self.metrics.bus_call(routing_key, false);
            return reply.send(Err(RpcError::internal_error(format!(
                "not sent to `{routing_key}`: the calling request's deadline passed"
            ))));
        }
        // Only a call to the service itself raises the prefetch: it may be
        // the very delivery the slots wait for. A call to another service
        // keeps its slot, and the broker keeps the rest of a burst; no
        // thread waits either way.
        let own = self.is_own(routing_key);
        let waiting = if own { self.enter() } else { None };
        let (metrics, routing_key, params) = (
            self.metrics.clone(),
            routing_key.to_owned(),
            params_json.to_owned(),
        );
        if waiting.is_none() && own {
            if let (Some(serving), Some(me)) = (self.serving.clone(), self.me.upgrade()) {
                crate::throttled!(info!(
                    service = &*self.service,
                    max_bus_waits = self.raise.max_waits,
                    "max_bus_waits handlers wait on the bus: calls to the service itself run here"
                ));
                let deadline = caller.deadline;
                self.runtime.spawn(async move {
                    let result = me
                        .run_here_async(serving, parent, &routing_key, &params, deadline, timeout)
                        .await;
                    metrics.bus_call(&routing_key, result.is_ok());
                    reply.send(result);
                });
                return;
            }
        }
        let client = self.client.clone();
        self.runtime.spawn(async move {
            let raise = waiting.as_ref().map(|w| w.0.clone());
            // Past the cap the call waits without a raise: the service
            // takes no more deliveries until handlers finish.
            if let Some(raise) = &raise {
                raise.adjust_prefetch().await;
            }
            let answer = client
                .request(&routing_key, Some(&params), Some(timeout), parent.as_ref())
                .await;
            drop(waiting);
            if let Some(raise) = &raise {
                raise.adjust_prefetch().await;
            }
            metrics.bus_call(&routing_key, matches!(answer, Ok(Ok(_))));
            reply.send(match answer {
                Ok(Ok(raw)) => Ok(raw.get().to_owned()),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(e.into()),
            });
        });
    }

    fn notify(
        &self,
        caller: &RequestMeta<'_>,
        routing_key: &str,
        params_json: &str,
    ) -> Result<(), RpcError> {
        let parent = parent(caller);
        self.blocking(|| {
            self.runtime.block_on(self.client.notify(
                routing_key,
                Some(params_json),
                parent.as_ref(),
            ))
        })
        .inspect(|()| self.metrics.bus_call(routing_key, true))
        .inspect_err(|_| self.metrics.bus_call(routing_key, false))
        .map_err(|e| RpcError::internal_error(e.to_string()))
    }

    fn respond(
        &self,
        caller: &RequestMeta<'_>,
        queue: &str,
        id_json: &str,
        result_json: &str,
    ) -> Result<(), RpcError> {
        let parent = parent(caller);
        self.blocking(|| {
            self.runtime.block_on(
                self.client
                    .respond(queue, id_json, result_json, parent.as_ref()),
            )
        })
        .map_err(|e| RpcError::internal_error(e.to_string()))
    }

    /// Only on the deployment's exchange: a plugin has no business on
    /// another (the reply exchanges of Redis callers, `amq.*`).
    fn publish(
        &self,
        caller: &RequestMeta<'_>,
        exchange: &str,
        routing_key: &str,
        body: &str,
    ) -> Result<(), RpcError> {
        let ours = self.client.exchange();
        if !exchange.is_empty() && exchange != ours {
            self.metrics.bus_call(routing_key, false);
            return Err(RpcError::invalid_params(format!(
                "a handler publishes on the deployment's exchange `{ours}` only, not `{exchange}`"
            )));
        }
        if body.len() > self.max_message_bytes {
            self.metrics.bus_call(routing_key, false);
            return Err(RpcError::internal_error(format!(
                "the body of {} bytes exceeds max_message_bytes ({})",
                body.len(),
                self.max_message_bytes
            )));
        }
        let parent = parent(caller);
        self.blocking(|| {
            self.runtime.block_on(self.client.publish_raw(
                routing_key,
                body.as_bytes(),
                parent.as_ref(),
            ))
        })
        .inspect(|()| self.metrics.bus_call(routing_key, true))
        .inspect_err(|_| self.metrics.bus_call(routing_key, false))
        .map_err(|e| RpcError::internal_error(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use commissaire_plugin_api::host::{HostBus, RequestMeta};

    use super::HandlerBus;
    use crate::bus::memory::MemoryBus;
    use crate::bus::{channel_sink, BusTransport};
    use crate::client::RpcClient;

    const META: RequestMeta<'static> = RequestMeta {
        exchange: "commissaire",
        routing_key: "storage.save",
        method: "save",
        id_json: "\"1\"",
        reply_to: Some("reply"),
        correlation_id: None,
        redelivered: false,
        traceparent: None,
        deadline: None,
    };

    /// A handler's raw body goes out byte for byte on the deployment's
    /// exchange, up to `max_message_bytes`, and nowhere else.
    #[tokio::test(flavor = "multi_thread")]
    async fn publish_is_bounded_and_stays_on_the_deployments_exchange() {
        let bus: Arc<dyn BusTransport> = Arc::new(MemoryBus::new());
        bus.declare_exchange("commissaire").await.unwrap();
        bus.declare_queue("commissaire", "watch", "notify.#", &Default::default())
            .await
            .unwrap();
        let (sink, seen) = channel_sink();
        let _consumer = bus.consume("watch", 8, sink).await.unwrap();
        let client = RpcClient::start(
            bus.clone(),
            "commissaire",
            Duration::from_secs(1),
            Default::default(),
        )
        .await
        .unwrap();
        let metrics = crate::metrics::Metrics::default().service("storage", []);
        let settings = crate::config::ServiceSettings {
            concurrency: 1,
            max_bus_waits: 1,
            ..crate::config::ServiceSettings::defaults("storage")
        };
        let handler_bus = Arc::new(HandlerBus::new(
            client,
            "storage".into(),
            &settings,
            1024,
            metrics,
        ));

        let publish = |exchange: &'static str, key: &'static str, body: String| {
            let handler_bus = handler_bus.clone();
            tokio::task::spawn_blocking(move || handler_bus.publish(&META, exchange, key, &body))
        };
        let body = r#"{"event": "created", "class": "Host"}"#.to_owned();
        publish("", "notify.storage.Host.created", body.clone())
            .await
            .unwrap()
            .unwrap();
        publish("commissaire", "notify.b", "x".repeat(1024))
            .await
            .unwrap()
            .unwrap();
        let too_big = publish("", "notify.c", "x".repeat(1025)).await.unwrap();
        assert_eq!(
            too_big.unwrap_err().message,
            "the body of 1025 bytes exceeds max_message_bytes (1024)"
        );
        let elsewhere = publish("amq.topic", "notify.d", "{}".into()).await.unwrap();
        assert_eq!(elsewhere.unwrap_err().code, -32602);
        let no_key = publish("", "", "{}".into()).await.unwrap();
        assert!(no_key.is_err());

        // The embedded bus hands deliveries on in tasks: in any order.
        let mut got = [seen.recv().await.unwrap(), seen.recv().await.unwrap()];
        got.sort_by_key(|d| d.body.len());
        assert_eq!(got[0].body, body.as_bytes());
        assert_eq!(got[0].routing_key, "notify.storage.Host.created");
        assert_eq!(got[0].reply_to, None);
        assert_eq!(got[1].body.len(), 1024);
        assert!(seen.is_empty());
    }
}
