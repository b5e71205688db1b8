//! `memory://`: an embedded in-process bus with the broker's semantics
//! (topic exchanges, competing consumers on shared queues, the default
//! exchange routing by queue name, `reply_to`, requeue), so that the host
//! runs with no broker and tests are fast. One process only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;

use super::BusTraits;
use super::{
    topic, BusError, BusTransport, Consumer, Incoming, Outgoing, PrefetchSlots, Settle, Settlement,
    Sink,
};

type Queue = (
    async_channel::Sender<Incoming>,
    async_channel::Receiver<Incoming>,
);

#[derive(Default)]
struct State {
    bindings: Vec<(String, String, String)>,
    queues: HashMap<String, Queue>,
    /// Quarantines, by name: the newest entries at the back.
    quarantines: HashMap<String, std::collections::VecDeque<Vec<u8>>>,
}

/// In one process: workers cannot share it, and nothing outlives its
/// consumer.
pub const TRAITS: BusTraits = BusTraits {
    shared: false,
    redelivers_after: None,
    hand_back_dead_consumers: false,
};

/// The embedded bus.
#[derive(Default, Clone)]
pub struct MemoryBus {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryBus")
    }
}

impl MemoryBus {
    /// A new, empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn queue(&self, name: &str) -> Queue {
        self.state()
            .queues
            .entry(name.to_owned())
            .or_insert_with(async_channel::unbounded)
            .clone()
    }
}

/// Settles one delivery: a requeue puts a copy back, marked redelivered;
/// either way its prefetch slot is freed.
struct MemorySettlement {
    pending: Mutex<Option<(async_channel::Sender<Incoming>, Incoming)>>,
    slot: Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
}

#[async_trait]
impl Settlement for MemorySettlement {
    async fn settle(&self, how: Settle) -> Result<(), BusError> {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(
            self.slot
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        if let (Settle::Requeue, Some((queue, mut message))) = (how, pending) {
            message.redelivered = true;
            queue.send(message).await.map_err(|_| BusError::Closed)?;
        }
        Ok(())
    }

    fn tag(&self) -> String {
        "memory".to_owned()
    }
}

fn copy(m: &Incoming) -> Incoming {
    Incoming {
        exchange: m.exchange.clone(),
        routing_key: m.routing_key.clone(),
        body: m.body.clone(),
        reply_to: m.reply_to.clone(),
        correlation_id: m.correlation_id.clone(),
        malformed: m.malformed,
        traceparent: m.traceparent.clone(),
        redelivered: m.redelivered,
        deadline: m.deadline,
        settlement: None,
    }
}

#[async_trait]
impl BusTransport for MemoryBus {
    fn describe(&self) -> String {
        "memory://".to_owned()
    }

    async fn quarantine_keep(&self, name: &str, entry: &[u8], bound: u32) -> Result<(), BusError> {
        let mut state = self.state();
        let kept = state.quarantines.entry(name.to_owned()).or_default();
        kept.push_back(entry.to_vec());
        while kept.len() > bound as usize {
            kept.pop_front();
        }
        Ok(())
    }

