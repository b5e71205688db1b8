//! The HTTP endpoint as an attacker meets it, on the real binary and a real
//! RabbitMQ: bearer token, allow-list, JSON only, CORS only when asked,
//! checked numbers and names, limits on bodies, requests and connections,
//! clients that never finish their headers or walk away before the reply.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use commissaire_e2e::host::{amqp_uri, unique, HostSpec, TestHost};
use commissaire_e2e::http::{read_reply, send, try_send, Reply};
use commissaire_e2e::{host_bin, plugin_dir};
use serde_json::{json, Value};

const TOKEN: &str = "t0ken-for-the-http-tests";

/// A queue bound to `pattern` that nobody consumes: requests routed there
/// wait for their timeout (the host's requests are mandatory, so a key no
/// queue is bound to would be answered at once). Deleted on drop.
struct Parked {
    queue: String,
}

impl Parked {
    fn new(exchange: &str, pattern: &str) -> Self {
        let queue = unique("parked");
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            let conn = lapin::Connection::connect(&amqp_uri(), Default::default())
                .await
                .expect("connect");
            let ch = conn.create_channel().await.expect("channel");
            ch.queue_declare(
                queue.as_str().into(),
                Default::default(),
                Default::default(),
            )
            .await
            .expect("declare");
            ch.queue_bind(
                queue.as_str().into(),
                exchange.into(),
                pattern.into(),
                Default::default(),
                Default::default(),
            )
            .await
            .expect("bind");
            let _ = conn.close(200, "bye".into()).await;
        });
        Self { queue }
    }
}

impl Parked {
    /// The requests waiting in the queue.
    fn messages(&self) -> u32 {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            let conn = lapin::Connection::connect(&amqp_uri(), Default::default())
                .await
                .expect("connect");
            let ch = conn.create_channel().await.expect("channel");
            let queue = ch
                .queue_declare(
                    self.queue.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    Default::default(),
                )
                .await
                .expect("declare");
            let _ = conn.close(200, "bye".into()).await;
            queue.message_count()
        })
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        commissaire_e2e::host::cleanup_broker("", std::slice::from_ref(&self.queue));
    }
}

/// `POST path` with `headers` (each `Name: value`) and `body`.
fn post(addr: SocketAddr, path: &str, headers: &[&str], body: &Value) -> Reply {
    let mut head = format!("POST {path} HTTP/1.1");
    for h in headers {
        head.push_str("\r\n");
        head.push_str(h);
    }
    send(addr, &head, body.to_string().as_bytes())
}

const JSON: &str = "Content-Type: application/json";

fn bearer() -> String {
    format!("Authorization: Bearer {TOKEN}")
}

/// What `/healthz` says of the requests waiting for their reply.
fn pending(host: &TestHost) -> Option<u64> {
    host.health().1["pending_requests"].as_u64()
}

fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_no_panic(host: &TestHost) {
    let log = host.stderr();
    assert!(!log.contains("panicked"), "a panic in the log:\n{log}");
}

