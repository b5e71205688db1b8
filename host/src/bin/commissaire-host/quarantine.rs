//! `quarantine`: list, show, replay, turn into a test and drop the
//! requests the bus keeps (see `commissaire_host::quarantine`).

use std::io::{Read as _, Write as _};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use commissaire_host::bus::{self, BusTransport};
use commissaire_host::config::{HostConfig, Overrides};
use commissaire_host::plugin::Trust;
use commissaire_host::quarantine::entry::{parse_id, summarize, Summary, MAX_ENTRY_BYTES};
use commissaire_host::quarantine::{queue_of, render, Entry};
use commissaire_host::serve::replay;

use crate::bus_client::connect_client;
use crate::cli::QuarantineCommand;
use crate::{load_config, runtime};

pub fn run(command: QuarantineCommand) -> anyhow::Result<ExitCode> {
    if let QuarantineCommand::RunEntry {
        plugin,
        allow_insecure_plugins,
    } = &command
    {
        return run_entry(plugin, *allow_insecure_plugins);
    }
    let config = load_config(command.bus(), Overrides::default())?;
    if config.bus_uri.starts_with("memory:") {
        bail!(
            "memory:// is the embedded bus of one host process: its quarantine lives and dies \
             with it. Give --bus-uri amqp://… or redis://…"
        );
    }
    runtime()?.block_on(async {
        let bus = bus::connect(&config.bus_uri).await.map_err(|e| {
            anyhow::anyhow!("{e} (the bus URI came from {})", config.bus_uri_source)
        })?;
        let done = dispatch(command, &config, &bus).await;
        bus.close().await;
        done
    })
}

