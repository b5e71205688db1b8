//! The SIGHUP roll: the plugins are checked and copied again (see
//! [`super::plugin_copies`]), new plugins start, removed ones stop, and
//! every worker slot is given a fresh worker that loads the new copies,
//! one at a time, the old one retired once the new one consumes.
//!
//! A service's *last good version* is the roll of copies its workers
//! proved by consuming: restarts load it, whatever the plugin directory
//! or a later roll holds. A roll's copies become a service's last good
//! version when its first new worker consumes. A new worker that ends
//! before it consumes (its `init` failed or passed `init_timeout`, the
//! file was not a plugin, …) fails the roll of its service only: that
//! service stays on its last good version, the roll goes on with the
//! others, and one line at the end names the services not rolled. The
//! next SIGHUP tries them again. A service whose new plugin would break
//! its callers is not rolled at all (see [`super::contracts`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::plugin_copies::Copies;
use super::{Checked, Supervisor};
use crate::contract::Contract;

/// One worker slot being given a new worker during a SIGHUP roll.
pub(super) struct Roll {
    pub(super) service: String,
    /// The worker it replaces; none when the slot was waiting for a
    /// restart.
    pub(super) old: Option<u64>,
    pub(super) new: u64,
    pub(super) retired_old: bool,
}

/// A SIGHUP roll in progress.
pub(super) struct RollRun {
    /// What it brings.
    pub(super) copies: Copies,
    /// The contracts of the services of [`Self::copies`].
    pub(super) contracts: BTreeMap<String, Contract>,
    /// Slots still to roll, by service and index.
    pub(super) queue: VecDeque<(String, u16)>,
    /// The slot being rolled.
    pub(super) current: Option<Roll>,
    /// Services whose new worker did not start: they keep their last good
    /// version, and their other slots are not rolled.
    pub(super) failed: BTreeSet<String>,
    /// Services whose new plugin would break their callers: not rolled
    /// at all (see [`super::contracts`]).
    pub(super) refused: BTreeSet<String>,
    /// Slots rolled.
    pub(super) rolled: usize,
}

