//! `plugins`: a directory's listing or its services' contracts, and
//! `plugins --diff`, the roll's verdict on a new version before anyone
//! deploys it.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use commissaire_host::contract::{self, Contract};
use commissaire_host::listing::{self, DiffListing};
use commissaire_host::plugin::{PluginLibrary, PluginSet, Trust};
use commissaire_host::redact::escape;

/// `plugins DIR [--json | --openrpc]`: exits non-zero if a file was
/// refused.
pub fn list(dir: &Path, json: bool, openrpc: bool, trust: Trust) -> anyhow::Result<ExitCode> {
    let set = PluginSet::load_dir(dir, trust)?;
    let text = if openrpc {
        // Refusals are not in the documents' map: said on stderr.
        for refused in &set.refused {
            eprintln!("commissaire-host: {refused}");
        }
        pretty(&listing::render_openrpc(&set))?
    } else if json {
        pretty(&listing::render_json(&set))?
    } else {
        escape(&listing::render_text(&set), true)
    };
    write_out(&text)?;
    Ok(if set.refused.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `plugins --diff OLD NEW [--json]`: 0 compatible, 1 breaking, 2 when
/// either cannot be loaded (said on stderr).
pub fn diff(old: &Path, new: &Path, json: bool, trust: Trust) -> ExitCode {
    match compared(old, new, json, trust) {
        Ok(true) => ExitCode::from(1),
        Ok(false) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("commissaire-host: {}", crate::one_line(&e));
            ExitCode::from(2)
        }
    }
}

/// Prints the differences; whether one breaks callers.
fn compared(old: &Path, new: &Path, json: bool, trust: Trust) -> anyhow::Result<bool> {
    let old = PluginLibrary::load_trusted(old, trust)?;
    let new = PluginLibrary::load_trusted(new, trust)?;
    let differences = contract::compare(&Contract::of(&old), &Contract::of(&new));
    let listing = DiffListing::of(&old, &new, &differences);
    let text = if json {
        pretty(&listing)?
    } else {
        escape(&listing.render_text(), true)
    };
    write_out(&text)?;
    Ok(listing.is_breaking())
}

fn pretty<T: serde::Serialize>(value: &T) -> anyhow::Result<String> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    Ok(text)
}

fn write_out(text: &str) -> anyhow::Result<()> {
    std::io::stdout()
        .write_all(text.as_bytes())
        .context("cannot write to stdout")
}
