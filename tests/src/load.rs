//! A closed-loop load client for the chaos tests: C requests in flight,
//! every request numbered, every reply counted, through broker restarts.
//!
//! Requests are published persistent with publisher confirms to the
//! exchange, as kombu does; replies come to a durable named reply queue
//! and are acked one by one (kombu's `SimpleQueue` style), so both survive
//! a broker restart. A
//! request counts as *sent* once the broker confirmed it: those are the
//! ones that reached the queue and must be answered. Requests are
//! published `mandatory`: one the broker returns (no queue bound, as while
//! a deleted queue is declared again) never reached a queue, and is sent
//! again 50 ms later, as a caller retrying would.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{json, Value};

use crate::host::{amqp_uri, unique};
pub use crate::tally::{Counts, Tally};

/// The request number `i` is: its routing key and params.
pub type RequestFn = Arc<dyn Fn(usize) -> (String, Value) + Send + Sync>;

/// What to send.
#[derive(Clone)]
pub struct Load {
    /// The exchange.
    pub exchange: String,
    /// How many requests.
    pub total: usize,
    /// How many in flight at most.
    pub concurrency: usize,
    /// Give up waiting after this long.
    pub deadline: Duration,
    /// Request number `i`.
    pub request: RequestFn,
    /// The broker to connect to, if not the test broker; its reply queue
    /// is then a quorum queue, which outlives the loss of any one node of
    /// a cluster.
    pub broker: Option<String>,
    /// Stop waiting for a request after this long, so that requests the
    /// broker lost (a deleted queue) do not hold the window for ever; it
    /// still counts as answered if its reply comes later. `None`: wait
    /// until the deadline.
    pub give_up_after: Option<Duration>,
}

impl std::fmt::Debug for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Load")
            .field("exchange", &self.exchange)
            .field("total", &self.total)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

/// Replies so far, for a chaos driver to act at the right moment.
#[derive(Debug, Default)]
pub struct Progress {
    /// Distinct requests answered.
    pub answered: AtomicUsize,
    /// Requests published so far (the next request's number).
    pub published: AtomicUsize,
    /// One more than the highest request number answered.
    pub answered_up_to: AtomicUsize,
}

impl Progress {
    /// Distinct requests answered so far.
    pub fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }

    /// Requests published so far.
    pub fn published(&self) -> usize {
        self.published.load(Ordering::SeqCst)
    }

    /// Counts request `i` answered.
    pub fn answer(&self, i: usize) {
        self.answered.fetch_add(1, Ordering::SeqCst);
        self.answered_up_to.fetch_max(i + 1, Ordering::SeqCst);
    }

    /// Waits until a request numbered `from` or later is answered (at most
    /// `limit`, or until `done`); how long that took.
    pub fn wait_answered_from(
        &self,
        from: usize,
        limit: Duration,
        done: &std::sync::atomic::AtomicBool,
    ) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < limit && !done.load(Ordering::SeqCst) {
            if self.answered_up_to.load(Ordering::SeqCst) > from {
                return Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }
}

/// What happened.
#[derive(Debug)]
pub struct Report {
    /// Every request and reply, by request number: judge it with
    /// [`Tally::judge`] to assert what the test promises.
    pub tally: Tally,
    /// Requests the broker confirmed (they reached the queue).
    pub sent: usize,
    /// Requests whose publish was not confirmed (the connection went away
    /// first); they may or may not have reached the queue.
    pub unconfirmed: usize,
    /// Distinct requests answered.
    pub answered: usize,
    /// Replies beyond the first for a request.
    pub duplicates: usize,
    /// Confirmed requests with no reply by the deadline.
    pub unanswered: Vec<usize>,
    /// The first reply to each request.
    pub replies: HashMap<usize, Value>,
    /// The longest time without any reply while requests were waiting.
    pub max_gap: Duration,
    /// How long it all took.
    pub elapsed: Duration,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {} (unconfirmed {}), answered {}, duplicated {}, unanswered {}, \
             longest gap {:.2}s, {:.1}s in all",
            self.sent,
            self.unconfirmed,
            self.answered,
            self.duplicates,
            self.unanswered.len(),
            self.max_gap.as_secs_f64(),
            self.elapsed.as_secs_f64()
        )
    }
}

