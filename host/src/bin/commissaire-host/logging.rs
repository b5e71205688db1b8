//! Logs: `tracing` events on stderr, filtered by `COMMISSAIRE_LOG`.

/// Dependencies whose events are off unless the filter names them: lapin
/// logs every connection failure at error level with its internal
/// structures, and the host reports each of those failures itself, once.
const QUIET_DEPENDENCIES: &[&str] = &["lapin"];

/// Logs go to stderr; the filter comes from `COMMISSAIRE_LOG` (or
/// `RUST_LOG`), else `default`.
pub fn init_logging(default: &str) {
    let filter = std::env::var("COMMISSAIRE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.to_owned());
    let filter = log_filter(&filter);
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        // Colours for a terminal only, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
