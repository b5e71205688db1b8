//! The stable ABI between the host and a plugin.
//!
//! Plugin authors never touch this module: `#[service]` generates the export
//! and [`crate::Message`] wraps the host interface. It is public because the
//! host is built against it too.
//!
//! # How it grows
//!
//! abi_stable refuses a library whose view of a prefix type has fewer fields
//! than the loader's, so a newer host would refuse every older plugin if the
//! growing tables were checked by abi_stable's loader. Hence:
//!
//! - [`PluginRoot`], the exported root module, is frozen: its fields never
//!   change within a major version.
//! - Everything that grows is a prefix-type vtable behind an
//!   `#[sabi(unsafe_opaque_field)]`: [`PluginVTable`] (the plugin's entry
//!   points) and [`HostVTable`] (the host's callbacks, which also serve the
//!   message's fields). The root carries the plugin's own view of both
//!   layouts; the host checks each with abi_stable's
//!   `check_layout_compatibility`, taking the side with fewer fields as the
//!   interface, so older and newer minor versions both load while a
//!   genuinely different type is refused.
//! - Fields are only appended after the `last_prefix_field` of 1.0; a field
//!   the other side lacks reads as `None`.
//!
//! History: 1.0 — the tables up to their `last_prefix_field`; 1.1 — host
//! callbacks `exchange` and `log`, plugin entry `description`.

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    marker_type::ErasedObject,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{ROption, RResult, RStr, RString},
    type_layout::TypeLayout,
    StableAbi,
};

/// The plugin-api version this ABI definition belongs to.
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The root module every plugin exports. Frozen for the whole 1.x series.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginRootRef)))]
#[sabi(missing_field(panic))]
pub struct PluginRoot {
    /// `false` when the plugin was compiled with `panic = "abort"`.
    pub panic_unwind: bool,
    /// The plugin's view of [`HostVTableRef`]'s layout.
    pub host_vtable_layout: &'static TypeLayout,
    /// The plugin's view of [`PluginVTableRef`]'s layout.
    pub plugin_vtable_layout: &'static TypeLayout,
    /// The plugin's entry points; only use after checking
    /// `plugin_vtable_layout`.
    #[sabi(last_prefix_field)]
    #[sabi(unsafe_opaque_field)]
    pub plugin: PluginVTableRef,
}

impl RootModule for PluginRootRef {
    declare_root_module_statics! {PluginRootRef}
    const BASE_NAME: &'static str = "commissaire_plugin";
    const NAME: &'static str = "commissaire plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// An opaque pointer to a service value owned by the plugin.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct ServiceHandle(pub *const ErasedObject);

// SAFETY: a service handle points at a value the plugin built from a type
// that `#[service]` requires to be `Send + Sync`.
unsafe impl Send for ServiceHandle {}
// SAFETY: see `Send`.
unsafe impl Sync for ServiceHandle {}

/// A JSON-RPC error as it crosses the boundary.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct RpcErrorAbi {
    /// The JSON-RPC error code.
    pub code: i64,
    /// A human-readable message.
    pub message: RString,
    /// Optional JSON text of the error's `data`.
    pub data_json: ROption<RString>,
}

/// What a handler call returns: the result's JSON text, or an error.
pub type CallResult = RResult<RString, RpcErrorAbi>;

/// Everything a call hands to the plugin about the host and the message.
#[repr(C)]
#[derive(StableAbi)]
pub struct CallCtx<'a> {
    /// The host's callbacks; checked at load time via
    /// [`PluginRoot::host_vtable_layout`].
    #[sabi(unsafe_opaque_field)]
    pub host: HostVTableRef,
    /// The host's per-call data, passed back to every callback.
    pub data: &'a ErasedObject,
}

