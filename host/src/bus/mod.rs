//! Bus transports: one trait, one implementation per URI scheme.
//!
//! The trait speaks of exchanges, queues, routing keys and acks: the
//! Commissaire model, which kombu also maps onto Redis.

use std::sync::Arc;

use async_trait::async_trait;

pub mod amqp;

mod error;
pub mod heal;
pub mod memory;
pub mod redis;
pub mod reply_names;
pub mod topic;

pub use error::{is_permanent, BusError, ConnectCause, ConnectError};
pub use reply_names::ReplyQueueKind;

/// Which transport a bus URI names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusKind {
    /// `memory://`: the embedded in-process bus.
    Memory,
    /// `amqp://`, `amqps://`: RabbitMQ.
    Amqp,
    /// `redis://`, `rediss://`: kombu's Redis transport.
    Redis,
}

impl BusKind {
    /// The transport of `uri`, from its scheme.
    pub fn of(uri: &str) -> Result<Self, BusError> {
        match uri.split("://").next().unwrap_or_default() {
            "memory" => Ok(Self::Memory),
            "amqp" | "amqps" => Ok(Self::Amqp),
            "redis" | "rediss" => Ok(Self::Redis),
            _ => Err(BusError::UnsupportedUri(crate::redact::redact_uri(uri))),
        }
    }
}

/// What a bus URI means to the rest of the host. Each transport answers
/// for its own URIs (`bus/<name>/`), so that the configuration and the
/// supervisor never ask which transport it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusTraits {
    /// Other processes share the bus (worker processes need that).
    pub shared: bool,
    /// A delivery left unsettled this long goes to another consumer, its
    /// consumer alive or not (Redis's `visibility_timeout`); `None`: only
    /// when its consumer goes.
    pub redelivers_after: Option<std::time::Duration>,
    /// What a dead consumer held stays held until someone hands it back
    /// ([`BusTransport::restore_consumer`]); false: the broker notices.
    pub hand_back_dead_consumers: bool,
}

/// The traits of the bus `uri` names, once its transport has checked the
/// URI (a failover list, a Redis option…); the error says what is wrong
/// with it, for a configuration error.
pub fn traits(uri: &str) -> Result<BusTraits, String> {
    let kind = BusKind::of(uri).map_err(|e| e.to_string())?;
    if uri.contains(';') && kind != BusKind::Amqp {
        return Err(amqp::FAILOVER_ONLY.to_owned());
    }
    match kind {
        BusKind::Memory => Ok(memory::TRAITS),
        BusKind::Amqp => amqp::traits(uri),
        BusKind::Redis => redis::traits(uri),
    }
}

/// Queue declaration arguments (`x-queue-type`, ...), by name.
pub type QueueArguments = std::collections::BTreeMap<String, QueueArgument>;

/// One queue declaration argument, typed as AMQP carries it.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(untagged)]
pub enum QueueArgument {
    /// A long string.
    Text(String),
    /// A signed 64-bit integer.
    Integer(i64),
    /// A boolean.
    Bool(bool),
    /// A double.
    Float(f64),
}

