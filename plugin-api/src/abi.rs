//! The stable ABI between the host and a plugin.
//!
//! Private: plugin authors reach it through `#[service]` and [`crate::Message`],
//! the host through the safe wrappers of [`crate::host`]. Every field is
//! `pub(crate)` because the function pointers carry unsafe contracts (a
//! service handle must be live, a call's data must be the host's) that the
//! types cannot express without changing the frozen layouts: the host checks
//! function qualifiers, so a 1.0 `extern "C" fn` field cannot become an
//! `unsafe extern "C" fn` within 1.x. Field visibility is not part of the
//! layout, so hiding them changes nothing on the wire.
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
//! callbacks `exchange` and `log`, plugin entry `description`; 1.2 — plugin
//! entry `set_host_logger` (the host's log sink and level, for `tracing` and
//! `log` in plugins). In 1.2 a `request` timeout of 0 still means the host's
//! default (1.1 plugins send it); 1.2 plugins send at least 1 ms for an
//! explicit timeout. 1.3 — host callback `traceparent` (W3C trace context).
//! 1.4 — host callbacks `publish` (a raw body, not a JSON-RPC envelope)
//! and `deadline` (when the request's caller stops waiting). 1.5 — async
//! handlers: plugin entries `call_async` and `end_async`, host callback
//! `request_async`, all completing through a [`Completion`]. 1.6 — plugin
//! entry `contract` (the service's OpenRPC document).

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
pub(crate) const API_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The root module every plugin exports. Frozen for the whole 1.x series.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginRootRef)))]
#[sabi(missing_field(panic))]
pub struct PluginRoot {
    /// `false` when the plugin was compiled with `panic = "abort"`.
    pub(crate) panic_unwind: bool,
    /// The plugin's view of [`HostVTableRef`]'s layout.
    pub(crate) host_vtable_layout: &'static TypeLayout,
    /// The plugin's view of [`PluginVTableRef`]'s layout.
    pub(crate) plugin_vtable_layout: &'static TypeLayout,
    /// The plugin's entry points; only use after checking
    /// `plugin_vtable_layout`.
    #[sabi(last_prefix_field)]
    #[sabi(unsafe_opaque_field)]
    pub(crate) plugin: PluginVTableRef,
}

impl RootModule for PluginRootRef {
    declare_root_module_statics! {PluginRootRef}
    const BASE_NAME: &'static str = "commissaire_plugin";
    const NAME: &'static str = "commissaire plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// An opaque pointer to a service value owned by the plugin: made by
/// `new_service`, valid until passed to `drop_service`. Only this crate
/// makes or uses one; the host holds it inside
/// [`crate::host::ServiceInstance`], which drops it once.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct ServiceHandle(pub(crate) *const ErasedObject);

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
    pub(crate) code: i64,
    /// A human-readable message.
    pub(crate) message: RString,
    /// Optional JSON text of the error's `data`.
    pub(crate) data_json: ROption<RString>,
}

/// What a handler call returns: the result's JSON text, or an error.
pub(crate) type CallResult = RResult<RString, RpcErrorAbi>;

/// (1.5) How the other side learns that an asynchronous operation ended:
/// `done(data, result)`, called exactly once, from any thread. No future
/// crosses the boundary (the two sides' `std` and tokio may differ), only
/// this pair: the side that started the operation owns `data` and frees
/// it in `done`.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct Completion {
    /// The starting side's state for this operation.
    pub(crate) data: *const ErasedObject,
    /// Delivers the result and releases `data`.
    pub(crate) done: extern "C" fn(data: *const ErasedObject, result: CallResult),
}

// SAFETY: `done` may be called from any thread by contract, and `data` is
// only ever passed back to it; each side builds its `data` from `Send`
// state.
unsafe impl Send for Completion {}

/// (1.5) The plugin's handle on one async call, made by `call_async` and
/// given back to `end_async` exactly once; null when the call completed
/// before it could start.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct AsyncHandle(pub(crate) *const ErasedObject);

// SAFETY: the handle points at a tokio `AbortHandle`, which is `Send` and
// `Sync`.
unsafe impl Send for AsyncHandle {}
// SAFETY: see `Send`.
unsafe impl Sync for AsyncHandle {}

/// Everything a call hands to the plugin about the host and the message.
/// Only the host half of this crate builds one, around data of its own.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct CallCtx<'a> {
    /// The host's callbacks; checked at load time via
    /// [`PluginRoot::host_vtable_layout`].
    #[sabi(unsafe_opaque_field)]
    pub(crate) host: HostVTableRef,
    /// The host's per-call data, passed back to every callback.
    pub(crate) data: &'a ErasedObject,
}

// SAFETY: the host half builds a `CallCtx` only around data whose parts
// are `Sync` (`&str`s, `&dyn HostBus` / `Arc<dyn HostBus>`, and `HostBus`
// is `Send + Sync`) and whose callbacks take `&` only, so they may be
// called from any thread while the data lives; the vtable is static. An
// async handler's future holds its `Message` across `.await`s and moves
// between the plugin runtime's threads.
unsafe impl Send for CallCtx<'_> {}
// SAFETY: see `Send`.
unsafe impl Sync for CallCtx<'_> {}

