//! The host's end of plugin logging: a plugin's log event becomes a
//! `tracing` event of the host process, at its level, with the plugin's
//! target, inside a span naming the service (and the request, when it was
//! emitted during one), so that the host's subscriber filters and formats
//! it like the host's own. The target is put under the service's name
//! (`COMMISSAIRE_LOG=info,storage=debug`, `info,storage::my_crate::db=debug`).
//!
//! `tracing`'s macros need a target known at compile time; a plugin's
//! targets are known only when its events arrive. So each (target, level)
//! gets a callsite made and registered at run time, once: a plugin has a
//! bounded set of targets (its module paths and its dependencies').

use std::collections::HashMap;
use std::sync::{OnceLock, PoisonError, RwLock};

use tracing::field::{display, Value};
use tracing::{Event, Level, Metadata, Span};
use tracing_core::callsite::{Callsite, Identifier};
use tracing_core::field::FieldSet;
use tracing_core::metadata::Kind;
use tracing_core::subscriber::Interest;

use crate::abi::log_level;

/// Beyond this many distinct (service, target) pairs, events share the target
/// [`OVERFLOW_TARGET`] rather than grow the table forever.
const MAX_TARGETS: usize = 1024;
const OVERFLOW_TARGET: &str = "commissaire_plugin";

const EVENT_FIELDS: &[&str] = &["message"];
const REQUEST_FIELDS: &[&str] = &["service", "method", "id"];
const PLUGIN_FIELDS: &[&str] = &["service"];

/// A callsite made at run time (leaked: callsites live for the process).
struct DynCallsite {
    meta: OnceLock<Metadata<'static>>,
}

impl Callsite for DynCallsite {
    // Interest is not cached: `emit` asks the dispatcher on every use.
    fn set_interest(&self, _interest: Interest) {}

    fn metadata(&self) -> &Metadata<'_> {
        // Set in `DynCallsite::make` before the callsite is registered or
        // shared; `get` cannot miss.
        self.meta
            .get()
            .expect("a run-time callsite gets its metadata before anyone sees it")
    }
}

impl DynCallsite {
    fn make(
        name: &'static str,
        target: &'static str,
        level: Level,
        fields: &'static [&'static str],
        kind: Kind,
    ) -> &'static Metadata<'static> {
        let callsite: &'static DynCallsite = Box::leak(Box::new(DynCallsite {
            meta: OnceLock::new(),
        }));
        let meta = callsite.meta.get_or_init(|| {
            Metadata::new(
                name,
                target,
                level,
                None,
                None,
                None,
                FieldSet::new(fields, Identifier(callsite)),
                kind,
            )
        });
        tracing_core::callsite::register(callsite);
        meta
    }
}

/// One plugin target's callsites: an event per level, and the two spans.
struct TargetCallsites {
    events: [&'static Metadata<'static>; 5],
    request_span: &'static Metadata<'static>,
    plugin_span: &'static Metadata<'static>,
}

impl TargetCallsites {
    fn new(target: &'static str) -> Self {
        let event =
            |level| DynCallsite::make("plugin event", target, level, EVENT_FIELDS, Kind::EVENT);
        // The spans are at error level so that they are enabled whenever an
        // event of their target is: they carry the service and request.
        Self {
            events: [
                event(Level::ERROR),
                event(Level::WARN),
                event(Level::INFO),
                event(Level::DEBUG),
                event(Level::TRACE),
            ],
            request_span: DynCallsite::make(
                "request",
                target,
                Level::ERROR,
                REQUEST_FIELDS,
                Kind::SPAN,
            ),
            plugin_span: DynCallsite::make(
                "plugin",
                target,
                Level::ERROR,
                PLUGIN_FIELDS,
                Kind::SPAN,
            ),
        }
    }

    fn event(&self, level: Level) -> &'static Metadata<'static> {
        let [error, warn, info, debug, trace] = self.events;
        match level {
            Level::ERROR => error,
            Level::WARN => warn,
            Level::INFO => info,
            Level::DEBUG => debug,
            _ => trace,
        }
    }
}

