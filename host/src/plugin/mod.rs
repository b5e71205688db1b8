//! Loading plugin libraries and checking that they speak our ABI.
//!
//! Every file is loaded on its own with `lib_header_from_path` (abi_stable's
//! `RootModule::load_from_*` would cache one module per type for the whole
//! process). Libraries are never unloaded. Which files are trusted at all:
//! [`trust`].

pub mod trust;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_path, LibraryError};
use abi_stable::sabi_types::VersionNumber;
use abi_stable::std_types::RString;
use commissaire_plugin_api::host::{
    CheckError, HostBus, PendingCall, Plugin, PluginRootRef, RequestMeta, API_VERSION,
};
use commissaire_plugin_api::RpcError;
use serde::{Deserialize, Serialize};
pub use trust::Trust;
use trust::{Kind, Owners, Untrusted};

/// Why a file was not accepted as a plugin.
#[derive(Debug, thiserror::Error)]
pub enum LoadErrorKind {
    /// The dynamic loader refused the file.
    #[error("not a loadable library: {0}")]
    NotALibrary(String),
    /// A library without our root module.
    #[error("not a commissaire plugin: no root module")]
    NoRootModule,
    /// Another major version of plugin-api.
    #[error("built against plugin-api {plugin}, this host speaks {host_major}.x")]
    IncompatibleApi {
        /// The plugin's plugin-api version.
        plugin: String,
        /// The host's major version.
        host_major: u32,
    },
    /// Another version of abi_stable or of the C ABI.
    #[error("built with an incompatible abi_stable or compiler ABI: {0}")]
    IncompatibleAbiStable(String),
    /// The root module's layout differs.
    #[error("root module mismatch: {0}")]
    RootMismatch(String),
    /// Built with `panic = "abort"`.
    #[error("built with panic=abort; build it with panic=unwind (the default) so that a panic in a handler cannot kill the worker")]
    PanicAbort,
    /// The plugin's view of the host callbacks differs from ours.
    #[error("host interface mismatch: {0}")]
    HostInterface(String),
    /// The plugin's entry points differ from ours.
    #[error("plugin interface mismatch: {0}")]
    PluginInterface(String),
    /// The plugin's method list is unreadable.
    #[error("unreadable method list: {0}")]
    BadMethods(String),
    /// The root module failed to initialise.
    #[error("failed to initialise: {0}")]
    Init(String),
    /// Someone other than root and the host's user can change the file or
    /// its path (see [`trust`]).
    #[error(transparent)]
    Untrusted(#[from] Untrusted),
    /// Two plugins export the same service.
    #[error("service `{service}` is also exported by {other}")]
    DuplicateService {
        /// The service name.
        service: String,
        /// The file that exported it first.
        other: String,
    },
}

/// A file that was refused, and why: one line.
#[derive(Debug, thiserror::Error)]
#[error("cannot load plugin {}: {kind}", path.display())]
pub struct LoadError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub kind: LoadErrorKind,
}

/// One parameter of a method, as recorded by `#[service]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamInfo {
    /// The argument name.
    pub name: String,
    /// The Rust type, as written.
    #[serde(rename = "type")]
    pub ty: String,
    /// Whether it may be left out.
    pub optional: bool,
}

/// One method of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MethodInfo {
    /// The bus method name.
    pub name: String,
    /// The handler's doc comment.
    pub doc: String,
    /// Its parameters, in order.
    pub params: Vec<ParamInfo>,
    /// The result type.
    pub returns: String,
    /// An `async fn` handler (plugin-api ≥ 1.5).
    #[serde(rename = "async", default, skip_serializing_if = "std::ops::Not::not")]
    pub is_async: bool,
}

impl MethodInfo {
    /// `add(x: i64, y: i64) -> i64`; `async sum(…) -> i64` for an async
    /// handler.
    pub fn signature(&self) -> String {
        let params: Vec<String> = self
            .params
            .iter()
            .map(|p| format!("{}: {}", p.name, p.ty))
            .collect();
        let kind = if self.is_async { "async " } else { "" };
        format!(
            "{kind}{}({}) -> {}",
            self.name,
            params.join(", "),
            self.returns
        )
    }
}

