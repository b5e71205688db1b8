//! A worker process: serves one service for the supervisor, connecting
//! (with backoff) and reconnecting whenever the connection is lost.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::inflight::InFlight;
use super::session::{open_session, prepare};
use super::watchdog::{self, OnHung};
use super::Process;
use crate::bus;
use crate::config::HostConfig;
use crate::control::Control;
use crate::error::HostError;
use crate::health::Health;
use crate::retry::{backoff, sleep_or_stop};

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
    /// Who it consumes as on Redis, so that the supervisor can hand back
    /// what it held when it dies (see [`bus::connect_as`]).
    pub bus_owner: Option<String>,
}

/// Why a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerEnd {
    /// Asked to stop; it finished its in-flight requests.
    Stopped,
    /// A handler hung: its other requests had [`watchdog::RECYCLE_DRAIN`]
    /// to settle, the rest go back to the queue, and the supervisor starts
    /// a fresh worker.
    Recycle,
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
    if let Some(c) = &control {
        c.initialized();
    }
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
        metrics: Arc::default(),
    };
    if let Some(c) = &control {
        tokio::spawn(report_metrics(c.clone(), process.clone()));
    }
    let recycle = CancellationToken::new();
    watchdog::start(
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
            c = bus::connect_as(&config.bus_uri, options.bus_owner.as_deref()) => c,
        };
        let session = match connected {
            Ok(bus) => {
                tracing::info!(service = %options.service, bus = %bus.describe(), "connected");
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
            // Refused for good before ever serving (a wrong password, a
            // queue that exists with other arguments): after 3 tries, say
            // so once and end; the supervisor ends `run` with that line.
            // Once it has served, a refusal (a rotated password) is waited
            // out instead: restarting the worker would not help either.
            Err(HostError::Bus(e)) if e.is_permanent() && !lost_once && attempt >= 2 => {
                return Err(HostError::Bus(e))
            }
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
                if let Some(c) = &control {
                    report_now(c, &process);
                }
                return Ok(WorkerEnd::Stopped);
            }
            () = recycle.cancelled() => {
                if let Some(c) = &control {
                    c.status(false);
                }
                session.stop.cancel();
                // A request answered but not acked comes back to be answered
                // twice: let the requests that are not hung settle, then
                // send the acks still waiting (2 s at most each, within the
                // watchdog's RECYCLE_DEADLINE). What is still unanswered
                // goes back to the queue when the process ends: on Redis the
                // supervisor hands it back then, not before, while its
                // handler may still answer.
                let until = Instant::now() + watchdog::RECYCLE_DRAIN;
                while process.inflight.unsettled() > 0 && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                session.client.bus().flush_acks().await;
                if let Some(c) = &control {
                    report_now(c, &process);
                }
                return Ok(WorkerEnd::Recycle);
            }
            () = session.lost.cancelled() => {
                if let Some(c) = &control {
                    c.status(false);
                }
                tracing::error!(service = %options.service, bus = %uri, "lost the bus connection; reconnecting");
                lost_once = true;
                process.metrics.reconnected();
                session.stop.cancel();
                session.client.bus().close().await;
            }
        }
    }
}

/// How often a worker sends its counts to the supervisor (when they
/// changed): how stale `/metrics` may be, and what a killed worker's
/// counts may miss.
const REPORT_EVERY: Duration = Duration::from_secs(1);

fn report_now(control: &Control, process: &Process) {
    control.metrics(process.metrics.snapshot(process.inflight.len() as u64));
}

/// Sends the supervisor this worker's counts every [`REPORT_EVERY`] while
/// they change, and every other tick regardless: the report is also the
/// worker's heartbeat (a worker silent for long is wedged, and the
/// supervisor stops pinging systemd's watchdog).
async fn report_metrics(control: Arc<Control>, process: Process) {
    let mut tick = tokio::time::interval(REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last = Vec::new();
    let mut unchanged = 0u32;
    loop {
        tick.tick().await;
        let now = process.metrics.snapshot(process.inflight.len() as u64);
        if now != last || unchanged >= 1 {
            control.metrics(now.clone());
            last = now;
            unchanged = 0;
        } else {
            unchanged += 1;
        }
    }
}