    async fn quarantine_read(&self, name: &str) -> Result<Vec<Vec<u8>>, BusError> {
        let state = self.state();
        Ok(state
            .quarantines
            .get(name)
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn quarantine_remove(
        &self,
        name: &str,
        drop: &crate::bus::PickEntries,
    ) -> Result<usize, BusError> {
        let mut state = self.state();
        let Some(kept) = state.quarantines.get_mut(name) else {
            return Ok(0);
        };
        let before = kept.len();
        kept.retain(|e| !drop(e));
        Ok(before - kept.len())
    }

    async fn declare_exchange(&self, _exchange: &str) -> Result<(), BusError> {
        Ok(())
    }

    async fn declare_queue(
        &self,
        exchange: &str,
        queue: &str,
        routing_key: &str,
        _arguments: &super::QueueArguments,
    ) -> Result<(), BusError> {
        self.queue(queue);
        let binding = (
            exchange.to_owned(),
            routing_key.to_owned(),
            queue.to_owned(),
        );
        let mut state = self.state();
        if !state.bindings.contains(&binding) {
            state.bindings.push(binding);
        }
        Ok(())
    }

    async fn consume(&self, queue: &str, prefetch: u16, sink: Sink) -> Result<Consumer, BusError> {
        // Like a broker: at most `prefetch` unsettled deliveries per
        // consumer; the rest stay in the shared queue for other consumers.
        let (shared_tx, shared) = self.queue(queue);
        let limit = Arc::new(PrefetchSlots::new(prefetch));
        let slots = limit.clone();
        let stop = tokio_util::sync::CancellationToken::new();
        let ended = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let on_end = ended.clone();
        tokio::spawn(async move {
            let _ended = on_end.drop_guard();
            loop {
                let slot = tokio::select! {
                    biased;
                    () = token.cancelled() => break,
                    slot = slots.acquire() => match slot { Some(s) => s, None => break },
                };
                let mut message = tokio::select! {
                    biased;
                    () = token.cancelled() => break,
                    m = shared.recv() => match m { Ok(m) => m, Err(_) => break },
                };
                message.settlement = Some(Box::new(MemorySettlement {
                    pending: Mutex::new(Some((shared_tx.clone(), copy(&message)))),
                    slot: Mutex::new(Some(slot)),
                }));
                tokio::spawn(sink(message));
            }
        });
        Ok(Consumer {
            stop,
            ended,
            prefetch: limit,
            state: super::always_consuming(),
        })
    }

    async fn publish(&self, m: Outgoing<'_>) -> Result<(), BusError> {
        let targets: Vec<async_channel::Sender<Incoming>> = {
            let state = self.state();
            if m.exchange.is_empty() {
                state
                    .queues
                    .get(m.routing_key)
                    .map(|q| q.0.clone())
                    .into_iter()
                    .collect()
            } else {
                let mut names: Vec<&str> = state
                    .bindings
                    .iter()
                    .filter(|(ex, pattern, _)| {
                        ex == m.exchange && topic::matches(pattern, m.routing_key)
                    })
                    .map(|(_, _, q)| q.as_str())
                    .collect();
                names.sort_unstable();
                names.dedup();
                names
                    .iter()
                    .filter_map(|n| state.queues.get(*n).map(|q| q.0.clone()))
                    .collect()
            }
        };
        if targets.is_empty() && m.expires.is_some() {
            return Err(BusError::Unroutable {
                exchange: m.exchange.to_owned(),
                routing_key: m.routing_key.to_owned(),
            });
        }
        for queue in targets {
            let message = Incoming {
                exchange: m.exchange.to_owned(),
                routing_key: m.routing_key.to_owned(),
                body: m.body.to_vec(),
                reply_to: m.reply_to.map(str::to_owned),
                correlation_id: m.correlation_id.map(<[u8]>::to_vec),
                malformed: None,
                traceparent: m.traceparent.map(str::to_owned),
                redelivered: false,
                deadline: m.deadline,
                settlement: None,
            };
            // A queue nobody consumes any more still holds the message, as a
            // durable queue would.
            let _ = queue.send(message).await;
        }
        Ok(())
    }

    /// In-process: every kind is the same queue.
    async fn reply_queue(
        &self,
        _kind: super::ReplyQueueKind,
    ) -> Result<(String, async_channel::Receiver<Incoming>), BusError> {
        let name = format!("amq.gen-{}", uuid::Uuid::new_v4());
        let (_, rx) = self.queue(&name);
        Ok((name, rx))
    }

    async fn close(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::channel_sink;

    fn out<'a>(exchange: &'a str, routing_key: &'a str, body: &'a [u8]) -> Outgoing<'a> {
        Outgoing {
            exchange,
            routing_key,
            body,
            reply_to: Some("r"),
            correlation_id: None,
            durable: false,
            confirm: false,
            expires: None,
            traceparent: None,
            deadline: None,
            reply_ttl: None,
        }
    }

    #[tokio::test]
    async fn topic_routing_and_competing_consumers() {
        let bus = MemoryBus::new();
        bus.declare_queue("ex", "simple", "simple.*", &Default::default())
            .await
            .unwrap();
        let (sink_a, a_deliveries) = channel_sink();
        let (sink_b, b_deliveries) = channel_sink();
        let a = bus.consume("simple", 1, sink_a).await.unwrap();
        let _b = bus.consume("simple", 1, sink_b).await.unwrap();
        bus.publish(out("ex", "other.add", b"lost")).await.unwrap();
        bus.publish(out("ex", "simple.add", b"1")).await.unwrap();
        bus.publish(out("ex", "simple.add", b"2")).await.unwrap();
        let second = std::time::Duration::from_secs(2);
        // Prefetch 1 each: one message for each consumer.
        let first = a_deliveries.recv().await.unwrap();
        let other = tokio::time::timeout(second, b_deliveries.recv())
            .await
            .expect("b gets the other message")
            .unwrap();
        let mut bodies = vec![first.body.clone(), other.body.clone()];
        bodies.sort();
        assert_eq!(bodies, vec![b"1".to_vec(), b"2".to_vec()]);
        // `a` stops: what it holds goes back to the queue, for `b` once
        // `b` has a free slot.
        a.stop.cancel();
        first.settle(Settle::Requeue).await.unwrap();
        other.settle(Settle::Ack).await.unwrap();
        let again = tokio::time::timeout(second, b_deliveries.recv())
            .await
            .expect("b gets what a held")
            .unwrap();
        assert_eq!(again.body, first.body);
        assert!(again.redelivered);
        again.settle(Settle::Ack).await.unwrap();
        assert!(a_deliveries.is_empty(), "a stopped: it takes nothing more");
        assert!(b_deliveries.is_empty(), "nothing else was routed here");
    }

    #[tokio::test]
    async fn requeue_redelivers_and_ack_removes() {
        let bus = MemoryBus::new();
        bus.declare_queue("ex", "q", "k", &Default::default())
            .await
            .unwrap();
        let (sink, deliveries) = channel_sink();
        let _c = bus.consume("q", 1, sink).await.unwrap();
        bus.publish(out("ex", "k", b"x")).await.unwrap();
        let m = deliveries.recv().await.unwrap();
        assert!(!m.redelivered);
        m.settle(Settle::Requeue).await.unwrap();
        let again = deliveries.recv().await.unwrap();
        assert!(again.redelivered);
        again.settle(Settle::Ack).await.unwrap();
        assert!(deliveries.is_empty());
    }

    #[tokio::test]
    async fn default_exchange_routes_by_queue_name() {
        let bus = MemoryBus::new();
        let (name, rx) = bus
            .reply_queue(crate::bus::ReplyQueueKind::default())
            .await
            .unwrap();
        bus.publish(out("", &name, b"reply")).await.unwrap();
        assert_eq!(rx.recv().await.unwrap().body, b"reply");
    }
}