/// A loaded, checked plugin library.
#[derive(Clone)]
pub struct PluginLibrary {
    /// The file it came from.
    pub path: PathBuf,
    /// The service it exports.
    pub service_name: String,
    /// The plugin crate's version.
    pub plugin_version: String,
    /// The plugin-api version it was built against.
    pub api_version: String,
    /// The service's description (plugin-api ≥ 1.1).
    pub description: Option<String>,
    /// Its methods.
    pub methods: Vec<MethodInfo>,
    /// Its contract, an OpenRPC document (JSON text; plugin-api ≥ 1.6).
    pub contract: Option<String>,
    plugin: Plugin,
}

impl fmt::Debug for PluginLibrary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginLibrary")
            .field("path", &self.path)
            .field("service_name", &self.service_name)
            .field("plugin_version", &self.plugin_version)
            .field("api_version", &self.api_version)
            .finish_non_exhaustive()
    }
}

impl PluginLibrary {
    /// Loads and checks the plugin at `path`.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        Self::load_inner(path).map_err(|kind| LoadError {
            path: path.to_owned(),
            kind,
        })
    }

    /// Loads the plugin at `path` if `trust` trusts the file and its path
    /// (see [`trust`]).
    pub fn load_trusted(path: &Path, trust: Trust) -> Result<Self, LoadError> {
        if trust == Trust::OwnerOnly {
            trust::check(path, Kind::File, Owners::of_this_process()).map_err(|e| LoadError {
                path: path.to_owned(),
                kind: e.into(),
            })?;
        }
        Self::load(path)
    }

    fn load_inner(path: &Path) -> Result<Self, LoadErrorKind> {
        let header = lib_header_from_path(path).map_err(|e| match e {
            LibraryError::OpenError { err, .. } => {
                // dlerror() starts with the path, which the line already names.
                let text = err.to_string();
                let prefix = format!("{}: ", path.display());
                LoadErrorKind::NotALibrary(text.strip_prefix(&prefix).unwrap_or(&text).to_owned())
            }
            LibraryError::GetSymbolError { .. } => LoadErrorKind::NoRootModule,
            other => classify(other),
        })?;
        let root = header
            .init_root_module::<PluginRootRef>()
            .map_err(classify)?;
        let plugin = Plugin::check(root).map_err(|e| match e {
            CheckError::PanicAbort => LoadErrorKind::PanicAbort,
            CheckError::HostInterface(why) => LoadErrorKind::HostInterface(why),
            CheckError::PluginInterface(why) => LoadErrorKind::PluginInterface(why),
        })?;
        // Before anything runs in it (`init` logs too); plugins older than
        // plugin-api 1.2 have no logger to install.
        plugin.install_logger();

        let methods: Vec<MethodInfo> = serde_json::from_str(plugin.methods_json())
            .map_err(|e| LoadErrorKind::BadMethods(e.to_string()))?;
        Ok(Self {
            path: path.to_owned(),
            service_name: plugin.service_name().to_owned(),
            plugin_version: plugin.plugin_version().to_owned(),
            api_version: plugin.api_version().to_owned(),
            description: plugin
                .description()
                .filter(|d| !d.is_empty())
                .map(str::to_owned),
            methods,
            contract: plugin.contract().map(str::to_owned),
            plugin,
        })
    }

    /// Builds a service instance from its JSON config section.
    pub fn instantiate(&self, config: &serde_json::Value) -> Result<ServiceInstance, RpcError> {
        let instance = self.plugin.instantiate(&config.to_string())?;
        Ok(ServiceInstance { instance })
    }
}

/// One built service value inside a plugin, shared by concurrent calls.
#[derive(Debug)]
pub struct ServiceInstance {
    instance: commissaire_plugin_api::host::ServiceInstance,
}

impl ServiceInstance {
    /// Calls `method` with raw `params` JSON text (empty for none); returns
    /// the result's JSON text. Synchronous: run it where blocking is fine.
    pub fn call(
        &self,
        meta: RequestMeta<'_>,
        bus: &dyn HostBus,
        params: &str,
    ) -> Result<RString, RpcError> {
        self.instance.call(meta, bus, params)
    }

    /// Starts async handler `meta.method` on the plugin's runtime (its
    /// first poll on this thread with `poll_here`); the future is its
    /// result, and dropping it cancels the handler. `None`
    /// for a plugin built before async handlers (plugin-api 1.5).
    pub fn call_async(
        &self,
        meta: RequestMeta<'_>,
        bus: std::sync::Arc<dyn HostBus>,
        params: &str,
        poll_here: bool,
    ) -> Option<PendingCall> {
        self.instance.call_async(meta, bus, params, poll_here)
    }
}

