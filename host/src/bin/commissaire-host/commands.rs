//! What each subcommand does: `run` (the embedded bus in this process, or
//! the supervisor of worker processes), `worker` (started by the
//! supervisor), `call`, `notify` and `describe` (contracts asked for:
//! [`crate::contracts`]); `plugins` is [`crate::plugins`].

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use commissaire_host::client;
use commissaire_host::config::Overrides;
use commissaire_host::plugin::{PluginSet, Trust};
use commissaire_host::supervise::{self, SupervisorOptions, WORKER_BUS_URI_ENV};
use commissaire_host::{bus, control, serve};

use crate::cli::{Cli, Command};
use crate::signals::{ignore_sighup, shutdown_signal};
use crate::{load_config, load_config_quietly, runtime};

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            bus,
            plugins_dir,
            http_listen,
            fail_fast,
            allow_insecure_plugins,
            allow_breaking,
        } => {
            let config = load_config(
                &bus,
                Overrides {
                    plugins_dir: plugins_dir.clone(),
                    http_listen,
                    allow_insecure_plugins,
                    allow_breaking_upgrades: allow_breaking,
                    ..Overrides::default()
                },
            )?;
            if !config.bus_traits.shared {
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
            // Not the plugin directory: the supervisor hands each worker
            // its roll's checked copies.
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
            let config = load_config_quietly(
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
            check,
        } => {
            let config = load_config(&bus, Overrides::default())?;
            let params = checked_params(params)?;
            bus::topic::check_routing_key(&routing_key)?;
            let timeout = timeout
                .map(client::timeout_from_secs)
                .transpose()
                .context("--timeout")?;
            runtime()?.block_on(async {
                let client = crate::bus_client::connect_client(&config, config.reply_queue).await?;
                if check {
                    let checked = crate::contracts::check_call(
                        &client,
                        &routing_key,
                        params.as_deref(),
                        timeout,
                    )
                    .await;
                    if !matches!(checked, Ok(ExitCode::SUCCESS)) {
                        client.bus().close().await;
                        return checked;
                    }
                }
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
                let client =
                    crate::bus_client::connect_client(&config, bus::ReplyQueueKind::Direct).await?;
                let parent = env_traceparent();
                let sent = client
                    .notify(&routing_key, params.as_deref(), parent.as_ref())
                    .await;
                client.bus().close().await;
                sent?;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Describe {
            target,
            json,
            bus,
            timeout,
        } => {
            let config = load_config(&bus, Overrides::default())?;
            let timeout = timeout
                .map(client::timeout_from_secs)
                .transpose()
                .context("--timeout")?;
            crate::contracts::describe(&config, &target, json, timeout)
        }
        Command::Quarantine(command) => crate::quarantine::run(command),
        Command::Plugins {
            dir,
            json,
            openrpc,
            diff,
            allow_insecure_plugins,
        } => {
            let trust = if allow_insecure_plugins {
                Trust::AnyPermissions
            } else {
                Trust::OwnerOnly
            };
            match (dir, diff.as_deref()) {
                (_, Some([old, new])) => Ok(crate::plugins::diff(old, new, json, trust)),
                (Some(dir), _) => crate::plugins::list(&dir, json, openrpc, trust),
                // clap requires one or the other, and two files to --diff.
                _ => bail!("give a plugin directory, or --diff OLD NEW"),
            }
        }
    }
}

fn absolute(path: &std::path::Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))
}

/// The trace `call` and `notify` join: `TRACEPARENT` in the environment
/// (the convention of OpenTelemetry's command-line tools), when valid.
fn env_traceparent() -> Option<commissaire_host::trace::TraceContext> {
    std::env::var("TRACEPARENT")
        .ok()
        .and_then(|t| commissaire_host::trace::TraceContext::parse(&t))
}

/// PARAMS_JSON, which must be a JSON array or object, re-serialised.
fn checked_params(params: Option<String>) -> anyhow::Result<Option<String>> {
    let Some(text) = params else { return Ok(None) };
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("PARAMS_JSON is not JSON: {text}"))?;
    if !(value.is_array() || value.is_object()) {
        bail!("PARAMS_JSON must be a JSON array or object, not {text}");
    }
    Ok(Some(value.to_string()))
}
