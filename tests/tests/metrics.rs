//! `GET /metrics` on the real binary over RabbitMQ, two workers per
//! service: the scrape is parsed with Python's `prometheus_client` (the
//! `.venv` that `scripts/test.sh` makes), the counts are exact, they add up
//! over the workers, survive a killed worker, and a caller cannot make one
//! series per method name it sends. A plugin printing control lines to its
//! stdout forges nothing.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use commissaire_e2e::host::{http_get, HostSpec, TestHost};
use commissaire_e2e::python_with_kombu;
use serde_json::{json, Value};

/// One sample: its name and labels.
type Key = (String, BTreeMap<String, String>);

/// Parses Prometheus text with `prometheus_client`'s parser: every sample,
/// and each family's type.
fn parse(text: &str) -> (BTreeMap<Key, f64>, BTreeMap<String, String>) {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
samples, types = [], {}
for family in text_string_to_metric_families(sys.stdin.read()):
    types[family.name] = family.type
    for s in family.samples:
        samples.append([s.name, s.labels, s.value])
print(json.dumps({"samples": samples, "types": types}))
"#;
    let mut child = Command::new(python_with_kombu())
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write the scrape");
    let out = child.wait_with_output().expect("python output");
    assert!(
        out.status.success(),
        "prometheus_client cannot parse the scrape ({}):\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Value = serde_json::from_slice(&out.stdout).expect("parser JSON");
    let mut samples = BTreeMap::new();
    for s in parsed["samples"].as_array().expect("samples") {
        let labels: BTreeMap<String, String> =
            serde_json::from_value(s[1].clone()).expect("labels");
        let value = s[2].as_f64().unwrap_or(f64::NAN);
        samples.insert((s[0].as_str().expect("name").to_owned(), labels), value);
    }
    let types = serde_json::from_value(parsed["types"].clone()).expect("types");
    (samples, types)
}

struct Scrape {
    samples: BTreeMap<Key, f64>,
    types: BTreeMap<String, String>,
    text: String,
}

impl Scrape {
    fn of(host: &TestHost) -> Self {
        let (status, body) = http_get(host.http, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200);
        let text = body.as_str().expect("text").to_owned();
        let (samples, types) = parse(&text);
        Self {
            samples,
            types,
            text,
        }
    }

    /// The value of `name{labels}`. Panics when the series is missing: a
    /// series gone or renamed is no 0.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no series {name}{labels:?} in:\n{}", self.text))
    }

    /// The value of `name{labels}`, `None` while the series is missing
    /// (for a scrape that waits for it).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples.get(&(name.to_owned(), labels)).copied()
    }

    /// Every sample of a counter or histogram family.
    fn monotonic(&self) -> impl Iterator<Item = (&Key, &f64)> {
        self.samples.iter().filter(|((name, _), _)| {
            self.types.iter().any(|(family, kind)| {
                (kind == "counter" || kind == "histogram") && name.starts_with(family.as_str())
            })
        })
    }
}

