//! Bus transports: one trait, one implementation per URI scheme.
//!
//! The trait speaks of exchanges, queues, routing keys and acks: the
//! Commissaire model, which kombu also maps onto Redis.

use std::sync::Arc;

use async_trait::async_trait;

pub mod amqp;
pub mod amqp_acks;
pub mod memory;
pub mod redis;
pub mod reply_names;
pub mod topic;

pub use reply_names::ReplyQueueKind;

/// A transport failure. Messages never contain a password.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The URI is not one we serve.
    #[error(
        "unsupported bus URI {0} (expected amqp://, amqps://, redis://, rediss:// or memory://)"
    )]
    UnsupportedUri(String),
    /// Could not connect.
    #[error("cannot connect to {uri}: {cause}")]
    Connect {
        /// The redacted URI.
        uri: String,
        /// Why, kept whole for [`is_permanent`]. Its text is in this
        /// message (so that every log line carries it), hence not also
        /// returned by `source()`.
        cause: ConnectError,
    },
    /// A broker operation failed.
    #[error("{operation} failed: {reason}")]
    Operation {
        /// What was attempted.
        operation: String,
        /// Why.
        reason: String,
    },
    /// The connection (or the channel) went away during an operation:
    /// whatever was not settled goes back to its queue with it. Any other
    /// failure is taken as permanent for that message.
    #[error("{operation} failed: the connection is gone ({reason})")]
    Lost {
        /// What was attempted.
        operation: String,
        /// Why.
        reason: String,
    },
    /// The broker refused an operation for good (a queue declared with
    /// other arguments than it has, a permission; a Redis `reply_to` naming
    /// the transport's own keys, or a key that is not a list): retrying
    /// cannot help.
    #[error("{operation} refused: {reason}")]
    Refused {
        /// What was attempted.
        operation: String,
        /// The broker's reason.
        reason: String,
    },
    /// A request no queue is bound to take.
    #[error("no queue is bound to {routing_key} on exchange {exchange}")]
    Unroutable {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
    /// A name the transport cannot carry (an AMQP short string holds at
    /// most 255 bytes).
    #[error("{what} `{shown}` is {len} bytes long; at most 255 can be sent")]
    TooLong {
        /// What it names: a routing key, an exchange, a queue.
        what: &'static str,
        /// Its first bytes.
        shown: String,
        /// Its length.
        len: usize,
    },
    /// The transport is closed.
    #[error("the bus connection is closed")]
    Closed,
    /// A routing key no transport should be asked to carry.
    #[error(transparent)]
    RoutingKey(#[from] topic::RoutingKeyError),
}

impl BusError {
    /// A failed connection to `uri` (the URI as given: its password is
    /// redacted here, and scrubbed from the cause's message).
    pub(crate) fn connect(uri: &str, cause: impl Into<ConnectCause>) -> Self {
        let cause = cause.into();
        Self::Connect {
            uri: crate::redact::redact_uri(uri),
            cause: ConnectError {
                message: crate::redact::scrub(&cause.describe(), uri),
                cause: Box::new(cause),
            },
        }
    }

    pub(crate) fn op(operation: impl Into<String>, reason: impl ToString) -> Self {
        Self::Operation {
            operation: operation.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn lost(operation: impl Into<String>, reason: impl ToString) -> Self {
        Self::Lost {
            operation: operation.into(),
            reason: reason.to_string(),
        }
    }

    /// Whether retrying cannot help (see [`is_permanent`]).
    pub fn is_permanent(&self) -> bool {
        is_permanent(self)
    }

    /// Whether the connection went away (retrying on it is pointless; the
    /// broker gives unsettled deliveries back).
    pub fn is_lost(&self) -> bool {
        matches!(self, Self::Lost { .. } | Self::Closed)
    }

    /// Whether the broker refused the message for good (drop it at once).
    pub fn is_refused(&self) -> bool {
        matches!(self, Self::Refused { .. })
    }
}

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

    /// Whether other processes share it (worker processes need that).
    pub fn is_shared(self) -> bool {
        self != Self::Memory
    }
}

/// Queue declaration arguments (`x-queue-type`, ...), by name.
pub type QueueArguments = std::collections::BTreeMap<String, crate::config::QueueArgument>;

/// Why a connection could not be made: the transport's own error, and its
/// message with the URI's password scrubbed out (`Debug` shows only that).
pub struct ConnectError {
    // Boxed: lapin's and redis-rs's errors are large, and every `Result`
    // of the bus carries a `BusError`.
    cause: Box<ConnectCause>,
    message: String,
}

impl ConnectError {
    /// The transport's error.
    pub fn cause(&self) -> &ConnectCause {
        &self.cause
    }
}

impl std::fmt::Debug for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectError")
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The error a transport's client library gave when connecting.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConnectCause {
    /// The URI cannot be read.
    Uri(String),
    /// lapin's error (`amqp://`, `amqps://`).
    Amqp(lapin::Error),
    /// redis-rs's error (`redis://`, `rediss://`).
    Redis(::redis::RedisError),
}

impl ConnectCause {
    /// The message a user reads: for a broker's refusal, the broker's own
    /// words (`ACCESS_REFUSED - Login was refused …`) rather than lapin's
    /// wrapping of them.
    fn describe(&self) -> String {
        match self {
            Self::Uri(reason) => format!("bad URI: {reason}"),
            Self::Amqp(e) => match e.kind() {
                lapin::ErrorKind::ProtocolError(amqp) => amqp.get_message().to_string(),
                lapin::ErrorKind::IOError(io) if is_tls_failure(io) => format!("TLS failed: {io}"),
                _ => e.to_string(),
            },
            // redis-rs writes `description - Kind: detail`; the kind is its
            // Debug form, noise to a user.
            Self::Redis(e) => {
                let text = e.to_string();
                match (text.split_once(" - "), e.detail()) {
                    (Some((description, _)), Some(detail)) => format!("{description}: {detail}"),
                    (Some((description, _)), None) => description.to_owned(),
                    (None, _) => text,
                }
            }
        }
    }
}

impl From<lapin::Error> for ConnectCause {
    fn from(e: lapin::Error) -> Self {
        Self::Amqp(e)
    }
}

impl From<::redis::RedisError> for ConnectCause {
    fn from(e: ::redis::RedisError) -> Self {
        Self::Redis(e)
    }
}

/// Whether retrying cannot help: the broker refused the login or the vhost
/// (or Redis the password or the database), TLS failed, or the URI is
/// wrong. Everything else (refused or dropped connections, a broker
/// starting or stopping, timeouts) is worth retrying.
pub fn is_permanent(error: &BusError) -> bool {
    use ::redis::ErrorKind as RedisKind;
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    let cause = match error {
        BusError::UnsupportedUri(_)
        | BusError::Refused { .. }
        | BusError::TooLong { .. }
        | BusError::RoutingKey(_) => return true,
        BusError::Connect { cause, .. } => &*cause.cause,
        BusError::Operation { .. }
        | BusError::Lost { .. }
        | BusError::Unroutable { .. }
        | BusError::Closed => return false,
    };
    match cause {
        ConnectCause::Uri(_) => true,
        ConnectCause::Amqp(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(amqp) => matches!(
                amqp.kind(),
                // 403: the login; 530: the vhost (or the user's access to it); 402: a bad vhost name.
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                    | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED | AMQPHardError::INVALIDPATH)
            ),
            lapin::ErrorKind::AuthProviderError(_)
            | lapin::ErrorKind::InvalidProtocolVersion(_) => true,
            lapin::ErrorKind::IOError(io) => is_tls_failure(io),
            _ => false,
        },
        ConnectCause::Redis(e) => {
            matches!(
                e.kind(),
                RedisKind::AuthenticationFailed | RedisKind::InvalidClientConfig
            ) || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
                // SELECT of a database the server does not have.
                || e.to_string().contains("refused to switch database")
                || io_error_in(e).is_some_and(is_tls_failure)
        }
    }
}

