//! `amqp://` and `amqps://`: RabbitMQ through lapin.
//!
//! Topology as docs/protocol.md: a durable topic exchange, durable shared service
//! queues, replies through the default exchange. The host's own requests
//! wait on one reply queue per connection: by default a queue of its own
//! that an original Python service can declare again (see
//! [`super::reply_names`]), or RabbitMQ's direct reply-to; the caller's
//! reply queue is never re-declared.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use super::amqp_acks::AckBatcher;
use super::reply_names::{abandoned_notes, Note, ReplyName};
use super::{
    Acker, BusError, BusTransport, Consumer, Incoming, Outgoing, Prefetch, ReplyQueueKind, Settle,
    Sink,
};
use crate::redact::redact_uri;

/// RabbitMQ's direct reply-to pseudo-queue.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// A RabbitMQ connection.
pub struct AmqpBus {
    uri: String,
    connection: Connection,
    /// Publishes requests and replies, and consumes direct reply-to (which
    /// RabbitMQ requires to be the publishing channel).
    publisher: Channel,
    reply_queue_taken: AtomicBool,
    /// The named reply queue, to delete at close.
    named_reply: std::sync::Mutex<Option<(ReplyName, Option<Note>)>>,
    /// Cancelled once the connection has failed: ends every consumer.
    lost: tokio_util::sync::CancellationToken,
    /// How long a request's ack may wait to go out with others, in
    /// microseconds (`[bus] ack_window_us`; 0: each on its own).
    ack_window_us: AtomicU64,
    /// The consumer channels' ack batchers, flushed at close.
    batchers: std::sync::Mutex<Vec<Weak<AckBatcher>>>,
}

impl std::fmt::Debug for AmqpBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBus").field("uri", &self.uri).finish()
    }
}

/// Where the next connection starts in a failover list: after the broker
/// the last one used, so a reconnect moves on (kombu's round robin).
static NEXT_BROKER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl AmqpBus {
    /// Connects to `uri`, or to the first broker of a failover list
    /// (`amqp://h1;amqp://h2`) that answers, starting after the one used
    /// last.
    pub async fn connect(uri: &str) -> Result<Self, BusError> {
        let uris: Vec<&str> = uri
            .split(';')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        let start = NEXT_BROKER.load(Ordering::Relaxed);
        let mut failure = BusError::UnsupportedUri(String::new());
        for k in 0..uris.len() {
            let i = (start + k) % uris.len();
            match Self::connect_one(uris[i]).await {
                Ok(bus) => {
                    NEXT_BROKER.store(i + 1, Ordering::Relaxed);
                    return Ok(bus);
                }
                Err(e) => {
                    if uris.len() > 1 {
                        tracing::warn!(bus = %redact_uri(uris[i]), error = %e, "broker unreachable; trying the next");
                    }
                    failure = e;
                }
            }
        }
        Err(failure)
    }

    async fn connect_one(uri: &str) -> Result<Self, BusError> {
        let redacted = redact_uri(uri);
        let fail = |e: lapin::Error| BusError::connect(uri, e);
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("commissaire-host pid {}", std::process::id()).into());
        let connection = Connection::connect(uri, properties).await.map_err(fail)?;
        let publisher = connection.create_channel().await.map_err(fail)?;
        // Publisher confirms, for `Outgoing::confirm` (`[bus]
        // confirm_replies`): such a reply counts as sent, and its request is
        // acked, only once the broker has taken it.
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(fail)?;
        // A failed connection does not reach consumers that have a delegate
        // (lapin 4): watch the connection itself.
        let lost = tokio_util::sync::CancellationToken::new();
        let mut events = connection.events_listener();
        let on_error = lost.clone();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                if let lapin::Event::Error(e) = event {
                    // A soft error closes one channel (a refused
                    // declaration, a refused publish): whoever used that
                    // channel sees it; the connection goes on.
                    if e.is_amqp_soft_error() {
                        tracing::debug!(error = %e, "a channel was closed by the broker");
                        continue;
                    }
                    // lapin logs are off by default (main.rs): this is the
                    // one event that says why.
                    tracing::warn!(error = %e, "the bus connection failed");
                    break;
                }
            }
            on_error.cancel();
        });
        Ok(Self {
            uri: redacted,
            connection,
            publisher,
            reply_queue_taken: AtomicBool::new(false),
            named_reply: std::sync::Mutex::default(),
            lost,
            ack_window_us: AtomicU64::new(0),
            batchers: std::sync::Mutex::default(),
        })
    }
}

