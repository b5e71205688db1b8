//! Every service in this process: the embedded `memory://` bus, where
//! nothing else can deliver requests, and the in-process test host.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::inflight::InFlight;
use super::session::{open_session, prepare, Session};
use super::watchdog::{self, OnHung};
use super::Process;
use crate::bus;
use crate::client::{RpcClient, SharedClient};
use crate::config::HostConfig;
use crate::error::HostError;
use crate::health::Health;
use crate::metrics::http::HttpSnapshot;
use crate::metrics::text::{render, Exporter, ServiceView, WorkerView};

/// A host serving every service in this process.
pub struct RunningHost {
    /// What `/healthz` reports.
    pub health: Arc<Health>,
    /// The client the host's own requests use.
    pub client: Arc<RpcClient>,
    /// The HTTP endpoint's bound address.
    pub http_addr: Option<SocketAddr>,
    session: Session,
    http_stop: CancellationToken,
    watchdog_stop: CancellationToken,
    shutdown_timeout: Duration,
}

impl std::fmt::Debug for RunningHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningHost")
            .field("http_addr", &self.http_addr)
            .finish_non_exhaustive()
    }
}

/// Loads, connects, declares and starts consuming every service in this
/// process; returns once every service is consuming.
pub async fn start(config: &HostConfig) -> Result<RunningHost, HostError> {
    let services = prepare(config, None)?;
    let listener = match config.http_listen {
        Some(addr) => Some(crate::http::bind(addr).await?),
        None => None,
    };
    let bus = bus::connect(&config.bus_uri).await?;
    tracing::info!(bus = %bus.describe(), exchange = %config.exchange, "connected");
    let process = Process {
        inflight: Arc::new(InFlight::default()),
        control: None,
        health: Arc::new(Health::default()),
        metrics: Arc::default(),
    };
    let session = open_session(config, bus, &services, &process).await?;
    let watchdog_stop = CancellationToken::new();
    watchdog::start(
        process.inflight.clone(),
        config.handler_grace,
        OnHung::Log,
        tokio::runtime::Handle::current(),
        watchdog_stop.clone(),
    );
    let http_stop = CancellationToken::new();
    let http_addr = match listener {
        Some(listener) => Some(
            crate::http::serve(
                listener,
                Arc::new(SharedClient::fixed(session.client.clone())),
                process.health.clone(),
                Arc::new(Local {
                    metrics: process.metrics.clone(),
                    in_flight: process.inflight.clone(),
                }),
                &config.http,
                config.max_message_bytes,
                http_stop.clone(),
            )
            .await?,
        ),
        None => None,
    };
    Ok(RunningHost {
        health: process.health,
        client: session.client.clone(),
        http_addr,
        session,
        http_stop,
        watchdog_stop,
        shutdown_timeout: config.shutdown_timeout,
    })
}

impl RunningHost {
    /// Stops consuming, lets in-flight handlers finish and their replies go
    /// out, hands unstarted deliveries back, and closes the connection.
    pub async fn shutdown(self) {
        self.http_stop.cancel();
        self.session.shutdown(self.shutdown_timeout).await;
        self.watchdog_stop.cancel();
    }
}

/// Serves every service in this process until `signal` resolves, then
/// stops cleanly.
pub async fn run(config: &HostConfig, signal: impl Future<Output = ()>) -> Result<(), HostError> {
    let host = start(config).await?;
    signal.await;
    host.shutdown().await;
    Ok(())
}

/// Every service of this process (the in-process host): no supervisor,
/// no workers to add up.
struct Local {
    /// The counts.
    metrics: Arc<crate::metrics::Metrics>,
    /// What is in flight.
    in_flight: Arc<InFlight>,
}

impl Exporter for Local {
    fn render(&self, http: &HttpSnapshot) -> String {
        let views = self
            .metrics
            .snapshot(self.in_flight.len() as u64)
            .into_iter()
            .map(|counts| ServiceView {
                counts,
                workers: vec![("consuming", 1)],
                processes: vec![WorkerView {
                    index: 0,
                    pid: std::process::id(),
                }],
                ..ServiceView::default()
            })
            .collect();
        render(views, http)
    }
}
