//! `amqps://` and `rediss://`, as the README promises them (rustls), on
//! the real binary against brokers of the test's own that speak only TLS,
//! with a throwaway CA (`scripts/tls-ca.sh`): a private RabbitMQ node
//! (`scripts/rabbitmq-tls.sh`) and a private `redis-server --tls-port`.
//! The host trusts the CA through `SSL_CERT_FILE` (rustls-native-certs
//! reads it); without it, the same broker is refused for its certificate,
//! so the certificate is checked, not skipped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use commissaire_e2e::host::{unique, HostSpec, TestHost};
use commissaire_e2e::probe::wait_for;
use commissaire_e2e::{host_bin, workspace_root};

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A private RabbitMQ node speaking only amqps; stopped on drop.
struct TlsRabbit {
    dir: tempfile::TempDir,
    port: u16,
}

impl TlsRabbit {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let out = Command::new(workspace_root().join("scripts/rabbitmq-tls.sh"))
            .arg("up")
            .arg(dir.path())
            .args([port.to_string(), free_port().to_string()])
            .output()
            .expect("run scripts/rabbitmq-tls.sh");
        let node = Self { dir, port };
        assert!(
            out.status.success(),
            "the TLS node did not start:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        node
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("tls/ca.pem")
    }
}

impl Drop for TlsRabbit {
    fn drop(&mut self) {
        let _ = Command::new(workspace_root().join("scripts/rabbitmq-tls.sh"))
            .arg("down")
            .arg(self.dir.path())
            .status();
    }
}

/// A private `redis-server` speaking only TLS; killed on drop.
struct TlsRedis {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl TlsRedis {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let tls = dir.path().join("tls");
        let made = Command::new(workspace_root().join("scripts/tls-ca.sh"))
            .arg(&tls)
            .status()
            .expect("run scripts/tls-ca.sh");
        assert!(made.success(), "scripts/tls-ca.sh failed");
        let port = free_port();
        let file = |name: &str| tls.join(name).display().to_string();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--tls-cert-file", &file("server.pem")])
            .args(["--tls-key-file", &file("server.key")])
            .args(["--tls-ca-cert-file", &file("ca.pem")])
            .args(["--tls-auth-clients", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        wait_for(Duration::from_secs(10), "redis-server listening", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Self { dir, port, child }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("tls/ca.pem")
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `commissaire-host call simple.add [1, 2]` on `uri`, trusting `ca` if
/// given: (exit code, stdout, stderr).
fn call(uri: &str, exchange: &str, ca: Option<&Path>) -> (Option<i32>, String, String) {
    let mut command = Command::new(host_bin());
    command
        .args(["call", "simple.add", "[1, 2]", "--timeout", "30"])
        .args(["--bus-uri", uri, "--bus-exchange", exchange])
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR");
    if let Some(ca) = ca {
        command.env("SSL_CERT_FILE", ca);
    }
    let out = command.output().expect("run call");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Serves `simple` on `uri`, trusting `ca`; checks a caller trusting it is
/// answered and one that does not is refused for the certificate.
fn serves_over_tls(uri: String, ca: &Path) {
    let mut spec = HostSpec::amqp();
    spec.plugins = vec!["simple"];
    spec.suffix = unique("gap");
    spec.exchange = unique("gap-ex");
    spec.bus_uri = uri.clone();
    spec.env = vec![("SSL_CERT_FILE".to_owned(), ca.display().to_string())];
    let mut host = TestHost::start(spec);
    // The private broker goes with everything on it; the tests' cleanup
    // speaks plain TCP to the machine's brokers, not TLS to this one.
    host.spec.bus_uri = "private-tls-broker://".to_owned();
    let exchange = host.spec.exchange.clone();

    let (code, stdout, stderr) = call(&uri, &exchange, Some(ca));
    assert_eq!((code, stdout.as_str()), (Some(0), "3"), "{stderr}");
    let (code, _, stderr) = call(&uri, &exchange, None);
    assert_eq!(
        code,
        Some(1),
        "an untrusted certificate is refused: {stderr}"
    );
    assert!(
        stderr.contains("invalid peer certificate: UnknownIssuer"),
        "{stderr}"
    );
    assert!(!stderr.contains("guest:guest"), "{stderr}");

    host.signal("TERM");
    let status = host.wait(Duration::from_secs(60));
    assert!(status.success(), "{status}\n{}", host.stderr());
}

#[test]
fn amqps_to_a_tls_only_rabbitmq_node() {
    let node = TlsRabbit::start();
    serves_over_tls(
        format!("amqps://guest:guest@127.0.0.1:{}/%2f", node.port),
        &node.ca(),
    );
}

#[test]
fn rediss_to_a_tls_only_redis() {
    let redis = TlsRedis::start();
    serves_over_tls(format!("rediss://127.0.0.1:{}/14", redis.port), &redis.ca());
}
