//! `redis://` and `rediss://`: kombu's Redis transport, on the wire.
//!
//! What kombu (5.x, `kombu/transport/redis.py` on top of
//! `kombu/transport/virtual/`) keeps in Redis, and so what we keep:
//!
//! - a message is a JSON envelope `{"body", "content-encoding",
//!   "content-type", "headers", "properties"}`; the body is base64
//!   (`properties.body_encoding = "base64"`), `properties` holds `reply_to`,
//!   `correlation_id`, `delivery_mode`, `delivery_info {exchange,
//!   routing_key}`, `priority` and a uuid `delivery_tag`;
//! - exchanges exist only in their clients; a binding is a member
//!   `routing_key ␆␖ regex ␆␖ queue` of the set `_kombu.binding.<exchange>`
//!   (and of `_kombu.binding_permanent.<exchange>`, which keeps kombu ≥ 5.6
//!   from sweeping the table), and the *publisher* routes: it reads the set,
//!   matches, and `LPUSH`es the envelope onto each queue's list; the default
//!   exchange `""` pushes onto the list named by the routing key, which is
//!   how a reply reaches a kombu `SimpleQueue`;
//! - a queue is up to four lists, `q`, `q␆␖3`, `q␆␖6`, `q␆␖9` (priority
//!   steps), consumed with one `BRPOP` over all four, in that order;
//! - a consumer records each delivery in the hash `unacked` (tag →
//!   `[envelope, exchange, routing_key]`) and the sorted set `unacked_index`
//!   (tag → time) until it acks; entries older than the visibility timeout
//!   are pushed back onto their queues by whichever consumer runs
//!   `restore_visible` (under the lock `unacked_mutex`), so a worker that
//!   dies before acking loses nothing.
//!
//! The visibility timeout (kombu's transport option, default 3600 s) comes
//! from the URI query: `redis://host:6379/0?visibility_timeout=30`; so does
//! `unacked_restore_interval` (seconds between our restore sweeps; default
//! half the visibility timeout, between 0.5 and 10 s).

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client, RedisError, Script};
use async_trait::async_trait;
use base64::Engine as _;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{
    Acker, BusError, BusTransport, Consumer, Incoming, Outgoing, PrefetchSlots, Settle, Sink,
};
use crate::redact::{redact_uri, scrub};

/// kombu's separator inside binding members and priority queue names.
pub const SEP: &str = "\x06\x16";
/// kombu's priority steps: one list per step, consumed in this order.
pub const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];
/// The hash of unacked deliveries.
pub const UNACKED: &str = "unacked";
/// The sorted set of unacked delivery tags, scored by delivery time.
pub const UNACKED_INDEX: &str = "unacked_index";
/// The lock held while restoring.
pub const UNACKED_MUTEX: &str = "unacked_mutex";
/// kombu's `unacked_mutex_expire`.
const UNACKED_MUTEX_EXPIRE: Duration = Duration::from_secs(300);
/// kombu's `brpop_timeout`: how long one `BRPOP` blocks, so how soon a
/// stopped consumer notices.
const BRPOP_TIMEOUT_SECS: u64 = 1;
/// kombu's default visibility timeout.
const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(3600);

/// The set holding the bindings of `exchange`.
pub fn binding_key(exchange: &str) -> String {
    format!("_kombu.binding.{exchange}")
}

/// The set of bindings kombu ≥ 5.6 must never sweep.
pub fn binding_permanent_key(exchange: &str) -> String {
    format!("_kombu.binding_permanent.{exchange}")
}

/// The list holding `queue`'s messages of priority step `step`.
pub fn priority_list(queue: &str, step: u8) -> String {
    if step == 0 {
        queue.to_owned()
    } else {
        format!("{queue}{SEP}{step}")
    }
}

/// Every list of `queue`, in `BRPOP` order.
pub fn queue_lists(queue: &str) -> Vec<String> {
    PRIORITY_STEPS
        .iter()
        .map(|step| priority_list(queue, *step))
        .collect()
}

/// The step of a message priority, as kombu's `Channel.priority` (clamped
/// to 0..=9, rounded down to a step).
fn priority_step(priority: i64) -> u8 {
    let p = u8::try_from(priority.clamp(0, 9)).unwrap_or(0);
    PRIORITY_STEPS
        .iter()
        .copied()
        .filter(|step| *step <= p)
        .max()
        .unwrap_or(0)
}

/// The binding member kombu's topic exchange stores: routing key, the regex
/// kombu matches with (`TopicExchange.key_to_pattern`), queue.
pub fn binding_member(routing_key: &str, queue: &str) -> String {
    format!(
        "{routing_key}{SEP}{}{SEP}{queue}",
        super::topic::kombu_regex(routing_key)
    )
}

