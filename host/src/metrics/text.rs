//! The Prometheus text exposition of every service's counts, made with
//! `prometheus-client`, and each worker process's figures read from
//! `/proc` at the scrape.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::http::HttpSnapshot;
use super::{Dropped, ServiceSnapshot, BUCKETS};

/// What `/metrics` renders.
pub trait Exporter: Send + Sync {
    /// The Prometheus text exposition, the HTTP endpoint's own counts
    /// (`http`) included.
    fn render(&self, http: &HttpSnapshot) -> String;
}

/// The content type of [`Exporter::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One worker process of a service, now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    /// Its slot (`worker` label).
    pub index: u16,
    /// Its process id.
    pub pid: u32,
}

/// One service: its counts summed over every worker, and the supervisor's.
#[derive(Debug, Clone, Default)]
pub struct ServiceView {
    /// The counts (the `service` field names it).
    pub counts: ServiceSnapshot,
    /// Workers by state (`consuming`, `starting`, `retiring`).
    pub workers: Vec<(&'static str, u64)>,
    /// Workers started again after one ended.
    pub restarts: u64,
    /// Workers that died unasked.
    pub crashes: u64,
    /// Workers killed because their plugins' `init` passed `init_timeout`.
    pub init_timeouts: u64,
    /// Workers replaced for passing `max_worker_rss`.
    pub rss_recycles: u64,
    /// SIGHUP rolls refused because the new plugin would break callers.
    pub upgrades_refused: u64,
    /// The last refused roll's breaking differences, by kind.
    pub breaking_changes: Vec<(&'static str, u64)>,
    /// The worker processes running now.
    pub processes: Vec<WorkerView>,
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// A per-service counter: its name, help, and where its value comes from.
type Simple = (&'static str, &'static str, fn(&ServiceView) -> u64);

#[derive(Debug)]
struct Views(Vec<ServiceView>);

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels<'_>, u64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        m.encode_family(labels)?
            .encode_counter::<NoLabelSet, _, u64>(v, None)?;
    }
    Ok(())
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels<'_>, V)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        m.encode_family(labels)?.encode_gauge(v)?;
    }
    Ok(())
}

/// Per service, one labelled value taken from its counts.
fn per_service<'a>(
    views: &'a [ServiceView],
    f: impl Fn(&ServiceView) -> u64,
) -> Vec<(Labels<'a>, u64)> {
    views
        .iter()
        .map(|v| (vec![("service", v.counts.service.as_str())], f(v)))
        .collect()
}