/// A message to publish.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// The exchange; `""` is the default exchange, which routes to the
    /// queue named by `routing_key`.
    pub exchange: &'a str,
    /// The routing key.
    pub routing_key: &'a str,
    /// The body (JSON).
    pub body: &'a [u8],
    /// Where replies go.
    pub reply_to: Option<&'a str>,
    /// The correlation id: bytes, since a reply copies the caller's as
    /// sent, UTF-8 or not.
    pub correlation_id: Option<&'a [u8]>,
    /// Persistent (delivery mode 2, as kombu publishes): replies, to reply
    /// queues that may be durable. The host's own requests are transient:
    /// their replies come to a reply queue of a connection that does not
    /// outlive a broker restart anyway.
    pub durable: bool,
    /// `publish` returns once the broker has taken the message (publisher
    /// confirms on RabbitMQ): replies, whose request is acked right after
    /// (`[bus] confirm_replies`).
    pub confirm: bool,
    /// Set on the host's own requests, to their timeout: the message
    /// expires with its caller (a per-message TTL), and one that no queue
    /// takes is an error at once ([`BusError::Unroutable`]) instead of a
    /// wait for the whole timeout.
    pub expires: Option<std::time::Duration>,
    /// The W3C `traceparent` header to send (AMQP headers; kombu's
    /// `headers` on Redis).
    pub traceparent: Option<&'a str>,
    /// The `deadline` header to send (see [`crate::deadline`]): set on the
    /// host's own requests.
    pub deadline: Option<u64>,
    /// Set on replies: how long the list they go to (on Redis) lives on
    /// unread after this push, each push setting it again. A caller pops
    /// its reply at once; one that gave up or died leaves a list that
    /// would otherwise keep every reply sent to it for ever. AMQP ignores
    /// it: there a reply queue is its caller's, with the caller's own
    /// lifetime.
    pub reply_ttl: Option<std::time::Duration>,
}

/// How long an unread reply list lives at least ([`Outgoing::reply_ttl`]):
/// far beyond any caller's wait.
pub const REPLY_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// How to settle a delivery.
#[derive(Debug)]
pub enum Settle {
    /// Done: remove it from the queue.
    Ack,
    /// Not handled: give it back to the queue for another consumer.
    Requeue,
}

/// How one delivery is answered and settled with its transport: its reply
/// published ahead of its settlement where the transport can, then the
/// ack or the requeue.
#[async_trait]
pub trait Settlement: Send + Sync {
    /// Acks or requeues.
    async fn settle(&self, how: Settle) -> Result<(), BusError>;

    /// Publishes `m` where the broker is sure to take it before this
    /// delivery's settlement (on AMQP, the delivery's own channel). `None`:
    /// the transport has no such path; publish on the bus.
    async fn publish_before_ack(&self, _m: Outgoing<'_>) -> Option<Result<(), BusError>> {
        None
    }

    /// The delivery's tag, for log lines about it.
    fn tag(&self) -> String;
}

/// How deep a delivery's headers may nest (tables in tables, arrays in
/// them). Nothing the host or its callers send nests past 2; the patched
/// AMQP parser (vendor/README.md) stops descending at 32, so that a frame
/// nested 100,000 deep still parses and is refused here.
pub const MAX_HEADER_DEPTH: usize = 16;

/// Why a delivery's properties cannot be read as the host reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// This name or property (`reply_to`, `headers`, ...) is not valid
    /// UTF-8.
    NotUtf8(&'static str),
    /// The headers nest deeper than [`MAX_HEADER_DEPTH`].
    TooDeep,
    /// Not a message of the transport's format at all (on Redis, a list
    /// item that is not a kombu envelope): nothing in it can be read.
    NotAnEnvelope,
}

impl Malformed {
    /// Whether the reply address itself is unreadable (the request cannot
    /// be answered).
    pub fn unanswerable(self) -> bool {
        matches!(self, Self::NotUtf8("reply_to") | Self::NotAnEnvelope)
    }
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotUtf8(property) => write!(f, "the request's {property} is not valid UTF-8"),
            Self::TooDeep => write!(
                f,
                "the request's headers nest deeper than {MAX_HEADER_DEPTH} levels"
            ),
            Self::NotAnEnvelope => write!(f, "a message that is not a kombu envelope"),
        }
    }
}

