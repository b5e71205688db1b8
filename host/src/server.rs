//! `run`: load the plugins, connect, declare, consume every service with
//! `concurrency` handlers in flight, answer, and stop cleanly.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use commissaire_plugin_api::host::{HostBus, RequestMeta};
use commissaire_plugin_api::{abi::log_level, RpcError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::{self, BusError, BusTransport, Consumer, Incoming, Outgoing, Prefetch, Settle};
use crate::client::RpcClient;
use crate::config::HostConfig;
use crate::dispatch::{Delivery, Service};
use crate::plugin::{DirError, LoadErrorKind, PluginSet};

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The plugin directory is unreadable.
    #[error(transparent)]
    PluginDir(#[from] DirError),
    /// Nothing to serve.
    #[error("no plugin to serve in {0} (build them and copy the .so files there)")]
    NoPlugins(String),
    /// Two plugins export one service.
    #[error("{0}")]
    Duplicate(String),
    /// A `[[service]]` entry names no loaded plugin.
    #[error(
        "{location}: [[service]] `{name}` is not exported by any loaded plugin (loaded: {loaded})"
    )]
    UnknownService {
        /// `file:line:col`.
        location: String,
        /// The name.
        name: String,
        /// The services that did load.
        loaded: String,
    },
    /// A service's `init` failed.
    #[error("service `{service}` failed to start: {error}")]
    ServiceInit {
        /// The service.
        service: String,
        /// Its error.
        error: RpcError,
    },
    /// The bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A consumer ended without being stopped: the broker connection is gone.
    #[error("lost the bus connection ({0}); exiting so that a supervisor can restart the host")]
    BusLost(String),
    /// The HTTP endpoint could not listen.
    #[error("cannot listen on {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Which services are consuming; what `/healthz` reports.
#[derive(Debug, Default)]
pub struct Health {
    services: RwLock<BTreeMap<String, bool>>,
}

impl Health {
    fn set(&self, service: &str, consuming: bool) {
        if let Ok(mut s) = self.services.write() {
            s.insert(service.to_owned(), consuming);
        }
    }

    /// Each service and whether it is consuming.
    pub fn snapshot(&self) -> BTreeMap<String, bool> {
        self.services.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// True when there is at least one service and all are consuming.
    pub fn all_consuming(&self) -> bool {
        let s = self.snapshot();
        !s.is_empty() && s.values().all(|c| *c)
    }
}

/// The bus as handlers see it: blocking calls on the host's client.
struct HandlerBus {
    client: Arc<RpcClient>,
    runtime: tokio::runtime::Handle,
    service: Arc<str>,
    /// The service's consumers and their configured prefetch.
    prefetch: Vec<Arc<dyn Prefetch>>,
    concurrency: u16,
    /// Handlers now waiting in a bus request, and the limit last set.
    waiting: tokio::sync::Mutex<(u16, u16)>,
}

impl HandlerBus {
    /// While a handler waits for a reply, its slot does not count: the
    /// consumers may take one more delivery each (it may be the very request
    /// the handler waits for). The limit is raised ahead (twice what is
    /// needed) and lowered lazily, so that a busy service does not change
    /// it on every call.
    async fn waiting(&self, delta: i32) {
        let mut state = self.waiting.lock().await;
        let (waiting, limit) = &mut *state;
        *waiting = u16::try_from(i32::from(*waiting) + delta).unwrap_or(0);
        let needed = self.concurrency.saturating_add(*waiting);
        let new_limit = if needed > *limit {
            self.concurrency.saturating_add(waiting.saturating_mul(2))
        } else if *waiting == 0 || needed.saturating_add(self.concurrency) < *limit {
            needed
        } else {
            return;
        };
        if new_limit == *limit {
            return;
        }
        *limit = new_limit;
        for p in &self.prefetch {
            if let Err(e) = p.set(new_limit).await {
                tracing::warn!(service = &*self.service, error = %e, "cannot change the prefetch");
            }
        }
    }
}

impl HostBus for HandlerBus {
    fn request(
        &self,
        routing_key: &str,
        params_json: &str,
        timeout: Option<Duration>,
    ) -> Result<String, RpcError> {
        let reply = self.runtime.block_on(async {
            self.waiting(1).await;
            let reply = self
                .client
                .request(routing_key, Some(params_json), timeout)
                .await;
            self.waiting(-1).await;
            reply
        })?;
        reply.map(|raw| raw.get().to_owned())
    }

    fn notify(&self, routing_key: &str, params_json: &str) -> Result<(), RpcError> {
        self.runtime
            .block_on(self.client.notify(routing_key, Some(params_json)))
            .map_err(|e| RpcError::internal_error(e.to_string()))
    }

