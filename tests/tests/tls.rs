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

use commissaire_e2e::host::{http_get, unique};
use commissaire_e2e::probe::wait_for;
use commissaire_e2e::{host_bin, plugin_dir, workspace_root};

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

/// A host serving `simple` on a private TLS broker. Not a `TestHost`:
/// that one's cleanup speaks plain TCP to the machine's brokers, and the
/// private broker goes with everything on it anyway.
struct TlsHost {
    child: Child,
    http: std::net::SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
    _plugins: tempfile::TempDir,
}

impl TlsHost {
    fn start(uri: &str, exchange: &str, ca: &Path) -> Self {
        let plugins = plugin_dir(&["simple"]);
        let dir = tempfile::tempdir().expect("temp dir");
        let http = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = dir.path().join("host.toml");
        let queue = unique("gap-simple");
        std::fs::write(
            &config,
            format!(
                "[bus]\nexchange = \"{exchange}\"\n[plugins]\ndir = \"{}\"\n[http]\nlisten = \"{http}\"\n\n\
                 [[service]]\nname = \"simple\"\nqueues = [{{ name = \"{queue}\", routing_key = \"simple.*\" }}]\n",
                plugins.path().display()
            ),
        )
        .expect("write the config");
        let log = dir.path().join("stderr.log");
        let child = Command::new(host_bin())
            .args(["run", "--config"])
            .arg(&config)
            .args(["--bus-uri", uri])
            .env("SSL_CERT_FILE", ca)
            .env("COMMISSAIRE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn commissaire-host");
        let mut host = Self {
            child,
            http,
            log,
            _dir: dir,
            _plugins: plugins,
        };
        let started = std::time::Instant::now();
        loop {
            if let Ok(Some(status)) = host.child.try_wait() {
                panic!("host exited with {status}:\n{}", host.stderr());
            }
            if let Ok((200, _)) = http_get(host.http, "/healthz") {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "host not serving within 60 s:\n{}",
                host.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        host
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then its exit status (within 60 s).
    fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let started = std::time::Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "host did not stop within 60 s:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TlsHost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves `simple` on `uri`, trusting `ca`; checks a caller trusting it is
/// answered and one that does not is refused for the certificate.
fn serves_over_tls(uri: String, ca: &Path) {
    let exchange = unique("gap-ex");
    let mut host = TlsHost::start(&uri, &exchange, ca);
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
    let status = host.stop();
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