/// Maps abi_stable's errors to one line; its layout dump goes to debug logs.
fn classify(e: LibraryError) -> LoadErrorKind {
    match e {
        LibraryError::IncompatibleVersionNumber { actual_version, .. } => {
            LoadErrorKind::IncompatibleApi {
                plugin: format!("{}.{}", actual_version.major, actual_version.minor),
                host_major: host_major(),
            }
        }
        LibraryError::InvalidAbiHeader(h) => LoadErrorKind::IncompatibleAbiStable(format!(
            "abi_stable {}.{}",
            h.abi_major, h.abi_minor
        )),
        LibraryError::InvalidCAbi { .. } => {
            LoadErrorKind::IncompatibleAbiStable("the C ABI check failed".into())
        }
        LibraryError::AbiInstability(details) => {
            tracing::debug!(%details, "root module layout mismatch");
            LoadErrorKind::RootMismatch(
                "layout differs from this host's (details at debug level)".into(),
            )
        }
        LibraryError::RootModule { err, .. } => LoadErrorKind::Init(err.to_string()),
        LibraryError::Many(errs) => match errs.into_iter().next() {
            Some(first) => classify(first),
            None => LoadErrorKind::Init("unknown error".into()),
        },
        other => LoadErrorKind::Init(other.to_string()),
    }
}

fn host_major() -> u32 {
    VersionNumber::new(abi_stable::sabi_types::VersionStrings::new(API_VERSION))
        .map(|v| v.major)
        .unwrap_or(1)
}

/// The outcome of loading a plugin directory.
#[derive(Debug, Default)]
pub struct PluginSet {
    /// Plugins that loaded, in file-name order.
    pub plugins: Vec<PluginLibrary>,
    /// Files that were refused.
    pub refused: Vec<LoadError>,
}

/// Why a plugin directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// It cannot be read.
    #[error("cannot read plugin directory {}", dir.display())]
    Unreadable {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Someone other than root and the host's user can change it.
    #[error("cannot use plugin directory {}: {why}", dir.display())]
    Untrusted {
        /// The directory.
        dir: PathBuf,
        /// Which path on its way, and why (one line, part of this one's).
        why: Untrusted,
    },
}

impl PluginSet {
    /// The library files in `dir` (`*.so`, the platform's extension),
    /// sorted, without loading them.
    pub fn plugin_files(dir: &Path) -> Result<Vec<PathBuf>, DirError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| DirError::Unreadable {
                dir: dir.to_owned(),
                source,
            })?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == std::env::consts::DLL_EXTENSION)
                    && p.is_file()
            })
            .collect();
        files.sort();
        Ok(files)
    }

    /// Loads every `*.so` (the platform's library extension) in `dir`. A
    /// refused file is recorded with its reason; a second plugin with an
    /// already-loaded service name is refused, naming the first file.
    ///
    /// As ssh does with keys, a directory or library that someone other
    /// than root and the host's user could change, on its real path up to
    /// `/`, is refused (see [`trust`]), unless `trust` says
    /// [`Trust::AnyPermissions`].
    pub fn load_dir(dir: &Path, trust: Trust) -> Result<Self, DirError> {
        // Listed first: a missing directory is said as such.
        let files = Self::plugin_files(dir)?;
        let owners = Owners::of_this_process();
        if trust == Trust::OwnerOnly {
            trust::check(dir, Kind::Directory, owners).map_err(|why| DirError::Untrusted {
                dir: dir.to_owned(),
                why,
            })?;
        }
        let mut set = PluginSet::default();
        let mut by_name: HashMap<String, PathBuf> = HashMap::new();
        for path in files {
            match PluginLibrary::load_trusted(&path, trust) {
                Ok(plugin) => {
                    if let Some(first) = by_name.get(&plugin.service_name) {
                        set.refused.push(LoadError {
                            path,
                            kind: LoadErrorKind::DuplicateService {
                                service: plugin.service_name,
                                other: first.display().to_string(),
                            },
                        });
                    } else {
                        by_name.insert(plugin.service_name.clone(), path);
                        set.plugins.push(plugin);
                    }
                }
                Err(e) => set.refused.push(e),
            }
        }
        Ok(set)
    }
}
