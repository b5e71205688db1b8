//! The supervisor: `run` on a shared bus starts `workers` worker processes
//! per service (the same binary, `worker` subcommand), replaces the ones
//! that die, counts which requests were running when they died, refuses
//! requests that keep killing workers, rolls the workers over on SIGHUP and
//! stops them all on SIGTERM/SIGINT.
//!
//! It never loads a plugin itself: a plugin can only take down a worker.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::{is_permanent, BusError};
use crate::client::SharedClient;
use crate::config::HostConfig;
use crate::control::Seen;
use crate::control::{
    verdict_line, WorkerEvent, EXIT_FATAL, EXIT_RECYCLE, EXIT_STOPPED, STOP_LINE,
};
use crate::error::HostError;
use crate::health::{Health, ServiceHealth};
use crate::http::serve as serve_http;
use crate::listing::Listing;
use crate::retry::backoff;

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

/// When a dead worker's deliveries are handed back a second time: a
/// command it sent just before it died may reach the broker after the
/// first pass.
const LATE_COMMANDS: Duration = Duration::from_secs(1);

/// A worker that lived at least this long was healthy: its death restarts
/// the backoff.
const HEALTHY_LIFETIME: Duration = Duration::from_secs(10);
/// Crash counts kept at most (oldest dropped first).
const CRASH_MEMORY: usize = 10_000;

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
    #[error("{cause} (tried {attempts} times; retrying cannot fix this)")]
    BusRefused {
        /// The last refusal.
        cause: BusError,
        /// How many attempts were refused.
        attempts: u32,
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
}

/// How the supervisor starts workers.
#[derive(Debug, Clone)]
pub struct SupervisorOptions {
    /// The `commissaire-host` binary.
    pub exe: PathBuf,
    /// Arguments every worker gets after `worker` (config file, plugin
    /// directory, exchange).
    pub worker_args: Vec<OsString>,
    /// Workers give up at once when the broker is unreachable.
    pub fail_fast: bool,
}

/// How a process ended, for logs: `exit status 3` or `signal 9 (SIGKILL)`.
pub fn describe_exit(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit status {code}");
    }
    match status.signal() {
        Some(sig) => {
            let name = match sig {
                1 => "SIGHUP",
                2 => "SIGINT",
                4 => "SIGILL",
                6 => "SIGABRT",
                7 => "SIGBUS",
                8 => "SIGFPE",
                9 => "SIGKILL",
                11 => "SIGSEGV",
                13 => "SIGPIPE",
                15 => "SIGTERM",
                _ => "",
            };
            if name.is_empty() {
                format!("signal {sig}")
            } else {
                format!("signal {sig} ({name})")
            }
        }
        None => "an unknown status".to_owned(),
    }
}

struct Worker {
    service: String,
    index: u16,
    child: Child,
    pid: u32,
    stdin: mpsc::UnboundedSender<String>,
    slot_file: PathBuf,
    /// Who it consumes as on the bus.
    bus_owner: String,
    started: Instant,
    consuming: bool,
    ever_consumed: bool,
    /// Asked to stop: its exit is not a crash.
    retiring: bool,
    /// Why it cannot start, as it said.
    fatal: Option<String>,
}

impl Worker {
    fn send(&self, line: String) {
        let _ = self.stdin.send(line);
    }

    fn retire(&mut self) {
        if !self.retiring {
            self.retiring = true;
            self.send(STOP_LINE.to_owned());
        }
    }
}

#[derive(Default)]
struct ServiceState {
    workers: u16,
    restarts: u32,
    /// Per worker index: deaths in a row of short-lived workers, and when
    /// to start the next one.
    slots: BTreeMap<u16, SlotState>,
}

#[derive(Default)]
struct SlotState {
    quick_deaths: u32,
    respawn_at: Option<Instant>,
}

/// One worker being replaced during a SIGHUP roll.
struct Roll {
    old: u64,
    new: u64,
    retired_old: bool,
}

