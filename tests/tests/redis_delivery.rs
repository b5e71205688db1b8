//! What happens to a delivery on Redis when its consumer dies, is
//! recycled, acks late, requeues, or is asked to reply onto the
//! transport's own keys; with kombu reading our records, and workers killed
//! at random instants under load.
//!
//! The transport alone on Redis database 7, the host binary on database 6:
//! tests sharing a database run one at a time, and each checks that it
//! leaves no key behind. Needs the Python of `COMMISSAIRE_TEST_PYTHON` (or
//! `<workspace>/.venv`) with kombu for the kombu test.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use commissaire_e2e::host::{redis_command, redis_keys, redis_uri, unique, HostSpec, TestHost};
use commissaire_e2e::tally::Tally;
use commissaire_host::bus::redis::{
    binding_key, binding_permanent_key, held_key, queue_lists, RedisBus, UNACKED, UNACKED_INDEX,
    UNACKED_MUTEX,
};
use commissaire_host::bus::{channel_sink, BusTransport, Outgoing, Settle};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Tests sharing a database run one at a time.
static DB6: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static DB7: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Asserts that the database holds no key it did not hold `before`.
fn assert_nothing_left(uri: &str, before: &BTreeSet<String>) {
    let after = redis_keys(uri);
    let left: Vec<&String> = after.difference(before).collect();
    assert!(left.is_empty(), "left behind in {uri}: {left:?}");
}

/// The unacked records that name `queue` (ours: default exchange, queue).
fn records_of(uri: &str, queue: &str) -> Vec<String> {
    let all = redis_command(uri, &["HGETALL", UNACKED]).strings();
    all.chunks(2)
        .filter_map(|pair| match pair {
            [tag, stored] => serde_json::from_str::<Value>(stored)
                .ok()
                .filter(|v| v[2] == queue)
                .map(|_| tag.clone()),
            _ => None,
        })
        .collect()
}

fn message<'a>(exchange: &'a str, routing_key: &'a str, body: &'a [u8]) -> Outgoing<'a> {
    Outgoing {
        exchange,
        routing_key,
        body,
        reply_to: None,
        correlation_id: None,
        durable: false,
        confirm: false,
        expires: None,
        traceparent: None,
        deadline: None,
        reply_ttl: None,
    }
}

/// Deletes an exchange's bindings and a queue's lists.
fn forget(uri: &str, exchange: &str, queue: &str) {
    let mut del = vec![
        "DEL".to_owned(),
        binding_key(exchange),
        binding_permanent_key(exchange),
    ];
    del.extend(queue_lists(queue));
    let del: Vec<&str> = del.iter().map(String::as_str).collect();
    redis_command(uri, &del);
}

/// The next delivery of a [`channel_sink`], within 10 s.
macro_rules! next {
    ($rx:expr) => {
        tokio::time::timeout(Duration::from_secs(10), $rx.recv())
            .await
            .expect("a delivery within 10 s")
            .expect("the consumer is open")
    };
}

