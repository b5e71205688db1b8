//! One request's life, from its delivery to its settlement, in one place:
//! [`serve`] screens the delivery, checks a redelivered one with the
//! supervisor, runs the handler, then replies and acks.
//!
//! Every way out is a method of [`Inbound`] (its states are written down
//! there). A request delivered again and again is refused after
//! `crash_limit` crashes of its own (counted by the supervisor) or
//! `crash_limit + `[`EXTRA_DELIVERIES`] deliveries not caused by another
//! request's crash; every limit a request is held to is
//! [`crate::limits`]'.
//!
//! [`EXTRA_DELIVERIES`]: crate::limits::EXTRA_DELIVERIES

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use commissaire_plugin_api::host::HostBus;
use commissaire_plugin_api::RpcError;
use tracing::Instrument as _;

use super::handler_bus::HandlerBus;
use super::inbound::Inbound;
use super::inflight::request_key;
use super::placement::{InlineCall, Method, Placement};
use super::watchdog::answer_timed_out;
use super::Process;
use crate::bus::{BusTransport, Incoming};
use crate::dispatch::{Handled, Ran, Service};
use crate::limits::{Refusal, RequestLimits, Way};
use crate::metrics::{Dropped, ServiceMetrics};
use crate::throttle::LogThrottle;
use crate::trace::TraceContext;

/// What serving one service takes: shared by its consumers' deliveries.
pub(super) struct Served {
    pub service: Arc<Service>,
    pub name: Arc<str>,
    pub bus: Arc<dyn BusTransport>,
    pub handler_bus: Arc<HandlerBus>,
    pub placement: Arc<Placement>,
    pub limits: RequestLimits,
    pub confirm_replies: bool,
    pub process: Process,
    pub metrics: Arc<ServiceMetrics>,
    pub quarantine: Arc<crate::quarantine::Quarantine>,
}

