//! The unacked bookkeeping as a state machine (issue 14), against the real
//! Redis (database 2 of the test Redis) and the real scripts: take, ack, reply-and-ack,
//! requeue and restore, with each restore's read and its script as two
//! steps that other operations may come between, in any interleaving,
//! never lose or duplicate a delivery, and leave kombu's hash, its index
//! and the held set naming the same tags.
//!
//! The ack is the three commands of `Inner::ack`, sent the same way (one
//! atomic pipeline); the restore's envelope is made as `restore_by_tag`
//! makes it.

use std::collections::{BTreeMap, BTreeSet};

use ::redis::Commands as _;
use proptest::prelude::*;
use serde_json::Value;

use super::envelope::mark_redelivered;
use super::scripts::Scripts;

/// Redis database of these tests, their own (the e2e tests use 1 and 3
/// to 12), on the test Redis: `COMMISSAIRE_TEST_REDIS` (which
/// `scripts/test.sh` points at a Redis of its run's own), else the
/// machine's.
const DB: u8 = 2;

fn uri() -> String {
    let server = std::env::var("COMMISSAIRE_TEST_REDIS")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    format!("{}/{DB}", server.trim_end_matches('/'))
}

#[derive(Debug, Clone)]
enum Op {
    /// A new message onto the queue.
    Publish,
    /// The take script, for up to this many.
    Take(usize),
    /// Acks the n-th tag ever taken (perhaps settled already: a late ack).
    Ack(usize),
    /// Replies to it and acks it in one script.
    ReplyAck(usize),
    /// Reads its record, the first half of a restore (front or back).
    RestoreRead(usize, bool),
    /// Runs the n-th pending restore's script, the second half.
    RestoreRun(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Publish),
        2 => (1usize..4).prop_map(Op::Take),
        1 => any::<usize>().prop_map(Op::Ack),
        1 => any::<usize>().prop_map(Op::ReplyAck),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(n, front)| Op::RestoreRead(n, front)),
        2 => any::<usize>().prop_map(Op::RestoreRun),
    ]
}

/// This run's key names, removed when dropped.
struct Keys {
    conn: ::redis::Connection,
    unacked: String,
    index: String,
    held: String,
    queue: String,
    replies: String,
}

impl Keys {
    fn new() -> Self {
        let uri = uri();
        let conn = ::redis::Client::open(uri.as_str())
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| panic!("Redis at {uri}: {e}"));
        let run = uuid::Uuid::new_v4().simple().to_string();
        let key = |what: &str| format!("fuzzcat-bookkeeping-{run}-{what}");
        Self {
            conn,
            unacked: key("unacked"),
            index: key("unacked_index"),
            held: key("held"),
            queue: key("queue"),
            replies: key("replies"),
        }
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let keys = [
            &self.unacked,
            &self.index,
            &self.held,
            &self.queue,
            &self.replies,
        ];
        let _: Result<(), _> = self.conn.del(&keys[..]);
    }
}

