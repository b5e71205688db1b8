//! Write Commissaire bus services as plugins for `commissaire-host`.
//!
//! A plugin is a `cdylib` crate that depends on this crate only:
//!
//! ```ignore
//! use commissaire_plugin_api::prelude::*;
//!
//! #[derive(Default)]
//! pub struct Simple;
//!
//! #[service(name = "simple")]
//! impl Simple {
//!     /// Adds two integers.
//!     fn on_add(&self, _msg: &Message, x: i64, y: i64) -> Result<i64, RpcError> {
//!         Ok(x + y)
//!     }
//! }
//! ```
//!
//! - Every `fn on_<name>(&self, msg: &Message, args…) -> Result<T, RpcError>`
//!   is exposed as bus method `<name>`, like `on_<method>` in a Python
//!   `CommissaireService`. Arguments are any `Deserialize` types, filled
//!   from a JSON array by position or from a JSON object by name; `Option`
//!   arguments may be left out. `T` is any `Serialize` type.
//! - The service is built once per worker, by `Default` or by an
//!   `fn init(config: Value) -> Result<Self, RpcError>` in the same `impl`,
//!   which receives the service's `config` table from the host's config.
//!   Concurrent calls share it, so it must be `Send + Sync`.
//! - [`Message`] tells the handler about its request and gives it the bus
//!   ([`Message::bus`]) to call other services.
//! - A panic in a handler becomes a -32603 reply. Do not build plugins with
//!   `panic = "abort"`: the host refuses them.
//! - One `#[service]` per plugin crate.
//! - [`testing::TestService`] calls your handlers in your own tests.

#![warn(missing_docs)]

pub mod abi;
mod error;
pub mod export;
pub mod host;
mod message;
pub mod params;
pub mod testing;

pub use commissaire_plugin_api_macros::service;
pub use error::RpcError;
pub use message::{Bus, Message};

/// The serde crate, for `#[derive(Deserialize)]` on your own argument types
/// (`#[serde(crate = "commissaire_plugin_api::serde")]`).
pub use serde;
/// The serde_json crate.
pub use serde_json;

/// Everything a plugin author needs.
pub mod prelude {
    pub use crate::serde_json::{self, json, Value};
    pub use crate::{service, Bus, Message, RpcError};
}

/// Used by the code `#[service]` generates. Not part of the stable API.
#[doc(hidden)]
pub mod __private {
    pub use crate::export::{encode_result, Exports, ParsedArgs, ServiceImpl};
    pub use abi_stable;
    pub use serde_json;

    /// Exports the root module of service type `S` under abi_stable's
    /// loader symbol.
    pub const fn lib_header(
        loader: extern "C" fn() -> abi_stable::library::RootModuleResult,
    ) -> abi_stable::library::LibHeader {
        // SAFETY: `loader` returns the root module of type `PluginRootRef`,
        // the type given here.
        unsafe {
            abi_stable::library::LibHeader::from_constructor::<crate::abi::PluginRootRef>(
                loader,
                abi_stable::library::CheckTypeLayout::Yes,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn api_version_is_the_crate_version() {
        assert_eq!(crate::abi::API_VERSION, env!("CARGO_PKG_VERSION"));
    }
}