impl Collector for Views {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let views = &self.0;
        let mut requests = Vec::new();
        for v in views {
            let service = v.counts.service.as_str();
            for m in &v.counts.methods {
                let base = [("service", service), ("method", m.method.as_str())];
                if m.ok > 0 {
                    let mut l = base.to_vec();
                    l.extend([("outcome", "ok"), ("code", "")]);
                    requests.push((l, m.ok));
                }
                for (code, n) in &m.errors {
                    let mut l = base.to_vec();
                    l.extend([("outcome", "error"), ("code", code.as_str())]);
                    requests.push((l, *n));
                }
            }
        }
        counter(
            &mut enc,
            "commissaire_requests",
            "Requests answered (or, for notifications, ended), by outcome and JSON-RPC error code.",
            &requests,
        )?;
        {
            let mut h = enc.encode_descriptor(
                "commissaire_request_duration_seconds",
                "Time a request's parsing and handler took.",
                None,
                MetricType::Histogram,
            )?;
            for v in views {
                for m in v.counts.methods.iter().filter(|m| m.count > 0) {
                    let labels = [
                        ("service", v.counts.service.as_str()),
                        ("method", m.method.as_str()),
                    ];
                    let buckets: Vec<(f64, u64)> = BUCKETS
                        .iter()
                        .copied()
                        .chain([f64::INFINITY])
                        .zip(m.buckets.iter().copied())
                        .collect();
                    h.encode_family(&labels)?
                        .encode_histogram::<NoLabelSet>(m.sum, m.count, &buckets, None)?;
                }
            }
        }
        gauge(
            &mut enc,
            "commissaire_in_flight",
            "Requests being handled now.",
            &per_service(views, |v| v.counts.in_flight),
        )?;
        let workers: Vec<(Labels<'_>, u64)> = views
            .iter()
            .flat_map(|v| {
                v.workers.iter().map(|(state, n)| {
                    (
                        vec![("service", v.counts.service.as_str()), ("state", *state)],
                        *n,
                    )
                })
            })
            .collect();
        gauge(
            &mut enc,
            "commissaire_workers",
            "Worker processes by state.",
            &workers,
        )?;
        let simple: [Simple; 7] = [
            (
                "commissaire_worker_restarts",
                "Workers started again after one ended (died, recycled).",
                |v| v.restarts,
            ),
            (
                "commissaire_crashes",
                "Workers that died unasked (not stopped, not recycled).",
                |v| v.crashes,
            ),
            (
                "commissaire_init_timeouts",
                "Workers killed because their plugins' init did not return within init_timeout.",
                |v| v.init_timeouts,
            ),
            (
                "commissaire_rss_recycles",
                "Workers replaced because their resident memory passed max_worker_rss.",
                |v| v.rss_recycles,
            ),
            (
                "commissaire_upgrades_refused",
                "SIGHUP rolls refused because the new plugin's contract would break callers.",
                |v| v.upgrades_refused,
            ),
            (
                "commissaire_bus_reconnects",
                "Bus connections of workers lost and made again.",
                |v| v.counts.reconnects,
            ),
            (
                "commissaire_bus_redeclared",
                "Queues, bindings and reply queues of workers the broker lost and they declared again.",
                |v| v.counts.redeclared,
            ),
        ];
        for (name, help, f) in &simple {
            counter(&mut enc, name, help, &per_service(views, f))?;
        }
        let breaking: Vec<(Labels<'_>, u64)> = views
            .iter()
            .flat_map(|v| {
                v.breaking_changes.iter().map(|(change, n)| {
                    (
                        vec![("service", v.counts.service.as_str()), ("change", *change)],
                        *n,
                    )
                })
            })
            .collect();
        gauge(
            &mut enc,
            "commissaire_upgrade_breaking_changes",
            "The breaking differences, by kind, of the service's last refused upgrade (none once one goes through).",
            &breaking,
        )?;
        for &why in Dropped::ALL {
            counter(
                &mut enc,
                why.metric(),
                why.help(),
                &per_service(views, |v| v.counts.dropped(why)),
            )?;
        }
        let quarantined: Vec<(Labels<'_>, u64)> = views
            .iter()
            .flat_map(|v| {
                super::QuarantineReason::ALL.iter().map(|why| {
                    (
                        vec![
                            ("service", v.counts.service.as_str()),
                            ("reason", why.as_str()),
                        ],
                        v.counts.quarantined(*why),
                    )
                })
            })
            .collect();
        counter(
            &mut enc,
            "commissaire_quarantined",
            "Requests quarantined (refused as poison, handler panicked or timed out), repeats included.",
            &quarantined,
        )?;
        gauge(
            &mut enc,
            "commissaire_quarantine_bound",
            "Entries each quarantine of the service keeps (the oldest dropped past it); 0: off.",
            &per_service(views, |v| v.counts.quarantine_bound),
        )?;
        let calls: Vec<(Labels<'_>, u64)> = views
            .iter()
            .flat_map(|v| {
                v.counts.bus_calls.iter().map(|(target, outcome, n)| {
                    (
                        vec![
                            ("service", v.counts.service.as_str()),
                            ("target", target.as_str()),
                            ("outcome", outcome.as_str()),
                        ],
                        *n,
                    )
                })
            })
            .collect();
        counter(
            &mut enc,
            "commissaire_bus_calls",
            "Handlers' own bus calls, by the service they call (the routing key's first segment).",
            &calls,
        )?;
        process_figures(&mut enc, views)
    }
}

/// Each worker process's resident memory, CPU time and open descriptors.
fn process_figures(enc: &mut DescriptorEncoder, views: &[ServiceView]) -> std::fmt::Result {
    let mut rss = Vec::new();
    let mut cpu = Vec::new();
    let mut fds = Vec::new();
    let indexes: Vec<(String, &str)> = views
        .iter()
        .flat_map(|v| {
            v.processes
                .iter()
                .map(|p| (p.index.to_string(), v.counts.service.as_str()))
        })
        .collect();
    let procs = views.iter().flat_map(|v| v.processes.iter());
    for (p, (index, service)) in procs.zip(&indexes) {
        let Some(figures) = read_proc(p.pid) else {
            continue;
        };
        let labels = vec![("service", *service), ("worker", index.as_str())];
        rss.push((labels.clone(), figures.rss_bytes));
        cpu.push((labels.clone(), figures.cpu_seconds));
        fds.push((labels, figures.open_fds));
    }
    gauge(
        enc,
        "commissaire_worker_resident_memory_bytes",
        "Resident memory of each worker process.",
        &rss,
    )?;
    gauge(
        enc,
        "commissaire_worker_cpu_seconds",
        "CPU time of each worker process since it started (its replacement starts again at 0).",
        &cpu,
    )?;
    gauge(
        enc,
        "commissaire_worker_open_fds",
        "Open file descriptors of each worker process.",
        &fds,
    )
}

struct ProcFigures {
    rss_bytes: u64,
    cpu_seconds: f64,
    open_fds: u64,
}

/// A process's resident memory in bytes, from `/proc`; `None` if it is
/// gone.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    Some(rss_kb * 1024)
}

/// Reads a process's figures from `/proc`; `None` if it is gone.
fn read_proc(pid: u32) -> Option<ProcFigures> {
    let rss_bytes = resident_bytes(pid)?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces and parens.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, in USER_HZ (100 on
    // Linux whatever the kernel's tick).
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let cpu_seconds = (ticks(11) + ticks(12)) as f64 / 100.0;
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    Some(ProcFigures {
        rss_bytes,
        cpu_seconds,
        open_fds,
    })
}

/// The HTTP endpoint's refusals and what it holds.
#[derive(Debug)]
struct HttpView(HttpSnapshot);

impl Collector for HttpView {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let refused: Vec<(Labels<'_>, u64)> = self
            .0
            .refused
            .iter()
            .map(|(reason, n)| (vec![("reason", *reason)], *n))
            .collect();
        counter(
            &mut enc,
            "commissaire_http_refused",
            "Connections and requests the HTTP endpoint refused to protect itself, by reason.",
            &refused,
        )?;
        for (name, help, value) in [
            (
                "commissaire_http_connections",
                "Connections the HTTP endpoint holds open now.",
                self.0.connections,
            ),
            (
                "commissaire_http_buffered_bytes",
                "Bytes of request bodies the HTTP endpoint holds now ([http] max_buffered_bytes).",
                self.0.buffered_bytes,
            ),
        ] {
            enc.encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&value)?;
        }
        Ok(())
    }
}

/// Renders `views` and the HTTP endpoint's counts as Prometheus text.
pub fn render(views: Vec<ServiceView>, http: &HttpSnapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Views(views)));
    registry.register_collector(Box::new(HttpView(http.clone())));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        tracing::error!(error = %e, "cannot render the metrics");
    }
    out
}