/// rustls reports a failed handshake or certificate check, and a TLS
/// client talking to a plain port, as `InvalidData`; a dropped or refused
/// connection has kinds of its own.
fn is_tls_failure(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::InvalidData
}

fn io_error_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        next = e.source();
    }
    None
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
}

/// How to settle a delivery.
#[derive(Debug)]
pub enum Settle {
    /// Done: remove it from the queue.
    Ack,
    /// Not handled: give it back to the queue for another consumer.
    Requeue,
}

/// Settles one delivery with its transport.
#[async_trait]
pub trait Acker: Send + Sync {
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
    /// The first property or header key that was not valid UTF-8, if any:
    /// such a request is refused before it is parsed.
    pub not_utf8: Option<&'static str>,
    /// Whether it was delivered before.
    pub redelivered: bool,
    /// How to settle it; `None` for auto-acked deliveries (replies).
    pub acker: Option<Box<dyn Acker>>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("routing_key", &self.routing_key)
            .field("reply_to", &self.reply_to)
            .field("correlation_id", &self.correlation_id)
            .field("not_utf8", &self.not_utf8)
            .field("redelivered", &self.redelivered)
            .finish_non_exhaustive()
    }
}

impl Incoming {
    /// Publishes the reply to this delivery, ahead of its ack: confirmed by
    /// the broker if `m.confirm`, else on the delivery's own channel where
    /// the transport has one (see [`Acker::publish_before_ack`]).
    pub async fn publish_reply(
        &self,
        bus: &dyn BusTransport,
        m: Outgoing<'_>,
    ) -> Result<(), BusError> {
        if !m.confirm {
            if let Some(acker) = &self.acker {
                if let Some(published) = acker.publish_before_ack(m).await {
                    return published;
                }
            }
        }
        bus.publish(m).await
    }

