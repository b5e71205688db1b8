//! `amqp://` and `amqps://`: RabbitMQ through lapin.
//!
//! Topology as docs/protocol.md: a durable topic exchange, durable shared service
//! queues, replies through the default exchange. The host's own requests
//! wait on one reply queue per connection: by default a queue of its own
//! that an original Python service can declare again (see
//! [`super::reply_names`]), or RabbitMQ's direct reply-to; the caller's
//! reply queue is never re-declared.
//!
//! Here: the connection (with failover) and the transport's operations.
//! [`wire`] maps deliveries and properties, [`consume`] runs consumers and
//! settles their deliveries (with [`acks`] coalescing them), [`reply`]
//! owns the host's own reply queue.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use super::reply_names::{Note, ReplyName};
use super::{BusError, BusTransport, Consumer, Incoming, Outgoing, ReplyQueueKind, Sink};
use crate::redact::redact_uri;
use acks::AckBatcher;
use consume::{AmqpConsumers, Ending, Settling};
pub(crate) use wire::malformed;
use wire::{field_table, publish_on};

mod acks;
mod consume;
mod errors;
mod quarantine;
mod reply;
mod wire;

/// Why a failover list is refused: only AMQP fails over.
pub const FAILOVER_ONLY: &str = "a failover list takes amqp:// and amqps:// URIs only";

/// A broker shared by every worker, which gives back what a dead
/// consumer held by itself; every URI of a failover list must be AMQP.
pub fn traits(uri: &str) -> Result<super::BusTraits, String> {
    let all_amqp = uri
        .split(';')
        .all(|u| super::BusKind::of(u.trim()).ok() == Some(super::BusKind::Amqp));
    if !all_amqp {
        return Err(FAILOVER_ONLY.to_owned());
    }
    Ok(super::BusTraits {
        shared: true,
        redelivers_after: None,
        hand_back_dead_consumers: false,
    })
}

/// RabbitMQ's direct reply-to pseudo-queue.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// A RabbitMQ connection.
pub struct AmqpBus {
    uri: String,
    connection: Connection,
    /// Publishes requests and replies, and consumes direct reply-to (which
    /// RabbitMQ requires to be the publishing channel). Opened anew when
    /// the broker closed it (a publish to an exchange that was deleted),
    /// unless direct reply-to is consumed on it: its client then sees its
    /// replies end and connects again.
    publisher: tokio::sync::Mutex<Channel>,
    reply_queue_taken: AtomicBool,
    /// Direct reply-to is consumed on the publishing channel.
    direct_reply_to: AtomicBool,
    /// The named reply queue, to delete at close.
    named_reply: std::sync::Mutex<Option<(ReplyName, Option<Note>)>>,
    /// Cancelled once the connection has failed: ends every consumer.
    lost: tokio_util::sync::CancellationToken,
    /// How long a request's ack may wait to go out with others, in
    /// microseconds (`[bus] ack_window_us`; 0: each on its own).
    ack_window_us: AtomicU64,
    /// The consumer channels' ack batchers, flushed at close.
    batchers: std::sync::Mutex<Vec<Weak<AckBatcher>>>,
    /// The channel of `still_declared`'s passive declarations (one that
    /// finds nothing is closed by the broker, and opened anew next time).
    checker: tokio::sync::Mutex<Option<Channel>>,
    /// Cancelled by `close`: what it deletes is not declared again.
    closing: tokio_util::sync::CancellationToken,
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
        // lapin reports an unreadable URI as an I/O error: read each here,
        // so that it counts as the permanent error it is.
        for one in &uris {
            if let Err(reason) = one.parse::<lapin::uri::AMQPUri>() {
                return Err(BusError::connect(one, super::ConnectCause::Uri(reason)));
            }
        }
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
                    // lapin logs are off by default (the binary's logging.rs): this is the
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
            publisher: tokio::sync::Mutex::new(publisher),
            reply_queue_taken: AtomicBool::new(false),
            direct_reply_to: AtomicBool::new(false),
            named_reply: std::sync::Mutex::default(),
            lost,
            ack_window_us: AtomicU64::new(0),
            batchers: std::sync::Mutex::default(),
            checker: tokio::sync::Mutex::default(),
            closing: tokio_util::sync::CancellationToken::new(),
        })
    }
}

impl AmqpBus {
    /// The publishing channel; a new one if the broker closed it while the
    /// connection goes on (one publish to a missing exchange would
    /// otherwise fail every publish after it).
    async fn publisher(&self) -> Result<Channel, BusError> {
        let mut publisher = self.publisher.lock().await;
        let direct = self.direct_reply_to.load(Ordering::Relaxed);
        if publisher.status().connected() || direct || !self.connection.status().connected() {
            return Ok(publisher.clone());
        }
        let fail = |e: lapin::Error| lapin_error("opening a publishing channel", &e);
        let fresh = self.connection.create_channel().await.map_err(fail)?;
        fresh
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(fail)?;
        crate::throttled!(info!(
            "the broker closed the publishing channel (a publish it refused); opened a new one"
        ));
        *publisher = fresh.clone();
        Ok(fresh)
    }
}

