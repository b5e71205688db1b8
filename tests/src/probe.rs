//! What the tests of documented behaviour look through: an AMQP caller
//! that keeps every property of a reply, a TCP proxy a test can cut to
//! play a broker outage without touching the machine's broker, and the
//! command line and environment of a running process.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde_json::Value;

use crate::host::{amqp_uri, unique, HostSpec};

/// Polls `ok` every 50 ms until it holds; panics naming `what` after
/// `limit`.
pub fn wait_for(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A message as it arrived: its body and all its properties.
#[derive(Debug)]
pub struct Arrived {
    /// The body, decoded.
    pub body: Value,
    /// Its properties (delivery mode, headers, …).
    pub properties: BasicProperties,
}

impl Arrived {
    /// A string header, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        let headers = self.properties.headers().as_ref()?;
        match headers.inner().get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            _ => None,
        }
    }
}

/// A caller on the test broker waiting on an exclusive, server-named
/// queue; sending and receiving are separate, so a test can act between
/// them.
pub struct RawCaller {
    conn: Connection,
    channel: Channel,
    exchange: String,
    reply_queue: String,
    replies: Consumer,
}

impl std::fmt::Debug for RawCaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawCaller")
            .field("exchange", &self.exchange)
            .field("reply_queue", &self.reply_queue)
            .finish_non_exhaustive()
    }
}

impl RawCaller {
    /// Connects to the test broker, publishing to `exchange`.
    pub async fn connect(exchange: &str) -> Self {
        let conn = Connection::connect(&amqp_uri(), ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = conn.create_channel().await.expect("channel");
        // Confirms: once `send` returns, the request is in its queue.
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        };
        let q = channel
            .queue_declare("".into(), exclusive, FieldTable::default())
            .await
            .expect("declare the reply queue");
        let replies = channel
            .basic_consume(
                q.name().as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume the reply queue");
        Self {
            conn,
            channel,
            exchange: exchange.to_owned(),
            reply_queue: q.name().to_string(),
            replies,
        }
    }

    /// The queue it waits on.
    pub fn reply_queue(&self) -> &str {
        &self.reply_queue
    }

    /// Publishes `body` on `routing_key` with its reply queue as
    /// `reply_to`, and `traceparent` as a header when given; returns once
    /// the broker confirmed it.
    pub async fn send(&self, routing_key: &str, body: &Value, traceparent: Option<&str>) {
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_reply_to(self.reply_queue.as_str().into());
        if let Some(t) = traceparent {
            let mut headers = FieldTable::default();
            headers.insert("traceparent".into(), AMQPValue::LongString(t.into()));
            properties = properties.with_headers(headers);
        }
        self.channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("publish confirm");
    }

    /// The next message on its queue, within `limit`.
    pub async fn next(&mut self, limit: Duration) -> Arrived {
        let delivery = tokio::time::timeout(limit, self.replies.next())
            .await
            .unwrap_or_else(|_| panic!("no reply within {limit:?}"))
            .expect("the reply consumer is open")
            .expect("a delivery");
        Arrived {
            body: serde_json::from_slice(&delivery.data).expect("a JSON reply"),
            properties: delivery.properties,
        }
    }

    /// The next message, or `None` when none came within `limit`.
    pub async fn next_within(&mut self, limit: Duration) -> Option<Arrived> {
        let delivery = tokio::time::timeout(limit, self.replies.next())
            .await
            .ok()?
            .expect("the reply consumer is open")
            .expect("a delivery");
        Some(Arrived {
            body: serde_json::from_slice(&delivery.data).expect("a JSON reply"),
            properties: delivery.properties,
        })
    }

    /// Closes its connection (its reply queue goes with it).
    pub async fn close(self) {
        let _ = self.conn.close(200, "bye".into()).await;
    }
}

/// The ready messages of `queue` on the test broker (a passive
/// declaration: fails if the queue does not exist).
pub async fn ready_messages(queue: &str) -> u32 {
    let conn = Connection::connect(&amqp_uri(), ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = conn.create_channel().await.expect("channel");
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("queue {queue} is not there: {e}"));
    let _ = conn.close(200, "bye".into()).await;
    q.message_count()
}

/// A TCP proxy on a port of its own to `target`: what a host connects
/// through when a test must take its broker away (and give it back)
/// without touching the broker itself. Closed on drop.
#[derive(Debug)]
pub struct CuttableProxy {
    /// Where to connect.
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl CuttableProxy {
    /// Listens on a free loopback port, forwarding to `target`.
    pub fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let proxy = Self {
            addr,
            cut: Arc::new(AtomicBool::new(false)),
            closed: Arc::new(AtomicBool::new(false)),
            open: Arc::new(Mutex::new(Vec::new())),
        };
        let (cut, closed, open) = (proxy.cut.clone(), proxy.closed.clone(), proxy.open.clone());
        std::thread::spawn(move || {
            while !closed.load(Ordering::Acquire) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    Err(_) => continue,
                };
                if cut.load(Ordering::Acquire) {
                    // The broker is "down": the connection ends at once.
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let mut tracked = open.lock().unwrap_or_else(PoisonError::into_inner);
                for stream in [&client, &server] {
                    if let Ok(s) = stream.try_clone() {
                        tracked.push(s);
                    }
                }
                drop(tracked);
                pipe(&client, &server);
                pipe(&server, &client);
            }
        });
        proxy
    }

