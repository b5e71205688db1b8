//! Why the host could not start serving.

use std::net::SocketAddr;
use std::path::PathBuf;

use commissaire_plugin_api::RpcError;

use crate::bus::BusError;
use crate::plugin::{DirError, LoadError};

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The plugin directory is unreadable.
    #[error(transparent)]
    PluginDir(#[from] DirError),
    /// Every plugin file was refused (as untrusted, or not loadable).
    #[error("no plugin to serve: {}", refusals(dir, *count, first))]
    AllRefused {
        /// The plugin directory.
        dir: PathBuf,
        /// How many files were refused.
        count: usize,
        /// The first refusal.
        first: LoadError,
    },
    /// Two plugins export one service.
    #[error("{0}")]
    Duplicate(String),
    /// A service's `init` failed.
    #[error("{service} failed to start: {error}")]
    ServiceInit {
        /// The service, its `[[service]]` entry and its plugin file:
        /// ``host.toml:12:8: service `demo` (libdemo.so)``.
        service: String,
        /// Its error.
        error: RpcError,
    },
    /// The bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The configuration does not fit the plugins loaded.
    #[error(transparent)]
    Services(#[from] crate::config::ServicesError),
    /// The slot file cannot be written.
    #[error("cannot open the slot file {path}: {source}")]
    SlotFile {
        /// Its path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `--service` names no loaded plugin.
    #[error("no plugin in {dir} exports service `{service}`")]
    NoSuchService {
        /// The plugin directory.
        dir: String,
        /// The service.
        service: String,
    },
    /// The HTTP endpoint could not listen.
    #[error("cannot listen on {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// `cannot load plugin …: why`, with how many others were refused too.
fn refusals(dir: &std::path::Path, count: usize, first: &LoadError) -> String {
    match count {
        0 | 1 => first.to_string(),
        n => format!(
            "all {n} .so files in {} were refused; the first: {first}",
            dir.display()
        ),
    }
}
