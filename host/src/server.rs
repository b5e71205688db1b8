//! Serving: load the plugins, connect, declare, consume every service with
//! `concurrency` handlers in flight, answer, and stop cleanly.
//!
//! Two ways to run: [`start`]/[`run`] serve every service in this process
//! (the embedded `memory://` bus); [`run_worker`] serves one service in a
//! worker process of the [`supervisor`](crate::supervisor), reconnecting
//! when the broker goes away.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use commissaire_plugin_api::host::HostBus;
use commissaire_plugin_api::RpcError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::{
    self, BusError, BusTransport, Consumer, Incoming, Outgoing, Prefetch, Settle, Sink,
};
use crate::client::{RpcClient, SharedClient};
use crate::config::{HostConfig, ServiceSettings};
use crate::control::Control;
use crate::dispatch::{error_reply, Delivery, Service};
use crate::health::Health;
use crate::inflight::{request_key, InFlight, Running};
use crate::placement::{InlineCall, Placement};
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
    /// The slot file cannot be written.
    #[error("cannot open the slot file {path}: {source}")]
    SlotFile {
        /// Its path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `--service` names no loaded plugin.
    #[error("no plugin in {dir} exports service `{service}`")]
    NoSuchService {
        /// The plugin directory.
        dir: String,
        /// The service.
        service: String,
    },
    /// The HTTP endpoint could not listen.
    #[error("cannot listen on {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// The bus as handlers see it: blocking calls on the host's client.
struct HandlerBus {
    client: Arc<RpcClient>,
    runtime: tokio::runtime::Handle,
    service: Arc<str>,
    /// The service's consumers' prefetch limits (set once they consume).
    prefetch: std::sync::OnceLock<Vec<Arc<dyn Prefetch>>>,
    concurrency: u16,
    /// Handlers now waiting in a bus request, and the limit last set.
    waiting: tokio::sync::Mutex<(u16, u16)>,
    /// On the multi-threaded runtime, where a handler may be running on a
    /// runtime thread (see [`crate::placement`]): a bus call first hands
    /// the thread's other work over (a no-op if the handler already did).
    multi_thread: bool,
}

impl HandlerBus {
    /// Runs `f`, which blocks on the runtime, from a handler.
    fn blocking<T>(&self, f: impl FnOnce() -> T) -> T {
        if self.multi_thread {
            tokio::task::block_in_place(f)
        } else {
            f()
        }
    }

    /// While a handler waits for a reply, its slot does not count: the
    /// consumers may take one more delivery each (it may be the very request
    /// the handler waits for). The limit is raised ahead (twice what is
    /// needed) and lowered only once it is `concurrency` above what is
    /// needed: a `basic.qos` is a broker round trip, which a service
    /// calling the bus should not pay on every call.
    async fn waiting(&self, delta: i32) {
        let mut state = self.waiting.lock().await;
        let (waiting, limit) = &mut *state;
        *waiting = u16::try_from(i32::from(*waiting) + delta).unwrap_or(0);
        let needed = self.concurrency.saturating_add(*waiting);
        let new_limit = if needed > *limit {
            self.concurrency.saturating_add(waiting.saturating_mul(2))
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

impl HostBus for HandlerBus {
    fn request(
        &self,
        routing_key: &str,
        params_json: &str,
        timeout: Option<Duration>,
    ) -> Result<String, RpcError> {
        let reply = self.blocking(|| {
            self.runtime.block_on(async {
                self.waiting(1).await;
                let reply = self
                    .client
                    .request(routing_key, Some(params_json), timeout)
                    .await;
                self.waiting(-1).await;
                reply
            })
        })?;
        reply.map(|raw| raw.get().to_owned())
    }

    fn notify(&self, routing_key: &str, params_json: &str) -> Result<(), RpcError> {
        self.blocking(|| {
            self.runtime
                .block_on(self.client.notify(routing_key, Some(params_json)))
        })
        .map_err(|e| RpcError::internal_error(e.to_string()))
    }

    fn respond(&self, queue: &str, id_json: &str, result_json: &str) -> Result<(), RpcError> {
        self.blocking(|| {
            self.runtime
                .block_on(self.client.respond(queue, id_json, result_json))
        })
        .map_err(|e| RpcError::internal_error(e.to_string()))
    }
}

/// Checks the services the plugin directory exports against the config:
/// at least one, and every `[[service]]` entry among them.
pub fn check_services(config: &HostConfig, loaded: &[&str]) -> Result<(), HostError> {
    if loaded.is_empty() {
        return Err(HostError::NoPlugins(
            config.plugins_dir.display().to_string(),
        ));
    }
    for (name, settings) in &config.services {
        if !loaded.contains(&name.as_str()) {
            return Err(HostError::UnknownService {
                location: settings.location.clone().unwrap_or_default(),
                name: name.clone(),
                loaded: loaded.join(", "),
            });
        }
    }
    Ok(())
}

/// Whether this runs on the multi-threaded runtime, the only one where a
/// handler may run on a runtime thread (a bus call can hand it over).
fn multi_thread() -> bool {
    tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
}

/// Where `service`'s handlers run: as `inline_handlers` says, else learnt
/// per method; never inline off the multi-threaded runtime.
fn placement(name: Arc<str>, service: &Service, settings: &ServiceSettings) -> Placement {
    let forced = if multi_thread() {
        settings.inline_handlers
    } else {
        Some(false)
    };
    let methods = service.library().methods.iter().map(|m| m.name.as_str());
    Placement::new(name, methods, forced)
}

/// A service ready to serve: its plugin initialised, its settings.
struct Prepared {
    service: Arc<Service>,
    settings: ServiceSettings,
}

/// Loads the plugin directory, checks the config against it and starts
/// the services (all, or only `only`).
fn prepare(config: &HostConfig, only: Option<&str>) -> Result<Vec<Prepared>, HostError> {
    let set = PluginSet::load_dir(&config.plugins_dir)?;
    for refused in &set.refused {
        if let LoadErrorKind::DuplicateService { .. } = refused.kind {
            return Err(HostError::Duplicate(refused.to_string()));
        }
        if only.is_none() {
            tracing::warn!(file = %refused.path.display(), reason = %refused.kind, "plugin skipped");
        }
    }
    let loaded: Vec<&str> = set
        .plugins
        .iter()
        .map(|p| p.service_name.as_str())
        .collect();
    check_services(config, &loaded)?;
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

/// What lives as long as the process, across connections.
#[derive(Clone)]
struct Process {
    inflight: Arc<InFlight>,
    /// The supervisor, in a worker process.
    control: Option<Arc<Control>>,
    health: Arc<Health>,
}

/// One connection's consumers and client.
struct Session {
    client: Arc<RpcClient>,
    stop: CancellationToken,
    lost: CancellationToken,
    tracker: TaskTracker,
}

/// Declares and starts consuming every service on `bus`.
async fn open_session(
    config: &HostConfig,
    bus: Arc<dyn BusTransport>,
    services: &[Prepared],
    process: &Process,
) -> Result<Session, HostError> {
    let client = RpcClient::start(bus.clone(), &config.exchange, config.request_timeout).await?;
    bus.declare_exchange(&config.exchange).await?;
    let stop = CancellationToken::new();
    let lost = CancellationToken::new();
    let tracker = TaskTracker::new();
    let runtime = tokio::runtime::Handle::current();

    for Prepared { service, settings } in services {
        let name = service.name();
        let shared_name: Arc<str> = Arc::from(name);
        let handler_bus = Arc::new(HandlerBus {
            client: client.clone(),
            runtime: runtime.clone(),
            service: shared_name.clone(),
            prefetch: std::sync::OnceLock::new(),
            concurrency: settings.concurrency,
            waiting: tokio::sync::Mutex::new((0, settings.concurrency)),
            multi_thread: multi_thread(),
        });
        let answering = Arc::new(Answering {
            service: service.clone(),
            name: shared_name.clone(),
            bus: bus.clone(),
            handler_bus: handler_bus.clone(),
            placement: Arc::new(placement(shared_name, service, settings)),
            handler_timeout: settings.handler_timeout,
            crash_limit: settings.crash_limit,
            confirm_replies: config.confirm_replies,
            process: process.clone(),
        });
        let mut consumers = Vec::new();
        for queue in &settings.queues {
            bus.declare_queue(&config.exchange, &queue.name, &queue.routing_key)
                .await?;
            let sink = answer_sink(answering.clone(), tracker.clone(), stop.clone());
            consumers.push(bus.consume(&queue.name, settings.concurrency, sink).await?);
        }
        // Set once, here; a handler calling the bus before (deliveries
        // start with the first consumer) raises no limit.
        let _ = handler_bus
            .prefetch
            .set(consumers.iter().map(|c| c.prefetch.clone()).collect());
        for consumer in consumers {
            tracker.spawn(watch_consumer(
                answering.clone(),
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
    async fn shutdown(self, timeout: Duration) {
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

/// How often the watchdog looks.
const WATCHDOG_TICK: Duration = Duration::from_millis(20);

/// How long a worker may take to recycle itself before the watchdog ends
/// the process (its runtime is stalled by handlers that never return).
const RECYCLE_DEADLINE: Duration = Duration::from_secs(5);

/// What the watchdog does about hung handlers.
enum OnHung {
    /// Cancel this token (a worker recycles itself); exit with status 75
    /// if the process is still there [`RECYCLE_DEADLINE`] later.
    Recycle(CancellationToken),
    /// Log them (a single process cannot recycle).
    Log,
}

/// Starts the watchdog, until `stop`: it answers requests past their
/// handler timeout (on `runtime`), moves methods whose inline handler
/// stalls the runtime off it (see [`crate::placement`]), and acts on
/// handlers still running past the grace period. A thread, not a task: it
/// keeps watching when handlers stall every runtime thread.
fn start_watchdog(
    inflight: Arc<InFlight>,
    grace: Duration,
    on_hung: OnHung,
    runtime: tokio::runtime::Handle,
    stop: CancellationToken,
) {
    let watch = move || {
        let mut logged_hung = 0;
        let mut recycling_since: Option<std::time::Instant> = None;
        while !stop.is_cancelled() {
            std::thread::sleep(WATCHDOG_TICK);
            let overdue = inflight.overdue(grace);
            for running in &overdue.stalling {
                if let Some(call) = &running.inline {
                    call.check(running.elapsed());
                }
            }
            for running in overdue.timed_out {
                if running.claim() {
                    runtime.spawn(async move { answer_timed_out(&running).await });
                }
            }
            if let Some(since) = recycling_since {
                if since.elapsed() > RECYCLE_DEADLINE {
                    tracing::error!(
                        "the worker did not recycle within {}s (its runtime is stalled); exiting",
                        RECYCLE_DEADLINE.as_secs()
                    );
                    std::process::exit(crate::control::EXIT_RECYCLE);
                }
                continue;
            }
            let Some(first) = overdue.hung.first() else {
                logged_hung = 0;
                continue;
            };
            match &on_hung {
                OnHung::Recycle(recycle) => {
                    tracing::error!(
                        service = &*first.service,
                        hung = overdue.hung.len(),
                        running_s = first.elapsed().as_secs(),
                        "a handler is still running past its timeout and grace period: recycling this worker \
                         (its other unanswered requests go back to the queue)"
                    );
                    recycle.cancel();
                    recycling_since = Some(std::time::Instant::now());
                }
                OnHung::Log if overdue.hung.len() != logged_hung => {
                    logged_hung = overdue.hung.len();
                    tracing::error!(
                        service = &*first.service,
                        hung = logged_hung,
                        running_s = first.elapsed().as_secs(),
                        "handlers still running past their timeout and grace period; \
                         run on a broker with worker processes to recycle them"
                    );
                }
                OnHung::Log => {}
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("commissaire-watchdog".into())
        .spawn(watch)
    {
        tracing::error!(error = %e, "cannot start the watchdog thread: handler timeouts are not enforced");
    }
}

fn delivery(incoming: &Incoming) -> Delivery<'_> {
    Delivery {
        exchange: &incoming.exchange,
        routing_key: &incoming.routing_key,
        body: &incoming.body,
        reply_to: incoming.reply_to.as_deref(),
        correlation_id: incoming.correlation_id.as_deref(),
        redelivered: incoming.redelivered,
    }
}

async fn answer_timed_out(running: &Running) {
    let timeout = running.timeout();
    tracing::error!(
        service = &*running.service,
        routing_key = %running.incoming.routing_key,
        timeout_s = timeout.as_secs_f64(),
        "handler timed out: answering -32603"
    );
    let error = RpcError::internal_error(format!(
        "the handler did not return within {}s",
        timeout.as_secs_f64()
    ));
    refuse(&*running.bus, &running.incoming, &error).await;
}

/// Answers `incoming` with `error` and acks it.
async fn refuse(bus: &dyn BusTransport, incoming: &Incoming, error: &RpcError) {
    if let Some(reply) = error_reply(&delivery(incoming), error) {
        if let Err(e) = publish_reply(bus, incoming, &reply, true).await {
            tracing::error!(reply_to = %reply.to, error = %e, "reply not published; requeueing the request");
            let _ = incoming.settle(Settle::Requeue).await;
            return;
        }
    }
    if let Err(e) = incoming.settle(Settle::Ack).await {
        tracing::warn!(error = %e, "ack failed; the request may be delivered again");
    }
}

/// Publishes the reply to `incoming`, ahead of its ack.
async fn publish_reply(
    bus: &dyn BusTransport,
    incoming: &Incoming,
    reply: &crate::dispatch::Reply,
    confirm: bool,
) -> Result<(), BusError> {
    let reply = Outgoing {
        exchange: "",
        routing_key: &reply.to,
        body: &reply.body,
        reply_to: None,
        correlation_id: reply.correlation_id.as_deref(),
        durable: true,
        confirm,
    };
    incoming.publish_reply(bus, reply).await
}

/// A host serving every service in this process.
pub struct RunningHost {
    /// What `/healthz` reports.
    pub health: Arc<Health>,
    /// The client the host's own requests use.
    pub client: Arc<RpcClient>,
    /// The HTTP endpoint's bound address.
    pub http_addr: Option<SocketAddr>,
    session: Session,
    http_stop: CancellationToken,
    watchdog_stop: CancellationToken,
    shutdown_timeout: Duration,
}

impl std::fmt::Debug for RunningHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningHost")
            .field("http_addr", &self.http_addr)
            .finish_non_exhaustive()
    }
}

/// Serves the HTTP endpoint until `stop`; returns its bound address.
pub async fn serve_http(
    addr: SocketAddr,
    client: Arc<SharedClient>,
    health: Arc<Health>,
    stop: CancellationToken,
) -> Result<SocketAddr, HostError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HostError::Http { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| HostError::Http { addr, source })?;
    let app = crate::http::router(client, health);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP endpoint failed");
        }
    });
    tracing::info!(listen = %bound, "HTTP endpoint ready");
    Ok(bound)
}

/// Loads, connects, declares and starts consuming every service in this
/// process; returns once every service is consuming.
pub async fn start(config: &HostConfig) -> Result<RunningHost, HostError> {
    let services = prepare(config, None)?;
    let bus = bus::connect(&config.bus_uri).await?;
    tracing::info!(bus = %bus.describe(), exchange = %config.exchange, "connected");
    let process = Process {
        inflight: Arc::new(InFlight::default()),
        control: None,
        health: Arc::new(Health::default()),
    };
    let session = open_session(config, bus, &services, &process).await?;
    let watchdog_stop = CancellationToken::new();
    start_watchdog(
        process.inflight.clone(),
        config.handler_grace,
        OnHung::Log,
        tokio::runtime::Handle::current(),
        watchdog_stop.clone(),
    );
    let http_stop = CancellationToken::new();
    let http_addr = match config.http_listen {
        Some(addr) => Some(
            serve_http(
                addr,
                Arc::new(SharedClient::fixed(session.client.clone())),
                process.health.clone(),
                http_stop.clone(),
            )
            .await?,
        ),
        None => None,
    };
    Ok(RunningHost {
        health: process.health,
        client: session.client.clone(),
        http_addr,
        session,
        http_stop,
        watchdog_stop,
        shutdown_timeout: config.shutdown_timeout,
    })
}

impl RunningHost {
    /// Stops consuming, lets in-flight handlers finish and their replies go
    /// out, hands unstarted deliveries back, and closes the connection.
    pub async fn shutdown(self) {
        self.http_stop.cancel();
        self.session.shutdown(self.shutdown_timeout).await;
        self.watchdog_stop.cancel();
    }
}

/// Serves every service in this process until `signal` resolves, then
/// stops cleanly.
pub async fn run(config: &HostConfig, signal: impl Future<Output = ()>) -> Result<(), HostError> {
    let host = start(config).await?;
    signal.await;
    host.shutdown().await;
    Ok(())
}

/// How a worker process runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The one service it serves.
    pub service: String,
    /// Where it records running requests for the supervisor.
    pub slot_file: Option<PathBuf>,
    /// Whether the supervisor talks to it on stdin/stdout.
    pub controlled: bool,
    /// Give up when the broker is unreachable instead of retrying.
    pub fail_fast: bool,
}

/// Why a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerEnd {
    /// Asked to stop; it finished its in-flight requests.
    Stopped,
    /// A handler hung: its other requests go back to the queue, and the
    /// supervisor starts a fresh worker.
    Recycle,
}

/// Waits `delay` unless `stop` comes first; true if stopped.
async fn sleep_or_stop(delay: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(delay) => false,
    }
}

/// The delay before retry `attempt` (1-based): 100 ms, doubling, at most
/// 2 s.
pub fn backoff(attempt: u32) -> Duration {
    let ms = 100u64.saturating_mul(1 << attempt.saturating_sub(1).min(6));
    Duration::from_millis(ms.min(2000))
}

/// Serves one service in a worker process until `signal` or the
/// supervisor says stop: connects (retrying with backoff unless
/// `fail_fast`), and reconnects whenever the connection is lost.
pub async fn run_worker(
    config: &HostConfig,
    options: &WorkerOptions,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<WorkerEnd, HostError> {
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        signal.await;
        on_signal.cancel();
    });
    let deadline = config.shutdown_timeout + Duration::from_secs(10);
    let control = options
        .controlled
        .then(|| Control::start(stop.clone(), deadline));
    let services = prepare(config, Some(&options.service))?;
    let inflight = match &options.slot_file {
        Some(path) => InFlight::with_slot_file(path).map_err(|source| HostError::SlotFile {
            path: path.clone(),
            source,
        })?,
        None => InFlight::default(),
    };
    let process = Process {
        inflight: Arc::new(inflight),
        control: control.clone(),
        health: Arc::new(Health::default()),
    };
    let recycle = CancellationToken::new();
    start_watchdog(
        process.inflight.clone(),
        config.handler_grace,
        OnHung::Recycle(recycle.clone()),
        tokio::runtime::Handle::current(),
        // The worker's process ends with it.
        CancellationToken::new(),
    );
    let uri = crate::redact::redact_uri(&config.bus_uri);
    let mut attempt = 0u32;
    let mut lost_once = false;
    loop {
        if stop.is_cancelled() {
            return Ok(WorkerEnd::Stopped);
        }
        let connected = tokio::select! {
            () = stop.cancelled() => return Ok(WorkerEnd::Stopped),
            c = bus::connect(&config.bus_uri) => c,
        };
        let session = match connected {
            Ok(bus) => {
                tracing::info!(service = %options.service, bus = %uri, "connected");
                let opened = open_session(config, bus.clone(), &services, &process).await;
                if opened.is_err() {
                    bus.close().await;
                }
                opened
            }
            Err(e) => Err(e.into()),
        };
        let session = match session {
            Ok(s) => s,
            Err(e) if options.fail_fast => return Err(e),
            Err(e) => {
                attempt = attempt.saturating_add(1);
                let delay = backoff(attempt);
                tracing::warn!(
                    service = %options.service, bus = %uri, attempt,
                    retry_in_ms = delay.as_millis() as u64, error = %e,
                    "cannot serve on the bus yet; retrying"
                );
                if sleep_or_stop(delay, &stop).await {
                    return Ok(WorkerEnd::Stopped);
                }
                continue;
            }
        };
        if lost_once {
            tracing::info!(service = %options.service, bus = %uri, attempts = attempt + 1, "connected again");
        }
        attempt = 0;
        if let Some(c) = &control {
            c.status(true);
        }
        tokio::select! {
            () = stop.cancelled() => {
                if let Some(c) = &control {
                    c.status(false);
                }
                session.shutdown(config.shutdown_timeout).await;
                return Ok(WorkerEnd::Stopped);
            }
            () = recycle.cancelled() => {
                if let Some(c) = &control {
                    c.status(false);
                }
                session.stop.cancel();
                return Ok(WorkerEnd::Recycle);
            }
            () = session.lost.cancelled() => {
                if let Some(c) = &control {
                    c.status(false);
                }
                tracing::error!(service = %options.service, bus = %uri, "lost the bus connection; reconnecting");
                lost_once = true;
                session.stop.cancel();
                session.client.bus().close().await;
            }
        }
    }
}

struct Answering {
    service: Arc<Service>,
    placement: Arc<Placement>,
    name: Arc<str>,
    bus: Arc<dyn BusTransport>,
    handler_bus: Arc<HandlerBus>,
    handler_timeout: Duration,
    crash_limit: u32,
    confirm_replies: bool,
    process: Process,
}

/// The sink of a service's consumers: each delivery is answered in the
/// task the transport spawns for it, tracked for shutdown. One that
/// arrives after `stop` goes back to the queue for another worker.
fn answer_sink(a: Arc<Answering>, tracker: TaskTracker, stop: CancellationToken) -> Sink {
    Arc::new(move |incoming: Incoming| {
        let a = a.clone();
        let stop = stop.clone();
        Box::pin(tracker.track_future(async move {
            if stop.is_cancelled() {
                if let Err(e) = incoming.settle(Settle::Requeue).await {
                    tracing::warn!(error = %e, "could not hand a delivery back");
                }
                return;
            }
            answer(a, incoming).await;
        }))
    })
}

/// Stops `consumer` on `stop`; if its deliveries end otherwise, the bus
/// connection is gone: `lost`.
async fn watch_consumer(
    a: Arc<Answering>,
    consumer: Consumer,
    stop: CancellationToken,
    lost: CancellationToken,
) {
    tokio::select! {
        () = stop.cancelled() => consumer.stop.cancel(),
        () = consumer.ended.cancelled() => {
            if !stop.is_cancelled() {
                tracing::error!(service = &*a.name, "consumer ended: the bus connection is gone");
                a.process.health.update(&a.name, |h| h.consuming = 0);
                lost.cancel();
            }
        }
    }
}

/// Handles one delivery, publishes its reply, then acks it.
async fn answer(a: Arc<Answering>, incoming: Incoming) {
    let inflight = &a.process.inflight;
    let key = if inflight.wants_keys() {
        request_key(&incoming)
    } else {
        0
    };
    // A redelivered request may be the one that killed the last workers.
    if incoming.redelivered {
        if let Some(control) = &a.process.control {
            let crashes = control.crashes(key).await;
            if crashes >= a.crash_limit {
                tracing::error!(
                    service = &*a.name, routing_key = %incoming.routing_key, crashes,
                    "refusing a request that crashed the worker {crashes} times"
                );
                let error =
                    RpcError::internal_error(format!("request crashed the worker {crashes} times"));
                refuse(&*a.bus, &incoming, &error).await;
                return;
            }
        }
    }
    let method = a.placement.method(&incoming.routing_key);
    let inline = a.placement.inline(method);
    let mut running = Running::new(
        incoming,
        key,
        a.name.clone(),
        a.bus.clone(),
        a.handler_timeout,
    );
    if inline {
        running.inline = method.map(|m| InlineCall {
            placement: a.placement.clone(),
            method: m.clone(),
            tid: crate::placement::current_tid(),
        });
    }
    let running = Arc::new(running);
    let slot = inflight.enter(running.clone());
    let handler = a.clone();
    let run_running = running.clone();
    let run = move || {
        handler
            .service
            .handle(&delivery(&run_running.incoming), &*handler.handler_bus)
    };
    // Handlers are synchronous and may block. A method proven fast runs
    // right here, on the runtime thread (see `crate::placement`); others
    // hand the thread's other work over first (`block_in_place`), which
    // costs a thread wake-up but no hop to the blocking pool and back.
    // Off the multi-threaded runtime, the blocking pool.
    let handled = if inline {
        Ok(run())
    } else if a.handler_bus.multi_thread {
        Ok(tokio::task::block_in_place(run))
    } else {
        tokio::task::spawn_blocking(run).await
    };
    inflight.leave(slot);
    let Ok(handled) = handled else {
        tracing::error!("a handler task failed; its request stays unacked for redelivery");
        return;
    };
    a.placement.record(method, handled.took);
    if !running.claim() {
        tracing::warn!(
            service = &*a.name, routing_key = %running.incoming.routing_key,
            elapsed_s = running.elapsed().as_secs_f64(),
            "a handler returned after its timeout; its result is dropped (the caller had a timeout reply)"
        );
        return;
    }
    let incoming = &running.incoming;
    if let Some(reply) = &handled.reply {
        if let Err(e) = publish_reply(&*a.bus, incoming, reply, a.confirm_replies).await {
            tracing::error!(reply_to = %reply.to, error = %e, "reply not published; requeueing the request");
            let _ = incoming.settle(Settle::Requeue).await;
            return;
        }
    }
    if let Err(e) = incoming.settle(Settle::Ack).await {
        tracing::warn!(error = %e, "ack failed; the request may be delivered again");
    }
}
