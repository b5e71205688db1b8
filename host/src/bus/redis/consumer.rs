//! Consuming a queue: one script takes messages and records them in the
//! same instant (nothing is ever out of its list without its unacked
//! record), a no-op `BLMOVE` waits for more without taking any, and one
//! script replies and acks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::RedisError;
use async_trait::async_trait;
use futures_util::FutureExt as _;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::connection::{now, refused, Inner, BLOCK_SECS};
use super::envelope::{envelope, read_envelope};
use super::keys::{priority_list, queue_lists, UNACKED, UNACKED_INDEX};
use super::restore::Side;
use crate::bus::{
    BusError, ConsumerState, Incoming, Malformed, Outgoing, PrefetchSlots, Settle, Settlement, Sink,
};
use crate::redact::scrub;

/// The most messages one take script moves.
const MAX_TAKE: usize = 32;

impl Inner {
    /// Removes a delivery's record: the unacked hash and index, and our
    /// held set. Tags are unique per take, so a late ack (the delivery was
    /// restored and taken again meanwhile) removes nothing of the new
    /// holder's.
    pub async fn ack(&self, tag: &str) -> Result<(), BusError> {
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .cmd("HDEL")
            .arg(UNACKED)
            .arg(tag)
            .ignore()
            .cmd("ZREM")
            .arg(UNACKED_INDEX)
            .arg(tag)
            .ignore()
            .cmd("SREM")
            .arg(&self.identity.held)
            .arg(tag)
            .ignore();
        self.pipe("ack", &pipe).await
    }

    /// How long a held set outlives its last take: twice the visibility
    /// timeout, after which whatever it named was restored anyway.
    fn held_expiry_ms(&self) -> u64 {
        u64::try_from(self.options.visibility_timeout.as_millis())
            .unwrap_or(u64::MAX / 2)
            .saturating_mul(2)
            .max(60_000)
    }
}

/// Settles one delivery: an ack removes its record, a requeue moves it
/// back onto its queue (kombu's `basic_reject(requeue=True)`); either way
/// its prefetch slot is freed.
struct RedisSettlement {
    inner: Arc<Inner>,
    tag: String,
    /// The held-set mark it was taken under (see the take script).
    mark: Arc<str>,
    slot: Mutex<Option<OwnedSemaphorePermit>>,
    /// Acked by the script that published its reply.
    acked: AtomicBool,
}