/// Where a consumer's deliveries are settled: the channel they came on,
/// and its ack batcher when acks are coalesced.
#[derive(Clone)]
struct Settling {
    channel: Channel,
    batcher: Option<Arc<AckBatcher>>,
}

/// A lapin delivery as the host sees it; how to settle it, if it must be.
fn incoming(delivery: lapin::message::Delivery, settling: Option<&Settling>) -> Incoming {
    let properties = &delivery.properties;
    Incoming {
        exchange: delivery.exchange.to_string(),
        routing_key: delivery.routing_key.to_string(),
        reply_to: properties.reply_to().as_ref().map(|s| s.to_string()),
        correlation_id: properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_bytes().to_vec()),
        not_utf8: not_utf8(&delivery.exchange, &delivery.routing_key, properties),
        traceparent: properties.headers().as_ref().and_then(traceparent),
        redelivered: delivery.redelivered,
        acker: settling.map(|settling| {
            Box::new(AmqpAcker {
                tag: delivery.delivery_tag,
                acker: delivery.acker,
                settling: settling.clone(),
            }) as Box<dyn Acker>
        }),
        body: delivery.data,
    }
}

/// The first name or property of a delivery whose bytes are not UTF-8
/// (the broker passes any bytes through; the patched parser in `vendor/`
/// keeps them instead of failing the connection).
pub(crate) fn not_utf8(
    exchange: &lapin::types::ShortString,
    routing_key: &lapin::types::ShortString,
    p: &BasicProperties,
) -> Option<&'static str> {
    let strings = [
        ("routing_key", Some(routing_key)),
        ("exchange", Some(exchange)),
        ("reply_to", p.reply_to().as_ref()),
        ("correlation_id", p.correlation_id().as_ref()),
        ("message_id", p.message_id().as_ref()),
        ("app_id", p.app_id().as_ref()),
        ("type", p.kind().as_ref()),
        ("user_id", p.user_id().as_ref()),
        ("content_type", p.content_type().as_ref()),
        ("content_encoding", p.content_encoding().as_ref()),
        ("expiration", p.expiration().as_ref()),
        ("cluster_id", p.cluster_id().as_ref()),
    ];
    if let Some((name, _)) = strings
        .iter()
        .find(|(_, s)| s.is_some_and(|s| !s.is_utf8()))
    {
        return Some(name);
    }
    p.headers()
        .as_ref()
        .is_some_and(|h| !table_is_utf8(h, 0))
        .then_some("headers")
}

/// The `traceparent` header of `headers`, as text (a long or a short
/// string: senders use either).
fn traceparent(headers: &FieldTable) -> Option<String> {
    use lapin::types::AMQPValue;
    let bytes = match headers.inner().get(crate::trace::HEADER)? {
        AMQPValue::LongString(s) => s.as_bytes(),
        AMQPValue::ShortString(s) => s.as_bytes(),
        _ => return None,
    };
    if bytes.len() > crate::trace::MAX_HEADER {
        return None;
    }
    std::str::from_utf8(bytes).ok().map(str::to_owned)
}

/// Whether every key (and short-string value) of `table` and the tables
/// in it is UTF-8; nesting past 16 levels counts as not.
fn table_is_utf8(table: &FieldTable, depth: u8) -> bool {
    use lapin::types::AMQPValue;
    fn value_is_utf8(v: &AMQPValue, depth: u8) -> bool {
        match v {
            AMQPValue::ShortString(s) => s.is_utf8(),
            AMQPValue::FieldTable(t) => table_is_utf8(t, depth + 1),
            AMQPValue::FieldArray(a) => a.as_slice().iter().all(|v| value_is_utf8(v, depth + 1)),
            _ => true,
        }
    }
    depth < 16
        && table
            .inner()
            .iter()
            .all(|(k, v)| k.is_utf8() && value_is_utf8(v, depth))
}

