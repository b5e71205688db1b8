//! The connection's reply queue, and closing the connection (which hands
//! back what it holds and deletes the reply queue).

use std::sync::{Arc, PoisonError};

use ::redis::aio::MultiplexedConnection;
use ::redis::RedisError;

use super::connection::{Inner, BLOCK_SECS};
use super::envelope::read_envelope;
use super::keys::{binding_key, binding_permanent_key, queue_lists, queue_of_list, SEP};
use super::RedisBus;
use crate::bus::reply_names::{is_abandoned, local_prefix, ReplyName};
use crate::bus::{BusError, Incoming};
use crate::redact::scrub;

/// Every key of reply list `name`: its lists, and the binding sets that a
/// Python service's `SimpleQueue(name)` adds with every reply.
fn reply_keys(name: &str) -> Vec<String> {
    let mut keys = queue_lists(name);
    keys.push(binding_key(name));
    keys.push(binding_permanent_key(name));
    keys
}

/// The reply list a key of [`reply_keys`] belongs to.
fn reply_list_of(key: &str) -> &str {
    let list = key
        .strip_prefix("_kombu.binding.")
        .or_else(|| key.strip_prefix("_kombu.binding_permanent."))
        .unwrap_or(key);
    list.split(SEP).next().unwrap_or(list)
}