#[async_trait]
impl Settlement for RedisSettlement {
    async fn settle(&self, how: Settle) -> Result<(), BusError> {
        let settled = if self.acked.load(Ordering::Acquire) {
            Ok(())
        } else {
            match how {
                Settle::Ack => self.inner.ack(&self.tag).await,
                Settle::Requeue => self
                    .inner
                    .restore_by_tag(&self.tag, Side::Back)
                    .await
                    .map(|_| ()),
            }
        };
        drop(
            self.slot
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        settled
    }

    /// A reply to a list (the default exchange) goes out in one script with
    /// this delivery's ack: the settle that follows only frees the slot.
    async fn publish_before_ack(&self, m: Outgoing<'_>) -> Option<Result<(), BusError>> {
        if !m.exchange.is_empty() {
            return None;
        }
        let mut inv = self.inner.scripts.reply_ack.prepare_invoke();
        inv.key(priority_list(m.routing_key, 0))
            .key(UNACKED)
            .key(UNACKED_INDEX)
            .key(&self.inner.identity.held)
            .arg(envelope(&m))
            .arg(&self.tag)
            .arg(&*self.mark)
            .arg(super::ttl_ms(m.reply_ttl));
        let what = format!("replying to `{}`", m.routing_key);
        let replied = match self.reply_while_away(&what, &inv).await {
            Ok(::redis::Value::Int(3)) => {
                crate::throttled!(info!(
                    tag = %self.tag,
                    "answered a request whose record the Redis database lost meanwhile \
                     (restarted without persistence, or flushed)"
                ));
                Ok(())
            }
            Ok(::redis::Value::Int(2)) => {
                crate::throttled!(warn!(
                    tag = %self.tag,
                    "reply not sent: the request was handed back to its queue before it was \
                     answered (a stop past its timeout, or a restore); its next holder answers it"
                ));
                Ok(())
            }
            Ok(answer) => refused(&what, answer),
            Err(e) => Err(e),
        };
        if replied.is_ok() {
            self.acked.store(true, Ordering::Release);
        }
        Some(replied)
    }

    fn tag(&self) -> String {
        self.tag.clone()
    }
}

/// How long a reply waits for a Redis that went away, trying every
/// [`AWAY_RETRY`]: a restart takes a second or two, and the request's
/// record may not survive it (no persistence), so that nobody would answer
/// it if this reply gave up.
const AWAY_LIMIT: Duration = Duration::from_secs(15);
const AWAY_RETRY: Duration = Duration::from_millis(100);

impl RedisSettlement {
    /// Runs the reply script, again while Redis is unreachable (at most
    /// [`AWAY_LIMIT`]). Running it twice is harmless: the second run finds
    /// the record gone and the mark kept, and does nothing.
    async fn reply_while_away(
        &self,
        what: &str,
        inv: &::redis::ScriptInvocation<'_>,
    ) -> Result<::redis::Value, BusError> {
        let until = std::time::Instant::now() + AWAY_LIMIT;
        loop {
            match self.inner.script::<::redis::Value>(what, inv).await {
                Err(e)
                    if (e.is_lost() || matches!(e, BusError::Connect { .. }))
                        && !e.is_permanent()
                        && !self.inner.closing.is_cancelled()
                        && std::time::Instant::now() < until =>
                {
                    crate::throttled!(warn!(
                        tag = %self.tag, error = %e,
                        "a reply waits for Redis to come back"
                    ));
                    tokio::time::sleep(AWAY_RETRY).await;
                }
                other => return other,
            }
        }
    }
}

/// Takes up to `count` messages of `lists` (one script): their tags and
/// envelopes, and the held-set mark they were taken under.
async fn take(
    inner: &Inner,
    conn: &mut MultiplexedConnection,
    lists: &[String],
    record_suffix: &str,
    count: usize,
) -> Result<(Vec<(String, String)>, Arc<str>), RedisError> {
    let identity = &inner.identity;
    let first = identity.reserve(count as u64);
    let expiry_ms = inner.held_expiry_ms();
    let (mark, expected, fresh) = identity.marks(Duration::from_millis(expiry_ms));
    let mut inv = inner.scripts.take.prepare_invoke();
    inv.key(UNACKED).key(UNACKED_INDEX).key(&identity.held);
    for list in lists {
        inv.key(list);
    }
    inv.arg(count)
        .arg(&identity.tag_prefix)
        .arg(first)
        .arg(record_suffix)
        .arg(now())
        .arg(expiry_ms)
        .arg(&*mark)
        .arg(if expected { "1" } else { "0" })
        .arg(&*fresh);
    let mut items: Vec<Vec<u8>> = inv.invoke_async(conn).await?;
    let lost = !items.is_empty() && items.remove(0) == b"1";
    let used = if lost {
        crate::throttled!(warn!(
            held = %identity.held,
            "the Redis database lost this consumer's records (restarted without persistence, \
             or flushed): requests it holds are answered all the same"
        ));
        fresh
    } else {
        mark
    };
    if lost || !items.is_empty() {
        identity.marked(&used);
    }
    let taken = items
        .into_iter()
        .zip(first..)
        .map(|(raw, n)| {
            (
                format!("{}{n}", identity.tag_prefix),
                String::from_utf8_lossy(&raw).into_owned(),
            )
        })
        .collect();
    Ok((taken, used))
}

/// Blocks until `list` holds a message (at most [`BLOCK_SECS`]), taking
/// none: `BLMOVE` of a list's tail onto its own tail leaves it as it was.
/// Abandoning it midway loses nothing.
async fn wait_for_message(conn: &mut MultiplexedConnection, list: &str) -> Result<(), RedisError> {
    let _: Option<Vec<u8>> = ::redis::cmd("BLMOVE")
        .arg(list)
        .arg(list)
        .arg("RIGHT")
        .arg("RIGHT")
        .arg(BLOCK_SECS)
        .query_async(conn)
        .await?;
    Ok(())
}

/// Makes the delivery of one taken message; one that is not an envelope is
/// delivered marked [`Malformed::NotAnEnvelope`], for the service to count
/// and ack.
async fn deliver(
    inner: &Arc<Inner>,
    queue: &str,
    (tag, mark): (String, Arc<str>),
    raw: &str,
    slot: OwnedSemaphorePermit,
) -> Option<Incoming> {
    let settlement = RedisSettlement {
        inner: inner.clone(),
        tag,
        mark,
        slot: Mutex::new(Some(slot)),
        acked: AtomicBool::new(false),
    };
    match read_envelope(raw) {
        Ok(received) => Some(Incoming {
            settlement: Some(Box::new(settlement)),
            ..received
        }),
        // Handed on, unreadable, so that the service counts and logs its
        // drop as it does every other refusal, and acks it.
        Err(reason) => {
            tracing::debug!(queue, %reason, "a message that is not a kombu envelope");
            Some(Incoming {
                exchange: String::new(),
                routing_key: String::new(),
                body: Vec::new(),
                reply_to: None,
                correlation_id: None,
                malformed: Some(Malformed::NotAnEnvelope),
                traceparent: None,
                redelivered: false,
                deadline: None,
                settlement: Some(Box::new(settlement)),
            })
        }
    }
}

/// A delivery taken after its consumer stopped goes back to the front of
/// its queue, as kombu's channel close restores what it had taken.
async fn hand_back(inner: &Inner, tag: &str) {
    if let Err(e) = inner.restore_by_tag(tag, Side::Front).await {
        tracing::warn!(error = %e, "a delivery stays unacked until the visibility timeout");
    }
}

/// Makes the consumer's connection again after a failed command; false
/// once stopped. Interrupted until a new connection answers: the session
/// shows the queue deaf meanwhile, and checks its binding once it is back
/// (the server may have restarted empty).
async fn reconnect(
    inner: &Inner,
    stop: &CancellationToken,
    state: &tokio::sync::watch::Sender<ConsumerState>,
    conn: &mut MultiplexedConnection,
) -> bool {
    state.send_replace(ConsumerState::Interrupted);
    match inner.reconnect(stop, "consumer").await {
        Some(c) => {
            *conn = c;
            state.send_replace(ConsumerState::Consuming);
            true
        }
        None => false,
    }
}

/// Takes from `queue` whenever prefetch slots are free, as many as are
/// free (up to [`MAX_TAKE`]) per script, until stopped; waits when the
/// queue is empty.
pub(super) async fn consume_queue(
    inner: Arc<Inner>,
    queue: String,
    mut conn: MultiplexedConnection,
    limit: Arc<PrefetchSlots>,
    sink: Sink,
    stop: CancellationToken,
    (ended, state): (CancellationToken, tokio::sync::watch::Sender<ConsumerState>),
) {
    let _ended = ended.drop_guard();
    let lists = queue_lists(&queue);
    // The rest of the unacked record `[envelope, exchange, routing key]`:
    // the default exchange and the queue, so that any restore, kombu's
    // included, puts it back on this queue and no other.
    let record_suffix = format!(", \"\", {}]", serde_json::Value::from(queue.as_str()));
    // The last take found fewer messages than it asked for: the queue was
    // empty at that instant, so wait for one before taking again rather
    // than spend a round trip on a take that would find nothing.
    let mut drained = false;
    loop {
        let first = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            slot = limit.acquire() => match slot { Some(s) => s, None => break },
        };
        let mut slots = vec![first];
        while slots.len() < MAX_TAKE {
            match limit.acquire().now_or_never() {
                Some(Some(slot)) => slots.push(slot),
                _ => break,
            }
        }
        if drained {
            let waited = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                waited = wait_for_message(&mut conn, &lists[0]) => waited,
            };
            if let Err(e) = waited {
                crate::throttled!(
                    warn!(queue = %queue, error = %scrub(&e.to_string(), &inner.secret_uri), "waiting for messages failed; reconnecting")
                );
                if !reconnect(&inner, &stop, &state, &mut conn).await {
                    break;
                }
                continue;
            }
            drained = false;
        }
        let asked = slots.len();
        let failed = match take(&inner, &mut conn, &lists, &record_suffix, asked).await {
            Ok((taken, _)) if taken.is_empty() => {
                // Woken for a message another consumer took first (or one
                // on a priority list, which the wait does not watch).
                drop(slots);
                drained = true;
                None
            }
            Ok((taken, mark)) => {
                drained = taken.len() < asked;
                let stopped = stop.is_cancelled();
                for ((tag, raw), slot) in taken.into_iter().zip(slots) {
                    if stopped {
                        hand_back(&inner, &tag).await;
                    } else if let Some(incoming) =
                        deliver(&inner, &queue, (tag, mark.clone()), &raw, slot).await
                    {
                        tokio::spawn(sink(incoming));
                    }
                }
                if stopped {
                    break;
                }
                None
            }
            Err(e) => Some(e),
        };
        if let Some(e) = failed {
            crate::throttled!(
                warn!(queue = %queue, error = %scrub(&e.to_string(), &inner.secret_uri), "taking messages failed; reconnecting")
            );
            if !reconnect(&inner, &stop, &state, &mut conn).await {
                break;
            }
        }
    }
}