/// `s` as an AMQP short string, or why it cannot be one.
pub(super) fn short(what: &'static str, s: &str) -> Result<lapin::types::ShortString, BusError> {
    lapin::types::ShortString::try_new(s).map_err(|_| BusError::TooLong {
        what,
        shown: s.chars().take(40).collect(),
        len: s.len(),
    })
}

/// A lapin error as a bus error: every lapin failure of an operation on a
/// connection leaves it (or the channel) unusable for the delivery.
pub(super) fn lapin_error(operation: impl Into<String>, e: &lapin::Error) -> BusError {
    BusError::lost(operation, e)
}

/// Whether a failed passive declaration says the object is not there
/// (NOT_FOUND), rather than that the connection failed.
fn is_not_found(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
    )
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

#[async_trait]
impl BusTransport for AmqpBus {
    fn describe(&self) -> String {
        self.uri.clone()
    }

    async fn quarantine_keep(&self, name: &str, entry: &[u8], bound: u32) -> Result<(), BusError> {
        quarantine::keep(&self.connection, name, entry, bound).await
    }

    async fn quarantine_read(&self, name: &str) -> Result<Vec<Vec<u8>>, BusError> {
        quarantine::read(&self.connection, name).await
    }

    async fn quarantine_remove(
        &self,
        name: &str,
        drop: &crate::bus::PickEntries,
    ) -> Result<usize, BusError> {
        quarantine::remove(&self.connection, name, drop).await
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
        self.publisher()
            .await?
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

    /// Passive declarations of the exchange and the queue, on a channel
    /// kept for them: 2 round trips. A deleted exchange takes its bindings
    /// along and RabbitMQ tells nobody; a deleted queue is also told by
    /// `basic.cancel`. A binding removed alone (`queue.unbind`) cannot be
    /// seen over AMQP.
    async fn still_declared(
        &self,
        exchange: &str,
        queue: &str,
        _routing_key: &str,
    ) -> Result<bool, BusError> {
        let operation = || format!("checking exchange `{exchange}` and queue `{queue}`");
        let mut slot = self.checker.lock().await;
        let channel = match &*slot {
            Some(c) if c.status().connected() => c.clone(),
            _ => {
                let c = self
                    .connection
                    .create_channel()
                    .await
                    .map_err(|e| lapin_error(operation(), &e))?;
                *slot = Some(c.clone());
                c
            }
        };
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        let checked = match channel
            .exchange_declare(
                short("exchange", exchange)?,
                ExchangeKind::Topic,
                passive,
                FieldTable::default(),
            )
            .await
        {
            Ok(()) => {
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                };
                channel
                    .queue_declare(short("queue", queue)?, passive, FieldTable::default())
                    .await
                    .map(drop)
            }
            Err(e) => Err(e),
        };
        match checked {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => {
                *slot = None;
                Ok(false)
            }
            Err(e) => {
                *slot = None;
                Err(lapin_error(operation(), &e))
            }
        }
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
        let (state, watching) = tokio::sync::watch::channel(super::ConsumerState::Consuming);
        let ending = Ending {
            ended: ended.clone(),
            state: Arc::new(state),
        };
        let consumers = AmqpConsumers::start(settling, queue, sink, prefetch, ending).await?;
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
            state: watching,
        })
    }

    async fn publish(&self, m: Outgoing<'_>) -> Result<(), BusError> {
        let confirm = publish_on(&self.publisher().await?, &m).await?;
        // A mandatory message's return comes before its confirm: awaiting
        // the confirm tells at once whether any queue took it.
        if !m.confirm && m.expires.is_none() {
            return Ok(());
        }
        let confirmed = confirm.await.map_err(|e| wire::publish_error(&m, &e))?;
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

    /// Sends every ack still waiting in a batcher (at most 2 s: a broker
    /// that stopped answering gets the requests back anyway).
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
            tracing::warn!("acks not all sent within 2 s; those requests may be delivered again");
        }
    }

    async fn close(&self) {
        self.closing.cancel();
        self.flush_acks().await;
        self.delete_named_reply_queue().await;
        // Again: a handler that answered while the reply queue was being
        // deleted recorded its ack after the first flush.
        self.flush_acks().await;
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

#[cfg(test)]
mod tests {
    use lapin::types::ShortString;

    /// lapin finds a consumer by `&str` in a map keyed by `ShortString`: a
    /// broker's `basic.cancel` reached no consumer while the patched type
    /// hashed more than its text (vendor/README.md).
    #[test]
    fn a_short_string_is_found_by_its_text() {
        let mut consumers = std::collections::HashMap::new();
        consumers.insert(ShortString::from("amq.ctag-1"), 1);
        let odd = ShortString::try_from_bytes(vec![b'a', 0xff]).expect("short");
        consumers.insert(odd.clone(), 2);
        assert_eq!(consumers.get("amq.ctag-1"), Some(&1));
        let parsed = ShortString::try_from_bytes(b"amq.ctag-1".to_vec()).expect("short");
        assert_eq!(consumers.get(parsed.as_str()), Some(&1));
        assert_eq!(consumers.get(&odd), Some(&2));
    }
}
