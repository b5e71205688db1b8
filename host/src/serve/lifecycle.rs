//! One request's life, from its delivery to its settlement, in one place:
//! [`serve`] screens the delivery, checks a redelivered one with the
//! supervisor, runs the handler, then replies and acks.
//!
//! Every way out is a method of [`Inbound`] (its states are written down
//! there). A request delivered again and again is refused after
//! `crash_limit` crashes of its own (see [`crate::supervise::crashes`]) or
//! `crash_limit + `[`EXTRA_DELIVERIES`] deliveries not caused by another
//! request's crash.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use commissaire_plugin_api::RpcError;
use tracing::Instrument as _;

use super::handler_bus::HandlerBus;
use super::inbound::Inbound;
use super::inflight::request_key;
use super::placement::{InlineCall, Placement};
use super::Process;
use crate::bus::{BusTransport, Incoming, Malformed};
use crate::dispatch::{Handled, Service};
use crate::metrics::{Dropped, ServiceMetrics};
use crate::trace::TraceContext;

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

/// The request as it arrives: nothing claimed, nothing settled.
fn arrive(s: &Served, queue: Arc<str>, incoming: Incoming, key: u64) -> Inbound {
    let parent = incoming
        .traceparent
        .as_deref()
        .and_then(TraceContext::parse);
    let trace = TraceContext::child_of(parent.as_ref());
    Inbound {
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
        claimed: AtomicBool::new(false),
        settled: AtomicBool::new(false),
        traceparent: trace.header(),
        trace,
        metrics: s.metrics.clone(),
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
    let inbound = Arc::new(arrive(&s, queue, incoming, key));
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
            served.service.handle(
                running.incoming(),
                Some(running.traceparent()),
                &*served.handler_bus,
            )
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