async fn dispatch(
    command: QuarantineCommand,
    config: &HostConfig,
    bus: &Arc<dyn BusTransport>,
) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match command {
        QuarantineCommand::List { service, .. } => {
            let mut total = 0;
            for queue in queues(config, service.as_deref())? {
                let (summaries, unreadable) = read(bus, &queue).await?;
                if unreadable > 0 {
                    eprintln!(
                        "{unreadable} entries of `{queue}` are not quarantine entries; left alone"
                    );
                }
                for s in &summaries {
                    writeln!(out, "{}", render::list_line(s))?;
                }
                total += summaries.len();
            }
            if total == 0 {
                eprintln!("nothing quarantined");
            }
            Ok(ExitCode::SUCCESS)
        }
        QuarantineCommand::Show { id, .. } => {
            let found = find(bus, &id).await?;
            out.write_all(render::show(&found).as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
        QuarantineCommand::Test {
            id, service_type, ..
        } => {
            let found = find(bus, &id).await?;
            let e = &found.latest;
            let ty = service_type.unwrap_or_else(|| render::type_name(&e.service));
            let Some(test) = render::test(e, &ty) else {
                bail!("its body is not a JSON-RPC request: the handler never saw it, no test to write");
            };
            out.write_all(test.as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
        QuarantineCommand::Drop { target, all, .. } => {
            let mut removed = 0;
            if all {
                for queue in queues(config, target.as_deref())? {
                    removed += bus.quarantine_remove(&queue_of(&queue), &|_| true).await?;
                }
            } else {
                let Some(id) = target else {
                    bail!("name an entry (QUEUE:FINGERPRINT, as `list` prints it), or give --all");
                };
                let (queue, fp) = id_parts(&id)?;
                let fp = fp.to_ascii_lowercase();
                let pick = move |bytes: &[u8]| {
                    Entry::from_bytes(bytes).is_some_and(|e| e.fingerprint == fp)
                };
                removed = bus.quarantine_remove(&queue_of(queue), &pick).await?;
            }
            let entries = if removed == 1 { "entry" } else { "entries" };
            writeln!(out, "{removed} {entries} removed")?;
            Ok(ExitCode::SUCCESS)
        }
        QuarantineCommand::Replay {
            id,
            to,
            plugin: Some(plugin),
            allow_insecure_plugins,
            ..
        } => {
            let _ = to;
            let found = find(bus, &id).await?;
            let section = config.service(&found.latest.service).config;
            drop(out);
            replay_in_child(&plugin, allow_insecure_plugins, &found.latest, &section)
        }
        QuarantineCommand::Replay {
            id, to, timeout, ..
        } => {
            let found = find(bus, &id).await?;
            let e = &found.latest;
            let routing_key = to.unwrap_or_else(|| e.routing_key.clone());
            bus::topic::check_routing_key(&routing_key)?;
            let body = e.body();
            let mut holder = None;
            let params = commissaire_host::protocol::parse_request(&body, &e.routing_key, &mut holder)
                .map_err(|r| {
                    anyhow::anyhow!(
                        "its body is not a JSON-RPC request ({}): the live service would refuse it again",
                        r.error.message
                    )
                })?
                .params
                .to_owned();
            let timeout = timeout
                .map(commissaire_host::client::timeout_from_secs)
                .transpose()
                .context("--timeout")?;
            let client = connect_client(config, config.reply_queue).await?;
            let parent = e
                .traceparent
                .as_deref()
                .and_then(commissaire_host::trace::TraceContext::parse);
            let params = (!params.is_empty()).then_some(params);
            let reply = client
                .request(&routing_key, params.as_deref(), timeout, parent.as_ref())
                .await;
            client.bus().close().await;
            match reply? {
                Ok(result) => {
                    writeln!(out, "{}", result.get())?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    let data = e.data.map(|d| format!(" {d}")).unwrap_or_default();
                    eprintln!(
                        "error {}: {}{data}",
                        e.code,
                        render::escape(&e.message, false)
                    );
                    Ok(ExitCode::from(2))
                }
            }
        }
        QuarantineCommand::RunEntry { .. } => Ok(ExitCode::FAILURE),
    }
}

/// The service queues whose quarantines a command reads: `service`'s, or
/// every configured service's.
fn queues(config: &HostConfig, service: Option<&str>) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> = match service {
        Some(s) => vec![s.to_owned()],
        None => {
            let mut names: Vec<String> = config.services.keys().cloned().collect();
            names.sort();
            names
        }
    };
    if names.is_empty() {
        bail!("name a SERVICE: the config file names none ([[service]])");
    }
    Ok(names
        .iter()
        .flat_map(|n| config.service(n).queues.into_iter().map(|q| q.name))
        .collect())
}

fn id_parts(id: &str) -> anyhow::Result<(&str, &str)> {
    parse_id(id).with_context(|| {
        format!(
            "`{}` is not an entry id: QUEUE:FINGERPRINT (16 hex digits), as `list` prints it",
            render::escape(id, false)
        )
    })
}

/// The summaries of `queue`'s quarantine, and how many entries were not
/// readable as entries.
async fn read(bus: &Arc<dyn BusTransport>, queue: &str) -> anyhow::Result<(Vec<Summary>, usize)> {
    let raw = bus.quarantine_read(&queue_of(queue)).await?;
    let total = raw.len();
    let entries: Vec<Entry> = raw.iter().filter_map(|b| Entry::from_bytes(b)).collect();
    let unreadable = total - entries.len();
    Ok((summarize(entries), unreadable))
}

async fn find(bus: &Arc<dyn BusTransport>, id: &str) -> anyhow::Result<Summary> {
    let (queue, fp) = id_parts(id)?;
    let fp = fp.to_ascii_lowercase();
    let (summaries, _) = read(bus, queue).await?;
    summaries
        .into_iter()
        .find(|s| s.latest.fingerprint == fp)
        .with_context(|| {
            format!(
                "no entry {} in quarantine `{}`",
                render::escape(id, false),
                queue_of(queue)
            )
        })
}

/// What `replay --plugin` hands its child on stdin.
#[derive(serde::Serialize, serde::Deserialize)]
struct ChildInput {
    entry: Entry,
    config: serde_json::Value,
}

/// Runs the entry in a child process (`quarantine run-entry`): a handler
/// that aborts ends the child, not this command, which says how.
fn replay_in_child(
    plugin: &std::path::Path,
    allow_insecure_plugins: bool,
    entry: &Entry,
    config: &serde_json::Value,
) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find this program to run the replay")?;
    let mut command = std::process::Command::new(exe);
    command
        .args(["quarantine", "run-entry", "--plugin"])
        .arg(plugin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if allow_insecure_plugins {
        command.arg("--allow-insecure-plugins");
    }
    let mut child = command.spawn().context("cannot start the replay process")?;
    let input = serde_json::to_vec(&ChildInput {
        entry: entry.clone(),
        config: config.clone(),
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(&input)
            .context("cannot hand the entry to the replay process")?;
    }
    let output = child.wait_with_output().context("the replay process")?;
    let mut out = std::io::stdout().lock();
    // The reply, result or error, as the child printed it.
    out.write_all(&output.stdout)?;
    if output.status.success() {
        return Ok(ExitCode::SUCCESS);
    }
    use std::os::unix::process::ExitStatusExt as _;
    match (output.status.signal(), output.status.code()) {
        (Some(signal), _) => {
            let name = match signal {
                6 => " (SIGABRT: the handler aborted)",
                9 => " (SIGKILL)",
                11 => " (SIGSEGV: the handler crashed)",
                _ => "",
            };
            writeln!(
                out,
                "the handler of `{}` crashed the process: killed by signal {signal}{name}",
                render::escape(&entry.routing_key, false)
            )?;
            Ok(ExitCode::from(3))
        }
        (None, Some(code)) => {
            // The child said why on stderr already.
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
        (None, None) => Ok(ExitCode::FAILURE),
    }
}

/// The child of `replay --plugin`: runs the entry from stdin, prints the
/// reply (pretty when JSON; exit 2 when it is an error reply).
fn run_entry(plugin: &std::path::Path, allow_insecure_plugins: bool) -> anyhow::Result<ExitCode> {
    let mut input = Vec::new();
    std::io::stdin()
        .take(MAX_ENTRY_BYTES as u64 * 2)
        .read_to_end(&mut input)
        .context("cannot read the entry")?;
    let ChildInput { entry, config } =
        serde_json::from_slice(&input).context("not a quarantine entry")?;
    let trust = if allow_insecure_plugins {
        Trust::AnyPermissions
    } else {
        Trust::OwnerOnly
    };
    let (reply, service) = replay::replay(plugin, trust, &config, &entry)?;
    if service != entry.service {
        eprintln!(
            "note: {} serves `{service}`; the entry was quarantined by `{}`",
            plugin.display(),
            render::escape(&entry.service, false)
        );
    }
    let mut out = std::io::stdout().lock();
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&reply).ok();
    let is_error = parsed.as_ref().is_some_and(|v| v.get("error").is_some());
    writeln!(out, "{}", render::body(&reply))?;
    Ok(if is_error {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}
