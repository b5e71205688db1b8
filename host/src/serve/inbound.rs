//! One request from its arrival to its settlement ([`Inbound`]), with its
//! ways out, used alike by the handler's path and by the watchdog. Each is
//! bounded: a reply that cannot be published is tried [`REPLY_TRIES`]
//! times, then its request is acked and dropped with one error line; a
//! lost connection leaves the request unsettled for the broker to deliver
//! again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use commissaire_plugin_api::RpcError;

use super::placement::InlineCall;
use crate::bus::{BusError, BusTransport, Incoming, Outgoing, Settle};
use crate::dispatch::Reply;
use crate::metrics::{Dropped, ServiceMetrics};
use crate::protocol::{error_body, parse_request};
use crate::trace::TraceContext;

/// Tries for a reply whose publishing fails for another reason than a lost
/// connection or a refusal (a broker nack): then the request is acked and
/// dropped. A refused reply ([`BusError::Refused`]: a Redis `reply_to`
/// naming a key that is not a list) is dropped at once.
pub const REPLY_TRIES: u32 = 3;

/// A delivery from its arrival to its settlement. Its states, in order:
///
/// 1. **arrived**: delivered and screened ([`Inbound::arrived`]);
/// 2. **claimed**: someone took the right to answer it, the handler's path
///    or the watchdog at the timeout, never both ([`Inbound::claim`]);
/// 3. **answered**: its reply published, if it has a `reply_to`;
/// 4. **settled**: acked, handed back, or left unsettled to the broker
///    after a lost connection ([`Inbound::is_settled`]).
pub struct Inbound {
    pub(super) incoming: Incoming,
    pub(super) queue: Arc<str>,
    pub(super) key: u64,
    pub(super) service: Arc<str>,
    pub(super) bus: Arc<dyn BusTransport>,
    pub(super) confirm: bool,
    pub(super) max_message_bytes: usize,
    pub(super) arrived: Instant,
    /// When its caller stops waiting, in ms since the Unix epoch (its
    /// `deadline` header, or its arrival plus `handler_timeout`).
    pub(super) deadline: u64,
    pub(super) timeout: Duration,
    pub(super) inline: OnceLock<InlineCall>,
    /// Claimed: someone (its handler's path, or the watchdog) took the
    /// right to answer and settle it.
    pub(super) claimed: AtomicBool,
    /// Settled: its way out is over (acked, handed back, or left to the
    /// broker after a lost connection).
    pub(super) settled: AtomicBool,
    /// The span the host opened for it, in the caller's trace if it sent
    /// one: on its reply, its handler's bus requests and its log events.
    pub(super) trace: TraceContext,
    pub(super) traceparent: String,
    pub(super) metrics: Arc<ServiceMetrics>,
    pub(super) quarantine: Arc<crate::quarantine::Quarantine>,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("queue", &self.queue)
            .field("routing_key", &self.incoming.routing_key)
            .finish_non_exhaustive()
    }
}

impl Inbound {
    /// Its trace context (see [`crate::trace`]).
    pub fn trace(&self) -> &TraceContext {
        &self.trace
    }

    /// Takes the right to answer and settle the request: true for the
    /// first caller only (the handler's path, or the watchdog at the
    /// timeout).
    pub fn claim(&self) -> bool {
        !self.claimed.swap(true, Ordering::AcqRel)
    }

    /// Whether it was claimed.
    pub fn is_claimed(&self) -> bool {
        self.claimed.load(Ordering::Acquire)
    }

