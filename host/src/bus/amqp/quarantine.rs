//! The quarantine on RabbitMQ: a durable queue per service queue, bounded
//! with `x-max-length` and `x-overflow = drop-head` (the oldest entry goes
//! when a new one comes past the bound). Entries go in through the default
//! exchange, persistent.
//!
//! Reading leaves every entry in place: each is fetched with `basic.get`
//! (unacked), then all are handed back with one `basic.nack requeue
//! multiple`, which puts them back where they were. If the reader dies
//! in between, the broker hands them back when its channel goes: no entry
//! is ever lost to a read. Removing acks the entries it drops, then nacks
//! the rest back the same way.

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};

use super::{is_not_found, lapin_error, refusal_or_lost, short};
use crate::bus::BusError;

fn arguments(bound: u32) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(i64::from(bound)),
    );
    t.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("drop-head")),
    );
    t
}

async fn channel(connection: &Connection, name: &str) -> Result<Channel, BusError> {
    connection
        .create_channel()
        .await
        .map_err(|e| lapin_error(format!("opening a channel for quarantine `{name}`"), &e))
}

/// Declares the quarantine `name` with `bound` (a quarantine declared with
/// another bound keeps its own: it is used as it is) and stores `entry`.
pub(super) async fn keep(
    connection: &Connection,
    name: &str,
    entry: &[u8],
    bound: u32,
) -> Result<(), BusError> {
    let queue = short("queue", name)?;
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut ch = channel(connection, name).await?;
    if let Err(e) = ch
        .queue_declare(queue.clone(), options, arguments(bound))
        .await
    {
        // Refused: it exists with other arguments, and the refusal closed
        // the channel. Store into it as it is.
        crate::throttled!(warn!(
            quarantine = name, bound, error = %e,
            "the quarantine exists with another bound; it keeps its own (delete it to apply the new one)"
        ));
        ch = channel(connection, name).await?;
    }
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    let published = ch
        .basic_publish(
            "".into(),
            queue,
            BasicPublishOptions::default(),
            entry,
            properties,
        )
        .await
        .map_err(|e| refusal_or_lost(format!("storing into quarantine `{name}`"), &e));
    let _ = ch.close(200, "stored".into()).await;
    published.map(drop)
}

/// Fetches every entry of `name` unacked, on `ch`: their tags and bytes.
/// `None` if the quarantine does not exist.
async fn fetch_all(ch: &Channel, name: &str) -> Result<Option<Vec<(u64, Vec<u8>)>>, BusError> {
    let queue = short("queue", name)?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = ch
        .queue_declare(queue.clone(), passive, FieldTable::default())
        .await;
    let count = match declared {
        Ok(q) => q.message_count(),
        Err(e) if is_not_found(&e) => return Ok(None),
        Err(e) => return Err(refusal_or_lost(format!("reading quarantine `{name}`"), &e)),
    };
    let mut got = Vec::new();
    // No more than were there: entries stored meanwhile wait for the next
    // read.
    while got.len() < count as usize {
        let message = ch
            .basic_get(queue.clone(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| refusal_or_lost(format!("reading quarantine `{name}`"), &e))?;
        let Some(message) = message else { break };
        got.push((message.delivery.delivery_tag, message.delivery.data));
    }
    Ok(Some(got))
}

/// Hands back every entry fetched and not acked, up to `last`, and closes
/// the channel.
async fn hand_back(ch: Channel, name: &str, last: Option<u64>) -> Result<(), BusError> {
    let handed = match last {
        Some(tag) => ch
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await
            .map_err(|e| lapin_error(format!("handing quarantine `{name}` back"), &e)),
        None => Ok(()),
    };
    // Closing hands back anything still unacked, too.
    let _ = ch.close(200, "read".into()).await;
    handed
}

/// Every entry of `name`, oldest first, left in place.
pub(super) async fn read(connection: &Connection, name: &str) -> Result<Vec<Vec<u8>>, BusError> {
    let ch = channel(connection, name).await?;
    let fetched = fetch_all(&ch, name).await;
    let got = match fetched {
        Ok(got) => got.unwrap_or_default(),
        Err(e) => {
            let _ = ch.close(200, "read".into()).await;
            return Err(e);
        }
    };
    hand_back(ch, name, got.last().map(|g| g.0)).await?;
    Ok(got.into_iter().map(|g| g.1).collect())
}

/// Acks the entries of `name` that `drop` picks, hands the others back.
pub(super) async fn remove(
    connection: &Connection,
    name: &str,
    drop: &crate::bus::PickEntries,
) -> Result<usize, BusError> {
    let ch = channel(connection, name).await?;
    let got = match fetch_all(&ch, name).await {
        Ok(got) => got.unwrap_or_default(),
        Err(e) => {
            let _ = ch.close(200, "read".into()).await;
            return Err(e);
        }
    };
    let (mut removed, mut last_kept) = (0, None);
    for (tag, bytes) in &got {
        if drop(bytes) {
            ch.basic_ack(*tag, BasicAckOptions { multiple: false })
                .await
                .map_err(|e| lapin_error(format!("removing from quarantine `{name}`"), &e))?;
            removed += 1;
        } else {
            last_kept = Some(*tag);
        }
    }
    hand_back(ch, name, last_kept).await?;
    Ok(removed)
}