/// Whether a binding member routes `routing_key`: a member with a pattern
/// was bound to a topic exchange (kombu's regex semantics), one without to
/// a direct exchange (equal keys).
fn member_routes(member: &str, routing_key: &str) -> Option<String> {
    let mut parts = member.splitn(3, SEP);
    let (key, pattern, queue) = (parts.next()?, parts.next()?, parts.next()?);
    let routed = if pattern.is_empty() {
        key == routing_key
    } else {
        super::topic::kombu_matches(key, routing_key).unwrap_or(false)
    };
    routed.then(|| queue.to_owned())
}

/// Standard base64 with padding, as Python's `base64.b64encode`.
fn base64_encode(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Base64 as Python's `base64.b64decode` (not validating): characters
/// outside the alphabet, such as line breaks, are skipped.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let cleaned: String = text
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(cleaned)
        .ok()
}

/// Seconds since the epoch, as Python's `time.time()`.
fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The transport options read from the URI query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RedisOptions {
    /// After how long an unacked delivery goes back to its queue.
    pub visibility_timeout: Duration,
    /// How often a consuming connection looks for such deliveries.
    pub restore_interval: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self::with_visibility(DEFAULT_VISIBILITY_TIMEOUT, None)
    }
}

impl RedisOptions {
    fn with_visibility(visibility_timeout: Duration, restore: Option<Duration>) -> Self {
        let restore_interval = restore.unwrap_or_else(|| {
            (visibility_timeout / 2).clamp(Duration::from_millis(500), Duration::from_secs(10))
        });
        Self {
            visibility_timeout,
            restore_interval,
        }
    }
}

/// Splits our options off the URI's query; the rest goes to the client.
/// A bad value is an error naming it.
pub fn parse_uri(uri: &str) -> Result<(String, RedisOptions), String> {
    let (base, query) = match uri.split_once('?') {
        Some((base, query)) => (base, query),
        None => (uri, ""),
    };
    let seconds = |key: &str, value: &str| {
        value
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .ok_or_else(|| format!("`{key}` must be a positive number of seconds, not `{value}`"))
    };
    let mut visibility = None;
    let mut restore = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "visibility_timeout" => visibility = Some(seconds(key, value)?),
            "unacked_restore_interval" => restore = Some(seconds(key, value)?),
            _ => rest.push(pair),
        }
    }
    let mut client_uri = base.to_owned();
    if !rest.is_empty() {
        client_uri.push('?');
        client_uri.push_str(&rest.join("&"));
    }
    let options =
        RedisOptions::with_visibility(visibility.unwrap_or(DEFAULT_VISIBILITY_TIMEOUT), restore);
    Ok((client_uri, options))
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    body: String,
    #[serde(rename = "content-encoding")]
    content_encoding: &'a str,
    #[serde(rename = "content-type")]
    content_type: &'a str,
    headers: serde_json::Map<String, Value>,
    properties: PropertiesOut<'a>,
}

#[derive(Serialize)]
struct PropertiesOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_to: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<std::borrow::Cow<'a, str>>,
    delivery_mode: u8,
    delivery_info: DeliveryInfoOut<'a>,
    priority: u8,
    body_encoding: &'a str,
    delivery_tag: String,
}

#[derive(Serialize)]
struct DeliveryInfoOut<'a> {
    exchange: &'a str,
    routing_key: &'a str,
}

/// The envelope kombu's `Producer.publish` + `Channel.basic_publish` makes
/// of a JSON body.
pub fn envelope(message: &Outgoing<'_>) -> String {
    let envelope = EnvelopeOut {
        body: base64_encode(message.body),
        content_encoding: "utf-8",
        content_type: "application/json",
        headers: serde_json::Map::new(),
        properties: PropertiesOut {
            reply_to: message.reply_to,
            // JSON carries text: bytes that are not UTF-8 cannot be sent
            // as they are on Redis (requests carrying them never got here:
            // an envelope is JSON).
            correlation_id: message.correlation_id.map(String::from_utf8_lossy),
            delivery_mode: 2,
            delivery_info: DeliveryInfoOut {
                exchange: message.exchange,
                routing_key: message.routing_key,
            },
            priority: 0,
            body_encoding: "base64",
            delivery_tag: uuid::Uuid::new_v4().to_string(),
        },
    };
    // Serialising strings and maps cannot fail.
    serde_json::to_string(&envelope).unwrap_or_default()
}

/// A received envelope, read leniently (kombu itself reads these fields
/// and ignores the rest).
#[derive(Debug)]
struct Received {
    tag: String,
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    reply_to: Option<String>,
    correlation_id: Option<String>,
    redelivered: bool,
}

