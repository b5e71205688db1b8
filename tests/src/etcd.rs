//! A private etcd per test, started and stopped by `scripts/etcd.sh` (its
//! own ports and data directory, never the machine's etcd), and a private
//! custodia.

use std::path::PathBuf;
use std::process::Command;

use crate::workspace_root;

/// A running etcd with the v2 keys API; stopped and its data removed on
/// drop.
#[derive(Debug)]
pub struct PrivateEtcd {
    /// Its client URL, `http://127.0.0.1:<port>` (`https://` with TLS).
    pub url: String,
    dir: tempfile::TempDir,
}

fn script() -> PathBuf {
    workspace_root().join("scripts/etcd.sh")
}

/// How a [`PrivateEtcd`] speaks to its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtcdTls {
    /// `http://`.
    Plain,
    /// `https://` only, with a certificate from a CA of its own.
    Server,
    /// `https://` only, and clients must show a certificate from that CA
    /// (`--client-cert-auth`).
    Mutual,
}

impl PrivateEtcd {
    /// Starts one and waits until its keys API answers.
    pub fn start() -> Self {
        Self::start_with(EtcdTls::Plain)
    }

    /// Starts one speaking `tls`; its certificates (`scripts/tls-ca.sh`:
    /// `ca.pem`, `server.*`, `client.*`) are in [`Self::tls_file`], and
    /// go with it on drop.
    pub fn start_with(tls: EtcdTls) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut up = Command::new(script());
        up.arg("up").arg(dir.path());
        if tls != EtcdTls::Plain {
            let certs = dir.path().join("tls");
            let made = Command::new(workspace_root().join("scripts/tls-ca.sh"))
                .arg(&certs)
                .status()
                .expect("run scripts/tls-ca.sh");
            assert!(made.success(), "scripts/tls-ca.sh failed");
            up.arg("--tls").arg(&certs);
        }
        if tls == EtcdTls::Mutual {
            up.arg("--client-cert-auth");
        }
        let out = up.output().expect("run scripts/etcd.sh");
        assert!(
            out.status.success(),
            "scripts/etcd.sh up failed (etcd installed? scripts/ensure-brokers.sh installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Self { url, dir }
    }

    /// A file of its test CA (`ca.pem`, `client.pem`, `client.key`...), for
    /// an etcd started with TLS.
    pub fn tls_file(&self, name: &str) -> PathBuf {
        self.dir.path().join("tls").join(name)
    }

    fn pid(&self) -> String {
        let pid = std::fs::read_to_string(self.dir.path().join("etcd.pid")).unwrap_or_default();
        pid.trim().to_owned()
    }

    /// Freezes it (`SIGSTOP`): connections still open (the kernel accepts
    /// them) but nothing answers, as with a hung server.
    pub fn freeze(&self) {
        let pid = self.pid();
        if !pid.is_empty() {
            let _ = Command::new("kill").args(["-STOP", &pid]).status();
        }
    }

    /// Stops it (its data stays until drop).
    pub fn stop(&self) {
        let pid = self.pid();
        let pid = pid.as_str();
        if !pid.is_empty() {
            // A frozen etcd must run again to die of SIGTERM at `down`;
            // SIGKILL needs no such thing, but say CONT for the record.
            let _ = Command::new("kill").args(["-KILL", pid]).status();
            let _ = Command::new("kill").args(["-CONT", pid]).status();
            // Reaped by nobody but gone: wait until the port refuses.
            let port = self.url.rsplit(':').next().unwrap_or_default().to_owned();
            let started = std::time::Instant::now();
            while std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_ok() {
                assert!(
                    started.elapsed() < std::time::Duration::from_secs(10),
                    "etcd on port {port} still answers 10 s after SIGKILL"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

impl Drop for PrivateEtcd {
    fn drop(&mut self) {
        // A frozen etcd would sit out `down`'s SIGTERM grace.
        let pid = self.pid();
        if !pid.is_empty() {
            let _ = Command::new("kill").args(["-CONT", &pid]).status();
        }
        let _ = Command::new(script())
            .arg("down")
            .arg(self.dir.path())
            .status();
    }
}

/// A custodia server of the test's own (`custodia==0.5.0` from the test
/// venv that scripts/test.sh makes), on a Unix socket in a temporary
/// directory, keeping secrets in SQLite there. Killed on drop.
#[derive(Debug)]
pub struct PrivateCustodia {
    /// Its socket.
    pub socket: PathBuf,
    child: Option<std::process::Child>,
    _dir: tempfile::TempDir,
}

impl PrivateCustodia {
    /// Starts one and waits until its socket accepts.
    pub fn start() -> Self {
        let python = crate::python_with_kombu();
        let custodia = python.with_file_name("custodia");
        assert!(
            custodia.exists(),
            "no custodia at {}: run scripts/test.sh (it installs custodia==0.5.0 in .venv)",
            custodia.display()
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("custodia.sock");
        let d = dir.path().display();
        let conf = format!(
            "[global]\nserver_socket = {}\nmakedirs = True\nauditlog = {d}/audit.log\n\n\
             [store:sqlite]\nhandler = SqliteStore\ndburi = {d}/secrets.db\ntable = secrets\n\n\
             [auth:header]\nhandler = SimpleHeaderAuth\nheader = REMOTE_USER\n\n\
             [authz:paths]\nhandler = SimplePathAuthz\npaths = / /secrets/\n\n\
             [/]\nhandler = Root\n\n[/secrets]\nhandler = Secrets\nstore = sqlite\n",
            socket.display()
        );
        let conf_path = dir.path().join("custodia.conf");
        std::fs::write(&conf_path, conf).expect("write custodia.conf");
        let log = std::fs::File::create(dir.path().join("custodia.log")).expect("log file");
        let child = Command::new(&custodia)
            .arg(&conf_path)
            .current_dir(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start custodia");
        let mut me = Self {
            socket,
            child: Some(child),
            _dir: dir,
        };
        let started = std::time::Instant::now();
        while std::os::unix::net::UnixStream::connect(&me.socket).is_err() {
            if let Some(status) = me.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("custodia exited at start with {status}");
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(20),
                "custodia not up on {} within 20 s",
                me.socket.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        me
    }

    /// Kills it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateCustodia {
    fn drop(&mut self) {
        self.stop();
    }
}