struct Supervisor {
    config: HostConfig,
    options: SupervisorOptions,
    work_dir: PathBuf,
    services: BTreeMap<String, ServiceState>,
    workers: BTreeMap<u64, Worker>,
    next_id: u64,
    events: mpsc::UnboundedSender<(u64, WorkerEvent)>,
    health: Arc<Health>,
    /// What is known of requests that were in flight at a crash or came
    /// back, the last [`CRASH_MEMORY`] of them.
    crashes: HashMap<u64, Seen>,
    crash_order: VecDeque<u64>,
    /// Every service consumed at least once: later failures restart
    /// workers instead of stopping the host.
    started: bool,
    stopping: Option<Instant>,
    failure: Option<SupervisorError>,
    roll_queue: VecDeque<u64>,
    roll: Option<Roll>,
    /// The supervisor's own bus connection, once up.
    client: Option<Arc<SharedClient>>,
    /// Dead workers' deliveries being handed back.
    hand_backs: tokio_util::task::TaskTracker,
}

/// Lists the services of the plugin directory by running `plugins --json`
/// (a plugin that crashes while loading takes down that child, not us).
async fn list_services(
    exe: &Path,
    dir: &Path,
    trust: crate::plugin::Trust,
) -> Result<Vec<String>, SupervisorError> {
    let fail = |reason: String| SupervisorError::Listing {
        dir: dir.display().to_string(),
        reason,
    };
    // The child loads every plugin: it gets only what it needs of our
    // environment (no bus URI, no secrets a plugin's code could read).
    let mut command = Command::new(exe);
    command.arg("plugins").arg("--json").arg(dir);
    if trust == crate::plugin::Trust::AnyPermissions {
        command.arg("--allow-insecure-plugins");
    }
    let output = command
        .env_clear()
        .envs(std::env::vars_os().filter(|(k, _)| k == "PATH" || k == "COMMISSAIRE_LOG"))
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| fail(e.to_string()))?;
    let listing: Listing = serde_json::from_slice(&output.stdout).map_err(|_| {
        let stderr = String::from_utf8_lossy(&output.stderr);
        fail(
            stderr
                .trim()
                .trim_start_matches("commissaire-host: ")
                .to_owned(),
        )
    })?;
    for refused in &listing.refused {
        tracing::warn!(file = %refused.file.display(), reason = %refused.reason, "plugin skipped");
    }
    let mut services: Vec<String> = listing.plugins.into_iter().map(|p| p.service).collect();
    services.sort();
    services.dedup();
    Ok(services)
}

impl Supervisor {
    /// The services to serve, checked against the config.
    async fn services(&self) -> Result<Vec<String>, SupervisorError> {
        let services = list_services(
            &self.options.exe,
            &self.config.plugins_dir,
            self.config.plugin_trust,
        )
        .await?;
        let loaded: Vec<&str> = services.iter().map(String::as_str).collect();
        self.config.check_services(&loaded)?;
        Ok(services)
    }

    fn add_service(&mut self, name: &str) {
        let workers = self.config.service(name).workers;
        let state = self.services.entry(name.to_owned()).or_default();
        state.workers = workers;
        for index in 0..workers {
            state.slots.insert(
                index,
                SlotState {
                    quick_deaths: 0,
                    respawn_at: Some(Instant::now()),
                },
            );
        }
    }

