//! Helpers for the end-to-end tests: build the host, our plugins and the
//! ABI fixtures once per test process, and hand out plugin directories.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub mod caller;
pub mod etcd;
pub mod host;
pub mod http;
pub mod load;
pub mod probe;
pub mod rabbitmq;
pub mod redis;
pub mod redis_load;
pub mod tally;

use commissaire_host::bus::Incoming;
use commissaire_host::dispatch::Service;
use commissaire_host::plugin::PluginLibrary;
use commissaire_plugin_api::host::{HostBus, RequestMeta};
use commissaire_plugin_api::RpcError;
use serde_json::{json, Value};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Cargo's target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Where the debug artifacts land.
pub fn artifact_dir() -> PathBuf {
    target_dir().join("debug")
}

fn cargo(args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(&cargo);
    // `cargo test` runs a test with the package's own variables set
    // (CARGO_MANIFEST_DIR, CARGO_PKG_NAME, ...). Build scripts that watch
    // them (ring's does) would see them changed from the `cargo test`
    // build and rebuild ring, rustls, lapin and the host each time; the
    // next `cargo test` then rebuilt them back.
    for (key, _) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        if key_text.starts_with("CARGO_PKG_")
            || key_text.starts_with("CARGO_MANIFEST_")
            || matches!(
                key_text.as_ref(),
                "OUT_DIR" | "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR"
            )
        {
            command.env_remove(&key);
        }
    }
    let status = command
        .args(args)
        .current_dir(workspace_root())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
    assert!(status.success(), "cargo {} failed", args.join(" "));
}

/// Builds the host binary, our plugins and every fixture plugin (once per
/// process). Fixtures are separate workspaces (each holds its own frozen
/// `commissaire-plugin-api`) sharing our target directory and lock file,
/// so they reuse the dependencies already built.
pub fn build_all() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let target = target_dir();
        let target = target.to_str().unwrap_or("target");
        cargo(&[
            "build",
            "-p",
            "commissaire-host",
            "-p",
            "commissaire-plugin-simple",
            "-p",
            "commissaire-plugin-demo",
            // A library that is not a plugin, for the loader's refusal.
            "-p",
            "commissaire-plugin-api-macros",
            // This crate too: its dependencies (lapin's rustls) unify the
            // features as `cargo test` does, so the host, lapin and rustls
            // are not built a second time with other features.
            "-p",
            "commissaire-e2e",
        ]);
        let fixtures = workspace_root().join("tests/fixtures");
        for name in [
            "older",
            "older-next",
            "newer",
            "v1-1",
            "mistyped",
            "major2",
            "panic-abort",
            "simple-compatible",
            "simple-breaking",
        ] {
            let dir = fixtures.join(format!("plugin-{name}"));
            let _ = std::fs::copy(workspace_root().join("Cargo.lock"), dir.join("Cargo.lock"));
            let manifest = dir.join("Cargo.toml");
            let manifest = manifest.to_str().unwrap_or_default();
            if name == "panic-abort" {
                cargo(&[
                    "rustc",
                    "--lib",
                    "--manifest-path",
                    manifest,
                    "--target-dir",
                    target,
                    "--",
                    "-C",
                    "panic=abort",
                ]);
            } else {
                cargo(&["build", "--manifest-path", manifest, "--target-dir", target]);
            }
        }
    });
}

/// The built host binary.
pub fn host_bin() -> PathBuf {
    build_all();
    artifact_dir().join(format!("commissaire-host{}", std::env::consts::EXE_SUFFIX))
}

