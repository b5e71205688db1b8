//! Running the real `commissaire-host` binary against a real broker, with
//! names of its own so that tests run in parallel and leave nothing behind.

use std::io::Read as _;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;

pub use crate::caller::{AmqpCaller, ReceivedReply, ReplyQueue};
pub use crate::redis::{
    cleanup_redis, redis_command, redis_commands, redis_keys, redis_server, redis_uri, Resp,
};
use crate::{host_bin, plugin_dir};

/// The broker the tests use (`COMMISSAIRE_TEST_AMQP` overrides).
pub fn amqp_uri() -> String {
    std::env::var("COMMISSAIRE_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A fresh name: `prefix-<uuid>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A local TCP port free a moment ago, for servers that cannot bind port 0
/// and report it (a test's own `redis-server`): another process may take
/// it first, so whoever uses it retries on another when its bind fails.
/// Test hosts never use it: they bind port 0 and report the address.
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr")
}

/// `filter` with the line that reports the HTTP endpoint's address kept,
/// whatever level the test wants of the rest.
fn log_filter(filter: &str) -> String {
    if filter.contains("commissaire_host::http") {
        filter.to_owned()
    } else {
        format!("{filter},commissaire_host::http=info")
    }
}

/// The address a host logged as bound (`HTTP endpoint ready
/// listen=ADDR`), once it did.
pub fn bound_http_addr(log: &str) -> Option<SocketAddr> {
    log.lines()
        .find(|l| l.contains("HTTP endpoint ready"))?
        .split_whitespace()
        .find_map(|field| field.strip_prefix("listen="))?
        .parse()
        .ok()
}

/// How to start a host.
#[derive(Debug, Clone)]
pub struct HostSpec {
    /// The bus URI.
    pub bus_uri: String,
    /// Plugin libraries to serve (`simple`, `demo`, …).
    pub plugins: Vec<&'static str>,
    /// Extra TOML appended to the generated config.
    pub extra_toml: String,
    /// Extra TOML for every `[[service]]` entry (`workers = 2`, …).
    pub service_toml: String,
    /// Queue-name suffix shared by hosts that must share queues.
    pub suffix: String,
    /// The exchange.
    pub exchange: String,
    /// `COMMISSAIRE_LOG` for the host process.
    pub log: String,
    /// Extra keys of the `[bus]` table (`confirm_replies = true`, …).
    pub bus_toml: String,
    /// Extra keys of the `[http]` table (`allow = […]`, …).
    pub http_toml: String,
    /// Extra environment variables of the host process.
    pub env: Vec<(String, String)>,
    /// Extra arguments of `run` (`--allow-insecure-plugins`, …).
    pub args: Vec<String>,
    /// A plugin directory the test laid out itself, served instead of a
    /// fresh one holding `plugins` (which still name the `[[service]]`
    /// entries).
    pub plugins_dir: Option<PathBuf>,
    /// The host's `TMPDIR` (where it notes its reply queues, and sweeps
    /// those of dead processes noted there), when a test shares one with
    /// another process; by default each host has a private one, so that
    /// no host of another test or checkout sweeps what it noted.
    pub tmpdir: Option<PathBuf>,
}

impl HostSpec {
    /// `simple` and `demo` on RabbitMQ, with fresh exchange and queue names.
    pub fn amqp() -> Self {
        Self {
            bus_uri: amqp_uri(),
            plugins: vec!["simple", "demo"],
            extra_toml: String::new(),
            service_toml: String::new(),
            suffix: unique("q"),
            exchange: unique("test-ex"),
            log: "info".to_owned(),
            bus_toml: String::new(),
            http_toml: String::new(),
            env: Vec::new(),
            args: Vec::new(),
            plugins_dir: None,
            tmpdir: None,
        }
    }

    /// The same on the embedded bus.
    pub fn memory() -> Self {
        Self {
            bus_uri: "memory://".to_owned(),
            ..Self::amqp()
        }
    }

    /// The queue name of `service` in this spec.
    pub fn queue(&self, service: &str) -> String {
        format!("{service}-{}", self.suffix)
    }

    fn toml(&self, http: SocketAddr, plugins_dir: &std::path::Path) -> String {
        let mut t = format!(
            "[bus]\nexchange = \"{}\"\n{}\n[plugins]\ndir = \"{}\"\n\n[http]\nlisten = \"{http}\"\n{}\n",
            self.exchange,
            self.bus_toml,
            plugins_dir.display(),
            self.http_toml
        );
        for (lib, service) in SERVICES {
            if self.plugins.contains(&lib) {
                t.push_str(&format!(
                    "\n[[service]]\nname = \"{service}\"\nqueues = [{{ name = \"{}\", routing_key = \"{service}.*\" }}]\n{}",
                    self.queue(service),
                    self.service_toml
                ));
            }
        }
        t.push_str(&self.extra_toml);
        t
    }
}

/// Plugin libraries the generated config knows, and their services.
const SERVICES: [(&str, &str); 3] = [
    ("simple", "simple"),
    ("demo", "demo"),
    ("fixture_older", "older"),
];

/// A running host process; killed and its broker objects deleted on drop.
#[derive(Debug)]
pub struct TestHost {
    child: Option<Child>,
    /// What it was started with.
    pub spec: HostSpec,
    /// Its HTTP endpoint: the host binds port 0 and logs the address (a
    /// port chosen beforehand could be taken by anyone in between); known
    /// once it is up (`127.0.0.1:0` for a host expected to fail).
    pub http: SocketAddr,
    /// Its `TMPDIR`.
    tmpdir: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
    /// The plugin directory made for it, unless the spec gave one.
    _plugins: Option<tempfile::TempDir>,
    plugins_dir: PathBuf,
    /// More queues to delete once it has stopped (see [`TestHost::also_clean`]).
    also_clean: Vec<String>,
}

impl TestHost {
    /// Deletes `queues` too (and their quarantines) when it is dropped,
    /// after it has stopped: deleted while it runs, a queue of its own is
    /// declared again (it recovers its topology).
    pub fn also_clean(&mut self, queues: impl IntoIterator<Item = String>) {
        self.also_clean.extend(queues);
    }

    /// Starts the host and waits until `/healthz` says every service is
    /// consuming.
    pub fn start(spec: HostSpec) -> Self {
        let config_spec = spec.clone();
        Self::launch(spec, move |http, plugins| config_spec.toml(http, plugins))
    }

    /// Writes the config `toml(http address, plugin dir)` gives, starts the
    /// host on it and waits until it is healthy.
    fn launch(spec: HostSpec, toml: impl FnOnce(SocketAddr, &std::path::Path) -> String) -> Self {
        let mut host = Self::spawn(spec, toml);
        host.wait_healthy(Duration::from_secs(20));
        host
    }

    /// Starts the host with `services`, not waiting for it to be healthy
    /// (it is expected to fail: [`Self::wait`] for its exit).
    pub fn start_expecting_failure(spec: HostSpec, services: &str) -> Self {
        let (exchange, extra) = (spec.exchange.clone(), spec.extra_toml.clone());
        let bus = spec.bus_toml.clone();
        Self::spawn(spec, |http, plugins| {
            format!(
                "[bus]\nexchange = \"{exchange}\"\n{bus}\n[plugins]\ndir = \"{}\"\n\n[http]\nlisten = \"{http}\"\n\n{services}\n{extra}",
                plugins.display(),
            )
        })
    }

    fn spawn(spec: HostSpec, toml: impl FnOnce(SocketAddr, &std::path::Path) -> String) -> Self {
        let plugins = match &spec.plugins_dir {
            Some(_) => None,
            None => Some(plugin_dir(&spec.plugins)),
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let http = SocketAddr::from(([127, 0, 0, 1], 0));
        let config = dir.path().join("host.toml");
        let tmpdir = spec
            .tmpdir
            .clone()
            .unwrap_or_else(|| dir.path().join("tmp"));
        std::fs::create_dir_all(&tmpdir).expect("the host's TMPDIR");
        let plugins_dir = spec
            .plugins_dir
            .clone()
            .or_else(|| plugins.as_ref().map(|p| p.path().to_owned()))
            .unwrap_or_default();
        std::fs::write(&config, toml(http, &plugins_dir)).expect("write config");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let child = Command::new(host_bin())
            .args(["run", "--config"])
            .arg(&config)
            .args(["--bus-uri", &spec.bus_uri])
            .args(&spec.args)
            .env("COMMISSAIRE_LOG", log_filter(&spec.log))
            .env("TMPDIR", &tmpdir)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn commissaire-host");
        Self {
            child: Some(child),
            spec,
            http,
            tmpdir,
            config,
            also_clean: Vec::new(),
            stderr_path,
            _dir: dir,
            _plugins: plugins,
            plugins_dir,
        }
    }

    fn wait_healthy(&mut self, limit: Duration) {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("host exited with {status}:\n{}", self.stderr());
            }
            if self.http.port() == 0 {
                if let Some(addr) = bound_http_addr(&self.stderr()) {
                    self.http = addr;
                }
            }
            if self.http.port() != 0 {
                if let Ok((200, _)) = http_get(self.http, "/healthz") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("host not healthy within {limit:?}:\n{}", self.stderr());
    }

    /// What the host logged.
    pub fn stderr(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.stderr_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends a signal (`TERM`, `INT`, `KILL`).
    pub fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([format!("-{signal}"), child.id().to_string()])
                .status();
        }
    }

    /// Waits for the process to exit (at most `limit`).
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "host did not exit within {limit:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its `TMPDIR` (its reply-queue notes, its work directory unless
    /// `/dev/shm` takes it).
    pub fn tmpdir(&self) -> &std::path::Path {
        &self.tmpdir
    }

    /// The plugin directory it serves.
    pub fn plugins_dir(&self) -> &std::path::Path {
        &self.plugins_dir
    }

    /// What `/healthz` says (status, body).
    pub fn health(&self) -> (u16, Value) {
        http_get(self.http, "/healthz").expect("GET /healthz")
    }

    /// The process ids of `service`'s workers, as `/healthz` lists them.
    pub fn worker_pids(&self, service: &str) -> Vec<u32> {
        let (_, health) = self.health();
        health["services"][service]["pids"]
            .as_array()
            .map(|pids| {
                pids.iter()
                    .filter_map(|p| p.as_u64().and_then(|p| u32::try_from(p).ok()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The value of one `/metrics` series, named as rendered
    /// (`name{labels}`). Panics when the series is missing or not a
    /// number: a series renamed or gone is no 0.
    pub fn metric(&self, series: &str) -> u64 {
        let (status, text) = http_get(self.http, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "GET /metrics: {text}");
        let text = text.as_str().expect("/metrics is text");
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no series {series} in /metrics:\n{text}"));
        let value: f64 = value
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{series} {value}: {e}"));
        value as u64
    }

    /// `POST /rpc/{routing_key}` with `body`: (status, JSON body).
    pub fn http_call(&self, routing_key: &str, body: &Value) -> (u16, Value) {
        http_post(self.http, &format!("/rpc/{routing_key}"), body).expect("HTTP request")
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM first: a host that stops deletes its reply queues.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Each service queue, and its quarantine (`<queue>.quarantine`).
        let queues: Vec<String> = SERVICES
            .iter()
            .map(|(_, service)| self.spec.queue(service))
            .chain(self.also_clean.drain(..))
            .flat_map(|q| [format!("{q}.quarantine"), q])
            .collect();
        if self.spec.bus_uri.starts_with("amqp") {
            let spec = self.spec.clone();
            cleanup_broker_at(first_uri(&spec.bus_uri), &spec.exchange, &queues);
        } else if self.spec.bus_uri.starts_with("redis") {
            let spec = &self.spec;
            cleanup_redis(&spec.bus_uri, &spec.exchange, &queues);
        }
    }
}

/// The first URI of a failover list (`uri;uri;…`).
fn first_uri(uris: &str) -> &str {
    uris.split(';').next().unwrap_or(uris)
}

/// Deletes the test's exchange and queues on the test broker.
pub fn cleanup_broker(exchange: &str, queues: &[String]) {
    cleanup_broker_at(&amqp_uri(), exchange, queues);
}

/// Deletes the test's exchange and queues on the broker at `uri`.
pub fn cleanup_broker_at(uri: &str, exchange: &str, queues: &[String]) {
    let exchange = exchange.to_owned();
    let queues = queues.to_vec();
    let uri = uri.to_owned();
    let cleanup = async move {
        let conn = Connection::connect(&uri, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        for q in &queues {
            // A queue that was never declared closes the channel: use one each.
            let ch = conn.create_channel().await?;
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = ch
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
        conn.close(200, "bye".into()).await
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    // In a test that is itself async, this runs on a thread of its own.
    let _ = std::thread::spawn(move || rt.map(|rt| rt.block_on(cleanup))).join();
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

fn read(mut response: ureq::http::Response<ureq::Body>) -> Result<(u16, Value), ureq::Error> {
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string()?;
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Ok((status, value))
}

/// `GET http://addr/path`.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, Value), ureq::Error> {
    read(agent().get(&format!("http://{addr}{path}")).call()?)
}

/// `POST http://addr/path` with a JSON body.
pub fn http_post(addr: SocketAddr, path: &str, body: &Value) -> Result<(u16, Value), ureq::Error> {
    read(
        agent()
            .post(&format!("http://{addr}{path}"))
            .send_json(body)?,
    )
}

impl TestHost {
    /// Starts the host with `services` (TOML `[[service]]` entries) instead
    /// of the generated ones.
    pub fn start_with_services(spec: HostSpec, services: &str) -> Self {
        let (exchange, extra) = (spec.exchange.clone(), spec.extra_toml.clone());
        let (bus, http_toml) = (spec.bus_toml.clone(), spec.http_toml.clone());
        Self::launch(spec, |http, plugins| {
            format!(
                "[bus]\nexchange = \"{exchange}\"\n{bus}\n[plugins]\ndir = \"{}\"\n\n[http]\nlisten = \"{http}\"\n{http_toml}\n\n{services}\n{extra}",
                plugins.display(),
            )
        })
    }
}
