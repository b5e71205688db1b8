//! Logs: `tracing` events on stderr, filtered by `COMMISSAIRE_LOG`.

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Dependencies whose events are off unless the filter names them: lapin
/// logs every connection failure at error level with its internal
/// structures, and the host reports each of those failures itself, once.
const QUIET_DEPENDENCIES: &[&str] = &["lapin"];

/// Logs go to stderr; the filter comes from `COMMISSAIRE_LOG` (or
/// `RUST_LOG`), else `default`.
pub fn init_logging(default: &str) {
    // Colours for a terminal only, not in log files.
    init_with(
        default,
        std::io::stderr,
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
    );
}

/// A worker's logs go to its stderr as every process's, but through a
/// descriptor of their own: descriptor 2 itself becomes the worker's
/// stdout, which the supervisor reads as its plugins' output, bounded and
/// throttled. So a plugin writing to stderr cannot flood the log, nor
/// pass its lines for the host's.
pub fn init_worker_logging(default: &str) {
    let moved = rustix::io::dup(std::io::stderr()).and_then(|log| {
        rustix::stdio::dup2_stderr(std::io::stdout())?;
        Ok(std::fs::File::from(log))
    });
    match moved {
        Ok(log) => {
            let terminal = std::io::IsTerminal::is_terminal(&log);
            let log = std::sync::Arc::new(log);
            init_with(default, move || LogFile(log.clone()), terminal);
        }
        Err(e) => {
            init_logging(default);
            tracing::warn!(error = %e, "cannot keep plugins' stderr apart from the log; it goes to the log unthrottled");
        }
    }
}

/// The log's descriptor, shared by every event.
struct LogFile(std::sync::Arc<std::fs::File>);

impl std::io::Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self.0).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        (&*self.0).flush()
    }
}

fn init_with<W>(default: &str, writer: W, ansi: bool)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = std::env::var("COMMISSAIRE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.to_owned());
    let filter = log_filter(&filter);
    // The quarantine's capture sits above the filter: it sees (and
    // formats) only what the log prints, and prints nothing itself.
    let capture = commissaire_host::quarantine::capture::CaptureLayer::new(
        commissaire_host::quarantine::capture::global(),
    );
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(writer)
        .with_ansi(ansi)
        .finish()
        .with(capture)
        .init();
}

/// `filter`, with the [`QUIET_DEPENDENCIES`] it does not name turned off.
fn log_filter(filter: &str) -> String {
    let mut directives = vec![filter.to_owned()];
    for dependency in QUIET_DEPENDENCIES {
        let named = filter
            .split(',')
            .any(|d| d.trim().split(['=', ':', '[']).next() == Some(dependency));
        if !named {
            directives.push(format!("{dependency}=off"));
        }
    }
    directives.join(",")
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn lapin_is_quiet_unless_the_filter_names_it() {
        assert_eq!(log_filter("info"), "info,lapin=off");
        assert_eq!(log_filter("debug"), "debug,lapin=off");
        assert_eq!(log_filter("info,lapin=debug"), "info,lapin=debug");
        assert_eq!(log_filter("lapin::channel=trace"), "lapin::channel=trace");
    }
}