/// `s` as an AMQP short string, or why it cannot be one.
fn short(what: &'static str, s: &str) -> Result<lapin::types::ShortString, BusError> {
    lapin::types::ShortString::try_new(s).map_err(|_| BusError::TooLong {
        what,
        shown: s.chars().take(40).collect(),
        len: s.len(),
    })
}

/// A lapin error as a bus error: every lapin failure of an operation on a
/// connection leaves it (or the channel) unusable for the delivery.
fn lapin_error(operation: impl Into<String>, e: &lapin::Error) -> BusError {
    BusError::lost(operation, e)
}

/// A failed declaration: the broker's refusal (PRECONDITION_FAILED: the
/// queue exists with other arguments; ACCESS_REFUSED) is permanent, and its
/// text names the difference; anything else is a lost connection.
fn refusal_or_lost(operation: String, e: &lapin::Error) -> BusError {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => BusError::Refused {
            operation,
            reason: amqp.get_message().to_string(),
        },
        _ => lapin_error(operation, e),
    }
}

/// Queue arguments as an AMQP field table.
fn field_table(arguments: &super::QueueArguments) -> FieldTable {
    use crate::config::QueueArgument;
    use lapin::types::AMQPValue;
    let mut table = FieldTable::default();
    for (name, value) in arguments {
        let value = match value {
            QueueArgument::Text(s) => AMQPValue::LongString(s.as_str().into()),
            QueueArgument::Integer(i) => AMQPValue::LongLongInt(*i),
            QueueArgument::Bool(b) => AMQPValue::Boolean(*b),
            QueueArgument::Float(f) => AMQPValue::Double(*f),
        };
        if let Ok(name) = lapin::types::ShortString::try_new(name.as_str()) {
            table.insert(name, value);
        }
    }
    table
}

/// The message properties of `m`, as kombu sets them.
fn properties(m: &Outgoing<'_>) -> Result<BasicProperties, BusError> {
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(if m.durable { 2 } else { 1 });
    if let Some(reply_to) = m.reply_to {
        properties = properties.with_reply_to(short("reply_to", reply_to)?);
    }
    if let Some(ttl) = m.expires {
        // At least 1 ms: 0 would mean "deliver now or drop".
        let ms = ttl.as_millis().clamp(1, u128::from(u32::MAX));
        properties = properties.with_expiration(ms.to_string().into());
    }
    if let Some(correlation_id) = m.correlation_id {
        let id =
            lapin::types::ShortString::try_from_bytes(correlation_id.to_vec()).map_err(|_| {
                BusError::TooLong {
                    what: "correlation_id",
                    shown: String::from_utf8_lossy(&correlation_id[..40.min(correlation_id.len())])
                        .into_owned(),
                    len: correlation_id.len(),
                }
            })?;
        properties = properties.with_correlation_id(id);
    }
    if let Some(traceparent) = m.traceparent {
        let mut headers = FieldTable::default();
        headers.insert(
            crate::trace::HEADER.into(),
            lapin::types::AMQPValue::LongString(traceparent.into()),
        );
        properties = properties.with_headers(headers);
    }
    Ok(properties)
}

/// Publishes `m` on `channel`; the confirm is the caller's to await (in
/// confirm mode).
async fn publish_on(
    channel: &Channel,
    m: &Outgoing<'_>,
) -> Result<lapin::PublisherConfirm, BusError> {
    let (exchange, routing_key) = (
        short("exchange", m.exchange)?,
        short("routing key", m.routing_key)?,
    );
    channel
        .basic_publish(
            exchange,
            routing_key,
            BasicPublishOptions {
                mandatory: m.expires.is_some(),
                ..BasicPublishOptions::default()
            },
            m.body,
            properties(m)?,
        )
        .await
        .map_err(|e| lapin_error(format!("publishing to `{}`", m.routing_key), &e))
}

