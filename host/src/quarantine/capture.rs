//! The worker's last log lines about each request, for the quarantine: a
//! `tracing_subscriber` layer that keeps, per trace id of the host's
//! `request{trace_id}` span, the last [`MAX_LINES`] events of the request
//! (the handler's, the host's), each cut at [`MAX_LINE_BYTES`], for at
//! most [`MAX_IDS`] requests at once (the least recently logged forgotten
//! first). A request's lines are dropped when its span closes.
//!
//! It sees only the events the subscriber's filter lets through (it sits
//! above it), so it formats nothing the log does not print, and it prints
//! nothing. A request that logs nothing costs one atomic load when its
//! span closes: the trace id is read, when an event needs it, from the
//! span's fields as the `fmt` layer formatted them.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use tracing::field::{Field, Visit};
use tracing::span::Id;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::DefaultFields;
use tracing_subscriber::fmt::FormattedFields;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::{LookupSpan, SpanRef};
use tracing_subscriber::Layer;

/// Lines kept per request: its last ones.
pub const MAX_LINES: usize = 16;
/// Bytes kept of one line (cut at a character boundary).
pub const MAX_LINE_BYTES: usize = 512;
/// Requests whose lines are kept at once.
pub const MAX_IDS: usize = 256;

/// The lines of the requests of this process, as [`CaptureLayer`] keeps
/// them.
pub fn global() -> &'static LogCapture {
    static GLOBAL: LogCapture = LogCapture::new();
    &GLOBAL
}

/// The lines of up to [`MAX_IDS`] requests.
#[derive(Debug)]
pub struct LogCapture {
    slots: Mutex<Slots>,
    /// `slots`' length, read without the lock when a request ends.
    held: AtomicUsize,
}

#[derive(Debug)]
struct Slots {
    slots: Vec<Slot>,
    /// Bumped at each line: the slot with the lowest `used` goes first.
    clock: u64,
}

#[derive(Debug)]
struct Slot {
    trace: u128,
    used: u64,
    lines: std::collections::VecDeque<String>,
}

impl Default for LogCapture {
    fn default() -> Self {
        Self::new()
    }
}

impl LogCapture {
    /// An empty capture.
    pub const fn new() -> Self {
        Self {
            slots: Mutex::new(Slots {
                slots: Vec::new(),
                clock: 0,
            }),
            held: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `line` (cut at [`MAX_LINE_BYTES`]) as the latest of `trace`.
    pub fn record(&self, trace: u128, line: &str) {
        let line = &line[..floor_char_boundary(line, MAX_LINE_BYTES)];
        let mut s = self.lock();
        s.clock += 1;
        let clock = s.clock;
        let at = match s.slots.iter().position(|slot| slot.trace == trace) {
            Some(at) => at,
            None if s.slots.len() < MAX_IDS => {
                s.slots.push(Slot {
                    trace,
                    used: clock,
                    lines: std::collections::VecDeque::with_capacity(MAX_LINES),
                });
                self.held.store(s.slots.len(), Ordering::Relaxed);
                s.slots.len() - 1
            }
            None => {
                // Full: the least recently logged request's slot is reused.
                let at = s
                    .slots
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, slot)| slot.used)
                    .map_or(0, |(at, _)| at);
                s.slots[at].trace = trace;
                s.slots[at].lines.clear();
                at
            }
        };
        let slot = &mut s.slots[at];
        slot.used = clock;
        if slot.lines.len() == MAX_LINES {
            // The oldest line's buffer takes the new one.
            let mut oldest = slot.lines.pop_front().unwrap_or_default();
            oldest.clear();
            oldest.push_str(line);
            slot.lines.push_back(oldest);
        } else {
            slot.lines.push_back(line.to_owned());
        }
    }

