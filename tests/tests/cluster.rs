//! RabbitMQ cluster chaos: the real binary (`workers = 2`, a quorum queue,
//! the cluster's three nodes as a failover list) under load from a client
//! connected to node 3, while the node the host is connected to stops and
//! comes back, then while the queue's leader does. Every request is
//! counted by id: each answered as expected, duplicates counted, printed
//! and bounded.
//!
//! The cluster is the test's own (`scripts/rabbitmq-cluster.sh`, on ports,
//! node names and a directory of its own), removed when the test ends,
//! passed or not.

use std::sync::Arc;
use std::time::Duration;

use commissaire_e2e::host::{HostSpec, TestHost};
use commissaire_e2e::load::{Load, Progress, Report};
use commissaire_e2e::rabbitmq::PrivateRabbit;
use serde_json::json;

/// The load's window: at most this many requests in flight.
const CONCURRENCY: usize = 32;

/// Stops node `n`'s RabbitMQ application for `down`, then starts it again.
fn bounce(cluster: &PrivateRabbit, n: u8, down: Duration) {
    cluster.ctl(n, &["-q", "stop_app"]);
    // The outage itself, not a wait for anything.
    std::thread::sleep(down);
    cluster.ctl(n, &["-q", "start_app"]);
}

fn run_with(load: Load, chaos: impl FnOnce(Arc<Progress>) + Send + 'static) -> Report {
    let progress = Arc::new(Progress::default());
    let driver = {
        let progress = progress.clone();
        std::thread::spawn(move || chaos(progress))
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let report = rt.block_on(load.run(progress));
    driver.join().expect("the chaos driver panicked");
    eprintln!("{report}");
    report
}

/// Waits until `answered` requests are answered (the load's deadline
/// bounds it: the load ends, and its report says why).
fn wait_for(progress: &Progress, answered: usize) {
    let started = std::time::Instant::now();
    while progress.answered() < answered {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{answered} requests not answered within 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn node_and_leader_failures_under_load_lose_nothing() {
    let cluster = Arc::new(PrivateRabbit::start(3));
    let mut spec = HostSpec::amqp();
    spec.bus_uri = cluster.uris();
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
    // The load publishes through `node`, never the one the chaos stops:
    // its publishes are then all confirmed, whatever happens to the host.
    let load = |total: usize, node: u8| Load {
        exchange: spec.exchange.clone(),
        total,
        concurrency: CONCURRENCY,
        deadline: Duration::from_secs(120),
        request: Arc::new(|i| ("simple.add".to_owned(), json!([i, 1]))),
        broker: Some(cluster.uri(node)),
        give_up_after: None,
    };
    // One node lost: what was in flight (the window) may be answered
    // again; the load's own node stays up, so all its publishes are
    // confirmed.
    let check = |report: &Report, what: &str| {
        report
            .tally
            .judge(what, |i, reply| {
                (reply["result"] == json!(i + 1)).then_some("i + 1")
            })
            .with_context(host.stderr())
            .lost_none()
            .errors_exactly(0)
            .unconfirmed_at_most(0, "the load's node stays up")
            .duplicated_at_most(CONCURRENCY, "the window when the node went");
    };

    // Each worker connects to the first node of the list: stop it.
    let bouncing = cluster.clone();
    let report = run_with(load(3000, 3), move |progress| {
        wait_for(&progress, 500);
        bounce(&bouncing, 1, Duration::from_secs(2));
    });
    check(&report, "node 1 (the host's) stopped");

    // Then the quorum queue's leader, wherever it now is (the host's node
    // or not), the load on another node.
    let leader = cluster.leader(&queue);
    let load_node = if leader == 3 { 2 } else { 3 };
    let bouncing = cluster.clone();
    let report = run_with(load(3000, load_node), move |progress| {
        wait_for(&progress, 500);
        bounce(&bouncing, leader, Duration::from_secs(2));
    });
    check(&report, &format!("quorum leader (node {leader}) stopped"));

    let log = host.stderr();
    assert!(!log.contains("panicked"), "{log}");
    // The host first (it deletes what it declared), then the cluster.
    drop(host);
    drop(cluster);
}