#[test]
fn a_guarded_endpoint_answers_each_refusal_with_its_status() {
    let nobody = unique("nobody");
    let mut spec = HostSpec::amqp();
    spec.env = vec![("COMMISSAIRE_HTTP_TOKEN".to_owned(), TOKEN.to_owned())];
    spec.http_toml = format!(
        "allow = [\"simple.*\", \"demo.ping\", \"demo.relay\", \"{nobody}.#\"]\nmax_in_flight = 2\n"
    );
    spec.bus_toml = "max_message_bytes = 1024\n".to_owned();
    let host = TestHost::start(spec);
    let _parked = Parked::new(&host.spec.exchange, &format!("{nobody}.#"));
    let addr = host.http;
    let add = json!({"id": 1, "params": [1, 2]});

    // /healthz is open and tells nothing secret.
    let (status, health) = host.health();
    assert_eq!(status, 200);
    assert_eq!(health["pending_requests"], 0);
    let text = health.to_string();
    for secret in [TOKEN, "guest", "5672"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }

    // The token.
    let r = post(addr, "/rpc/simple.add", &[JSON], &add);
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(
        r.headers.get("www-authenticate").map(String::as_str),
        Some("Bearer")
    );
    for wrong in [
        "Authorization: Bearer wrong".to_owned(),
        format!("Authorization: Basic {TOKEN}"),
        format!("Authorization: Bearer {}", &TOKEN[..TOKEN.len() - 1]),
    ] {
        let r = post(addr, "/rpc/simple.add", &[JSON, &wrong], &add);
        assert_eq!(r.status, 401, "{wrong}: {r:?}");
    }
    let r = post(addr, "/rpc/simple.add", &[JSON, &bearer()], &add);
    assert_eq!((r.status, &r.body["result"]), (200, &json!(3)), "{r:?}");
    let auth = bearer();
    let ok = [JSON, auth.as_str()];

    // The allow-list.
    let r = post(addr, "/rpc/demo.greet", &ok, &json!({"id": 1}));
    assert_eq!(r.status, 403, "{r:?}");
    let r = post(addr, "/rpc/demo.ping", &ok, &json!({}));
    assert_eq!(r.status, 202, "{r:?}");

    // Only JSON bodies: a browser's no-CORS fetch or form post is refused,
    // and no CORS header is ever sent when no origin is configured.
    for content_type in [
        Some("Content-Type: text/plain;charset=UTF-8"),
        Some("Content-Type: application/x-www-form-urlencoded"),
        Some("Content-Type: multipart/form-data; boundary=x"),
        None,
    ] {
        let mut headers = vec![auth.as_str(), "Origin: https://evil.example"];
        headers.extend(content_type);
        let r = post(addr, "/rpc/simple.add", &headers, &add);
        assert_eq!(r.status, 415, "{content_type:?}: {r:?}");
        assert!(
            !r.headers.contains_key("access-control-allow-origin"),
            "{r:?}"
        );
    }
    let r = post(
        addr,
        "/rpc/simple.add",
        &[
            auth.as_str(),
            "Content-Type: application/json; charset=utf-8",
            "Origin: https://evil.example",
        ],
        &add,
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        !r.headers.contains_key("access-control-allow-origin"),
        "{r:?}"
    );
    let r = send(
        addr,
        &format!("OPTIONS /rpc/simple.add HTTP/1.1\r\nOrigin: https://evil.example\r\nAccess-Control-Request-Method: POST\r\n{auth}"),
        b"",
    );
    assert_ne!(r.status / 100, 2, "{r:?}");
    assert!(
        !r.headers.contains_key("access-control-allow-origin"),
        "{r:?}"
    );

    // Every number from the request is checked.
    for bad in ["1e20", "0", "-1", "300.5", "abc", "NaN", "inf"] {
        let r = post(addr, &format!("/rpc/simple.add?timeout={bad}"), &ok, &add);
        assert_eq!(r.status, 400, "timeout={bad}: {r:?}");
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("timeout"),
            "{r:?}"
        );
    }
    let r = post(addr, "/rpc/simple.add?timeout=300", &ok, &add);
    assert_eq!(r.status, 200, "{r:?}");
    let r = post(addr, &format!("/rpc/{nobody}.x?timeout=0.2"), &ok, &add);
    assert_eq!(r.status, 504, "{r:?}");

    // And every name: a routing key AMQP cannot carry is a 400, before the
    // allow-list is even consulted; from a handler, an error reply.
    let long = format!("simple.{}", "a".repeat(250));
    let r = post(addr, &format!("/rpc/{long}"), &ok, &add);
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("at most 255"));
    let r = post(addr, "/rpc/simple.a%0Ad", &ok, &add);
    assert_eq!(r.status, 400, "{r:?}");
    let r = post(
        addr,
        "/rpc/demo.relay",
        &ok,
        &json!({"id": 7, "params": [long, [1]]}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["error"]["code"], -32603, "{r:?}");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("at most 255"));

    // Bodies over [bus] max_message_bytes, declared or chunked.
    let big = json!({"id": 1, "params": ["x".repeat(2000)]});
    let r = post(addr, "/rpc/simple.add", &ok, &big);
    assert_eq!(r.status, 413, "{r:?}");
    let mut stream = TcpStream::connect(addr).unwrap();
    let mut chunked = format!(
        "POST /rpc/simple.add HTTP/1.1\r\nHost: x\r\n{JSON}\r\n{auth}\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    for chunk in big.to_string().as_bytes().chunks(100) {
        chunked.push_str(&format!(
            "{:x}\r\n{}\r\n",
            chunk.len(),
            String::from_utf8_lossy(chunk)
        ));
    }
    chunked.push_str("0\r\n\r\n");
    // The refusal may come before the last chunk is taken.
    let _ = stream.write_all(chunked.as_bytes());
    let r = read_reply(&mut stream);
    assert_eq!(r.status, 413, "{r:?}");

    // [http] max_in_flight = 2: a third request waits for nobody.
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let path = format!("/rpc/{nobody}.wait?timeout=3");
            let auth = auth.clone();
            std::thread::spawn(move || post(addr, &path, &[JSON, &auth], &json!({"id": 1})).status)
        })
        .collect();
    wait_until(Duration::from_secs(10), "two requests in flight", || {
        pending(&host) == Some(2)
    });
    let r = post(addr, "/rpc/simple.add", &ok, &add);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.headers.get("retry-after").map(String::as_str), Some("1"));
    for w in waiting {
        assert_eq!(w.join().unwrap(), 504);
    }
    let r = post(addr, "/rpc/simple.add", &ok, &add);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(pending(&host), Some(0));
    assert_no_panic(&host);
}

