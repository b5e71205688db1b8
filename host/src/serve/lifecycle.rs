//! One request's life, from its delivery to its settlement, in one place:
//! [`serve`] screens the delivery, checks a redelivered one with the
//! supervisor, runs the handler, then replies and acks.
//!
//! Every way out is a method of [`Inbound`], used alike by the handler's
//! path and by the watchdog, and each is bounded: a reply that cannot be
//! published is tried [`REPLY_TRIES`] times, then its request is acked and
//! dropped with one error line; a lost connection leaves the request
//! unsettled for the broker to deliver again; a request delivered again and
//! again is refused after `crash_limit` crashes of its own (see
//! [`crate::supervise::crashes`]) or `crash_limit + `[`EXTRA_DELIVERIES`]
//! deliveries not caused by another request's crash.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use commissaire_plugin_api::RpcError;
use tracing::Instrument as _;

use super::handler_bus::HandlerBus;
use super::inflight::request_key;
use super::placement::{InlineCall, Placement};
use super::Process;
use crate::bus::{BusError, BusTransport, Incoming, Malformed, Outgoing, Settle};
use crate::dispatch::{error_body, parse_request, Delivery, Handled, Reply, Service};
use crate::metrics::{Dropped, ServiceMetrics};
use crate::trace::TraceContext;

/// Tries for a reply whose publishing fails for another reason than a lost
/// connection or a refusal (a broker nack): then the request is acked and
/// dropped. A refused reply ([`BusError::Refused`]: a Redis `reply_to`
/// naming a key that is not a list) is dropped at once.
pub const REPLY_TRIES: u32 = 3;

/// Deliveries beyond `crash_limit` a request may have, whatever brought it
/// back (a lost connection while its reply went out, a shutdown past its
/// timeout, a Redis visibility timeout), before it is refused. Its worker's
/// death does not count, a bounded number of times (see
/// `supervise::crashes`).
pub const EXTRA_DELIVERIES: u32 = 3;

/// What serving one service takes: shared by its consumers' deliveries.
pub(super) struct Served {
    pub service: Arc<Service>,
    pub name: Arc<str>,
    pub bus: Arc<dyn BusTransport>,
    pub handler_bus: Arc<HandlerBus>,
    pub placement: Arc<Placement>,
    pub handler_timeout: Duration,
    pub crash_limit: u32,
    pub confirm_replies: bool,
    pub max_message_bytes: usize,
    pub process: Process,
    pub metrics: Arc<ServiceMetrics>,
}

/// A delivery from its arrival to its settlement.
pub struct Inbound {
    incoming: Incoming,
    queue: Arc<str>,
    key: u64,
    service: Arc<str>,
    bus: Arc<dyn BusTransport>,
    confirm: bool,
    max_message_bytes: usize,
    arrived: Instant,
    timeout: Duration,
    inline: OnceLock<InlineCall>,
    /// Claimed: someone took the right to answer and settle it.
    settled: AtomicBool,
    /// Its way out is over: acked, handed back, or left to the broker
    /// after a lost connection.
    done: AtomicBool,
    /// The span the host opened for it, in the caller's trace if it sent
    /// one: on its reply, its handler's bus requests and its log events.
    trace: TraceContext,
    traceparent: String,
    metrics: Arc<ServiceMetrics>,
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
    fn new(s: &Served, queue: Arc<str>, incoming: Incoming, key: u64) -> Self {
        let parent = incoming
            .traceparent
            .as_deref()
            .and_then(TraceContext::parse);
        let trace = TraceContext::child_of(parent.as_ref());
        Self {
            incoming,
            queue,
            key,
            service: s.name.clone(),
            bus: s.bus.clone(),
            confirm: s.confirm_replies,
            max_message_bytes: s.max_message_bytes,
            arrived: Instant::now(),
            timeout: s.handler_timeout,
            inline: OnceLock::new(),
            settled: AtomicBool::new(false),
            done: AtomicBool::new(false),
            traceparent: trace.header(),
            trace,
            metrics: s.metrics.clone(),
        }
    }

    /// Its trace context (see [`crate::trace`]).
    pub fn trace(&self) -> &TraceContext {
        &self.trace
    }

    /// Takes the right to answer and settle the request: true for the
    /// first caller only (the handler's path, or the watchdog at the
    /// timeout).
    pub fn claim(&self) -> bool {
        !self.settled.swap(true, Ordering::AcqRel)
    }

    /// Whether it was claimed.
    pub fn is_claimed(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }

