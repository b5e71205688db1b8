//! A raw AMQP caller for the tests, as the Python clients call: publish to
//! the exchange, wait on the reply queue of their choice.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;

use crate::host::{amqp_uri, unique};

/// The kinds of reply queue a caller may wait on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyQueue {
    /// kombu's `SimpleQueue('response-<uuid>')` with its defaults: durable.
    KombuDurable,
    /// Commissaire's `BusMixin.request`: auto-delete, not durable.
    AutoDelete,
    /// An exclusive, server-named queue.
    ExclusiveServerNamed,
    /// RabbitMQ's direct reply-to.
    DirectReplyTo,
}

/// A raw AMQP caller, like the Python clients: publishes to the exchange
/// and waits on the reply queue of its choice.
pub struct AmqpCaller {
    conn: Connection,
    channel: Channel,
    exchange: String,
    content_type: String,
    reply_timeout: Duration,
}

impl std::fmt::Debug for AmqpCaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpCaller")
            .field("exchange", &self.exchange)
            .finish()
    }
}

/// A reply as received.
#[derive(Debug)]
pub struct ReceivedReply {
    /// The body, decoded.
    pub body: Value,
    /// Its correlation id.
    pub correlation_id: Option<String>,
    /// Its content type.
    pub content_type: Option<String>,
}

impl AmqpCaller {
    /// Connects to the test broker.
    pub async fn connect(exchange: &str) -> Self {
        let conn = Connection::connect(&amqp_uri(), ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = conn.create_channel().await.expect("channel");
        Self {
            conn,
            channel,
            exchange: exchange.to_owned(),
            content_type: "application/json".to_owned(),
            reply_timeout: Duration::from_secs(30),
        }
    }

    /// The same caller, waiting up to `timeout` for each reply (30 s
    /// unless told).
    pub fn with_reply_timeout(mut self, timeout: Duration) -> Self {
        self.reply_timeout = timeout;
        self
    }

    /// The same caller, its requests sent with `content_type` (kombu's
    /// `text/plain` for a string it publishes as is) instead of
    /// `application/json`.
    pub fn with_content_type(mut self, content_type: &str) -> Self {
        content_type.clone_into(&mut self.content_type);
        self
    }

    /// Publishes raw `body` on `routing_key` (no reply wanted).
    pub async fn publish(&self, routing_key: &str, body: &[u8], properties: BasicProperties) {
        self.channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("publish");
    }

    /// Sends `body` with a reply queue of `kind` and waits for the reply.
    pub async fn call(
        &self,
        routing_key: &str,
        body: &[u8],
        kind: ReplyQueue,
        correlation_id: Option<&str>,
    ) -> ReceivedReply {
        let (data, reply) = self.call_raw(routing_key, body, kind, correlation_id).await;
        ReceivedReply {
            body: serde_json::from_slice(&data).expect("reply is JSON"),
            ..reply
        }
    }

    /// As [`AmqpCaller::call`], with the reply's bytes as they came (for
    /// JSON a `Value` cannot hold, such as a number `1e400`); `body` is
    /// left `null`.
    pub async fn call_raw(
        &self,
        routing_key: &str,
        body: &[u8],
        kind: ReplyQueue,
        correlation_id: Option<&str>,
    ) -> (Vec<u8>, ReceivedReply) {
        let ch = self.conn.create_channel().await.expect("channel");
        let (queue, no_ack) = match kind {
            ReplyQueue::DirectReplyTo => ("amq.rabbitmq.reply-to".to_owned(), true),
            ReplyQueue::ExclusiveServerNamed => {
                let q = ch
                    .queue_declare(
                        "".into(),
                        QueueDeclareOptions {
                            exclusive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .expect("declare");
                (q.name().to_string(), false)
            }
            ReplyQueue::KombuDurable | ReplyQueue::AutoDelete => {
                let name = unique("response");
                let options = if kind == ReplyQueue::KombuDurable {
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    }
                } else {
                    QueueDeclareOptions {
                        auto_delete: true,
                        ..Default::default()
                    }
                };
                ch.queue_declare(name.as_str().into(), options, FieldTable::default())
                    .await
                    .expect("declare");
                (name, false)
            }
        };
        let mut consumer = ch
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut properties = BasicProperties::default()
            .with_content_type(self.content_type.as_str().into())
            .with_reply_to(queue.as_str().into());
        if let Some(c) = correlation_id {
            properties = properties.with_correlation_id(c.into());
        }
        ch.basic_publish(
            self.exchange.as_str().into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("publish");
        // Generous: a test's own build of the fixtures may load the
        // machine; a deadlock still shows (no reply ever comes).
        let delivery = tokio::time::timeout(self.reply_timeout, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("a reply within {:?}", self.reply_timeout))
            .expect("consumer open")
            .expect("delivery");
        if !no_ack {
            let _ = delivery.acker.ack(Default::default()).await;
        }
        if kind == ReplyQueue::KombuDurable {
            let _ = ch
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = ch.close(200, "bye".into()).await;
        let reply = ReceivedReply {
            body: Value::Null,
            correlation_id: delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(|s| s.to_string()),
            content_type: delivery
                .properties
                .content_type()
                .as_ref()
                .map(|s| s.to_string()),
        };
        (delivery.data, reply)
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.conn.close(200, "bye".into()).await;
    }
}
