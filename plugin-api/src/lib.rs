//! Write Commissaire bus services as plugins for `commissaire-host`.
//!
//! This is the plugin author's guide. A plugin is a crate built as a
//! `cdylib` (the library the host loads) and an `rlib` (so that its own
//! tests can link it). Start from `examples/plugin-template/` in the
//! commissaire-host repository: copy the directory, change the one
//! `path = "../../plugin-api"` line of its `Cargo.toml` (to a path to this
//! crate, or to `{ git = "<repository URL>", tag = "<release>" }`, since
//! the crate is not on crates.io), rename the service, build.
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib", "rlib"]
//!
//! [dependencies]
//! commissaire-plugin-api = { path = "../../plugin-api" }
//! # Only for your own argument types: `#[derive(Deserialize)]` needs
//! # `serde` as a direct dependency, `#[derive(JsonSchema)]` (their schema
//! # in the service's contract) `schemars`.
//! serde = { version = "1", features = ["derive"] }
//! schemars = "1"
//! ```
//!
//! # A service
//!
//! ```
//! use commissaire_plugin_api::prelude::*;
//! use schemars::JsonSchema;
//! use serde::Deserialize;
//!
//! /// Keeps an inventory of hosts. (This doc comment is the service's
//! /// description in `commissaire-host plugins`.)
//! pub struct Inventory {
//!     default_port: u16,
//! }
//!
//! /// A host, as callers send it: `{"address": "10.0.0.1", "port": 22}`.
//! #[derive(Debug, Deserialize, JsonSchema)]
//! pub struct Host {
//!     address: String,
//!     port: Option<u16>,
//! }
//!
//! /// Keeps an inventory of hosts.
//! #[service(name = "inventory")]
//! impl Inventory {
//!     /// Builds the service from the `config` table of its `[[service]]`
//!     /// entry in the host's configuration (`Value::Null` when absent).
//!     fn init(config: Value) -> Result<Self, RpcError> {
//!         let default_port = match config.get("default_port") {
//!             None => 22,
//!             Some(port) => serde_json::from_value(port.clone())?,
//!         };
//!         tracing::info!(default_port, "inventory starting");
//!         Ok(Self { default_port })
//!     }
//!
//!     /// Describes a host. Bus method `describe`; arguments by position
//!     /// (`[{"address": …}]`) or by name (`{"host": {"address": …}}`).
//!     fn on_describe(&self, host: Host) -> Result<String, RpcError> {
//!         let port = host.port.unwrap_or(self.default_port);
//!         Ok(format!("{}:{port}", host.address))
//!     }
//!
//!     /// Reads the file of a host. `?` turns the I/O error into -32603 with
//!     /// its text.
//!     fn on_notes(&self, address: String) -> std::io::Result<String> {
//!         std::fs::read_to_string(format!("/var/lib/inventory/{address}.txt"))
//!     }
//!
//!     /// Takes the message to see who asked and to use the bus.
//!     #[rpc_error(-20000, "the registry is empty")]
//!     fn on_check(&self, msg: &Message, address: String) -> Result<bool, RpcError> {
//!         tracing::debug!(%address, reply_to = ?msg.reply_to(), "checking");
//!         let known: Vec<String> = msg.bus().request("registry.list_hosts", json!([]))?;
//!         if known.is_empty() {
//!             return Err(RpcError::new(-20000, "the registry is empty")
//!                 .with_data(json!({"address": address})));
//!         }
//!         Ok(known.contains(&address))
//!     }
//! }
//!
//! // Its own tests, with no host and no broker:
//! use commissaire_plugin_api::testing::TestService;
//!
//! let svc = TestService::<Inventory>::with_config(json!({"default_port": 2222}))?
//!     .with_route("registry.*", |_method, _params| Ok(json!(["10.0.0.1"])));
//! assert_eq!(svc.call("describe", json!([{"address": "10.0.0.2"}])), Ok(json!("10.0.0.2:2222")));
//! assert_eq!(svc.call("check", json!({"address": "10.0.0.1"})), Ok(json!(true)));
//! assert_eq!(svc.call("describe", json!([])).unwrap_err().code, RpcError::INVALID_PARAMS);
//! # Ok::<(), RpcError>(())
//! ```
//!
//! # Handlers
//!
//! - Every `fn on_<name>` of the `#[service]` `impl` is bus method `<name>`,
//!   like `on_<method>` in a Python `CommissaireService`. It takes `&self`,
//!   then optionally `msg: &Message` (recognised by its type; any other
//!   reference there is a compile error), then its arguments.
//! - Arguments are owned `Deserialize` types (`String`, not `&str`),
//!   filled from a JSON array by position or from a JSON object by name;
//!   `Option` arguments may be left out. A mismatch is answered with
//!   -32602 naming the argument. An integer takes a float with no
//!   fractional part (`2.0`) as that integer, as JSON Schema does. Your own
//!   types need `serde` as a direct dependency for `#[derive(Deserialize)]`.
//! - It returns `Result<T, E>`: `T` any `Serialize` type, `E` any error that
//!   converts into [`RpcError`]. Return an `RpcError` for a code of your
//!   choice (it reaches the caller untouched); `std::io::Error`,
//!   `serde_json::Error`, `Box<dyn Error + Send + Sync>` and, with the
//!   `anyhow` feature, `anyhow::Error` become -32603 carrying the error's
//!   text: **the caller sees that text**.
//! - A panic in a handler becomes a -32603 reply, and the service goes on.
//!   Do not build plugins with `panic = "abort"`: the host refuses them.
//!
//! # Async handlers
//!
//! A handler may be an `async fn`, beside sync ones in the same `impl`,
//! with the same arguments, `msg: &Message`, errors and `?`. Await I/O in
//! it instead of blocking: [`Bus::request_async`] for another service,
//! and any tokio-based library (an HTTP, Redis or etcd client,
//! `tokio::time::sleep` with tokio's `time` feature in your own
//! `Cargo.toml`) for the rest. No thread waits while it does.
//!
//! ```
//! # use commissaire_plugin_api::prelude::*;
//! # #[derive(Default)] pub struct Inventory;
//! # #[service(name = "inventory")]
//! # impl Inventory {
//! /// Counts the hosts the registry knows, asking it over the bus.
//! async fn on_count(&self, msg: &Message, pattern: String) -> Result<usize, RpcError> {
//!     let hosts: Vec<String> = msg.bus().request_async("registry.list_hosts", [&pattern]).await?;
//!     Ok(hosts.len())
//! }
//! # }
//! ```
//!
//! Use them for handlers that wait (on other services, on a database, on
//! the network); a handler that computes is as well sync. Inside an
//! `async fn`, never block the thread (`std::thread::sleep`, a blocking
//! client, a long loop): the watchdog answers its caller at
//! `handler_timeout`, but cannot cancel it, and recycles the worker once
//! the grace period is over, as for a hung sync handler. Its future must be
//! `Send` (no `Rc` or `MutexGuard` held across an `.await`).
//!
//! How it runs: a plugin's copy of tokio is not the host's, so an async
//! handler's future is never polled by the host. It runs on a runtime this
//! crate owns inside the plugin (so libraries find their reactor and
//! timers there), and the host awaits an FFI-safe completion with no
//! thread of its own. At `handler_timeout` the host drops the future
//! (cancelling the handler at its current `.await`) and answers -32603,
//! and the slot is free at once. The cost, for a plugin with async
//! handlers only, from its first async call: [`runtime::threads`] threads
//! (`COMMISSAIRE_PLUGIN_THREADS`; by default the CPUs, at most 4) per
//! worker, and a few microseconds per call for the hand-over between the
//! two runtimes. A service's `concurrency` still bounds how many requests
//! a worker takes at once; for async handlers it can be set high
//! (hundreds), since a waiting one costs only its future's memory.
//!
//! A host older than plugin-api 1.5 runs an async handler to its end on its
//! own handler thread (blocking it), and [`Bus::request_async`] waits there
//! as [`Bus::request`] does: the plugin still works, only without the gain.
//! `commissaire-host plugins` lists async handlers as `async name(…)`;
//! [`testing::TestService`] runs them as the host does.
//!
//! Known limits: an async handler's `tracing` events carry the service but
//! not the method and request id (they are emitted on the plugin's
//! threads, not in the host's call; [`Message::log_info`] and its siblings
//! carry them); and when a service's every slot holds an async handler
//! waiting on another service that calls back into it (A → B → A), the
//! call back waits in the broker: only calls to the service itself let it
//! take more deliveries, so give such a service a `concurrency` above the
//! calls it may have in flight.
//!
//! # Contracts
//!
//! Every service describes itself: `#[service]` writes its contract, an
//! [OpenRPC](https://spec.open-rpc.org) 1.3 document, from what it already
//! sees. Callers get it from the running deployment (the host answers
//! `<service>.rpc_discover`; `commissaire-host describe inventory`), the
//! HTTP endpoint serves it at `/openrpc.json`, `commissaire-host plugins
//! DIR --openrpc` prints it offline, and a SIGHUP roll refuses a new
//! version whose contract would break the callers of the running one.
//!
//! - **Methods** are the `on_<name>` handlers, with the doc comment as
//!   `description` (its first sentence as `summary`), `x-async` for an
//!   `async fn`.
//! - **Arguments** keep their names and positions; an `Option` is not
//!   `required`. Each has the JSON Schema of its type (draft 7), from
//!   [`schemars`]: the standard types have one, and your own types get
//!   one with `#[derive(JsonSchema)]` beside `Deserialize` (shared
//!   definitions go to `components.schemas`). A type without one is "any
//!   value" in the contract, and the build says so with a warning at the
//!   argument; it never fails.
//! - **The result** is the schema of the `Ok` type.
//! - **Errors** a handler answers with on purpose are declared above it,
//!   one `#[rpc_error(CODE, "message")]` each, as on `check` above.
//! - **`#[notification]`** above a handler says callers send it no
//!   `reply_to` and expect no result: the contract has no `result` for it.
//!
//! [`testing::TestService::contract`] returns the document in your tests.
//! `rpc_discover` is the host's: a handler of that name is refused.
//! Hosts older than plugin-api 1.6 ignore the contract; this host derives
//! one (names and which arguments are optional, every type "any") for
//! plugins built before it.
//!
//! # The service value
//!
//! Built once per worker, by `Default` or by an
//! `fn init(config: Value) -> Result<Self, E>` in the same `impl`, which
//! receives the service's `config` table from the host's configuration.
//! Concurrent calls share it, so it must be `Send + Sync` (use a `Mutex`
//! or atomics for state). One `#[service]` per plugin crate.
//!
//! # The message and the bus
//!
//! [`Message`] tells the handler its routing key, method, id, `reply_to`,
//! correlation id and whether it was redelivered, and gives it the bus:
//! [`Bus::request`] (the host's default timeout),
//! [`Bus::request_with_timeout`], their awaitable [`Bus::request_async`]
//! and [`Bus::request_async_with_timeout`] (hosts from 1.5, for async
//! handlers), [`Bus::notify`] and [`Bus::respond`],
//! like Commissaire's `BusMixin`, and [`Bus::publish`] (hosts from 1.4) for
//! a body of your own that is not a JSON-RPC message, as Commissaire
//! services announced events.
//!
//! # Logging
//!
//! Use [`tracing`] (re-exported here; or your own dependency on it) as
//! anywhere else: `tracing::info!(count, "refreshed")`. The plugin's events,
//! and the `log` records of its dependencies, become events of the host
//! process at their level and with their target, inside a span naming the
//! service (and the method and request id while a handler runs), so that
//! the host's `COMMISSAIRE_LOG` filters them like its own
//! (`COMMISSAIRE_LOG=info,inventory=debug`). Events from `init` and from
//! threads the plugin starts arrive too. Levels the host does not record
//! are dropped in the plugin at the cost of a comparison. This needs a host
//! of plugin-api 1.2 or newer; [`Message::log_info`] and its siblings also
//! work on 1.1 hosts.
//!
//! # Tracing across services
//!
//! Every request has a W3C trace context: the caller's `traceparent`, or a
//! new trace. [`Message::trace_id`] is the id every service's log lines
//! carry for it (`trace_id=…`), and [`Message::traceparent`] the header to
//! pass on to anything else the handler calls (an HTTP API, say). The
//! handler's own [`Bus`] calls carry it already. Hosts from plugin-api 1.3.
//!
//! # Deadlines
//!
//! A request has a deadline: its caller's (the `deadline` a caller sent),
//! or its arrival plus the service's `handler_timeout`, whichever comes
//! first. [`Message::deadline`] and [`Message::remaining`] tell it; the
//! handler's own [`Bus`] requests wait no longer and carry it on, so a call
//! chain gives up together. Bound any slow work of your own by it too.
//! Hosts from plugin-api 1.4.
//!
//! # Testing
//!
//! [`testing::TestService`] calls your handlers in your own `cargo test`,
//! through the same exported entry point and JSON path the host uses.
//!
//! # Compatibility
//!
//! A plugin built against 1.x loads in every 1.y host, older or newer: what
//! an older host lacks reads as absent (`msg.exchange()` is `None`, a newer
//! bus call answers -32000) instead of crashing.

