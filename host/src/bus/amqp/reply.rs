//! The host's own reply queue on RabbitMQ: direct reply-to, or a named
//! queue declared as kombu's `SimpleQueue` does (see
//! [`crate::bus::reply_names`]), deleted at close, and the abandoned ones
//! of dead hosts swept.

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use super::consume::incoming;
use super::{AmqpBus, DIRECT_REPLY_TO};
use crate::bus::reply_names::{abandoned_notes, Note, ReplyName};
use crate::bus::{heal, BusError, Incoming};

/// Replies to the host's own requests, auto-acked, until the consumer ends
/// (the client sees the channel close). A named reply queue the broker
/// cancelled (deleted) on a channel that goes on is declared again on it
/// and consumed anew: the requests waiting keep waiting, and only replies
/// sent to it while it was gone are lost.
fn forward_replies(
    consumer: lapin::Consumer,
    named: Option<(lapin::Channel, String, CancellationToken)>,
) -> async_channel::Receiver<Incoming> {
    let (tx, rx) = async_channel::unbounded();
    tokio::spawn(async move {
        let mut consumer = consumer;
        loop {
            while let Some(Ok(delivery)) = consumer.next().await {
                if tx.send(incoming(delivery, None)).await.is_err() {
                    return;
                }
            }
            let Some((channel, name, closing)) = &named else {
                return;
            };
            // Deleted by our own `close`: gone for good.
            if closing.is_cancelled() {
                return;
            }
            let deaf_since = std::time::Instant::now();
            let mut again = None;
            // Bounded: a channel or connection that failed makes every
            // attempt fail, and the client then reconnects as a whole.
            for attempt in 0..heal::MAX_ATTEMPTS {
                if !channel.status().connected() || tx.is_closed() || closing.is_cancelled() {
                    return;
                }
                match declare_named(channel, name).await {
                    Ok(c) => {
                        again = Some(c);
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(queue = %name, attempt, error = %e, "declaring the reply queue again");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            match again {
                Some(c) => {
                    heal::redeclared(heal::Lost::ReplyQueue, name, deaf_since.elapsed());
                    consumer = c;
                }
                None => return,
            }
        }
    });
    rx
}

/// Declares the reply queue as kombu's `SimpleQueue(name)` does, on
/// `channel`, and consumes it (auto-ack).
async fn declare_named(channel: &lapin::Channel, q: &str) -> Result<lapin::Consumer, BusError> {
    let fail = |what: &str, e: lapin::Error| BusError::op(format!("{what} `{q}`"), e);
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
    channel
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
        .map_err(|e| fail("consuming reply queue", e))
}

impl AmqpBus {
    pub(super) async fn consume_direct_reply_to(
        &self,
    ) -> Result<(String, async_channel::Receiver<Incoming>), BusError> {
        self.direct_reply_to.store(true, Ordering::Relaxed);
        let consumer = self
            .publisher
            .lock()
            .await
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
        Ok((DIRECT_REPLY_TO.to_owned(), forward_replies(consumer, None)))
    }

    /// Declares the reply queue exactly as kombu's `SimpleQueue(name)`
    /// does, so that an original Python service replying with it declares
    /// the same thing again: a durable direct exchange, a durable queue
    /// (not exclusive, not auto-delete, no arguments: an `x-expires` would
    /// make that declaration fail), bound with the name as routing key.
    /// Replies through the default exchange reach it by name too.
    pub(super) async fn consume_named_reply_queue(
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
        // Held from here: close deletes what was declared even if a later
        // step fails.
        *self.named_reply_slot() = Some((name, note));
        let consumer = declare_named(&channel, q).await?;
        Ok((
            q.to_owned(),
            forward_replies(
                consumer,
                Some((channel, q.to_owned(), self.closing.clone())),
            ),
        ))
    }

    fn named_reply_slot(&self) -> std::sync::MutexGuard<'_, Option<(ReplyName, Option<Note>)>> {
        self.named_reply
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deletes the named reply queue and its exchange, if any; its note
    /// stays if that fails, for the next sweep.
    pub(super) async fn delete_named_reply_queue(&self) {
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
