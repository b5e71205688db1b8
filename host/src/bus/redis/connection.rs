//! One connection's shared state: the client, the multiplexed command
//! connection (reconnected on demand), who it consumes as, and the
//! commands every part runs through it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client, RedisError};
use tokio_util::sync::CancellationToken;

use super::keys::{binding_key, held_key, member_routes};
use super::options::RedisOptions;
use super::scripts::Scripts;
use crate::bus::BusError;
use crate::redact::scrub;

/// How long one blocking wait lasts (kombu's `brpop_timeout`), so how soon
/// a stopped reply consumer notices.
pub(super) const BLOCK_SECS: u64 = 1;

/// Seconds since the epoch, as Python's `time.time()` (kombu scores the
/// unacked index with it).
pub(super) fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A Redis error as a bus error: a broken connection is [`BusError::Lost`].
pub(super) fn op(operation: impl Into<String>, e: &RedisError) -> BusError {
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        BusError::lost(operation, e)
    } else {
        BusError::op(operation, e)
    }
}

/// What a script that pushes answered: 0, or why it refused.
pub(super) fn refused(operation: &str, answer: ::redis::Value) -> Result<(), BusError> {
    let why = match answer {
        ::redis::Value::Int(_) | ::redis::Value::Nil => return Ok(()),
        ::redis::Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        ::redis::Value::SimpleString(text) => text,
        other => format!("unexpected answer {other:?}"),
    };
    Err(BusError::Refused {
        operation: operation.to_owned(),
        reason: why,
    })
}

/// Who consumes: the owner its held set is named after, and the prefix
/// that makes its tags unique.
pub(super) struct Identity {
    /// The held set: see [`held_key`].
    pub held: String,
    /// The owner.
    pub owner: String,
    /// `<owner>.<this connection>.`: tags are this and a sequence number.
    pub tag_prefix: String,
    next: AtomicU64,
    /// The mark the held set holds while it holds anything (see the take
    /// script), and when a take last put it there.
    mark: std::sync::Mutex<(std::sync::Arc<str>, Option<std::time::Instant>)>,
}

/// The prefix of held-set marks: never a tag (see [`super::keys::held_key_of_tag`]).
pub(super) const MARK_PREFIX: &str = "~mark-";

fn new_mark() -> std::sync::Arc<str> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{MARK_PREFIX}{}", &id[..12]).into()
}

impl Identity {
    pub fn new(owner: String) -> Self {
        let connection = uuid::Uuid::new_v4().simple().to_string();
        Self {
            held: held_key(&owner),
            tag_prefix: format!("{owner}.{}.", &connection[..12]),
            owner,
            next: AtomicU64::new(0),
            mark: std::sync::Mutex::new((new_mark(), None)),
        }
    }

    /// For a take: the current mark, whether the held set should still
    /// hold it (a take put it there within `expiry`), and a new mark for
    /// the take to use if it was lost.
    pub fn marks(&self, expiry: Duration) -> (std::sync::Arc<str>, bool, std::sync::Arc<str>) {
        let mark = self
            .mark
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let expected = mark.1.is_some_and(|at| at.elapsed() < expiry);
        (mark.0.clone(), expected, new_mark())
    }

    /// A take put `mark` in the held set just now.
    pub fn marked(&self, mark: &std::sync::Arc<str>) {
        let mut current = self
            .mark
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *current = (mark.clone(), Some(std::time::Instant::now()));
    }

    /// Reserves `n` sequence numbers; returns the first.
    pub fn reserve(&self, n: u64) -> u64 {
        self.next.fetch_add(n, Ordering::Relaxed)
    }
}

/// The state every part of one connection shares.
pub(super) struct Inner {
    /// The redacted URI.
    pub uri: String,
    /// The URI as given: only to scrub its password from error messages.
    pub secret_uri: String,
    pub client: Client,
    pub options: RedisOptions,
    pub identity: Identity,
    /// The command connection (multiplexed; `None` after it broke, until
    /// the next command reconnects).
    pub commands: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    /// Cancelled by `close`.
    pub closing: CancellationToken,
    pub restorer_started: AtomicBool,
    /// The restore sweep's task: `close` waits for a sweep under way, so
    /// that its lock on the unacked index is released, not left to expire.
    pub restorer: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    pub scripts: Scripts,
    /// The binding sets last read, to route publishes by.
    pub bindings: super::bindings::Bindings,
}

pub(super) fn command_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)))
}