fn read_envelope(raw: &str) -> Result<Received, String> {
    let v: Value = serde_json::from_str(raw).map_err(|e| format!("not JSON: {e}"))?;
    let properties = v
        .get("properties")
        .filter(|p| p.is_object())
        .ok_or("no `properties`")?;
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let info = properties.get("delivery_info");
    let tag = text(properties.get("delivery_tag")).ok_or("no `properties.delivery_tag`")?;
    let body = match v.get("body") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(body)) => {
            let encoding = properties.get("body_encoding").and_then(Value::as_str);
            match encoding {
                Some(e) if !e.eq_ignore_ascii_case("utf-8") => {
                    // An undecodable body goes on as it is: the
                    // dispatcher answers it with -32700.
                    base64_decode(body).unwrap_or_else(|| body.clone().into_bytes())
                }
                _ => body.clone().into_bytes(),
            }
        }
        Some(other) => other.to_string().into_bytes(),
    };
    let flag = |v: Option<&Value>| v.and_then(Value::as_bool).unwrap_or(false);
    Ok(Received {
        tag,
        exchange: text(info.and_then(|i| i.get("exchange"))).unwrap_or_default(),
        routing_key: text(info.and_then(|i| i.get("routing_key"))).unwrap_or_default(),
        body,
        reply_to: text(properties.get("reply_to")),
        correlation_id: text(properties.get("correlation_id")),
        redelivered: flag(info.and_then(|i| i.get("redelivered")))
            || flag(v.get("headers").and_then(|h| h.get("redelivered"))),
    })
}

/// Marks an envelope redelivered, as kombu's `_do_restore_message` does,
/// and also when it has no `headers` (kombu then marks nothing, and the
/// message would escape `crash_limit`).
fn mark_redelivered(payload: &mut Value) {
    let Some(envelope) = payload.as_object_mut() else {
        return;
    };
    let headers = envelope
        .entry("headers")
        .or_insert_with(|| Value::Object(serde_json::Map::new()));
    if !headers.is_object() {
        *headers = Value::Object(serde_json::Map::new());
    }
    if let Some(headers) = headers.as_object_mut() {
        headers.insert("redelivered".to_owned(), Value::Bool(true));
    }
    if let Some(info) = envelope
        .get_mut("properties")
        .and_then(|p| p.get_mut("delivery_info"))
        .and_then(Value::as_object_mut)
    {
        info.insert("redelivered".to_owned(), Value::Bool(true));
    }
}

/// Removes `tag` from the unacked hash and index and, if it was there,
/// pushes the restored envelope onto the lists given as further keys; only
/// if the hash still holds what the caller read (kombu does the same with
/// `WATCH unacked` + `MULTI`).
const RESTORE_SCRIPT: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and current ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
if not current or ARGV[2] == '' then return 0 end
for i = 3, #KEYS do
  if ARGV[4] == 'l' then
    redis.call('LPUSH', KEYS[i], ARGV[3])
  else
    redis.call('RPUSH', KEYS[i], ARGV[3])
  end
end
return 1
";

/// redis-py's `Lock.release`, which kombu's `Mutex` uses.
const UNLOCK_SCRIPT: &str = r"
local token = redis.call('get', KEYS[1])
if not token or token ~= ARGV[1] then return 0 end
redis.call('del', KEYS[1])
return 1
";

fn op(operation: impl Into<String>, e: &RedisError) -> BusError {
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        BusError::lost(operation, e)
    } else {
        BusError::op(operation, e)
    }
}

/// The state every part of one connection shares.
struct Inner {
    /// The redacted URI.
    uri: String,
    /// The URI as given: only to scrub its password from error messages.
    secret_uri: String,
    client: Client,
    options: RedisOptions,
    /// The command connection (multiplexed; `None` after it broke, until
    /// the next command reconnects).
    commands: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    /// Tags delivered through this connection and not yet settled: handed
    /// back at close, as kombu's `restore_unacked_once`.
    outstanding: Mutex<HashSet<String>>,
    /// Cancelled by `close`.
    closing: CancellationToken,
    restorer_started: AtomicBool,
    restore: Script,
    unlock: Script,
}

fn command_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)))
}

/// `BRPOP` blocks on the server: its reply may take the whole timeout.
fn blocking_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(BRPOP_TIMEOUT_SECS + 10)))
}

