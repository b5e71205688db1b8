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
use commissaire_host::{bus, listing, server};

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
    /// SIGINT/SIGTERM.
    Run {
        #[command(flatten)]
        bus: BusArgs,
        /// The plugin directory (overrides [plugins] dir).
        #[arg(long)]
        plugins_dir: Option<PathBuf>,
        /// Serve the HTTP endpoint here (overrides [http] listen).
        #[arg(long)]
        http_listen: Option<SocketAddr>,
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
        } => {
            let config = load_config(
                &bus,
                Overrides {
                    plugins_dir,
                    http_listen,
                    ..Overrides::default()
                },
            )?;
            runtime()?.block_on(server::run(&config, shutdown_signal()))?;
            Ok(ExitCode::SUCCESS)
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
        .init();
}