/// Scrapes until `ready` holds (the workers report every second).
fn scrape_until(host: &TestHost, what: &str, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    let started = Instant::now();
    loop {
        let scrape = Scrape::of(host);
        if ready(&scrape) {
            return scrape;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "never {what}:\n{}",
            scrape.text
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn call(host: &TestHost, routing_key: &str, params: Value) -> Value {
    let method = routing_key.rsplit('.').next().unwrap_or_default();
    let (status, reply) = host.http_call(
        routing_key,
        &json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}),
    );
    assert!(status < 500, "{status}: {reply}");
    reply
}

fn spec() -> HostSpec {
    let mut spec = HostSpec::amqp();
    spec.exchange = commissaire_e2e::host::unique("metrics-ex");
    spec.suffix = commissaire_e2e::host::unique("metrics");
    spec.service_toml = "workers = 2".to_owned();
    spec
}

#[test]
fn counts_add_up_over_workers_and_survive_a_killed_one() {
    let host = TestHost::start(spec());
    for i in 0..20 {
        let reply = call(&host, "simple.add", json!([i, 1]));
        assert_eq!(reply["result"], json!(i + 1), "{reply}");
    }
    for _ in 0..3 {
        let reply = call(&host, "demo.raise", json!([4000, "no"]));
        assert_eq!(reply["error"]["code"], 4000, "{reply}");
    }
    let ok = [
        ("service", "simple"),
        ("method", "add"),
        ("outcome", "ok"),
        ("code", ""),
    ];
    let raised = [
        ("service", "demo"),
        ("method", "raise"),
        ("outcome", "error"),
        ("code", "4000"),
    ];
    // Each worker reports on its own second: wait for both services'.
    let before = scrape_until(&host, "20 simple.add and 3 demo.raise counted", |s| {
        s.value("commissaire_requests_total", &ok) == Some(20.0)
            && s.value("commissaire_requests_total", &raised) == Some(3.0)
    });
    let add = [("service", "simple"), ("method", "add")];
    assert_eq!(
        before.get("commissaire_request_duration_seconds_count", &add),
        20.0
    );
    let mut inf = add.to_vec();
    inf.push(("le", "+Inf"));
    assert_eq!(
        before.get("commissaire_request_duration_seconds_bucket", &inf),
        20.0
    );
    let consuming = [("service", "simple"), ("state", "consuming")];
    assert_eq!(before.get("commissaire_workers", &consuming), 2.0);
    assert_eq!(
        before.get(
            "commissaire_worker_restarts_total",
            &[("service", "simple")]
        ),
        0.0
    );
    for worker in ["0", "1"] {
        let labels = [("service", "simple"), ("worker", worker)];
        assert!(
            before.get("commissaire_worker_resident_memory_bytes", &labels) > 0.0,
            "{}",
            before.text
        );
        assert!(before.get("commissaire_worker_open_fds", &labels) > 0.0);
    }

    let pids = host.worker_pids("simple");
    assert_eq!(pids.len(), 2, "{pids:?}");
    let status = Command::new("kill")
        .args(["-KILL", &pids[0].to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let after = scrape_until(&host, "the killed worker replaced", |s| {
        s.value(
            "commissaire_worker_restarts_total",
            &[("service", "simple")],
        )
        .is_some_and(|n| n >= 1.0)
            && s.value("commissaire_workers", &consuming) == Some(2.0)
    });
    assert!(after.get("commissaire_crashes_total", &[("service", "simple")]) >= 1.0);
    for (key, value) in before.monotonic() {
        let now = after
            .samples
            .get(key)
            .copied()
            .unwrap_or_else(|| panic!("{key:?} ({value}) gone:\n{}", after.text));
        assert!(now >= *value, "{key:?} went from {value} to {now}");
    }
    // The dead worker's requests are still counted, and more add up.
    assert_eq!(after.get("commissaire_requests_total", &ok), 20.0);
    for i in 0..4 {
        call(&host, "simple.add", json!([i, 1]));
    }
    scrape_until(&host, "24 simple.add counted", |s| {
        s.value("commissaire_requests_total", &ok) == Some(24.0)
    });
}

#[test]
fn unknown_methods_count_as_one_series() {
    let host = TestHost::start(spec());
    std::thread::scope(|scope| {
        for t in 0..8 {
            let host = &host;
            scope.spawn(move || {
                for i in (t..1000).step_by(8) {
                    let reply = call(host, &format!("simple.nope{i}"), json!([]));
                    assert_eq!(reply["error"]["code"], -32601, "{reply}");
                }
            });
        }
    });
    let unknown = [
        ("service", "simple"),
        ("method", "_unknown"),
        ("outcome", "error"),
        ("code", "-32601"),
    ];
    let scrape = scrape_until(&host, "1000 unknown methods counted", |s| {
        s.value("commissaire_requests_total", &unknown) == Some(1000.0)
    });
    let methods: std::collections::BTreeSet<&str> = scrape
        .samples
        .keys()
        .filter(|(name, labels)| {
            name == "commissaire_requests_total"
                && labels.get("service").map(String::as_str) == Some("simple")
        })
        .filter_map(|(_, labels)| labels.get("method").map(String::as_str))
        .collect();
    assert_eq!(methods.into_iter().collect::<Vec<_>>(), ["_unknown"]);
    assert!(!scrape.text.contains("nope"), "{}", scrape.text);
}

#[test]
fn a_plugin_printing_control_lines_forges_nothing() {
    let mut spec = spec();
    spec.service_toml = "workers = 1".to_owned();
    let host = TestHost::start(spec);
    let forged = [
        "@commissaire idle".to_owned(),
        "@commissaire fatal forged by a plugin".to_owned(),
        "@commissaire check 1".to_owned(),
        format!(
            "@commissaire metrics {}",
            json!([{"service": "demo", "methods": [], "drops": [0, 0, 0, 0, 0, 0, 999, 0],
                "bus_calls": [], "reconnects": 0, "in_flight": 0}])
        ),
    ];
    for line in &forged {
        let reply = call(&host, "demo.print", json!([line]));
        assert!(reply.get("error").is_none(), "{reply}");
    }
    // Past a report of the worker's own counts.
    let scrape = scrape_until(&host, "demo.print counted", |s| {
        s.value(
            "commissaire_requests_total",
            &[
                ("service", "demo"),
                ("method", "print"),
                ("outcome", "ok"),
                ("code", ""),
            ],
        ) == Some(4.0)
    });
    assert_eq!(
        scrape.get("commissaire_poison_refused_total", &[("service", "demo")]),
        0.0
    );
    let (status, health) = host.health();
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["services"]["demo"]["consuming"], 1, "{health}");
    let log = host.stderr();
    for line in &forged {
        assert!(
            log.contains("worker output") && log.contains(&line[..line.len().min(24)]),
            "{line} not logged as output:\n{log}"
        );
    }
    assert!(!log.contains("verdict"), "{log}");
}