/// The plugin's entry points.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginVTableRef)))]
pub struct PluginVTable {
    /// The plugin-api version the plugin was built against.
    pub api_version: RStr<'static>,
    /// The bus name of the service, e.g. `simple`.
    pub service_name: RStr<'static>,
    /// The plugin crate's own version.
    pub plugin_version: RStr<'static>,
    /// JSON array describing each method: name, doc, params, returns.
    pub methods_json: RStr<'static>,
    /// Builds the service from its JSON config section.
    pub new_service: extern "C" fn(config_json: RStr<'_>) -> RResult<ServiceHandle, RpcErrorAbi>,
    /// Drops a service built by `new_service`.
    pub drop_service: extern "C" fn(service: ServiceHandle),
    /// Calls method `method` with the JSON text `params` (empty when the
    /// request had none). Never unwinds: a panic becomes a -32603 error.
    #[sabi(last_prefix_field)]
    pub call: for<'a> extern "C" fn(
        service: ServiceHandle,
        ctx: &CallCtx<'a>,
        method: RStr<'a>,
        params: RStr<'a>,
    ) -> CallResult,
    /// (1.1) The service's description: the doc comment of its `impl`.
    pub description: RStr<'static>,
}

/// Log levels of [`HostVTable::log`].
pub mod log_level {
    /// Error.
    pub const ERROR: u8 = 1;
    /// Warning.
    pub const WARN: u8 = 2;
    /// Information.
    pub const INFO: u8 = 3;
    /// Debug.
    pub const DEBUG: u8 = 4;
}

/// The host's callbacks. Every function takes the `data` of the [`CallCtx`].
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = HostVTableRef)))]
pub struct HostVTable {
    /// The request's routing key.
    pub routing_key: for<'a> extern "C" fn(&'a ErasedObject) -> RStr<'a>,
    /// The request's method.
    pub method: for<'a> extern "C" fn(&'a ErasedObject) -> RStr<'a>,
    /// The request's id as JSON text (`null` when it had none).
    pub id_json: for<'a> extern "C" fn(&'a ErasedObject) -> RStr<'a>,
    /// The queue the caller waits on, if any.
    pub reply_to: for<'a> extern "C" fn(&'a ErasedObject) -> ROption<RStr<'a>>,
    /// The request's correlation id, if any.
    pub correlation_id: for<'a> extern "C" fn(&'a ErasedObject) -> ROption<RStr<'a>>,
    /// Whether the broker delivered this request before.
    pub redelivered: extern "C" fn(&ErasedObject) -> bool,
    /// Sends a request and waits for its reply; returns the result's JSON
    /// text. `timeout_ms == 0` means the host's default.
    pub request: for<'a> extern "C" fn(
        &'a ErasedObject,
        routing_key: RStr<'a>,
        params_json: RStr<'a>,
        timeout_ms: u64,
    ) -> CallResult,
    /// Sends a notification.
    pub notify: for<'a> extern "C" fn(
        &'a ErasedObject,
        routing_key: RStr<'a>,
        params_json: RStr<'a>,
    ) -> RResult<(), RpcErrorAbi>,
    /// Sends a result to a queue, outside the request/reply cycle.
    #[sabi(last_prefix_field)]
    pub respond: for<'a> extern "C" fn(
        &'a ErasedObject,
        queue: RStr<'a>,
        id_json: RStr<'a>,
        result_json: RStr<'a>,
    ) -> RResult<(), RpcErrorAbi>,
    /// (1.1) The exchange the request came through.
    pub exchange: for<'a> extern "C" fn(&'a ErasedObject) -> RStr<'a>,
    /// (1.1) Emits a log event through the host's logger, tagged with the
    /// service, method and request id.
    pub log: for<'a> extern "C" fn(&'a ErasedObject, level: u8, message: RStr<'a>),
}

/// The layout of [`HostVTableRef`] as this crate sees it.
pub const HOST_VTABLE_LAYOUT: &TypeLayout = <HostVTableRef as StableAbi>::LAYOUT;
/// The layout of [`PluginVTableRef`] as this crate sees it.
pub const PLUGIN_VTABLE_LAYOUT: &TypeLayout = <PluginVTableRef as StableAbi>::LAYOUT;
