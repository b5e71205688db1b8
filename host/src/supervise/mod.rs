//! The supervisor: `run` on a shared bus starts `workers` worker processes
//! per service (the same binary, `worker` subcommand), replaces the ones
//! that die, counts which requests were running when they died, refuses
//! requests that keep killing workers, rolls the workers over on SIGHUP and
//! stops them all on SIGTERM/SIGINT.
//!
//! It never loads a plugin itself: a plugin can only take down a worker.

//!
//! - [`workers`]: starting a worker, its pipes and control socket;
//! - [`crate::control`]: the control protocol on that socket;
//! - [`exits`]: a worker's end and its restart; [`backoff`]: when;
//! - [`crashes`]: which requests were running at crashes;
//! - [`roll`]: the SIGHUP roll; [`work_dir`]: the slot files' directory;
//! - [`plugin_copies`]: the checked, private copies of the plugins that
//!   each roll's workers load;
//! - [`metrics`]: what `/healthz` and `/metrics` report;
//! - [`notify`]: what systemd is told (readiness, reload, watchdog);
//! - [`output`]: plugins' output, bounded and throttled.

pub mod backoff;
mod contracts;
pub mod crashes;
pub mod exits;
pub mod metrics;
pub mod notify;
pub mod output;
pub mod plugin_copies;
pub mod roll;
pub mod work_dir;
pub mod workers;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::{is_permanent, BusError};
use crate::client::SharedClient;
use crate::config::HostConfig;
use crate::control::{verdict_line, WorkerEvent};
use crate::error::HostError;
use crate::health::Health;
use crate::http::serve as serve_http;
use crate::plugin::trust::Untrusted;
use crate::plugin::DirError;
use crate::retry::backoff;
use backoff::ServiceState;
use crashes::CrashMemory;
use metrics::MetricsBook;
use plugin_copies::{Copies, PluginCopies};
use roll::RollRun;
pub use workers::describe_exit;
use workers::{list_services, Worker};

/// The environment variable that hands the bus URI to a worker (never on
/// its command line, where `ps` would show the password).
pub const WORKER_BUS_URI_ENV: &str = "COMMISSAIRE_WORKER_BUS_URI";

/// Connection attempts at startup that end `run` when the broker refuses
/// each one for a reason retrying does not change (see
/// [`is_permanent`]): a few, in case the broker is still loading its
/// users.
const PERMANENT_ATTEMPTS: u32 = 3;

/// The environment variable that names who a worker consumes as on the
/// bus: the supervisor hands back what that consumer held when the worker
/// dies (see [`crate::bus::BusTransport::restore_consumer`]).
pub const WORKER_BUS_OWNER_ENV: &str = "COMMISSAIRE_WORKER_BUS_OWNER";