impl Inner {
    async fn conn(&self) -> Result<MultiplexedConnection, BusError> {
        let mut slot = self.commands.lock().await;
        if let Some(conn) = &*slot {
            return Ok(conn.clone());
        }
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&command_config())
            .await
            .map_err(|e| BusError::Connect {
                uri: self.uri.clone(),
                reason: scrub(&e.to_string(), &self.secret_uri),
            })?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets a broken command connection, so the next command reconnects.
    async fn check(&self, e: &RedisError) {
        if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
            *self.commands.lock().await = None;
        }
    }

    async fn query<T: ::redis::FromRedisValue>(
        &self,
        what: &str,
        cmd: &::redis::Cmd,
    ) -> Result<T, BusError> {
        let mut conn = self.conn().await?;
        match cmd.query_async(&mut conn).await {
            Ok(v) => Ok(v),
            Err(e) => {
                self.check(&e).await;
                Err(op(what, &e))
            }
        }
    }

    async fn pipe(&self, what: &str, pipe: &::redis::Pipeline) -> Result<(), BusError> {
        let mut conn = self.conn().await?;
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.check(&e).await;
                Err(op(what, &e))
            }
        }
    }

    async fn script(
        &self,
        what: &str,
        inv: &::redis::ScriptInvocation<'_>,
    ) -> Result<i64, BusError> {
        let mut conn = self.conn().await?;
        match inv.invoke_async::<i64>(&mut conn).await {
            Ok(v) => Ok(v),
            Err(e) => {
                self.check(&e).await;
                Err(op(what, &e))
            }
        }
    }

    /// The queues `routing_key` reaches through `exchange`, as kombu's
    /// `Channel._lookup`: the default exchange names the queue, any other
    /// is looked up in its binding set.
    async fn lookup(&self, exchange: &str, routing_key: &str) -> Result<Vec<String>, BusError> {
        if exchange.is_empty() {
            return Ok(vec![routing_key.to_owned()]);
        }
        let members: Vec<String> = self
            .query(
                &format!("reading the bindings of `{exchange}`"),
                ::redis::cmd("SMEMBERS").arg(binding_key(exchange)),
            )
            .await?;
        let queues: BTreeSet<String> = members
            .iter()
            .filter_map(|m| member_routes(m, routing_key))
            .collect();
        Ok(queues.into_iter().collect())
    }

    /// Records a delivery in the unacked hash and index.
    async fn track(&self, r: &Received, raw: &str) -> Result<(), BusError> {
        let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
        let stored = format!("[{raw}, {}, {}]", quote(&r.exchange), quote(&r.routing_key));
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .cmd("ZADD")
            .arg(UNACKED_INDEX)
            .arg(now())
            .arg(&r.tag)
            .ignore()
            .cmd("HSET")
            .arg(UNACKED)
            .arg(&r.tag)
            .arg(stored)
            .ignore();
        self.pipe("recording an unacked delivery", &pipe).await
    }

    async fn ack(&self, tag: &str) -> Result<(), BusError> {
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .cmd("ZREM")
            .arg(UNACKED_INDEX)
            .arg(tag)
            .ignore()
            .cmd("HDEL")
            .arg(UNACKED)
            .arg(tag)
            .ignore();
        self.pipe("ack", &pipe).await
    }

    /// kombu's `QoS.restore_by_tag`: moves an unacked delivery back onto
    /// its queues, marked redelivered; `leftmost` (a requeue) puts it at
    /// the back of the queue, otherwise (a restore) at the front.
    async fn restore_by_tag(&self, tag: &str, leftmost: bool) -> Result<(), BusError> {
        let stored: Option<String> = self
            .query(
                "reading an unacked delivery",
                ::redis::cmd("HGET").arg(UNACKED).arg(tag),
            )
            .await?;
        let mut lists = Vec::new();
        let mut payload_text = String::new();
        if let Some(stored) = &stored {
            match serde_json::from_str::<(Value, Value, Value)>(stored) {
                Ok((mut payload, exchange, routing_key)) => {
                    mark_redelivered(&mut payload);
                    let priority = payload
                        .get("properties")
                        .and_then(|p| p.get("priority"))
                        .and_then(Value::as_i64)
                        .unwrap_or(0);
                    let exchange = exchange.as_str().unwrap_or_default();
                    let routing_key = routing_key.as_str().unwrap_or_default();
                    for queue in self.lookup(exchange, routing_key).await? {
                        lists.push(priority_list(&queue, priority_step(priority)));
                    }
                    payload_text = payload.to_string();
                }
                Err(e) => {
                    tracing::error!(tag, error = %e, "cannot restore an unreadable unacked delivery")
                }
            }
        }
        let mut inv = self.restore.prepare_invoke();
        inv.key(UNACKED).key(UNACKED_INDEX);
        for list in &lists {
            inv.key(list);
        }
        inv.arg(tag)
            .arg(
                stored
                    .as_deref()
                    .filter(|_| !payload_text.is_empty())
                    .unwrap_or(""),
            )
            .arg(&payload_text)
            .arg(if leftmost { "l" } else { "r" });
        self.script("restoring an unacked delivery", &inv).await?;
        Ok(())
    }

    /// kombu's `QoS.restore_visible`: every delivery unacked for longer
    /// than the visibility timeout goes back to its queue.
    async fn restore_visible(&self) -> Result<usize, BusError> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let locked: Option<String> = self
            .query(
                "locking the unacked index",
                ::redis::cmd("SET")
                    .arg(UNACKED_MUTEX)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(u64::try_from(UNACKED_MUTEX_EXPIRE.as_millis()).unwrap_or(300_000)),
            )
            .await?;
        if locked.is_none() {
            return Ok(0); // another consumer is restoring
        }
        let ceil = now() - self.options.visibility_timeout.as_secs_f64();
        let restored = async {
            let tags: Vec<String> = self
                .query(
                    "reading the unacked index",
                    ::redis::cmd("ZRANGE")
                        .arg(UNACKED_INDEX)
                        .arg(ceil)
                        .arg(0)
                        .arg("BYSCORE")
                        .arg("REV"),
                )
                .await?;
            for tag in &tags {
                self.restore_by_tag(tag, false).await?;
            }
            Ok::<usize, BusError>(tags.len())
        }
        .await;
        let mut unlock = self.unlock.prepare_invoke();
        unlock.key(UNACKED_MUTEX).arg(&token);
        if let Err(e) = self.script("unlocking the unacked index", &unlock).await {
            tracing::warn!(error = %e, "cannot release {UNACKED_MUTEX} (it expires by itself)");
        }
        restored
    }

    fn outstanding(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.outstanding
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A Redis connection speaking kombu's Redis transport.
pub struct RedisBus {
    inner: Arc<Inner>,
    reply_queue: Mutex<Option<String>>,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus")
            .field("uri", &self.inner.uri)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl RedisBus {
    /// Connects to `uri` (`redis://[user:password@]host[:port][/db][?visibility_timeout=SECS]`).
    pub async fn connect(uri: &str) -> Result<Self, BusError> {
        let redacted = redact_uri(uri);
        let fail = |reason: String| BusError::Connect {
            uri: redacted.clone(),
            reason: scrub(&reason, uri),
        };
        let (client_uri, options) = parse_uri(uri).map_err(&fail)?;
        let client = Client::open(client_uri.as_str()).map_err(|e| fail(e.to_string()))?;
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&command_config())
            .await
            .map_err(|e| fail(e.to_string()))?;
        // As kombu's channel does on creation.
        ::redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                uri: redacted,
                secret_uri: uri.to_owned(),
                client,
                options,
                commands: tokio::sync::Mutex::new(Some(conn)),
                outstanding: Mutex::default(),
                closing: CancellationToken::new(),
                restorer_started: AtomicBool::new(false),
                restore: Script::new(RESTORE_SCRIPT),
                unlock: Script::new(UNLOCK_SCRIPT),
            }),
            reply_queue: Mutex::new(None),
        })
    }

    /// The options read from the URI.
    pub fn options(&self) -> RedisOptions {
        self.inner.options
    }

    /// Runs `restore_visible` once now (tests and tools; consumers run it
    /// on their own).
    pub async fn restore_visible(&self) -> Result<usize, BusError> {
        self.inner.restore_visible().await
    }

    /// Starts the periodic restore sweep, once per connection, when it
    /// first consumes (as kombu only restores on consuming channels).
    fn start_restorer(&self) {
        if self.inner.restorer_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            loop {
                match inner.restore_visible().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        restored = n,
                        "unacked deliveries past the visibility timeout went back to their queues"
                    ),
                    Err(e) => tracing::warn!(error = %e, "restoring unacked deliveries failed"),
                }
                tokio::select! {
                    () = inner.closing.cancelled() => break,
                    () = tokio::time::sleep(inner.options.restore_interval) => {}
                }
            }
        });
    }

    async fn blocking_connection(inner: &Inner) -> Result<MultiplexedConnection, RedisError> {
        inner
            .client
            .get_multiplexed_async_connection_with_config(&blocking_config())
            .await
    }
}

