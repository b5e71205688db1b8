//! The commands that ask a running service for its contract: `describe`,
//! and `call --check` before it sends.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use commissaire_host::config::HostConfig;
use commissaire_host::contract::Contract;
use commissaire_host::discovery::{self, DiscoveryError};
use commissaire_host::{bus, describe, protocol};

/// What `describe TARGET` names: a service, and maybe one of its methods.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Target<'a> {
    pub service: &'a str,
    pub method: Option<&'a str>,
}

impl<'a> Target<'a> {
    /// `simple`, `simple.add`, or `simple.*` / `simple.#` (the whole
    /// service).
    pub fn parse(text: &'a str) -> anyhow::Result<Self> {
        let (service, method) = if text.contains('.') {
            let method = protocol::method_of(text);
            let method = (!matches!(method, "" | "*" | "#")).then_some(method);
            (protocol::service_of(text), method)
        } else {
            (text, None)
        };
        if service.is_empty() || service.contains(['*', '#']) {
            bail!("`{text}` names no service: give one (`simple`) or a routing key (`simple.add`)");
        }
        bus::topic::check_routing_key(&discovery::discovery_key(service))?;
        Ok(Self { service, method })
    }
}

/// `describe`: prints `target`'s contract, readably or as sent.
pub(crate) fn describe(
    config: &HostConfig,
    target: &str,
    json: bool,
    timeout: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    let target = Target::parse(target)?;
    crate::runtime()?.block_on(async {
        let client = crate::bus_client::connect_client(config, config.reply_queue).await?;
        let answer = discovery::discover_text(&client, target.service, timeout).await;
        // Also after a timeout: closing deletes the reply queue.
        client.bus().close().await;
        let text = match answer {
            Ok(text) => text,
            Err(e) => return refused(target.service, e),
        };
        let contract = Contract::parse(text.get())
            .with_context(|| format!("`{}` answered discovery", target.service))?;
        if let Some(method) = target.method {
            if contract.method(method).is_none() {
                bail!(
                    "service `{}` has no method `{method}` (its methods: {})",
                    target.service,
                    method_names(&contract)
                );
            }
        }
        let out = if json {
            format!("{}\n", text.get())
        } else {
            describe::render_text(&contract, target.method)
        };
        std::io::stdout()
            .write_all(out.as_bytes())
            .context("cannot write to stdout")?;
        Ok(ExitCode::SUCCESS)
    })
}

/// The exit of a discovery that brought no contract: a JSON-RPC error is
/// said on stderr and exits 2, as `call`'s; anything else is an error.
fn refused(service: &str, e: DiscoveryError) -> anyhow::Result<ExitCode> {
    match e {
        DiscoveryError::Refused(error) => {
            let data = error.data.map(|d| format!(" {d}")).unwrap_or_default();
            eprintln!("error {}: {}{data}", error.code, error.message);
            if error.code == commissaire_plugin_api::RpcError::METHOD_NOT_FOUND {
                eprintln!(
                    "`{service}` has no discovery method: an original Python service, or one \
                     served by a host older than contracts"
                );
            }
            Ok(ExitCode::from(2))
        }
        e => Err(e).with_context(|| format!("cannot discover `{service}`")),
    }
}

fn method_names(contract: &Contract) -> String {
    let names: Vec<&str> = contract.methods().map(|m| m.name()).collect();
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::Target;

    #[test]
    fn a_target_is_a_service_or_a_routing_key() {
        let t = |text| Target::parse(text).expect(text);
        assert_eq!(
            t("simple"),
            Target {
                service: "simple",
                method: None
            }
        );
        assert_eq!(
            t("simple.add"),
            Target {
                service: "simple",
                method: Some("add")
            }
        );
        assert_eq!(t("simple.*").method, None);
        assert_eq!(t("simple.#").method, None);
        assert_eq!(t("a.b.add").service, "a.b");
        assert!(Target::parse("*.add").is_err());
        assert!(Target::parse("").is_err());
    }
}