/// Hands each delivery of a lapin consumer to `sink`, as a task lapin
/// spawns from its I/O thread: no stream to poll, no channel hop. `ended`
/// is cancelled when the consumer ends (cancelled, or its channel or
/// connection failed).
fn deliver_to(
    sink: Sink,
    settling: Settling,
    ended: Option<tokio_util::sync::CancellationToken>,
) -> impl lapin::ConsumerDelegate {
    move |delivery: lapin::message::DeliveryResult| {
        let answer = match delivery {
            Ok(Some(delivery)) => Some(sink(incoming(delivery, Some(&settling)))),
            Ok(None) => {
                if let Some(ended) = &ended {
                    ended.cancel();
                }
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "consuming failed");
                if let Some(ended) = &ended {
                    ended.cancel();
                }
                None
            }
        };
        async move {
            if let Some(answer) = answer {
                answer.await;
            }
        }
    }
}

/// A queue's consumers on one channel, and their prefetch.
///
/// Limits are per consumer (`basic.qos` with `global = false`), as in
/// RabbitMQ's guidance: a channel-wide limit makes the broker coordinate
/// every delivery with the channel, which cost about 30% of throughput in
/// the A/B benchmark. A consumer's limit is fixed when it starts, so a
/// raise starts an overflow consumer of the same queue on the same channel
/// with the difference, and lowering cancels overflow consumers (their
/// unsettled deliveries are still settled on the channel).
struct AmqpConsumers {
    channel: Channel,
    settling: Settling,
    queue: String,
    sink: Sink,
    base: (lapin::Consumer, u16),
    overflow: tokio::sync::Mutex<Vec<(lapin::Consumer, u16)>>,
}

impl AmqpConsumers {
    /// Cancels every consumer (on stop).
    async fn cancel_all(&self) {
        let overflow = std::mem::take(&mut *self.overflow.lock().await);
        let all = std::iter::once(self.base.0.clone()).chain(overflow.into_iter().map(|o| o.0));
        for consumer in all {
            if let Err(e) = self.cancel(consumer).await {
                tracing::debug!(error = %e, "basic.cancel failed (connection closing)");
            }
        }
    }

    /// Cancels `consumer`. Deliveries the broker sent before it took the
    /// cancel still arrive, but lapin no longer hands them to the delegate
    /// once `basic.cancel` is sent: they are drained from the consumer's
    /// stream into the sink, never left unacked on the channel.
    async fn cancel(&self, consumer: lapin::Consumer) -> Result<(), BusError> {
        self.channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await
            .map_err(|e| BusError::op("basic.cancel", e))?;
        let (settling, sink) = (self.settling.clone(), self.sink.clone());
        tokio::spawn(async move {
            let mut consumer = consumer;
            while let Some(Ok(delivery)) = consumer.next().await {
                tokio::spawn(sink(incoming(delivery, Some(&settling))));
            }
        });
        Ok(())
    }
}