/// A delivered message.
pub struct Incoming {
    /// The exchange it came through.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// The body.
    pub body: Vec<u8>,
    /// `reply_to`.
    pub reply_to: Option<String>,
    /// `correlation_id`, as sent (a reply copies it byte for byte).
    pub correlation_id: Option<Vec<u8>>,
    /// What makes its properties unreadable, if anything: such a request
    /// is refused before it is parsed.
    pub malformed: Option<Malformed>,
    /// The `traceparent` header, as sent (parsed by [`crate::trace`]).
    pub traceparent: Option<String>,
    /// The `deadline` header: when its caller stops waiting (see
    /// [`crate::deadline`]).
    pub deadline: Option<u64>,
    /// Whether it was delivered before.
    pub redelivered: bool,
    /// How to settle it; `None` for auto-acked deliveries (replies).
    pub settlement: Option<Box<dyn Settlement>>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("routing_key", &self.routing_key)
            .field("reply_to", &self.reply_to)
            .field("correlation_id", &self.correlation_id)
            .field("malformed", &self.malformed)
            .field("redelivered", &self.redelivered)
            .finish_non_exhaustive()
    }
}

impl Incoming {
    /// Publishes the reply to this delivery, ahead of its ack: confirmed by
    /// the broker if `m.confirm`, else on the delivery's own channel where
    /// the transport has one (see [`Settlement::publish_before_ack`]).
    pub async fn publish_reply(
        &self,
        bus: &dyn BusTransport,
        m: Outgoing<'_>,
    ) -> Result<(), BusError> {
        if !m.confirm {
            if let Some(settlement) = &self.settlement {
                if let Some(published) = settlement.publish_before_ack(m).await {
                    return published;
                }
            }
        }
        bus.publish(m).await
    }

    /// The delivery tag, for log lines (`-` for auto-acked deliveries).
    pub fn tag(&self) -> String {
        self.settlement
            .as_ref()
            .map_or_else(|| "-".to_owned(), |a| a.tag())
    }

    /// Acks or requeues (no-op for auto-acked deliveries).
    pub async fn settle(&self, how: Settle) -> Result<(), BusError> {
        match &self.settlement {
            Some(settlement) => settlement.settle(how).await,
            None => Ok(()),
        }
    }
}

/// Changes how many unsettled deliveries a consumer may hold.
///
/// A handler blocked in a bus request raises it by one while it waits, so
/// that a service calling itself (`wordy_add` → `simple.add`) can never
/// fill every slot with callers waiting on requests stuck behind them.
#[async_trait]
pub trait Prefetch: Send + Sync {
    /// Sets the limit.
    async fn set(&self, limit: u16) -> Result<(), BusError>;
}

/// Prefetch kept by the host itself, for transports without a broker-side
/// limit (memory, Redis): a consumer takes a slot before each delivery and
/// the delivery's settlement frees it. Lowering the limit while every slot is
/// taken leaves a debt, paid by the next slots that come free.
pub(crate) struct PrefetchSlots {
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    limit: std::sync::atomic::AtomicU16,
    debt: std::sync::atomic::AtomicUsize,
}

impl PrefetchSlots {
    /// `limit` slots (at least one).
    pub(crate) fn new(limit: u16) -> Self {
        let limit = limit.max(1);
        Self {
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(usize::from(limit))),
            limit: std::sync::atomic::AtomicU16::new(limit),
            debt: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn pay_debt(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.debt
            .fetch_update(SeqCst, SeqCst, |d| d.checked_sub(1))
            .is_ok()
    }

    /// Waits for a free slot; `None` once the slots are closed.
    pub(crate) async fn acquire(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        loop {
            let slot = self.slots.clone().acquire_owned().await.ok()?;
            if !self.pay_debt() {
                return Some(slot);
            }
            slot.forget();
        }
    }
}

#[async_trait]
impl Prefetch for PrefetchSlots {
    async fn set(&self, limit: u16) -> Result<(), BusError> {
        use std::sync::atomic::Ordering::SeqCst;
        let limit = limit.max(1);
        let old = self.limit.swap(limit, SeqCst);
        if limit > old {
            let mut more = usize::from(limit - old);
            // Cancel debt first, then add slots.
            while more > 0 && self.pay_debt() {
                more -= 1;
            }
            self.slots.add_permits(more);
        } else {
            let fewer = usize::from(old - limit);
            let removed = self.slots.forget_permits(fewer);
            self.debt.fetch_add(fewer - removed, SeqCst);
        }
        Ok(())
    }
}

/// Where a consumer hands its deliveries: called once per delivery, it
/// returns the future that answers it, which the transport runs as a task
/// of its own. No queue or forwarding task in between: on RabbitMQ, lapin
/// spawns that task straight from its I/O thread.
pub type Sink = Arc<dyn Fn(Incoming) -> BoxFuture<'static, ()> + Send + Sync>;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Whether a consumer receives deliveries now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumerState {
    /// Deliveries arrive.
    Consuming,
    /// Its connection to the broker broke and the transport is making it
    /// again (Redis): nothing arrives meanwhile.
    Interrupted,
    /// The broker cancelled it (RabbitMQ, when its queue is deleted); the
    /// connection goes on. Nothing arrives any more: declare the queue
    /// again and consume anew.
    Cancelled,
}

