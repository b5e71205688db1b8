//! A queue's consumers on one channel: deliveries handed to the sink as
//! they arrive, the prefetch raised and lowered with overflow consumers,
//! and each delivery settled on its channel (through the ack batcher when
//! acks are coalesced).

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::Channel;
use std::sync::Arc;

use super::acks::AckBatcher;
use super::wire::{malformed, publish_on, traceparent};
use super::{lapin_error, short};
use crate::bus::{BusError, ConsumerState, Incoming, Outgoing, Prefetch, Settle, Settlement, Sink};

/// Where a consumer's deliveries are settled: the channel they came on,
/// and its ack batcher when acks are coalesced.
#[derive(Clone)]
pub(super) struct Settling {
    pub(super) channel: Channel,
    pub(super) batcher: Option<Arc<AckBatcher>>,
}

/// How a queue's base consumer tells how it ended.
#[derive(Clone)]
pub(super) struct Ending {
    /// Cancelled when its channel or connection failed.
    pub(super) ended: tokio_util::sync::CancellationToken,
    /// Set to [`ConsumerState::Cancelled`] when the broker cancelled it
    /// (its queue deleted) on a channel that goes on.
    pub(super) state: Arc<tokio::sync::watch::Sender<ConsumerState>>,
}

/// Hands each delivery of a lapin consumer to `sink`, as a task lapin
/// spawns from its I/O thread: no stream to poll, no channel hop. `ending`
/// says when the consumer ends: cancelled by the broker, or its channel or
/// connection failed. (A consumer we cancel ourselves has no delegate any
/// more when its end comes: see [`AmqpConsumers::cancel`].)
fn deliver_to(
    sink: Sink,
    settling: Settling,
    ending: Option<Ending>,
) -> impl lapin::ConsumerDelegate {
    move |delivery: lapin::message::DeliveryResult| {
        let answer = match delivery {
            Ok(Some(delivery)) => Some(sink(incoming(delivery, Some(&settling)))),
            Ok(None) => {
                if let Some(ending) = &ending {
                    // A `basic.cancel` from the broker leaves the channel
                    // open; a failed channel or connection does not.
                    if settling.channel.status().connected() {
                        ending.state.send_replace(ConsumerState::Cancelled);
                    } else {
                        ending.ended.cancel();
                    }
                }
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "consuming failed");
                if let Some(ending) = &ending {
                    ending.ended.cancel();
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
pub(super) struct AmqpConsumers {
    channel: Channel,
    settling: Settling,
    queue: String,
    sink: Sink,
    base: (lapin::Consumer, u16),
    overflow: tokio::sync::Mutex<Vec<(lapin::Consumer, u16)>>,
}

impl AmqpConsumers {
    /// Starts consuming `queue` on the settling channel with `prefetch`;
    /// `ending` tells when the consumer ends.
    pub(super) async fn start(
        settling: Settling,
        queue: &str,
        sink: Sink,
        prefetch: u16,
        ending: Ending,
    ) -> Result<Arc<Self>, BusError> {
        let base = start_consumer(&settling, queue, &sink, prefetch, Some(ending)).await?;
        Ok(Arc::new(Self {
            channel: settling.channel.clone(),
            settling,
            queue: queue.to_owned(),
            sink,
            base: (base, prefetch.max(1)),
            overflow: tokio::sync::Mutex::default(),
        }))
    }

    /// Cancels every consumer (on stop).
    pub(super) async fn cancel_all(&self) {
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
    ending: Option<Ending>,
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
    consumer.set_delegate(deliver_to(sink.clone(), settling.clone(), ending));
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

pub(super) struct AmqpSettlement {
    tag: u64,
    acker: lapin::Acker,
    settling: Settling,
}

impl AmqpSettlement {
    /// How delivery `tag` is settled, on `settling`.
    pub(super) fn boxed(tag: u64, acker: lapin::Acker, settling: Settling) -> Box<dyn Settlement> {
        Box::new(Self {
            tag,
            acker,
            settling,
        })
    }
}

#[async_trait]
impl Settlement for AmqpSettlement {
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

/// A lapin delivery as the host sees it; how to settle it, if it must be.
pub(super) fn incoming(
    delivery: lapin::message::Delivery,
    settling: Option<&Settling>,
) -> Incoming {
    let properties = &delivery.properties;
    Incoming {
        exchange: delivery.exchange.to_string(),
        routing_key: delivery.routing_key.to_string(),
        reply_to: properties.reply_to().as_ref().map(|s| s.to_string()),
        correlation_id: properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_bytes().to_vec()),
        malformed: malformed(&delivery.exchange, &delivery.routing_key, properties),
        traceparent: properties.headers().as_ref().and_then(traceparent),
        redelivered: delivery.redelivered,
        settlement: settling.map(|settling| {
            AmqpSettlement::boxed(delivery.delivery_tag, delivery.acker, settling.clone())
        }),
        body: delivery.data,
    }
}