async fn start_consumer(
    settling: &Settling,
    queue: &str,
    sink: &Sink,
    prefetch: u16,
    ended: Option<tokio_util::sync::CancellationToken>,
) -> Result<lapin::Consumer, BusError> {
    let fail = |e| BusError::op(format!("consuming `{queue}`"), e);
    let channel = &settling.channel;
    channel
        .basic_qos(prefetch.max(1), BasicQosOptions { global: false })
        .await
        .map_err(fail)?;
    let consumer = channel
        .basic_consume(
            short("queue", queue)?,
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(fail)?;
    consumer.set_delegate(deliver_to(sink.clone(), settling.clone(), ended));
    Ok(consumer)
}

#[async_trait]
impl Prefetch for AmqpConsumers {
    async fn set(&self, limit: u16) -> Result<(), BusError> {
        let mut overflow = self.overflow.lock().await;
        let mut total = overflow
            .iter()
            .fold(self.base.1, |sum, o| sum.saturating_add(o.1));
        if limit > total {
            let more = limit - total;
            let consumer =
                start_consumer(&self.settling, &self.queue, &self.sink, more, None).await?;
            overflow.push((consumer, more));
            return Ok(());
        }
        while let Some((_, n)) = overflow.last() {
            if total - n < limit {
                break;
            }
            total -= n;
            if let Some((consumer, _)) = overflow.pop() {
                self.cancel(consumer).await?;
            }
        }
        Ok(())
    }
}

struct AmqpAcker {
    tag: u64,
    acker: lapin::Acker,
    settling: Settling,
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn settle(&self, how: Settle) -> Result<(), BusError> {
        if let Some(batcher) = &self.settling.batcher {
            return match how {
                Settle::Ack => {
                    batcher.ack(self.tag).await;
                    Ok(())
                }
                Settle::Requeue => batcher.requeue(self.tag).await,
            };
        }
        match how {
            Settle::Ack => self.acker.ack(BasicAckOptions::default()).await.map(drop),
            Settle::Requeue => self
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await
                .map(drop),
        }
        .map_err(|e| lapin_error("basic.ack", &e))
    }

    fn tag(&self) -> String {
        self.tag.to_string()
    }

    /// On the delivery's channel: the broker handles a channel's commands
    /// in order, so it has routed the reply before it takes the ack that
    /// follows. Without a confirm, as the reference and kombu publish.
    async fn publish_before_ack(&self, m: Outgoing<'_>) -> Option<Result<(), BusError>> {
        Some(publish_on(&self.settling.channel, &m).await.map(drop))
    }
}

#[async_trait]
impl BusTransport for AmqpBus {
    fn describe(&self) -> String {
        self.uri.clone()
    }

    async fn declare_exchange(&self, exchange: &str) -> Result<(), BusError> {
        let options = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let operation = || format!("declaring exchange `{exchange}`");
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(|e| lapin_error(operation(), &e))?;
        channel
            .exchange_declare(
                short("exchange", exchange)?,
                ExchangeKind::Topic,
                options,
                FieldTable::default(),
            )
            .await
            .map_err(|e| refusal_or_lost(operation(), &e))?;
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }

    async fn declare_queue(
        &self,
        exchange: &str,
        queue: &str,
        routing_key: &str,
        arguments: &super::QueueArguments,
    ) -> Result<(), BusError> {
        let options = QueueDeclareOptions {
            durable: true,
            exclusive: false,
            auto_delete: false,
            ..QueueDeclareOptions::default()
        };
        // A declaration the broker refuses (the queue exists with other
        // arguments) closes the channel we publish on: declare on a
        // channel of its own, and report the refusal as permanent.
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(|e| lapin_error(format!("declaring queue `{queue}`"), &e))?;
        let declared = channel
            .queue_declare(short("queue", queue)?, options, field_table(arguments))
            .await;
        if let Err(e) = declared {
            return Err(refusal_or_lost(format!("declaring queue `{queue}`"), &e));
        }
        let _ = channel.close(200, "declared".into()).await;
        self.publisher
            .queue_bind(
                short("queue", queue)?,
                short("exchange", exchange)?,
                short("routing key", routing_key)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| refusal_or_lost(format!("binding queue `{queue}` to `{routing_key}`"), &e))
    }

    async fn consume(&self, queue: &str, prefetch: u16, sink: Sink) -> Result<Consumer, BusError> {
        let fail = |e| BusError::op(format!("consuming `{queue}`"), e);
        let channel = self.connection.create_channel().await.map_err(fail)?;
        let window = Duration::from_micros(self.ack_window_us.load(Ordering::Relaxed));
        let batcher =
            (!window.is_zero()).then(|| AckBatcher::new(channel.clone(), window, prefetch));
        if let Some(batcher) = &batcher {
            let mut batchers = self
                .batchers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            batchers.retain(|b| b.strong_count() > 0);
            batchers.push(Arc::downgrade(batcher));
        }
        let settling = Settling {
            channel: channel.clone(),
            batcher,
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let ended = self.lost.child_token();
        let base = start_consumer(&settling, queue, &sink, prefetch, Some(ended.clone())).await?;
        let consumers = std::sync::Arc::new(AmqpConsumers {
            channel,
            settling,
            queue: queue.to_owned(),
            sink,
            base: (base, prefetch.max(1)),
            overflow: tokio::sync::Mutex::default(),
        });
        let (token, until, on_stop) = (stop.clone(), ended.clone(), consumers.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = token.cancelled() => on_stop.cancel_all().await,
                () = until.cancelled() => {}
            }
        });
        Ok(Consumer {
            stop,
            ended,
            prefetch: consumers,
        })
    }

    async fn publish(&self, m: Outgoing<'_>) -> Result<(), BusError> {
        let confirm = publish_on(&self.publisher, &m).await?;
        // A mandatory message's return comes before its confirm: awaiting
        // the confirm tells at once whether any queue took it.
        if !m.confirm && m.expires.is_none() {
            return Ok(());
        }
        let confirmed = confirm
            .await
            .map_err(|e| lapin_error(format!("publishing to `{}`", m.routing_key), &e))?;
        match confirmed {
            lapin::Confirmation::Nack(_) => Err(BusError::op(
                format!("publishing to `{}`", m.routing_key),
                "the broker refused the message (nack)",
            )),
            lapin::Confirmation::Ack(Some(_returned)) => Err(BusError::Unroutable {
                exchange: m.exchange.to_owned(),
                routing_key: m.routing_key.to_owned(),
            }),
            _ => Ok(()),
        }
    }

    async fn reply_queue(
        &self,
        kind: ReplyQueueKind,
    ) -> Result<(String, async_channel::Receiver<Incoming>), BusError> {
        if self.reply_queue_taken.swap(true, Ordering::SeqCst) {
            return Err(BusError::op(
                "reply queue",
                "already consumed on this connection",
            ));
        }
        match kind {
            ReplyQueueKind::Direct => self.consume_direct_reply_to().await,
            ReplyQueueKind::Named => self.consume_named_reply_queue().await,
        }
    }

    fn set_ack_window(&self, window: Duration) {
        let us = u64::try_from(window.as_micros()).unwrap_or(u64::MAX);
        self.ack_window_us.store(us, Ordering::Relaxed);
    }

    async fn close(&self) {
        self.flush_acks().await;
        self.delete_named_reply_queue().await;
        // A connection the broker already dropped may never answer
        // close-ok: do not wait for it forever.
        let closing = self.connection.close(200, "bye".into());
        match tokio::time::timeout(Duration::from_secs(2), closing).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "closing the connection"),
            Err(_) => tracing::debug!("no close-ok from the broker within 2 s"),
        }
    }
}

