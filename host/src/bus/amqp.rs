//! `amqp://` and `amqps://`: RabbitMQ through lapin.
//!
//! Topology as PROTOCOL.md: a durable topic exchange, durable shared service
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

use super::{Acker, BusError, BusTransport, Consumer, Incoming, Outgoing, Prefetch, Settle};
use crate::redact::{redact_uri, scrub};

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
        let fail = |e: lapin::Error| BusError::Connect {
            uri: redacted.clone(),
            reason: scrub(&e.to_string(), uri),
        };
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("commissaire-host pid {}", std::process::id()).into());
        let connection = Connection::connect(uri, properties).await.map_err(fail)?;
        let publisher = connection.create_channel().await.map_err(fail)?;
        // Publisher confirms: a reply counts as sent (and its request is
        // acked) only once the broker has taken it, so a broker that goes
        // away in between cannot lose it (see `Outgoing::confirm`).
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(fail)?;
        Ok(Self {
            uri: redacted,
            connection,
            publisher,
            reply_queue_taken: AtomicBool::new(false),
        })
    }

    async fn forward(
        channel: Channel,
        mut consumer: lapin::Consumer,
        tx: async_channel::Sender<Incoming>,
        stop: tokio_util::sync::CancellationToken,
        acked: bool,
    ) {
        let tag = consumer.tag();
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => {
                    if let Err(e) = channel.basic_cancel(tag.clone(), BasicCancelOptions::default()).await {
                        tracing::debug!(error = %e, "basic.cancel failed (connection closing)");
                    }
                    break;
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let properties = &delivery.properties;
                        let incoming = Incoming {
                            exchange: delivery.exchange.to_string(),
                            routing_key: delivery.routing_key.to_string(),
                            reply_to: properties.reply_to().as_ref().map(|s| s.to_string()),
                            correlation_id: properties.correlation_id().as_ref().map(|s| s.to_string()),
                            redelivered: delivery.redelivered,
                            acker: acked.then(|| Box::new(AmqpAcker(delivery.acker)) as Box<dyn Acker>),
                            body: delivery.data,
                        };
                        if tx.send(incoming).await.is_err() {
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "consumer failed");
                        break;
                    }
                    None => break,
                },
            }
        }
    }
}

struct AmqpPrefetch(Channel);

#[async_trait]
impl Prefetch for AmqpPrefetch {
    async fn set(&self, limit: u16) -> Result<(), BusError> {
        self.0
            .basic_qos(limit, BasicQosOptions { global: true })
            .await
            .map_err(|e| BusError::op("basic.qos", e))
    }
}

struct AmqpAcker(lapin::Acker);

#[async_trait]
impl Acker for AmqpAcker {
    async fn settle(&self, how: Settle) -> Result<(), BusError> {
        match how {
            Settle::Ack => self.0.ack(BasicAckOptions::default()).await.map(drop),
            Settle::Requeue => self
                .0
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await
                .map(drop),
        }
        .map_err(|e| BusError::op("basic.ack", e))
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

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Consumer, BusError> {
        let fail = |e| BusError::op(format!("consuming `{queue}`"), e);
        let channel = self.connection.create_channel().await.map_err(fail)?;
        // One consumer per channel, with a channel-wide (global) limit:
        // RabbitMQ applies a new channel limit at once, a per-consumer one
        // only to later consumers.
        let limit = AmqpPrefetch(channel.clone());
        limit
            .set(prefetch)
            .await
            .map_err(|e| BusError::op(format!("consuming `{queue}`"), e))?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(fail)?;
        let (tx, deliveries) = async_channel::unbounded();
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(Self::forward(channel, consumer, tx, stop.clone(), true));
        Ok(Consumer {
            deliveries,
            stop,
            prefetch: std::sync::Arc::new(limit),
        })
    }

    async fn publish(&self, m: Outgoing<'_>) -> Result<(), BusError> {
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(if m.durable { 2 } else { 1 });
        if let Some(reply_to) = m.reply_to {
            properties = properties.with_reply_to(reply_to.into());
        }
        if let Some(correlation_id) = m.correlation_id {
            properties = properties.with_correlation_id(correlation_id.into());
        }
        let fail = |e| BusError::op(format!("publishing to `{}`", m.routing_key), e);
        let confirm = self
            .publisher
            .basic_publish(
                m.exchange.into(),
                m.routing_key.into(),
                BasicPublishOptions::default(),
                m.body,
                properties,
            )
            .await
            .map_err(fail)?;
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
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(Self::forward(
            self.publisher.clone(),
            consumer,
            tx,
            stop,
            false,
        ));
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
