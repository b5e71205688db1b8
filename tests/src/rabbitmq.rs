//! RabbitMQ nodes of a test's own (`scripts/rabbitmq-cluster.sh`), for the
//! tests that stop, restart or lose a broker: never the machine's, which
//! other tests and other checkouts use meanwhile.
//!
//! Each gets its own directory (under the run's temporary directory),
//! ports and node names, so that runs from several checkouts never meet.
//! The nodes go when it is dropped, and when the test process ends
//! whatever way it ends (the script watches the process).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};

use crate::workspace_root;

/// A RabbitMQ cluster of `nodes` nodes (one for a single private broker).
#[derive(Debug)]
pub struct PrivateRabbit {
    dir: tempfile::TempDir,
    nodes: u8,
    port: u16,
    dist_port: u16,
    name: String,
}

/// `n` consecutive ports, each free a moment ago.
fn free_ports(n: u16) -> u16 {
    for _ in 0..100 {
        let base = 30_000 + (uuid::Uuid::new_v4().as_u128() % 30_000) as u16;
        if (0..n).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no {n} consecutive free ports in 100 tries");
}

impl PrivateRabbit {
    /// Starts the nodes and clusters them; the test process's end takes
    /// them down. Tries other ports if the first are taken meanwhile.
    pub fn start(nodes: u8) -> Self {
        let mut failures = Vec::new();
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("commissaire-rabbitmq-")
                .tempdir()
                .expect("a temp dir");
            let rabbit = Self {
                dir,
                nodes,
                port: free_ports(u16::from(nodes)),
                dist_port: free_ports(u16::from(nodes)),
                name: format!(
                    "commissaire-{}-{}-",
                    std::process::id(),
                    &uuid::Uuid::new_v4().simple().to_string()[..8]
                ),
            };
            let watched = rabbit.script(&["down-when-gone", &std::process::id().to_string()]);
            assert!(watched.status.success(), "{}", text(&watched));
            let up = rabbit.script(&["up"]);
            if up.status.success() {
                return rabbit;
            }
            failures.push(text(&up));
            // Dropped: down, and another try on other ports.
        }
        panic!(
            "cannot start a private RabbitMQ of {nodes} nodes:\n{}",
            failures.join("\n---\n")
        );
    }

    fn base(&self) -> PathBuf {
        self.dir.path().join("cluster")
    }

    fn script(&self, args: &[&str]) -> Output {
        Command::new(workspace_root().join("scripts/rabbitmq-cluster.sh"))
            .args(args)
            .env("COMMISSAIRE_CLUSTER_DIR", self.base())
            .env("COMMISSAIRE_CLUSTER_NODES", self.nodes.to_string())
            .env("COMMISSAIRE_CLUSTER_PORT", self.port.to_string())
            .env("COMMISSAIRE_CLUSTER_DIST_PORT", self.dist_port.to_string())
            .env("COMMISSAIRE_CLUSTER_NAME", &self.name)
            .output()
            .expect("run scripts/rabbitmq-cluster.sh")
    }

    /// `rabbitmqctl ARGS` on node `n` (from 1): its output; panics if it
    /// fails.
    pub fn ctl(&self, n: u8, args: &[&str]) -> String {
        let mut all = vec!["ctl".to_owned(), n.to_string()];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = self.script(&all);
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?} on node {n}: {}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The AMQP URI of node `n` (from 1).
    pub fn uri(&self, n: u8) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f",
            self.port + u16::from(n) - 1
        )
    }

    /// Every node's URI, as a failover list.
    pub fn uris(&self) -> String {
        (1..=self.nodes)
            .map(|n| self.uri(n))
            .collect::<Vec<_>>()
            .join(";")
    }

    /// The node leading quorum queue `queue`; panics if no node says.
    pub fn leader(&self, queue: &str) -> u8 {
        let out = self.script(&["leader", queue]);
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        said.parse()
            .ok()
            .filter(|n| (1..=self.nodes).contains(n))
            .unwrap_or_else(|| panic!("no leader of {queue} found ({said:?}): {}", text(&out)))
    }

    /// The names of the queues on node 1.
    pub fn queues(&self) -> Vec<String> {
        self.ctl(1, &["-q", "list_queues", "name", "--no-table-headers"])
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect()
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        let _ = self.script(&["down"]);
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