    fn respond(&self, queue: &str, id_json: &str, result_json: &str) -> Result<(), RpcError> {
        self.runtime
            .block_on(self.client.respond(queue, id_json, result_json))
            .map_err(|e| RpcError::internal_error(e.to_string()))
    }

    fn log(&self, meta: &RequestMeta<'_>, level: u8, message: &str) {
        let (service, method, id) = (&*self.service, meta.method, meta.id_json);
        match level {
            log_level::ERROR => tracing::error!(service, method, id, "{message}"),
            log_level::WARN => tracing::warn!(service, method, id, "{message}"),
            log_level::INFO => tracing::info!(service, method, id, "{message}"),
            _ => tracing::debug!(service, method, id, "{message}"),
        }
    }
}

/// A running host.
pub struct RunningHost {
    /// What `/healthz` reports.
    pub health: Arc<Health>,
    /// The client the host's own requests use.
    pub client: Arc<RpcClient>,
    /// The HTTP endpoint's bound address.
    pub http_addr: Option<SocketAddr>,
    stop: CancellationToken,
    lost: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for RunningHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningHost")
            .field("http_addr", &self.http_addr)
            .finish_non_exhaustive()
    }
}

/// Loads, connects, declares and starts consuming; returns once every
/// service is consuming.
pub async fn start(config: &HostConfig) -> Result<RunningHost, HostError> {
    let set = PluginSet::load_dir(&config.plugins_dir)?;
    for refused in &set.refused {
        if let LoadErrorKind::DuplicateService { .. } = refused.kind {
            return Err(HostError::Duplicate(refused.to_string()));
        }
        tracing::warn!(file = %refused.path.display(), reason = %refused.kind, "plugin skipped");
    }
    if set.plugins.is_empty() {
        return Err(HostError::NoPlugins(
            config.plugins_dir.display().to_string(),
        ));
    }
    let loaded: Vec<&str> = set
        .plugins
        .iter()
        .map(|p| p.service_name.as_str())
        .collect();
    for (name, settings) in &config.services {
        if !loaded.contains(&name.as_str()) {
            return Err(HostError::UnknownService {
                location: settings.location.clone().unwrap_or_default(),
                name: name.clone(),
                loaded: loaded.join(", "),
            });
        }
    }

    let bus = bus::connect(&config.bus_uri).await?;
    tracing::info!(bus = %bus.describe(), exchange = %config.exchange, "connected");
    let client = RpcClient::start(bus.clone(), &config.exchange, config.request_timeout).await?;
    bus.declare_exchange(&config.exchange).await?;

    let health = Arc::new(Health::default());
    let stop = CancellationToken::new();
    let lost = CancellationToken::new();
    let tracker = TaskTracker::new();
    let runtime = tokio::runtime::Handle::current();

    for library in set.plugins {
        let name = library.service_name.clone();
        let settings = config.service(&name);
        let service =
            Service::start(library, &settings.config).map_err(|error| HostError::ServiceInit {
                service: name.clone(),
                error,
            })?;
        let mut consumers = Vec::new();
        for queue in &settings.queues {
            bus.declare_queue(&config.exchange, &queue.name, &queue.routing_key)
                .await?;
            consumers.push(bus.consume(&queue.name, settings.concurrency).await?);
        }
        let handler_bus = Arc::new(HandlerBus {
            client: client.clone(),
            runtime: runtime.clone(),
            service: Arc::from(name.as_str()),
            prefetch: consumers.iter().map(|c| c.prefetch.clone()).collect(),
            concurrency: settings.concurrency,
            waiting: tokio::sync::Mutex::new((0, settings.concurrency)),
        });
        for consumer in consumers {
            tracker.spawn(consume_loop(ConsumeLoop {
                service: service.clone(),
                consumer,
                bus: bus.clone(),
                handler_bus: handler_bus.clone(),
                tracker: tracker.clone(),
                stop: stop.clone(),
                lost: lost.clone(),
                health: health.clone(),
            }));
        }
        health.set(&name, true);
        let queues: Vec<String> = settings
            .queues
            .iter()
            .map(|q| format!("{} ({})", q.name, q.routing_key))
            .collect();
        tracing::info!(
            service = %name,
            queues = %queues.join(", "),
            concurrency = settings.concurrency,
            "ready"
        );
    }

    let http_addr = match config.http_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| HostError::Http { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| HostError::Http { addr, source })?;
            let app = crate::http::router(client.clone(), health.clone());
            let http_stop = stop.clone();
            tracker.spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { http_stop.cancelled().await })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "HTTP endpoint failed");
                }
            });
            tracing::info!(listen = %bound, "HTTP endpoint ready");
            Some(bound)
        }
        None => None,
    };

    Ok(RunningHost {
        health,
        client,
        http_addr,
        stop,
        lost,
        tracker,
    })
}