#![deny(missing_docs)]

// `#[service]` names this crate by its path, also in its own tests.
#[cfg(test)]
extern crate self as commissaire_plugin_api;

mod abi;
mod contract;
mod error;
mod export;
#[doc(hidden)]
pub mod host;
mod host_log;
mod message;
mod params;
mod plugin_log;
pub mod runtime;
pub mod testing;

/// Turns an `impl` block's `on_<method>` functions into the bus methods of
/// a plugin, and exports the plugin. See [the crate docs](crate) for the
/// handler rules.
///
/// ```
/// use commissaire_plugin_api::prelude::*;
///
/// #[derive(Default)]
/// pub struct Simple;
///
/// /// Adds numbers.
/// #[service(name = "simple")]
/// impl Simple {
///     /// Adds two integers.
///     fn on_add(&self, x: i64, y: i64) -> Result<i64, RpcError> {
///         x.checked_add(y).ok_or_else(|| RpcError::invalid_params("overflow"))
///     }
/// }
/// ```
///
/// Only `&Message` may come right after `&self`; arguments are owned:
///
/// ```compile_fail
/// # use commissaire_plugin_api::prelude::*;
/// # #[derive(Default)] pub struct Simple;
/// #[service(name = "simple")]
/// impl Simple {
///     fn on_shout(&self, word: &str) -> Result<String, RpcError> {
///         Ok(word.to_uppercase())
///     }
/// }
/// ```
///
/// A handler's error type must convert into [`RpcError`]:
///
/// ```compile_fail
/// # use commissaire_plugin_api::prelude::*;
/// # #[derive(Default)] pub struct Simple;
/// #[service(name = "simple")]
/// impl Simple {
///     fn on_parse(&self, text: String) -> Result<i64, std::num::ParseIntError> {
///         text.parse()
///     }
/// }
/// ```
pub use commissaire_plugin_api_macros::service;
pub use error::RpcError;
pub use message::{Bus, Message};

