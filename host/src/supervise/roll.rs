//! The SIGHUP roll: the plugins are checked and copied again (see
//! [`super::plugin_copies`]), new plugins start, removed ones stop, and
//! every running worker is replaced by a fresh one that loads the new
//! copies, one at a time, the old one retired once the new one consumes.

use super::Supervisor;

/// One worker being replaced during a SIGHUP roll.
pub(super) struct Roll {
    pub(super) old: u64,
    pub(super) new: u64,
    pub(super) retired_old: bool,
}

impl Supervisor {
    /// SIGHUP: picks up new plugins, stops the workers of removed ones, and
    /// replaces every running worker, one at a time.
    pub(super) async fn begin_roll(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        match self.check_plugins().await {
            Ok((services, copies)) => {
                // Every worker started from now on, restarts included,
                // loads these copies.
                self.copies.adopt(copies);
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
                    // Its counts stay; it has no workers any more.
                    self.metrics.set_workers(&name, Vec::new(), Vec::new());
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

    pub(super) fn advance_roll(&mut self) {
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
}
