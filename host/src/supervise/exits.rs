//! A worker's end: collecting it, handing back what it held on the bus,
//! counting the requests it was running, and planning its restart.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use super::backoff::HEALTHY_LIFETIME;
use super::workers::{describe_exit, Worker};
use super::{Supervisor, SupervisorError};
use crate::control::{EXIT_FATAL, EXIT_RECYCLE, EXIT_STOPPED};

/// When a dead worker's deliveries are handed back a second time: a
/// command it sent just before it died may reach the broker after the
/// first pass.
const LATE_COMMANDS: Duration = Duration::from_secs(1);

/// How long a dead worker's control socket is read for its last counts.
const LAST_WORDS: Duration = Duration::from_secs(2);

impl Supervisor {
    /// Collects the workers that exited. One that exited because it
    /// cannot start is collected once its control socket is read to the
    /// end (or after [`LAST_WORDS`]): its reason may still be on the way,
    /// and without it `run` would end saying only "could not start".
    pub(super) fn reap(&mut self) {
        let mut exited = Vec::new();
        for (id, worker) in &mut self.workers {
            match worker.child.try_wait() {
                Ok(Some(status)) => {
                    if status.code() == Some(EXIT_FATAL) && worker.fatal.is_none() {
                        let seen = *worker.exit_seen.get_or_insert_with(Instant::now);
                        if !worker.control.is_finished() && seen.elapsed() < LAST_WORDS {
                            continue;
                        }
                        worker.fatal = worker.last_words.get().cloned();
                    }
                    exited.push((*id, status));
                }
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

    /// Adds the last counts of the workers that ended to their service's
    /// totals, once their control socket is read to its end (or after
    /// [`LAST_WORDS`], if something else holds it open).
    pub(super) fn settle_ended(&mut self) {
        let book = self.metrics.clone();
        self.ending.retain(|(id, service, control, at)| {
            let done = control.is_finished() || at.elapsed() > LAST_WORDS;
            if done {
                control.abort();
                book.ended(*id, service);
            }
            !done
        });
    }

    /// Hands back at once what a dead worker held on the bus (Redis would
    /// keep it until the visibility timeout), twice (see [`LATE_COMMANDS`]).
    pub(super) fn hand_back(&self, worker: &Worker) {
        let Some(client) = self.client.clone() else {
            return;
        };
        if !self.config.bus_traits.hand_back_dead_consumers {
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

    pub(super) fn exited(&mut self, id: u64, mut worker: Worker, status: ExitStatus) {
        self.hand_back(&worker);
        let control = std::mem::replace(&mut worker.control, tokio::spawn(async {}));
        self.ending
            .push((id, worker.service.clone(), control, Instant::now()));
        let what = describe_exit(status);
        let service = worker.service.clone();
        let slots = crate::serve::inflight::slot_records(&worker.slot_file).unwrap_or_default();
        let _ = std::fs::remove_file(&worker.slot_file);
        let lived = worker.started.elapsed();
        // Another worker holds this index (a roll in progress): no restart.
        let replaced = self
            .workers
            .values()
            .any(|w| w.service == service && w.index == worker.index && !w.retiring);
        let vanished = !self.services.contains_key(&service);
        // A worker killed for its init, or that said it cannot start.
        let failed_start = worker.init_timed_out || status.code() == Some(EXIT_FATAL);
        let mut roll_worker = None;
        if !worker.ever_consumed && !worker.retiring {
            let what = match &worker.fatal {
                Some(why) => format!("{what}: {why}"),
                None => what.clone(),
            };
            roll_worker = self.roll_failed(id, &what);
        }
        if worker.retiring && (status.code() == Some(EXIT_STOPPED) || worker.killed_in_init) {
            tracing::info!(service, pid = worker.pid, "worker stopped");
            return;
        }
        if self.stopping.is_some() || vanished {
            tracing::warn!(service, pid = worker.pid, status = %what, "worker ended while stopping");
            return;
        }
        if let Some(orphan) = roll_worker {
            // A roll's new worker that never consumed held no request, and
            // its line is out. Its slot needs a worker only when the old
            // one is gone too.
            if orphan {
                self.schedule(&service, worker.index, true, false);
            }
            return;
        }
        if failed_start {
            let why = worker.fatal.clone().unwrap_or_else(|| {
                format!("the worker for service `{service}` could not start ({what})")
            });
            if !self.started {
                self.failure = Some(SupervisorError::WorkerFailed { why });
                self.begin_stop();
                return;
            }
            // A timed-out init has had its line.
            if !worker.init_timed_out {
                tracing::error!(service, pid = worker.pid, error = %why, "worker could not start");
            }
        }
        if status.code() == Some(EXIT_RECYCLE) {
            let restarts = self.services.get(&service).map_or(0, |s| s.restarts) + 1;
            tracing::warn!(service, pid = worker.pid, status = %what, restarts, "worker recycled after a hung handler; starting a fresh one");
            self.crashes.worker_recycled(&slots.running);
            self.crashes.worker_recycled(&slots.held);
        } else {
            if !failed_start {
                self.metrics.crashed(&service);
            }
            let limit = self.config.service(&service).crash_limit;
            let blame = self.crashes.worker_died(&slots.running, &slots.held, limit);
            if let Some((key, crashes)) = blame.culprit {
                tracing::warn!(
                    service,
                    key = format!("{key:x}"),
                    crashes,
                    crash_limit = limit,
                    "a request was running alone when the worker died: a crash of its own"
                );
            }
            if blame.suspects > 0 {
                tracing::warn!(
                    service,
                    suspects = blame.suspects,
                    "requests were running side by side when the worker died: each runs alone when it comes back, to find the culprit"
                );
            }
        }
        if replaced {
            tracing::warn!(service, pid = worker.pid, status = %what, "retired worker ended");
            return;
        }
        let recycled = status.code() == Some(EXIT_RECYCLE);
        // A worker that served and died running requests: a request crash,
        // which `crash_limit` bounds. If no other worker of its service
        // lives, backing off would leave the service unserved: restart at
        // once. Deaths without a request (a plugin whose init crashes)
        // keep their backoff, so that they never spin.
        let sole = !self
            .workers
            .values()
            .any(|w| w.service == service && !w.retiring);
        let request_crash = worker.ever_consumed && !slots.running.is_empty();
        let delay = self.schedule(
            &service,
            worker.index,
            !recycled && lived < HEALTHY_LIFETIME,
            sole && request_crash,
        );
        let restarts = self.services.get(&service).map_or(0, |s| s.restarts);
        if !recycled {
            tracing::error!(
                service, pid = worker.pid, status = %what, restarts,
                running = slots.running.len(), held = slots.held.len(),
                restart_in_ms = delay.as_millis() as u64,
                "worker died; restarting it"
            );
        }
    }
}