/// The method every service answers with its contract (see
/// [Contracts](crate#contracts)).
pub use contract::{DISCOVER_METHOD, OPENRPC_VERSION};
/// The schemars crate the contract's schemas come from: derive
/// [`JsonSchema`](schemars::JsonSchema) on your own argument and result
/// types (depending on `schemars = "1"` directly, as for `serde`) and
/// they are described in the service's contract.
pub use schemars;
/// The serde crate this API is built with. To derive `Deserialize` on your
/// own argument types, depend on `serde` directly (its derive refers to the
/// `serde` crate by name).
pub use serde;
/// The serde_json crate, for [`Value`](serde_json::Value) and
/// [`json!`](serde_json::json).
pub use serde_json;
/// The tokio crate whose runtime runs this plugin's async handlers (see
/// [Async handlers](crate#async-handlers)); a plugin may depend on
/// `tokio` 1.x directly instead, which is the same crate.
pub use tokio;
/// The tracing crate: its events in a plugin reach the host's log (see
/// [Logging](crate#logging)).
pub use tracing;

/// Everything a handler usually needs: `use commissaire_plugin_api::prelude::*;`.
pub mod prelude {
    pub use crate::serde_json::{self, json, Value};
    pub use crate::tracing;
    pub use crate::{service, Bus, Message, RpcError};
}

/// Used by the code `#[service]` generates. Not part of the stable API.
#[doc(hidden)]
pub mod __private {
    pub use crate::export::{
        block_on, boxed, encode_result, lib_header, HandlerFuture, ServiceImpl,
    };
    pub use crate::params::Args as ParsedArgs;
    /// The contract's builder (see `contract.rs`).
    pub mod contract {
        pub use crate::contract::{
            ContractBuilder, Described, MethodSpec, Probe, Undescribed, DISCOVER_METHOD,
        };
    }
    pub use abi_stable::library::LibHeader;
    pub use serde_json;

    /// Turns a handler's error into the `RpcError` it answers with; named
    /// here so that a type that does not convert is reported at the
    /// handler's return type.
    pub fn into_rpc_error<E: Into<crate::RpcError>>(e: E) -> crate::RpcError {
        e.into()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn api_version_is_the_crate_version() {
        assert_eq!(crate::abi::API_VERSION, env!("CARGO_PKG_VERSION"));
    }
}
