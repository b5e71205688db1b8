//! Health and metrics: what `/healthz` and `/metrics` report, from the
//! supervisor's own state and its workers' reports.
//!
//! Each worker sends its cumulative counts now and then (see
//! `serve::worker`); the book keeps the last report of each live worker
//! and, when a worker ends, adds its last report to its service's retired
//! totals. A service's counts are its retired totals plus its live
//! workers' last reports: a dead worker's counts stay, so no counter goes
//! backwards (what a worker counted after its last report is lost with it).

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::metrics::http::HttpSnapshot;
use crate::metrics::text::{render, Exporter, ServiceView, WorkerView};
use crate::metrics::{Dropped, MethodSnapshot, ServiceSnapshot, MAX_CODES, MAX_TARGETS, OTHER};

/// Error codes per method, and bus-call targets per service, kept when
/// adding up workers (each bounded on its own): beyond, [`OTHER`].
const MERGED_CODES: usize = 4 * MAX_CODES;
const MERGED_TARGETS: usize = 2 * MAX_TARGETS;

#[derive(Debug, Default)]
struct ServiceBook {
    retired: ServiceSnapshot,
    live: BTreeMap<u64, ServiceSnapshot>,
    restarts: u64,
    crashes: u64,
    init_timeouts: u64,
    rss_recycles: u64,
    upgrades_refused: u64,
    /// The breaking differences of its last refused upgrade, by kind;
    /// empty once an upgrade goes through.
    breaking_changes: Vec<(&'static str, u64)>,
    workers: Vec<(&'static str, u64)>,
    processes: Vec<WorkerView>,
    /// When each live worker last reported (they do at least every 2 s).
    heard: BTreeMap<u64, Instant>,
}

/// Every service's counts, over all its workers, living and dead.
#[derive(Debug, Default)]
pub struct MetricsBook {
    services: Mutex<BTreeMap<String, ServiceBook>>,
}

/// Adds `from` into `into`; `in_flight` too (a gauge: only live reports
/// carry it).
fn add(into: &mut ServiceSnapshot, from: &ServiceSnapshot) {
    for m in &from.methods {
        let to = match into.methods.iter_mut().position(|t| t.method == m.method) {
            Some(i) => &mut into.methods[i],
            None => {
                into.methods.push(MethodSnapshot {
                    method: m.method.clone(),
                    buckets: vec![0; m.buckets.len()],
                    ..MethodSnapshot::default()
                });
                let last = into.methods.len() - 1;
                &mut into.methods[last]
            }
        };
        to.ok += m.ok;
        to.count += m.count;
        to.sum += m.sum;
        for (b, n) in to.buckets.iter_mut().zip(&m.buckets) {
            *b += n;
        }
        for (code, n) in &m.errors {
            let code = if to.errors.iter().any(|(c, _)| c == code) || to.errors.len() < MERGED_CODES
            {
                code.as_str()
            } else {
                OTHER
            };
            match to.errors.iter_mut().find(|(c, _)| c == code) {
                Some(e) => e.1 += n,
                None => to.errors.push((code.to_owned(), *n)),
            }
        }
    }
    for (target, outcome, n) in &from.bus_calls {
        let known = into.bus_calls.iter().any(|(t, _, _)| t == target);
        let target = if known || into.bus_calls.len() < MERGED_TARGETS {
            target.as_str()
        } else {
            OTHER
        };
        match into
            .bus_calls
            .iter_mut()
            .find(|(t, o, _)| t == target && o == outcome)
        {
            Some(c) => c.2 += n,
            None => into
                .bus_calls
                .push((target.to_owned(), outcome.clone(), *n)),
        }
    }
    for &why in Dropped::ALL {
        into.add_dropped(why, from.dropped(why));
    }
    if into.quarantined.len() < from.quarantined.len() {
        into.quarantined.resize(from.quarantined.len(), 0);
    }
    for (to, n) in into.quarantined.iter_mut().zip(&from.quarantined) {
        *to += n;
    }
    into.quarantine_bound = into.quarantine_bound.max(from.quarantine_bound);
    into.reconnects += from.reconnects;
    into.redeclared += from.redeclared;
    into.in_flight += from.in_flight;
}

impl MetricsBook {
    /// Requests answered (with a result or an error) since start, by every
    /// worker, living and dead.
    pub(super) fn requests_served(&self) -> u64 {
        self.with(|services| {
            services
                .values()
                .flat_map(|b| std::iter::once(&b.retired).chain(b.live.values()))
                .flat_map(|s| &s.methods)
                .map(|m| m.ok + m.errors.iter().map(|(_, n)| n).sum::<u64>())
                .sum()
        })
    }

    /// The worker heard from longest ago, if that is more than `limit`
    /// before `now`: (its id, how long it has been silent). A worker that
    /// never reported (still starting) is not counted.
    pub(super) fn silent(&self, now: Instant, limit: Duration) -> Option<(u64, Duration)> {
        self.with(|services| {
            services
                .values()
                .flat_map(|b| &b.heard)
                .map(|(id, at)| (*id, now.saturating_duration_since(*at)))
                .filter(|(_, silent)| *silent > limit)
                .max_by_key(|(_, silent)| *silent)
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, ServiceBook>) -> T) -> T {
        f(&mut self.services.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Worker `id` of `service` reports its cumulative counts.
    pub(super) fn report(&self, id: u64, service: &str, snapshots: Vec<ServiceSnapshot>) {
        self.with(|services| {
            // A worker serves one service: anything else it claims is
            // ignored.
            if let Some(s) = snapshots.into_iter().find(|s| s.service == service) {
                let book = services.entry(service.to_owned()).or_default();
                book.live.insert(id, s);
                book.heard.insert(id, Instant::now());
            }
        });
    }

    /// Worker `id` of `service` ended: its last report joins the totals.
    pub(super) fn ended(&self, id: u64, service: &str) {
        self.with(|services| {
            let book = services.entry(service.to_owned()).or_default();
            book.heard.remove(&id);
            if let Some(mut last) = book.live.remove(&id) {
                last.in_flight = 0;
                add(&mut book.retired, &last);
            }
        });
    }

    /// A worker of `service` died unasked.
    pub(super) fn crashed(&self, service: &str) {
        self.with(|services| services.entry(service.to_owned()).or_default().crashes += 1);
    }

    /// A worker of `service` was killed for passing `init_timeout`.
    pub(super) fn init_timed_out(&self, service: &str) {
        self.with(|services| {
            services
                .entry(service.to_owned())
                .or_default()
                .init_timeouts += 1
        });
    }

    /// A worker of `service` passed `max_worker_rss` and is replaced.
    pub(super) fn rss_recycled(&self, service: &str) {
        self.with(|services| services.entry(service.to_owned()).or_default().rss_recycles += 1);
    }

    /// A roll of `service` was refused: its new plugin's breaking
    /// differences, by kind.
    pub(super) fn upgrade_refused(&self, service: &str, changes: Vec<(&'static str, u64)>) {
        self.with(|services| {
            let book = services.entry(service.to_owned()).or_default();
            book.upgrades_refused += 1;
            book.breaking_changes = changes;
        });
    }

    /// A roll of `service` goes ahead: no refusal stands.
    pub(super) fn upgrade_accepted(&self, service: &str) {
        self.with(|services| {
            if let Some(book) = services.get_mut(service) {
                book.breaking_changes.clear();
            }
        });
    }

    /// A worker of `service` is started again.
    pub(super) fn restarted(&self, service: &str) {
        self.with(|services| services.entry(service.to_owned()).or_default().restarts += 1);
    }

    /// The workers of `service` now, by state, and their processes.
    pub(super) fn set_workers(
        &self,
        service: &str,
        workers: Vec<(&'static str, u64)>,
        processes: Vec<WorkerView>,
    ) {
        self.with(|services| {
            let book = services.entry(service.to_owned()).or_default();
            book.workers = workers;
            book.processes = processes;
        });
    }
}

impl Exporter for MetricsBook {
    fn render(&self, http: &HttpSnapshot) -> String {
        let views = self.with(|services| {
            services
                .iter()
                .map(|(name, book)| {
                    let mut counts = ServiceSnapshot {
                        service: name.clone(),
                        ..book.retired.clone()
                    };
                    for live in book.live.values() {
                        add(&mut counts, live);
                    }
                    counts.methods.sort_by(|a, b| a.method.cmp(&b.method));
                    ServiceView {
                        counts,
                        workers: book.workers.clone(),
                        restarts: book.restarts,
                        crashes: book.crashes,
                        init_timeouts: book.init_timeouts,
                        rss_recycles: book.rss_recycles,
                        upgrades_refused: book.upgrades_refused,
                        breaking_changes: book.breaking_changes.clone(),
                        processes: book.processes.clone(),
                    }
                })
                .collect()
        });
        let mut text = render(views, http);
        // The supervisor's own bus client (the HTTP endpoint's) is no
        // service's: a family of its own.
        text.push_str(&format!(
            "# HELP commissaire_supervisor_bus_redeclared_total Reply queues of the supervisor's \
             bus client (the HTTP endpoint's) the broker lost and it declared again.\n\
             # TYPE commissaire_supervisor_bus_redeclared_total counter\n\
             commissaire_supervisor_bus_redeclared_total {}\n",
            crate::bus::heal::redeclared_total()
        ));
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(ok: u64, poison: u64) -> ServiceSnapshot {
        ServiceSnapshot {
            service: "calc".into(),
            methods: vec![MethodSnapshot {
                method: "add".into(),
                ok,
                count: ok,
                sum: 0.001 * ok as f64,
                buckets: vec![ok, 0],
                errors: vec![("-32602".into(), 1)],
            }],
            drops: vec![0, 0, 0, 0, 0, 0, poison],
            in_flight: 2,
            ..ServiceSnapshot::default()
        }
    }

    #[test]
    fn a_dead_workers_counts_stay_in_the_totals() {
        let book = MetricsBook::default();
        book.report(1, "calc", vec![snapshot(5, 1)]);
        book.report(2, "calc", vec![snapshot(3, 0)]);
        book.report(2, "other", vec![snapshot(100, 0)]);
        let text = book.render(&HttpSnapshot::default());
        assert!(
            text.contains(
                r#"commissaire_requests_total{service="calc",method="add",outcome="ok",code=""} 8"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"commissaire_in_flight{service="calc"} 4"#),
            "{text}"
        );
        book.ended(1, "calc");
        book.crashed("calc");
        book.restarted("calc");
        book.report(3, "calc", vec![snapshot(1, 0)]);
        let text = book.render(&HttpSnapshot::default());
        assert!(
            text.contains(
                r#"commissaire_requests_total{service="calc",method="add",outcome="ok",code=""} 9"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"commissaire_requests_total{service="calc",method="add",outcome="error",code="-32602"} 3"#), "{text}");
        assert!(
            text.contains(r#"commissaire_poison_refused_total{service="calc"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"commissaire_crashes_total{service="calc"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"commissaire_worker_restarts_total{service="calc"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"commissaire_in_flight{service="calc"} 4"#),
            "{text}"
        );
        assert!(!text.contains(r#"service="other""#), "{text}");
    }
}