#[test]
fn cors_headers_only_for_listed_origins() {
    let mut spec = HostSpec::amqp();
    spec.http_toml = "cors_origins = [\"https://ops.example.com\"]\n".to_owned();
    let host = TestHost::start(spec);
    let addr = host.http;
    let preflight = |origin: &str| {
        send(
            addr,
            &format!(
                "OPTIONS /rpc/simple.add HTTP/1.1\r\nOrigin: {origin}\r\n\
                 Access-Control-Request-Method: POST\r\n\
                 Access-Control-Request-Headers: authorization, content-type"
            ),
            b"",
        )
    };
    let r = preflight("https://ops.example.com");
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(
        r.headers
            .get("access-control-allow-origin")
            .map(String::as_str),
        Some("https://ops.example.com")
    );
    assert_eq!(
        r.headers
            .get("access-control-allow-methods")
            .map(String::as_str),
        Some("POST")
    );
    let r = preflight("https://evil.example");
    assert_eq!(r.status, 403, "{r:?}");
    assert!(
        !r.headers.contains_key("access-control-allow-origin"),
        "{r:?}"
    );

    let add = json!({"id": 1, "params": [1, 2]});
    let r = post(
        addr,
        "/rpc/simple.add",
        &[JSON, "Origin: https://ops.example.com"],
        &add,
    );
    assert_eq!((r.status, &r.body["result"]), (200, &json!(3)), "{r:?}");
    assert_eq!(
        r.headers
            .get("access-control-allow-origin")
            .map(String::as_str),
        Some("https://ops.example.com")
    );
    let r = post(
        addr,
        "/rpc/simple.add",
        &[JSON, "Origin: https://evil.example"],
        &add,
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        !r.headers.contains_key("access-control-allow-origin"),
        "{r:?}"
    );
    // A listed origin still cannot post what a form can.
    let r = post(
        addr,
        "/rpc/simple.add",
        &[
            "Content-Type: text/plain",
            "Origin: https://ops.example.com",
        ],
        &add,
    );
    assert_eq!(r.status, 415, "{r:?}");
    assert_no_panic(&host);
}

#[test]
fn clients_that_never_finish_their_headers_do_not_starve_a_real_request() {
    let host = TestHost::start(HostSpec::amqp());
    let addr = host.http;
    let mut slow: Vec<TcpStream> = (0..400)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(b"POST /rpc/simple.add HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
                .expect("half a head");
            s
        })
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = post(
            addr,
            "/rpc/simple.add",
            &[JSON],
            &json!({"id": 1, "params": [1, 2]}),
        );
        let _ = tx.send(r);
    });
    let r = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the real request is answered while 400 heads hang");
    assert_eq!((r.status, &r.body["result"]), (200, &json!(3)), "{r:?}");
    // The endpoint closes the hanging connections on its own.
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0; 64];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("a hanging head was not closed: {other:?}"),
        }
    }
    assert_no_panic(&host);
}

