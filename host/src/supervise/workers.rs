//! Worker processes: listing the services, starting a worker with its
//! pipes and its control socket, and naming how one ended.

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::io::AsyncWriteExt as _;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::plugin_copies::Copies;
use super::{Supervisor, SupervisorError, WORKER_BUS_OWNER_ENV, WORKER_BUS_URI_ENV};
use crate::control::{read_line, Line, WorkerEvent, MAX_LINE, STOP_LINE};
use crate::health::ServiceHealth;
use crate::listing::Listing;
use crate::metrics::text::WorkerView;

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

pub(super) struct Worker {
    pub(super) service: String,
    pub(super) index: u16,
    pub(super) child: Child,
    pub(super) pid: u32,
    pub(super) stdin: mpsc::UnboundedSender<String>,
    pub(super) slot_file: PathBuf,
    /// The roll whose plugin copies it loaded.
    pub(super) roll: u64,
    /// Who it consumes as on the bus.
    pub(super) bus_owner: String,
    pub(super) started: Instant,
    pub(super) consuming: bool,
    pub(super) ever_consumed: bool,
    /// Its plugins' `init` returned (it said so, or it consumed).
    pub(super) initialized: bool,
    /// How long `init` may take (its service's `init_timeout`).
    pub(super) init_timeout: std::time::Duration,
    /// Killed for passing `init_timeout`: it failed to start.
    pub(super) init_timed_out: bool,
    /// Its service's `max_worker_rss`.
    pub(super) max_rss: Option<u64>,
    /// Asked to stop: its exit is not a crash.
    pub(super) retiring: bool,
    /// Killed when asked to stop before its `init` returned: it held no
    /// request, and a stuck `init` would never read the request to stop.
    pub(super) killed_in_init: bool,
    /// Why it cannot start, as it said.
    pub(super) fatal: Option<String>,
    /// Reads its control socket; finished once the worker closed it.
    pub(super) control: tokio::task::JoinHandle<()>,
    /// Why it cannot start, as its control socket said: kept by the
    /// reader itself, so that it is known once the reader finished, even
    /// if the supervisor sees the exit before the event (see
    /// [`Supervisor::reap`]).
    pub(super) last_words: Arc<OnceLock<String>>,
    /// When the supervisor first saw it exited, while waiting for its
    /// last words.
    pub(super) exit_seen: Option<Instant>,
}

impl Worker {
    pub(super) fn send(&self, line: String) {
        let _ = self.stdin.send(line);
    }

    pub(super) fn retire(&mut self) {
        if !self.retiring {
            self.retiring = true;
            if self.initialized {
                self.send(STOP_LINE.to_owned());
            } else {
                self.killed_in_init = true;
                let _ = self.child.start_kill();
            }
        }
    }
}

/// Lists the services of a roll's plugin copies by running `plugins
/// --json` on them (a plugin that crashes while loading takes down that
/// child, not us); refusals are logged with the original file's name.
/// `commissaire-host plugins FORMAT DIR`, run in a child: it loads every
/// plugin, so it gets only what it needs of our environment (no bus URI,
/// no secrets a plugin's code could read).
pub(super) fn listing_command(
    exe: &Path,
    dir: &Path,
    trust: crate::plugin::Trust,
    format: &str,
) -> Command {
    let mut command = Command::new(exe);
    command.arg("plugins").arg(format).arg(dir);
    if trust == crate::plugin::Trust::AnyPermissions {
        command.arg("--allow-insecure-plugins");
    }
    command
        .env_clear()
        .envs(std::env::vars_os().filter(|(k, _)| k == "PATH" || k == "COMMISSAIRE_LOG"))
        .stdin(Stdio::null())
        // Its caller gives up after LISTING_TIMEOUT: the child goes too.
        .kill_on_drop(true);
    command
}

/// How long listing the plugins (loading each one in a child) may take: a
/// plugin whose loading hangs must not hold up the supervisor.
pub(super) const LISTING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs a listing child to its end, or fails after [`LISTING_TIMEOUT`].
pub(super) async fn listing_output(mut command: Command) -> Result<std::process::Output, String> {
    match tokio::time::timeout(LISTING_TIMEOUT, command.output()).await {
        Ok(output) => output.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "loading the plugins took more than {} s",
            LISTING_TIMEOUT.as_secs()
        )),
    }
}

pub(super) async fn list_services(
    exe: &Path,
    copies: &Copies,
    trust: crate::plugin::Trust,
) -> Result<Vec<String>, SupervisorError> {
    let dir = copies.dir.as_path();
    let fail = |reason: String| SupervisorError::Listing {
        dir: copies.original(dir).display().to_string(),
        reason,
    };
    let output = listing_output(listing_command(exe, dir, trust, "--json"))
        .await
        .map_err(fail)?;
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
        tracing::warn!(file = %copies.original(&refused.file).display(), reason = %refused.reason, "plugin skipped");
    }
    let mut services: Vec<String> = listing.plugins.into_iter().map(|p| p.service).collect();
    services.sort();
    services.dedup();
    Ok(services)
}

