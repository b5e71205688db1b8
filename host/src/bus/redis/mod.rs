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
//!   steps), consumed in that order;
//! - a consumer records each delivery in the hash `unacked` (tag →
//!   `[envelope, exchange, routing_key]`) and the sorted set `unacked_index`
//!   (tag → time) until it acks; entries older than the visibility timeout
//!   are pushed back onto their queues by whichever consumer runs
//!   `restore_visible` (under the lock `unacked_mutex`).
//!
//! Where we do better than kombu, still readable by it:
//!
//! - kombu pops with `BRPOP` and records afterwards: a consumer dying in
//!   between loses the message. We take with a script that pops and records
//!   at once ([`scripts`]), and wait for messages with a `BLMOVE` of a list
//!   onto itself, which takes nothing;
//! - our record names the default exchange and the queue itself, so a
//!   restore (ours or kombu's) puts the message back on the queue it came
//!   from, even once its binding is gone, and never onto other queues the
//!   routing key also reaches;
//! - our tags are unique per take (`<owner>.<connection>.<n>`), so a late
//!   ack never removes another consumer's record of the same message;
//! - each consumer keeps its tags in a held set named after it
//!   ([`keys::held_key`]): when a worker dies, the supervisor hands its
//!   deliveries back at once ([`RedisBus::restore_consumer`]) instead of
//!   after the visibility timeout;
//! - publishing is a script that refuses to push onto the transport's own
//!   keys or onto any key that is not a list: a `reply_to` of
//!   `unacked_mutex` cannot stop every restore;
//! - publishing through an exchange reads its binding set and pushes in
//!   one script, routed by the members last read and checked against the
//!   set's current ones ([`publish`]): one round trip, and never a push by
//!   a binding table that changed meanwhile.
//!
//! The visibility timeout (kombu's transport option, default 3600 s) comes
//! from the URI query: `redis://host:6379/0?visibility_timeout=30`; so does
//! `unacked_restore_interval` (seconds between our restore sweeps; default
//! half the visibility timeout, between 0.5 and 10 s).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use ::redis::Client;
use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::bus::reply_names::ReplyName;
use crate::bus::{
    BusError, BusTransport, ConnectCause, Consumer, ConsumerState, Incoming, Outgoing,
    PrefetchSlots, ReplyQueueKind, Sink,
};
use crate::redact::redact_uri;

mod bindings;
#[cfg(test)]
mod bookkeeping_tests;
mod connection;
mod consumer;
pub(crate) mod envelope;
mod errors;
pub mod keys;
mod options;
mod publish;
mod quarantine;
mod reply;
mod restore;
mod scripts;

pub use envelope::envelope;
pub use keys::{
    binding_key, binding_member, binding_permanent_key, held_key, priority_list, queue_lists,
    PRIORITY_STEPS, SEP, UNACKED, UNACKED_INDEX, UNACKED_MUTEX,
};
pub use options::{parse_uri, RedisOptions, DEFAULT_VISIBILITY_TIMEOUT};

/// kombu's transport: shared; an unacked delivery goes back to its queue
/// after the URI's `visibility_timeout`, and what a dead consumer held
/// waits for that unless handed back.
pub fn traits(uri: &str) -> Result<super::BusTraits, String> {
    let (_, options) = parse_uri(uri)?;
    Ok(super::BusTraits {
        shared: true,
        redelivers_after: Some(options.visibility_timeout),
        hand_back_dead_consumers: true,
    })
}

use connection::{command_config, refused, Identity, Inner};

/// A Redis connection speaking kombu's Redis transport.
pub struct RedisBus {
    inner: Arc<Inner>,
    reply_queue: Mutex<Option<ReplyName>>,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus")
            .field("uri", &self.inner.uri)
            .field("owner", &self.inner.identity.owner)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl RedisBus {
    /// Connects to `uri` (`redis://[user:password@]host[:port][/db][?visibility_timeout=SECS]`),
    /// consuming as a fresh owner.
    pub async fn connect(uri: &str) -> Result<Self, BusError> {
        Self::connect_as(uri, None).await
    }

    /// Connects, consuming as `owner` (letters, digits, `-`, `_`): the name
    /// of the held set its deliveries are tracked in, which
    /// [`restore_consumer`](BusTransport::restore_consumer) hands back.
    /// `None`: a fresh one.
    pub async fn connect_as(uri: &str, owner: Option<&str>) -> Result<Self, BusError> {
        let redacted = redact_uri(uri);
        let fail = |e: ::redis::RedisError| BusError::connect(uri, e);
        let owner = match owner {
            Some(owner) if keys::valid_owner(owner) => owner.to_owned(),
            Some(owner) => {
                return Err(BusError::connect(
                    uri,
                    ConnectCause::Uri(format!(
                        "consumer owner `{owner}`: only letters, digits, `-` and `_`, at most 64"
                    )),
                ))
            }
            None => uuid::Uuid::new_v4().simple().to_string(),
        };
        let (client_uri, options) =
            parse_uri(uri).map_err(|reason| BusError::connect(uri, ConnectCause::Uri(reason)))?;
        let client = Client::open(client_uri.as_str()).map_err(fail)?;
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&command_config())
            .await
            .map_err(fail)?;
        // As kombu's channel does on creation.
        ::redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .map_err(fail)?;
        Ok(Self {
            inner: Arc::new(Inner {
                uri: redacted,
                secret_uri: uri.to_owned(),
                client,
                options,
                identity: Identity::new(owner),
                commands: tokio::sync::Mutex::new(Some(conn)),
                closing: CancellationToken::new(),
                restorer_started: AtomicBool::new(false),
                restorer: std::sync::Mutex::new(None),
                scripts: scripts::Scripts::new(),
                bindings: bindings::Bindings::default(),
            }),
            reply_queue: Mutex::new(None),
        })
    }

