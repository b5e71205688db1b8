//! The `commissaire-host` command.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use commissaire_host::listing;
use commissaire_host::plugin::PluginSet;

/// Serves Commissaire bus services from plugin libraries.
#[derive(Debug, Parser)]
#[command(name = "commissaire-host", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
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