impl Supervisor {
    /// Starts worker `index` of `service` on the service's copies: its
    /// last good version, never the plugin directory (what runs is what
    /// was checked, whatever is on disk now).
    pub(super) fn spawn(&mut self, service: &str, index: u16) -> Option<u64> {
        let Some(copies) = self.services.get(service).and_then(|s| s.copies.clone()) else {
            tracing::error!(service, "no plugin copies to start a worker with");
            return None;
        };
        self.spawn_with(service, index, &copies)
    }

    /// Starts worker `index` of `service` on `copies`.
    pub(super) fn spawn_with(&mut self, service: &str, index: u16, copies: &Copies) -> Option<u64> {
        let (roll, plugins_dir) = (copies.roll, copies.dir.clone());
        let id = self.next_id;
        self.next_id += 1;
        let safe: String = service
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let slot_file = self.work_dir.join(format!("{safe}-{id}.slots"));
        let bus_owner = format!("w{}", uuid::Uuid::new_v4().simple());
        // The control socket: the worker's stdin, both ways (see
        // `control`). Its stdout is the plugins'.
        let (ours, theirs) = match control_socket() {
            Ok(pair) => pair,
            Err(e) => {
                tracing::error!(service, error = %e, "cannot make a worker's control socket");
                return None;
            }
        };
        let mut command = Command::new(&self.options.exe);
        command
            .arg("worker")
            .arg("--service")
            .arg(service)
            .arg("--slot-file")
            .arg(&slot_file)
            .arg("--plugins-dir")
            .arg(&plugins_dir)
            .args(&self.options.worker_args)
            .env(WORKER_BUS_URI_ENV, &self.config.bus_uri)
            // Plugins have no business with the HTTP endpoint's secret.
            .env_remove(crate::config::HTTP_TOKEN_ENV)
            // Only the supervisor speaks to systemd: a worker's READY=1
            // would claim readiness the supervisor has not checked.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env(WORKER_BUS_OWNER_ENV, &bus_owner)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
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
        let (reader, mut writer) = ours.into_split();
        let (stdin_tx, mut stdin_rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(line) = stdin_rx.recv().await {
                if writer.write_all(line.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
        let last_words = Arc::new(OnceLock::new());
        let control = tokio::spawn(read_control(
            reader,
            Reporter {
                id,
                service: service.to_owned(),
                pid,
                events: self.events.clone(),
                book: self.metrics.clone(),
                last_words: last_words.clone(),
            },
        ));
        if let Some(stdout) = child.stdout.take() {
            // Plugins' output, stdout and stderr: logged, bounded, never
            // parsed.
            tokio::spawn(super::output::log_output(stdout, service.to_owned(), pid));
        }
        tracing::info!(service, pid, worker = index, roll, "worker started");
        let settings = self.config.service(service);
        self.workers.insert(
            id,
            Worker {
                service: service.to_owned(),
                index,
                child,
                pid,
                stdin: stdin_tx,
                slot_file,
                roll,
                bus_owner,
                started: Instant::now(),
                consuming: false,
                ever_consumed: false,
                initialized: false,
                init_timeout: settings.init_timeout,
                init_timed_out: false,
                max_rss: settings.max_worker_rss,
                retiring: false,
                killed_in_init: false,
                fatal: None,
                control,
                last_words,
                exit_seen: None,
            },
        );
        Some(id)
    }
}

impl Supervisor {
    /// Kills the workers whose plugins' `init` passed `init_timeout`: they
    /// failed to start (see [`super::exits`]).
    pub(super) fn check_inits(&mut self) {
        for w in self.workers.values_mut() {
            if w.initialized || w.init_timed_out || w.retiring {
                continue;
            }
            if w.started.elapsed() <= w.init_timeout {
                continue;
            }
            let secs = w.init_timeout.as_secs_f64();
            tracing::error!(
                service = %w.service, pid = w.pid, init_timeout_s = secs,
                "the plugin's init did not return within init_timeout; killing the worker"
            );
            w.init_timed_out = true;
            w.fatal = Some(format!(
                "service `{}`: the plugin's init did not return within {secs} s (init_timeout)",
                w.service
            ));
            self.metrics.init_timed_out(&w.service);
            let _ = w.child.start_kill();
        }
    }
}

impl Supervisor {
    /// Replaces the workers over their service's `max_worker_rss`: each
    /// stops taking requests and finishes what it holds (as at a roll),
    /// while a fresh one takes its place at once. Checked every
    /// [`MEMORY_CHECK_EVERY`].
    pub(super) fn check_memory(&mut self) {
        if self.stopping.is_some() || self.memory_checked.elapsed() < MEMORY_CHECK_EVERY {
            return;
        }
        self.memory_checked = std::time::Instant::now();
        // A roll's two workers of a slot are its to settle.
        let rolling: Vec<u64> = self
            .roll
            .iter()
            .filter_map(|r| r.current.as_ref())
            .flat_map(|c| c.old.into_iter().chain([c.new]))
            .collect();
        let mut over = Vec::new();
        for (id, w) in &self.workers {
            let Some(max) = w.max_rss else { continue };
            if w.retiring || !w.ever_consumed || rolling.contains(id) {
                continue;
            }
            if let Some(rss) = crate::metrics::text::resident_bytes(w.pid) {
                if rss > max {
                    over.push((*id, rss, max));
                }
            }
        }
        for (id, rss, max) in over {
            let Some(w) = self.workers.get_mut(&id) else {
                continue;
            };
            tracing::warn!(
                service = %w.service, pid = w.pid, rss_bytes = rss, max_worker_rss = max,
                "worker over max_worker_rss: it finishes what it holds and a fresh one takes its place"
            );
            w.retire();
            let (service, index) = (w.service.clone(), w.index);
            self.metrics.rss_recycled(&service);
            if self.spawn(&service, index).is_none() {
                self.schedule(&service, index, true, false);
            }
        }
    }
}

/// How often workers' memory is checked against `max_worker_rss`.
const MEMORY_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// A connected socket pair: the supervisor's end (async) and the worker's.
fn control_socket() -> std::io::Result<(tokio::net::UnixStream, std::os::unix::net::UnixStream)> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    Ok((tokio::net::UnixStream::from_std(ours)?, theirs))
}

/// Where a worker's control socket reports.
struct Reporter {
    id: u64,
    service: String,
    pid: u32,
    events: mpsc::UnboundedSender<(u64, WorkerEvent)>,
    book: Arc<super::metrics::MetricsBook>,
    last_words: Arc<OnceLock<String>>,
}

/// Reads a worker's control socket until it closes: its counts go
/// straight to the book (so that they are all in once the socket closed),
/// and why it cannot start to its last words, for the same reason; its
/// other events to the supervisor's loop.
async fn read_control(reader: tokio::net::unix::OwnedReadHalf, to: Reporter) {
    let Reporter {
        id,
        service,
        pid,
        events,
        book,
        last_words,
    } = to;
    let mut input = tokio::io::BufReader::new(reader);
    loop {
        match read_line(&mut input, MAX_LINE).await {
            Ok(Line::Text(line)) => match WorkerEvent::parse(&line) {
                Some(WorkerEvent::Metrics(snapshots)) => book.report(id, &service, snapshots),
                Some(WorkerEvent::Fatal(why)) => {
                    let _ = last_words.set(why);
                }
                Some(event) => {
                    if events.send((id, event)).is_err() {
                        break;
                    }
                }
                None => tracing::warn!(
                    service,
                    pid,
                    line,
                    "unknown line on a worker's control socket"
                ),
            },
            Ok(Line::TooLong) => {
                tracing::warn!(
                    service,
                    pid,
                    max = MAX_LINE,
                    "an overlong line on a worker's control socket, skipped"
                );
            }
            Ok(Line::End) | Err(_) => break,
        }
    }
}

impl Supervisor {
    /// Tells `/healthz` and `/metrics` the workers of each service now.
    pub(super) fn publish_health(&self) {
        for (name, state) in &self.services {
            let all: Vec<&Worker> = self
                .workers
                .values()
                .filter(|w| &w.service == name)
                .collect();
            let workers: Vec<&Worker> = all.iter().copied().filter(|w| !w.retiring).collect();
            let consuming = workers.iter().filter(|w| w.consuming).count();
            self.health.set(
                name,
                ServiceHealth {
                    workers: state.workers,
                    consuming: consuming as u16,
                    pids: workers.iter().map(|w| w.pid).collect(),
                    restarts: state.restarts,
                },
            );
            let by_state = vec![
                ("consuming", consuming as u64),
                ("starting", (workers.len() - consuming) as u64),
                ("retiring", (all.len() - workers.len()) as u64),
            ];
            let processes = all
                .iter()
                .map(|w| WorkerView {
                    index: w.index,
                    pid: w.pid,
                })
                .collect();
            self.metrics.set_workers(name, by_state, processes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_described_with_signal_names() {
        assert_eq!(describe_exit(ExitStatus::from_raw(3 << 8)), "exit status 3");
        assert_eq!(describe_exit(ExitStatus::from_raw(9)), "signal 9 (SIGKILL)");
        assert_eq!(describe_exit(ExitStatus::from_raw(6)), "signal 6 (SIGABRT)");
    }
}
