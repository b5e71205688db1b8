//! Handing unsettled deliveries back to their queues: one by tag (a
//! requeue, or a delivery taken after its consumer stopped), all those a
//! consumer holds (at close, or when the supervisor saw its worker die),
//! and kombu's `restore_visible` (every delivery unacked for longer than
//! the visibility timeout, whoever took it).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::connection::{now, refused, Inner, MARK_PREFIX};
use super::envelope::mark_redelivered;
use super::keys::{
    held_key, held_key_of_tag, priority_list, priority_step, UNACKED, UNACKED_INDEX, UNACKED_MUTEX,
};
use crate::bus::BusError;

/// kombu's `unacked_mutex_expire`.
const UNACKED_MUTEX_EXPIRE: Duration = Duration::from_secs(300);

/// Where a restore puts a delivery back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    /// The back of the queue (kombu's `leftmost`: a requeue).
    Back,
    /// The front: the next to be taken (a restore).
    Front,
    /// The front, past the visibility timeout: whoever took it did so that
    /// long ago, so a held set left with nothing but its marks goes too
    /// (a host killed with its supervisor leaves no other trace).
    Expired,
}

impl Inner {
    /// kombu's `QoS.restore_by_tag`: moves an unacked delivery back onto
    /// its queue, marked redelivered. Ours name their queue in the record
    /// (default exchange, routing key = queue), so they go back where they
    /// came from even if the binding is gone; kombu's are routed again by
    /// exchange and routing key, and one that no binding routes any more
    /// stays unacked (kombu would drop it). True once pushed back.
    pub async fn restore_by_tag(&self, tag: &str, side: Side) -> Result<bool, BusError> {
        let stored: Option<String> = self
            .query(
                "reading an unacked delivery",
                ::redis::cmd("HGET").arg(UNACKED).arg(tag),
            )
            .await?;
        let mut lists = Vec::new();
        let mut payload_text = String::new();
        if let Some(stored) = &stored {
            match serde_json::from_str::<(Value, Value, Value)>(stored) {
                Ok((mut payload, exchange, routing_key)) => {
                    mark_redelivered(&mut payload);
                    let priority = payload
                        .get("properties")
                        .and_then(|p| p.get("priority"))
                        .and_then(Value::as_i64)
                        .unwrap_or(0);
                    let exchange = exchange.as_str().unwrap_or_default();
                    let routing_key = routing_key.as_str().unwrap_or_default();
                    for queue in self.lookup(exchange, routing_key).await? {
                        lists.push(priority_list(&queue, priority_step(priority)));
                    }
                    if lists.is_empty() {
                        tracing::warn!(
                            tag,
                            exchange,
                            routing_key,
                            "an unacked delivery no binding routes any more stays unacked"
                        );
                        return Ok(false);
                    }
                    payload_text = payload.to_string();
                }
                Err(e) => {
                    tracing::error!(tag, error = %e, "cannot restore an unreadable unacked delivery");
                    return Ok(false);
                }
            }
        }
        let held = held_key_of_tag(tag);
        let mut inv = self.scripts.restore.prepare_invoke();
        inv.key(UNACKED)
            .key(UNACKED_INDEX)
            .key(held.as_deref().unwrap_or(UNACKED));
        for list in &lists {
            inv.key(list);
        }
        inv.arg(tag)
            .arg(stored.as_deref().unwrap_or(""))
            .arg(&payload_text)
            .arg(if side == Side::Back { "l" } else { "r" })
            .arg(if held.is_some() { "1" } else { "0" })
            .arg(if side == Side::Expired { "1" } else { "0" });
        let what = "restoring an unacked delivery";
        let answer: ::redis::Value = self.script(what, &inv).await?;
        let pushed = matches!(answer, ::redis::Value::Int(1));
        refused(what, answer)?;
        Ok(pushed)
    }