/// The built library of plugin crate `lib_name` (e.g. `simple`,
/// `fixture_older`).
pub fn library(lib_name: &str) -> PathBuf {
    build_all();
    if lib_name == "storage" {
        build_storage();
    }
    artifact_dir().join(format!(
        "{}{lib_name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ))
}

/// Builds the misbehaving fixture plugin (`tests/fixtures/plugin-misbehave`,
/// service `bp`, its own workspace) as version `version` (what its
/// `version` method answers) and returns a copy of its library kept for
/// that version. The builds share one artifact path: one at a time.
pub fn misbehave_library(version: &str) -> PathBuf {
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILDING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let kept = artifact_dir()
        .join(format!("misbehave-{version}"))
        .join(format!(
            "{}misbehave{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        ));
    let dir = workspace_root().join("tests/fixtures/plugin-misbehave");
    let _ = std::fs::copy(workspace_root().join("Cargo.lock"), dir.join("Cargo.lock"));
    let manifest = dir.join("Cargo.toml");
    let target = target_dir();
    let cargo_bin = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo_bin)
        .args(["build", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target)
        .env("BP_VERSION", version)
        .current_dir(workspace_root())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cargo_bin}: {e}"));
    assert!(status.success(), "building the misbehaving fixture failed");
    let built = artifact_dir().join(kept.file_name().unwrap_or_default());
    if let Some(parent) = kept.parent() {
        std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("{}: {e}", parent.display()));
    }
    std::fs::copy(&built, &kept).unwrap_or_else(|e| panic!("{}: {e}", built.display()));
    kept
}

/// Builds the fixture host that speaks plugin-api 1.1
/// (`tests/fixtures/host-1.1`, its own workspace) and returns its binary.
pub fn host_1_1_bin() -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = workspace_root().join("tests/fixtures/host-1.1");
        let _ = std::fs::copy(workspace_root().join("Cargo.lock"), dir.join("Cargo.lock"));
        let manifest = dir.join("Cargo.toml");
        let target = target_dir();
        cargo(&[
            "build",
            "--manifest-path",
            manifest.to_str().unwrap_or_default(),
            "--target-dir",
            target.to_str().unwrap_or("target"),
        ]);
    });
    artifact_dir().join(format!("host-1-1{}", std::env::consts::EXE_SUFFIX))
}

/// Builds the storage plugin (once per process), in a `cargo build` of
/// its own: in [`build_all`]'s it changes the features that build unifies
/// for the host's dependencies, and every `cargo test` after it then
/// rebuilt them.
fn build_storage() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| cargo(&["build", "-p", "commissaire-plugin-storage"]));
}