    fn spawn(&mut self, service: &str, index: u16) -> Option<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let safe: String = service
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let slot_file = self.work_dir.join(format!("{safe}-{id}.slots"));
        let bus_owner = format!("w{}", uuid::Uuid::new_v4().simple());
        let mut command = Command::new(&self.options.exe);
        command
            .arg("worker")
            .arg("--service")
            .arg(service)
            .arg("--slot-file")
            .arg(&slot_file)
            .args(&self.options.worker_args)
            .env(WORKER_BUS_URI_ENV, &self.config.bus_uri)
            // Plugins have no business with the HTTP endpoint's secret.
            .env_remove(crate::config::HTTP_TOKEN_ENV)
            .env(WORKER_BUS_OWNER_ENV, &bus_owner)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own process group: a terminal's Ctrl-C or hangup reaches
            // the supervisor, which stops or rolls the workers in order.
            .process_group(0)
            .kill_on_drop(true);
        if self.options.fail_fast {
            command.arg("--fail-fast");
        }
        let mut child = match command.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(service, error = %e, "cannot start a worker process");
                return None;
            }
        };
        let pid = child.id().unwrap_or_default();
        let (stdin_tx, mut stdin_rx) = mpsc::unbounded_channel::<String>();
        if let Some(mut stdin) = child.stdin.take() {
            tokio::spawn(async move {
                while let Some(line) = stdin_rx.recv().await {
                    if stdin.write_all(line.as_bytes()).await.is_err() {
                        break;
                    }
                    let _ = stdin.flush().await;
                }
            });
        }
        if let Some(stdout) = child.stdout.take() {
            let events = self.events.clone();
            let name = service.to_owned();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match WorkerEvent::parse(&line) {
                        Some(event) => {
                            if events.send((id, event)).is_err() {
                                break;
                            }
                        }
                        // A plugin printed to stdout.
                        None => {
                            tracing::info!(service = %name, pid, output = %line, "worker output")
                        }
                    }
                }
            });
        }
        tracing::info!(service, pid, worker = index, "worker started");
        self.workers.insert(
            id,
            Worker {
                service: service.to_owned(),
                index,
                child,
                pid,
                stdin: stdin_tx,
                slot_file,
                bus_owner,
                started: Instant::now(),
                consuming: false,
                ever_consumed: false,
                retiring: false,
                fatal: None,
            },
        );
        Some(id)
    }

    /// Starts the workers whose time has come.
    fn spawn_due(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        let now = Instant::now();
        let mut due = Vec::new();
        for (name, state) in &mut self.services {
            for (index, slot) in &mut state.slots {
                if slot.respawn_at.is_some_and(|at| at <= now) {
                    slot.respawn_at = None;
                    due.push((name.clone(), *index));
                }
            }
        }
        for (name, index) in due {
            if self.spawn(&name, index).is_none() {
                self.schedule(&name, index, true);
            }
        }
    }

    /// Plans the restart of worker `index` of `service`, backing off when
    /// workers keep dying young.
    fn schedule(&mut self, service: &str, index: u16, died_young: bool) -> Duration {
        let Some(state) = self.services.get_mut(service) else {
            return Duration::ZERO;
        };
        let Some(slot) = state.slots.get_mut(&index) else {
            return Duration::ZERO;
        };
        if died_young {
            slot.quick_deaths = slot.quick_deaths.saturating_add(1);
        } else {
            slot.quick_deaths = 0;
        }
        let delay = match slot.quick_deaths {
            0 | 1 => Duration::ZERO,
            n => backoff(n - 1),
        };
        slot.respawn_at = Some(Instant::now() + delay);
        state.restarts = state.restarts.saturating_add(1);
        delay
    }

    /// What is remembered of request `key`, remembered from now on.
    fn seen(&mut self, key: u64) -> &mut Seen {
        if !self.crashes.contains_key(&key) {
            self.crash_order.push_back(key);
            if self.crash_order.len() > CRASH_MEMORY {
                if let Some(old) = self.crash_order.pop_front() {
                    self.crashes.remove(&old);
                }
            }
        }
        self.crashes.entry(key).or_default()
    }

    fn count_crash(&mut self, key: u64) -> u32 {
        let seen = self.seen(key);
        seen.crashes = seen.crashes.saturating_add(1);
        seen.crashes
    }

    /// Collects the workers that exited.
    fn reap(&mut self) {
        let mut exited = Vec::new();
        for (id, worker) in &mut self.workers {
            match worker.child.try_wait() {
                Ok(Some(status)) => exited.push((*id, status)),
                Ok(None) => {}
                Err(e) => tracing::warn!(pid = worker.pid, error = %e, "cannot check a worker"),
            }
        }
        for (id, status) in exited {
            if let Some(worker) = self.workers.remove(&id) {
                self.exited(id, worker, status);
            }
        }
    }

    /// Hands back at once what a dead worker held on the bus (Redis would
    /// keep it until the visibility timeout), twice (see [`LATE_COMMANDS`]).
    fn hand_back(&self, worker: &Worker) {
        let Some(client) = self.client.clone() else {
            return;
        };
        if !matches!(
            crate::bus::BusKind::of(&self.config.bus_uri),
            Ok(crate::bus::BusKind::Redis)
        ) {
            return;
        }
        let (service, owner, pid) = (worker.service.clone(), worker.bus_owner.clone(), worker.pid);
        self.hand_backs.spawn(async move {
            for pass in 0..2 {
                if pass > 0 {
                    tokio::time::sleep(LATE_COMMANDS).await;
                }
                let restored = match client.get().await {
                    Ok(c) => c.bus().restore_consumer(&owner).await,
                    Err(e) => Err(e),
                };
                match restored {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        service, pid, restored = n,
                        "the worker's unsettled deliveries went back to their queues"
                    ),
                    Err(e) => tracing::warn!(
                        service, pid, error = %e,
                        "cannot hand back the worker's deliveries: they come back after the visibility timeout"
                    ),
                }
            }
        });
    }

    fn exited(&mut self, id: u64, worker: Worker, status: ExitStatus) {
        self.hand_back(&worker);
        let what = describe_exit(status);
        let service = worker.service.clone();
        let running = crate::serve::inflight::running_keys(&worker.slot_file).unwrap_or_default();
        let _ = std::fs::remove_file(&worker.slot_file);
        let lived = worker.started.elapsed();
        // Another worker holds this index (a roll in progress): no restart.
        let replaced = self
            .workers
            .values()
            .any(|w| w.service == service && w.index == worker.index && !w.retiring);
        let vanished = !self.services.contains_key(&service);
        if let Some(roll) = &self.roll {
            if roll.new == id && !worker.ever_consumed {
                tracing::error!(
                    service, pid = worker.pid, status = %what,
                    "the new worker did not start: the roll stops here, the running workers stay"
                );
                self.roll = None;
                self.roll_queue.clear();
            } else if roll.old == id {
                self.roll = None;
            }
        }
        if worker.retiring && status.code() == Some(EXIT_STOPPED) {
            tracing::info!(service, pid = worker.pid, "worker stopped");
            return;
        }
        if self.stopping.is_some() || vanished {
            tracing::warn!(service, pid = worker.pid, status = %what, "worker ended while stopping");
            return;
        }
        if status.code() == Some(EXIT_FATAL) {
            let why = worker.fatal.clone().unwrap_or_else(|| {
                format!("the worker for service `{service}` could not start ({what})")
            });
            if !self.started {
                self.failure = Some(SupervisorError::WorkerFailed { why });
                self.begin_stop();
                return;
            }
            tracing::error!(service, pid = worker.pid, error = %why, "worker could not start");
        }
        if status.code() == Some(EXIT_RECYCLE) {
            let restarts = self.services.get(&service).map_or(0, |s| s.restarts) + 1;
            tracing::warn!(service, pid = worker.pid, status = %what, restarts, "worker recycled after a hung handler; starting a fresh one");
        } else {
            for key in &running {
                let count = self.count_crash(*key);
                tracing::warn!(
                    service,
                    key = format!("{key:x}"),
                    crashes = count,
                    "a request was running when the worker died"
                );
            }
        }
        if replaced {
            tracing::warn!(service, pid = worker.pid, status = %what, "retired worker ended");
            return;
        }
        let recycled = status.code() == Some(EXIT_RECYCLE);
        let delay = self.schedule(
            &service,
            worker.index,
            !recycled && lived < HEALTHY_LIFETIME,
        );
        let restarts = self.services.get(&service).map_or(0, |s| s.restarts);
        if !recycled {
            tracing::error!(
                service, pid = worker.pid, status = %what, restarts,
                running = running.len(), restart_in_ms = delay.as_millis() as u64,
                "worker died; restarting it"
            );
        }
    }

    fn event(&mut self, id: u64, event: WorkerEvent) {
        match event {
            WorkerEvent::Consuming | WorkerEvent::Idle => {
                let consuming = event == WorkerEvent::Consuming;
                if let Some(w) = self.workers.get_mut(&id) {
                    w.consuming = consuming;
                    w.ever_consumed |= consuming;
                }
            }
            WorkerEvent::Fatal(why) => {
                if let Some(w) = self.workers.get_mut(&id) {
                    w.fatal = Some(why);
                }
            }
            WorkerEvent::Check(key) => {
                // The worker that ran this request before may have died a
                // moment ago: account for every death first.
                self.reap();
                let seen = self.seen(key);
                seen.deliveries = seen.deliveries.saturating_add(1);
                let seen = *seen;
                if let Some(w) = self.workers.get(&id) {
                    w.send(verdict_line(key, seen));
                }
            }
        }
    }

    fn begin_stop(&mut self) {
        if self.stopping.is_none() {
            self.stopping = Some(Instant::now());
            self.roll = None;
            self.roll_queue.clear();
        }
        for w in self.workers.values_mut() {
            w.retire();
        }
    }

    /// SIGHUP: picks up new plugins, stops the workers of removed ones, and
    /// replaces every running worker, one at a time.
    async fn begin_roll(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        match self.services().await {
            Ok(services) => {
                for name in &services {
                    if !self.services.contains_key(name) {
                        tracing::info!(service = %name, "new plugin: starting its workers");
                        self.add_service(name);
                    }
                }
                let gone: Vec<String> = self
                    .services
                    .keys()
                    .filter(|s| !services.contains(s))
                    .cloned()
                    .collect();
                for name in gone {
                    tracing::warn!(service = %name, "plugin removed: stopping its workers");
                    self.services.remove(&name);
                    self.health.remove(&name);
                    for w in self.workers.values_mut().filter(|w| w.service == name) {
                        w.retire();
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "reload refused; the running workers stay");
                return;
            }
        }
        self.roll_queue = self
            .workers
            .iter()
            .filter(|(_, w)| !w.retiring && w.ever_consumed)
            .map(|(id, _)| *id)
            .collect();
        tracing::info!(workers = self.roll_queue.len(), "SIGHUP: rolling restart");
    }

    fn advance_roll(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        if let Some(roll) = &mut self.roll {
            let new_ready = self.workers.get(&roll.new).is_some_and(|w| w.consuming);
            if new_ready && !roll.retired_old {
                roll.retired_old = true;
                match self.workers.get_mut(&roll.old) {
                    Some(old) => old.retire(),
                    None => self.roll = None,
                }
            }
            return;
        }
        while let Some(old) = self.roll_queue.pop_front() {
            let Some(w) = self.workers.get(&old) else {
                continue;
            };
            if w.retiring {
                continue;
            }
            let (service, index) = (w.service.clone(), w.index);
            if let Some(new) = self.spawn(&service, index) {
                self.roll = Some(Roll {
                    old,
                    new,
                    retired_old: false,
                });
            }
            return;
        }
    }

    fn publish_health(&self) {
        for (name, state) in &self.services {
            let workers: Vec<&Worker> = self
                .workers
                .values()
                .filter(|w| &w.service == name && !w.retiring)
                .collect();
            self.health.set(
                name,
                ServiceHealth {
                    workers: state.workers,
                    consuming: workers.iter().filter(|w| w.consuming).count() as u16,
                    pids: workers.iter().map(|w| w.pid).collect(),
                    restarts: state.restarts,
                },
            );
        }
    }

    fn all_started(&self) -> bool {
        self.services.keys().all(|name| {
            self.workers
                .values()
                .any(|w| &w.service == name && w.ever_consumed)
        })
    }
}

