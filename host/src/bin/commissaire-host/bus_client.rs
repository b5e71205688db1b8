//! The bus client of the commands that call a running deployment (`call`,
//! `notify`, `describe`, `quarantine`).

use anyhow::bail;
use commissaire_host::bus;
use commissaire_host::client::RpcClient;
use commissaire_host::config::HostConfig;
use commissaire_host::redact::redact_uri;

/// A client for `call` and `notify`; `reply_queue` is where its replies
/// would come (`notify` expects none: it asks for direct reply-to, which
/// has nothing to declare or delete).
pub(crate) async fn connect_client(
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
    let bus = bus::connect(&config.bus_uri)
        .await
        .map_err(|e| anyhow::anyhow!("{e} (the bus URI came from {})", config.bus_uri_source))?;
    tracing::debug!(bus = %redact_uri(&config.bus_uri), "connected");
    Ok(RpcClient::start(bus, &config.exchange, config.request_timeout, reply_queue).await?)
}