    /// Takes the broker away: open connections end, new ones are closed
    /// as soon as they are accepted.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        for stream in open.drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Gives it back: new connections reach the broker again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::Release);
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
        self.cut();
    }
}

/// Copies `from` to `to` on a thread of its own until either side ends.
fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// The arguments process `pid` runs with (`/proc/<pid>/cmdline`).
pub fn cmdline(pid: u32) -> Vec<String> {
    nul_separated(&format!("/proc/{pid}/cmdline"))
}

/// The environment process `pid` started with (`/proc/<pid>/environ`),
/// as `NAME=value` entries.
pub fn environ(pid: u32) -> Vec<String> {
    nul_separated(&format!("/proc/{pid}/environ"))
}

fn nul_separated(path: &str) -> Vec<String> {
    let raw = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    raw.split(|b| *b == 0)
        .filter(|part| !part.is_empty())
        .map(|part| String::from_utf8_lossy(part).into_owned())
        .collect()
}

/// The value of one series of the `/metrics` at `addr`, named as rendered
/// (`name{labels}`); `None` when the scrape has no such series.
pub fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let (status, text) = crate::host::http_get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "GET /metrics: {text}");
    let text = text.as_str().unwrap_or_default().to_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{series}: not a number: {v}"))
        })
}

/// The address of the test broker `amqp_uri` names.
pub fn amqp_addr() -> SocketAddr {
    let uri = amqp_uri();
    let authority = authority(&uri);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    host_port
        .parse()
        .unwrap_or_else(|e| panic!("{host_port} (from {uri}) is not an address: {e}"))
}

/// The test broker's URI with `proxy` in place of the broker's address.
pub fn amqp_uri_via(proxy: &CuttableProxy) -> String {
    let uri = amqp_uri();
    let authority = authority(&uri);
    let via = match authority.rsplit_once('@') {
        Some((userinfo, _)) => format!("{userinfo}@{}", proxy.addr),
        None => proxy.addr.to_string(),
    };
    uri.replacen(authority, &via, 1)
}

fn authority(uri: &str) -> &str {
    let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// [`wait_for`], naming what `host` logged when `ok` never holds.
pub fn wait_for_host(
    host: &crate::host::TestHost,
    limit: Duration,
    what: &str,
    mut ok: impl FnMut() -> bool,
) {
    let started = Instant::now();
    while !ok() {
        assert!(
            started.elapsed() < limit,
            "{what}: not within {limit:?}; the host logged:\n{}",
            host.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A host spec on RabbitMQ serving `plugins`, with names of its own
/// (`gap-…`).
pub fn spec(plugins: &[&'static str]) -> HostSpec {
    HostSpec {
        plugins: plugins.to_vec(),
        suffix: unique("gap"),
        exchange: unique("gap-ex"),
        ..HostSpec::amqp()
    }
}

/// A JSON-RPC 2.0 request body.
pub fn request(id: &str, method: &str, params: Value) -> Value {
    serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}