/// Builds `examples/plugin-template` as its users do (out of tree, with
/// the workspace's lock file and our target directory so that nothing is
/// built twice) and returns its library.
pub fn template_library() -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = workspace_root().join("examples/plugin-template");
        let _ = std::fs::copy(workspace_root().join("Cargo.lock"), dir.join("Cargo.lock"));
        let manifest = dir.join("Cargo.toml");
        let target = target_dir();
        cargo(&[
            "build",
            "--manifest-path",
            manifest.to_str().unwrap_or_default(),
            "--target-dir",
            target.to_str().unwrap_or("target"),
        ]);
    });
    artifact_dir().join(format!(
        "{}hello{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ))
}

/// Builds plugin package `package` with the release profile and returns its
/// library (for benchmarks, which must not compare optimised code with
/// debug code).
pub fn release_library(package: &str, lib_name: &str) -> PathBuf {
    cargo(&["build", "--release", "-p", package]);
    target_dir().join("release").join(format!(
        "{}{lib_name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ))
}

/// The Python interpreter with kombu: `COMMISSAIRE_TEST_PYTHON`, else the
/// `.venv` that `scripts/test.sh` creates. Panics (never skips) without it.
pub fn python_with_kombu() -> PathBuf {
    let python = std::env::var_os("COMMISSAIRE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
    assert!(
        python.exists(),
        "no Python with kombu at {}: run scripts/test.sh (it creates .venv with kombu \
         and prometheus_client) \
         or set COMMISSAIRE_TEST_PYTHON",
        python.display()
    );
    python
}

/// A fresh directory holding copies of the given plugin libraries.
pub fn plugin_dir(lib_names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("cannot make a temp dir: {e}"));
    for name in lib_names {
        let from = library(name);
        let to = dir.path().join(from.file_name().unwrap_or_default());
        std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("cannot copy {}: {e}", from.display()));
    }
    dir
}

/// Loads one built plugin library.
pub fn load(lib_name: &str) -> PluginLibrary {
    PluginLibrary::load(&library(lib_name)).unwrap_or_else(|e| panic!("{e}"))
}

/// An in-process test bus: requests go to the service whose name is the
/// routing key's prefix, through the real dispatcher; notifications are
/// dispatched too (without reply) and recorded.
#[derive(Default)]
pub struct RoutingBus {
    services: HashMap<String, Arc<Service>>,
    notified: std::sync::Mutex<Vec<(String, Value)>>,
    published: std::sync::Mutex<Vec<(String, String, String)>>,
}

impl RoutingBus {
    /// A bus serving the given plugins with empty configs.
    pub fn serving(lib_names: &[&str]) -> Arc<Self> {
        let libraries: Vec<PluginLibrary> = lib_names.iter().map(|name| load(name)).collect();
        Self::from_libraries(&libraries)
    }

    /// A bus serving the given loaded plugins with empty configs.
    pub fn from_libraries(libraries: &[PluginLibrary]) -> Arc<Self> {
        let mut bus = Self::default();
        for library in libraries {
            let name = library.service_name.clone();
            let service = Service::start(library.clone(), &json!({}))
                .unwrap_or_else(|e| panic!("{name} failed to start: {e}"));
            bus.services.insert(service.name().to_owned(), service);
        }
        Arc::new(bus)
    }

    /// Delivers `body` on `routing_key` as a request with a reply queue,
    /// returning the decoded reply.
    pub fn deliver(&self, routing_key: &str, body: &[u8]) -> Option<Value> {
        self.deliver_with(routing_key, body, Some("reply-queue"))
    }

    /// Delivers `body` with the given `reply_to` (None: a notification).
    pub fn deliver_with(
        &self,
        routing_key: &str,
        body: &[u8],
        reply_to: Option<&str>,
    ) -> Option<Value> {
        let prefix = routing_key.split('.').next().unwrap_or(routing_key);
        let service = self
            .services
            .get(prefix)
            .unwrap_or_else(|| panic!("no service for {routing_key}"));
        let delivery = Incoming {
            exchange: "commissaire".to_owned(),
            routing_key: routing_key.to_owned(),
            body: body.to_vec(),
            reply_to: reply_to.map(str::to_owned),
            correlation_id: Some(b"corr-1".to_vec()),
            malformed: None,
            traceparent: None,
            redelivered: false,
            deadline: None,
            settlement: None,
        };
        let handled = service.handle(
            &delivery,
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            self,
        );
        handled.reply.map(|r| {
            assert_eq!(r.to, reply_to.unwrap_or_default());
            serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("reply is not JSON: {e}"))
        })
    }

    /// Calls `routing_key` with `params`, returning the JSON-RPC reply.
    pub fn call(&self, routing_key: &str, params: Value) -> Value {
        let method = commissaire_host::protocol::method_of(routing_key);
        let body = json!({"jsonrpc": "2.0", "id": "t-1", "method": method, "params": params});
        self.deliver(routing_key, body.to_string().as_bytes())
            .unwrap_or_else(|| panic!("no reply from {routing_key}"))
    }

    /// Notifications handlers sent.
    pub fn notified(&self) -> Vec<(String, Value)> {
        self.notified.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Raw bodies handlers published: (exchange as given, routing key,
    /// body).
    pub fn published(&self) -> Vec<(String, String, String)> {
        self.published.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl HostBus for RoutingBus {
    fn request(
        &self,
        _caller: &RequestMeta<'_>,
        routing_key: &str,
        params_json: &str,
        _timeout: Option<Duration>,
    ) -> Result<String, RpcError> {
        let params: Value = serde_json::from_str(params_json)
            .map_err(|e| RpcError::invalid_params(e.to_string()))?;
        let reply = self.call(routing_key, params);
        match reply.get("error") {
            Some(e) => Err(serde_json::from_value(e.clone())
                .map_err(|e| RpcError::internal_error(e.to_string()))?),
            None => Ok(reply["result"].to_string()),
        }
    }

    fn notify(
        &self,
        _caller: &RequestMeta<'_>,
        routing_key: &str,
        params_json: &str,
    ) -> Result<(), RpcError> {
        let params: Value = serde_json::from_str(params_json)
            .map_err(|e| RpcError::invalid_params(e.to_string()))?;
        if let Ok(mut v) = self.notified.lock() {
            v.push((routing_key.to_owned(), params));
        }
        Ok(())
    }

    fn respond(
        &self,
        _caller: &RequestMeta<'_>,
        _queue: &str,
        _id_json: &str,
        _result_json: &str,
    ) -> Result<(), RpcError> {
        Ok(())
    }

    fn publish(
        &self,
        _caller: &RequestMeta<'_>,
        exchange: &str,
        routing_key: &str,
        body: &str,
    ) -> Result<(), RpcError> {
        if let Ok(mut v) = self.published.lock() {
            v.push((exchange.to_owned(), routing_key.to_owned(), body.to_owned()));
        }
        Ok(())
    }
}