/// One `BRPOP` over `lists`: the queue (the list name less its priority
/// suffix) and the item, or `None` after the timeout.
async fn brpop(
    conn: &mut MultiplexedConnection,
    lists: &[String],
) -> Result<Option<(String, String)>, RedisError> {
    let popped: Option<(Vec<u8>, Vec<u8>)> = ::redis::cmd("BRPOP")
        .arg(lists)
        .arg(BRPOP_TIMEOUT_SECS)
        .query_async(conn)
        .await?;
    Ok(popped.map(|(key, item)| {
        let key = String::from_utf8_lossy(&key).into_owned();
        let queue = key
            .rsplit_once(SEP)
            .map_or(key.as_str(), |(q, _)| q)
            .to_owned();
        (queue, String::from_utf8_lossy(&item).into_owned())
    }))
}

/// Reconnects a blocking connection after a failure, waiting a second
/// between attempts; `None` once `stop` is cancelled.
async fn reconnect(
    inner: &Inner,
    stop: &CancellationToken,
    what: &str,
) -> Option<MultiplexedConnection> {
    loop {
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        match RedisBus::blocking_connection(inner).await {
            Ok(conn) => return Some(conn),
            Err(e) => {
                tracing::warn!(error = %scrub(&e.to_string(), &inner.secret_uri), "{what}: cannot reconnect")
            }
        }
    }
}

/// Settles one delivery: an ack removes it from the unacked hash and index,
/// a requeue moves it back onto its queue (kombu's `basic_reject(requeue=True)`);
/// either way its prefetch slot is freed.
struct RedisAcker {
    inner: Arc<Inner>,
    tag: String,
    slot: Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
}