/// Deletes an exchange's bindings.
fn unbind(uri: &str, exchange: &str) {
    redis_command(
        uri,
        &[
            "DEL",
            &binding_key(exchange),
            &binding_permanent_key(exchange),
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_consumer_s_deliveries_come_back_and_its_late_ack_removes_nothing_of_the_next() {
    let _db = DB7.lock().await;
    let uri = redis_uri(7, "");
    let before = redis_keys(&uri);
    let (exchange, queue) = (unique("ex"), unique("q"));
    let first = RedisBus::connect_as(&uri, Some("test-first"))
        .await
        .expect("connect");
    let second = RedisBus::connect(&uri).await.expect("connect");
    first
        .declare_queue(&exchange, &queue, "t.*", &Default::default())
        .await
        .expect("bind");
    for i in 0..3 {
        let body = format!("{{\"n\": {i}}}");
        first
            .publish(message(&exchange, "t.x", body.as_bytes()))
            .await
            .expect("publish");
    }
    let (sink, rx) = channel_sink();
    let consumer = first.consume(&queue, 3, sink).await.expect("consume");
    let mut taken = Vec::new();
    for _ in 0..3 {
        taken.push(next!(rx));
    }
    consumer.stop.cancel();
    assert!(taken.iter().all(|d| !d.redelivered));
    assert_eq!(records_of(&uri, &queue).len(), 3);
    // Its three tags and its mark (see the take script).
    assert_eq!(
        redis_command(&uri, &["SCARD", &held_key("test-first")]).int(),
        4
    );

    // The first consumer "dies": what it held goes back at once, to the
    // front of the queue, marked redelivered; its held set is gone.
    let restored = second
        .restore_consumer("test-first")
        .await
        .expect("restore");
    assert_eq!(restored, 3);
    assert_eq!(redis_command(&uri, &["LLEN", &queue]).int(), 3);
    assert!(records_of(&uri, &queue).is_empty());
    assert_eq!(
        redis_command(&uri, &["EXISTS", &held_key("test-first")]).int(),
        0
    );

    // Another consumer takes them again.
    let (sink, rx) = channel_sink();
    let consumer = second.consume(&queue, 3, sink).await.expect("consume");
    let mut again = Vec::new();
    for _ in 0..3 {
        again.push(next!(rx));
    }
    consumer.stop.cancel();
    assert!(again.iter().all(|d| d.redelivered));
    let mut bodies: Vec<&[u8]> = again.iter().map(|d| d.body.as_slice()).collect();
    bodies.sort();
    assert_eq!(bodies, [b"{\"n\": 0}", b"{\"n\": 1}", b"{\"n\": 2}"]);

    // The first holder's late acks remove nothing of the new holder's.
    for d in &taken {
        d.settle(Settle::Ack).await.expect("late ack");
    }
    assert_eq!(records_of(&uri, &queue).len(), 3);
    for d in &again {
        d.settle(Settle::Ack).await.expect("ack");
    }
    assert!(records_of(&uri, &queue).is_empty());
    first.close().await;
    second.close().await;
    forget(&uri, &exchange, &queue);
    assert_nothing_left(&uri, &before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_requeue_goes_back_to_its_queue_even_once_its_binding_is_gone() {
    let _db = DB7.lock().await;
    let uri = redis_uri(7, "");
    let before = redis_keys(&uri);
    let (exchange, queue) = (unique("ex"), unique("q"));
    let bus = RedisBus::connect(&uri).await.expect("connect");
    bus.declare_queue(&exchange, &queue, "t.*", &Default::default())
        .await
        .expect("bind");
    bus.publish(message(&exchange, "t.x", b"{}"))
        .await
        .expect("publish");
    let (sink, rx) = channel_sink();
    let consumer = bus.consume(&queue, 1, sink).await.expect("consume");
    let delivery = next!(rx);
    consumer.stop.cancel();
    unbind(&uri, &exchange);
    delivery.settle(Settle::Requeue).await.expect("requeue");
    let back = redis_command(&uri, &["LRANGE", &queue, "0", "-1"]).strings();
    assert_eq!(back.len(), 1, "the requeued message is on its queue");
    let envelope: Value = serde_json::from_str(&back[0]).expect("an envelope");
    assert_eq!(envelope["headers"]["redelivered"], true);
    assert!(records_of(&uri, &queue).is_empty());

    // A record as kombu writes it (exchange and routing key), past the
    // visibility timeout, that no binding routes any more: kept, not
    // dropped as kombu's restore would.
    let tag = uuid::Uuid::new_v4().to_string();
    let record = json!([envelope, exchange, "t.x"]).to_string();
    redis_command(&uri, &["HSET", UNACKED, &tag, &record]);
    redis_command(&uri, &["ZADD", UNACKED_INDEX, "1", &tag]);
    assert_eq!(bus.restore_visible().await.expect("restore"), 0);
    assert_eq!(
        redis_command(&uri, &["HGET", UNACKED, &tag]),
        commissaire_e2e::host::Resp::Str(record)
    );
    redis_command(&uri, &["HDEL", UNACKED, &tag]);
    redis_command(&uri, &["ZREM", UNACKED_INDEX, &tag]);
    bus.close().await;
    forget(&uri, &exchange, &queue);
    assert_nothing_left(&uri, &before);
}

#[tokio::test(flavor = "multi_thread")]
async fn publishing_onto_the_transport_s_own_keys_is_refused() {
    let _db = DB7.lock().await;
    let uri = redis_uri(7, "");
    let before = redis_keys(&uri);
    let bus = RedisBus::connect(&uri).await.expect("connect");
    let hash = unique("a-hash");
    redis_command(&uri, &["HSET", &hash, "f", "v"]);
    for key in [
        UNACKED,
        UNACKED_INDEX,
        UNACKED_MUTEX,
        "_kombu.binding.anything",
        &held_key("someone"),
        &hash,
    ] {
        let kind = redis_command(&uri, &["TYPE", key]);
        let refused = bus
            .publish(message("", key, b"{}"))
            .await
            .expect_err("refused");
        assert!(refused.is_refused(), "{key}: {refused}");
        assert!(refused.to_string().contains(key), "{refused}");
        assert_eq!(redis_command(&uri, &["TYPE", key]), kind, "{key} untouched");
    }
    let list = unique("a-list");
    bus.publish(message("", &list, b"{}"))
        .await
        .expect("a list is fine");
    assert_eq!(redis_command(&uri, &["LLEN", &list]).int(), 1);

    // A lock key an older host turned into a list (by replying there) is
    // deleted by the next restore, so that restores work again.
    redis_command(&uri, &["LPUSH", UNACKED_MUTEX, "a reply"]);
    bus.restore_visible().await.expect("restore");
    assert_eq!(
        redis_command(&uri, &["TYPE", UNACKED_MUTEX]),
        commissaire_e2e::host::Resp::Str("none".to_owned())
    );
    redis_command(&uri, &["DEL", &hash, &list]);
    bus.close().await;
    assert_nothing_left(&uri, &before);
}

#[tokio::test(flavor = "multi_thread")]
async fn kombu_restores_our_deliveries_to_their_queue_and_consumes_them() {
    let _db = DB7.lock().await;
    let uri = redis_uri(7, "");
    let before = redis_keys(&uri);
    let (exchange, queue) = (unique("ex"), unique("q"));
    let bus = RedisBus::connect(&uri).await.expect("connect");
    // Two queues bound to the same key: kombu's own record would restore
    // the message onto both; ours names its queue.
    let other = unique("q-other");
    bus.declare_queue(&exchange, &queue, "t.*", &Default::default())
        .await
        .expect("bind");
    bus.declare_queue(&exchange, &other, "t.*", &Default::default())
        .await
        .expect("bind");
    bus.publish(message(&exchange, "t.x", b"{\"k\": 1}"))
        .await
        .expect("publish");
    redis_command(&uri, &["DEL", &other]);
    let (sink, rx) = channel_sink();
    let consumer = bus.consume(&queue, 1, sink).await.expect("consume");
    let delivery = next!(rx);
    consumer.stop.cancel();

    let script = r#"
import json, sys, time
import kombu
uri, queue = sys.argv[1], sys.argv[2]
with kombu.Connection(uri, transport_options={'visibility_timeout': 0.5}) as conn:
    channel = conn.default_channel
    time.sleep(1.0)
    channel.qos.restore_visible(num=100)
    message = channel.basic_get(queue)
    print(json.dumps({'body': message.body.decode(),
                      'redelivered': message.delivery_info.get('redelivered')}))
    message.ack()
"#;
    let output = Command::new(commissaire_e2e::python_with_kombu())
        .args(["-c", script, &uri, &queue])
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.trim()).expect("JSON");
    assert_eq!(seen, json!({"body": "{\"k\": 1}", "redelivered": true}));
    assert_eq!(
        redis_command(&uri, &["LLEN", &other]).int(),
        0,
        "restored onto its own queue only"
    );
    // kombu acked it; our late ack removes nothing.
    delivery.settle(Settle::Ack).await.expect("late ack");
    assert!(records_of(&uri, &queue).is_empty());
    bus.close().await;
    forget(&uri, &exchange, &queue);
    forget(&uri, &exchange, &other);
    assert_nothing_left(&uri, &before);
}

/// A caller on the host's own Redis transport: sends requests with
/// correlation ids and collects every reply, duplicates included.
struct Caller {
    bus: Arc<RedisBus>,
    exchange: String,
    reply_to: String,
    replies: mpsc::UnboundedReceiver<(String, Value)>,
    seen: HashMap<String, Vec<Value>>,
}

impl Caller {
    async fn connect(uri: &str, exchange: &str) -> Self {
        let bus = Arc::new(RedisBus::connect(uri).await.expect("connect"));
        let (reply_to, incoming) = bus
            .reply_queue(Default::default())
            .await
            .expect("reply queue");
        let (tx, replies) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(reply) = incoming.recv().await {
                let id = String::from_utf8_lossy(reply.correlation_id.as_deref().unwrap_or(b""))
                    .into_owned();
                let body = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
                if tx.send((id, body)).is_err() {
                    break;
                }
            }
        });
        Self {
            bus,
            exchange: exchange.to_owned(),
            reply_to,
            replies,
            seen: HashMap::new(),
        }
    }

    async fn send(&self, routing_key: &str, id: &str, params: Value) {
        let body = json!({"jsonrpc": "2.0", "id": id, "method": routing_key.rsplit('.').next(),
                          "params": params})
        .to_string();
        self.bus
            .publish(Outgoing {
                exchange: &self.exchange,
                routing_key,
                body: body.as_bytes(),
                reply_to: Some(&self.reply_to),
                correlation_id: Some(id.as_bytes()),
                durable: false,
                confirm: false,
                expires: None,
                traceparent: None,
                deadline: None,
                reply_ttl: None,
            })
            .await
            .expect("publish");
    }

    /// Waits until `ids` all have a reply, or `until`; returns how many
    /// are still unanswered.
    async fn wait_for(&mut self, ids: &[String], until: Instant) -> usize {
        loop {
            let missing = ids.iter().filter(|id| !self.seen.contains_key(*id)).count();
            let left = until.saturating_duration_since(Instant::now());
            if missing == 0 || left.is_zero() {
                return missing;
            }
            if let Ok(Some((id, body))) = tokio::time::timeout(left, self.replies.recv()).await {
                self.seen.entry(id).or_default().push(body);
            }
        }
    }

    /// Replies that arrive within `quiet` more (late duplicates).
    async fn drain(&mut self, quiet: Duration) {
        while let Ok(Some((id, body))) = tokio::time::timeout(quiet, self.replies.recv()).await {
            self.seen.entry(id).or_default().push(body);
        }
    }

    async fn close(self) {
        self.bus.close().await;
    }
}

fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(f).join().expect("a helper thread")
}

/// How many unacked records name `queue`, polled until `want` or 10 s.
fn wait_for_records(uri: &str, queue: &str, want: usize) {
    let started = Instant::now();
    while records_of(uri, queue).len() != want {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{want} records of {queue}: have {}",
            records_of(uri, queue).len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_s_requests_are_back_at_once_whatever_the_visibility_timeout() {
    let _db = DB6.lock().await;
    let uri = redis_uri(6, "");
    let before = redis_keys(&uri);
    {
        // kombu's default visibility timeout: one hour.
        let mut spec = HostSpec::redis(6);
        spec.plugins = vec!["demo"];
        spec.service_toml = "workers = 2\nconcurrency = 16\n".to_owned();
        let queue = spec.queue("demo");
        let host = blocking(move || TestHost::start(spec));
        let mut caller = Caller::connect(&uri, &host.spec.exchange).await;
        let started = Instant::now();
        let ids: Vec<String> = (0..40).map(|i| format!("sleep-{i}")).collect();
        for id in &ids {
            caller.send("demo.sleep", id, json!([1500])).await;
        }
        // Each worker holds 16; the other 8 wait on the queue.
        let (u, q) = (uri.clone(), queue.clone());
        blocking(move || wait_for_records(&u, &q, 32));
        let pids = host.worker_pids("demo");
        assert_eq!(pids.len(), 2, "{pids:?}");
        kill(pids[0]);
        let missing = caller
            .wait_for(&ids, started + Duration::from_secs(25))
            .await;
        let elapsed = started.elapsed();
        assert_eq!(
            missing,
            0,
            "answered within 25 s: {} of 40\n{}",
            40 - missing,
            host.stderr()
        );
        for id in &ids {
            assert_eq!(
                caller.seen[id][0]["result"], "slept",
                "{id}: {:?}",
                caller.seen[id]
            );
        }
        eprintln!("40 requests, a worker holding 16 killed: all answered in {elapsed:?}");
        assert!(
            host.stderr()
                .contains("the worker's unsettled deliveries went back to their queues"),
            "{}",
            host.stderr()
        );
        caller.close().await;
        host.signal("TERM");
        let mut host = host;
        assert!(blocking(move || host.wait(Duration::from_secs(30))).success());
    }
    assert_nothing_left(&uri, &before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recycled_worker_hands_back_what_it_held() {
    let _db = DB6.lock().await;
    let uri = redis_uri(6, "");
    let before = redis_keys(&uri);
    {
        let mut spec = HostSpec::redis(6);
        spec.plugins = vec!["demo"];
        spec.service_toml = "concurrency = 4\nhandler_timeout = 6\n".to_owned();
        spec.extra_toml = "\n[host]\nhandler_grace = 2\n".to_owned();
        let queue = spec.queue("demo");
        let host = blocking(move || TestHost::start(spec));
        let mut caller = Caller::connect(&uri, &host.spec.exchange).await;
        // Hangs: timeout reply at 6 s, the worker's recycling at 8 s, its
        // other requests handed back at 10 s (exit 75).
        let hung = vec!["hung".to_owned()];
        caller.send("demo.sleep", "hung", json!([60_000])).await;
        // Its timeout reply comes before the recycling (2 s later).
        assert_eq!(
            caller
                .wait_for(&hung, Instant::now() + Duration::from_secs(30))
                .await,
            0,
            "no timeout reply for the hung request:\n{}",
            host.stderr()
        );
        assert_eq!(caller.seen["hung"][0]["error"]["code"], -32603);
        // Taken before the recycling starts (within 2 s of the timeout
        // reply), still running when its 2 s for the requests that are not
        // hung end (5 s from anywhere in those 2 s is past them), and within
        // the timeout (6 s) when run again.
        let ids: Vec<String> = (0..3).map(|i| format!("held-{i}")).collect();
        let sent = Instant::now();
        for id in &ids {
            caller.send("demo.sleep", id, json!([5000])).await;
        }
        let (u, q) = (uri.clone(), queue.clone());
        blocking(move || wait_for_records(&u, &q, 3));
        assert!(
            !host.stderr().contains("recycling this worker"),
            "the worker was recycled before it took the requests: this test \
             shows nothing\n{}",
            host.stderr()
        );
        let missing = caller.wait_for(&ids, sent + Duration::from_secs(40)).await;
        assert_eq!(missing, 0, "{}", host.stderr());
        for id in &ids {
            assert_eq!(
                caller.seen[id][0]["result"], "slept",
                "{id}: {:?}",
                caller.seen[id]
            );
        }
        let log = host.stderr();
        assert!(log.contains("worker recycled"), "{log}");
        assert!(
            log.contains("the worker's unsettled deliveries went back to their queues"),
            "{log}"
        );
        caller.close().await;
        host.signal("TERM");
        let mut host = host;
        assert!(blocking(move || host.wait(Duration::from_secs(30))).success());
    }
    assert_nothing_left(&uri, &before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_onto_the_transport_s_own_keys_is_dropped_with_one_warning() {
    let _db = DB6.lock().await;
    let uri = redis_uri(6, "");
    let before = redis_keys(&uri);
    {
        let mut spec = HostSpec::redis(6);
        spec.plugins = vec!["simple"];
        let queue = spec.queue("simple");
        let host = blocking(move || TestHost::start(spec));
        let bus = RedisBus::connect(&uri).await.expect("connect");
        for (i, reply_to) in [UNACKED_MUTEX, UNACKED, "_kombu.binding.x"]
            .iter()
            .enumerate()
        {
            let body =
                json!({"jsonrpc": "2.0", "id": i, "method": "add", "params": [1, 2]}).to_string();
            bus.publish(Outgoing {
                reply_to: Some(reply_to),
                ..message(&host.spec.exchange, "simple.add", body.as_bytes())
            })
            .await
            .expect("publish");
        }
        let started = Instant::now();
        while !host.stderr().contains("reply refused") {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{}",
                host.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (u, q) = (uri.clone(), queue.clone());
        blocking(move || wait_for_records(&u, &q, 0));
        assert_eq!(
            redis_command(&uri, &["LLEN", &queue]).int(),
            0,
            "acked, no loop"
        );
        // All three counted (workers report every second), then: one line
        // for the three, such trouble being logged once per 10 s per kind.
        let started = Instant::now();
        while host.metric(r#"commissaire_replies_dropped_total{service="simple"}"#) < 3 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "three dropped replies not counted within 20 s:\n{}",
                host.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            host.stderr().matches("reply refused").count(),
            1,
            "one warning"
        );
        assert_eq!(
            redis_command(&uri, &["TYPE", UNACKED_MUTEX]),
            commissaire_e2e::host::Resp::Str("none".to_owned())
        );
        assert_eq!(
            redis_command(&uri, &["EXISTS", "_kombu.binding.x"]).int(),
            0
        );
        let mut caller = Caller::connect(&uri, &host.spec.exchange).await;
        caller.send("simple.add", "after", json!([2, 3])).await;
        let after = vec!["after".to_owned()];
        assert_eq!(
            caller
                .wait_for(&after, Instant::now() + Duration::from_secs(10))
                .await,
            0
        );
        assert_eq!(caller.seen["after"][0]["result"], 5);
        caller.close().await;
        bus.close().await;
        host.signal("TERM");
        let mut host = host;
        assert!(blocking(move || host.wait(Duration::from_secs(30))).success());
    }
    assert_nothing_left(&uri, &before);
}

/// xorshift: random enough for kill instants, without a crate.
struct Dice(u64);

impl Dice {
    fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        eprintln!("dice seed {seed}");
        Self(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_killed_at_random_instants_under_load_lose_nothing() {
    let _db = DB6.lock().await;
    let uri = redis_uri(6, "?visibility_timeout=3");
    let before = redis_keys(&uri);
    {
        let mut spec = HostSpec::redis(6);
        spec.bus_uri = uri.clone();
        spec.plugins = vec!["demo"];
        spec.service_toml = "workers = 3\nconcurrency = 8\nhandler_timeout = 1\n".to_owned();
        spec.extra_toml = "\n[host]\nhandler_grace = 1\n".to_owned();
        let host = Arc::new(blocking(move || TestHost::start(spec)));
        let mut caller = Caller::connect(&uri, &host.spec.exchange).await;
        let mut dice = Dice::new();
        // At least 600 requests, and on until 10 workers were killed.
        let (least, most, kills_wanted) = (600, 6000, 10);
        let ids: Vec<String> = (0..most).map(|i| format!("r{i}")).collect();
        let kills = Arc::new(std::sync::atomic::AtomicUsize::new(0));

        // The killer: a random worker, every 150 to 600 ms, while the load runs.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (killer_host, killer_stop, killed) = (host.clone(), stop.clone(), kills.clone());
        let mut killer_dice = Dice(dice.below(u64::MAX) | 1);
        let killer = std::thread::spawn(move || {
            while !killer_stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(150 + killer_dice.below(450)));
                let pids = killer_host.worker_pids("demo");
                if !pids.is_empty() {
                    kill(pids[killer_dice.below(pids.len() as u64) as usize]);
                    killed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });

        // The load: at most 48 unanswered at a time, each sleeping 0 to 30 ms.
        let started = Instant::now();
        let mut sent = 0;
        while sent < most
            && (sent < least || kills.load(std::sync::atomic::Ordering::Relaxed) < kills_wanted)
        {
            let answered = ids[..sent]
                .iter()
                .filter(|id| caller.seen.contains_key(*id))
                .count();
            if sent - answered < 48 {
                caller
                    .send("demo.sleep", &ids[sent], json!([dice.below(31)]))
                    .await;
                sent += 1;
                continue;
            }
            if let Ok(Some((id, body))) =
                tokio::time::timeout(Duration::from_secs(1), caller.replies.recv()).await
            {
                caller.seen.entry(id).or_default().push(body);
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the load did not finish:\n{}",
                host.stderr()
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        killer.join().expect("the killer");
        let kills = kills.load(std::sync::atomic::Ordering::Relaxed);
        let (total, ids) = (sent, &ids[..sent]);
        let missing = caller
            .wait_for(ids, Instant::now() + Duration::from_secs(60))
            .await;
        // Late duplicates: a killed worker's request answered again.
        caller.drain(Duration::from_secs(4)).await;
        let elapsed = started.elapsed();
        eprintln!(
            "{total} requests, {kills} workers killed at random instants in {elapsed:?}, \
             {missing} missing after 60 s"
        );
        let mut tally = Tally::new(total);
        for id in ids {
            tally.sent(id.clone());
        }
        for (id, replies) in &caller.seen {
            for reply in replies {
                tally.reply(id.clone(), reply.clone(), false);
            }
        }
        // At least once: what a killed worker answered but had not acked
        // yet is answered again, at most its 8 slots per kill.
        tally
            .judge("workers killed at random instants", |_, reply| {
                (reply["result"] == "slept").then_some("slept")
            })
            .with_context(host.stderr())
            .lost_none()
            .errors_exactly(0)
            .duplicated_at_most(kills * 8, "8 slots per killed worker");
        assert!(kills >= kills_wanted, "only {kills} kills");
        caller.close().await;
        host.signal("TERM");
        let Ok(mut host) = Arc::try_unwrap(host) else {
            panic!("the host is still shared");
        };
        assert!(blocking(move || host.wait(Duration::from_secs(30))).success());
    }
    assert_nothing_left(&uri, &before);
}

/// A caller that gave up leaves its reply list unread: the host's replies
/// there expire (an hour after the last push) instead of piling up for
/// ever. Database 11, its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_reply_list_its_caller_abandoned_expires() {
    let uri = redis_uri(11, "");
    let before = redis_keys(&uri);
    {
        let mut spec = HostSpec::redis(11);
        spec.plugins = vec!["simple"];
        let host = blocking(move || TestHost::start(spec));
        let bus = RedisBus::connect(&uri).await.expect("connect");
        let abandoned = unique("abandoned-reply");
        for i in 0..3 {
            let body =
                json!({"jsonrpc": "2.0", "id": i, "method": "add", "params": [i, 1]}).to_string();
            bus.publish(Outgoing {
                reply_to: Some(&abandoned),
                ..message(&host.spec.exchange, "simple.add", body.as_bytes())
            })
            .await
            .expect("publish");
        }
        let started = Instant::now();
        while redis_command(&uri, &["LLEN", &abandoned]).int() < 3 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "3 replies not pushed: {}",
                host.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ttl = redis_command(&uri, &["PTTL", &abandoned]).int();
        eprintln!("abandoned reply list: 3 replies, PTTL {ttl} ms");
        assert!(
            (3_000_000..=3_600_000).contains(&ttl),
            "the reply list expires in about an hour, not {ttl} ms"
        );
        redis_command(&uri, &["DEL", &abandoned]);
        bus.close().await;
    }
    assert_nothing_left(&uri, &before);
}
