//! Limits: the bounds on one request and one worker, and what happens when
//! one bites, in one place.
//!
//! | limit | its setting | checked | when it bites |
//! | --- | --- | --- | --- |
//! | size | `[bus] max_message_bytes` | [`RequestLimits::screen`], on arrival; a reply in `serve::inbound` | -32600 (a reply: -32603); [`Dropped::Oversize`] |
//! | readable properties | none: always | [`RequestLimits::screen`] | -32600 or dropped; [`Dropped::NotUtf8`], [`Dropped::TooDeep`], … |
//! | the caller's deadline | the request's `deadline` header (`crate::deadline`) | [`RequestLimits::screen`]; a handler's bus calls wait no longer | -32603; [`Dropped::DeadlinePassed`] |
//! | crashes, deliveries | `crash_limit` | [`RequestLimits::judge`], on a redelivery | -32603; [`Dropped::Poison`] |
//! | deadline | `handler_timeout` (+ `[host] handler_grace`) | `serve::watchdog` | -32603; [`Dropped::Timeout`] |
//! | quarantine | `quarantine` (entries per queue) | `crate::quarantine` | the oldest entry is dropped |
//! | in flight | `concurrency` | the consumer's prefetch, per queue | the rest waits in its queue |
//! | waits on the bus | `max_bus_waits` | `serve::handler_bus` | calls wait without taking more deliveries; calls to the service itself run in their caller's thread |
//! | HTTP in flight, connections, buffered bytes | `[http] max_*` | `http::budget` | 503 |
//!
//! Adding a per-request limit: its field and default here, its check in
//! [`RequestLimits::screen`] (or [`RequestLimits::judge`]) returning a
//! [`Refusal`], its config line in `config/`, and its reason in
//! `metrics::dropped_reasons!`, which gives it a counter. The request's
//! life (`serve::lifecycle`) answers every [`Refusal`] the same way.

use std::time::Duration;

use commissaire_plugin_api::RpcError;

use crate::bus::{Incoming, Malformed};
use crate::control::Seen;
use crate::metrics::Dropped;

/// The largest request (and reply) the host takes unless configured.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// How long a handler may run before its caller gets a timeout reply.
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(60);
/// How much longer a timed-out handler may run before its worker is
/// recycled.
pub const DEFAULT_HANDLER_GRACE: Duration = Duration::from_secs(10);
/// Handlers in flight per queue, in each worker, unless configured.
pub const DEFAULT_CONCURRENCY: u16 = 16;
/// Handlers waiting in bus calls at once, per worker, per unit of
/// `concurrency`, unless configured.
pub const DEFAULT_BUS_WAITS_PER_SLOT: u16 = 4;
/// How many worker crashes a request may cause before it is refused.
pub const DEFAULT_CRASH_LIMIT: u32 = 3;
/// Entries each quarantine keeps unless configured (`[[service]]
/// quarantine`; 0 turns it off): past it, the oldest goes (see
/// [`crate::quarantine`]).
pub const DEFAULT_QUARANTINE: u32 = 1000;
/// Deliveries beyond `crash_limit` a request may have, whatever brought it
/// back (a lost connection while its reply went out, a shutdown past its
/// timeout, a Redis visibility timeout), before it is refused. Its worker's
/// death does not count, a bounded number of times (see
/// `supervise::crashes`).
pub const EXTRA_DELIVERIES: u32 = 3;
/// Requests relayed at once by the HTTP endpoint unless configured.
pub const DEFAULT_HTTP_MAX_IN_FLIGHT: usize = 1024;
/// Connections the HTTP endpoint keeps open at once unless configured.
pub const DEFAULT_HTTP_MAX_CONNECTIONS: usize = 1024;
/// Bytes of HTTP request bodies held at once, all requests together,
/// unless configured.
pub const DEFAULT_HTTP_MAX_BUFFERED_BYTES: usize = 256 * 1024 * 1024;
/// How long an HTTP client has to send a whole request head unless
/// configured.
pub const DEFAULT_HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The bounds one service's requests are held to in a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// The largest request body, and reply body.
    pub max_message_bytes: usize,
    /// How long a handler may run before its caller gets a timeout reply.
    pub handler_timeout: Duration,
    /// Crashes of its own a request may cause before it is refused.
    pub crash_limit: u32,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            handler_timeout: DEFAULT_HANDLER_TIMEOUT,
            crash_limit: DEFAULT_CRASH_LIMIT,
        }
    }
}

