//! RabbitMQ cluster chaos: the real binary (`workers = 2`, a quorum queue,
//! the cluster's three nodes as a failover list) under load from a client
//! connected to node 3, while the node the host is connected to stops and
//! comes back, then while the queue's leader does. Every request that
//! reached the queue is answered; duplicates are counted and printed.
//!
//! The cluster is the project's own (`scripts/rabbitmq-cluster.sh`, nodes
//! on 5681-5683), started here and removed at the end.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use commissaire_e2e::host::{HostSpec, TestHost};
use commissaire_e2e::load::{Load, Progress, Report};
use commissaire_e2e::workspace_root;
use serde_json::json;

fn cluster(args: &[&str]) -> String {
    let out = Command::new(workspace_root().join("scripts/rabbitmq-cluster.sh"))
        .args(args)
        .output()
        .expect("run rabbitmq-cluster.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "rabbitmq-cluster.sh {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn node_uri(n: u8) -> String {
    format!("amqp://guest:guest@127.0.0.1:568{n}/%2f")
}

/// Stops node `n`'s RabbitMQ application for `down`, then starts it again.
fn bounce(n: u8, down: Duration) {
    cluster(&["ctl", &n.to_string(), "-q", "stop_app"]);
    std::thread::sleep(down);
    cluster(&["ctl", &n.to_string(), "-q", "start_app"]);
}

fn run_with(load: Load, chaos: impl FnOnce(Arc<Progress>) + Send + 'static) -> Report {
    let progress = Arc::new(Progress::default());
    let done = Arc::new(AtomicBool::new(false));
    let driver = {
        let progress = progress.clone();
        std::thread::spawn(move || chaos(progress))
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let report = rt.block_on(load.run(progress));
    done.store(true, Ordering::SeqCst);
    driver.join().expect("the chaos driver panicked");
    eprintln!("{report}");
    report
}

fn wait_for(progress: &Progress, answered: usize) {
    while progress.answered() < answered {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn node_and_leader_failures_under_load_lose_nothing() {
    cluster(&["up"]);
    let mut spec = HostSpec::amqp();
    spec.bus_uri = (1..=3).map(node_uri).collect::<Vec<_>>().join(";");
    spec.plugins = vec!["simple"];
    // A reply counts as sent once the cluster confirmed it: without
    // confirms, a reply on its way when its node stops can be lost after
    // its request was acked.
    spec.bus_toml = "confirm_replies = true\n".to_owned();
    let queue = spec.queue("simple");
    let services = format!(
        "[[service]]\nname = \"simple\"\nworkers = 2\nqueues = [{{ name = \"{queue}\", routing_key = \"simple.*\", \
         arguments = {{ \"x-queue-type\" = \"quorum\" }} }}]\n"
    );
    let host = TestHost::start_with_services(spec.clone(), &services);
    let load = |total: usize| Load {
        exchange: spec.exchange.clone(),
        total,
        concurrency: 32,
        deadline: Duration::from_secs(120),
        request: Arc::new(|i| ("simple.add".to_owned(), json!([i, 1]))),
        broker: Some(node_uri(3)),
        give_up_after: None,
    };
    let check = |report: &Report, what: &str| {
        assert!(
            report.unanswered.is_empty(),
            "{what}: {report}\n{}",
            host.stderr()
        );
        for (i, reply) in &report.replies {
            assert_eq!(reply["result"], json!(i + 1), "{what}: request {i}");
        }
    };

    // Each worker connects to the first node of the list: stop it.
    let report = run_with(load(3000), |progress| {
        wait_for(&progress, 500);
        bounce(1, Duration::from_secs(2));
    });
    check(&report, "node 1 stopped");
    eprintln!("node the host is connected to: {report}");

    // Then the quorum queue's leader, wherever it now is.
    let leader: u8 = cluster(&["leader", &queue]).trim().parse().unwrap_or(1);
    let report = run_with(load(3000), move |progress| {
        wait_for(&progress, 500);
        bounce(leader, Duration::from_secs(2));
    });
    check(&report, "leader stopped");
    eprintln!("quorum leader (node {leader}): {report}");

    let log = host.stderr();
    assert!(!log.contains("panicked"), "{log}");
    drop(host);
    cluster(&["down"]);
}