    /// Whether its way out is over (see [`InFlight::unsettled`]).
    ///
    /// [`InFlight::unsettled`]: super::inflight::InFlight::unsettled
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
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

    fn delivery(&self) -> Delivery<'_> {
        let i = &self.incoming;
        Delivery {
            exchange: &i.exchange,
            routing_key: &i.routing_key,
            body: &i.body,
            reply_to: i.reply_to.as_deref(),
            correlation_id: i
                .correlation_id
                .as_deref()
                .and_then(|c| std::str::from_utf8(c).ok()),
            redelivered: i.redelivered,
            traceparent: Some(&self.traceparent),
        }
    }

    /// The way out of a handled request: its reply, if any, then the ack.
    async fn reply_then_ack(&self, reply: Option<Reply>) {
        if let Some(reply) = reply {
            if !self.publish(self.fit(reply)).await {
                self.done.store(true, Ordering::Release);
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

    /// Counts a request refused (or dropped) for `why`.
    pub fn count_dropped(&self, why: Dropped) {
        self.metrics.dropped(why);
    }

    /// Answers with `error` and the id `id_json`, without reading the body,
    /// and acks.
    async fn refuse_with_id(&self, id_json: &str, error: &RpcError) {
        let reply = self.incoming.reply_to.as_ref().map(|to| Reply {
            to: to.clone(),
            body: error_body(id_json, error),
        });
        self.reply_then_ack(reply).await;
    }

    /// Acks without a reply: nothing can be answered (one warning).
    async fn drop_unanswerable(&self, why: &str, counted: Dropped) {
        self.metrics.dropped(counted);
        self.metrics
            .request(&self.incoming.routing_key, Some(RpcError::INVALID_REQUEST));
        crate::throttled!(warn!(
            service = &*self.service,
            queue = &*self.queue,
            delivery_tag = %self.incoming.tag(),
            "{why}: dropped without a reply"
        ));
        self.ack().await;
    }

    /// Hands the delivery back to its queue, for another consumer.
    pub async fn requeue(&self) {
        if let Err(e) = self.incoming.settle(Settle::Requeue).await {
            crate::throttled!(
                warn!(service = &*self.service, error = %e, "could not hand a delivery back")
            );
        }
        self.done.store(true, Ordering::Release);
    }

    async fn ack(&self) {
        if let Err(e) = self.incoming.settle(Settle::Ack).await {
            crate::throttled!(warn!(
                service = &*self.service, routing_key = %self.incoming.routing_key, error = %e,
                "ack failed; the request may be delivered again"
            ));
        }
        self.done.store(true, Ordering::Release);
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
            timeout,
            inline: OnceLock::new(),
            settled: AtomicBool::new(false),
            done: AtomicBool::new(false),
            traceparent: trace.header(),
            trace,
            metrics: crate::metrics::Metrics::default().service("s", []),
        }
    }
}

/// Serves one delivery of `queue` through its whole life, every event of
/// it in a `request{trace_id}` span.
pub(super) async fn serve(s: Arc<Served>, queue: Arc<str>, incoming: Incoming) {
    let key = if s.process.inflight.wants_keys() {
        request_key(&incoming)
    } else {
        0
    };
    let inbound = Arc::new(Inbound::new(&s, queue, incoming, key));
    let span = tracing::info_span!("request", trace_id = %inbound.trace.trace_id());
    live(s, inbound).instrument(span).await;
}

async fn live(s: Arc<Served>, inbound: Arc<Inbound>) {
    let inflight = &s.process.inflight;
    let key = inbound.key;
    let incoming = &inbound.incoming;
    // Held from here: if the worker dies before it runs, its coming back
    // is the death's doing, not its own (see `supervise::crashes`).
    let held = inflight.hold(key);

    // What cannot be handled is answered, or dropped, before it is parsed.
    let size = incoming.body.len();
    if size > s.max_message_bytes {
        crate::throttled!(warn!(
            service = &*s.name, queue = &*inbound.queue, routing_key = %incoming.routing_key,
            size, "request over max_message_bytes: answering -32600 without parsing it"
        ));
        let error = RpcError::invalid_request(format!(
            "request of {size} bytes exceeds max_message_bytes ({})",
            s.max_message_bytes
        ));
        inbound.claim();
        s.metrics.dropped(Dropped::Oversize);
        s.metrics.request(&incoming.routing_key, Some(error.code));
        return inbound.refuse_with_id("null", &error).await;
    }
    if let Some(malformed) = incoming.malformed {
        inbound.claim();
        if malformed == Malformed::NotAnEnvelope {
            return inbound
                .drop_unanswerable(&malformed.to_string(), Dropped::NotAnEnvelope)
                .await;
        }
        s.metrics.dropped(match malformed {
            Malformed::TooDeep => Dropped::TooDeep,
            _ => Dropped::NotUtf8,
        });
        if malformed.unanswerable() {
            return inbound
                .drop_unanswerable(
                    "a request whose reply_to is not valid UTF-8",
                    Dropped::UnreadableReplyTo,
                )
                .await;
        }
        crate::throttled!(warn!(
            service = &*s.name, queue = &*inbound.queue, delivery_tag = %incoming.tag(),
            reason = %malformed, "request with unreadable properties: answering -32600"
        ));
        return inbound
            .refuse(&RpcError::invalid_request(malformed.to_string()))
            .await;
    }

    // A redelivered request may be the one that killed the last workers,
    // or one that keeps coming back for another reason. One suspected of a
    // crash runs alone, so that a crash while it runs is its own.
    let mut alone = false;
    if incoming.redelivered {
        if let Some(control) = &s.process.control {
            let seen = control.check(key).await;
            alone = seen.alone;
            let refusal = if seen.crashes >= s.crash_limit {
                Some(format!("request crashed the worker {} times", seen.crashes))
            } else if seen.deliveries > s.crash_limit + EXTRA_DELIVERIES {
                Some(format!(
                    "request delivered {} times without being answered",
                    seen.deliveries
                ))
            } else {
                None
            };
            if let Some(refusal) = refusal {
                crate::throttled!(error!(
                    service = &*s.name, routing_key = %incoming.routing_key,
                    crashes = seen.crashes, deliveries = seen.deliveries,
                    "refusing a request: {refusal}"
                ));
                inbound.claim();
                s.metrics.dropped(Dropped::Poison);
                return inbound.refuse(&RpcError::internal_error(refusal)).await;
            }
        }
    }

    // From here to its settlement (decoding, the handler, the reply, the
    // ack), a crash of this worker may be the request's doing: alone, it is
    // counted against it; beside others, they are all suspects. Not while
    // it waited for its verdict or its turn above: requests redelivered
    // beside a poison one wait there together.
    let _entered = held.enter(inbound.clone(), alone).await;
    if alone {
        // The requests that ran before it are answered: their acks go out
        // now, not with a batch its crash would lose (and answer them
        // twice).
        s.bus.flush_acks().await;
    }
    let Some(handled) = run_handler(&s, &inbound).await else {
        return;
    };
    if !inbound.claim() {
        crate::throttled!(warn!(
            service = &*s.name, routing_key = %incoming.routing_key,
            elapsed_s = inbound.arrived.elapsed().as_secs_f64(),
            "a handler returned after its timeout; its result is dropped (the caller had a timeout reply)"
        ));
        return;
    }
    s.metrics.request(&incoming.routing_key, handled.code);
    inbound.reply_then_ack(handled.reply).await;
}

/// Runs the handler where [`Placement`] says; returns what it did (no
/// reply inside when the request is a notification), or `None` if the
/// handler's task failed (the request then stays unsettled for
/// redelivery).
async fn run_handler(s: &Arc<Served>, inbound: &Arc<Inbound>) -> Option<Handled> {
    let method = s.placement.method(&inbound.incoming.routing_key);
    let inline = s.placement.inline(method);
    if inline {
        if let Some(m) = method {
            let _ = inbound
                .inline
                .set(InlineCall::new(s.placement.clone(), m.clone()));
        }
    }
    let (served, running) = (s.clone(), inbound.clone());
    // The request's span follows the handler onto a blocking thread.
    let span = tracing::Span::current();
    let run = move || {
        span.in_scope(|| {
            served
                .service
                .handle(&running.delivery(), &*served.handler_bus)
        })
    };
    // Handlers are synchronous and may block. A method proven fast runs
    // right here, on the runtime thread (see `placement`); others hand the
    // thread's other work over first (`block_in_place`), which costs a
    // thread wake-up but no hop to the blocking pool and back. Off the
    // multi-threaded runtime, the blocking pool.
    let handled = if inline {
        run()
    } else if s.handler_bus.multi_thread() {
        tokio::task::block_in_place(run)
    } else {
        match tokio::task::spawn_blocking(run).await {
            Ok(handled) => handled,
            Err(e) => {
                crate::throttled!(error!(service = &*s.name, error = %e,
                    "a handler task failed; its request stays unacked for redelivery"));
                return None;
            }
        }
    };
    s.placement.record(method, handled.took);
    s.metrics.took(&inbound.incoming.routing_key, handled.took);
    Some(handled)
}
