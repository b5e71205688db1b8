//! The `commissaire-host` command: [`cli`] parses it, [`commands`] does
//! what it asks; [`logging`] and [`signals`] serve every process it runs.

mod bus_client;
mod cli;
mod commands;
mod contracts;
mod logging;
mod plugins;
mod quarantine;
mod signals;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use commissaire_host::config::{HostConfig, Overrides};

use cli::{BusArgs, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // An original Commissaire JSON config's `"debug": true` is a log level.
    let debug = cli
        .config_file()
        .and_then(commissaire_host::config::original::debug)
        .unwrap_or(false);
    let level = if debug { "debug" } else { "info" };
    if matches!(cli.command, cli::Command::Worker { .. }) {
        logging::init_worker_logging(level);
    } else {
        logging::init_logging(level);
    }
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("commissaire-host: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// `e` and its causes on one line, each said once: an error that already
/// quotes its cause (`cannot listen on …: Address already in use`) is not
/// followed by the cause again.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The configuration of `run`, `call` and `notify`, with one warning for
/// each setting given in two places where the winner hides the other.
fn load_config(args: &BusArgs, extra: Overrides) -> anyhow::Result<HostConfig> {
    let config = load_config_quietly(args, extra)?;
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    Ok(config)
}

/// As [`load_config`], without the warnings: a worker's configuration is
/// its supervisor's, which said them once.
fn load_config_quietly(args: &BusArgs, extra: Overrides) -> anyhow::Result<HostConfig> {
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
