//! The closed-loop load of [`crate::load`], on Redis: C requests in
//! flight, every request numbered, every reply counted, through flushes
//! and restarts of the server.
//!
//! It publishes as the host's own client does (the host's Redis transport:
//! kombu's layout, routed by the exchange's binding set) and waits on a
//! reply list of its own. A request counts as *sent* once it was pushed
//! onto a queue's list. One that no binding routes (the bindings lost,
//! not declared again yet) never entered Redis: it is sent again a moment
//! later, as a caller retrying would. One whose publish failed for a lost
//! connection is *unconfirmed*: it may or may not have been pushed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use commissaire_host::bus::redis::RedisBus;
use commissaire_host::bus::{BusError, BusTransport, Outgoing, ReplyQueueKind};
use serde_json::{json, Value};

use crate::load::{Progress, Report, RequestFn};
use crate::tally::Tally;

/// What to send, where.
#[derive(Clone)]
pub struct RedisLoad {
    /// The Redis URI (with its database).
    pub uri: String,
    /// The exchange.
    pub exchange: String,
    /// How many requests.
    pub total: usize,
    /// How many in flight at most.
    pub concurrency: usize,
    /// Give up waiting after this long.
    pub deadline: Duration,
    /// Stop waiting for a request after this long (one Redis lost frees
    /// its place in the window); a later reply still counts.
    pub give_up_after: Duration,
    /// Request number `i`.
    pub request: RequestFn,
}

impl std::fmt::Debug for RedisLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLoad")
            .field("exchange", &self.exchange)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

/// How long an unroutable request waits before it is sent again.
const RETRY_UNROUTABLE: Duration = Duration::from_millis(50);

impl RedisLoad {
    /// Sends every request and waits for the replies, then reports. The
    /// reply list's consumer and the publishing connection reconnect by
    /// themselves (the host's transport).
    pub async fn run(&self, progress: Arc<Progress>) -> Report {
        let started = Instant::now();
        let bus = loop {
            match RedisBus::connect(&self.uri).await {
                Ok(bus) => break bus,
                Err(e) => {
                    assert!(started.elapsed() < self.deadline, "cannot connect: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let (reply_to, replies) = bus
            .reply_queue(ReplyQueueKind::Named)
            .await
            .expect("a reply list");
        let mut tally = Tally::new(self.total);
        let mut next = 0usize;
        let mut retry: VecDeque<(usize, Instant)> = VecDeque::new();
        let mut waiting: HashMap<usize, Instant> = HashMap::new();
        let mut confirmed: HashSet<usize> = HashSet::new();
        let mut unconfirmed: HashSet<usize> = HashSet::new();
        let mut answered: HashMap<usize, Value> = HashMap::new();
        let mut duplicates = 0usize;
        let mut max_gap = Duration::ZERO;
        let mut last_reply = Instant::now();
        while started.elapsed() < self.deadline {
            // Fill the window: requests to send again first, then new ones.
            while waiting.len() < self.concurrency {
                let i = match retry.front() {
                    Some(&(i, at)) if at <= Instant::now() => {
                        retry.pop_front();
                        i
                    }
                    Some(_) => break,
                    None if next < self.total => {
                        next += 1;
                        progress
                            .published
                            .store(next, std::sync::atomic::Ordering::SeqCst);
                        next - 1
                    }
                    None => break,
                };
                let (routing_key, params) = (self.request)(i);
                let method = routing_key.rsplit('.').next().unwrap_or_default();
                let body = json!({"jsonrpc": "2.0", "id": i, "method": method, "params": params})
                    .to_string();
                let correlation = i.to_string();
                let published = bus
                    .publish(Outgoing {
                        exchange: &self.exchange,
                        routing_key: &routing_key,
                        body: body.as_bytes(),
                        reply_to: Some(&reply_to),
                        correlation_id: Some(correlation.as_bytes()),
                        durable: true,
                        confirm: false,
                        // Only so that an unroutable request is an error.
                        expires: Some(Duration::from_secs(60)),
                        traceparent: None,
                        deadline: None,
                        reply_ttl: None,
                    })
                    .await;
                match published {
                    Ok(()) => {
                        tally.sent(i);
                        confirmed.insert(i);
                        waiting.insert(i, Instant::now());
                    }
                    Err(BusError::Unroutable { .. }) => {
                        retry.push_back((i, Instant::now() + RETRY_UNROUTABLE));
                        break;
                    }
                    Err(_) => {
                        tally.unconfirmed(i);
                        unconfirmed.insert(i);
                        // Redis is away: do not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        break;
                    }
                }
            }
            if next >= self.total && retry.is_empty() && waiting.is_empty() {
                break;
            }
            tokio::select! {
                reply = replies.recv() => {
                    let Ok(reply) = reply else { break };
                    let Ok(value) = serde_json::from_slice::<Value>(&reply.body) else { continue };
                    let Some(i) = value["id"].as_u64().and_then(|i| usize::try_from(i).ok()) else {
                        continue;
                    };
                    max_gap = max_gap.max(last_reply.elapsed());
                    last_reply = Instant::now();
                    tally.reply(i, value.clone(), false);
                    if answered.contains_key(&i) {
                        duplicates += 1;
                        continue;
                    }
                    answered.insert(i, value);
                    waiting.remove(&i);
                    unconfirmed.remove(&i);
                    confirmed.insert(i);
                    progress.answer(i);
                }
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            waiting.retain(|_, at| at.elapsed() < self.give_up_after);
        }
        bus.close().await;
        let mut unanswered: Vec<usize> = confirmed
            .iter()
            .filter(|i| !answered.contains_key(i))
            .copied()
            .collect();
        unanswered.sort_unstable();
        Report {
            tally,
            sent: confirmed.len(),
            unconfirmed: unconfirmed.len(),
            answered: answered.len(),
            duplicates,
            unanswered,
            replies: answered,
            max_gap,
            elapsed: started.elapsed(),
        }
    }
}