    /// The options read from the URI.
    pub fn options(&self) -> RedisOptions {
        self.inner.options
    }

    /// The owner this connection consumes as.
    pub fn owner(&self) -> &str {
        &self.inner.identity.owner
    }

    /// Runs `restore_visible` once now (tests and tools; consumers run it
    /// on their own).
    pub async fn restore_visible(&self) -> Result<usize, BusError> {
        self.inner.restore_visible().await
    }
}

#[async_trait]
impl BusTransport for RedisBus {
    fn describe(&self) -> String {
        self.inner.uri.clone()
    }

    async fn quarantine_keep(&self, name: &str, entry: &[u8], bound: u32) -> Result<(), BusError> {
        quarantine::keep(&self.inner, name, entry, bound).await
    }

    async fn quarantine_read(&self, name: &str) -> Result<Vec<Vec<u8>>, BusError> {
        quarantine::read(&self.inner, name).await
    }

    async fn quarantine_remove(
        &self,
        name: &str,
        drop: &crate::bus::PickEntries,
    ) -> Result<usize, BusError> {
        quarantine::remove(&self.inner, name, drop).await
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
        _arguments: &crate::bus::QueueArguments,
    ) -> Result<(), BusError> {
        if let Some(why) = keys::reserved(queue) {
            return Err(BusError::Refused {
                operation: format!("declaring queue `{queue}`"),
                reason: why.to_owned(),
            });
        }
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

    /// One `SISMEMBER`: whether the binding set still holds the queue's
    /// member. kombu keeps nothing else of an exchange in Redis, and the
    /// queue's lists come and go with their messages.
    async fn still_declared(
        &self,
        exchange: &str,
        queue: &str,
        routing_key: &str,
    ) -> Result<bool, BusError> {
        self.inner
            .query(
                &format!("checking the binding of `{queue}`"),
                ::redis::cmd("SISMEMBER")
                    .arg(binding_key(exchange))
                    .arg(binding_member(routing_key, queue)),
            )
            .await
    }

    async fn consume(&self, queue: &str, prefetch: u16, sink: Sink) -> Result<Consumer, BusError> {
        let what = format!("consuming `{queue}`");
        let conn = self
            .inner
            .blocking_connection()
            .await
            .map_err(|e| self.inner.fail(&what, &e))?;
        // 0 would mean "no limit" to a broker; one slot at least here.
        let limit = Arc::new(PrefetchSlots::new(prefetch));
        let stop = self.inner.closing.child_token();
        let ended = CancellationToken::new();
        let (state, watching) = tokio::sync::watch::channel(ConsumerState::Consuming);
        tokio::spawn(consumer::consume_queue(
            self.inner.clone(),
            queue.to_owned(),
            conn,
            limit.clone(),
            sink,
            stop.clone(),
            (ended.clone(), state),
        ));
        restore::start_restorer(&self.inner);
        Ok(Consumer {
            stop,
            ended,
            prefetch: limit,
            state: watching,
        })
    }

    async fn publish(&self, m: Outgoing<'_>) -> Result<(), BusError> {
        if m.exchange.is_empty() {
            // The default exchange: the routing key names the list.
            let mut inv = self.inner.scripts.publish.prepare_invoke();
            inv.key(priority_list(m.routing_key, 0))
                .arg(envelope(&m))
                .arg(ttl_ms(m.reply_ttl));
            let what = format!("publishing to `{}`", m.routing_key);
            let answer = self.inner.script(&what, &inv).await?;
            refused(&what, answer)?;
            return Ok(());
        }
        let queues = self
            .inner
            .publish_routed(m.exchange, m.routing_key, &envelope(&m))
            .await?;
        if queues.is_empty() {
            if m.expires.is_some() {
                return Err(BusError::Unroutable {
                    exchange: m.exchange.to_owned(),
                    routing_key: m.routing_key.to_owned(),
                });
            }
            tracing::debug!(
                exchange = m.exchange,
                routing_key = m.routing_key,
                "no queue bound: message dropped"
            );
        }
        Ok(())
    }

    /// Redis has no direct reply-to: `kind` changes nothing.
    async fn reply_queue(
        &self,
        _kind: ReplyQueueKind,
    ) -> Result<(String, async_channel::Receiver<Incoming>), BusError> {
        reply::open(self).await
    }

    async fn close(&self) {
        reply::close(self).await;
    }

    async fn restore_consumer(&self, owner: &str) -> Result<usize, BusError> {
        if !keys::valid_owner(owner) {
            return Ok(0);
        }
        self.inner.restore_owner(owner, true).await
    }
}

/// A list's expiry for the scripts, in ms: 0 for none.
fn ttl_ms(ttl: Option<std::time::Duration>) -> u64 {
    ttl.map_or(0, |t| {
        u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)
    })
}
