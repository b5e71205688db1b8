//! A plugin's logs in the host: `tracing` events and `log` records from
//! handlers, `init` and the plugin's own threads become the host's events,
//! at their level and target, in the request's span, and what the host
//! does not record never leaves the plugin.
//!
//! The in-process tests share one global subscriber (a plugin's threads log
//! outside any test's scope); each test picks out its own events by a
//! unique word.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use commissaire_e2e::host::{unique, HostSpec, TestHost};
use commissaire_e2e::RoutingBus;
use serde_json::json;
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// One event as the host's subscriber saw it.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    level: Level,
    target: String,
    message: String,
    /// `name{field=value …}`, outermost first.
    spans: Vec<String>,
}

/// Records every event it is offered, while telling `tracing` that it
/// wants nothing above INFO: so an event above INFO that shows up here was
/// sent although the host's maximum level excluded it.
#[derive(Clone, Default)]
struct Capture {
    seen: Arc<Mutex<Vec<Seen>>>,
}

#[derive(Default)]
struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        if field.name() == "message" {
            self.0.push_str(&format!("{value:?}"));
        } else {
            self.0.push_str(&format!("{}={value:?}", field.name()));
        }
    }
}

struct SpanText(String);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::INFO)
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut text = Text::default();
        attrs.record(&mut text);
        if let Some(span) = ctx.span(id) {
            let shown = format!("{}{{{}}}", span.name(), text.0);
            span.extensions_mut().insert(SpanText(shown));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut text = Text::default();
        event.record(&mut text);
        let spans = ctx
            .event_scope(event)
            .map(|scope| {
                scope
                    .from_root()
                    .filter_map(|s| s.extensions().get::<SpanText>().map(|t| t.0.clone()))
                    .collect()
            })
            .unwrap_or_default();
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Seen {
                level: *event.metadata().level(),
                target: event.metadata().target().to_owned(),
                message: text.0,
                spans,
            });
    }
}

/// The process's subscriber, installed on first use.
fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = Capture::default();
        let subscriber = tracing_subscriber::registry().with(capture.clone());
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
        assert_eq!(LevelFilter::current(), LevelFilter::INFO);
        capture
    })
}

/// The events whose message contains `word`.
fn seen(word: &str) -> Vec<Seen> {
    capture()
        .seen
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter(|s| s.message.contains(word))
        .cloned()
        .collect()
}

fn event(level: Level, target: &str, message: String, spans: &[&str]) -> Seen {
    Seen {
        level,
        target: target.to_owned(),
        message,
        spans: spans.iter().map(|s| (*s).to_owned()).collect(),
    }
}

#[test]
fn a_handlers_events_arrive_at_their_level_in_the_request_span() {
    capture();
    let bus = RoutingBus::serving(&["demo"]);
    let word = unique("w");
    let reply = bus.call("demo.chatter", json!([word]));
    assert_eq!(reply["result"], "logged", "{reply}");

    let request = r#"request{service=demo method=chatter id="t-1"}"#;
    let chatter = format!("chatter{{words={}}}: ", word.len());
    let mut got = seen(&word);
    got.sort_by_key(|s| s.message.clone());
    let mut expected = vec![
        event(
            Level::INFO,
            "demo",
            format!("{chatter}info words={word}"),
            &[request],
        ),
        event(
            Level::WARN,
            "demo",
            format!("{chatter}warn words={word}"),
            &[request],
        ),
        event(
            Level::ERROR,
            "demo",
            format!("{chatter}error words={word}"),
            &[request],
        ),
        // A dependency's `log` record keeps its target, under the
        // service's name.
        event(
            Level::INFO,
            "demo::chatty_dependency",
            format!("{chatter}log record: {word}"),
            &[request],
        ),
        // 1.1's way, still there.
        event(Level::INFO, "demo", format!("log_info: {word}"), &[request]),
        // A thread of the plugin's own is in no request.
        event(
            Level::INFO,
            "demo",
            format!("from a thread words={word}"),
            &["plugin{service=demo}"],
        ),
    ];
    expected.sort_by_key(|s| s.message.clone());
    // No debug or trace event: the host's maximum is INFO, and the plugin
    // did not send them (this subscriber would have recorded them).
    assert_eq!(got, expected);
}

#[test]
fn init_logs_in_the_services_span() {
    capture();
    let _bus = RoutingBus::serving(&["demo"]);
    let starting = seen("demo starting");
    assert!(
        starting.contains(&event(
            Level::INFO,
            "demo",
            "demo starting greeting=hello".to_owned(),
            &["plugin{service=demo}"],
        )),
        "{starting:?}"
    );
}

#[test]
fn a_1_1_plugins_log_arrives_in_the_request_span() {
    capture();
    let bus = RoutingBus::serving(&["fixture_v1_1"]);
    let word = unique("w");
    assert_eq!(
        bus.call("classic.log", json!([word]))["result"],
        json!(null)
    );
    let got = seen(&word);
    let request = r#"request{service=classic method=log id="t-1"}"#;
    assert!(
        got.contains(&event(
            Level::WARN,
            "classic",
            format!("classic says {word}"),
            &[request],
        )),
        "{got:?}"
    );
}

/// The real binary, its `COMMISSAIRE_LOG` and its log format.
#[test]
fn the_hosts_log_filter_applies_to_plugin_events_by_target_and_level() {
    let host = TestHost::start(HostSpec {
        plugins: vec!["demo"],
        // Everything service `demo` logs is under `demo`, its dependency
        // `chatty_dependency` under `demo::chatty_dependency`.
        log: "warn,demo=debug,demo::chatty_dependency=warn".to_owned(),
        ..HostSpec::memory()
    });
    let word = unique("w");
    let (status, reply) = host.http_call("demo.chatter", &json!({"id": 1, "params": [word]}));
    assert_eq!(
        (status, &reply["result"]),
        (200, &json!("logged")),
        "{reply}"
    );
    let log = host.stderr();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(&word)).collect();
    let has = |level: &str, text: &str| {
        lines
            .iter()
            .any(|l| l.contains(level) && l.contains(&text.replace("WORD", &word)))
    };
    // The HTTP gateway gives the request an id of its own.
    let request = "request{service=demo method=chatter id=";
    let debug = format!(
        "}}: demo: chatter{{words={}}}: debug words={word}",
        word.len()
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("DEBUG") && l.contains(request) && l.contains(&debug)),
        "{log}"
    );
    assert!(has("ERROR", "error words=WORD"), "{log}");
    assert!(
        has(
            "INFO",
            "plugin{service=demo}: demo: from a thread words=WORD"
        ),
        "{log}"
    );
    // Above `demo=debug`; and the dependency is held to `warn`.
    assert!(!has("TRACE", "trace words=WORD"), "{log}");
    assert!(!has("INFO", "log record: WORD"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("plugin{service=demo}: demo: demo starting greeting=hello")),
        "{log}"
    );
}
