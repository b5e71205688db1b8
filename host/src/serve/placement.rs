//! Where a handler runs: on the async runtime's own thread ("inline"), or
//! with that thread's other work handed to another thread first
//! (`block_in_place`), so that a handler that blocks stalls nothing else.
//!
//! Handing over costs a thread wake-up per request: in the A/B benchmark
//! it took about 20% of throughput at concurrency 32, for handlers that
//! return in microseconds. So, per method, unless `inline_handlers` forces
//! a choice:
//!
//! - a method starts on probation, handed over;
//! - after [`PROMOTE_AFTER`] calls in a row that each returned within
//!   [`FAST`], it runs inline;
//! - an inline handler that the watchdog finds blocked (its thread asleep,
//!   not running or waiting for a CPU) after [`SLOW`], or still running
//!   after [`STUCK`], or a call that took longer than [`STUCK`], moves the
//!   method off the runtime for good, with one warning. A handler merely
//!   preempted by the OS on a busy machine is not mistaken for a blocking
//!   one.
//!
//! Bus calls from a handler always hand the thread over while they wait,
//! so a handler that calls the bus never stalls the runtime either.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Consecutive fast calls before a method runs inline.
pub const PROMOTE_AFTER: u32 = 32;
/// A call at most this long counts as fast.
pub const FAST: Duration = Duration::from_micros(500);
/// An inline handler whose thread is asleep this long into the call is
/// blocking: never inline again.
pub const SLOW: Duration = Duration::from_millis(10);
/// A call this long, asleep or not, stalls the runtime: never inline again.
pub const STUCK: Duration = Duration::from_millis(100);

const PROBATION: u8 = 0;
const INLINE: u8 = 1;
const HANDED_OVER: u8 = 2;

/// One method's placement.
#[derive(Debug)]
pub struct Method {
    name: Box<str>,
    /// Its handler is an `async fn` (its first poll is what runs inline).
    is_async: bool,
    state: AtomicU8,
    fast_streak: AtomicU32,
}

impl Method {
    /// Whether its handler is an `async fn`.
    pub fn is_async(&self) -> bool {
        self.is_async
    }

    /// Whether its handler now runs inline.
    pub fn is_inline(&self) -> bool {
        self.state.load(Ordering::Relaxed) == INLINE
    }

    /// Off the runtime for good; `true` the first time.
    fn hand_over(&self) -> bool {
        self.state.swap(HANDED_OVER, Ordering::Relaxed) != HANDED_OVER
    }
}

/// The placement of one service's methods.
#[derive(Debug)]
pub struct Placement {
    service: Arc<str>,
    /// `inline_handlers`, when set: always inline, or never.
    forced: Option<bool>,
    methods: HashMap<Box<str>, Arc<Method>>,
}

impl Placement {
    /// Placement for `methods` of `service`.
    pub fn new<'a>(
        service: Arc<str>,
        methods: impl IntoIterator<Item = (&'a str, bool)>,
        forced: Option<bool>,
    ) -> Self {
        let methods = methods
            .into_iter()
            .map(|(name, is_async)| {
                let method = Method {
                    name: name.into(),
                    is_async,
                    state: AtomicU8::new(PROBATION),
                    fast_streak: AtomicU32::new(0),
                };
                (Box::from(name), Arc::new(method))
            })
            .collect();
        Self {
            service,
            forced,
            methods,
        }
    }

    /// The method a routing key names (its last segment); `None` for one
    /// the service does not have.
    pub fn method(&self, routing_key: &str) -> Option<&Arc<Method>> {
        let name = crate::protocol::method_of(routing_key);
        self.methods.get(name)
    }

    /// Whether a call of `method` runs inline now. A method the service
    /// does not have is handed over (its plugin answers it; rare).
    pub fn inline(&self, method: Option<&Arc<Method>>) -> bool {
        match self.forced {
            Some(forced) => forced,
            None => method.is_some_and(|m| m.is_inline()),
        }
    }

    /// Learns from a call of `method` that took `took`.
    pub fn record(&self, method: Option<&Arc<Method>>, took: Duration) {
        let Some(method) = method else { return };
        if self.forced.is_some() {
            return;
        }
        if took > STUCK {
            self.demote(method, took);
            return;
        }
        if method.state.load(Ordering::Relaxed) != PROBATION {
            return;
        }
        if took > FAST {
            method.fast_streak.store(0, Ordering::Relaxed);
            return;
        }
        let streak = method.fast_streak.fetch_add(1, Ordering::Relaxed) + 1;
        if streak >= PROMOTE_AFTER
            && method
                .state
                .compare_exchange(PROBATION, INLINE, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::debug!(
                service = &*self.service,
                method = &*method.name,
                "handler returns within {}µs: it now runs on the runtime thread",
                FAST.as_micros()
            );
        }
    }