#[async_trait]
impl Acker for RedisAcker {
    async fn settle(&self, how: Settle) -> Result<(), BusError> {
        let settled = match how {
            Settle::Ack => self.inner.ack(&self.tag).await,
            Settle::Requeue => self.inner.restore_by_tag(&self.tag, true).await,
        };
        if settled.is_ok() {
            self.inner.outstanding().remove(&self.tag);
        }
        drop(
            self.slot
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        settled
    }

    fn tag(&self) -> String {
        self.tag.clone()
    }
}

/// Takes one popped item: records it as unacked (when it takes a prefetch
/// slot, i.e. is not a reply) and makes the delivery; also returns its tag.
async fn receive(
    inner: &Arc<Inner>,
    queue: &str,
    raw: &str,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Option<(Incoming, String)> {
    let received = match read_envelope(raw) {
        Ok(r) => r,
        Err(reason) => {
            tracing::warn!(queue, %reason, "dropping a message that is not a kombu envelope");
            return None;
        }
    };
    let acker = match slot {
        Some(slot) => {
            if let Err(e) = inner.track(&received, raw).await {
                // The message is out of its list and not recorded: put it
                // back rather than lose it.
                tracing::error!(queue, error = %e, "cannot record a delivery; pushing it back");
                let push = ::redis::cmd("RPUSH").arg(queue).arg(raw).clone();
                if let Err(e) = inner.query::<i64>("pushing a delivery back", &push).await {
                    tracing::error!(queue, error = %e, "a delivery is lost");
                }
                return None;
            }
            inner.outstanding().insert(received.tag.clone());
            Some(Box::new(RedisAcker {
                inner: inner.clone(),
                tag: received.tag.clone(),
                slot: Mutex::new(Some(slot)),
            }) as Box<dyn Acker>)
        }
        None => None,
    };
    let incoming = Incoming {
        exchange: received.exchange,
        routing_key: received.routing_key,
        body: received.body,
        reply_to: received.reply_to,
        correlation_id: received.correlation_id.map(String::into_bytes),
        not_utf8: None,
        redelivered: received.redelivered,
        acker,
    };
    Some((incoming, received.tag))
}

/// Pops `queue` whenever a prefetch slot is free, until stopped. Never
/// abandons a `BRPOP` midway (its item would be lost): it lasts at most
/// [`BRPOP_TIMEOUT_SECS`], and `stop` is checked between them.
async fn consume_queue(
    inner: Arc<Inner>,
    queue: String,
    mut conn: MultiplexedConnection,
    limit: Arc<PrefetchSlots>,
    sink: Sink,
    stop: CancellationToken,
    ended: CancellationToken,
) {
    let _ended = ended.drop_guard();
    let lists = queue_lists(&queue);
    loop {
        let slot = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            slot = limit.acquire() => match slot { Some(s) => s, None => break },
        };
        let popped = match brpop(&mut conn, &lists).await {
            Ok(popped) => popped,
            Err(e) => {
                tracing::warn!(queue = %queue, error = %scrub(&e.to_string(), &inner.secret_uri), "BRPOP failed; reconnecting");
                drop(slot);
                match reconnect(&inner, &stop, "consumer").await {
                    Some(c) => {
                        conn = c;
                        continue;
                    }
                    None => break,
                }
            }
        };
        let Some((from, raw)) = popped else {
            if stop.is_cancelled() {
                break;
            }
            continue;
        };
        let Some((incoming, tag)) = receive(&inner, &from, &raw, Some(slot)).await else {
            continue;
        };
        if stop.is_cancelled() {
            hand_back(&inner, &tag, incoming).await;
            break;
        }
        tokio::spawn(sink(incoming));
    }
}

/// A delivery popped after its consumer stopped goes back to the front of
/// its queue, as kombu's channel close restores what it had taken.
async fn hand_back(inner: &Inner, tag: &str, incoming: Incoming) {
    drop(incoming);
    match inner.restore_by_tag(tag, false).await {
        Ok(()) => {
            inner.outstanding().remove(tag);
        }
        Err(e) => {
            tracing::warn!(error = %e, "a delivery stays unacked until the visibility timeout")
        }
    }
}

#[async_trait]
impl BusTransport for RedisBus {
    fn describe(&self) -> String {
        self.inner.uri.clone()
    }

    /// kombu keeps exchanges in its clients only: nothing to store.
    async fn declare_exchange(&self, _exchange: &str) -> Result<(), BusError> {
        Ok(())
    }

    async fn declare_queue(
        &self,
        exchange: &str,
        queue: &str,
        routing_key: &str,
    ) -> Result<(), BusError> {
        let member = binding_member(routing_key, queue);
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .cmd("SADD")
            .arg(binding_key(exchange))
            .arg(&member)
            .ignore()
            .cmd("SADD")
            .arg(binding_permanent_key(exchange))
            .arg(&member)
            .ignore();
        self.inner
            .pipe(
                &format!("binding queue `{queue}` to `{routing_key}`"),
                &pipe,
            )
            .await
    }