/// A request refused by a limit, before its handler.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// Its counter.
    pub dropped: Dropped,
    /// A wider counter it also counts under (an unreadable `reply_to` is
    /// also a property that is not UTF-8).
    pub also: Option<Dropped>,
    /// How it ends.
    pub way: Way,
    /// The log line's words (one line per reason per interval).
    pub log: String,
    /// What the log line adds as its `reason` field.
    pub detail: String,
}

/// How a refused request ends.
#[derive(Debug, Clone, PartialEq)]
pub enum Way {
    /// Answered with this error, then acked. `read_id`: the answer carries
    /// the id read from the body (false: `null`, the body left unread).
    Answer {
        /// The error.
        error: RpcError,
        /// Whether to read the id from the body.
        read_id: bool,
    },
    /// Acked without a reply: nothing can be answered.
    Drop,
}

impl RequestLimits {
    /// What cannot be handled, found before the body is parsed: a request
    /// too large, unreadable properties, a caller's deadline passed.
    pub fn screen(&self, incoming: &Incoming) -> Option<Refusal> {
        let size = incoming.body.len();
        if size > self.max_message_bytes {
            return Some(Refusal {
                dropped: Dropped::Oversize,
                way: Way::Answer {
                    error: RpcError::invalid_request(format!(
                        "request of {size} bytes exceeds max_message_bytes ({})",
                        self.max_message_bytes
                    )),
                    read_id: false,
                },
                also: None,
                log: "request over max_message_bytes: answering -32600 without parsing it"
                    .to_owned(),
                detail: format!("{size} bytes"),
            });
        }
        if let Some(refusal) = incoming.malformed.map(|m| self.unreadable(m)) {
            return Some(refusal);
        }
        let deadline = incoming.deadline?;
        let now = crate::deadline::now_ms();
        if deadline > now {
            return None;
        }
        let late = now - deadline;
        Some(Refusal {
            dropped: Dropped::DeadlinePassed,
            also: None,
            way: Way::Answer {
                error: RpcError::internal_error(format!(
                    "deadline passed {late} ms before the request could start"
                )),
                read_id: true,
            },
            log: "request whose caller's deadline passed: answering -32603 without running it"
                .to_owned(),
            detail: format!("{late} ms late"),
        })
    }

    /// A request whose properties cannot be read as the host reads them.
    fn unreadable(&self, malformed: Malformed) -> Refusal {
        let (dropped, way, log) = match malformed {
            Malformed::NotAnEnvelope => (
                Dropped::NotAnEnvelope,
                Way::Drop,
                format!("{malformed}: dropped without a reply"),
            ),
            m if m.unanswerable() => (
                Dropped::UnreadableReplyTo,
                Way::Drop,
                "a request whose reply_to is not valid UTF-8: dropped without a reply".to_owned(),
            ),
            m => (
                if m == Malformed::TooDeep {
                    Dropped::TooDeep
                } else {
                    Dropped::NotUtf8
                },
                Way::Answer {
                    error: RpcError::invalid_request(m.to_string()),
                    read_id: true,
                },
                "request with unreadable properties: answering -32600".to_owned(),
            ),
        };
        Refusal {
            dropped,
            also: (dropped == Dropped::UnreadableReplyTo).then_some(Dropped::NotUtf8),
            way,
            log,
            detail: malformed.to_string(),
        }
    }