impl CallCtx<'_> {
    /// This context with its data's lifetime extended, for an async call.
    ///
    /// # Safety
    ///
    /// The result must not be used after the host frees the data, which it
    /// does when the call's `done` is called.
    pub(crate) unsafe fn extended(&self) -> CallCtx<'static> {
        CallCtx {
            host: self.host,
            // SAFETY: the caller keeps the data's real lifetime.
            data: unsafe { &*std::ptr::from_ref(self.data) },
        }
    }
}

/// The plugin's entry points.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginVTableRef)))]
pub struct PluginVTable {
    /// The plugin-api version the plugin was built against.
    pub(crate) api_version: RStr<'static>,
    /// The bus name of the service, e.g. `simple`.
    pub(crate) service_name: RStr<'static>,
    /// The plugin crate's own version.
    pub(crate) plugin_version: RStr<'static>,
    /// JSON array describing each method: name, doc, params, returns.
    pub(crate) methods_json: RStr<'static>,
    /// Builds the service from its JSON config section.
    pub(crate) new_service:
        extern "C" fn(config_json: RStr<'_>) -> RResult<ServiceHandle, RpcErrorAbi>,
    /// Drops a service built by `new_service`. Contract: called once per
    /// handle, after the last `call` with it.
    pub(crate) drop_service: extern "C" fn(service: ServiceHandle),
    /// Calls method `method` with the JSON text `params` (empty when the
    /// request had none). Never unwinds: a panic becomes a -32603 error.
    /// Contract: `service` is live and `ctx` was built by the host half.
    #[sabi(last_prefix_field)]
    pub(crate) call: for<'a> extern "C" fn(
        service: ServiceHandle,
        ctx: &CallCtx<'a>,
        method: RStr<'a>,
        params: RStr<'a>,
    ) -> CallResult,
    /// (1.1) The service's description: the doc comment of its `impl`.
    pub(crate) description: RStr<'static>,
    /// (1.2) Hands the plugin the host's log sink and the most verbose
    /// level the host records; called at load, before `new_service`, and
    /// again on a later load of the same library.
    pub(crate) set_host_logger: extern "C" fn(logger: HostLogger),
    /// (1.5) Starts async method `method` on the plugin's own runtime and
    /// returns at once; `done` gets its result (or a -32603 when it was
    /// cancelled) once the handler's future is gone. With `poll_here`, the
    /// future is first polled on the calling thread (in the runtime's
    /// context), so that a handler with nothing to wait for ends there and
    /// `done` is called before this returns. Any other method is answered
    /// -32601 at once. Contract: `service` is live, and `ctx.data` stays
    /// valid until `done` is called.
    pub(crate) call_async: for<'a> extern "C" fn(
        service: ServiceHandle,
        ctx: &CallCtx<'a>,
        method: RStr<'a>,
        params: RStr<'a>,
        poll_here: bool,
        done: Completion,
    ) -> AsyncHandle,
    /// (1.5) Releases the handle of an async call; with `cancel`, drops
    /// its future first if it still runs (its `done` then follows).
    pub(crate) end_async: extern "C" fn(handle: AsyncHandle, cancel: bool),
    /// (1.6) The service's contract: its OpenRPC document as JSON text,
    /// built at the first call and kept; empty when it could not be built.
    pub(crate) contract: extern "C" fn() -> RStr<'static>,
}

/// Log levels as they cross the boundary.
pub(crate) mod log_level {
    /// Nothing is recorded (a maximum level only).
    pub(crate) const OFF: u8 = 0;
    /// Error.
    pub(crate) const ERROR: u8 = 1;
    /// Warning.
    pub(crate) const WARN: u8 = 2;
    /// Information.
    pub(crate) const INFO: u8 = 3;
    /// Debug.
    pub(crate) const DEBUG: u8 = 4;
    /// Trace (1.2).
    pub(crate) const TRACE: u8 = 5;

    /// The boundary form of a `tracing` level.
    pub(crate) fn from_tracing(level: tracing::Level) -> u8 {
        match level {
            tracing::Level::ERROR => ERROR,
            tracing::Level::WARN => WARN,
            tracing::Level::INFO => INFO,
            tracing::Level::DEBUG => DEBUG,
            _ => TRACE,
        }
    }

    /// The boundary form of a `tracing` level filter.
    pub(crate) fn from_filter(filter: tracing::level_filters::LevelFilter) -> u8 {
        filter.into_level().map_or(OFF, from_tracing)
    }

    /// The `tracing` level of a boundary level; `None` for `OFF`. Anything
    /// above `TRACE` is trace.
    pub(crate) fn to_tracing(level: u8) -> Option<tracing::Level> {
        match level {
            OFF => None,
            ERROR => Some(tracing::Level::ERROR),
            WARN => Some(tracing::Level::WARN),
            INFO => Some(tracing::Level::INFO),
            DEBUG => Some(tracing::Level::DEBUG),
            _ => Some(tracing::Level::TRACE),
        }
    }
}