#[test]
fn ten_thousand_abandoned_requests_leave_no_pending_entry() {
    let host = TestHost::start(HostSpec::amqp());
    let addr = host.http;
    let key = format!("{}.x", unique("nobody"));
    let _parked = Parked::new(&host.spec.exchange, &key);
    let request = format!(
        "POST /rpc/{key}?timeout=300 HTTP/1.1\r\nHost: x\r\n{JSON}\r\nContent-Length: 8\r\n\r\n{{\"id\":1}}"
    );
    const BATCH: usize = 500;
    for batch in 0..20 {
        let clients: Vec<TcpStream> = (0..BATCH)
            .map(|_| {
                let mut s = TcpStream::connect(addr).expect("connect");
                s.write_all(request.as_bytes()).expect("send");
                s
            })
            .collect();
        // Every request is waiting for its reply...
        wait_until(Duration::from_secs(20), "a batch pending", || {
            pending(&host) == Some(BATCH as u64)
        });
        // ...when its client walks away.
        drop(clients);
        wait_until(
            Duration::from_secs(20),
            &format!("batch {batch}: pending entries removed"),
            || pending(&host) == Some(0),
        );
    }
    assert_eq!(pending(&host), Some(0));
    let r = post(
        addr,
        "/rpc/simple.add",
        &[JSON],
        &json!({"id": 1, "params": [1, 2]}),
    );
    assert_eq!(r.status, 200, "in-flight slots are free again: {r:?}");
    assert_no_panic(&host);
}

