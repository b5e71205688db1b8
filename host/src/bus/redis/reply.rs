//! The connection's reply queue, and closing the connection (which hands
//! back what it holds and deletes the reply queue).

use std::sync::PoisonError;

use super::connection::BLOCK_SECS;
use super::consumer::incoming;
use super::envelope::read_envelope;
use super::keys::{queue_lists, queue_of_list};
use super::RedisBus;
use crate::bus::{BusError, Incoming};
use crate::redact::scrub;

/// A list of our own, `commissaire-host-reply-<uuid>`, that replies are
/// pushed onto through the default exchange; deleted at close.
pub(super) async fn open(
    bus: &RedisBus,
) -> Result<(String, async_channel::Receiver<Incoming>), BusError> {
    let name = format!("commissaire-host-reply-{}", uuid::Uuid::new_v4().simple());
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
        *taken = Some(name.clone());
    }
    let inner = bus.inner.clone();
    let mut conn = inner
        .blocking_connection()
        .await
        .map_err(|e| inner.fail("consuming the reply queue", &e))?;
    let (tx, rx) = async_channel::unbounded();
    let stop = inner.closing.child_token();
    let lists = queue_lists(&name);
    let brpop = ::redis::cmd("BRPOP").arg(&lists).arg(BLOCK_SECS).clone();
    tokio::spawn(async move {
        loop {
            let popped = tokio::select! {
                biased;
                // Replies are not acked: abandoning a BRPOP at close
                // loses nothing anyone waits for.
                () = stop.cancelled() => break,
                popped = brpop.query_async::<Option<(Vec<u8>, Vec<u8>)>>(&mut conn) => popped,
            };
            match popped {
                Ok(Some((list, raw))) => {
                    let list = String::from_utf8_lossy(&list);
                    let queue = queue_of_list(&list);
                    match read_envelope(&String::from_utf8_lossy(&raw)) {
                        Ok(received) => {
                            if tx.send(incoming(received, None)).await.is_err() {
                                break;
                            }
                        }
                        Err(reason) => {
                            tracing::warn!(queue, %reason, "dropping a reply that is not a kombu envelope");
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %scrub(&e.to_string(), &inner.secret_uri), "reply queue BRPOP failed; reconnecting");
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
    if let Err(e) = inner.restore_owner(&inner.identity.owner).await {
        tracing::warn!(error = %e, "unsettled deliveries stay unacked until the visibility timeout");
    }
    let reply = bus
        .reply_queue
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    if let Some(name) = reply {
        let del = ::redis::cmd("DEL").arg(queue_lists(&name)).clone();
        if let Err(e) = inner.query::<i64>("deleting the reply queue", &del).await {
            tracing::debug!(error = %e, "deleting the reply queue");
        }
    }
}