struct State {
    tally: Tally,
    next: usize,
    /// Published, not answered, not given up.
    waiting: HashSet<usize>,
    confirmed: HashSet<usize>,
    unconfirmed: HashSet<usize>,
    replies: HashMap<usize, Value>,
    duplicates: usize,
    max_gap: Duration,
    sent_at: HashMap<usize, Instant>,
    /// Returned by the broker (no queue bound), to send again at.
    returned: std::collections::VecDeque<(usize, Instant)>,
}

/// How long a returned request waits before it is sent again.
const RETRY_RETURNED: Duration = Duration::from_millis(50);

/// The longest one broker round trip of the load may take: a broker
/// stopping or starting can leave a connect, a channel or a publish
/// unanswered for good, and the load must still end by its deadline.
const ROUND_TRIP: Duration = Duration::from_secs(5);

/// `f`, or `None` once [`ROUND_TRIP`] passed.
async fn within<T>(f: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(ROUND_TRIP, f).await.ok()
}

impl State {
    /// A reply arrived; `again`: the broker delivered this very reply
    /// before (our channel closed before its ack), which is no second
    /// answer of the service.
    fn reply(&mut self, body: &[u8], again: bool, last: &mut Instant, progress: &Progress) {
        let Ok(value) = serde_json::from_slice::<Value>(body) else {
            return;
        };
        let Some(i) = value["id"].as_u64().and_then(|i| usize::try_from(i).ok()) else {
            return;
        };
        self.max_gap = self.max_gap.max(last.elapsed());
        *last = Instant::now();
        self.tally.reply(i, value.clone(), again);
        if self.replies.contains_key(&i) {
            if !again {
                self.duplicates += 1;
            }
            return;
        }
        self.replies.insert(i, value);
        self.waiting.remove(&i);
        // An answer proves it reached the queue.
        self.unconfirmed.remove(&i);
        self.confirmed.insert(i);
        progress.answer(i);
    }

    /// Whether a returned request is due to be sent again.
    fn returned_due(&self) -> bool {
        self.returned.front().is_some_and(|r| r.1 <= Instant::now())
    }

    /// Stops waiting for requests sent more than `limit` ago.
    fn give_up(&mut self, limit: Option<Duration>) {
        let Some(limit) = limit else {
            return;
        };
        let sent_at = &self.sent_at;
        self.waiting
            .retain(|i| sent_at.get(i).is_none_or(|at| at.elapsed() < limit));
    }

    /// The connection is gone: requests it never confirmed stop holding
    /// the window.
    fn connection_lost(&mut self) {
        let lost: Vec<usize> = self
            .waiting
            .iter()
            .filter(|i| !self.confirmed.contains(i))
            .copied()
            .collect();
        for i in lost {
            self.waiting.remove(&i);
            self.unconfirmed.insert(i);
            self.tally.unconfirmed(i);
        }
    }
}