/// Why the supervisor stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// Serving failed before any worker ran.
    #[error(transparent)]
    Host(#[from] HostError),
    /// Listing the plugin directory failed.
    #[error("cannot list the plugins in {dir}: {reason}")]
    Listing {
        /// The directory.
        dir: String,
        /// Why.
        reason: String,
    },
    /// A worker could not start.
    #[error("{why}")]
    WorkerFailed {
        /// What the worker said, or how it exited.
        why: String,
    },
    /// The broker refused the connection at startup for a reason retrying
    /// does not change.
    #[error("{cause} (the bus URI came from {uri_from}; tried {attempts} times, retrying cannot fix this)")]
    BusRefused {
        /// The last refusal.
        cause: BusError,
        /// Where the bus URI was given.
        uri_from: String,
        /// How many attempts were refused.
        attempts: u32,
    },
    /// The broker could not be reached at startup, with `--fail-fast`.
    #[error("{cause} (the bus URI came from {uri_from})")]
    BusUnreachable {
        /// Why.
        cause: BusError,
        /// Where the bus URI was given.
        uri_from: String,
    },
    /// A signal handler could not be installed.
    #[error("cannot listen for {0}: {1}")]
    Signal(&'static str, std::io::Error),
    /// The work directory for slot files could not be made.
    #[error("cannot create {path}: {source}")]
    WorkDir {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The plugin directory is unreadable or not trusted.
    #[error(transparent)]
    PluginDir(#[from] DirError),
    /// A plugin could not be copied for the workers.
    #[error("cannot copy plugin {} to {}: {error}", from.display(), to.display())]
    Copy {
        /// The plugin file.
        from: PathBuf,
        /// Its copy.
        to: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The directory of the plugin copies fails the trust check.
    #[error("cannot keep the plugin copies in {}: {why}", dir.display())]
    CopiesUntrusted {
        /// The directory.
        dir: PathBuf,
        /// Why.
        why: Untrusted,
    },
    /// Neither the work directory nor the temporary directory allows
    /// loading libraries.
    #[error(
        "cannot keep the plugin copies workers load: {} and {} are on file systems mounted \
         noexec; set TMPDIR to a directory that allows executables",
        work_dir.display(), temp.display()
    )]
    NoExec {
        /// The work directory.
        work_dir: PathBuf,
        /// The temporary directory.
        temp: PathBuf,
    },
}

/// How the supervisor starts workers.
#[derive(Debug, Clone)]
pub struct SupervisorOptions {
    /// The `commissaire-host` binary.
    pub exe: PathBuf,
    /// Arguments every worker gets after `worker` (config file, exchange;
    /// the plugin directory is its roll's copies).
    pub worker_args: Vec<OsString>,
    /// Workers give up at once when the broker is unreachable.
    pub fail_fast: bool,
}

/// What [`Supervisor::check_plugins`] found: the services of the new
/// copies (checked against the config) and their contracts.
struct Checked {
    services: Vec<String>,
    contracts: std::collections::BTreeMap<String, crate::contract::Contract>,
    copies: Copies,
}

struct Supervisor {
    config: HostConfig,
    options: SupervisorOptions,
    work_dir: PathBuf,
    /// What each roll's workers load.
    copies: PluginCopies,
    services: BTreeMap<String, ServiceState>,
    workers: BTreeMap<u64, Worker>,
    next_id: u64,
    events: mpsc::UnboundedSender<(u64, WorkerEvent)>,
    health: Arc<Health>,
    /// What is known of requests that were in flight at a crash or came
    /// back.
    crashes: CrashMemory,
    /// Every service's counts, over its workers.
    metrics: Arc<MetricsBook>,
    /// Workers that ended, until their last counts are in.
    ending: Vec<(u64, String, tokio::task::JoinHandle<()>, Instant)>,
    /// Every service consumed at least once: later failures restart
    /// workers instead of stopping the host.
    started: bool,
    stopping: Option<Instant>,
    failure: Option<SupervisorError>,
    /// The SIGHUP roll in progress.
    roll: Option<RollRun>,
    /// The supervisor's own bus connection, once up.
    client: Option<Arc<SharedClient>>,
    /// Dead workers' deliveries being handed back.
    hand_backs: tokio_util::task::TaskTracker,
    /// What systemd is told (nothing outside systemd).
    notifier: notify::Notifier,
    /// When workers' memory was last checked against `max_worker_rss`.
    memory_checked: Instant,
    /// Crash checks waiting for the death of the worker that ran their
    /// request (see [`Supervisor::defer_check`]).
    pending_checks: Vec<PendingCheck>,
}

/// A worker's crash check of request `key`, answered once worker
/// `blocker` is reaped, or at `until`.
struct PendingCheck {
    asker: u64,
    key: u64,
    blocker: u64,
    until: Instant,
}

/// How long a crash check waits for the death of the worker that ran its
/// request: the broker redelivers as soon as the dying worker's socket
/// closes, a moment before the process can be reaped.
const CHECK_WAIT: Duration = Duration::from_secs(1);

impl Supervisor {
    /// Checks and copies the plugins for a roll, and lists the services
    /// of the copies, checked against the config. The copies are the
    /// caller's to [`PluginCopies::adopt`]; on an error, none are left.
    async fn check_plugins(&mut self) -> Result<Checked, SupervisorError> {
        let taken = self.copies.take(&self.config.plugins_dir)?;
        for refused in &taken.refused {
            tracing::warn!(file = %refused.path.display(), reason = %refused.kind, "plugin skipped");
        }
        if taken.copied == 0 {
            let count = taken.refused.len();
            if let Some(first) = taken.refused.into_iter().next() {
                self.copies.discard(&taken.copies);
                return Err(HostError::AllRefused {
                    dir: self.config.plugins_dir.clone(),
                    count,
                    first,
                }
                .into());
            }
        }
        let listed = list_services(&self.options.exe, &taken.copies, self.config.plugin_trust)
            .await
            .and_then(|services| {
                let loaded: Vec<&str> = services.iter().map(String::as_str).collect();
                self.config
                    .check_services(&loaded)
                    .map_err(HostError::from)?;
                Ok(services)
            });
        let listed = match listed {
            Ok(services) => contracts::list_contracts(
                &self.options.exe,
                &taken.copies,
                self.config.plugin_trust,
            )
            .await
            .map(|contracts| Checked {
                services,
                contracts,
                copies: taken.copies.clone(),
            }),
            Err(e) => Err(e),
        };
        match listed {
            Ok(checked) => Ok(checked),
            Err(e) => {
                self.copies.discard(&taken.copies);
                Err(e)
            }
        }
    }

    /// Removes the copies of older rolls that no worker runs any more and
    /// no service keeps as its last good version.
    fn sweep_copies(&mut self) {
        let in_use: std::collections::BTreeSet<u64> = self
            .workers
            .values()
            .map(|w| w.roll)
            .chain(
                self.services
                    .values()
                    .filter_map(|s| s.copies.as_ref().map(|c| c.roll)),
            )
            .collect();
        self.copies.sweep(&in_use);
    }

    fn event(&mut self, id: u64, event: WorkerEvent) {
        match event {
            WorkerEvent::Consuming | WorkerEvent::Idle => {
                let consuming = event == WorkerEvent::Consuming;
                if let Some(w) = self.workers.get_mut(&id) {
                    w.consuming = consuming;
                    w.ever_consumed |= consuming;
                    w.initialized |= consuming;
                    if let Some(state) = self.services.get_mut(&w.service) {
                        // Its service's copies served: the last good version.
                        if consuming && state.copies.as_ref().map(|c| c.roll) == Some(w.roll) {
                            state.proven = true;
                        }
                    }
                }
            }
            WorkerEvent::Initialized => {
                if let Some(w) = self.workers.get_mut(&id) {
                    w.initialized = true;
                }
            }
            // Read by the socket's reader, straight into the book.
            WorkerEvent::Metrics(_) => {}
            // Kept by the socket's reader too, as the worker's last words
            // (read when it is reaped).
            WorkerEvent::Fatal(_) => {}
            WorkerEvent::Check(key) => {
                // The worker that ran this request before may have died a
                // moment ago: account for every death first.
                self.reap();
                if !self.defer_check(id, key) {
                    self.answer_check(id, key);
                }
            }
        }
    }

    /// Tells worker `asker` what is known of request `key`, counting
    /// this delivery.
    fn answer_check(&mut self, asker: u64, key: u64) {
        let seen = self.crashes.check(key);
        if let Some(w) = self.workers.get(&asker) {
            w.send(verdict_line(key, seen));
        }
    }

    /// Whether the check of `key` must wait: another worker's slot file
    /// still shows the request, so that worker is dying (its socket closed
    /// and the broker redelivered) but not yet reaped, and its death is
    /// not yet counted. Answered by [`Supervisor::settle_checks`].
    fn defer_check(&mut self, asker: u64, key: u64) -> bool {
        let blocker = self.workers.iter().find(|(id, w)| {
            **id != asker
                && crate::serve::inflight::slot_records(&w.slot_file)
                    .is_ok_and(|s| s.running.contains(&key) || s.held.contains(&key))
        });
        let Some((blocker, _)) = blocker else {
            return false;
        };
        self.pending_checks.push(PendingCheck {
            asker,
            key,
            blocker: *blocker,
            until: Instant::now() + CHECK_WAIT,
        });
        true
    }

    /// Answers the deferred checks whose blocking worker is reaped, or
    /// whose wait is over (the same request running twice at once, say).
    fn settle_checks(&mut self) {
        if self.pending_checks.is_empty() {
            return;
        }
        let now = Instant::now();
        let (due, waiting) = std::mem::take(&mut self.pending_checks)
            .into_iter()
            .partition(|c| now >= c.until || !self.workers.contains_key(&c.blocker));
        self.pending_checks = waiting;
        for c in due {
            self.answer_check(c.asker, c.key);
        }
    }

    fn begin_stop(&mut self) {
        if self.stopping.is_none() {
            self.stopping = Some(Instant::now());
            self.abandon_roll();
        }
        for w in self.workers.values_mut() {
            w.retire();
        }
    }

    /// Tells systemd what is due (see [`notify`]).
    fn notify_systemd(&mut self) {
        // Outside systemd, no state to gather every tick.
        if !self.notifier.active() {
            return;
        }
        let now = Instant::now();
        let wedged = self
            .metrics
            .silent(now, notify::SILENT_LIMIT)
            .and_then(|(id, silent)| {
                let w = self.workers.get(&id)?;
                Some((w.service.clone(), w.pid, silent))
            });
        let state = notify::State {
            started: self.started,
            rolling: self.roll.is_some(),
            stopping: self.stopping.is_some(),
            services: self.services.len(),
            consuming: self.workers.values().filter(|w| w.consuming).count(),
            workers: self.workers.len(),
            served: self.metrics.requests_served(),
            wedged,
        };
        self.notifier.send(now, &state);
    }

    fn all_started(&self) -> bool {
        self.services.keys().all(|name| {
            self.workers
                .values()
                .any(|w| &w.service == name && w.ever_consumed)
        })
    }
}

/// Runs the supervisor until SIGTERM/SIGINT and every worker stopped.
pub async fn supervise(
    config: HostConfig,
    options: SupervisorOptions,
) -> Result<(), SupervisorError> {
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| SupervisorError::Signal("SIGTERM", e))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| SupervisorError::Signal("SIGINT", e))?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| SupervisorError::Signal("SIGHUP", e))?;
    let mut chld =
        signal(SignalKind::child()).map_err(|e| SupervisorError::Signal("SIGCHLD", e))?;

    let work_dir = work_dir::create()?;
    let copies = match PluginCopies::new(&work_dir, config.plugin_trust) {
        Ok(copies) => copies,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work_dir);
            return Err(e);
        }
    };
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut s = Supervisor {
        config,
        options,
        work_dir: work_dir.clone(),
        copies,
        services: BTreeMap::new(),
        workers: BTreeMap::new(),
        next_id: 1,
        events: events_tx,
        health: Arc::new(Health::default()),
        crashes: CrashMemory::default(),
        metrics: Arc::default(),
        ending: Vec::new(),
        started: false,
        stopping: None,
        failure: None,
        roll: None,
        client: None,
        hand_backs: tokio_util::task::TaskTracker::new(),
        notifier: notify::Notifier::from_env(),
        memory_checked: Instant::now(),
        pending_checks: Vec::new(),
    };
    let result = run_loop(
        &mut s,
        &mut events,
        [&mut term, &mut int],
        &mut hup,
        &mut chld,
    )
    .await;
    // The workers are gone (or killed when `s` drops; a removed file stays
    // mapped until then).
    s.copies.remove_all();
    let _ = std::fs::remove_dir_all(&work_dir);
    result
}

