//! Restart backoff: when to start each worker slot again, waiting longer
//! while its workers keep dying young.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::Supervisor;
use crate::retry::backoff;

/// A worker that lived at least this long was healthy: its death restarts
/// the backoff.
pub(super) const HEALTHY_LIFETIME: Duration = Duration::from_secs(10);

#[derive(Default)]
pub(super) struct ServiceState {
    pub(super) workers: u16,
    /// The plugin copies its workers load, restarts included: its last
    /// good version once [`Self::proven`] (see [`super::roll`]).
    pub(super) copies: Option<super::plugin_copies::Copies>,
    /// A worker loading [`Self::copies`] consumed.
    pub(super) proven: bool,
    /// The contract of [`Self::copies`]: what a roll's new plugin is
    /// compared with (see [`super::contracts`]).
    pub(super) contract: Option<crate::contract::Contract>,
    pub(super) restarts: u32,
    /// Per worker index: deaths in a row of short-lived workers, and when
    /// to start the next one.
    pub(super) slots: BTreeMap<u16, SlotState>,
}

#[derive(Default)]
pub(super) struct SlotState {
    pub(super) quick_deaths: u32,
    pub(super) respawn_at: Option<Instant>,
}

impl Supervisor {
    pub(super) fn add_service(&mut self, name: &str, contract: Option<crate::contract::Contract>) {
        let workers = self.config.service(name).workers;
        let copies = self.copies.current().cloned();
        let state = self.services.entry(name.to_owned()).or_default();
        state.workers = workers;
        state.copies = copies;
        state.contract = contract;
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

    /// Starts the workers whose time has come.
    pub(super) fn spawn_due(&mut self) {
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
                self.schedule(&name, index, true, false);
            }
        }
    }

    /// Plans the restart of worker `index` of `service`, backing off when
    /// workers keep dying young, unless `at_once` (see
    /// [`super::exits`]).
    pub(super) fn schedule(
        &mut self,
        service: &str,
        index: u16,
        died_young: bool,
        at_once: bool,
    ) -> Duration {
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
            _ if at_once => Duration::ZERO,
            0 | 1 => Duration::ZERO,
            n => backoff(n - 1),
        };
        slot.respawn_at = Some(Instant::now() + delay);
        state.restarts = state.restarts.saturating_add(1);
        self.metrics.restarted(service);
        delay
    }
}