/// A blocking command's reply may take the whole block time.
fn blocking_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(BLOCK_SECS + 10)))
}

impl Inner {
    pub async fn conn(&self) -> Result<MultiplexedConnection, BusError> {
        let mut slot = self.commands.lock().await;
        if let Some(conn) = &*slot {
            return Ok(conn.clone());
        }
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&command_config())
            .await
            .map_err(|e| BusError::connect(&self.secret_uri, e))?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets a broken command connection, so the next command reconnects.
    pub async fn check(&self, e: &RedisError) {
        if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
            *self.commands.lock().await = None;
        }
    }

    /// An error of `what`, its password scrubbed.
    pub fn fail(&self, what: &str, e: &RedisError) -> BusError {
        let mut error = op(what, e);
        if let BusError::Operation { reason, .. } | BusError::Lost { reason, .. } = &mut error {
            *reason = scrub(reason, &self.secret_uri);
        }
        error
    }

    /// Whether a command failed because the command connection was found
    /// broken: after a Redis restart, the first command on the old
    /// connection. It is made anew and the command sent once more (at
    /// least once: a command whose answer alone was lost runs twice, as a
    /// redelivery would).
    fn retry_after(&self, e: &RedisError, retried: &mut bool) -> bool {
        let again = !*retried && (e.is_connection_dropped() || e.is_io_error());
        *retried = true;
        again
    }

    pub async fn query<T: ::redis::FromRedisValue>(
        &self,
        what: &str,
        cmd: &::redis::Cmd,
    ) -> Result<T, BusError> {
        let mut retried = false;
        loop {
            let mut conn = self.conn().await?;
            match cmd.query_async(&mut conn).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    self.check(&e).await;
                    if !self.retry_after(&e, &mut retried) {
                        return Err(self.fail(what, &e));
                    }
                }
            }
        }
    }

    pub async fn pipe(&self, what: &str, pipe: &::redis::Pipeline) -> Result<(), BusError> {
        let mut retried = false;
        loop {
            let mut conn = self.conn().await?;
            match pipe.query_async::<()>(&mut conn).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.check(&e).await;
                    if !self.retry_after(&e, &mut retried) {
                        return Err(self.fail(what, &e));
                    }
                }
            }
        }
    }

    pub async fn script<T: ::redis::FromRedisValue>(
        &self,
        what: &str,
        inv: &::redis::ScriptInvocation<'_>,
    ) -> Result<T, BusError> {
        let mut retried = false;
        loop {
            let mut conn = self.conn().await?;
            match inv.invoke_async::<T>(&mut conn).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    self.check(&e).await;
                    if !self.retry_after(&e, &mut retried) {
                        return Err(self.fail(what, &e));
                    }
                }
            }
        }
    }

    /// The queues `routing_key` reaches through `exchange`, as kombu's
    /// `Channel._lookup`: the default exchange names the queue, any other
    /// is looked up in its binding set.
    pub async fn lookup(&self, exchange: &str, routing_key: &str) -> Result<Vec<String>, BusError> {
        if exchange.is_empty() {
            return Ok(vec![routing_key.to_owned()]);
        }
        let members: Vec<String> = self
            .query(
                &format!("reading the bindings of `{exchange}`"),
                ::redis::cmd("SMEMBERS").arg(binding_key(exchange)),
            )
            .await?;
        let queues: BTreeSet<String> = members
            .iter()
            .filter_map(|m| member_routes(m, routing_key))
            .collect();
        Ok(queues.into_iter().collect())
    }

    /// A connection of its own for blocking commands.
    pub async fn blocking_connection(&self) -> Result<MultiplexedConnection, RedisError> {
        self.client
            .get_multiplexed_async_connection_with_config(&blocking_config())
            .await
    }

    /// Reconnects a blocking connection after a failure, waiting 100 ms
    /// before the first attempt and doubling up to a second between the
    /// next (a restarted server is served again soon after it is back);
    /// `None` once `stop` is cancelled.
    pub async fn reconnect(
        &self,
        stop: &CancellationToken,
        what: &str,
    ) -> Option<MultiplexedConnection> {
        let mut wait = Duration::from_millis(100);
        loop {
            tokio::select! {
                () = stop.cancelled() => return None,
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(1));
            match self.blocking_connection().await {
                Ok(conn) => return Some(conn),
                Err(e) => {
                    crate::throttled!(
                        warn!(error = %scrub(&e.to_string(), &self.secret_uri), "{what}: cannot reconnect")
                    )
                }
            }
        }
    }
}