    /// The lines kept of `trace`, oldest first.
    pub fn lines(&self, trace: u128) -> Vec<String> {
        if self.held.load(Ordering::Relaxed) == 0 {
            return Vec::new();
        }
        let s = self.lock();
        s.slots
            .iter()
            .find(|slot| slot.trace == trace)
            .map(|slot| slot.lines.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets the lines of `trace` (its request ended).
    pub fn forget(&self, trace: u128) {
        if self.held.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut s = self.lock();
        if let Some(at) = s.slots.iter().position(|slot| slot.trace == trace) {
            s.slots.swap_remove(at);
            self.held.store(s.slots.len(), Ordering::Relaxed);
        }
    }

    /// How many requests have lines kept.
    pub fn requests(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// The largest index `<= max` at a character boundary of `s`.
fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    (0..=max)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

/// The layer filling a [`LogCapture`]: add it above the filtered `fmt`
/// subscriber (`fmt().with_env_filter(..).finish().with(..)`), whose
/// formatted span fields it reads the trace id from.
pub struct CaptureLayer {
    capture: &'static LogCapture,
}

impl CaptureLayer {
    /// A layer filling `capture` (usually [`global`]).
    pub fn new(capture: &'static LogCapture) -> Self {
        Self { capture }
    }
}

/// The span [`crate::serve`] opens for each request: `request{trace_id}`.
fn is_request_span(meta: &tracing::Metadata<'_>) -> bool {
    meta.name() == "request" && meta.fields().field("trace_id").is_some()
}

/// The trace id of `span` if it is a host `request` span: read from the
/// fields the `fmt` layer already formatted for its own lines, so that a
/// request pays nothing here until it logs.
fn trace_of<S>(span: &SpanRef<'_, S>) -> Option<u128>
where
    S: for<'a> LookupSpan<'a>,
{
    if !is_request_span(span.metadata()) {
        return None;
    }
    let extensions = span.extensions();
    let fields = extensions.get::<FormattedFields<DefaultFields>>()?;
    trace_field(&fields.fields)
}

/// The 32 hex digits after `trace_id` in formatted span fields (colours,
/// if any, hold no such run).
fn trace_field(fields: &str) -> Option<u128> {
    let at = fields.find("trace_id")? + "trace_id".len();
    let rest = &fields[at..];
    let mut run = 0;
    for (i, b) in rest.bytes().enumerate() {
        run = if b.is_ascii_hexdigit() { run + 1 } else { 0 };
        if run == 32 {
            return u128::from_str_radix(&rest[i + 1 - 32..=i], 16).ok();
        }
    }
    None
}

impl<S> Layer<S> for CaptureLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        let Some(trace) = scope.into_iter().find_map(|span| trace_of(&span)) else {
            return;
        };
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return;
            };
            line.clear();
            format_event(event, &mut line);
            self.capture.record(trace, &line);
        });
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if self.capture.requests() == 0 {
            return;
        }
        if let Some(trace) = ctx.span(&id).and_then(|span| trace_of(&span)) {
            self.capture.forget(trace);
        }
    }
}

thread_local! {
    /// Where an event is formatted, bounded at [`MAX_LINE_BYTES`].
    static LINE: std::cell::RefCell<String> =
        std::cell::RefCell::new(String::with_capacity(MAX_LINE_BYTES));
}

/// `event` as one line: `TIME LEVEL target: message field=value …`, cut at
/// [`MAX_LINE_BYTES`].
fn format_event(event: &Event<'_>, out: &mut String) {
    let meta = event.metadata();
    let mut w = Bounded(out);
    let _ = write!(
        w,
        "{} {} {}:",
        super::render::utc(crate::deadline::now_ms()),
        meta.level(),
        meta.target()
    );
    event.record(&mut Fields(w));
}

/// A writer that keeps [`MAX_LINE_BYTES`] and fails past them (which ends
/// the formatting).
struct Bounded<'a>(&'a mut String);

impl fmt::Write for Bounded<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = MAX_LINE_BYTES.saturating_sub(self.0.len());
        if s.len() <= room {
            self.0.push_str(s);
            Ok(())
        } else {
            self.0.push_str(&s[..floor_char_boundary(s, room)]);
            Err(fmt::Error)
        }
    }
}

