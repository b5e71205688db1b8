//! The plugin's own async runtime, where its async handlers run.
//!
//! A plugin links its own copy of tokio, which knows nothing of the host's
//! runtime: `tokio::time::sleep`, an async Redis or HTTP client, an etcd
//! client would find no reactor if the host polled the handler's future.
//! So the future never crosses the boundary: it runs here, on a runtime
//! this crate owns inside the plugin, and the host only hears when it is
//! done (an FFI-safe completion: a context pointer and a function).
//!
//! The cost, paid by a plugin with async handlers only and only from its
//! first async call: [`threads`] runtime threads (named
//! `<service>-async`), plus tokio's blocking pool for the sync handlers
//! an old or odd caller starts through `call_async`, idle threads of
//! which end after 10 s.

use std::sync::OnceLock;

use crate::RpcError;

/// The variable that sets the runtime's thread count.
pub const THREADS_VARIABLE: &str = "COMMISSAIRE_PLUGIN_THREADS";

/// The runtime's threads: `COMMISSAIRE_PLUGIN_THREADS` if set to a number
/// from 1 to 64, else the machine's CPUs, at most 4 (async handlers spend
/// their time waiting, not computing).
pub fn threads() -> usize {
    std::env::var(THREADS_VARIABLE)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| (1..=64).contains(n))
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(2, std::num::NonZeroUsize::get)
                .min(4)
        })
}

/// The runtime, started on first use; the error of its start, if that
/// failed (every async call then fails with it).
pub(crate) fn runtime(service: &str) -> Result<&'static tokio::runtime::Runtime, RpcError> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads())
                .thread_name(format!("{service}-async"))
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the async runtime of `{service}`: {e}"))
        })
        .as_ref()
        .map_err(|e| RpcError::internal_error(e.clone()))
}