/// The request as it arrives: nothing claimed, nothing settled.
fn arrive(s: &Served, queue: Arc<str>, incoming: Incoming, key: u64) -> Inbound {
    let parent = incoming
        .traceparent
        .as_deref()
        .and_then(TraceContext::parse);
    let trace = TraceContext::child_of(parent.as_ref());
    // The deadline its handler's bus calls and `msg.remaining()` keep to:
    // its caller's, or `handler_timeout` from now, whichever comes first.
    // The watchdog keeps `handler_timeout`: answering at the caller's own
    // deadline would only race the caller giving up.
    let own = crate::deadline::after(s.limits.handler_timeout);
    let deadline = incoming.deadline.map_or(own, |d| d.min(own));
    Inbound {
        timeout: s.limits.handler_timeout,
        deadline,
        incoming,
        queue,
        key,
        service: s.name.clone(),
        bus: s.bus.clone(),
        confirm: s.confirm_replies,
        max_message_bytes: s.limits.max_message_bytes,
        arrived: Instant::now(),
        inline: OnceLock::new(),
        claimed: AtomicBool::new(false),
        settled: AtomicBool::new(false),
        traceparent: trace.header(),
        trace,
        metrics: s.metrics.clone(),
        quarantine: s.quarantine.clone(),
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
    if let Some(refusal) = s.limits.screen(incoming) {
        return refuse(&s, &inbound, refusal).await;
    }

    // A redelivered request may be the one that killed the last workers,
    // or one that keeps coming back for another reason. One suspected of a
    // crash runs alone, so that a crash while it runs is its own.
    let mut alone = false;
    if incoming.redelivered {
        if let Some(control) = &s.process.control {
            let seen = control.check(key).await;
            alone = seen.alone;
            if let Some(refusal) = s.limits.judge(&seen) {
                return refuse(&s, &inbound, refusal).await;
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
    if let Some(panic) = &handled.panic {
        inbound.quarantine(crate::quarantine::Reason::Panic, panic);
    }
}

/// How much sooner than `handler_timeout` a caller's deadline must be to
/// count as the caller's (both are rounded to milliseconds on the way).
const CALLERS_MARGIN: std::time::Duration = std::time::Duration::from_millis(5);

/// Answers a request whose async handler was cancelled at its caller's
/// deadline.
async fn answer_deadline_passed(inbound: &Inbound) {
    crate::throttled!(warn!(
        service = inbound.service(),
        routing_key = inbound.routing_key(),
        trace_id = %inbound.trace().trace_id(),
        "the caller's deadline passed while its async handler ran: cancelled, answering -32603"
    ));
    inbound.count_dropped(Dropped::DeadlinePassed);
    let error = RpcError::internal_error("deadline passed while the handler ran: it was cancelled");
    inbound.refuse(&error).await;
}

/// One log line per refusal reason per interval.
static REFUSAL_LOGS: [LogThrottle; Dropped::COUNT] =
    [const { LogThrottle::new(crate::throttle::INTERVAL) }; Dropped::COUNT];

/// Ends a request a limit refused (see [`crate::limits`]): counted, logged
/// (a poison request as an error), answered or dropped, acked.
async fn refuse(s: &Served, inbound: &Inbound, refusal: Refusal) {
    inbound.claim();
    s.metrics.dropped(refusal.dropped);
    if let Some(also) = refusal.also {
        s.metrics.dropped(also);
    }
    let incoming = &inbound.incoming;
    if let Some(suppressed) = REFUSAL_LOGS[refusal.dropped as usize].admit() {
        let (service, queue, tag) = (&*s.name, &*inbound.queue, incoming.tag());
        let (routing_key, reason) = (&incoming.routing_key, &refusal.detail);
        if refusal.dropped == Dropped::Poison {
            tracing::error!(suppressed, service, queue, %routing_key, delivery_tag = %tag, %reason, "{}", refusal.log);
        } else {
            tracing::warn!(suppressed, service, queue, %routing_key, delivery_tag = %tag, %reason, "{}", refusal.log);
        }
    }
    match refusal.way {
        Way::Answer {
            error,
            read_id: false,
        } => {
            s.metrics.request(&incoming.routing_key, Some(error.code));
            inbound.refuse_with_id("null", &error).await;
        }
        Way::Answer {
            error,
            read_id: true,
        } => inbound.refuse(&error).await,
        Way::Drop => inbound.drop_unanswerable().await,
    }
    if refusal.dropped == Dropped::Poison {
        inbound.quarantine(crate::quarantine::Reason::Poison, &refusal.detail);
    }
}

/// Runs the handler where [`Placement`] says; returns what it did (no
/// reply inside when the request is a notification), or `None` if the
/// handler's task failed (the request then stays unsettled for
/// redelivery).
async fn run_handler(s: &Arc<Served>, inbound: &Arc<Inbound>) -> Option<Handled> {
    let method = s.placement.method(&inbound.incoming.routing_key);
    if method.is_some_and(|m| m.is_async()) {
        return run_async_handler(s, inbound, method).await;
    }
    // The host answers discovery itself, from memory: nothing to hand over.
    let inline = s.placement.inline(method) || Service::is_discovery(&inbound.incoming.routing_key);
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
            // The handler's bus calls wait no longer than its request.
            crate::deadline::with(Some(running.deadline), || {
                served.service.handle(
                    running.incoming(),
                    Some(running.traceparent()),
                    &*served.handler_bus,
                )
            })
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

/// Runs an `async fn` handler, awaited here with no thread held. At its
/// deadline (its caller's, or `handler_timeout`) it is cancelled and its
/// caller answered at once (the request settled, its slot free); the
/// request stays in flight until the plugin has dropped the handler's
/// future, so that one blocking its thread is still the watchdog's to see
/// as hung.
async fn run_async_handler(
    s: &Arc<Served>,
    inbound: &Arc<Inbound>,
    method: Option<&Arc<Method>>,
) -> Option<Handled> {
    let timeout_at = inbound.arrived + s.limits.handler_timeout;
    // Nobody waits past the caller's deadline: unlike a sync handler's
    // thread, an async handler's slot is worth taking back then.
    let deadline_at = Instant::now() + crate::deadline::remaining(inbound.deadline);
    let callers = deadline_at + CALLERS_MARGIN < timeout_at;
    let limit = tokio::time::Instant::from_std(timeout_at.min(deadline_at));
    let bus: Arc<dyn HostBus> = s.handler_bus.clone();
    // A method whose whole handler proved quick (see `placement`) has its
    // first poll here, on the runtime thread, and ends there; the others
    // run on the plugin's runtime from the start.
    let poll_here = s.placement.inline(method);
    let ran = s
        .service
        .handle_async(
            inbound.incoming(),
            Some(inbound.traceparent()),
            bus,
            Some(inbound.deadline),
            limit,
            poll_here,
        )
        .await;
    match ran {
        Ran::Done(handled) => {
            s.placement.record(method, handled.took);
            s.metrics.took(&inbound.incoming.routing_key, handled.took);
            Some(handled)
        }
        Ran::TimedOut(mut pending) => {
            s.placement.record(method, s.limits.handler_timeout);
            if inbound.claim() {
                if callers {
                    answer_deadline_passed(inbound).await;
                } else {
                    answer_timed_out(inbound).await;
                }
            }
            pending.cancel();
            let _ = pending.await;
            None
        }
    }
}