/// The value of `series`, scraped on `stream`, which stays open: one
/// request, its answer read to its length (or its last chunk).
fn metric_kept(stream: &mut TcpStream, series: &str) -> Option<u64> {
    use std::io::BufRead as _;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut reader = std::io::BufReader::new(&mut *stream);
    let (mut length, mut chunked) = (None, false);
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end().to_ascii_lowercase();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        }
        chunked |= line.starts_with("transfer-encoding:") && line.contains("chunked");
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).ok()?;
            let size = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        body.resize(length?, 0);
        reader.read_exact(&mut body).ok()?;
    }
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Whether the endpoint closed (or reset) `stream`, waiting at most
/// `patience` for it.
fn closed_by_the_endpoint(stream: &mut TcpStream, patience: Duration) -> bool {
    stream
        .set_read_timeout(Some(patience))
        .expect("a read timeout");
    let mut buf = [0; 16];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn at_max_connections_the_longest_wait_makes_room_unless_all_are_served() {
    let mut spec = HostSpec::amqp();
    spec.http_toml = "max_connections = 5\n".to_owned();
    let host = TestHost::start(spec);
    let addr = host.http;
    let add = json!({"id": 1, "params": [1, 2]}).to_string();
    let rpc = |addr| {
        try_send(
            addr,
            &format!("POST /rpc/simple.add HTTP/1.1\r\n{JSON}"),
            add.as_bytes(),
        )
    };

    // Four connections that never send a byte, beside the scrape's own,
    // kept open: a scrape on a connection of its own would linger after
    // its client closed it, until the endpoint read its end, and be what
    // the next admission evicts. Its last answer comes once the four are
    // admitted: idle since then, it is younger than all four.
    let mut scraper = TcpStream::connect(addr).expect("connect");
    wait_until(Duration::from_secs(10), "no other connection", || {
        metric_kept(&mut scraper, "commissaire_http_connections") == Some(1)
    });
    let mut waiting: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    wait_until(Duration::from_secs(10), "the four admitted", || {
        metric_kept(&mut scraper, "commissaire_http_connections") == Some(5)
    });
    let r = rpc(addr).expect("a request past four waiting connections");
    assert_eq!((r.status, &r.body["result"]), (200, &json!(3)), "{r:?}");
    assert!(
        closed_by_the_endpoint(&mut waiting[0], Duration::from_secs(5)),
        "the oldest waiting connection was not evicted"
    );
    // The younger three stay open.
    for s in &mut waiting[1..] {
        s.set_nonblocking(true).unwrap();
        let mut buf = [0; 16];
        let read = s.read(&mut buf);
        assert!(
            matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a younger waiting connection was closed: {read:?}"
        );
    }
    // One eviction counted, that one. Read on the scrape's connection:
    // a scrape on a new one would be admitted at max_connections, and
    // make room by evicting another.
    assert_eq!(
        metric_kept(
            &mut scraper,
            r#"commissaire_http_refused_total{reason="evicted"}"#
        ),
        Some(1)
    );
    drop(waiting);
    drop(scraper);
    wait_until(
        Duration::from_secs(10),
        "the waiting connections gone",
        || host.metric("commissaire_http_connections") == 1,
    );

    // Five connections serving requests (waiting for a reply nobody
    // sends): never evicted, so a sixth is closed at once.
    let key = format!("{}.x", unique("nobody"));
    let parked = Parked::new(&host.spec.exchange, &key);
    let request = format!(
        "POST /rpc/{key}?timeout=60 HTTP/1.1\r\nHost: x\r\n{JSON}\r\nContent-Length: 8\r\n\r\n{{\"id\":1}}"
    );
    let serving: Vec<TcpStream> = (0..5)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(request.as_bytes()).expect("send");
            s
        })
        .collect();
    wait_until(Duration::from_secs(10), "five requests relayed", || {
        parked.messages() == 5
    });
    let mut extra = TcpStream::connect(addr).expect("the kernel still accepts");
    assert!(
        closed_by_the_endpoint(&mut extra, Duration::from_secs(5)),
        "a sixth connection was kept"
    );
    drop(serving);
    wait_until(Duration::from_secs(10), "a place free again", || {
        rpc(addr).is_ok_and(|r| r.status == 200)
    });
    assert!(host.metric(r#"commissaire_http_refused_total{reason="evicted"}"#) >= 1);
    assert!(host.metric(r#"commissaire_http_refused_total{reason="connections_full"}"#) >= 1);
    assert!(
        host.stderr().contains("max_connections"),
        "the limit is logged"
    );
    assert_no_panic(&host);
}

/// `unshare`'s arguments for a network namespace of the process's own (a
/// user namespace too when not root).
fn own_network_namespace() -> &'static [&'static str] {
    use std::os::unix::fs::MetadataExt as _;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if root {
        &["--net"]
    } else {
        &["--net", "--map-root-user"]
    }
}

#[test]
fn listening_beyond_loopback_without_a_token_warns() {
    let help = Command::new(host_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("COMMISSAIRE_HTTP_TOKEN"),
        "run --help names the token's variable"
    );
    let plugins = plugin_dir(&["simple"]);
    for token in [None, Some(TOKEN)] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr.log");
        // In a network namespace of its own: 0.0.0.0 there is reachable
        // from nowhere, so an endpoint without a token is open to no one.
        let mut command = Command::new("unshare");
        command
            .args(own_network_namespace())
            .arg(host_bin())
            .args(["run", "--bus-uri", "memory://", "--plugins-dir"])
            .arg(plugins.path())
            .args(["--http-listen", "0.0.0.0:0"])
            .env_remove("COMMISSAIRE_HTTP_TOKEN")
            .env("COMMISSAIRE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(t) = token {
            command.env("COMMISSAIRE_HTTP_TOKEN", t);
        }
        let mut child = command.spawn().unwrap();
        let read = || std::fs::read_to_string(&log).unwrap_or_default();
        wait_until(Duration::from_secs(20), "the endpoint ready", || {
            read().contains("HTTP endpoint ready")
        });
        let _ = child.kill();
        let _ = child.wait();
        let text = read();
        assert_eq!(
            text.contains("without a token"),
            token.is_none(),
            "token {token:?}:\n{text}"
        );
        assert!(!text.contains(TOKEN), "the token is never logged:\n{text}");
    }
}

#[test]
fn call_and_notify_check_the_timeout_and_the_routing_key() {
    let long = format!("simple.{}", "a".repeat(250));
    let cases: [(&[&str], &str); 5] = [
        (
            &["call", "simple.add", "[1,2]", "--timeout", "1e20"],
            "at most 300 seconds",
        ),
        (
            &["call", "simple.add", "[1,2]", "--timeout", "0"],
            "at most 300 seconds",
        ),
        (&["call", &long, "[1,2]"], "at most 255 can be sent"),
        (&["notify", &long, "[1,2]"], "at most 255 can be sent"),
        (&["notify", "demo.pi\nng"], "control character"),
    ];
    for (args, expected) in cases {
        let out = Command::new(host_bin())
            .args(args)
            .args(["--bus-uri", &amqp_uri()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