    /// Moves `method` off the runtime for good (a call took `took`).
    pub fn demote(&self, method: &Method, took: Duration) {
        if self.forced.is_some() {
            return;
        }
        let was_inline = method.is_inline();
        if method.hand_over() {
            let took_ms = took.as_secs_f64() * 1000.0;
            if was_inline {
                tracing::warn!(
                    service = &*self.service,
                    method = &*method.name,
                    took_ms,
                    "an inline handler blocked the runtime thread: its calls now hand the thread over first \
                     (set inline_handlers = false to always do so)"
                );
            } else {
                tracing::debug!(
                    service = &*self.service,
                    method = &*method.name,
                    took_ms,
                    "a slow handler: its calls keep handing the runtime thread over"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(forced: Option<bool>) -> Placement {
        Placement::new(
            Arc::from("simple"),
            [("add", false), ("sleep", false)],
            forced,
        )
    }

    #[test]
    fn a_fast_method_goes_inline_after_its_probation() {
        let p = placement(None);
        let add = p.method("simple.add").cloned();
        assert!(!p.inline(add.as_ref()), "starts handed over");
        for _ in 0..PROMOTE_AFTER - 1 {
            p.record(add.as_ref(), Duration::from_micros(20));
        }
        assert!(!p.inline(add.as_ref()), "one call short");
        p.record(add.as_ref(), Duration::from_micros(20));
        assert!(p.inline(add.as_ref()));
    }

    #[test]
    fn a_call_past_fast_restarts_the_probation() {
        let p = placement(None);
        let add = p.method("simple.add").cloned();
        for _ in 0..PROMOTE_AFTER - 1 {
            p.record(add.as_ref(), Duration::from_micros(20));
        }
        p.record(add.as_ref(), FAST + Duration::from_micros(1));
        for _ in 0..PROMOTE_AFTER - 1 {
            p.record(add.as_ref(), Duration::from_micros(20));
        }
        assert!(!p.inline(add.as_ref()));
    }

    #[test]
    fn a_slow_call_moves_a_method_off_the_runtime_for_good() {
        let p = placement(None);
        let add = p.method("simple.add").cloned();
        for _ in 0..PROMOTE_AFTER {
            p.record(add.as_ref(), Duration::from_micros(20));
        }
        assert!(p.inline(add.as_ref()));
        p.record(add.as_ref(), SLOW + Duration::from_millis(1));
        assert!(
            p.inline(add.as_ref()),
            "a preempted call is no proof of blocking"
        );
        p.record(add.as_ref(), STUCK + Duration::from_millis(1));
        assert!(!p.inline(add.as_ref()));
        for _ in 0..PROMOTE_AFTER * 2 {
            p.record(add.as_ref(), Duration::from_micros(20));
        }
        assert!(!p.inline(add.as_ref()), "never promoted again");
        let sleep = p.method("simple.sleep").cloned();
        for _ in 0..PROMOTE_AFTER {
            p.record(sleep.as_ref(), Duration::from_micros(20));
        }
        assert!(p.inline(sleep.as_ref()), "other methods are not affected");
    }

    #[test]
    fn unknown_methods_are_handed_over_and_the_setting_wins() {
        let p = placement(None);
        assert!(p.method("simple.nope").is_none());
        assert!(!p.inline(None));
        let always = placement(Some(true));
        assert!(always.inline(always.method("simple.add")));
        assert!(always.inline(None));
        let add = always.method("simple.add").cloned();
        always.record(add.as_ref(), STUCK * 2);
        assert!(always.inline(add.as_ref()), "a forced choice stays");
        let never = placement(Some(false));
        let add = never.method("simple.add").cloned();
        for _ in 0..PROMOTE_AFTER {
            never.record(add.as_ref(), Duration::from_micros(20));
        }
        assert!(!never.inline(add.as_ref()));
    }
}

/// A handler running on a runtime thread, as the watchdog sees it.
pub struct InlineCall {
    placement: Arc<Placement>,
    method: Arc<Method>,
    /// The thread it runs on.
    tid: Option<u32>,
    started: std::time::Instant,
}

impl InlineCall {
    /// A call of `method` starting now on this thread.
    pub fn new(placement: Arc<Placement>, method: Arc<Method>) -> Self {
        Self {
            placement,
            method,
            tid: current_tid(),
            started: std::time::Instant::now(),
        }
    }

    /// When it started.
    pub fn started(&self) -> std::time::Instant {
        self.started
    }

    /// The watchdog found the call still running (past [`SLOW`]): moves
    /// its method off the runtime if its thread is asleep (blocked), or if
    /// the call has run past [`STUCK`] either way.
    pub fn check(&self) {
        let elapsed = self.started.elapsed();
        let asleep = self.tid.and_then(thread_asleep);
        if elapsed > STUCK || asleep == Some(true) {
            self.placement.demote(&self.method, elapsed);
        }
    }
}

/// The kernel id of the calling thread (cached per thread), for the
/// watchdog to look at its state; `None` without `/proc`.
pub fn current_tid() -> Option<u32> {
    thread_local! {
        static TID: Option<u32> = std::fs::read_link("/proc/thread-self")
            .ok()
            .and_then(|p| p.file_name()?.to_str()?.parse().ok());
    }
    TID.with(|tid| *tid)
}

/// Whether thread `tid` of this process is asleep (blocked in the kernel),
/// rather than running or waiting for a CPU. `None` if unknown.
fn thread_asleep(tid: u32) -> Option<bool> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
    Some(state != 'R')
}

#[cfg(test)]
mod thread_tests {
    use super::*;

    #[test]
    fn a_sleeping_thread_is_seen_asleep_and_a_running_one_not() {
        let me = current_tid().expect("/proc");
        assert_eq!(thread_asleep(me), Some(false), "this thread is running");
        let (tx, rx) = std::sync::mpsc::channel();
        let (wake, sleep) = std::sync::mpsc::channel::<()>();
        // Blocked until told, however long the check below takes to see it.
        let sleeper = std::thread::spawn(move || {
            tx.send(current_tid()).expect("send");
            let _ = sleep.recv();
        });
        let tid = rx.recv().expect("tid").expect("/proc");
        let started = std::time::Instant::now();
        while thread_asleep(tid) != Some(true) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "a thread blocked on a channel never seen asleep: {:?}",
                thread_asleep(tid)
            );
            std::thread::yield_now();
        }
        wake.send(()).expect("wake");
        sleeper.join().expect("sleeper");
    }
}