/// A consumer state that never changes, for transports without such
/// events (memory).
pub(crate) fn always_consuming() -> tokio::sync::watch::Receiver<ConsumerState> {
    tokio::sync::watch::channel(ConsumerState::Consuming).1
}

/// One queue's consumer, until stopped.
pub struct Consumer {
    /// Stops the consumer: no more deliveries arrive after it.
    pub stop: tokio_util::sync::CancellationToken,
    /// Cancelled by the transport once deliveries have ended: after `stop`,
    /// or when the connection is lost.
    pub ended: tokio_util::sync::CancellationToken,
    /// Its prefetch limit.
    pub prefetch: std::sync::Arc<dyn Prefetch>,
    /// Whether deliveries arrive now (see [`ConsumerState`]).
    pub state: tokio::sync::watch::Receiver<ConsumerState>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer").finish_non_exhaustive()
    }
}

/// A bus connection.
#[async_trait]
pub trait BusTransport: Send + Sync + 'static {
    /// The URI, without password.
    fn describe(&self) -> String;

    /// Declares the topic exchange (durable, not auto-delete).
    async fn declare_exchange(&self, exchange: &str) -> Result<(), BusError>;

    /// Declares a service queue (durable, not exclusive, not auto-delete,
    /// with `arguments` where the broker has them) and binds it to
    /// `exchange` with `routing_key`.
    async fn declare_queue(
        &self,
        exchange: &str,
        queue: &str,
        routing_key: &str,
        arguments: &QueueArguments,
    ) -> Result<(), BusError>;

    /// Whether what [`declare_exchange`](Self::declare_exchange) and
    /// [`declare_queue`](Self::declare_queue) made is still there, as far
    /// as the transport can tell cheaply: `Ok(false)` when the broker lost
    /// some of it (RabbitMQ: the exchange or the queue; Redis: the
    /// binding), and both should be declared again. Called every
    /// [`heal::CHECK_EVERY`] per consumed queue.
    async fn still_declared(
        &self,
        _exchange: &str,
        _queue: &str,
        _routing_key: &str,
    ) -> Result<bool, BusError> {
        Ok(true)
    }

    /// Consumes `queue` with at most `prefetch` unsettled deliveries.
    async fn consume(&self, queue: &str, prefetch: u16, sink: Sink) -> Result<Consumer, BusError>;

    /// Publishes a message.
    async fn publish(&self, message: Outgoing<'_>) -> Result<(), BusError>;

    /// The connection's one reply queue, of `kind` where the transport has
    /// a choice: its name (for `reply_to`) and its deliveries. Called once
    /// per connection; deleted by `close`.
    async fn reply_queue(
        &self,
        kind: ReplyQueueKind,
    ) -> Result<(String, async_channel::Receiver<Incoming>), BusError>;

    /// How long a request's ack may wait to go out with others (one
    /// `basic.ack multiple=true` for many) in the consumers started from
    /// now on; zero acks each at once. Only AMQP coalesces.
    fn set_ack_window(&self, _window: std::time::Duration) {}

    /// Sends the acks still waiting to go out with others (at most 2 s).
    /// Only AMQP coalesces.
    async fn flush_acks(&self) {}

    /// Closes the connection, after sending the acks still waiting;
    /// unsettled deliveries go back to their queues.
    async fn close(&self);

    /// Hands back at once what the consumer `owner` (another connection,
    /// whose process died) took and never settled; returns how many. A
    /// no-op where the broker does it itself when the connection drops
    /// (AMQP, memory).
    async fn restore_consumer(&self, _owner: &str) -> Result<usize, BusError> {
        Ok(0)
    }

    /// Stores `entry` in the quarantine `name` (see [`crate::quarantine`]),
    /// which keeps the newest `bound` entries: a durable queue on
    /// RabbitMQ, a list on Redis, made on first use.
    async fn quarantine_keep(
        &self,
        name: &str,
        _entry: &[u8],
        _bound: u32,
    ) -> Result<(), BusError> {
        Err(no_quarantine(name))
    }

    /// Every entry of the quarantine `name`, oldest first, left in place
    /// (none if it does not exist).
    async fn quarantine_read(&self, name: &str) -> Result<Vec<Vec<u8>>, BusError> {
        Err(no_quarantine(name))
    }

    /// Removes the entries of the quarantine `name` that `drop` picks,
    /// leaving the others in place; returns how many went.
    async fn quarantine_remove(
        &self,
        name: &str,
        _drop: &crate::bus::PickEntries,
    ) -> Result<usize, BusError> {
        Err(no_quarantine(name))
    }
}