/// The target the host's filter sees for a plugin's `target`: under the
/// service's name, so that `COMMISSAIRE_LOG=info,storage=debug` reaches
/// everything service `storage` logs (its crate's modules and its
/// dependencies'), and `storage::etcd_client=trace` one of them. A target
/// already under the service's name (a crate named after its service, or
/// a 1.1 plugin's `Message::log_*`) is kept as it is.
fn service_target(service: &str, target: &str) -> String {
    let under = target
        .strip_prefix(service)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"));
    if under {
        target.to_owned()
    } else {
        format!("{service}::{target}")
    }
}

/// The callsites of `target` of `service`, made on its first event.
fn callsites(service: &str, target: &str) -> &'static TargetCallsites {
    type Table = HashMap<String, HashMap<String, &'static TargetCallsites>>;
    static TABLE: OnceLock<RwLock<(Table, usize)>> = OnceLock::new();
    let table = TABLE.get_or_init(RwLock::default);
    if let Some(found) = table
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .0
        .get(service)
        .and_then(|targets| targets.get(target))
    {
        return found;
    }
    let mut guard = table.write().unwrap_or_else(PoisonError::into_inner);
    let (table, made_count) = &mut *guard;
    // Another thread may have made them meanwhile.
    if let Some(found) = table.get(service).and_then(|targets| targets.get(target)) {
        return found;
    }
    if *made_count >= MAX_TARGETS {
        static OVERFLOW: OnceLock<TargetCallsites> = OnceLock::new();
        return OVERFLOW.get_or_init(|| TargetCallsites::new(OVERFLOW_TARGET));
    }
    *made_count += 1;
    let leaked: &'static str = Box::leak(service_target(service, target).into_boxed_str());
    let made: &'static TargetCallsites = Box::leak(Box::new(TargetCallsites::new(leaked)));
    table
        .entry(service.to_owned())
        .or_default()
        .insert(target.to_owned(), made);
    made
}

/// The request an event was logged during: what its span names.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Call<'a> {
    /// The method, e.g. `add`.
    pub method: &'a str,
    /// The id as JSON text.
    pub id_json: &'a str,
}

/// Emits one plugin log event through this process's `tracing` dispatcher.
pub(crate) fn emit(
    level: u8,
    service: &str,
    request: Option<Call<'_>>,
    target: &str,
    message: &str,
) {
    let Some(level) = log_level::to_tracing(level) else {
        return;
    };
    let sites = callsites(service, target);
    let event = sites.event(level);
    if !tracing::dispatcher::get_default(|d| d.enabled(event)) {
        return;
    }
    let span = span(sites, service, request);
    span.in_scope(|| {
        let fields = event.fields();
        if let Some(field) = fields.field("message") {
            Event::dispatch(
                event,
                &fields.value_set(&[(&field, Some(&display(message) as &dyn Value))]),
            );
        }
    });
}

/// The span an event goes in: `request{service, method, id}` during a
/// call, else `plugin{service}`.
fn span(sites: &TargetCallsites, service: &str, request: Option<Call<'_>>) -> Span {
    let meta = match request {
        Some(_) => sites.request_span,
        None => sites.plugin_span,
    };
    if !tracing::dispatcher::get_default(|d| d.enabled(meta)) {
        return Span::none();
    }
    let fields = meta.fields();
    let service = display(service);
    match request {
        Some(r) => {
            let (method, id) = (display(r.method), display(r.id_json));
            match (
                fields.field("service"),
                fields.field("method"),
                fields.field("id"),
            ) {
                (Some(s), Some(m), Some(i)) => Span::new(
                    meta,
                    &fields.value_set(&[
                        (&s, Some(&service as &dyn Value)),
                        (&m, Some(&method as &dyn Value)),
                        (&i, Some(&id as &dyn Value)),
                    ]),
                ),
                _ => Span::none(),
            }
        }
        None => match fields.field("service") {
            Some(s) => Span::new(
                meta,
                &fields.value_set(&[(&s, Some(&service as &dyn Value))]),
            ),
            None => Span::none(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::service_target;

    #[test]
    fn a_plugins_targets_go_under_its_service() {
        assert_eq!(
            service_target("text", "commissaire_text::db"),
            "text::commissaire_text::db"
        );
        assert_eq!(service_target("text", "hyper"), "text::hyper");
        assert_eq!(service_target("text", "text"), "text");
        assert_eq!(service_target("text", "text::db"), "text::db");
        // A crate whose name only begins like the service's is not under it.
        assert_eq!(service_target("text", "textwrap"), "text::textwrap");
    }
}