/// The message a queue item or a record's payload is.
fn message_of(payload: &str) -> u64 {
    let v: Value = serde_json::from_str(payload).expect("a payload");
    v["m"].as_u64().expect("a message number")
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let scripts = Scripts::new();
    let mut k = Keys::new();
    let suffix = format!(", \"\", \"{}\"]", k.queue);
    let mut published = 0u64;
    let mut acked = BTreeSet::new();
    let mut replies = 0usize;
    let mut tags: Vec<String> = Vec::new();
    // (tag, record as read, envelope to push, front)
    let mut pending: Vec<(String, Option<String>, String, bool)> = Vec::new();
    let pick = |n: usize, len: usize| (len > 0).then(|| n % len);

    for op in ops {
        match op {
            Op::Publish => {
                let _: () = k
                    .conn
                    .lpush(&k.queue, format!(r#"{{"m":{published}}}"#))
                    .expect("LPUSH");
                published += 1;
            }
            Op::Take(count) => {
                let first = tags.len();
                let mut taken: Vec<String> = scripts
                    .take
                    .key(&k.unacked)
                    .key(&k.index)
                    .key(&k.held)
                    .key(&k.queue)
                    .arg(count)
                    .arg("t.")
                    .arg(first)
                    .arg(&suffix)
                    .arg(1_700_000_000)
                    .arg(60_000)
                    .arg("~mark-t")
                    .arg(if tags.is_empty() { "0" } else { "1" })
                    .arg("~mark-u")
                    .invoke(&mut k.conn)
                    .expect("take");
                // The database never loses anything here: the mark stays.
                prop_assert_eq!(taken.remove(0), "0");
                tags.extend((first..first + taken.len()).map(|n| format!("t.{n}")));
            }
            Op::Ack(n) | Op::ReplyAck(n) => {
                let Some(i) = pick(*n, tags.len()) else {
                    continue;
                };
                let tag = &tags[i];
                let record: Option<String> = k.conn.hget(&k.unacked, tag).expect("HGET");
                if matches!(op, Op::Ack(_)) {
                    ::redis::pipe()
                        .atomic()
                        .cmd("HDEL")
                        .arg(&k.unacked)
                        .arg(tag)
                        .ignore()
                        .cmd("ZREM")
                        .arg(&k.index)
                        .arg(tag)
                        .ignore()
                        .cmd("SREM")
                        .arg(&k.held)
                        .arg(tag)
                        .ignore()
                        .query::<()>(&mut k.conn)
                        .expect("ack");
                } else {
                    let answer: ::redis::Value = scripts
                        .reply_ack
                        .key(&k.replies)
                        .key(&k.unacked)
                        .key(&k.index)
                        .key(&k.held)
                        .arg(r#"{"reply":true}"#)
                        .arg(tag)
                        .arg("~mark-t")
                        .arg(3_600_000)
                        .invoke(&mut k.conn)
                        .expect("reply and ack");
                    // A request handed back is answered by its next
                    // holder, never here too.
                    let expected = if record.is_some() { 0 } else { 2 };
                    prop_assert_eq!(answer, ::redis::Value::Int(expected));
                    if record.is_some() {
                        replies += 1;
                    }
                    let listed: usize = k.conn.llen(&k.replies).expect("LLEN");
                    prop_assert_eq!(listed, replies);
                    // A reply list nobody reads expires (an hour here).
                    let ttl: i64 = k.conn.pttl(&k.replies).expect("PTTL");
                    prop_assert!(
                        replies == 0 || (3_500_000..=3_600_000).contains(&ttl),
                        "reply list TTL {ttl} ms"
                    );
                }
                // The record there just before is what the ack settled.
                if let Some(record) = record {
                    let (payload, _, _): (Value, Value, Value) =
                        serde_json::from_str(&record).expect("a record");
                    prop_assert!(acked.insert(message_of(&payload.to_string())));
                }
            }
            Op::RestoreRead(n, front) => {
                let Some(i) = pick(*n, tags.len()) else {
                    continue;
                };
                let record: Option<String> = k.conn.hget(&k.unacked, &tags[i]).expect("HGET");
                let envelope = match &record {
                    Some(record) => {
                        let (mut payload, _, _): (Value, Value, Value) =
                            serde_json::from_str(record).expect("a record");
                        mark_redelivered(&mut payload);
                        payload.to_string()
                    }
                    None => String::new(),
                };
                pending.push((tags[i].clone(), record, envelope, *front));
            }
            Op::RestoreRun(n) => {
                let Some(i) = pick(*n, pending.len()) else {
                    continue;
                };
                let (tag, record, envelope, front) = pending.remove(i);
                let answer: ::redis::Value = scripts
                    .restore
                    .key(&k.unacked)
                    .key(&k.index)
                    .key(&k.held)
                    .key(&k.queue)
                    .arg(&tag)
                    .arg(record.as_deref().unwrap_or(""))
                    .arg(&envelope)
                    .arg(if front { "r" } else { "l" })
                    .arg("1")
                    .invoke(&mut k.conn)
                    .expect("restore");
                prop_assert!(matches!(answer, ::redis::Value::Int(0 | 1)), "{answer:?}");
            }
        }

        // Every message is in exactly one place: its queue, one unacked
        // record, or acked.
        let queued: Vec<String> = k.conn.lrange(&k.queue, 0, -1).expect("LRANGE");
        let records: BTreeMap<String, String> = k.conn.hgetall(&k.unacked).expect("HGETALL");
        let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
        for payload in &queued {
            *seen.entry(message_of(payload)).or_default() += 1;
        }
        for record in records.values() {
            let (payload, _, _): (Value, Value, Value) =
                serde_json::from_str(record).expect("a record");
            *seen.entry(message_of(&payload.to_string())).or_default() += 1;
        }
        for m in &acked {
            *seen.entry(*m).or_default() += 1;
        }
        for m in 0..published {
            prop_assert_eq!(
                seen.get(&m).copied().unwrap_or(0),
                1,
                "message {} after {:?}: queued {:?}, unacked {:?}, acked {:?}",
                m,
                op,
                queued,
                records,
                acked
            );
        }
        prop_assert_eq!(seen.len() as u64, published);
        // kombu's index and our held set name exactly the unacked tags.
        let record_tags: BTreeSet<String> = records.keys().cloned().collect();
        let index: BTreeSet<String> = k.conn.zrange(&k.index, 0, -1).expect("ZRANGE");
        let mut held: BTreeSet<String> = k.conn.smembers(&k.held).expect("SMEMBERS");
        // Besides its mark, which stays (see the take script).
        held.remove("~mark-t");
        prop_assert_eq!(&index, &record_tags);
        prop_assert_eq!(&held, &record_tags);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn no_interleaving_loses_or_duplicates_a_delivery(ops in proptest::collection::vec(op(), 1..60)) {
        run(&ops)?;
    }
}

/// A database that lost everything (a restart without persistence, a
/// `FLUSHDB`; here: this test's keys deleted) under a held request: its
/// reply still goes out (3), while a request handed back keeps its mark
/// and is not answered twice (2); the next take finds its mark gone and
/// switches to the new one.
#[test]
fn a_request_held_when_the_database_lost_its_record_is_answered_once() {
    let scripts = Scripts::new();
    let mut k = Keys::new();
    let suffix = format!(", \"\", \"{}\"]", k.queue);
    let take = |k: &mut Keys, expected: &str, first: u64| -> Vec<String> {
        scripts
            .take
            .key(&k.unacked)
            .key(&k.index)
            .key(&k.held)
            .key(&k.queue)
            .arg(2)
            .arg("t.")
            .arg(first)
            .arg(&suffix)
            .arg(1_700_000_000)
            .arg(60_000)
            .arg("~mark-old")
            .arg(expected)
            .arg("~mark-new")
            .invoke(&mut k.conn)
            .expect("take")
    };
    let reply_ack = |k: &mut Keys, tag: &str, mark: &str| -> ::redis::Value {
        scripts
            .reply_ack
            .key(&k.replies)
            .key(&k.unacked)
            .key(&k.index)
            .key(&k.held)
            .arg(r#"{"reply":true}"#)
            .arg(tag)
            .arg(mark)
            .invoke(&mut k.conn)
            .expect("reply and ack")
    };
    let _: () = k.conn.lpush(&k.queue, r#"{"m":1}"#).expect("LPUSH");
    let _: () = k.conn.lpush(&k.queue, r#"{"m":2}"#).expect("LPUSH");
    assert_eq!(take(&mut k, "0", 0).len(), 3, "the flag and two messages");
    // t.0 handed back (its record gone, the mark kept): not answered here.
    let _: () = k.conn.hdel(&k.unacked, "t.0").expect("HDEL");
    assert_eq!(
        reply_ack(&mut k, "t.0", "~mark-old"),
        ::redis::Value::Int(2)
    );
    // The database loses everything: t.1 is answered all the same.
    let _: () = k
        .conn
        .del(&[&k.unacked, &k.index, &k.held, &k.queue])
        .expect("DEL");
    assert_eq!(
        reply_ack(&mut k, "t.1", "~mark-old"),
        ::redis::Value::Int(3)
    );
    let replies: usize = k.conn.llen(&k.replies).expect("LLEN");
    assert_eq!(replies, 1);
    // The next take sees the loss and marks with the new mark.
    let _: () = k.conn.lpush(&k.queue, r#"{"m":3}"#).expect("LPUSH");
    let taken = take(&mut k, "1", 2);
    assert_eq!(taken[0], "1", "{taken:?}");
    let marked: bool = k.conn.sismember(&k.held, "~mark-new").expect("SISMEMBER");
    assert!(marked);
}