/// Which entries of a quarantine to remove
/// ([`BusTransport::quarantine_remove`]).
pub type PickEntries = dyn for<'a> Fn(&'a [u8]) -> bool + Send + Sync;

fn no_quarantine(name: &str) -> BusError {
    BusError::op(
        format!("using quarantine `{name}`"),
        "this transport keeps no quarantine",
    )
}

/// A sink that queues deliveries on a channel, for tests and tools that
/// pull them one by one.
pub fn channel_sink() -> (Sink, async_channel::Receiver<Incoming>) {
    let (tx, rx) = async_channel::unbounded();
    let sink: Sink = Arc::new(move |incoming| {
        let tx = tx.clone();
        Box::pin(async move {
            if let Err(unsent) = tx.send(incoming).await {
                let _ = unsent.0.settle(Settle::Requeue).await;
            }
        })
    });
    (sink, rx)
}

/// Connects to the bus named by `uri`.
pub async fn connect(uri: &str) -> Result<Arc<dyn BusTransport>, BusError> {
    connect_as(uri, None).await
}

/// Connects, consuming as `owner` where the transport tracks what each
/// consumer holds (Redis: see [`BusTransport::restore_consumer`]).
pub async fn connect_as(uri: &str, owner: Option<&str>) -> Result<Arc<dyn BusTransport>, BusError> {
    Ok(match BusKind::of(uri)? {
        BusKind::Memory => Arc::new(memory::MemoryBus::new()),
        BusKind::Amqp => Arc::new(amqp::AmqpBus::connect(uri).await?),
        BusKind::Redis => Arc::new(redis::RedisBus::connect_as(uri, owner).await?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_transport_answers_for_its_uris() {
        let t = traits("memory://").unwrap();
        assert!(!t.shared && !t.hand_back_dead_consumers);
        let t = traits("amqp://h1;amqps://h2").unwrap();
        assert!(t.shared && t.redelivers_after.is_none());
        let t = traits("redis://h/0?visibility_timeout=7").unwrap();
        assert_eq!(t.redelivers_after, Some(std::time::Duration::from_secs(7)));
        assert!(t.hand_back_dead_consumers);
        for uri in [
            "amqp://h1;redis://h2",
            "redis://h1;amqp://h2",
            "memory://;amqp://h",
        ] {
            assert_eq!(traits(uri).unwrap_err(), amqp::FAILOVER_ONLY, "{uri}");
        }
        assert!(traits("nats://h")
            .unwrap_err()
            .contains("unsupported bus URI"));
        assert!(traits("redis://h/0?visibility_timeout=-1").is_err());
    }
}
