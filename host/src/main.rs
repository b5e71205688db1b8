//! The `commissaire-host` command.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use commissaire_host::client::RpcClient;
use commissaire_host::config::{HostConfig, Overrides};
use commissaire_host::plugin::PluginSet;
use commissaire_host::redact::redact_uri;
use commissaire_host::supervisor::{self, SupervisorOptions, WORKER_BUS_URI_ENV};
use commissaire_host::{bus, control, listing, serve};

/// Serves Commissaire bus services from plugin libraries.
#[derive(Debug, Parser)]
#[command(name = "commissaire-host", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the bus is: the config file, then these flags (which win), then
/// `COMMISSAIRE_BUS_URI`.
#[derive(Debug, Args)]
struct BusArgs {
    /// The host's TOML config file.
    #[arg(short = 'c', long = "config", visible_alias = "config-file")]
    config: Option<PathBuf>,
    /// The bus URI: amqp://, amqps://, redis://, rediss:// or memory:// [default: memory://].
    #[arg(long)]
    bus_uri: Option<String>,
    /// The topic exchange [default: commissaire].
    #[arg(long)]
    bus_exchange: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serves every plugin of the plugin directory on the bus until
    /// SIGINT/SIGTERM. On a broker, each service runs in `workers` worker
    /// processes that are restarted when they die; SIGHUP restarts them one
    /// at a time to pick up new or replaced plugins.
    Run {
        #[command(flatten)]
        bus: BusArgs,
        /// The plugin directory (overrides [plugins] dir).
        #[arg(long)]
        plugins_dir: Option<PathBuf>,
        /// Serve the HTTP endpoint here (overrides [http] listen).
        #[arg(long)]
        http_listen: Option<SocketAddr>,
        /// Exit at once if the broker is unreachable at startup, instead of
        /// retrying.
        #[arg(long)]
        fail_fast: bool,
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
    },
    /// Sends a request and prints its result as JSON. A JSON-RPC error goes
    /// to stderr and exits 2; no reply or no bus exits 1.
    Call {
        /// Where to send it, e.g. `simple.add`.
        routing_key: String,
        /// The params: a JSON array or object.
        params: Option<String>,
        #[command(flatten)]
        bus: BusArgs,
        /// Seconds to wait for the reply [default: 10].
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Sends a notification: the handler runs, nothing comes back.
    Notify {
        /// Where to send it, e.g. `demo.ping`.
        routing_key: String,
        /// The params: a JSON array or object.
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
        } => {
            let config = load_config(
                &bus,
                Overrides {
                    plugins_dir: plugins_dir.clone(),
                    http_listen,
                    ..Overrides::default()
                },
            )?;
            if !bus::BusKind::of(&config.bus_uri)?.is_shared() {
                // The embedded bus lives in this process: serve here.
                runtime()?.block_on(async {
                    tokio::spawn(ignore_sighup());
                    serve::run(&config, shutdown_signal()).await
                })?;
                return Ok(ExitCode::SUCCESS);
            }
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
            let options = SupervisorOptions {
                exe: std::env::current_exe().context("cannot find the commissaire-host binary")?,
                worker_args,
                fail_fast,
            };
            runtime()?.block_on(supervisor::supervise(config, options))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker {
            mut bus,
            plugins_dir,
            service,
            slot_file,
            fail_fast,
        } => {
            // The supervisor's bus URI, as if given with --bus-uri.
            bus.bus_uri = std::env::var(WORKER_BUS_URI_ENV).ok();
            let config = load_config(
                &bus,
                Overrides {
                    plugins_dir,
                    ..Overrides::default()
                },
            );
            let options = serve::WorkerOptions {
                service: service.clone(),
                slot_file,
                controlled: true,
                fail_fast,
                bus_owner: std::env::var(supervisor::WORKER_BUS_OWNER_ENV).ok(),
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
            let timeout = match timeout {
                Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
                Some(t) => bail!("--timeout must be a positive number of seconds, not {t}"),
                None => None,
            };
            runtime()?.block_on(async {
                let client = connect_client(&config).await?;
                let reply = client
                    .request(&routing_key, params.as_deref(), timeout)
                    .await?;
                client.bus().close().await;
                match reply {
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
            runtime()?.block_on(async {
                let client = connect_client(&config).await?;
                client.notify(&routing_key, params.as_deref()).await?;
                client.bus().close().await;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Plugins { dir, json } => {
            let set = PluginSet::load_dir(&dir)?;
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

async fn connect_client(config: &HostConfig) -> anyhow::Result<std::sync::Arc<RpcClient>> {
    if config.bus_uri.starts_with("memory:") {
        bail!(
            "memory:// is the embedded bus of one host process: another process cannot reach it. \
             Call a host running on memory:// through its HTTP endpoint \
             (curl -d '{{\"id\":1,\"params\":[1,2]}}' http://127.0.0.1:8080/rpc/simple.add), \
             or give --bus-uri amqp://…"
        );
    }
    let bus = bus::connect(&config.bus_uri).await?;
    tracing::debug!(bus = %redact_uri(&config.bus_uri), "connected");
    Ok(RpcClient::start(bus, &config.exchange, config.request_timeout).await?)
}

fn absolute(path: &std::path::Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))
}

/// PARAMS_JSON must be a JSON array or object.
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

/// Logs go to stderr; the level comes from `COMMISSAIRE_LOG` (or
/// `RUST_LOG`), default `info`.
fn init_logging() {
    let filter = std::env::var("COMMISSAIRE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_owned());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        // Colours for a terminal only, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
