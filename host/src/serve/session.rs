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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crate::bus::{
    heal, BusError, BusTransport, Consumer, ConsumerState, Incoming, Prefetch, Settle, Sink,
};
use crate::client::RpcClient;
use crate::config::QueueConfig;
use crate::config::{HostConfig, ServiceSettings};
use crate::dispatch::Service;
use crate::error::HostError;
use crate::limits::RequestLimits;
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
    let methods = service
        .library()
        .methods
        .iter()
        .map(|m| (m.name.as_str(), m.is_async));
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
        let entry = settings
            .location
            .as_ref()
            .map(|l| format!("{l}: "))
            .unwrap_or_default();
        let plugin = library
            .path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let service =
            Service::start(library, &settings.config).map_err(|error| HostError::ServiceInit {
                service: format!("{entry}service `{name}` ({plugin})"),
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
        // Discovery is counted by name, as any method.
        let methods = service.library().methods.iter().map(|m| m.name.as_str());
        let metrics = process
            .metrics
            .service(name, methods.chain([crate::contract::DISCOVER_METHOD]));
        let handler_bus = HandlerBus::new(
            client.clone(),
            shared_name.clone(),
            settings,
            config.max_message_bytes,
            metrics.clone(),
        )
        .serving(service.clone())
        .shared();
        let served = Arc::new(Served {
            service: service.clone(),
            name: shared_name.clone(),
            bus: bus.clone(),
            handler_bus: handler_bus.clone(),
            placement: Arc::new(placement(shared_name, service, settings)),
            limits: RequestLimits {
                max_message_bytes: config.max_message_bytes,
                handler_timeout: settings.handler_timeout,
                crash_limit: settings.crash_limit,
            },
            confirm_replies: config.confirm_replies,
            process: process.clone(),
            quarantine: crate::quarantine::Quarantine::new(
                Arc::from(name),
                settings.quarantine,
                metrics.clone(),
            ),
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
            let consumer = bus
                .consume(&queue.name, settings.concurrency, sink.clone())
                .await?;
            let prefetch = Arc::new(SwitchedPrefetch::new(
                consumer.prefetch.clone(),
                settings.concurrency,
            ));
            consumers.push((queue.clone(), sink, consumer, prefetch));
        }
        handler_bus.set_prefetch(
            consumers
                .iter()
                .map(|c| c.3.clone() as Arc<dyn Prefetch>)
                .collect(),
        );
        let deafness = Arc::new(Deafness {
            service: served.name.clone(),
            process: process.clone(),
            deaf: AtomicUsize::new(0),
        });
        for (queue, sink, consumer, prefetch) in consumers {
            let keeper = QueueKeeper {
                bus: bus.clone(),
                exchange: config.exchange.clone(),
                queue,
                concurrency: settings.concurrency,
                sink,
                prefetch,
                deafness: deafness.clone(),
            };
            tracker.spawn(keeper.keep(consumer, stop.clone(), lost.clone()));
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

/// A prefetch limit that outlives the consumer it applies to: a queue
/// consumed anew after the broker lost it gets the limit its handlers
/// raised meanwhile.
struct SwitchedPrefetch {
    current: tokio::sync::Mutex<(Arc<dyn Prefetch>, u16)>,
}

impl SwitchedPrefetch {
    fn new(prefetch: Arc<dyn Prefetch>, limit: u16) -> Self {
        Self {
            current: tokio::sync::Mutex::new((prefetch, limit)),
        }
    }

    /// Applies to `prefetch` from now on, with the limit last set.
    async fn switch_to(&self, prefetch: Arc<dyn Prefetch>, initial: u16) {
        let mut current = self.current.lock().await;
        if current.1 != initial {
            if let Err(e) = prefetch.set(current.1).await {
                tracing::debug!(error = %e, "cannot set the new consumer's prefetch");
            }
        }
        current.0 = prefetch;
    }
}

#[async_trait::async_trait]
impl Prefetch for SwitchedPrefetch {
    async fn set(&self, limit: u16) -> Result<(), BusError> {
        let mut current = self.current.lock().await;
        current.1 = limit;
        current.0.set(limit).await
    }
}

/// Which of one service's queues receive nothing now, told to `/healthz`
/// and, in a worker, to the supervisor (whose `/healthz` and
/// `commissaire_workers{state}` then show the worker not consuming).
struct Deafness {
    service: Arc<str>,
    process: Process,
    deaf: AtomicUsize,
}

impl Deafness {
    /// One more (or one fewer) queue of the service deaf.
    fn set(&self, deaf: bool) {
        let now = if deaf {
            self.deaf.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            self.deaf.fetch_sub(1, Ordering::SeqCst).saturating_sub(1)
        };
        let consuming = u16::from(now == 0);
        self.process
            .health
            .update(&self.service, |h| h.consuming = consuming);
        if let Some(c) = &self.process.control {
            c.status(now == 0);
        }
    }
}

/// Keeps one queue consumed for a session: declares again what the broker
/// lost (told by the consumer's state, or found by a periodic
/// [`BusTransport::still_declared`]) and consumes anew, until stopped or
/// the connection is lost.
struct QueueKeeper {
    bus: Arc<dyn BusTransport>,
    exchange: String,
    queue: QueueConfig,
    concurrency: u16,
    sink: Sink,
    prefetch: Arc<SwitchedPrefetch>,
    deafness: Arc<Deafness>,
}

/// Why a queue receives nothing.
#[derive(Debug, Clone, Copy)]
enum Deaf {
    /// The broker lost it (or its exchange or binding): declare again.
    Lost(heal::Lost),
    /// Its connection is being made again by the transport: wait.
    Interrupted,
}

impl QueueKeeper {
    async fn keep(self, mut consumer: Consumer, stop: CancellationToken, lost: CancellationToken) {
        let mut check = tokio::time::interval(heal::CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.reset();
        // Since when, and why, nothing arrives; `None` while consuming.
        let mut deaf: Option<(Instant, Deaf)> = None;
        let mut attempts = 0u32;
        let mut state_open = true;
        loop {
            let state = *consumer.state.borrow_and_update();
            let now_deaf = match (state, deaf) {
                (ConsumerState::Cancelled, _) => Some(Deaf::Lost(heal::Lost::Queue)),
                (ConsumerState::Interrupted, _) => Some(Deaf::Interrupted),
                (ConsumerState::Consuming, Some((_, Deaf::Interrupted))) => None,
                (ConsumerState::Consuming, other) => other.map(|d| d.1),
            };
            match (deaf, now_deaf) {
                (None, Some(why)) => {
                    self.deafness.set(true);
                    crate::throttled!(warn!(
                        service = &*self.deafness.service,
                        queue = %self.queue.name,
                        why = ?why,
                        "not consuming: nothing arrives from this queue until it is back"
                    ));
                    deaf = Some((Instant::now(), why));
                }
                (Some((since, _)), Some(why)) => deaf = Some((since, why)),
                (Some((since, Deaf::Interrupted)), None) => {
                    self.deafness.set(false);
                    tracing::info!(
                        service = &*self.deafness.service,
                        queue = %self.queue.name,
                        deaf_ms = since.elapsed().as_millis() as u64,
                        "consuming again"
                    );
                    deaf = None;
                    // The broker may have come back empty (a Redis restart
                    // without persistence): check at once.
                    check.reset_immediately();
                }
                _ => {}
            }
            if let Some((since, Deaf::Lost(what))) = deaf {
                match self.redeclare(&mut consumer, what).await {
                    Ok(()) => {
                        heal::redeclared(what, &self.queue.name, since.elapsed());
                        self.deafness.set(false);
                        deaf = None;
                        attempts = 0;
                        state_open = true;
                        continue;
                    }
                    Err(e) => {
                        attempts += 1;
                        crate::throttled!(warn!(
                            queue = %self.queue.name, attempts, error = %e,
                            "cannot declare the queue again yet"
                        ));
                        if attempts >= heal::MAX_ATTEMPTS {
                            // Bounded: past this, the whole connection is
                            // made anew (with the worker's backoff).
                            tracing::error!(
                                queue = %self.queue.name, attempts,
                                "cannot declare the queue again; reconnecting"
                            );
                            lost.cancel();
                            return;
                        }
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => {
                    consumer.stop.cancel();
                    return;
                }
                () = consumer.ended.cancelled() => {
                    if !stop.is_cancelled() {
                        tracing::error!(service = &*self.deafness.service, "consumer ended: the bus connection is gone");
                        if deaf.is_none() {
                            self.deafness.set(true);
                        }
                        lost.cancel();
                    }
                    return;
                }
                changed = consumer.state.changed(), if state_open => {
                    // The transport dropped its side: the state is final
                    // (read above), nothing more to watch.
                    state_open = changed.is_ok();
                }
                // While deaf for a loss, a tick is the next attempt (at
                // the top of the loop).
                _ = check.tick() => {
                    if deaf.is_none() {
                        let checked = self
                            .bus
                            .still_declared(&self.exchange, &self.queue.name, &self.queue.routing_key)
                            .await;
                        match checked {
                            Ok(true) => {}
                            Ok(false) => {
                                self.deafness.set(true);
                                crate::throttled!(warn!(
                                    service = &*self.deafness.service,
                                    queue = %self.queue.name,
                                    exchange = %self.exchange,
                                    "not consuming: the broker lost this queue's exchange or binding"
                                ));
                                deaf = Some((Instant::now(), Deaf::Lost(heal::Lost::Binding)));
                            }
                            // A lost connection is told by the consumer.
                            Err(e) => tracing::debug!(error = %e, "checking the declarations"),
                        }
                    }
                }
            }
        }
    }

    /// Declares the exchange and the queue (with its binding) again; after
    /// a cancelled consumer, consumes anew. Deliveries the old consumer
    /// still holds settle on its channel, which stays open.
    async fn redeclare(&self, consumer: &mut Consumer, what: heal::Lost) -> Result<(), BusError> {
        let q = &self.queue;
        self.bus.declare_exchange(&self.exchange).await?;
        self.bus
            .declare_queue(&self.exchange, &q.name, &q.routing_key, &q.arguments)
            .await?;
        if what == heal::Lost::Queue {
            let fresh = self
                .bus
                .consume(&q.name, self.concurrency, self.sink.clone())
                .await?;
            self.prefetch
                .switch_to(fresh.prefetch.clone(), self.concurrency)
                .await;
            let old = std::mem::replace(consumer, fresh);
            old.stop.cancel();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Outgoing, PrefetchSlots, ReplyQueueKind};
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    /// A broker that forgets on demand: its binding check answers what
    /// `present` says, and each consumer's state is the test's to set.
    #[derive(Default)]
    struct Forgetful {
        declared: AtomicUsize,
        consumed: AtomicUsize,
        gone: AtomicBool,
        states: std::sync::Mutex<Vec<tokio::sync::watch::Sender<ConsumerState>>>,
    }

    impl Forgetful {
        fn set_last(&self, state: ConsumerState) {
            let states = self.states.lock().expect("states");
            states.last().expect("a consumer").send_replace(state);
        }
    }

    #[async_trait::async_trait]
    impl BusTransport for Forgetful {
        fn describe(&self) -> String {
            "forgetful://".to_owned()
        }
        async fn declare_exchange(&self, _: &str) -> Result<(), BusError> {
            Ok(())
        }
        async fn declare_queue(
            &self,
            _: &str,
            _: &str,
            _: &str,
            _: &crate::bus::QueueArguments,
        ) -> Result<(), BusError> {
            self.declared.fetch_add(1, Ordering::SeqCst);
            self.gone.store(false, Ordering::SeqCst);
            Ok(())
        }
        async fn still_declared(&self, _: &str, _: &str, _: &str) -> Result<bool, BusError> {
            Ok(!self.gone.load(Ordering::SeqCst))
        }
        async fn consume(&self, _: &str, prefetch: u16, _: Sink) -> Result<Consumer, BusError> {
            self.consumed.fetch_add(1, Ordering::SeqCst);
            let (state, watching) = tokio::sync::watch::channel(ConsumerState::Consuming);
            self.states.lock().expect("states").push(state);
            Ok(Consumer {
                stop: CancellationToken::new(),
                ended: CancellationToken::new(),
                prefetch: Arc::new(PrefetchSlots::new(prefetch)),
                state: watching,
            })
        }
        async fn publish(&self, _: Outgoing<'_>) -> Result<(), BusError> {
            Ok(())
        }
        async fn reply_queue(
            &self,
            _: ReplyQueueKind,
        ) -> Result<(String, async_channel::Receiver<Incoming>), BusError> {
            Err(BusError::Closed)
        }
        async fn close(&self) {}
    }

    async fn until(what: &str, mut ok: impl FnMut() -> bool) {
        let started = Instant::now();
        while !ok() {
            assert!(started.elapsed() < Duration::from_secs(5), "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_keeper_declares_again_what_the_broker_lost_and_says_so_meanwhile() {
        let fake = Arc::new(Forgetful::default());
        let bus: Arc<dyn BusTransport> = fake.clone();
        let process = Process {
            inflight: Arc::default(),
            control: None,
            health: Arc::default(),
            metrics: Arc::default(),
        };
        let queue = QueueConfig {
            name: "q".to_owned(),
            routing_key: "q.*".to_owned(),
            arguments: Default::default(),
        };
        let sink: Sink = Arc::new(|_| Box::pin(async {}));
        let consumer = bus.consume("q", 4, sink.clone()).await.expect("consume");
        let keeper = QueueKeeper {
            bus: bus.clone(),
            exchange: "x".to_owned(),
            queue,
            concurrency: 4,
            prefetch: Arc::new(SwitchedPrefetch::new(consumer.prefetch.clone(), 4)),
            sink,
            deafness: Arc::new(Deafness {
                service: Arc::from("svc"),
                process: process.clone(),
                deaf: AtomicUsize::new(0),
            }),
        };
        let (stop, lost) = (CancellationToken::new(), CancellationToken::new());
        let kept = tokio::spawn(keeper.keep(consumer, stop.clone(), lost.clone()));
        let consuming = || process.health.snapshot().get("svc").map(|h| h.consuming);
        let healed_before = heal::redeclared_total();

        // The binding vanishes: found by the check, declared again.
        fake.gone.store(true, Ordering::SeqCst);
        until("declared again after the check", || {
            fake.declared.load(Ordering::SeqCst) == 1
        })
        .await;
        until("consuming again", || consuming() == Some(1)).await;
        assert_eq!(
            fake.consumed.load(Ordering::SeqCst),
            1,
            "no new consumer needed"
        );

        // The broker cancels the consumer: declared again, consumed anew.
        fake.set_last(ConsumerState::Cancelled);
        until("consumed anew", || {
            fake.consumed.load(Ordering::SeqCst) == 2
        })
        .await;
        assert_eq!(fake.declared.load(Ordering::SeqCst), 2);
        until("consuming again", || consuming() == Some(1)).await;
        assert!(heal::redeclared_total() >= healed_before + 2);

        // The connection is being made again: deaf meanwhile, nothing declared.
        fake.set_last(ConsumerState::Interrupted);
        until("not consuming while interrupted", || consuming() == Some(0)).await;
        fake.set_last(ConsumerState::Consuming);
        until("consuming once back", || consuming() == Some(1)).await;
        assert_eq!(fake.declared.load(Ordering::SeqCst), 2);

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(2), kept)
            .await
            .expect("the keeper ends on stop")
            .expect("the keeper's task");
        assert!(!lost.is_cancelled());
    }
}
