//! The HTTP endpoint under siege (issue 23), on the real binary and a real
//! RabbitMQ: request heads that never finish holding every connection, and
//! a crowd of large uploads filling the supervisor's memory. Each test
//! prints its figures (`cargo test … -- --nocapture`); the bounds it
//! asserts are the issue's.

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use commissaire_e2e::host::{HostSpec, TestHost};
use commissaire_e2e::http::{send, try_read_reply, Reply};
use serde_json::{json, Value};

const TOKEN: &str = "t0ken-for-the-siege-tests";

/// Both sieges load the machine: never at the same time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A host behind the token, on RabbitMQ.
fn guarded_host() -> TestHost {
    let mut spec = HostSpec::amqp();
    spec.env = vec![("COMMISSAIRE_HTTP_TOKEN".to_owned(), TOKEN.to_owned())];
    TestHost::start(spec)
}

/// Lets this process (and the host it starts, which inherits the limit)
/// open `wanted` descriptors.
fn raise_fd_limit(wanted: u64) {
    let limit = commissaire_host::fd_limit::raise_to(wanted).expect("setrlimit");
    assert!(
        limit.allows(wanted),
        "the hard open-file limit is below the {wanted} descriptors this test needs: {limit:?}"
    );
}

/// A field of `/proc/<pid>/status` given in kB, in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the host runs");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Lines of the host's log that contain `needle`.
fn log_lines(host: &TestHost, needle: &str) -> usize {
    host.stderr().lines().filter(|l| l.contains(needle)).count()
}

fn assert_no_panic(host: &TestHost) {
    let log = host.stderr();
    assert!(!log.contains("panicked"), "a panic in the log:\n{log}");
}

// --- Slow heads -----------------------------------------------------------

/// Slow connections: above the default `[http] max_connections` (1024).
const SLOW: usize = 1030;
/// How often each slow connection sends a header line, and how often the
/// probes go out.
const TICK: Duration = Duration::from_millis(500);
/// Probe rounds: 20 s.
const ROUNDS: usize = 40;
/// A probe not answered within this long counts as unanswered.
const PROBE_PATIENCE: Duration = Duration::from_secs(5);

/// What the slow connections did.
#[derive(Debug, Default)]
struct Trickled {
    /// Connections opened again after the endpoint closed them.
    reopened: AtomicU64,
    /// Connections the kernel would not even take (connect failed).
    connect_failures: AtomicU64,
    /// Slow connections open at the end.
    open_at_end: AtomicU64,
}

/// `SLOW` connections that send a request head one line per [`TICK`] and
/// never finish it, each opened again the moment the endpoint closes it.
struct Slowloris {
    stop: Arc<AtomicBool>,
    figures: Arc<Trickled>,
    thread: JoinHandle<()>,
}

impl Slowloris {
    /// Starts the siege; returns once every connection was opened once.
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let figures = Arc::new(Trickled::default());
        let (opened_tx, opened) = mpsc::channel();
        let (stopping, counts) = (stop.clone(), figures.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let (first_tx, mut first) = tokio::sync::mpsc::channel(SLOW);
                let conns: Vec<_> = (0..SLOW)
                    .map(|_| {
                        tokio::spawn(Self::trickle(
                            addr,
                            stopping.clone(),
                            counts.clone(),
                            first_tx.clone(),
                        ))
                    })
                    .collect();
                drop(first_tx);
                for _ in 0..SLOW {
                    let _ = first.recv().await;
                }
                let _ = opened_tx.send(());
                for c in conns {
                    let _ = c.await;
                }
            });
        });
        opened.recv().expect("the slow connections are opened");
        Self {
            stop,
            figures,
            thread,
        }
    }

    /// One slow connection, for as long as the siege lasts.
    async fn trickle(
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        figures: Arc<Trickled>,
        opened: tokio::sync::mpsc::Sender<()>,
    ) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut opened = Some(opened);
        loop {
            let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
                figures.connect_failures.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(TICK).await;
                continue;
            };
            if let Some(opened) = opened.take() {
                let _ = opened.send(()).await;
            }
            let mut tick = tokio::time::interval(TICK);
            let mut buf = [0; 512];
            let mut sent = 0u64;
            loop {
                tokio::select! {
                    // Closed, or answered (and about to be closed).
                    _ = s.read(&mut buf) => break,
                    _ = tick.tick() => {
                        if stop.load(Ordering::Relaxed) {
                            figures.open_at_end.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        let text = if sent == 0 {
                            "POST /rpc/simple.add HTTP/1.1\r\nHost: x\r\n".to_owned()
                        } else {
                            format!("X-Slow-{sent}: 1\r\n")
                        };
                        if s.write_all(text.as_bytes()).await.is_err() {
                            break;
                        }
                        sent += 1;
                    }
                }
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
            figures.reopened.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn stop(self) -> Arc<Trickled> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the slow connections' thread");
        self.figures
    }
}