    /// Hands back every delivery consumer `owner` holds; returns how many
    /// went back. Those restored or acked meanwhile are only forgotten.
    /// Its marks go too, and the set with them, when its process is dead
    /// (`gone`) or nothing went back; else they stay until the set
    /// expires, so that a handler still running cannot answer what was
    /// handed back (see the reply script).
    pub async fn restore_owner(&self, owner: &str, gone: bool) -> Result<usize, BusError> {
        let tags: Vec<String> = self
            .query(
                "reading a consumer's held deliveries",
                ::redis::cmd("SMEMBERS").arg(held_key(owner)),
            )
            .await?;
        let (marks, tags): (Vec<&String>, Vec<&String>) =
            tags.iter().partition(|t| t.starts_with(MARK_PREFIX));
        let mut restored = 0;
        for tag in tags {
            if self.restore_by_tag(tag, Side::Front).await? {
                restored += 1;
            }
        }
        // The marks last, so that the set goes once it names nothing.
        if (gone || restored == 0) && !marks.is_empty() {
            self.query::<i64>(
                "removing a consumer's marks",
                ::redis::cmd("SREM").arg(held_key(owner)).arg(marks),
            )
            .await?;
        }
        Ok(restored)
    }

    /// kombu's `QoS.restore_visible`: every delivery unacked for longer
    /// than the visibility timeout goes back to its queue.
    pub async fn restore_visible(&self) -> Result<usize, BusError> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let mut lock = self.scripts.lock.prepare_invoke();
        lock.key(UNACKED_MUTEX)
            .arg(&token)
            .arg(u64::try_from(UNACKED_MUTEX_EXPIRE.as_millis()).unwrap_or(300_000));
        match self.script::<i64>("locking the unacked index", &lock).await? {
            0 => return Ok(0), // another consumer is restoring
            2 => tracing::warn!(
                "{UNACKED_MUTEX} was not a lock (a reply was pushed there?): deleted, so that restores work again"
            ),
            _ => {}
        }
        let ceil = now() - self.options.visibility_timeout.as_secs_f64();
        let restored = async {
            let tags: Vec<String> = self
                .query(
                    "reading the unacked index",
                    ::redis::cmd("ZRANGE")
                        .arg(UNACKED_INDEX)
                        .arg(ceil)
                        .arg(0)
                        .arg("BYSCORE")
                        .arg("REV"),
                )
                .await?;
            let mut restored = 0;
            for tag in &tags {
                if self.restore_by_tag(tag, Side::Expired).await? {
                    restored += 1;
                }
            }
            Ok::<usize, BusError>(restored)
        }
        .await;
        let mut unlock = self.scripts.unlock.prepare_invoke();
        unlock.key(UNACKED_MUTEX).arg(&token);
        if let Err(e) = self
            .script::<i64>("unlocking the unacked index", &unlock)
            .await
        {
            tracing::warn!(error = %e, "cannot release {UNACKED_MUTEX} (it expires by itself)");
        }
        restored
    }
}

/// Starts the periodic restore sweep, once per connection, when it first
/// consumes (as kombu only restores on consuming channels).
pub(super) fn start_restorer(inner: &Arc<Inner>) {
    if inner.restorer_started.swap(true, Ordering::SeqCst) {
        return;
    }
    let sweeping = inner.clone();
    let task = tokio::spawn(async move {
        let inner = sweeping;
        loop {
            match inner.restore_visible().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    restored = n,
                    "unacked deliveries past the visibility timeout went back to their queues"
                ),
                Err(e) => {
                    crate::throttled!(warn!(error = %e, "restoring unacked deliveries failed"))
                }
            }
            tokio::select! {
                () = inner.closing.cancelled() => break,
                () = tokio::time::sleep(inner.options.restore_interval) => {}
            }
        }
    });
    *inner
        .restorer
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
}

/// After `closing` is cancelled: waits for a sweep under way to end
/// (bounded: a sweep stuck on a dead server is left to its lock's expiry).
pub(super) async fn stop_restorer(inner: &Inner) {
    let task = inner
        .restorer
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(task) = task {
        if tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .is_err()
        {
            tracing::warn!("the restore sweep did not end within 15 s; its lock expires by itself");
        }
    }
}