    /// Whether its way out is over (see [`InFlight::unsettled`]).
    ///
    /// [`InFlight::unsettled`]: super::inflight::InFlight::unsettled
    pub fn is_settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }

    /// Its identity across redeliveries (0 when no slot file needs it).
    pub fn key(&self) -> u64 {
        self.key
    }

    /// When it arrived.
    pub fn arrived(&self) -> Instant {
        self.arrived
    }

    /// The handler's time limit, counted from the arrival.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The service serving it.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Its routing key.
    pub fn routing_key(&self) -> &str {
        &self.incoming.routing_key
    }

    /// Set while its handler runs on the runtime thread.
    pub fn inline(&self) -> Option<&InlineCall> {
        self.inline.get()
    }

    /// The delivery, for the handler.
    pub(super) fn incoming(&self) -> &Incoming {
        &self.incoming
    }

    /// The `traceparent` of the host's span for it.
    pub(super) fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// The way out of a handled request: its reply, if any, then the ack.
    pub(super) async fn reply_then_ack(&self, reply: Option<Reply>) {
        if let Some(reply) = reply {
            if !self.publish(self.fit(reply)).await {
                self.settled.store(true, Ordering::Release);
                return;
            }
        }
        self.ack().await;
    }

    /// Answers with `error` (the id read from the body, if it parses) and
    /// acks.
    pub async fn refuse(&self, error: &RpcError) {
        self.metrics
            .request(&self.incoming.routing_key, Some(error.code));
        let mut holder = None;
        let id_json =
            match parse_request(&self.incoming.body, &self.incoming.routing_key, &mut holder) {
                Ok(request) => request.id_json,
                Err(rejected) => rejected.id_json,
            };
        self.refuse_with_id(id_json, error).await;
    }

    /// Keeps the request in its service's quarantine, beside its path
    /// (see [`crate::quarantine`]): call it once it is answered.
    pub fn quarantine(&self, reason: crate::quarantine::Reason, detail: &str) {
        self.quarantine.keep(
            &self.bus,
            &self.queue,
            &self.incoming,
            reason,
            detail,
            self.trace.trace_id(),
        );
    }

    /// Counts a request refused (or dropped) for `why`.
    pub fn count_dropped(&self, why: Dropped) {
        self.metrics.dropped(why);
    }

    /// Answers with `error` and the id `id_json`, without reading the body,
    /// and acks.
    pub(super) async fn refuse_with_id(&self, id_json: &str, error: &RpcError) {
        let reply = self.incoming.reply_to.as_ref().map(|to| Reply {
            to: to.clone(),
            body: error_body(id_json, error),
        });
        self.reply_then_ack(reply).await;
    }

    /// Acks without a reply: nothing can be answered.
    pub(super) async fn drop_unanswerable(&self) {
        self.metrics
            .request(&self.incoming.routing_key, Some(RpcError::INVALID_REQUEST));
        self.ack().await;
    }

    /// Hands the delivery back to its queue, for another consumer.
    pub async fn requeue(&self) {
        if let Err(e) = self.incoming.settle(Settle::Requeue).await {
            crate::throttled!(
                warn!(service = &*self.service, error = %e, "could not hand a delivery back")
            );
        }
        self.settled.store(true, Ordering::Release);
    }

    async fn ack(&self) {
        if let Err(e) = self.incoming.settle(Settle::Ack).await {
            crate::throttled!(warn!(
                service = &*self.service, routing_key = %self.incoming.routing_key, error = %e,
                "ack failed; the request may be delivered again"
            ));
        }
        self.settled.store(true, Ordering::Release);
    }

    /// `reply`, or in its place a -32603 reply naming its size when it is
    /// over `max_message_bytes`.
    fn fit(&self, reply: Reply) -> Reply {
        let size = reply.body.len();
        if size <= self.max_message_bytes {
            return reply;
        }
        crate::throttled!(error!(
            service = &*self.service, routing_key = %self.incoming.routing_key, size,
            max_message_bytes = self.max_message_bytes,
            "reply too large: answering -32603 instead"
        ));
        let mut holder = None;
        let id_json = parse_request(&self.incoming.body, &self.incoming.routing_key, &mut holder)
            .map_or("null", |r| r.id_json);
        let error = RpcError::internal_error(format!(
            "the reply of {size} bytes exceeds max_message_bytes ({})",
            self.max_message_bytes
        ));
        Reply {
            to: reply.to,
            body: error_body(id_json, &error),
        }
    }

    /// Publishes `reply` ahead of the ack. False if the connection went
    /// away (the request must stay unsettled, for the broker to deliver it
    /// again); true once published, or once given up on after
    /// [`REPLY_TRIES`] (the request is then acked: retrying a permanent
    /// failure only loops).
    async fn publish(&self, reply: Reply) -> bool {
        let out = Outgoing {
            exchange: "",
            routing_key: &reply.to,
            body: &reply.body,
            reply_to: None,
            correlation_id: self.incoming.correlation_id.as_deref(),
            durable: true,
            confirm: self.confirm,
            expires: None,
            traceparent: Some(&self.traceparent),
            deadline: None,
            reply_ttl: Some(crate::bus::REPLY_TTL.max(self.timeout)),
        };
        let mut tries = 0;
        loop {
            tries += 1;
            let error: BusError = match self.incoming.publish_reply(&*self.bus, out).await {
                Ok(()) => return true,
                Err(e) => e,
            };
            if error.is_lost() {
                crate::throttled!(warn!(
                    service = &*self.service, routing_key = %self.incoming.routing_key,
                    error = %error,
                    "reply not published: the connection is gone; the request goes back to its queue"
                ));
                return false;
            }
            if error.is_refused() {
                crate::throttled!(warn!(
                    service = &*self.service, routing_key = %self.incoming.routing_key,
                    reply_to = %reply.to, error = %error,
                    "reply refused by the broker; the request is acked and dropped"
                ));
                self.metrics.dropped(Dropped::ReplyDropped);
                return true;
            }
            if tries >= REPLY_TRIES {
                crate::throttled!(error!(
                    service = &*self.service, routing_key = %self.incoming.routing_key,
                    reply_to = %reply.to, tries, error = %error,
                    "reply not published; the request is acked and dropped"
                ));
                self.metrics.dropped(Dropped::ReplyDropped);
                return true;
            }
            tokio::time::sleep(crate::retry::backoff(tries)).await;
        }
    }
}

#[cfg(test)]
impl Inbound {
    /// A request arriving now, outside any service, for tests.
    pub(crate) fn for_test(incoming: Incoming, key: u64, timeout: Duration) -> Self {
        let trace = TraceContext::child_of(None);
        Self {
            incoming,
            queue: Arc::from("q"),
            key,
            service: Arc::from("s"),
            bus: Arc::new(crate::bus::memory::MemoryBus::new()),
            confirm: false,
            max_message_bytes: crate::config::DEFAULT_MAX_MESSAGE_BYTES,
            arrived: Instant::now(),
            deadline: crate::deadline::after(timeout),
            timeout,
            inline: OnceLock::new(),
            claimed: AtomicBool::new(false),
            settled: AtomicBool::new(false),
            traceparent: trace.header(),
            trace,
            metrics: crate::metrics::Metrics::default().service("s", []),
            quarantine: crate::quarantine::Quarantine::new(
                Arc::from("s"),
                0,
                crate::metrics::Metrics::default().service("s", []),
            ),
        }
    }
}
