//! One connection's session: the plugins loaded and started, the
//! exchange and queues declared, every queue consumed, until stopped or
//! the connection is lost.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::handler_bus::HandlerBus;
use super::lifecycle::{serve, Served};
use super::placement::Placement;
use super::Process;
use crate::bus::{BusTransport, Consumer, Incoming, Settle, Sink};
use crate::client::RpcClient;
use crate::config::{HostConfig, ServiceSettings};
use crate::dispatch::Service;
use crate::error::HostError;
use crate::plugin::{LoadErrorKind, PluginSet};

/// Where `service`'s handlers run: as `inline_handlers` says, else learnt
/// per method; never inline off the multi-threaded runtime.
fn placement(name: Arc<str>, service: &Service, settings: &ServiceSettings) -> Placement {
    let multi_thread = tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread;
    let forced = if multi_thread {
        settings.inline_handlers
    } else {
        Some(false)
    };
    let methods = service.library().methods.iter().map(|m| m.name.as_str());
    Placement::new(name, methods, forced)
}

/// A service ready to serve: its plugin initialised, its settings.
pub struct Prepared {
    service: Arc<Service>,
    settings: ServiceSettings,
}

/// Loads the plugin directory, checks the config against it and starts
/// the services (all, or only `only`).
pub fn prepare(config: &HostConfig, only: Option<&str>) -> Result<Vec<Prepared>, HostError> {
    let mut set = PluginSet::load_dir(&config.plugins_dir, config.plugin_trust)?;
    for refused in &set.refused {
        if let LoadErrorKind::DuplicateService { .. } = refused.kind {
            return Err(HostError::Duplicate(refused.to_string()));
        }
        if only.is_none() {
            tracing::warn!(file = %refused.path.display(), reason = %refused.kind, "plugin skipped");
        }
    }
    if set.plugins.is_empty() && !set.refused.is_empty() {
        let count = set.refused.len();
        if let Some(first) = set.refused.drain(..).next() {
            return Err(HostError::AllRefused {
                dir: config.plugins_dir.clone(),
                count,
                first,
            });
        }
    }
    let loaded: Vec<&str> = set
        .plugins
        .iter()
        .map(|p| p.service_name.as_str())
        .collect();
    config.check_services(&loaded)?;
    if let Some(service) = only {
        if !loaded.contains(&service) {
            return Err(HostError::NoSuchService {
                dir: config.plugins_dir.display().to_string(),
                service: service.to_owned(),
            });
        }
    }
    let mut prepared = Vec::new();
    for library in set.plugins {
        let name = library.service_name.clone();
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let settings = config.service(&name);
        let service =
            Service::start(library, &settings.config).map_err(|error| HostError::ServiceInit {
                service: name.clone(),
                error,
            })?;
        prepared.push(Prepared { service, settings });
    }
    Ok(prepared)
}

/// One connection's consumers and client.
pub struct Session {
    /// The client the host's own requests use.
    pub client: Arc<RpcClient>,
    /// Stops the consumers.
    pub stop: CancellationToken,
    /// Cancelled when the connection is lost.
    pub lost: CancellationToken,
    tracker: TaskTracker,
}

/// Declares and starts consuming every service on `bus`.
pub async fn open_session(
    config: &HostConfig,
    bus: Arc<dyn BusTransport>,
    services: &[Prepared],
    process: &Process,
) -> Result<Session, HostError> {
    let client = RpcClient::start(
        bus.clone(),
        &config.exchange,
        config.request_timeout,
        config.reply_queue,
    )
    .await?;
    bus.declare_exchange(&config.exchange).await?;
    bus.set_ack_window(config.ack_window);
    let stop = CancellationToken::new();
    let lost = CancellationToken::new();
    let tracker = TaskTracker::new();

    for Prepared { service, settings } in services {
        let name = service.name();
        let shared_name: Arc<str> = Arc::from(name);
        let metrics = process.metrics.service(
            name,
            service.library().methods.iter().map(|m| m.name.as_str()),
        );
        let handler_bus = Arc::new(HandlerBus::new(
            client.clone(),
            shared_name.clone(),
            settings.concurrency,
            settings.max_bus_waits,
            metrics.clone(),
        ));
        let served = Arc::new(Served {
            service: service.clone(),
            name: shared_name.clone(),
            bus: bus.clone(),
            handler_bus: handler_bus.clone(),
            placement: Arc::new(placement(shared_name, service, settings)),
            handler_timeout: settings.handler_timeout,
            crash_limit: settings.crash_limit,
            confirm_replies: config.confirm_replies,
            max_message_bytes: config.max_message_bytes,
            process: process.clone(),
            metrics,
        });
        let mut consumers = Vec::new();
        for queue in &settings.queues {
            bus.declare_queue(
                &config.exchange,
                &queue.name,
                &queue.routing_key,
                &queue.arguments,
            )
            .await?;
            let sink = serve_sink(
                served.clone(),
                Arc::from(queue.name.as_str()),
                tracker.clone(),
                stop.clone(),
            );
            consumers.push(bus.consume(&queue.name, settings.concurrency, sink).await?);
        }
        handler_bus.set_prefetch(consumers.iter().map(|c| c.prefetch.clone()).collect());
        for consumer in consumers {
            tracker.spawn(watch_consumer(
                served.name.clone(),
                process.health.clone(),
                consumer,
                stop.clone(),
                lost.clone(),
            ));
        }
        process.health.update(name, |h| {
            h.workers = 1;
            h.consuming = 1;
            h.pids = vec![std::process::id()];
        });
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
    Ok(Session {
        client,
        stop,
        lost,
        tracker,
    })
}

impl Session {
    /// Stops consuming, lets in-flight handlers finish and their replies go
    /// out (at most `timeout`), hands unstarted deliveries back, and closes
    /// the connection.
    pub async fn shutdown(self, timeout: Duration) {
        tracing::info!("stopping: finishing in-flight requests");
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(timeout, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                timeout_s = timeout.as_secs_f64(),
                "handlers still running at the shutdown timeout; their requests go back to the queue"
            );
        }
        self.client.bus().close().await;
        tracing::info!("stopped");
    }
}

/// The sink of one queue's consumers: each delivery lives its life (see
/// `lifecycle`) in the task the transport spawns for it, tracked for
/// shutdown. One that arrives after `stop` goes back to the queue for
/// another worker.
fn serve_sink(
    served: Arc<Served>,
    queue: Arc<str>,
    tracker: TaskTracker,
    stop: CancellationToken,
) -> Sink {
    Arc::new(move |incoming: Incoming| {
        let (served, queue, stop) = (served.clone(), queue.clone(), stop.clone());
        Box::pin(tracker.track_future(async move {
            if stop.is_cancelled() {
                if let Err(e) = incoming.settle(Settle::Requeue).await {
                    tracing::warn!(error = %e, "could not hand a delivery back");
                }
                return;
            }
            serve(served, queue, incoming).await;
        }))
    })
}

/// Stops `consumer` on `stop`; if its deliveries end otherwise, the bus
/// connection is gone: `lost`.
async fn watch_consumer(
    service: Arc<str>,
    health: Arc<crate::health::Health>,
    consumer: Consumer,
    stop: CancellationToken,
    lost: CancellationToken,
) {
    tokio::select! {
        () = stop.cancelled() => consumer.stop.cancel(),
        () = consumer.ended.cancelled() => {
            if !stop.is_cancelled() {
                tracing::error!(service = &*service, "consumer ended: the bus connection is gone");
                health.update(&service, |h| h.consuming = 0);
                lost.cancel();
            }
        }
    }
}