/// Replies to the host's own requests, auto-acked, until the consumer ends
/// (the client sees the channel close).
fn forward_replies(consumer: lapin::Consumer) -> async_channel::Receiver<Incoming> {
    let (tx, rx) = async_channel::unbounded();
    tokio::spawn(async move {
        let mut consumer = consumer;
        while let Some(Ok(delivery)) = consumer.next().await {
            if tx.send(incoming(delivery, None)).await.is_err() {
                break;
            }
        }
    });
    rx
}

impl AmqpBus {
    /// Sends every ack still waiting in a batcher, before the channels
    /// close (at most 2 s: a broker that stopped answering gets the
    /// requests back anyway).
    async fn flush_acks(&self) {
        let batchers: Vec<Arc<AckBatcher>> = self
            .batchers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let flushing = futures_util::future::join_all(batchers.iter().map(|b| b.flush(true)));
        if tokio::time::timeout(Duration::from_secs(2), flushing)
            .await
            .is_err()
        {
            tracing::warn!(
                "acks not all sent within 2 s at close; those requests may be delivered again"
            );
        }
    }

    async fn consume_direct_reply_to(
        &self,
    ) -> Result<(String, async_channel::Receiver<Incoming>), BusError> {
        let consumer = self
            .publisher
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| BusError::op("consuming direct reply-to", e))?;
        Ok((DIRECT_REPLY_TO.to_owned(), forward_replies(consumer)))
    }

    /// Declares the reply queue exactly as kombu's `SimpleQueue(name)`
    /// does, so that an original Python service replying with it declares
    /// the same thing again: a durable direct exchange, a durable queue
    /// (not exclusive, not auto-delete, no arguments: an `x-expires` would
    /// make that declaration fail), bound with the name as routing key.
    /// Replies through the default exchange reach it by name too.
    async fn consume_named_reply_queue(
        &self,
    ) -> Result<(String, async_channel::Receiver<Incoming>), BusError> {
        self.sweep_abandoned_reply_queues().await;
        let name = ReplyName::new();
        // Noted before it exists, so that no kill leaves it unnoted.
        let note = Note::write(&name, &self.uri);
        let owned = name.as_str().to_owned();
        let q = owned.as_str();
        let fail = |what: &str, e: lapin::Error| BusError::op(format!("{what} `{q}`"), e);
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(|e| fail("opening a channel for reply queue", e))?;
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                q.into(),
                ExchangeKind::Direct,
                durable_exchange,
                FieldTable::default(),
            )
            .await
            .map_err(|e| fail("declaring reply exchange", e))?;
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        // Held from here: close deletes what was declared even if a later
        // step fails.
        *self.named_reply_slot() = Some((name, note));
        channel
            .queue_declare(q.into(), durable_queue, FieldTable::default())
            .await
            .map_err(|e| fail("declaring reply queue", e))?;
        channel
            .queue_bind(
                q.into(),
                q.into(),
                q.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| fail("binding reply queue", e))?;
        let consumer = channel
            .basic_consume(
                q.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| fail("consuming reply queue", e))?;
        Ok((q.to_owned(), forward_replies(consumer)))
    }

    fn named_reply_slot(&self) -> std::sync::MutexGuard<'_, Option<(ReplyName, Option<Note>)>> {
        self.named_reply
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deletes the named reply queue and its exchange, if any; its note
    /// stays if that fails, for the next sweep.
    async fn delete_named_reply_queue(&self) {
        let Some((name, note)) = self.named_reply_slot().take() else {
            return;
        };
        let deleting = delete_reply_queue(&self.connection, name.as_str(), false);
        match tokio::time::timeout(Duration::from_secs(2), deleting).await {
            Ok(Ok(())) => {
                if let Some(note) = note {
                    note.remove();
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(queue = name.as_str(), error = %e, "cannot delete the reply queue; the next host started on this machine will")
            }
            Err(_) => {
                tracing::warn!(queue = name.as_str(), "no answer deleting the reply queue within 2 s; the next host started on this machine will")
            }
        }
    }

    /// Deletes the reply queues (and exchanges) that processes of this
    /// machine noted and left behind on this broker: killed, or a lost
    /// connection of this process. A queue that still has a consumer is
    /// left alone. Best effort: what fails is tried again next time.
    async fn sweep_abandoned_reply_queues(&self) {
        for (name, note) in abandoned_notes(&self.uri) {
            match delete_reply_queue(&self.connection, &name, true).await {
                Ok(()) => {
                    tracing::info!(queue = %name, "deleted a reply queue a stopped host left behind");
                    note.remove();
                }
                Err(e) if e.is_in_use() => {
                    tracing::warn!(queue = %name, "a noted reply queue is in use; left alone");
                    note.remove();
                }
                Err(e) => {
                    tracing::debug!(queue = %name, error = %e, "cannot delete an abandoned reply queue");
                }
            }
        }
    }
}