/// Sends `request` on a fresh connection; how long the answer took, if it
/// came within [`PROBE_PATIENCE`] and `answered` accepts it.
fn probe(addr: SocketAddr, request: &str, answered: fn(&Reply) -> bool) -> Option<Duration> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, PROBE_PATIENCE).ok()?;
    s.set_read_timeout(Some(PROBE_PATIENCE)).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let reply = try_read_reply(&mut s).ok()?;
    answered(&reply).then(|| started.elapsed())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

#[test]
fn slow_heads_on_every_connection_do_not_lock_callers_out() {
    let _serial = serial();
    // The slow connections, the probes, and the host's own descriptors.
    raise_fd_limit(SLOW as u64 + 1024);
    let host = guarded_host();
    let addr = host.http;
    let healthz = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_owned();
    let add = json!({"id": 1, "params": [1, 2]}).to_string();
    let rpc = format!(
        "POST /rpc/simple.add HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{add}",
        add.len()
    );

    let siege = Slowloris::start(addr);
    let started = Instant::now();
    let mut probes: Vec<(&str, JoinHandle<Option<Duration>>)> = Vec::new();
    for round in 0..ROUNDS {
        let (healthz, rpc) = (healthz.clone(), rpc.clone());
        probes.push((
            "healthz",
            std::thread::spawn(move || probe(addr, &healthz, |r| r.status == 200)),
        ));
        probes.push((
            "rpc",
            std::thread::spawn(move || {
                probe(addr, &rpc, |r| r.status == 200 && r.body["result"] == 3)
            }),
        ));
        // Pacing the probes, not waiting for anything.
        let next = started + TICK * (round as u32 + 1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let mut took: Vec<Duration> = Vec::new();
    let (mut healthz_ok, mut rpc_ok) = (0, 0);
    for (kind, p) in probes {
        if let Some(t) = p.join().expect("a probe") {
            took.push(t);
            match kind {
                "healthz" => healthz_ok += 1,
                _ => rpc_ok += 1,
            }
        }
    }
    let trickled = siege.stop();
    let siege_time = started.elapsed();
    took.sort();
    let total = 2 * ROUNDS;
    let answered = healthz_ok + rpc_ok;
    let evicted = host.metric(r#"commissaire_http_refused_total{reason="evicted"}"#);
    let full = host.metric(r#"commissaire_http_refused_total{reason="connections_full"}"#);
    let head_timeouts = host.metric(r#"commissaire_http_refused_total{reason="head_timeout"}"#);
    let logged = log_lines(&host, "[http] max_connections");
    println!(
        "slowloris: {SLOW} connections trickling a header line every {TICK:?} for {siege_time:.1?}: \
         reopened {} times ({} connects failed), {} still open at the end; \
         probes answered {answered}/{total} ({:.0}%: /healthz {healthz_ok}/{ROUNDS}, \
         /rpc/simple.add {rpc_ok}/{ROUNDS}), latency p50 {:.1?} p95 {:.1?} max {:.1?}; \
         host: {evicted} evicted, {full} closed at once, {head_timeouts} head timeouts, \
         {logged} log lines about max_connections",
        trickled.reopened.load(Ordering::Relaxed),
        trickled.connect_failures.load(Ordering::Relaxed),
        trickled.open_at_end.load(Ordering::Relaxed),
        100.0 * answered as f64 / total as f64,
        percentile(&took, 0.5),
        percentile(&took, 0.95),
        took.last().copied().unwrap_or_default(),
    );
    assert!(
        answered * 10 >= total * 9,
        "only {answered} of {total} probes answered under the siege"
    );
    assert!(evicted > 0, "the evictions are counted");
    // Throttled: a line per 10 s at most, not one per connection.
    assert!(
        logged <= 2 + (siege_time.as_secs() as usize) / 10,
        "{logged} lines about max_connections:\n{}",
        host.stderr()
    );
    assert_no_panic(&host);
}

// --- Large uploads ----------------------------------------------------------

const UPLOADS: usize = 100;
/// Each upload's body: just under `[bus] max_message_bytes` (16 MiB).
const UPLOAD_BYTES: usize = 16_000_000;
/// The supervisor's resident memory the uploads must stay under.
const RSS_BOUND: u64 = 512_000_000;

/// One upload's end.
#[derive(Debug)]
struct Uploaded {
    id: usize,
    reply: Option<Reply>,
    /// Body bytes written before the endpoint answered or closed.
    sent: usize,
}

/// `POST /rpc/simple.add` with a chunked body of [`UPLOAD_BYTES`]: a
/// string as the first parameter, so that the service answers -32602.
fn upload(addr: SocketAddr, id: usize, start: &Barrier) -> Uploaded {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(300)))
        .expect("timeout");
    s.set_write_timeout(Some(Duration::from_secs(300)))
        .expect("timeout");
    let prefix = format!(r#"{{"id":{id},"params":[""#);
    let suffix = r#"",1]}"#;
    let filler = UPLOAD_BYTES - prefix.len() - suffix.len();
    start.wait();
    let head = format!(
        "POST /rpc/simple.add?timeout=300 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    );
    let mut sent = 0;
    let mut write = |s: &mut TcpStream, data: &[u8]| -> std::io::Result<()> {
        let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
        chunk.extend_from_slice(data);
        chunk.extend_from_slice(b"\r\n");
        s.write_all(&chunk)?;
        sent += data.len();
        Ok(())
    };
    let piece = vec![b'x'; 64 * 1024];
    let body = (|| {
        s.write_all(head.as_bytes())?;
        write(&mut s, prefix.as_bytes())?;
        let mut left = filler;
        while left > 0 {
            let n = left.min(piece.len());
            write(&mut s, &piece[..n])?;
            left -= n;
        }
        write(&mut s, suffix.as_bytes())?;
        s.write_all(b"0\r\n\r\n")
    })();
    // A refusal comes before the whole body was taken: the write fails,
    // and the answer is there to read.
    let _ = body;
    Uploaded {
        id,
        reply: try_read_reply(&mut s).ok(),
        sent,
    }
}

#[test]
fn a_crowd_of_large_uploads_stays_within_the_buffered_bytes() {
    let _serial = serial();
    raise_fd_limit(1024);
    let host = guarded_host();
    let addr = host.http;
    let pid = host.pid().expect("the host runs");
    let rss_before = proc_status_bytes(pid, "VmRSS:");
    let start = Arc::new(Barrier::new(UPLOADS));
    let started = Instant::now();
    let uploads: Vec<JoinHandle<Uploaded>> = (0..UPLOADS)
        .map(|id| {
            let start = start.clone();
            std::thread::spawn(move || upload(addr, id, &start))
        })
        .collect();
    let ends: Vec<Uploaded> = uploads
        .into_iter()
        .map(|u| u.join().expect("an upload"))
        .collect();
    let took = started.elapsed();
    let peak = proc_status_bytes(pid, "VmHWM:");
    let rss_after = proc_status_bytes(pid, "VmRSS:");

    let status = |u: &Uploaded| u.reply.as_ref().map(|r| r.status);
    let relayed: Vec<&Uploaded> = ends.iter().filter(|u| status(u) == Some(200)).collect();
    let refused: Vec<&Uploaded> = ends.iter().filter(|u| status(u) == Some(503)).collect();
    let refused_sent: Vec<usize> = refused.iter().map(|u| u.sent).collect();
    let mut statuses = std::collections::BTreeMap::new();
    for u in &ends {
        *statuses.entry(status(u)).or_insert(0) += 1;
    }
    let buffer_full = host.metric(r#"commissaire_http_refused_total{reason="buffer_full"}"#);
    let logged = log_lines(&host, "[http] max_buffered_bytes");
    println!(
        "uploads: {UPLOADS} chunked bodies of {:.0} MB at once, in {took:.1?}: {} relayed (200), \
         {} refused (503, after {:.1} MB sent on average, {:.1} MB at most); by status {statuses:?}; \
         supervisor RSS {:.0} MB before, peak {:.0} MB (VmHWM), {:.0} MB after; \
         host: {buffer_full} counted buffer_full, {logged} log lines about max_buffered_bytes",
        mb(UPLOAD_BYTES as u64),
        relayed.len(),
        refused.len(),
        mb(refused_sent.iter().sum::<usize>() as u64) / refused.len().max(1) as f64,
        mb(refused_sent.iter().copied().max().unwrap_or(0) as u64),
        mb(rss_before),
        mb(peak),
        mb(rss_after),
    );
    assert!(
        peak < RSS_BOUND,
        "the supervisor's RSS peaked at {:.0} MB",
        mb(peak)
    );
    for u in &ends {
        let Some(reply) = &u.reply else {
            panic!("upload {} got no answer after {} bytes", u.id, u.sent);
        };
        match reply.status {
            // Relayed: the service found a string where a number goes.
            200 => {
                assert_eq!(reply.body["id"], json!(u.id), "{reply:?}");
                assert_eq!(reply.body["error"]["code"], -32602, "{reply:?}");
            }
            503 => {
                assert_eq!(reply.body["jsonrpc"], "2.0", "{reply:?}");
                assert_eq!(reply.body["id"], Value::Null, "{reply:?}");
                assert!(reply.body["error"]["code"].is_i64(), "{reply:?}");
                assert!(
                    reply.body["error"]["message"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("max_buffered_bytes"),
                    "{reply:?}"
                );
                assert_eq!(
                    reply.headers.get("retry-after").map(String::as_str),
                    Some("1"),
                    "{reply:?}"
                );
            }
            other => panic!("upload {}: status {other}: {reply:?}", u.id),
        }
    }
    assert!(!refused.is_empty(), "uploads beyond the budget get 503");
    assert!(!relayed.is_empty(), "uploads within the budget are relayed");
    assert_eq!(buffer_full, refused.len() as u64, "each refusal is counted");
    assert!(
        logged <= 2 + (took.as_secs() as usize) / 10,
        "{logged} lines about max_buffered_bytes:\n{}",
        host.stderr()
    );
    assert_eq!(
        host.metric("commissaire_http_buffered_bytes"),
        0,
        "every body's bytes are given back"
    );
    let r = send(
        addr,
        &format!(
            "POST /rpc/simple.add HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/json"
        ),
        json!({"id": 9, "params": [1, 2]}).to_string().as_bytes(),
    );
    assert_eq!((r.status, &r.body["result"]), (200, &json!(3)), "{r:?}");
    assert_no_panic(&host);
}
