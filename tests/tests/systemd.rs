//! The host as a `Type=notify` systemd service, against a real
//! `NOTIFY_SOCKET` (a Unix datagram socket bound by the test, as systemd
//! binds one): `READY=1` once consuming, watchdog pings at the asked
//! interval and their stop when a worker is wedged, `RELOADING=1` then
//! `READY=1` around a SIGHUP roll, `STOPPING=1` at SIGTERM; and the unit
//! files, checked by `systemd-analyze verify`.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use commissaire_e2e::host::{HostSpec, TestHost};
use commissaire_e2e::workspace_root;

/// The watchdog interval asked for (`WATCHDOG_USEC`): pings every 1 s.
const WATCHDOG: Duration = Duration::from_secs(2);

/// Every datagram the host sends, with when it came.
struct Socket {
    rx: mpsc::Receiver<(Instant, String)>,
    seen: Vec<(Instant, String)>,
}

impl Socket {
    fn bind(path: &std::path::Path) -> Self {
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).trim_end().to_owned();
                if tx.send((Instant::now(), text)).is_err() {
                    break;
                }
            }
        });
        Self {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a datagram that starts with `prefix`; returns it and when
    /// it came.
    fn wait_for(&mut self, prefix: &str, limit: Duration, host: &TestHost) -> (Instant, String) {
        self.wait_until(prefix, limit, host, |t| t.starts_with(prefix))
    }

    /// Waits for a datagram that `ok` accepts.
    fn wait_until(
        &mut self,
        what: &str,
        limit: Duration,
        host: &TestHost,
        ok: impl Fn(&str) -> bool,
    ) -> (Instant, String) {
        let started = Instant::now();
        loop {
            let left = limit.saturating_sub(started.elapsed());
            match self.rx.recv_timeout(left) {
                Ok((at, text)) => {
                    self.seen.push((at, text.clone()));
                    if ok(&text) {
                        return (at, text);
                    }
                }
                Err(_) => panic!(
                    "no `{what}` within {limit:?}; got {:?}\n{}",
                    self.seen.iter().map(|(_, t)| t).collect::<Vec<_>>(),
                    host.stderr()
                ),
            }
        }
    }

    /// The watchdog pings that came in the next `span`.
    fn pings_during(&mut self, span: Duration) -> Vec<Instant> {
        let until = Instant::now() + span;
        let mut pings = Vec::new();
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            if let Ok((at, text)) = self.rx.recv_timeout(left) {
                if text == "WATCHDOG=1" {
                    pings.push(at);
                }
                self.seen.push((at, text));
            }
        }
        pings
    }
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

#[test]
fn systemd_is_told_ready_reloading_stopping_and_pinged_while_healthy() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("notify.sock");
    let mut socket = Socket::bind(&path);
    let mut spec = HostSpec::amqp();
    spec.plugins = vec!["simple"];
    spec.service_toml = "workers = 1\n".to_owned();
    spec.env = vec![
        ("NOTIFY_SOCKET".to_owned(), path.display().to_string()),
        ("WATCHDOG_USEC".to_owned(), WATCHDOG.as_micros().to_string()),
    ];
    let host = TestHost::start(spec);

    // READY=1 only once serving: nothing before it says so, and /healthz
    // already answers 200 when it comes.
    socket.wait_for("READY=1", Duration::from_secs(20), &host);
    assert_eq!(host.health().0, 200, "{}", host.stderr());
    let before: Vec<&String> = socket.seen.iter().map(|(_, t)| t).collect();
    assert!(
        before
            .iter()
            .filter(|t| t.starts_with("STATUS="))
            .all(|t| !t.contains("serving")),
        "{before:?}"
    );
    let (_, status) = socket.wait_for("STATUS=serving", Duration::from_secs(5), &host);
    assert!(
        status.contains("1 service, 1 of 1 worker consuming"),
        "{status}"
    );

    // Pinged at half the interval: never a gap systemd would act on.
    let pings = socket.pings_during(Duration::from_secs(5));
    let gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("watchdog pings in 5 s: {}, gaps {gaps:?}", pings.len());
    assert!(pings.len() >= 3, "{} pings in 5 s", pings.len());
    assert!(gaps.iter().all(|g| *g < WATCHDOG), "{gaps:?}");

    // A wedged worker (stopped, so silent): the pings stop, and say why.
    let worker = host.worker_pids("simple")[0];
    signal(worker, "STOP");
    let (_, status) = socket.wait_until("a silent worker", Duration::from_secs(30), &host, |t| {
        t.starts_with("STATUS=") && t.contains("silent for")
    });
    assert!(
        status.contains(&format!("worker {worker} of simple")),
        "{status}"
    );
    let pings = socket.pings_during(WATCHDOG * 2);
    assert!(pings.is_empty(), "pinged while wedged: {pings:?}");
    assert!(host.stderr().contains("a worker stopped reporting"));
    signal(worker, "CONT");
    socket.wait_for("WATCHDOG=1", Duration::from_secs(10), &host);

    // SIGHUP: RELOADING=1 (with the monotonic time Type=notify-reload
    // needs), then READY=1 once rolled.
    host.signal("HUP");
    let (_, reloading) = socket.wait_for("RELOADING=1", Duration::from_secs(10), &host);
    assert!(reloading.contains("\nMONOTONIC_USEC="), "{reloading}");
    socket.wait_for("READY=1", Duration::from_secs(30), &host);

    host.signal("TERM");
    socket.wait_for("STOPPING=1", Duration::from_secs(10), &host);
}

#[test]
fn the_unit_files_pass_systemd_analyze_verify() {
    let units = workspace_root().join("dist/systemd");
    // verify resolves ExecStart=: point it at the binary the tests built.
    let dir = tempfile::tempdir().expect("temp dir");
    for unit in ["commissaire-host.service", "commissaire-host@.service"] {
        let text = std::fs::read_to_string(units.join(unit)).expect("read the unit");
        let text = text.replace(
            "/usr/bin/commissaire-host",
            &commissaire_e2e::host_bin().display().to_string(),
        );
        std::fs::write(dir.path().join(unit), text).expect("write the unit");
    }
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("commissaire-host.service"))
        .arg(dir.path().join("commissaire-host@.service"))
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        output.status
    );
}