    async fn consume(&self, queue: &str, prefetch: u16, sink: Sink) -> Result<Consumer, BusError> {
        let conn = Self::blocking_connection(&self.inner)
            .await
            .map_err(|e| op(format!("consuming `{queue}`"), &e))?;
        // 0 would mean "no limit" to a broker; one slot at least here.
        let limit = Arc::new(PrefetchSlots::new(prefetch));
        let stop = self.inner.closing.child_token();
        let ended = CancellationToken::new();
        tokio::spawn(consume_queue(
            self.inner.clone(),
            queue.to_owned(),
            conn,
            limit.clone(),
            sink,
            stop.clone(),
            ended.clone(),
        ));
        self.start_restorer();
        Ok(Consumer {
            stop,
            ended,
            prefetch: limit,
        })
    }

    async fn publish(&self, m: Outgoing<'_>) -> Result<(), BusError> {
        let queues = self.inner.lookup(m.exchange, m.routing_key).await?;
        if queues.is_empty() {
            tracing::debug!(
                exchange = m.exchange,
                routing_key = m.routing_key,
                "no queue bound: message dropped"
            );
            return Ok(());
        }
        let payload = envelope(&m);
        let mut pipe = ::redis::pipe();
        for queue in &queues {
            pipe.cmd("LPUSH")
                .arg(priority_list(queue, 0))
                .arg(&payload)
                .ignore();
        }
        self.inner
            .pipe(&format!("publishing to `{}`", m.routing_key), &pipe)
            .await
    }

