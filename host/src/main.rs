//! The `commissaire-host` command.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use commissaire_host::client::{self, RpcClient};
use commissaire_host::config::{HostConfig, Overrides};
use commissaire_host::plugin::{PluginSet, Trust};
use commissaire_host::redact::redact_uri;
use commissaire_host::supervise::{self, SupervisorOptions, WORKER_BUS_URI_ENV};
use commissaire_host::{bus, control, listing, serve};

/// The environment variables the host reads, for every `--help`.
const ENVIRONMENT: &str = "\
Environment:
  COMMISSAIRE_BUS_URI  The bus URI when neither --bus-uri nor the config file gives one
                       (keep a password here rather than in files or on the command line)
  COMMISSAIRE_LOG      The log filter, e.g. `debug` or `info,commissaire_host::supervise=debug`
                       [default: info]; RUST_LOG when it is unset
  TRACEPARENT          call and notify: the W3C trace context their request joins";

/// Serves Commissaire bus services from plugin libraries.
#[derive(Debug, Parser)]
#[command(name = "commissaire-host", version, about, after_help = ENVIRONMENT)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the bus is: these flags win over the config file, which wins over
/// `COMMISSAIRE_BUS_URI`. (Not clap's `env`: that would put the variable
/// ahead of the file.)
#[derive(Debug, Args)]
struct BusArgs {
    /// The host's TOML config file (see examples/host.toml).
    #[arg(
        short = 'c',
        long = "config",
        visible_alias = "config-file",
        value_name = "FILE"
    )]
    config: Option<PathBuf>,
    /// The bus URI: amqp://, amqps://, redis://, rediss:// or memory://. Wins
    /// over [bus] uri in the config file, which wins over
    /// $COMMISSAIRE_BUS_URI; memory:// when none of them gives one.
    #[arg(long, value_name = "URI")]
    bus_uri: Option<String>,
    /// The topic exchange. Wins over [bus] exchange in the config file;
    /// commissaire when neither gives one.
    #[arg(long, value_name = "NAME")]
    bus_exchange: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serves every plugin of the plugin directory on the bus until
    /// SIGINT/SIGTERM. On a broker, each service runs in `workers` worker
    /// processes that are restarted when they die; SIGHUP restarts them one
    /// at a time to pick up new or replaced plugins.
    #[command(after_help = ENVIRONMENT)]
    Run {
        #[command(flatten)]
        bus: BusArgs,
        /// The directory of built plugins (.so files). Wins over [plugins]
        /// dir in the config file; ./plugins when neither gives one.
        #[arg(long, value_name = "DIR")]
        plugins_dir: Option<PathBuf>,
        /// Serve the HTTP endpoint here, e.g. 127.0.0.1:8080. Wins over
        /// [http] listen in the config file; no HTTP endpoint when neither
        /// gives one. Its bearer token comes from the environment variable
        /// COMMISSAIRE_HTTP_TOKEN (preferred: kept out of files and argv)
        /// or [http] token; without one, anyone who reaches the address can
        /// call every service.
        #[arg(long, value_name = "ADDR")]
        http_listen: Option<SocketAddr>,
        /// Exit at once if the broker is unreachable at startup, instead of
        /// retrying. (A broker that refuses the login, the vhost or TLS
        /// ends `run` after three attempts either way.)
        #[arg(long)]
        fail_fast: bool,
        /// Load plugins from a directory, or files, that group or others
        /// may write (refused by default: whoever can write them can run
        /// code in the host).
        #[arg(long)]
        allow_insecure_plugins: bool,
    },
    /// Internal: one worker process of `run`.
    #[command(hide = true)]
    Worker {
        #[command(flatten)]
        bus: BusArgs,
        /// The plugin directory.
        #[arg(long)]
        plugins_dir: Option<PathBuf>,
        /// The service this worker serves.
        #[arg(long)]
        service: String,
        /// Where it records the requests it is running.
        #[arg(long)]
        slot_file: Option<PathBuf>,
        /// Exit if the broker is unreachable.
        #[arg(long)]
        fail_fast: bool,
        /// As `run`'s.
        #[arg(long)]
        allow_insecure_plugins: bool,
    },
    /// Sends a request and prints its result as JSON. A JSON-RPC error goes
    /// to stderr and exits 2; no reply or no bus exits 1.
    #[command(after_help = ENVIRONMENT)]
    Call {
        /// Where to send it, e.g. `simple.add`.
        routing_key: String,
        /// The params: a JSON array or object.
        #[arg(value_name = "PARAMS_JSON")]
        params: Option<String>,
        #[command(flatten)]
        bus: BusArgs,
        /// Seconds to wait for the reply, at most 300. Wins over [bus]
        /// request_timeout in the config file; 10 when neither gives one.
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
    },
    /// Sends a notification: the handler runs, nothing comes back.
    #[command(after_help = ENVIRONMENT)]
    Notify {
        /// Where to send it, e.g. `demo.ping`.
        routing_key: String,
        /// The params: a JSON array or object.
        #[arg(value_name = "PARAMS_JSON")]
        params: Option<String>,
        #[command(flatten)]
        bus: BusArgs,
    },
    /// Lists the plugins in a directory: service, versions, methods. Exits
    /// non-zero if any file was refused.
    Plugins {
        /// The plugin directory.
        dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Load plugins from a directory, or files, that group or others
        /// may write (refused by default: whoever can write them can run
        /// code in the host).
        #[arg(long)]
        allow_insecure_plugins: bool,
    },
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("commissaire-host: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn load_config(args: &BusArgs, extra: Overrides) -> anyhow::Result<HostConfig> {
    let overrides = Overrides {
        bus_uri: args.bus_uri.clone(),
        bus_exchange: args.bus_exchange.clone(),
        ..extra
    };
    Ok(HostConfig::load(
        args.config.as_deref(),
        &overrides,
        |name| std::env::var(name).ok(),
    )?)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            bus,
            plugins_dir,
            http_listen,
            fail_fast,
            allow_insecure_plugins,
        } => {
            let config = load_config(
                &bus,
                Overrides {
                    plugins_dir: plugins_dir.clone(),
                    http_listen,
                    allow_insecure_plugins,
                    ..Overrides::default()
                },
            )?;
            if !bus::BusKind::of(&config.bus_uri)?.is_shared() {
                // The embedded bus lives in this process: serve here.
                runtime()?.block_on(async {
                    tokio::spawn(ignore_sighup());
                    let host = serve::start(&config).await?;
                    if config.http_listen.is_none() {
                        tracing::warn!(
                            "serving on memory:// without an HTTP endpoint: nothing outside this \
                             process can reach it; give --http-listen 127.0.0.1:8080 (or [http] \
                             listen), or serve on a broker with --bus-uri amqp://… or redis://…"
                        );
                    }
                    shutdown_signal().await;
                    host.shutdown().await;
                    anyhow::Ok(())
                })?;
                return Ok(ExitCode::SUCCESS);
            }
            // The supervisor lists the directory in a child process; an
            // unreadable one is said here, once, rather than in its words.
            PluginSet::plugin_files(&config.plugins_dir)?;
            let mut worker_args: Vec<std::ffi::OsString> = Vec::new();
            if let Some(path) = &bus.config {
                worker_args.push("--config".into());
                worker_args.push(absolute(path)?.into());
            }
            if let Some(exchange) = &bus.bus_exchange {
                worker_args.push("--bus-exchange".into());
                worker_args.push(exchange.into());
            }
            worker_args.push("--plugins-dir".into());
            worker_args.push(absolute(&config.plugins_dir)?.into());
            if allow_insecure_plugins {
                worker_args.push("--allow-insecure-plugins".into());
            }
            let options = SupervisorOptions {
                exe: std::env::current_exe().context("cannot find the commissaire-host binary")?,
                worker_args,
                fail_fast,
            };
            runtime()?.block_on(supervise::supervise(config, options))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker {
            mut bus,
            plugins_dir,
            service,
            slot_file,
            fail_fast,
            allow_insecure_plugins,
        } => {
            // The supervisor's bus URI, as if given with --bus-uri.
            bus.bus_uri = std::env::var(WORKER_BUS_URI_ENV).ok();
            let config = load_config(
                &bus,
                Overrides {
                    plugins_dir,
                    allow_insecure_plugins,
                    ..Overrides::default()
                },
            );
            let options = serve::WorkerOptions {
                service: service.clone(),
                slot_file,
                controlled: true,
                fail_fast,
                bus_owner: std::env::var(supervise::WORKER_BUS_OWNER_ENV).ok(),
            };
            let ended = config.and_then(|config| {
                let span =
                    tracing::info_span!("worker", service = %service, pid = std::process::id());
                let _entered = span.enter();
                let rt = runtime()?;
                let ended = rt.block_on(serve::run_worker(&config, &options, shutdown_signal()));
                // Do not wait for handlers still running (a hung one would
                // hold the process forever).
                rt.shutdown_background();
                Ok(ended?)
            });
            // Exit without waiting for handlers still running (a hung one
            // would hold the process forever): the broker requeues what
            // this worker did not settle.
            let code = match ended {
                Ok(serve::WorkerEnd::Stopped) => control::EXIT_STOPPED,
                Ok(serve::WorkerEnd::Recycle) => control::EXIT_RECYCLE,
                Err(e) => {
                    // The supervisor reports it (once, not once per worker).
                    control::Control::fatal(&format!("{e:#}"));
                    control::EXIT_FATAL
                }
            };
            std::process::exit(code)
        }
        Command::Call {
            routing_key,
            params,
            bus,
            timeout,
        } => {
            let config = load_config(&bus, Overrides::default())?;
            let params = checked_params(params)?;
            bus::topic::check_routing_key(&routing_key)?;
            let timeout = timeout
                .map(client::timeout_from_secs)
                .transpose()
                .context("--timeout")?;
            runtime()?.block_on(async {
                let client = connect_client(&config, config.reply_queue).await?;
                let parent = env_traceparent();
                let reply = client
                    .request(&routing_key, params.as_deref(), timeout, parent.as_ref())
                    .await;
                // Also after a timeout: closing deletes the reply queue.
                client.bus().close().await;
                match reply? {
                    Ok(result) => {
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "{}", result.get()).context("cannot write to stdout")?;
                        Ok(ExitCode::SUCCESS)
                    }
                    Err(e) => {
                        let data = e.data.map(|d| format!(" {d}")).unwrap_or_default();
                        eprintln!("error {}: {}{data}", e.code, e.message);
                        Ok(ExitCode::from(2))
                    }
                }
            })
        }
        Command::Notify {
            routing_key,
            params,
            bus,
        } => {
            let config = load_config(&bus, Overrides::default())?;
            let params = checked_params(params)?;
            bus::topic::check_routing_key(&routing_key)?;
            runtime()?.block_on(async {
                let client = connect_client(&config, bus::ReplyQueueKind::Direct).await?;
                let parent = env_traceparent();
                let sent = client
                    .notify(&routing_key, params.as_deref(), parent.as_ref())
                    .await;
                client.bus().close().await;
                sent?;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Plugins {
            dir,
            json,
            allow_insecure_plugins,
        } => {
            let trust = if allow_insecure_plugins {
                Trust::AnyPermissions
            } else {
                Trust::OwnerOnly
            };
            let set = PluginSet::load_dir(&dir, trust)?;
            let text = if json {
                let mut t = serde_json::to_string_pretty(&listing::render_json(&set))?;
                t.push('\n');
                t
            } else {
                listing::render_text(&set)
            };
            std::io::stdout()
                .write_all(text.as_bytes())
                .context("cannot write to stdout")?;
            Ok(if set.refused.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// A client for `call` and `notify`; `reply_queue` is where its replies
/// would come (`notify` expects none: it asks for direct reply-to, which
/// has nothing to declare or delete).
async fn connect_client(
    config: &HostConfig,
    reply_queue: bus::ReplyQueueKind,
) -> anyhow::Result<std::sync::Arc<RpcClient>> {
    if config.bus_uri.starts_with("memory:") {
        bail!(
            "memory:// is the embedded bus of one host process: another process cannot reach it. \
             Call a host running on memory:// through its HTTP endpoint \
             (curl -H 'Content-Type: application/json' -d '{{\"id\":1,\"params\":[1,2]}}' \
             http://127.0.0.1:8080/rpc/simple.add), \
             or give --bus-uri amqp://…"
        );
    }
    let bus = bus::connect(&config.bus_uri).await?;
    tracing::debug!(bus = %redact_uri(&config.bus_uri), "connected");
    Ok(RpcClient::start(bus, &config.exchange, config.request_timeout, reply_queue).await?)
}

fn absolute(path: &std::path::Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))
}

/// PARAMS_JSON must be a JSON array or object.
/// The trace `call` and `notify` join: `TRACEPARENT` in the environment
/// (the convention of OpenTelemetry's command-line tools), when valid.
fn env_traceparent() -> Option<commissaire_host::trace::TraceContext> {
    std::env::var("TRACEPARENT")
        .ok()
        .and_then(|t| commissaire_host::trace::TraceContext::parse(&t))
}

fn checked_params(params: Option<String>) -> anyhow::Result<Option<String>> {
    let Some(text) = params else { return Ok(None) };
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("PARAMS_JSON is not JSON: {text}"))?;
    if !(value.is_array() || value.is_object()) {
        bail!("PARAMS_JSON must be a JSON array or object, not {text}");
    }
    Ok(Some(value.to_string()))
}

/// On the embedded bus there are no worker processes to roll: SIGHUP is
/// logged and ignored (rather than ending the process).
async fn ignore_sighup() {
    #[cfg(unix)]
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        while hup.recv().await.is_some() {
            tracing::warn!(
                "SIGHUP ignored: reloading plugins restarts worker processes, \
                 which need a broker bus (amqp:// or redis://)"
            );
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

/// Dependencies whose events are off unless the filter names them: lapin
/// logs every connection failure at error level with its internal
/// structures, and the host reports each of those failures itself, once.
const QUIET_DEPENDENCIES: &[&str] = &["lapin"];

/// Logs go to stderr; the filter comes from `COMMISSAIRE_LOG` (or
/// `RUST_LOG`), default `info`.
fn init_logging() {
    let filter = std::env::var("COMMISSAIRE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_owned());
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
    use super::*;

    #[test]
    fn lapin_is_quiet_unless_the_filter_names_it() {
        assert_eq!(log_filter("info"), "info,lapin=off");
        assert_eq!(log_filter("debug"), "debug,lapin=off");
        assert_eq!(log_filter("info,lapin=debug"), "info,lapin=debug");
        assert_eq!(log_filter("lapin::channel=trace"), "lapin::channel=trace");
    }

    #[test]
    fn help_names_every_environment_variable() {
        use clap::CommandFactory as _;
        let mut cli = Cli::command();
        for sub in ["run", "call", "notify"] {
            let help = cli
                .find_subcommand_mut(sub)
                .map(|c| c.render_long_help().to_string())
                .unwrap_or_default();
            for var in ["COMMISSAIRE_BUS_URI", "COMMISSAIRE_LOG", "RUST_LOG"] {
                assert!(help.contains(var), "`{sub} --help` does not name {var}");
            }
            assert!(!help.contains("[default: memory://]"), "{help}");
        }
    }
}
