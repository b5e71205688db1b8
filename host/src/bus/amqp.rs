//! `amqp://` and `amqps://`: RabbitMQ through lapin.
//!
//! Topology as docs/protocol.md: a durable topic exchange, durable shared service
//! queues, replies through the default exchange. The host's own requests
//! use RabbitMQ's direct reply-to, one pseudo-queue per connection; the
//! caller's reply queue is never re-declared.

use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use super::{Acker, BusError, BusTransport, Consumer, Incoming, Outgoing, Prefetch, Settle, Sink};
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
    /// Cancelled once the connection has failed: ends every consumer.
    lost: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for AmqpBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBus").field("uri", &self.uri).finish()
    }
}

impl AmqpBus {
    /// Connects to `uri`.
    pub async fn connect(uri: &str) -> Result<Self, BusError> {
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
            lost,
        })
    }
}

/// A lapin delivery as the host sees it; `channel` (the one it came on)
/// if it must be settled.
fn incoming(delivery: lapin::message::Delivery, channel: Option<&Channel>) -> Incoming {
    let properties = &delivery.properties;
    Incoming {
        exchange: delivery.exchange.to_string(),
        routing_key: delivery.routing_key.to_string(),
        reply_to: properties.reply_to().as_ref().map(|s| s.to_string()),
        correlation_id: properties.correlation_id().as_ref().map(|s| s.to_string()),
        redelivered: delivery.redelivered,
        acker: channel.map(|channel| {
            Box::new(AmqpAcker {
                acker: delivery.acker,
                channel: channel.clone(),
            }) as Box<dyn Acker>
        }),
        body: delivery.data,
    }
}

/// The message properties of `m`, as kombu sets them.
fn properties(m: &Outgoing<'_>) -> BasicProperties {
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(if m.durable { 2 } else { 1 });
    if let Some(reply_to) = m.reply_to {
        properties = properties.with_reply_to(reply_to.into());
    }
    if let Some(correlation_id) = m.correlation_id {
        properties = properties.with_correlation_id(correlation_id.into());
    }
    properties
}

/// Publishes `m` on `channel`; the confirm is the caller's to await (in
/// confirm mode).
async fn publish_on(
    channel: &Channel,
    m: &Outgoing<'_>,
) -> Result<lapin::PublisherConfirm, BusError> {
    channel
        .basic_publish(
            m.exchange.into(),
            m.routing_key.into(),
            BasicPublishOptions::default(),
            m.body,
            properties(m),
        )
        .await
        .map_err(|e| BusError::op(format!("publishing to `{}`", m.routing_key), e))
}

/// Hands each delivery of a lapin consumer to `sink`, as a task lapin
/// spawns from its I/O thread: no stream to poll, no channel hop. `ended`
/// is cancelled when the consumer ends (cancelled, or its channel or
/// connection failed).
fn deliver_to(
    sink: Sink,
    channel: Channel,
    ended: Option<tokio_util::sync::CancellationToken>,
) -> impl lapin::ConsumerDelegate {
    move |delivery: lapin::message::DeliveryResult| {
        let answer = match delivery {
            Ok(Some(delivery)) => Some(sink(incoming(delivery, Some(&channel)))),
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
        let (channel, sink) = (self.channel.clone(), self.sink.clone());
        tokio::spawn(async move {
            let mut consumer = consumer;
            while let Some(Ok(delivery)) = consumer.next().await {
                tokio::spawn(sink(incoming(delivery, Some(&channel))));
            }
        });
        Ok(())
    }
}

async fn start_consumer(
    channel: &Channel,
    queue: &str,
    sink: &Sink,
    prefetch: u16,
    ended: Option<tokio_util::sync::CancellationToken>,
) -> Result<lapin::Consumer, BusError> {
    let fail = |e| BusError::op(format!("consuming `{queue}`"), e);
    channel
        .basic_qos(prefetch.max(1), BasicQosOptions { global: false })
        .await
        .map_err(fail)?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(fail)?;
    consumer.set_delegate(deliver_to(sink.clone(), channel.clone(), ended));
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
                start_consumer(&self.channel, &self.queue, &self.sink, more, None).await?;
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
    acker: lapin::Acker,
    /// The channel the delivery came on.
    channel: Channel,
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn settle(&self, how: Settle) -> Result<(), BusError> {
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
        .map_err(|e| BusError::op("basic.ack", e))
    }

    /// On the delivery's channel: the broker handles a channel's commands
    /// in order, so it has routed the reply before it takes the ack that
    /// follows. Without a confirm, as the reference and kombu publish.
    async fn publish_before_ack(&self, m: Outgoing<'_>) -> Option<Result<(), BusError>> {
        Some(publish_on(&self.channel, &m).await.map(drop))
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
        self.publisher
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                options,
                FieldTable::default(),
            )
            .await
            .map_err(|e| BusError::op(format!("declaring exchange `{exchange}`"), e))
    }

    async fn declare_queue(
        &self,
        exchange: &str,
        queue: &str,
        routing_key: &str,
    ) -> Result<(), BusError> {
        let options = QueueDeclareOptions {
            durable: true,
            exclusive: false,
            auto_delete: false,
            ..QueueDeclareOptions::default()
        };
        self.publisher
            .queue_declare(queue.into(), options, FieldTable::default())
            .await
            .map_err(|e| BusError::op(format!("declaring queue `{queue}`"), e))?;
        self.publisher
            .queue_bind(
                queue.into(),
                exchange.into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| BusError::op(format!("binding queue `{queue}` to `{routing_key}`"), e))
    }

    async fn consume(&self, queue: &str, prefetch: u16, sink: Sink) -> Result<Consumer, BusError> {
        let fail = |e| BusError::op(format!("consuming `{queue}`"), e);
        let channel = self.connection.create_channel().await.map_err(fail)?;
        let stop = tokio_util::sync::CancellationToken::new();
        let ended = self.lost.child_token();
        let base = start_consumer(&channel, queue, &sink, prefetch, Some(ended.clone())).await?;
        let consumers = std::sync::Arc::new(AmqpConsumers {
            channel,
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
        let fail = |e| BusError::op(format!("publishing to `{}`", m.routing_key), e);
        let confirm = publish_on(&self.publisher, &m).await?;
        if !m.confirm {
            return Ok(());
        }
        match confirm.await.map_err(fail)? {
            lapin::Confirmation::Nack(_) => Err(BusError::op(
                format!("publishing to `{}`", m.routing_key),
                "the broker refused the message (nack)",
            )),
            _ => Ok(()),
        }
    }

    async fn reply_queue(&self) -> Result<(String, async_channel::Receiver<Incoming>), BusError> {
        if self.reply_queue_taken.swap(true, Ordering::SeqCst) {
            return Err(BusError::op(
                "direct reply-to",
                "already consumed on this connection",
            ));
        }
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
        let (tx, rx) = async_channel::unbounded();
        // Replies to the host's own requests, auto-acked, until the
        // connection goes (the client sees the channel close).
        tokio::spawn(async move {
            let mut consumer = consumer;
            while let Some(Ok(delivery)) = consumer.next().await {
                if tx.send(incoming(delivery, None)).await.is_err() {
                    break;
                }
            }
        });
        Ok((DIRECT_REPLY_TO.to_owned(), rx))
    }

    async fn close(&self) {
        // A connection the broker already dropped may never answer
        // close-ok: do not wait for it forever.
        let closing = self.connection.close(200, "bye".into());
        match tokio::time::timeout(std::time::Duration::from_secs(2), closing).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "closing the connection"),
            Err(_) => tracing::debug!("no close-ok from the broker within 2 s"),
        }
    }
}
