//! The plugin's end of plugin logging.
//!
//! A plugin is a `cdylib` with its own copies of `tracing` and `log`,
//! whose global dispatcher and logger are not the host's. When the host
//! hands over its log sink (at load, through the `set_host_logger` entry),
//! this installs, in the plugin's copies, a `tracing` subscriber and a
//! `log` logger that format each event and pass it to the host: events
//! from handlers, from `init`, from the plugin's own threads and from its
//! dependencies alike. The host's maximum level is applied here, so that a
//! disabled event costs no more than in the host itself and never crosses.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_core::span::Current;

use crate::abi::{log_level, HostLogger, LogRecord};

/// The host's sink and the service name, set once.
static SINK: OnceLock<(HostLogger, &'static str)> = OnceLock::new();
/// The host's maximum level (`log_level`), updated on every hand-over.
static MAX_LEVEL: AtomicU8 = AtomicU8::new(log_level::OFF);

/// Takes the host's sink for service `service`; installs the subscriber
/// and logger the first time.
pub(crate) fn set_host_logger(logger: HostLogger, service: &'static str) {
    MAX_LEVEL.store(logger.max_level, Ordering::Relaxed);
    let first = SINK.set((logger, service)).is_ok();
    if first {
        // Fails only when the plugin installed its own: it keeps it.
        let _ = tracing::subscriber::set_global_default(Forwarder::default());
        let _ = log::set_logger(&LOG_FORWARDER);
    }
    log::set_max_level(log_filter(logger.max_level));
    // The subscriber's answers depend on the level: make `tracing` ask again.
    tracing_core::callsite::rebuild_interest_cache();
}

fn enabled(level: u8) -> bool {
    level != log_level::OFF && level <= MAX_LEVEL.load(Ordering::Relaxed)
}

fn log_filter(level: u8) -> log::LevelFilter {
    match level {
        log_level::OFF => log::LevelFilter::Off,
        log_level::ERROR => log::LevelFilter::Error,
        log_level::WARN => log::LevelFilter::Warn,
        log_level::INFO => log::LevelFilter::Info,
        log_level::DEBUG => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

/// Passes one formatted event to the host.
fn forward(level: u8, target: &str, message: &str) {
    if let Some((logger, service)) = SINK.get() {
        (logger.log)(&LogRecord {
            level,
            service: (*service).into(),
            target: target.into(),
            message: message.into(),
        });
    }
}

/// `log` records go the same way as `tracing` events, with the spans the
/// thread is in.
struct LogForwarder;

static LOG_FORWARDER: LogForwarder = LogForwarder;

fn from_log(level: log::Level) -> u8 {
    match level {
        log::Level::Error => log_level::ERROR,
        log::Level::Warn => log_level::WARN,
        log::Level::Info => log_level::INFO,
        log::Level::Debug => log_level::DEBUG,
        log::Level::Trace => log_level::TRACE,
    }
}

impl log::Log for LogForwarder {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        enabled(from_log(metadata.level()))
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = from_log(record.level());
        if !enabled(level) {
            return;
        }
        let mut text = span_prefix();
        let _ = write!(text, "{}", record.args());
        forward(level, record.target(), &text);
    }

    fn flush(&self) {}
}

/// What is kept of a span: its name and formatted fields.
struct SpanData {
    meta: &'static Metadata<'static>,
    fields: String,
    refs: usize,
}

thread_local! {
    /// The spans this thread is in, innermost last.
    static STACK: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

fn spans() -> &'static Mutex<HashMap<u64, SpanData>> {
    static SPANS: OnceLock<Mutex<HashMap<u64, SpanData>>> = OnceLock::new();
    SPANS.get_or_init(Mutex::default)
}

/// `outer{a=1}:inner: `, for the spans this thread is in; empty outside.
fn span_prefix() -> String {
    let mut prefix = String::new();
    STACK.with(|stack| {
        let stack = stack.borrow();
        if stack.is_empty() {
            return;
        }
        let spans = spans().lock().unwrap_or_else(PoisonError::into_inner);
        for id in stack.iter() {
            if let Some(span) = spans.get(id) {
                prefix.push_str(span.meta.name());
                if !span.fields.is_empty() {
                    let _ = write!(prefix, "{{{}}}", span.fields.trim_start());
                }
                prefix.push(':');
            }
        }
        if !prefix.is_empty() {
            prefix.push(' ');
        }
    });
    prefix
}

/// Formats fields as `message key=value …`, like `tracing-subscriber`.
#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            // `log.*` fields are how `tracing-log` passes a record's origin.
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }
}

/// The plugin's `tracing` subscriber: keeps spans for their fields, and
/// forwards events.
#[derive(Default)]
struct Forwarder {
    next_id: AtomicU64,
}

impl Subscriber for Forwarder {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        if self.enabled(metadata) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(
            match log_level::to_tracing(MAX_LEVEL.load(Ordering::Relaxed)) {
                Some(level) => LevelFilter::from_level(level),
                None => LevelFilter::OFF,
            },
        )
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        enabled(log_level::from_tracing(*metadata.level()))
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut fields = Fields::default();
        span.record(&mut fields);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let data = SpanData {
            meta: span.metadata(),
            fields: join(fields),
            refs: 1,
        };
        spans()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, data);
        Id::from_u64(id)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut fields = Fields::default();
        values.record(&mut fields);
        let more = join(fields);
        if let Some(data) = spans()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&span.into_u64())
        {
            data.fields.push_str(&more);
        }
    }

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut text = span_prefix();
        text.push_str(&fields.message);
        text.push_str(&fields.rest);
        forward(log_level::from_tracing(*meta.level()), meta.target(), &text);
    }

    fn enter(&self, span: &Id) {
        STACK.with(|stack| stack.borrow_mut().push(span.into_u64()));
    }

    fn exit(&self, span: &Id) {
        let id = span.into_u64();
        STACK.with(|stack| {
            let mut stack = stack.borrow_mut();
            if let Some(at) = stack.iter().rposition(|s| *s == id) {
                stack.remove(at);
            }
        });
    }

    fn clone_span(&self, span: &Id) -> Id {
        if let Some(data) = spans()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&span.into_u64())
        {
            data.refs += 1;
        }
        span.clone()
    }

    fn try_close(&self, span: Id) -> bool {
        let mut spans = spans().lock().unwrap_or_else(PoisonError::into_inner);
        let id = span.into_u64();
        let Some(data) = spans.get_mut(&id) else {
            return false;
        };
        data.refs = data.refs.saturating_sub(1);
        if data.refs == 0 {
            spans.remove(&id);
            true
        } else {
            false
        }
    }

    fn current_span(&self) -> Current {
        let Some(id) = STACK.with(|stack| stack.borrow().last().copied()) else {
            return Current::none();
        };
        let spans = spans().lock().unwrap_or_else(PoisonError::into_inner);
        match spans.get(&id) {
            Some(data) => Current::new(Id::from_u64(id), data.meta),
            None => Current::none(),
        }
    }
}

/// A span's fields as one string: ` message key=value …`.
fn join(fields: Fields) -> String {
    if fields.message.is_empty() {
        fields.rest
    } else {
        format!(" message={:?}{}", fields.message, fields.rest)
    }
}