/// An event's fields: the message as is, the others ` name=value`.
struct Fields<'a>(Bounded<'a>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[test]
    fn lines_ids_and_line_lengths_are_bounded() {
        let c = LogCapture::new();
        for n in 0..(MAX_LINES + 5) {
            c.record(1, &format!("line {n}"));
        }
        let lines = c.lines(1);
        assert_eq!(lines.len(), MAX_LINES);
        assert_eq!(lines[0], "line 5", "the oldest went first");
        assert_eq!(lines[MAX_LINES - 1], format!("line {}", MAX_LINES + 4));

        // A long line is cut at a character boundary.
        let long = "é".repeat(MAX_LINE_BYTES);
        c.record(2, &long);
        let kept = &c.lines(2)[0];
        assert!(kept.len() <= MAX_LINE_BYTES && kept.len() >= MAX_LINE_BYTES - 1);
        assert!(long.starts_with(kept.as_str()));

        // More ids than the bound: the least recently logged go first.
        for trace in 3..(MAX_IDS as u128 + 10) {
            c.record(1, "still here");
            c.record(trace, "x");
        }
        assert_eq!(c.requests(), MAX_IDS);
        assert!(c.lines(1).last().is_some_and(|l| l == "still here"));
        assert!(c.lines(2).is_empty(), "evicted");
        assert_eq!(c.lines(MAX_IDS as u128 + 9), ["x"]);

        c.forget(1);
        assert!(c.lines(1).is_empty());
        assert_eq!(c.requests(), MAX_IDS - 1);
    }

    #[test]
    fn the_trace_id_is_read_from_formatted_fields_coloured_or_not() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let want = u128::from_str_radix(id, 16).ok();
        assert_eq!(trace_field(&format!("trace_id={id}")), want);
        let coloured = format!("\x1b[3mtrace_id\x1b[0m\x1b[2m=\x1b[0m{id}");
        assert_eq!(trace_field(&coloured), want);
        assert_eq!(trace_field("trace_id=4bf92f"), None);
        assert_eq!(trace_field("service=demo"), None);
    }

    #[test]
    fn the_layer_keeps_a_request_s_enabled_events_until_it_ends() {
        static CAPTURE: LogCapture = LogCapture::new();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(std::io::sink)
            .finish()
            .with(CaptureLayer::new(&CAPTURE));
        let trace = crate::trace::TraceContext::child_of(None).trace_id();
        let id: u128 = u128::from_str_radix(&trace.to_string(), 16).unwrap();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", trace_id = %trace);
            span.in_scope(|| {
                // A plugin's own span inside it, as host_log makes.
                let inner = tracing::info_span!("request", service = "demo");
                inner.in_scope(|| tracing::info!(words = 3, "hello\nthere"));
                tracing::debug!("below the level: never formatted");
                tracing::error!(huge = %"y".repeat(4 * MAX_LINE_BYTES), "big");
                let lines = CAPTURE.lines(id);
                assert_eq!(lines.len(), 2, "{lines:?}");
                assert!(lines[0].contains(" INFO "), "{}", lines[0]);
                assert!(lines[0].ends_with(": hello\nthere words=3"), "{}", lines[0]);
                assert!(lines[1].contains(" ERROR ") && lines[1].contains("big huge="));
                assert_eq!(lines[1].len(), MAX_LINE_BYTES);
            });
            tracing::info!("outside any request");
            drop(span);
            assert!(CAPTURE.lines(id).is_empty(), "dropped at its end");
            assert_eq!(CAPTURE.requests(), 0);
        });
    }

    /// Not a check: what the capture adds to a request that logs nothing,
    /// at the `info` level (its span enabled): a `request{trace_id}` span
    /// opened, entered, closed, with and without the layer, the log
    /// written to a sink. `cargo test --release -p commissaire-host --lib
    /// capture -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn cost_of_a_request_that_logs_nothing() {
        static CAPTURE: LogCapture = LogCapture::new();
        const SPANS: u32 = 200_000;
        let fmt = || {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
                .with_writer(std::io::sink)
                .finish()
        };
        let run = || {
            let started = std::time::Instant::now();
            for _ in 0..SPANS {
                let trace = crate::trace::TraceContext::child_of(None).trace_id();
                let span = tracing::info_span!("request", trace_id = %trace);
                span.in_scope(|| tracing::debug!("not printed"));
            }
            started.elapsed().as_nanos() as f64 / f64::from(SPANS)
        };
        for round in 0..3 {
            let without = tracing::subscriber::with_default(fmt(), run);
            let with =
                tracing::subscriber::with_default(fmt().with(CaptureLayer::new(&CAPTURE)), run);
            eprintln!(
                "round {round}: {without:.0} ns per request span without the capture, {with:.0} ns with it (+{:.0} ns)",
                with - without
            );
        }
        assert_eq!(CAPTURE.requests(), 0);
    }
}