impl RunningHost {
    /// Stops consuming, lets in-flight handlers finish and their replies go
    /// out, hands unstarted deliveries back, and closes the connection.
    pub async fn shutdown(self) {
        tracing::info!("stopping: finishing in-flight requests");
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        self.client.bus().close().await;
        tracing::info!("stopped");
    }
}

impl RunningHost {
    /// Resolves when a consumer ended on its own (the connection is gone).
    pub async fn lost(&self) {
        self.lost.cancelled().await;
    }
}

/// Runs the host until `signal` resolves, then stops cleanly. If the bus
/// connection is lost first, stops and returns [`HostError::BusLost`].
pub async fn run(config: &HostConfig, signal: impl Future<Output = ()>) -> Result<(), HostError> {
    let host = start(config).await?;
    let lost = tokio::select! {
        () = signal => false,
        () = host.lost() => true,
    };
    let bus = host.client.bus().describe();
    host.shutdown().await;
    if lost {
        return Err(HostError::BusLost(bus));
    }
    Ok(())
}

struct ConsumeLoop {
    service: Arc<Service>,
    consumer: Consumer,
    bus: Arc<dyn BusTransport>,
    handler_bus: Arc<HandlerBus>,
    tracker: TaskTracker,
    stop: CancellationToken,
    lost: CancellationToken,
    health: Arc<Health>,
}

/// Takes deliveries (the prefetch limit bounds how many are unsettled, so
/// how many handlers are in flight); never blocks on a handler (they run on
/// the blocking pool).
async fn consume_loop(l: ConsumeLoop) {
    loop {
        let incoming = tokio::select! {
            biased;
            () = l.stop.cancelled() => break,
            m = l.consumer.deliveries.recv() => match m {
                Ok(m) => m,
                Err(_) => {
                    tracing::error!(service = l.service.name(), "consumer ended: the bus connection is gone");
                    l.health.set(l.service.name(), false);
                    l.lost.cancel();
                    break;
                }
            },
        };
        let service = l.service.clone();
        let bus = l.bus.clone();
        let handler_bus = l.handler_bus.clone();
        l.tracker.spawn(answer(service, bus, handler_bus, incoming));
    }
    l.consumer.stop.cancel();
    // Prefetched but never started: back to the queue for another worker.
    while let Ok(m) = l.consumer.deliveries.try_recv() {
        if let Err(e) = m.settle(Settle::Requeue).await {
            tracing::warn!(error = %e, "could not hand a delivery back");
        }
    }
}

/// Handles one delivery, publishes its reply, then acks it.
async fn answer(
    service: Arc<Service>,
    bus: Arc<dyn BusTransport>,
    handler_bus: Arc<HandlerBus>,
    incoming: Incoming,
) {
    let run = move || {
        let delivery = Delivery {
            exchange: &incoming.exchange,
            routing_key: &incoming.routing_key,
            body: &incoming.body,
            reply_to: incoming.reply_to.as_deref(),
            correlation_id: incoming.correlation_id.as_deref(),
            redelivered: incoming.redelivered,
        };
        let handled = service.handle(&delivery, &*handler_bus);
        (incoming, handled)
    };
    // Handlers are synchronous and may block. On the multi-threaded runtime
    // the handler runs right here and the runtime moves its other work to
    // another thread while it does: no hand-off to the blocking pool and
    // back on the request's path (the A/B benchmark showed that hop cost
    // ~20% of throughput). Elsewhere, the blocking pool.
    let handled = if tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread
    {
        Ok(tokio::task::block_in_place(run))
    } else {
        tokio::task::spawn_blocking(run).await
    };
    let Ok((incoming, handled)) = handled else {
        tracing::error!("a handler task failed; its request stays unacked for redelivery");
        return;
    };
    if let Some(reply) = &handled.reply {
        let published = bus
            .publish(Outgoing {
                exchange: "",
                routing_key: &reply.to,
                body: &reply.body,
                reply_to: None,
                correlation_id: reply.correlation_id.as_deref(),
            })
            .await;
        if let Err(e) = published {
            tracing::error!(reply_to = %reply.to, error = %e, "reply not published; requeueing the request");
            let _ = incoming.settle(Settle::Requeue).await;
            return;
        }
    }
    if let Err(e) = incoming.settle(Settle::Ack).await {
        tracing::warn!(error = %e, "ack failed; the request may be delivered again");
    }
}