    /// A redelivered request, judged on what the supervisor saw of it:
    /// refused after `crash_limit` crashes of its own, or `crash_limit +
    /// EXTRA_DELIVERIES` deliveries.
    pub fn judge(&self, seen: &Seen) -> Option<Refusal> {
        let why = if seen.crashes >= self.crash_limit {
            format!("request crashed the worker {} times", seen.crashes)
        } else if seen.deliveries > self.crash_limit.saturating_add(EXTRA_DELIVERIES) {
            format!(
                "request delivered {} times without being answered",
                seen.deliveries
            )
        } else {
            return None;
        };
        Some(Refusal {
            dropped: Dropped::Poison,
            also: None,
            log: format!("refusing a request: {why}"),
            detail: format!("{} crashes, {} deliveries", seen.crashes, seen.deliveries),
            way: Way::Answer {
                error: RpcError::internal_error(why),
                read_id: true,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(body: &[u8], malformed: Option<Malformed>) -> Incoming {
        Incoming {
            exchange: String::new(),
            routing_key: "s.m".to_owned(),
            body: body.to_vec(),
            reply_to: None,
            correlation_id: None,
            malformed,
            traceparent: None,
            redelivered: false,
            deadline: None,
            settlement: None,
        }
    }

    fn code(r: &Refusal) -> Option<i64> {
        match &r.way {
            Way::Answer { error, .. } => Some(error.code),
            Way::Drop => None,
        }
    }

    #[test]
    fn screening_answers_what_can_be_answered_and_drops_the_rest() {
        let limits = RequestLimits {
            max_message_bytes: 4,
            ..RequestLimits::default()
        };
        assert_eq!(limits.screen(&incoming(b"1234", None)), None);
        let big = limits.screen(&incoming(b"12345", None)).unwrap();
        assert_eq!((big.dropped, code(&big)), (Dropped::Oversize, Some(-32600)));
        assert!(matches!(big.way, Way::Answer { read_id: false, .. }));
        let rows = [
            (
                Malformed::NotUtf8("correlation_id"),
                Dropped::NotUtf8,
                Some(-32600),
            ),
            (Malformed::TooDeep, Dropped::TooDeep, Some(-32600)),
            (
                Malformed::NotUtf8("reply_to"),
                Dropped::UnreadableReplyTo,
                None,
            ),
            (Malformed::NotAnEnvelope, Dropped::NotAnEnvelope, None),
        ];
        for (malformed, dropped, answer) in rows {
            let r = limits.screen(&incoming(b"{}", Some(malformed))).unwrap();
            assert_eq!((r.dropped, code(&r)), (dropped, answer), "{malformed:?}");
        }
    }

    #[test]
    fn a_request_whose_caller_gave_up_is_answered_without_running() {
        let limits = RequestLimits::default();
        let mut late = incoming(b"{}", None);
        late.deadline = Some(crate::deadline::now_ms() - 1);
        let r = limits.screen(&late).unwrap();
        assert_eq!(
            (r.dropped, code(&r)),
            (Dropped::DeadlinePassed, Some(-32603))
        );
        let mut in_time = incoming(b"{}", None);
        in_time.deadline = Some(crate::deadline::after(Duration::from_secs(5)));
        assert_eq!(limits.screen(&in_time), None);
    }

    #[test]
    fn a_redelivery_is_refused_at_the_crash_limit_or_past_the_extra_deliveries() {
        let limits = RequestLimits {
            crash_limit: 3,
            ..RequestLimits::default()
        };
        let seen = |crashes, deliveries| Seen {
            crashes,
            deliveries,
            alone: false,
        };
        assert_eq!(limits.judge(&seen(2, 6)), None);
        let r = limits.judge(&seen(3, 3)).unwrap();
        assert_eq!((r.dropped, code(&r)), (Dropped::Poison, Some(-32603)));
        assert!(r.log.ends_with("request crashed the worker 3 times"));
        let r = limits.judge(&seen(0, 7)).unwrap();
        assert!(r.log.ends_with("delivered 7 times without being answered"));
    }
}