async fn run_loop(
    s: &mut Supervisor,
    events: &mut mpsc::UnboundedReceiver<(u64, WorkerEvent)>,
    [term, int]: [&mut tokio::signal::unix::Signal; 2],
    hup: &mut tokio::signal::unix::Signal,
    chld: &mut tokio::signal::unix::Signal,
) -> Result<(), SupervisorError> {
    // The port first: taken by another process, it ends `run` before any
    // worker starts.
    let listener = match s.config.http_listen {
        Some(addr) => Some(crate::http::bind(addr).await?),
        None => None,
    };
    let checked = s.check_plugins().await?;
    s.copies.adopt(checked.copies);
    for name in checked.services {
        let contract = checked.contracts.get(&name).cloned();
        s.add_service(&name, contract);
    }
    let http_stop = CancellationToken::new();
    let client = Arc::new(SharedClient::reconnecting(
        &s.config.bus_uri,
        &s.config.exchange,
        s.config.request_timeout,
        s.config.reply_queue,
    ));
    // Wait for the broker here, once, rather than in every worker: as long
    // as it takes while it is unreachable, but not for a refusal that no
    // retry will change (wrong password, unknown vhost, TLS, bad URI).
    let mut attempt = 0u32;
    let mut refused = 0u32;
    loop {
        match client.get().await {
            Ok(_) => break,
            Err(e) if s.options.fail_fast => {
                return Err(SupervisorError::BusUnreachable {
                    cause: e,
                    uri_from: s.config.bus_uri_source.clone(),
                })
            }
            Err(e) => {
                attempt = attempt.saturating_add(1);
                let delay = backoff(attempt);
                if is_permanent(&e) {
                    refused += 1;
                    if refused >= PERMANENT_ATTEMPTS {
                        return Err(SupervisorError::BusRefused {
                            cause: e,
                            uri_from: s.config.bus_uri_source.clone(),
                            attempts: refused,
                        });
                    }
                    // The last attempt's error is the one line the user reads.
                    tracing::debug!(attempt, error = %e, "the bus refused the connection; trying again");
                } else {
                    refused = 0;
                    tracing::warn!(
                        attempt, retry_in_ms = delay.as_millis() as u64, error = %e,
                        uri_from = %s.config.bus_uri_source,
                        "cannot connect to the bus; retrying (--fail-fast exits instead)"
                    );
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = term.recv() => return Ok(()),
                    _ = int.recv() => return Ok(()),
                }
            }
        }
    }
    s.client = Some(client.clone());
    if let Some(listener) = listener {
        serve_http(
            listener,
            client.clone(),
            s.health.clone(),
            s.metrics.clone(),
            &s.config.http,
            s.config.max_message_bytes,
            http_stop.clone(),
        )
        .await?;
    }
    tracing::info!(
        bus = %crate::redact::redact_uri(&s.config.bus_uri),
        services = s.services.len(),
        "supervisor started"
    );
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            Some((id, event)) = events.recv() => s.event(id, event),
            _ = chld.recv() => {}
            _ = tick.tick() => {}
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping every worker");
                s.begin_stop();
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping every worker");
                s.begin_stop();
            }
            _ = hup.recv() => s.begin_roll().await,
        }
        s.check_inits();
        s.check_memory();
        s.reap();
        s.settle_checks();
        s.sweep_copies();
        s.spawn_due();
        if !s.started && s.all_started() {
            s.started = true;
            tracing::info!(workers = s.workers.len(), "every service is consuming");
        }
        s.advance_roll();
        s.settle_ended();
        s.publish_health();
        s.notify_systemd();
        if let Some(since) = s.stopping {
            if s.workers.is_empty() {
                break;
            }
            let limit = s.config.shutdown_timeout + Duration::from_secs(5);
            if since.elapsed() > limit {
                for w in s.workers.values_mut() {
                    tracing::error!(service = %w.service, pid = w.pid, "worker did not stop in time; killing it");
                    let _ = w.child.start_kill();
                }
            }
        }
    }
    http_stop.cancel();
    s.hand_backs.close();
    if tokio::time::timeout(Duration::from_secs(5), s.hand_backs.wait())
        .await
        .is_err()
    {
        tracing::warn!("dead workers' deliveries not all handed back; they come back after the visibility timeout");
    }
    client.close().await;
    match s.failure.take() {
        Some(e) => Err(e),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}