/// Where slot files go: `/dev/shm` (memory) where there is one, else the
/// temporary directory. Workers write their slot file twice per request;
/// on a disk file system each write also updates the inode in the journal.
fn slot_dir() -> PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    let writable = std::fs::metadata(shm).is_ok_and(|m| m.is_dir() && !m.permissions().readonly());
    if writable {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Removes the work directories (`commissaire-host-<pid>`) that
/// supervisors killed without a chance to clean up left in `base`: those
/// whose process is gone.
fn remove_dead_work_dirs(base: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("commissaire-host-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Err(e) = std::fs::remove_dir_all(entry.path()) {
            tracing::debug!(dir = %entry.path().display(), error = %e, "cannot remove a dead supervisor's work directory");
        }
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

    let base = slot_dir();
    remove_dead_work_dirs(&base);
    // A name nobody can guess ahead, created here and now (never an
    // existing directory or link), readable by us alone: the slot files in
    // it decide which requests are refused.
    let work_dir = base.join(format!(
        "commissaire-host-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&work_dir)
        .map_err(|source| SupervisorError::WorkDir {
            path: work_dir.clone(),
            source,
        })?;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut s = Supervisor {
        config,
        options,
        work_dir: work_dir.clone(),
        services: BTreeMap::new(),
        workers: BTreeMap::new(),
        next_id: 1,
        events: events_tx,
        health: Arc::new(Health::default()),
        crashes: HashMap::new(),
        crash_order: VecDeque::new(),
        started: false,
        stopping: None,
        failure: None,
        roll_queue: VecDeque::new(),
        roll: None,
        client: None,
        hand_backs: tokio_util::task::TaskTracker::new(),
    };
    let result = run_loop(
        &mut s,
        &mut events,
        [&mut term, &mut int],
        &mut hup,
        &mut chld,
    )
    .await;
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
    for name in s.services().await? {
        s.add_service(&name);
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
            Err(e) if s.options.fail_fast => return Err(HostError::Bus(e).into()),
            Err(e) => {
                attempt = attempt.saturating_add(1);
                let delay = backoff(attempt);
                if is_permanent(&e) {
                    refused += 1;
                    if refused >= PERMANENT_ATTEMPTS {
                        return Err(SupervisorError::BusRefused {
                            cause: e,
                            attempts: refused,
                        });
                    }
                    // The last attempt's error is the one line the user reads.
                    tracing::debug!(attempt, error = %e, "the bus refused the connection; trying again");
                } else {
                    refused = 0;
                    tracing::warn!(
                        attempt, retry_in_ms = delay.as_millis() as u64, error = %e,
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
    if let Some(addr) = s.config.http_listen {
        serve_http(
            addr,
            client.clone(),
            s.health.clone(),
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
        s.reap();
        s.spawn_due();
        if !s.started && s.all_started() {
            s.started = true;
            tracing::info!(workers = s.workers.len(), "every service is consuming");
        }
        s.advance_roll();
        s.publish_health();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_dirs_of_dead_supervisors_are_removed_and_live_ones_kept() {
        let base =
            std::env::temp_dir().join(format!("commissaire-sweep-test-{}", std::process::id()));
        let dead = base.join(format!("commissaire-host-{}-0a1b", u32::MAX));
        let live = base.join(format!("commissaire-host-{}-2c3d", std::process::id()));
        let other = base.join("something-else");
        for dir in [&dead, &live, &other] {
            std::fs::create_dir_all(dir).expect("mkdir");
            std::fs::write(dir.join("simple-1.slots"), b"x").expect("write");
        }
        remove_dead_work_dirs(&base);
        assert!(!dead.exists(), "a dead supervisor's directory is removed");
        assert!(live.exists(), "a live supervisor's directory is kept");
        assert!(other.exists(), "other entries are left alone");
        std::fs::remove_dir_all(&base).expect("cleanup");
    }

    #[test]
    fn exits_are_described_with_signal_names() {
        assert_eq!(describe_exit(ExitStatus::from_raw(3 << 8)), "exit status 3");
        assert_eq!(describe_exit(ExitStatus::from_raw(9)), "signal 9 (SIGKILL)");
        assert_eq!(describe_exit(ExitStatus::from_raw(6)), "signal 6 (SIGABRT)");
    }
}