impl Supervisor {
    /// SIGHUP: picks up new plugins, stops the workers of removed ones, and
    /// gives every worker slot a new worker, one at a time.
    pub(super) async fn begin_roll(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        self.abandon_roll();
        let checked = match self.check_plugins().await {
            Ok(checked) => checked,
            Err(e) => {
                let names: Vec<&str> = self.services.keys().map(String::as_str).collect();
                tracing::error!(
                    error = %e, not_rolled = %names.join(", "),
                    "reload refused: every service stays on its last good version; \
                     the next SIGHUP tries again"
                );
                return;
            }
        };
        let Checked {
            services,
            contracts,
            copies,
        } = checked;
        // Before anything moves: a service whose new plugin would break
        // its callers stays as it is.
        let refused = self.refuse_breaking(&contracts).await;
        // New plugins start on these copies; the services already served
        // move to them slot by slot, as their new workers prove them.
        self.copies.adopt(copies.clone());
        for name in &services {
            if !self.services.contains_key(name) {
                tracing::info!(service = %name, "new plugin: starting its workers");
                self.add_service(name, contracts.get(name).cloned());
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
        let mut queue = VecDeque::new();
        for (name, state) in &mut self.services {
            if state.copies.as_ref().map(|c| c.roll) == Some(copies.roll) || refused.contains(name)
            {
                continue;
            }
            if !state.proven {
                // No version of it ever served: there is nothing to keep,
                // and its restarts load the new copies from now on.
                state.copies = Some(copies.clone());
                state.contract = contracts.get(name).cloned();
            }
            queue.extend(state.slots.keys().map(|index| (name.clone(), *index)));
        }
        tracing::info!(
            workers = queue.len(),
            roll = copies.roll,
            "SIGHUP: rolling restart"
        );
        self.roll = Some(RollRun {
            copies,
            contracts,
            queue,
            current: None,
            failed: BTreeSet::new(),
            refused,
            rolled: 0,
        });
    }

    /// Ends the roll in progress, if any (a new SIGHUP came, or a stop):
    /// a new worker not yet proven is retired, its old one stays.
    pub(super) fn abandon_roll(&mut self) {
        let Some(run) = self.roll.take() else {
            return;
        };
        if let Some(current) = run.current {
            if !current.retired_old {
                if let Some(new) = self.workers.get_mut(&current.new) {
                    new.retire();
                }
            }
        }
    }

    /// Worker `id` ended before it consumed: if it is the new worker of
    /// the slot being rolled, its service stays on its last good version,
    /// and this says whether the slot is left with no worker (its restart
    /// is the caller's); `None` if it is not.
    pub(super) fn roll_failed(&mut self, id: u64, what: &str) -> Option<bool> {
        let run = self.roll.as_mut()?;
        let current = run.current.as_ref().filter(|c| c.new == id)?;
        let (service, old) = (current.service.clone(), current.old);
        tracing::error!(
            service, status = %what,
            "the new worker did not start: the service stays on its last good version; \
             the roll goes on with the other services"
        );
        run.failed.insert(service.clone());
        run.current = None;
        Some(old.is_none_or(|old| !self.workers.contains_key(&old)))
    }

    pub(super) fn advance_roll(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        let Some(mut run) = self.roll.take() else {
            return;
        };
        if let Some(current) = &mut run.current {
            if !current.retired_old {
                match self.workers.get(&current.new) {
                    Some(new) if new.consuming => {}
                    Some(_) => {
                        self.roll = Some(run);
                        return;
                    }
                    None => {
                        // It consumed, then died before it was seen to:
                        // not proven; its old worker stays.
                        tracing::error!(
                            service = %current.service,
                            "the new worker died as it started: the service stays on its last \
                             good version; the roll goes on with the other services"
                        );
                        run.failed.insert(current.service.clone());
                        run.current = None;
                        self.roll = Some(run);
                        return self.advance_roll();
                    }
                }
                // Proven: restarts of this service load these copies now.
                if let Some(state) = self.services.get_mut(&current.service) {
                    state.copies = Some(run.copies.clone());
                    state.proven = true;
                    state.contract = run.contracts.get(&current.service).cloned();
                }
                current.retired_old = true;
                run.rolled += 1;
                if let Some(old) = current.old.and_then(|id| self.workers.get_mut(&id)) {
                    old.retire();
                }
            }
            // One slot at a time: the next once the old worker is gone.
            if current.old.is_some_and(|id| self.workers.contains_key(&id)) {
                self.roll = Some(run);
                return;
            }
            run.current = None;
        }
        while let Some((service, index)) = run.queue.pop_front() {
            if run.failed.contains(&service) || !self.services.contains_key(&service) {
                continue;
            }
            let old = self
                .workers
                .iter()
                .find(|(_, w)| w.service == service && w.index == index && !w.retiring)
                .map(|(id, _)| *id);
            if old.is_none() {
                // The slot waited for a restart: the new worker is it.
                if let Some(slot) = self
                    .services
                    .get_mut(&service)
                    .and_then(|s| s.slots.get_mut(&index))
                {
                    slot.respawn_at = None;
                }
            }
            match self.spawn_with(&service, index, &run.copies) {
                Some(new) => {
                    run.current = Some(Roll {
                        service,
                        old,
                        new,
                        retired_old: false,
                    });
                    self.roll = Some(run);
                    return;
                }
                None => {
                    run.failed.insert(service.clone());
                    if old.is_none() {
                        self.schedule(&service, index, true, false);
                    }
                }
            }
        }
        // Refused upgrades were said when the roll began, each with its
        // differences; the next SIGHUP refuses them again.
        let refused: Vec<&str> = run.refused.iter().map(String::as_str).collect();
        if run.failed.is_empty() {
            tracing::info!(
                workers = run.rolled,
                roll = run.copies.roll,
                refused = %refused.join(", "),
                "roll finished"
            );
        } else {
            let names: Vec<&str> = run.failed.iter().map(String::as_str).collect();
            tracing::error!(
                workers = run.rolled, roll = run.copies.roll, not_rolled = %names.join(", "),
                "roll finished, but these services stay on their last good version; \
                 the next SIGHUP tries them again"
            );
        }
    }
}