impl Load {
    /// Sends every request and waits for the replies (reconnecting when
    /// the broker goes away), then reports.
    pub async fn run(&self, progress: Arc<Progress>) -> Report {
        let started = Instant::now();
        let reply_queue = unique("chaos-reply");
        let mut state = State {
            tally: Tally::new(self.total),
            next: 0,
            waiting: HashSet::new(),
            confirmed: HashSet::new(),
            unconfirmed: HashSet::new(),
            replies: HashMap::new(),
            duplicates: 0,
            max_gap: Duration::ZERO,
            sent_at: HashMap::new(),
            returned: std::collections::VecDeque::new(),
        };
        let mut last_reply = Instant::now();
        'connection: while started.elapsed() < self.deadline {
            let uri = self.broker.clone().unwrap_or_else(amqp_uri);
            let conn =
                match within(Connection::connect(&uri, ConnectionProperties::default())).await {
                    Some(Ok(c)) => c,
                    _ => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
            let setup = async {
                let ch = conn.create_channel().await?;
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
                let durable = QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                };
                let mut arguments = FieldTable::default();
                if self.broker.is_some() {
                    arguments.insert(
                        "x-queue-type".into(),
                        lapin::types::AMQPValue::LongString("quorum".into()),
                    );
                }
                ch.queue_declare(reply_queue.as_str().into(), durable, arguments)
                    .await?;
                let consumer = ch
                    .basic_consume(
                        reply_queue.as_str().into(),
                        "".into(),
                        // Acked one by one, as kombu's SimpleQueue does: a
                        // reply on its way when the connection dies goes
                        // back to the queue instead of being lost.
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                Ok::<_, lapin::Error>((ch, consumer))
            };
            let (ch, mut consumer) = match within(setup).await {
                Some(Ok(s)) => s,
                _ => {
                    let _ = within(conn.close(200, "retry".into())).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let mut confirms = FuturesUnordered::new();
            loop {
                while state.waiting.len() < self.concurrency
                    && (state.next < self.total || state.returned_due())
                {
                    // A request the broker returned (no queue bound) is
                    // sent again: it never reached a queue.
                    let fresh = !state.returned_due();
                    let i = if fresh {
                        state.next
                    } else {
                        state.returned.pop_front().map_or(state.next, |r| r.0)
                    };
                    let (routing_key, params) = (self.request)(i);
                    let method = routing_key
                        .rsplit('.')
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    let body =
                        json!({"jsonrpc": "2.0", "id": i, "method": method, "params": params})
                            .to_string();
                    let properties = BasicProperties::default()
                        .with_content_type("application/json".into())
                        .with_delivery_mode(2)
                        .with_reply_to(reply_queue.as_str().into())
                        .with_correlation_id(i.to_string().into());
                    let published = within(ch.basic_publish(
                        self.exchange.as_str().into(),
                        routing_key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        body.as_bytes(),
                        properties,
                    ))
                    .await;
                    if fresh {
                        state.next += 1;
                        progress.published.store(state.next, Ordering::SeqCst);
                    }
                    state.sent_at.insert(i, Instant::now());
                    state.waiting.insert(i);
                    match published {
                        Some(Ok(confirm)) => confirms.push(async move { (i, confirm.await) }),
                        _ => {
                            state.connection_lost();
                            continue 'connection;
                        }
                    }
                }
                state.give_up(self.give_up_after);
                if state.next >= self.total && state.waiting.is_empty() && state.returned.is_empty()
                {
                    break 'connection;
                }
                if started.elapsed() >= self.deadline {
                    break 'connection;
                }
                tokio::select! {
                    delivery = consumer.next() => match delivery {
                        Some(Ok(d)) => {
                            state.reply(&d.data, d.redelivered, &mut last_reply, &progress);
                            if !matches!(within(d.acker.ack(BasicAckOptions::default())).await, Some(Ok(_))) {
                                state.connection_lost();
                                continue 'connection;
                            }
                        }
                        _ => {
                            state.connection_lost();
                            continue 'connection;
                        }
                    },
                    Some((i, confirmed)) = confirms.next(), if !confirms.is_empty() => {
                        match confirmed {
                            // Returned: no queue took it; send it again.
                            Ok(lapin::Confirmation::Ack(Some(_))) => {
                                if state.waiting.remove(&i) {
                                    state.returned.push_back((i, Instant::now() + RETRY_RETURNED));
                                }
                            }
                            Ok(c) if c.is_ack() => {
                                state.confirmed.insert(i);
                                state.tally.sent(i);
                            }
                            _ => {
                                if !state.replies.contains_key(&i) && state.waiting.remove(&i) {
                                    state.unconfirmed.insert(i);
                                    state.tally.unconfirmed(i);
                                }
                            }
                        }
                    }
                    () = tokio::time::sleep(if state.returned.is_empty() {
                        Duration::from_millis(250)
                    } else {
                        RETRY_RETURNED
                    }) => {}
                }
            }
        }
        let uri = self.broker.clone().unwrap_or_else(amqp_uri);
        let _ = within(delete_queue(&uri, &reply_queue)).await;
        let mut unanswered: Vec<usize> = state
            .confirmed
            .iter()
            .filter(|i| !state.replies.contains_key(i))
            .copied()
            .collect();
        unanswered.sort_unstable();
        Report {
            tally: state.tally,
            sent: state.confirmed.len(),
            unconfirmed: state.unconfirmed.len(),
            answered: state.replies.len(),
            duplicates: state.duplicates,
            unanswered,
            replies: state.replies,
            max_gap: state.max_gap,
            elapsed: started.elapsed(),
        }
    }
}

async fn delete_queue(uri: &str, queue: &str) {
    if let Ok(conn) = Connection::connect(uri, ConnectionProperties::default()).await {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(queue.into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, "bye".into()).await;
    }
}