    /// A list of our own, `commissaire-host-reply-<uuid>`, that replies are
    /// pushed onto through the default exchange; deleted at close.
    async fn reply_queue(&self) -> Result<(String, async_channel::Receiver<Incoming>), BusError> {
        let name = format!("commissaire-host-reply-{}", uuid::Uuid::new_v4().simple());
        {
            let mut taken = self
                .reply_queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if taken.is_some() {
                return Err(BusError::op(
                    "reply queue",
                    "already consumed on this connection",
                ));
            }
            *taken = Some(name.clone());
        }
        let mut conn = Self::blocking_connection(&self.inner)
            .await
            .map_err(|e| op("consuming the reply queue", &e))?;
        let (tx, rx) = async_channel::unbounded();
        let inner = self.inner.clone();
        let stop = self.inner.closing.child_token();
        let lists = queue_lists(&name);
        tokio::spawn(async move {
            loop {
                let popped = tokio::select! {
                    biased;
                    // Replies are not acked: abandoning a BRPOP at close
                    // loses nothing anyone waits for.
                    () = stop.cancelled() => break,
                    popped = brpop(&mut conn, &lists) => popped,
                };
                match popped {
                    Ok(Some((queue, raw))) => {
                        if let Some((reply, _)) = receive(&inner, &queue, &raw, None).await {
                            if tx.send(reply).await.is_err() {
                                break;
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %scrub(&e.to_string(), &inner.secret_uri), "reply queue BRPOP failed; reconnecting");
                        match reconnect(&inner, &stop, "reply queue").await {
                            Some(c) => conn = c,
                            None => break,
                        }
                    }
                }
            }
        });
        Ok((name, rx))
    }

    /// Stops consuming, hands back what was delivered and never settled
    /// (kombu's `restore_unacked_once`, to the front of the queue) and
    /// deletes the reply queue.
    async fn close(&self) {
        self.inner.closing.cancel();
        let tags: Vec<String> = self.inner.outstanding().drain().collect();
        for tag in tags {
            if let Err(e) = self.inner.restore_by_tag(&tag, false).await {
                tracing::warn!(error = %e, "an unsettled delivery stays unacked until the visibility timeout");
            }
        }
        let reply = self
            .reply_queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(name) = reply {
            let del = ::redis::cmd("DEL").arg(queue_lists(&name)).clone();
            if let Err(e) = self
                .inner
                .query::<i64>("deleting the reply queue", &del)
                .await
            {
                tracing::debug!(error = %e, "deleting the reply queue");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message as kombu 5.7's `Producer.publish` left it in Redis.
    const KOMBU_MESSAGE: &str = r#"{"body": "eyJqc29ucnBjIjogIjIuMCIsICJpZCI6ICIxIiwgIm1ldGhvZCI6ICJhZGQiLCAicGFyYW1zIjogWzEsIDJdfQ==", "content-encoding": "utf-8", "content-type": "application/json", "headers": {}, "properties": {"reply_to": "response-x", "delivery_mode": 2, "delivery_info": {"exchange": "probe-ex", "routing_key": "simple.add"}, "priority": 0, "body_encoding": "base64", "delivery_tag": "646a1a65-5d79-4eb5-837b-72785f2f2cb2"}}"#;

    #[test]
    fn reads_a_kombu_message() {
        let r = read_envelope(KOMBU_MESSAGE).unwrap();
        assert_eq!(
            String::from_utf8(r.body).unwrap(),
            r#"{"jsonrpc": "2.0", "id": "1", "method": "add", "params": [1, 2]}"#
        );
        assert_eq!(r.tag, "646a1a65-5d79-4eb5-837b-72785f2f2cb2");
        assert_eq!(
            (r.exchange.as_str(), r.routing_key.as_str()),
            ("probe-ex", "simple.add")
        );
        assert_eq!(r.reply_to.as_deref(), Some("response-x"));
        assert_eq!(r.correlation_id, None);
        assert!(!r.redelivered);
    }

    #[test]
    fn writes_what_kombu_writes() {
        let text = envelope(&Outgoing {
            exchange: "ex",
            routing_key: "simple.add",
            body: br#"{"r": 1}"#,
            reply_to: Some("response-x"),
            correlation_id: Some(b"cid"),
            durable: false,
            confirm: false,
        });
        let v: Value = serde_json::from_str(&text).unwrap();
        let tag = v["properties"]["delivery_tag"].as_str().unwrap().to_owned();
        assert!(uuid::Uuid::parse_str(&tag).is_ok());
        assert_eq!(
            v,
            serde_json::json!({
                "body": "eyJyIjogMX0=",
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": {},
                "properties": {
                    "reply_to": "response-x",
                    "correlation_id": "cid",
                    "delivery_mode": 2,
                    "delivery_info": {"exchange": "ex", "routing_key": "simple.add"},
                    "priority": 0,
                    "body_encoding": "base64",
                    "delivery_tag": tag,
                }
            })
        );
        let back = read_envelope(&text).unwrap();
        assert_eq!(back.body, br#"{"r": 1}"#);
    }

    #[test]
    fn restored_messages_are_marked_redelivered() {
        let mut v: Value = serde_json::from_str(KOMBU_MESSAGE).unwrap();
        mark_redelivered(&mut v);
        let r = read_envelope(&v.to_string()).unwrap();
        assert!(r.redelivered);
        assert_eq!(v["headers"]["redelivered"], true);
        assert_eq!(v["properties"]["delivery_info"]["redelivered"], true);
    }

    #[test]
    fn an_envelope_without_headers_is_marked_redelivered_too() {
        let mut v: Value = serde_json::from_str(KOMBU_MESSAGE).unwrap();
        v.as_object_mut().unwrap().remove("headers");
        assert!(!read_envelope(&v.to_string()).unwrap().redelivered);
        mark_redelivered(&mut v);
        assert!(read_envelope(&v.to_string()).unwrap().redelivered);
    }

    #[test]
    fn base64_as_python() {
        for (plain, encoded) in [
            ("", ""),
            ("a", "YQ=="),
            ("ab", "YWI="),
            ("abc", "YWJj"),
            ("a string", "YSBzdHJpbmc="),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded).unwrap(), plain.as_bytes());
        }
        assert_eq!(base64_decode("YSBz\ndHJpbmc=").unwrap(), b"a string");
        assert_eq!(base64_decode("YSBzd"), None);
    }

    #[test]
    fn binding_members_as_kombu() {
        assert_eq!(
            binding_member("simple.*", "probe-q"),
            "simple.*\x06\x16^simple\\.[^\\.]+$\x06\x16probe-q"
        );
        assert_eq!(
            member_routes(&binding_member("simple.*", "q"), "simple.add"),
            Some("q".into())
        );
        assert_eq!(
            member_routes(&binding_member("simple.*", "q"), "other.add"),
            None
        );
        // A direct binding (no pattern), as kombu's SimpleQueue makes.
        assert_eq!(member_routes("r\x06\x16\x06\x16r", "r"), Some("r".into()));
        assert_eq!(member_routes("r\x06\x16\x06\x16r", "rr"), None);
    }

    #[test]
    fn priority_lists_as_kombu() {
        assert_eq!(
            queue_lists("q"),
            ["q", "q\x06\x163", "q\x06\x166", "q\x06\x169"]
        );
        let steps: Vec<u8> = [-1, 0, 2, 3, 5, 6, 8, 9, 12].map(priority_step).to_vec();
        assert_eq!(steps, [0, 0, 0, 3, 3, 6, 6, 9, 9]);
    }

    #[test]
    fn options_from_the_query() {
        let (uri, o) =
            parse_uri("redis://:pw@h:6379/3?visibility_timeout=2&protocol=resp3").unwrap();
        assert_eq!(uri, "redis://:pw@h:6379/3?protocol=resp3");
        assert_eq!(o.visibility_timeout, Duration::from_secs(2));
        assert_eq!(o.restore_interval, Duration::from_secs(1));
        let (uri, o) = parse_uri("redis://h/").unwrap();
        assert_eq!((uri.as_str(), o), ("redis://h/", RedisOptions::default()));
        assert_eq!(o.visibility_timeout, Duration::from_secs(3600));
        assert_eq!(o.restore_interval, Duration::from_secs(10));
        let (_, o) =
            parse_uri("redis://h/?visibility_timeout=0.2&unacked_restore_interval=3").unwrap();
        assert_eq!(o.restore_interval, Duration::from_secs(3));
        assert!(parse_uri("redis://h/?visibility_timeout=soon")
            .unwrap_err()
            .contains("visibility_timeout"));
    }
}