    /// The delivery tag, for log lines (`-` for auto-acked deliveries).
    pub fn tag(&self) -> String {
        self.acker
            .as_ref()
            .map_or_else(|| "-".to_owned(), |a| a.tag())
    }

    /// Acks or requeues (no-op for auto-acked deliveries).
    pub async fn settle(&self, how: Settle) -> Result<(), BusError> {
        match &self.acker {
            Some(acker) => acker.settle(how).await,
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
/// the delivery's acker frees it. Lowering the limit while every slot is
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

/// One queue's consumer, until stopped.
pub struct Consumer {
    /// Stops the consumer: no more deliveries arrive after it.
    pub stop: tokio_util::sync::CancellationToken,
    /// Cancelled by the transport once deliveries have ended: after `stop`,
    /// or when the connection is lost.
    pub ended: tokio_util::sync::CancellationToken,
    /// Its prefetch limit.
    pub prefetch: std::sync::Arc<dyn Prefetch>,
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
        BusKind::Amqp => {
            // lapin reports an unreadable URI as an I/O error: read each
            // here, so that it counts as the permanent error it is.
            for one in uri.split(';').map(str::trim).filter(|u| !u.is_empty()) {
                if let Err(reason) = one.parse::<lapin::uri::AMQPUri>() {
                    return Err(BusError::connect(one, ConnectCause::Uri(reason)));
                }
            }
            Arc::new(amqp::AmqpBus::connect(uri).await?)
        }
        BusKind::Redis => Arc::new(redis::RedisBus::connect_as(uri, owner).await?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};

    fn amqp(kind: lapin::ErrorKind) -> BusError {
        BusError::connect(
            "amqp://guest:s3cret@127.0.0.1:5672/%2f",
            lapin::Error::from(kind),
        )
    }

    fn refused(kind: AMQPErrorKind, text: &str) -> BusError {
        amqp(lapin::ErrorKind::ProtocolError(AMQPError::new(
            kind,
            text.into(),
        )))
    }

    fn io(kind: std::io::ErrorKind) -> BusError {
        amqp(lapin::ErrorKind::IOError(Arc::new(std::io::Error::new(
            kind, "x",
        ))))
    }

    fn redis(e: ::redis::RedisError) -> BusError {
        BusError::connect("redis://:s3cret@127.0.0.1:6379/0", e)
    }

    #[test]
    fn refusals_that_retrying_cannot_change_are_permanent() {
        let login = refused(
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            "ACCESS_REFUSED - Login was refused",
        );
        assert!(is_permanent(&login));
        assert_eq!(
            login.to_string(),
            "cannot connect to amqp://guest:***@127.0.0.1:5672/%2f: ACCESS_REFUSED - Login was refused"
        );
        assert!(is_permanent(&refused(
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED),
            "NOT_ALLOWED - vhost nope not found"
        )));
        assert!(is_permanent(&io(std::io::ErrorKind::InvalidData)));
        assert!(is_permanent(&BusError::connect(
            "amqp://h:x/",
            ConnectCause::Uri("invalid port number".into())
        )));
        assert!(is_permanent(&BusError::UnsupportedUri("nats://h".into())));
        let wrong_password = redis(
            (
                ::redis::ErrorKind::AuthenticationFailed,
                "Password authentication failed",
            )
                .into(),
        );
        assert!(is_permanent(&wrong_password));
        assert_eq!(
            wrong_password.to_string(),
            "cannot connect to redis://:***@127.0.0.1:6379/0: Password authentication failed"
        );
        assert!(is_permanent(&redis(
            (
                ::redis::ErrorKind::InvalidClientConfig,
                "Invalid database number"
            )
                .into()
        )));
    }

    #[test]
    fn an_unreachable_or_restarting_broker_is_worth_retrying() {
        assert!(!is_permanent(&io(std::io::ErrorKind::ConnectionRefused)));
        assert!(!is_permanent(&io(std::io::ErrorKind::ConnectionReset)));
        assert!(!is_permanent(&refused(
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
            "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"
        )));
        assert!(!is_permanent(&amqp(
            lapin::ErrorKind::MissingHeartbeatError
        )));
        assert!(!is_permanent(&redis(::redis::RedisError::from(
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
        ))));
        assert!(!is_permanent(&BusError::Closed));
        assert!(!is_permanent(&BusError::op("declaring queue `q`", "x")));
    }

    #[test]
    fn the_password_is_scrubbed_from_the_cause() {
        let e = BusError::connect(
            "amqp://guest:s3cret@h/%2f",
            ConnectCause::Uri("s3cret is not a port".into()),
        );
        assert!(!e.to_string().contains("s3cret"), "{e}");
        assert!(!format!("{e:?}").contains("s3cret"), "{e:?}");
    }
}