/// (1.2) The host's log sink, handed to the plugin at load.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct HostLogger {
    /// The most verbose level the host records (`log_level`; `OFF` for
    /// none). The plugin drops anything more verbose without calling `log`.
    pub(crate) max_level: u8,
    /// Records one event. Callable from any thread, at any time after
    /// load; never unwinds.
    pub(crate) log: for<'a> extern "C" fn(record: &'a LogRecord<'a>),
}

/// (1.2) One log event of a plugin.
#[repr(C)]
#[derive(StableAbi)]
pub struct LogRecord<'a> {
    /// Its level (`log_level`).
    pub(crate) level: u8,
    /// The plugin's service name.
    pub(crate) service: RStr<'a>,
    /// The event's target: the module path, or a `log` record's target.
    pub(crate) target: RStr<'a>,
    /// The message with its fields and the plugin-side spans, formatted.
    pub(crate) message: RStr<'a>,
}

/// The host's callbacks. Every function takes the `data` of the [`CallCtx`].
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = HostVTableRef)))]
pub struct HostVTable {
    /// The request's routing key.
    pub(crate) routing_key: for<'a> extern "C" fn(&'a ErasedObject) -> RStr<'a>,
    /// The request's method.
    pub(crate) method: for<'a> extern "C" fn(&'a ErasedObject) -> RStr<'a>,
    /// The request's id as JSON text (`null` when it had none).
    pub(crate) id_json: for<'a> extern "C" fn(&'a ErasedObject) -> RStr<'a>,
    /// The queue the caller waits on, if any.
    pub(crate) reply_to: for<'a> extern "C" fn(&'a ErasedObject) -> ROption<RStr<'a>>,
    /// The request's correlation id, if any.
    pub(crate) correlation_id: for<'a> extern "C" fn(&'a ErasedObject) -> ROption<RStr<'a>>,
    /// Whether the broker delivered this request before.
    pub(crate) redelivered: extern "C" fn(&ErasedObject) -> bool,
    /// Sends a request and waits for its reply; returns the result's JSON
    /// text. `timeout_ms == 0` means the host's default.
    pub(crate) request: for<'a> extern "C" fn(
        &'a ErasedObject,
        routing_key: RStr<'a>,
        params_json: RStr<'a>,
        timeout_ms: u64,
    ) -> CallResult,
    /// Sends a notification.
    pub(crate) notify: for<'a> extern "C" fn(
        &'a ErasedObject,
        routing_key: RStr<'a>,
        params_json: RStr<'a>,
    ) -> RResult<(), RpcErrorAbi>,
    /// Sends a result to a queue, outside the request/reply cycle.
    #[sabi(last_prefix_field)]
    pub(crate) respond: for<'a> extern "C" fn(
        &'a ErasedObject,
        queue: RStr<'a>,
        id_json: RStr<'a>,
        result_json: RStr<'a>,
    ) -> RResult<(), RpcErrorAbi>,
    /// (1.1) The exchange the request came through.
    pub(crate) exchange: for<'a> extern "C" fn(&'a ErasedObject) -> RStr<'a>,
    /// (1.1) Emits a log event through the host's logger, tagged with the
    /// service, method and request id.
    pub(crate) log: for<'a> extern "C" fn(&'a ErasedObject, level: u8, message: RStr<'a>),
    /// (1.3) The request's W3C `traceparent`: its trace and the span the
    /// host opened for it; empty when the host has none.
    pub(crate) traceparent: for<'a> extern "C" fn(&'a ErasedObject) -> RStr<'a>,
    /// (1.4) Publishes `body` as it is, with no reply queue, to `exchange`
    /// (empty: the exchange of the host's deployment) under `routing_key`.
    pub(crate) publish: for<'a> extern "C" fn(
        &'a ErasedObject,
        exchange: RStr<'a>,
        routing_key: RStr<'a>,
        body: RStr<'a>,
    ) -> RResult<(), RpcErrorAbi>,
    /// (1.4) When the request's caller stops waiting, in milliseconds since
    /// the Unix epoch; 0 when the host knows none.
    pub(crate) deadline: for<'a> extern "C" fn(&'a ErasedObject) -> u64,
    /// (1.5) Sends a request and returns at once; `done` gets the result's
    /// JSON text or the error, from any thread. `timeout_ms` as for
    /// `request`.
    pub(crate) request_async: for<'a> extern "C" fn(
        &'a ErasedObject,
        routing_key: RStr<'a>,
        params_json: RStr<'a>,
        timeout_ms: u64,
        done: Completion,
    ),
}

/// The layout of [`HostVTableRef`] as this crate sees it.
pub(crate) const HOST_VTABLE_LAYOUT: &TypeLayout = <HostVTableRef as StableAbi>::LAYOUT;
/// The layout of [`PluginVTableRef`] as this crate sees it.
pub(crate) const PLUGIN_VTABLE_LAYOUT: &TypeLayout = <PluginVTableRef as StableAbi>::LAYOUT;