/// Why a reply queue could not be deleted.
#[derive(Debug)]
struct DeleteFailed(lapin::Error);

impl DeleteFailed {
    /// RabbitMQ refused an `if_unused` delete (PRECONDITION_FAILED): the
    /// queue has a consumer, or the exchange a binding.
    fn is_in_use(&self) -> bool {
        use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
        matches!(
            self.0.kind(),
            lapin::ErrorKind::ProtocolError(e)
                if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))
        )
    }
}

impl std::fmt::Display for DeleteFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Deletes reply queue `name` and its exchange, on a channel of their own
/// (a refused delete closes its channel). `if_unused`: only if nobody
/// consumes the queue and nothing else is bound to the exchange. Deleting
/// what does not exist succeeds on RabbitMQ.
async fn delete_reply_queue(
    connection: &Connection,
    name: &str,
    if_unused: bool,
) -> Result<(), DeleteFailed> {
    let channel = connection.create_channel().await.map_err(DeleteFailed)?;
    channel
        .queue_delete(
            name.into(),
            QueueDeleteOptions {
                if_unused,
                ..QueueDeleteOptions::default()
            },
        )
        .await
        .map_err(DeleteFailed)?;
    channel
        .exchange_delete(
            name.into(),
            ExchangeDeleteOptions {
                if_unused,
                ..ExchangeDeleteOptions::default()
            },
        )
        .await
        .map_err(DeleteFailed)?;
    let _ = channel.close(200, "bye".into()).await;
    Ok(())
}
