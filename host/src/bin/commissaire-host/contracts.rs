//! The commands that ask a running service for its contract: `describe`,
//! and `call --check` before it sends (one discovery request: a call names
//! one service).

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use commissaire_host::client::RpcClient;
use commissaire_host::config::HostConfig;
use commissaire_host::contract::{Contract, ParamProblem};
use commissaire_host::discovery::{self, DiscoveryError};
use commissaire_host::redact::escape;
use commissaire_host::{bus, describe, protocol};
use serde_json::Value;

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
                    escape(&method_names(&contract), false)
                );
            }
        }
        // The JSON as sent (serde escapes control characters); the text
        // escaped: it came from whoever answered on the bus.
        let out = if json {
            format!("{}\n", text.get())
        } else {
            escape(&describe::render_text(&contract, target.method), true)
        };
        std::io::stdout()
            .write_all(out.as_bytes())
            .context("cannot write to stdout")?;
        Ok(ExitCode::SUCCESS)
    })
}

/// `call --check`: asks the callee's service for its contract and checks
/// `params` against it. `SUCCESS` to send the call; else the exit to end
/// with, the reason said: 2 for params the contract refuses (the error the
/// service would answer), an error when there is no contract to check
/// against.
pub(crate) async fn check_call(
    client: &RpcClient,
    routing_key: &str,
    params: Option<&str>,
    timeout: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    let service = protocol::service_of(routing_key);
    let contract = match discovery::discover(client, service, timeout).await {
        Ok(contract) => contract,
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "--check: no contract from `{service}` to check against (send without --check \
                     to call it unchecked)"
                )
            })
        }
    };
    let params: Option<Value> = params
        .map(serde_json::from_str)
        .transpose()
        .context("PARAMS_JSON")?;
    match contract.check_params(protocol::method_of(routing_key), params.as_ref()) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(problem) => {
            let error = problem.to_rpc_error();
            eprintln!("error {}: {}", error.code, escape(&error.message, false));
            let version = escape(contract.version(), false);
            if let ParamProblem::UnknownMethod { method } = &problem {
                eprintln!(
                    "not sent: `{service}` (version {version}) has no method `{method}` (its \
                     methods: {})",
                    escape(&method_names(&contract), false)
                );
            } else {
                eprintln!(
                    "not sent: `{routing_key}` does not take these params (checked against \
                     `{service}`'s contract, version {version})"
                );
            }
            Ok(ExitCode::from(2))
        }
    }
}

/// The exit of a discovery that brought no contract: a JSON-RPC error is
/// said on stderr and exits 2, as `call`'s; anything else is an error.
fn refused(service: &str, e: DiscoveryError) -> anyhow::Result<ExitCode> {
    match e {
        DiscoveryError::Refused(error) => {
            let data = error.data.map(|d| format!(" {d}")).unwrap_or_default();
            eprintln!(
                "error {}: {}",
                error.code,
                escape(&format!("{}{data}", error.message), false)
            );
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