/// Deletes the reply keys that processes of this machine left behind:
/// killed, or (for this process) of a closed connection whose delete
/// failed. In the background: `SCAN` walks the whole database.
async fn sweep_abandoned_reply_keys(inner: Arc<Inner>) {
    let pattern = format!("*{}*", local_prefix());
    let mut cursor = 0u64;
    loop {
        let scan = ::redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .clone();
        let (next, keys): (u64, Vec<Vec<u8>>) = match inner
            .query("scanning for abandoned reply queues", &scan)
            .await
        {
            Ok(page) => page,
            Err(e) => {
                tracing::debug!(error = %e, "sweeping abandoned reply queues");
                return;
            }
        };
        let abandoned: Vec<String> = keys
            .into_iter()
            .filter_map(|k| String::from_utf8(k).ok())
            .filter(|k| is_abandoned(reply_list_of(k)))
            .collect();
        if !abandoned.is_empty() {
            let del = ::redis::cmd("DEL").arg(&abandoned).clone();
            match inner
                .query::<i64>("deleting abandoned reply queues", &del)
                .await
            {
                Ok(_) => {
                    tracing::info!(keys = ?abandoned, "deleted reply queue keys a stopped host left behind")
                }
                Err(e) => tracing::debug!(error = %e, "deleting abandoned reply queues"),
            }
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

/// The most replies one pop takes.
const MAX_REPLIES: usize = 64;

/// Waits (at most [`BLOCK_SECS`]) for replies on `lists`, in their order,
/// and pops what the first non-empty one holds, up to [`MAX_REPLIES`]
/// (`BLMPOP`: under load, one round trip for many replies); with
/// `batched` false, one reply (`BRPOP`).
async fn pop_replies(
    conn: &mut MultiplexedConnection,
    lists: &[String],
    batched: bool,
) -> Result<Option<(Vec<u8>, Vec<Vec<u8>>)>, RedisError> {
    if batched {
        ::redis::cmd("BLMPOP")
            .arg(BLOCK_SECS)
            .arg(lists.len())
            .arg(lists)
            .arg("RIGHT")
            .arg("COUNT")
            .arg(MAX_REPLIES)
            .query_async(conn)
            .await
    } else {
        let popped: Option<(Vec<u8>, Vec<u8>)> = ::redis::cmd("BRPOP")
            .arg(lists)
            .arg(BLOCK_SECS)
            .query_async(conn)
            .await?;
        Ok(popped.map(|(list, raw)| (list, vec![raw])))
    }
}

/// A list of our own (named as [`crate::bus::reply_names`] says) that
/// replies are pushed onto, through the default exchange or, from a Python
/// service's `SimpleQueue`, through a direct exchange of the same name;
/// deleted at close with those binding sets.
pub(super) async fn open(
    bus: &RedisBus,
) -> Result<(String, async_channel::Receiver<Incoming>), BusError> {
    let reply_name = ReplyName::new();
    let name = reply_name.as_str().to_owned();
    {
        let mut taken = bus
            .reply_queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if taken.is_some() {
            return Err(BusError::op(
                "reply queue",
                "already consumed on this connection",
            ));
        }
        *taken = Some(reply_name);
    }
    tokio::spawn(sweep_abandoned_reply_keys(bus.inner.clone()));
    let inner = bus.inner.clone();
    let mut conn = inner
        .blocking_connection()
        .await
        .map_err(|e| inner.fail("consuming the reply queue", &e))?;
    let (tx, rx) = async_channel::unbounded();
    let stop = inner.closing.child_token();
    let lists = queue_lists(&name);
    tokio::spawn(async move {
        let mut batched = true;
        loop {
            let popped = tokio::select! {
                biased;
                // Replies are not acked: abandoning a pop at close loses
                // nothing anyone waits for.
                () = stop.cancelled() => break,
                popped = pop_replies(&mut conn, &lists, batched) => popped,
            };
            match popped {
                Ok(Some((list, replies))) => {
                    let list = String::from_utf8_lossy(&list);
                    let queue = queue_of_list(&list);
                    for raw in replies {
                        match read_envelope(&String::from_utf8_lossy(&raw)) {
                            Ok(received) => {
                                if tx.send(received).await.is_err() {
                                    return;
                                }
                            }
                            Err(reason) => {
                                crate::throttled!(warn!(
                                    queue,
                                    %reason,
                                    "dropping a reply that is not a kombu envelope"
                                ));
                            }
                        }
                    }
                }
                Ok(None) => {}
                Err(e)
                    if batched
                        && e.kind()
                            == ::redis::ErrorKind::Server(
                                ::redis::ServerErrorKind::ResponseError,
                            ) =>
                {
                    // Before Redis 7.0 (no BLMPOP): one reply per BRPOP.
                    tracing::debug!(error = %e, "BLMPOP refused; popping replies one by one");
                    batched = false;
                }
                Err(e) => {
                    tracing::warn!(error = %scrub(&e.to_string(), &inner.secret_uri), "reply queue pop failed; reconnecting");
                    match inner.reconnect(&stop, "reply queue").await {
                        Some(c) => conn = c,
                        None => break,
                    }
                }
            }
        }
    });
    Ok((name, rx))
}

/// Stops consuming, hands back what this consumer took and never settled
/// (kombu's `restore_unacked_once`, to the front of the queue) and deletes
/// the reply queue.
pub(super) async fn close(bus: &RedisBus) {
    let inner = &bus.inner;
    inner.closing.cancel();
    super::restore::stop_restorer(inner).await;
    if let Err(e) = inner.restore_owner(&inner.identity.owner, false).await {
        tracing::warn!(error = %e, "unsettled deliveries stay unacked until the visibility timeout");
    }
    let reply = bus
        .reply_queue
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some(name) = reply {
        let del = ::redis::cmd("DEL").arg(reply_keys(name.as_str())).clone();
        if let Err(e) = inner.query::<i64>("deleting the reply queue", &del).await {
            tracing::warn!(error = %e, "cannot delete the reply queue; the next host started on this machine will");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_keys_lead_back_to_their_list() {
        let keys = reply_keys("commissaire-host-reply-h-1-0123abcd");
        assert_eq!(keys.len(), 6);
        assert!(keys.contains(&"_kombu.binding.commissaire-host-reply-h-1-0123abcd".to_owned()));
        assert!(keys
            .contains(&"_kombu.binding_permanent.commissaire-host-reply-h-1-0123abcd".to_owned()));
        for key in &keys {
            assert_eq!(
                reply_list_of(key),
                "commissaire-host-reply-h-1-0123abcd",
                "{key:?}"
            );
        }
    }
}
