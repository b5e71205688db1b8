//! The host half of the ABI: what commissaire-host (and the test kit) use to
//! check a loaded plugin, build its service, call its handlers and serve
//! their bus calls and logs.
//!
//! Hidden from the plugin author's docs. Everything here is safe to use:
//! the unsafe contracts of the raw entry points (a live service handle, call
//! data that is really the host's) are kept by the types below, which own
//! what they point at.

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use abi_stable::abi_stability::abi_checking::{check_layout_compatibility, AbiInstabilityErrors};
use abi_stable::marker_type::ErasedObject;
use abi_stable::prefix_type::WithMetadata;
use abi_stable::std_types::{ROption, RResult, RStr, RString};
use abi_stable::type_layout::{TLData, TLFieldOrFunction, TypeLayout};

use crate::abi::{
    log_level, AsyncHandle, CallCtx, CallResult, Completion, HostLogger, HostVTable, HostVTableRef,
    LogRecord, PluginVTableRef, RpcErrorAbi, ServiceHandle, HOST_VTABLE_LAYOUT,
    PLUGIN_VTABLE_LAYOUT,
};
use crate::{host_log, RpcError};

pub use crate::abi::PluginRootRef;

/// The plugin-api version of this crate, which the host speaks.
pub const API_VERSION: &str = crate::abi::API_VERSION;

/// What the host knows about the request being handled.
#[derive(Debug, Clone, Copy)]
pub struct RequestMeta<'a> {
    /// The exchange the request came through.
    pub exchange: &'a str,
    /// The routing key, e.g. `simple.add`.
    pub routing_key: &'a str,
    /// The method, e.g. `add`.
    pub method: &'a str,
    /// The id as JSON text (`null` when absent).
    pub id_json: &'a str,
    /// The queue the caller waits on.
    pub reply_to: Option<&'a str>,
    /// The AMQP correlation id.
    pub correlation_id: Option<&'a str>,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
    /// The W3C `traceparent` of the span the host opened for the request
    /// (in the caller's trace, when the caller sent one); the handler's own
    /// bus requests are its children.
    pub traceparent: Option<&'a str>,
    /// When the request's caller stops waiting, in milliseconds since the
    /// Unix epoch (its `deadline`, or its arrival plus the handler's
    /// timeout).
    pub deadline: Option<u64>,
}

/// The bus operations a handler may use, implemented by the host.
///
/// Implementations are called from handler threads and may block. Logs do
/// not go through here: this crate emits a plugin's log events as `tracing`
/// events of the host process (see [`Plugin::install_logger`]). `caller`
/// is the request whose handler makes the call (its trace context is the
/// parent of what the call sends).
pub trait HostBus: Send + Sync {
    /// Sends a request and waits for the reply; returns the result's JSON
    /// text. `timeout` is `None` for the host's default.
    fn request(
        &self,
        caller: &RequestMeta<'_>,
        routing_key: &str,
        params_json: &str,
        timeout: Option<Duration>,
    ) -> Result<String, RpcError>;

    /// Sends a notification.
    fn notify(
        &self,
        caller: &RequestMeta<'_>,
        routing_key: &str,
        params_json: &str,
    ) -> Result<(), RpcError>;

    /// Sends `{"jsonrpc":"2.0","id":…,"result":…}` to `queue`.
    fn respond(
        &self,
        caller: &RequestMeta<'_>,
        queue: &str,
        id_json: &str,
        result_json: &str,
    ) -> Result<(), RpcError>;

    /// (1.5) Sends a request for an async handler and returns at once;
    /// `reply` gets the result's JSON text or the error, from any thread.
    /// The default waits here, in [`HostBus::request`]: right for a bus
    /// that answers at once (the test kit's routes), not for a real one.
    fn request_async(
        &self,
        caller: &RequestMeta<'_>,
        routing_key: &str,
        params_json: &str,
        timeout: Option<Duration>,
        reply: ReplyTo,
    ) {
        reply.send(self.request(caller, routing_key, params_json, timeout));
    }

    /// (1.4) Publishes `body` unchanged, with no reply queue, to `exchange`
    /// (empty: the deployment's) under `routing_key`. A host that does not
    /// implement it answers the plugin as an older host would.
    fn publish(
        &self,
        caller: &RequestMeta<'_>,
        exchange: &str,
        routing_key: &str,
        body: &str,
    ) -> Result<(), RpcError> {
        let _ = (caller, exchange, routing_key, body);
        Err(RpcError::host_unsupported("publish"))
    }
}

/// Where the reply of an async handler's bus request goes: sent once,
/// from any thread. Dropped unsent, it answers -32603, so the handler
/// never waits for a reply that cannot come.
pub struct ReplyTo(Option<Completion>);

impl ReplyTo {
    /// Hands the reply to the waiting handler.
    pub fn send(mut self, reply: Result<String, RpcError>) {
        self.complete(match reply {
            Ok(json) => RResult::ROk(RString::from(json)),
            Err(e) => RResult::RErr(e.into_abi()),
        });
    }

    fn complete(&mut self, result: CallResult) {
        if let Some(c) = self.0.take() {
            (c.done)(c.data, result);
        }
    }
}

impl Drop for ReplyTo {
    fn drop(&mut self) {
        self.complete(RResult::RErr(
            RpcError::internal_error("the host dropped the request").into_abi(),
        ));
    }
}

impl fmt::Debug for ReplyTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReplyTo")
    }
}

/// Why a loaded library's root module is not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckError {
    /// Built with `panic = "abort"`.
    PanicAbort,
    /// The plugin's view of the host callbacks differs from ours: the first
    /// differing field, in words.
    HostInterface(String),
    /// The plugin's entry points differ from ours.
    PluginInterface(String),
}

/// A plugin whose root module passed the checks: its entry points may be
/// called. Libraries are never unloaded, so it lives as long as the
/// process.
#[derive(Clone, Copy)]
pub struct Plugin {
    vtable: PluginVTableRef,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("service_name", &self.service_name())
            .field("api_version", &self.api_version())
            .finish()
    }
}

impl Plugin {
    /// Checks a root module that abi_stable loaded: built with
    /// `panic = "unwind"`, and both vtables compatible with ours (older and
    /// newer minor versions are; a field of another type is not).
    pub fn check(root: PluginRootRef) -> Result<Self, CheckError> {
        if !root.panic_unwind() {
            return Err(CheckError::PanicAbort);
        }
        check_growable(HOST_VTABLE_LAYOUT, root.host_vtable_layout())
            .map_err(CheckError::HostInterface)?;
        check_growable(PLUGIN_VTABLE_LAYOUT, root.plugin_vtable_layout())
            .map_err(CheckError::PluginInterface)?;
        Ok(Self {
            vtable: root.plugin(),
        })
    }

    /// The plugin-api version the plugin was built against.
    pub fn api_version(&self) -> &'static str {
        self.vtable.api_version().as_str()
    }

    /// The bus name of its service.
    pub fn service_name(&self) -> &'static str {
        self.vtable.service_name().as_str()
    }

    /// The plugin crate's version.
    pub fn plugin_version(&self) -> &'static str {
        self.vtable.plugin_version().as_str()
    }

    /// Its methods as a JSON array (name, doc, params, returns).
    pub fn methods_json(&self) -> &'static str {
        self.vtable.methods_json().as_str()
    }

    /// The service's contract, an OpenRPC document (JSON text); `None`
    /// before plugin-api 1.6, or when the plugin could not build it.
    pub fn contract(&self) -> Option<&'static str> {
        let contract = self.vtable.contract()?;
        Some(contract().as_str()).filter(|c| !c.is_empty())
    }

    /// The service's description; `None` before plugin-api 1.1.
    pub fn description(&self) -> Option<&'static str> {
        self.vtable.description().map(|d| d.as_str())
    }

    /// Hands the plugin this process's log sink and its current maximum
    /// level (`tracing`'s [`LevelFilter::current`]), so that the plugin's
    /// `tracing` events and `log` records become events of this process,
    /// and those more verbose than the maximum are dropped in the plugin
    /// without crossing. Call it at load, before [`Plugin::instantiate`],
    /// so that `init` logs too. Does nothing for plugins older than 1.2.
    ///
    /// [`LevelFilter::current`]: tracing::level_filters::LevelFilter::current
    pub fn install_logger(&self) {
        if let Some(set_host_logger) = self.vtable.set_host_logger() {
            set_host_logger(HostLogger {
                max_level: log_level::from_filter(tracing::level_filters::LevelFilter::current()),
                log: host_log_record,
            });
        }
    }

    /// Builds a service value from its JSON config section.
    pub fn instantiate(&self, config_json: &str) -> Result<ServiceInstance, RpcError> {
        let handle = (self.vtable.new_service())(config_json.into())
            .into_result()
            .map_err(RpcError::from_abi)?;
        Ok(ServiceInstance {
            vtable: self.vtable,
            handle,
        })
    }
}

/// One service value inside a plugin, shared by concurrent calls. Owns it:
/// the plugin drops it when this is dropped.
pub struct ServiceInstance {
    vtable: PluginVTableRef,
    handle: ServiceHandle,
}

impl fmt::Debug for ServiceInstance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceInstance")
            .field("service", &self.vtable.service_name())
            .finish()
    }
}

impl ServiceInstance {
    /// Calls `meta.method` with raw `params` JSON text (empty for none);
    /// returns the result's JSON text. Synchronous: run it where blocking
    /// is fine. The handler's bus calls go to `bus`; its log events carry
    /// the service, method and id of `meta`.
    pub fn call(
        &self,
        meta: RequestMeta<'_>,
        bus: &dyn HostBus,
        params: &str,
    ) -> Result<RString, RpcError> {
        let service = self.vtable.service_name().as_str();
        with_call_ctx(service, meta, bus, |ctx| {
            (self.vtable.call())(self.handle, ctx, meta.method.into(), params.into())
                .into_result()
                .map_err(RpcError::from_abi)
        })
    }
}

impl ServiceInstance {
    /// Starts `meta.method`, an async handler, on the plugin's runtime,
    /// with raw `params` JSON text; the returned future is its result.
    /// Dropping the future (at a deadline, say) cancels the handler. With
    /// `poll_here`, its first poll runs on this thread (for a handler known
    /// to reach its first `.await`, or its end, at once). `None` for a
    /// plugin older than plugin-api 1.5 (call it with
    /// [`ServiceInstance::call`]).
    pub fn call_async(
        &self,
        meta: RequestMeta<'_>,
        bus: Arc<dyn HostBus>,
        params: &str,
        poll_here: bool,
    ) -> Option<PendingCall> {
        let service = self.vtable.service_name().as_str();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let handle = start_async(
            self.vtable,
            self.handle,
            service,
            meta,
            bus,
            params,
            poll_here,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        )?;
        Some(PendingCall {
            rx,
            handle: Some(handle),
        })
    }
}

/// An async handler under way: resolves to its result; dropped before
/// that, it cancels the handler (its future is dropped in the plugin).
pub struct PendingCall {
    rx: tokio::sync::oneshot::Receiver<CallResult>,
    handle: Option<RunningCall>,
}

impl fmt::Debug for PendingCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingCall")
            .field("running", &self.handle.is_some())
            .finish()
    }
}

impl PendingCall {
    /// The handler's result if it has ended already (a handler with nothing
    /// to wait for ends inside `call_async`): no timer, no wake-up.
    pub fn ended(&mut self) -> Option<Result<RString, RpcError>> {
        let result = self.rx.try_recv().ok()?;
        if let Some(handle) = self.handle.take() {
            handle.end(false);
        }
        Some(result.into_result().map_err(RpcError::from_abi))
    }

    /// Cancels the handler now, if it still runs; the future then resolves
    /// once the plugin dropped the handler's future (at once, unless the
    /// handler blocks its thread).
    pub fn cancel(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.end(true);
        }
    }
}

impl Future for PendingCall {
    type Output = Result<RString, RpcError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = match Pin::new(&mut self.rx).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(result)) => result.into_result().map_err(RpcError::from_abi),
            Poll::Ready(Err(_)) => Err(RpcError::internal_error(
                "the plugin ended the call without an answer",
            )),
        };
        if let Some(handle) = self.handle.take() {
            handle.end(false);
        }
        Poll::Ready(result)
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// The plugin's handle on an async call, with the entry that releases it.
pub(crate) struct RunningCall {
    handle: AsyncHandle,
    end: extern "C" fn(AsyncHandle, bool),
}

impl RunningCall {
    /// Releases the handle, cancelling the call first if `cancel`.
    pub(crate) fn end(self, cancel: bool) {
        (self.end)(self.handle, cancel);
    }
}

/// Starts async method `meta.method` of the plugin service `handle`;
/// `on_done` gets its result once, from any thread. `None` (and `on_done`
/// never called) for a plugin without async calls.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_async(
    vtable: PluginVTableRef,
    handle: ServiceHandle,
    service: &str,
    meta: RequestMeta<'_>,
    bus: Arc<dyn HostBus>,
    params: &str,
    poll_here: bool,
    on_done: Box<dyn FnOnce(CallResult) + Send>,
) -> Option<RunningCall> {
    let (call_async, end) = (vtable.call_async()?, vtable.end_async()?);
    // Raw from here: the plugin owns the call until it calls `done`, and
    // the pointers below are derived from this one, never from a `Box`
    // that moves.
    let data = Box::into_raw(AsyncCall::new(service, meta, bus, on_done));
    // SAFETY: `data` is live (just made); the field's address is stable
    // until `call_done` frees it.
    let env = unsafe { std::ptr::addr_of!((*data).env) };
    let ctx = CallCtx {
        host: HOST_VTABLE,
        // SAFETY: `ErasedObject` is a zero-sized opaque type; the pointer
        // only travels to our own callbacks, which cast it back to
        // `HostEnv`, while the call lives (until `call_done`).
        data: unsafe { &*env.cast::<ErasedObject>() },
    };
    let done = Completion {
        data: data.cast_const().cast::<ErasedObject>(),
        done: call_done,
    };
    // `meta.method` is the caller's: it outlives this call even if the
    // plugin calls `done`, freeing the call's copy, before it returns.
    let handle = call_async(
        handle,
        &ctx,
        meta.method.into(),
        params.into(),
        poll_here,
        done,
    );
    Some(RunningCall { handle, end })
}

/// The owned copy of a request's meta that an async call's [`HostEnv`]
/// borrows.
struct OwnedMeta {
    service: String,
    exchange: String,
    routing_key: String,
    method: String,
    id_json: String,
    reply_to: Option<String>,
    correlation_id: Option<String>,
    traceparent: Option<String>,
}

/// An async call's data: lives from `call_async` until the plugin calls
/// [`call_done`], on the heap, so that its address is stable.
struct AsyncCall {
    /// What the callbacks see; borrows `owned` and `_bus` below, which are
    /// on the heap and freed after it.
    env: HostEnv<'static>,
    /// From `Box::into_raw`, freed in `Drop`: a `Box` field would claim
    /// unique access each time the struct moves, which `env`'s references
    /// into it contradict.
    owned: std::ptr::NonNull<OwnedMeta>,
    _bus: Arc<dyn HostBus>,
    on_done: Option<Box<dyn FnOnce(CallResult) + Send>>,
}

impl AsyncCall {
    fn new(
        service: &str,
        meta: RequestMeta<'_>,
        bus: Arc<dyn HostBus>,
        on_done: Box<dyn FnOnce(CallResult) + Send>,
    ) -> Box<Self> {
        let owned = std::ptr::NonNull::from(Box::leak(Box::new(OwnedMeta {
            service: service.to_owned(),
            exchange: meta.exchange.to_owned(),
            routing_key: meta.routing_key.to_owned(),
            method: meta.method.to_owned(),
            id_json: meta.id_json.to_owned(),
            reply_to: meta.reply_to.map(str::to_owned),
            correlation_id: meta.correlation_id.map(str::to_owned),
            traceparent: meta.traceparent.map(str::to_owned),
        })));
        // SAFETY: `owned` and `bus` point at heap values this struct owns,
        // never changes and frees only after `env` (see `Drop`); nothing
        // hands `env`'s references out beyond the call.
        let (o, b): (&'static OwnedMeta, &'static dyn HostBus) =
            unsafe { (owned.as_ref(), &*Arc::as_ptr(&bus)) };
        let env = HostEnv {
            service: &o.service,
            meta: RequestMeta {
                exchange: &o.exchange,
                routing_key: &o.routing_key,
                method: &o.method,
                id_json: &o.id_json,
                reply_to: o.reply_to.as_deref(),
                correlation_id: o.correlation_id.as_deref(),
                redelivered: meta.redelivered,
                traceparent: o.traceparent.as_deref(),
                deadline: meta.deadline,
            },
            bus: b,
        };
        Box::new(Self {
            env,
            owned,
            _bus: bus,
            on_done: Some(on_done),
        })
    }
}

impl Drop for AsyncCall {
    fn drop(&mut self) {
        // SAFETY: made by `Box::leak` in `new`, freed only here; `env`'s
        // references into it die with `self`.
        drop(unsafe { Box::from_raw(self.owned.as_ptr()) });
    }
}

/// The [`Completion`] of an async call: hands on its result, frees its
/// data.
extern "C" fn call_done(data: *const ErasedObject, result: CallResult) {
    // SAFETY: `data` was made by `start_async` from a `Box<AsyncCall>`,
    // and the plugin calls this exactly once, after the handler's future
    // (the last user of the call's data) is gone.
    let mut call = unsafe { Box::from_raw(data.cast::<AsyncCall>().cast_mut()) };
    if let Some(on_done) = call.on_done.take() {
        // Must not unwind into the plugin.
        let _ = catch_unwind(AssertUnwindSafe(move || on_done(result)));
    }
    drop(call);
}

impl Drop for ServiceInstance {
    fn drop(&mut self) {
        (self.vtable.drop_service())(self.handle);
    }
}

/// Number of fields of the prefix type behind a prefix reference layout.
fn prefix_fields(reference: &'static TypeLayout) -> Option<usize> {
    let inner = reference.shared_vars().type_layouts().first()?();
    match inner.data() {
        TLData::PrefixType(p) => Some(p.fields.len()),
        _ => None,
    }
}

/// Checks a growable vtable: the side with fewer fields is the interface,
/// so older and newer minor versions are both accepted while a field of
/// another type is not.
fn check_growable(ours: &'static TypeLayout, theirs: &'static TypeLayout) -> Result<(), String> {
    let (interface, implementation) = match (prefix_fields(ours), prefix_fields(theirs)) {
        (Some(a), Some(b)) if b < a => (theirs, ours),
        (Some(_), Some(_)) => (ours, theirs),
        _ => return Err("not a prefix-type vtable".into()),
    };
    check_layout_compatibility(interface, implementation).map_err(|e| describe(&e))
}

/// The first field whose type differs, in words.
fn describe(errors: &AbiInstabilityErrors) -> String {
    tracing::debug!(details = %errors, "layout mismatch");
    let field = errors
        .errors
        .iter()
        .flat_map(|e| e.stack_trace.iter())
        .find_map(|ef| match &ef.expected {
            TLFieldOrFunction::Field(f) if !f.name().is_empty() && f.name() != "0" => {
                Some(f.name())
            }
            _ => None,
        });
    match field {
        Some(name) => format!("field `{name}` has another type"),
        None => "layouts differ (details at debug level)".into(),
    }
}

/// The per-call data behind [`CallCtx::data`].
struct HostEnv<'a> {
    service: &'a str,
    meta: RequestMeta<'a>,
    bus: &'a dyn HostBus,
}

thread_local! {
    /// The call this thread is in, for the log events the plugin emits
    /// meanwhile (they carry no request of their own: the plugin's logger
    /// is global). Null outside calls.
    static CURRENT: Cell<*const HostEnv<'static>> = const { Cell::new(std::ptr::null()) };
}

/// Restores the enclosing call's [`CURRENT`] (a handler's bus request may
/// run another handler on the same thread, as the test kit does).
struct CurrentGuard(*const HostEnv<'static>);

impl Drop for CurrentGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.0));
    }
}

/// Runs `f` with the call this thread is in, if any.
fn current_call<R>(f: impl FnOnce(Option<&HostEnv<'_>>) -> R) -> R {
    let ptr = CURRENT.with(Cell::get);
    // SAFETY: `CURRENT` is non-null only while `with_call_ctx`, on this
    // thread, holds the `HostEnv` it points at on its stack (the guard
    // resets it before that frame ends, unwinding included); the reference
    // does not outlive `f`.
    let env = unsafe { ptr.as_ref() };
    f(env)
}

/// Runs `f` with a [`CallCtx`] that serves `meta` and `bus` to the plugin.
pub(crate) fn with_call_ctx<R>(
    service: &str,
    meta: RequestMeta<'_>,
    bus: &dyn HostBus,
    f: impl FnOnce(&CallCtx<'_>) -> R,
) -> R {
    let env = HostEnv { service, meta, bus };
    // SAFETY: `ErasedObject` is a zero-sized opaque type; the reference only
    // travels to our own callbacks below, which cast it back to `HostEnv`
    // while `env` is alive (the plugin may not keep it past the call).
    let data = unsafe { &*std::ptr::from_ref(&env).cast::<ErasedObject>() };
    let ctx = CallCtx {
        host: HOST_VTABLE,
        data,
    };
    let previous = CURRENT.with(|c| c.replace(std::ptr::from_ref(&env).cast()));
    let _restore = CurrentGuard(previous);
    f(&ctx)
}

fn env<'a>(data: &'a ErasedObject) -> &'a HostEnv<'a> {
    // SAFETY: every `ErasedObject` handed to these callbacks was made from a
    // `HostEnv` by `with_call_ctx`, which outlives the call; `CallCtx` and
    // `HOST_VTABLE` are private, so no other data reaches them.
    unsafe { &*std::ptr::from_ref(data).cast::<HostEnv<'a>>() }
}

/// Runs a host callback, turning a panic into a -32603 error so that it
/// never unwinds into the plugin.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, RpcError>) -> RResult<T, RpcErrorAbi> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(e.into_abi()),
        Err(_) => RResult::RErr(
            RpcError::internal_error(format!("the host's `{what}` failed unexpectedly")).into_abi(),
        ),
    }
}

extern "C" fn routing_key(data: &ErasedObject) -> RStr<'_> {
    env(data).meta.routing_key.into()
}
extern "C" fn method(data: &ErasedObject) -> RStr<'_> {
    env(data).meta.method.into()
}
extern "C" fn id_json(data: &ErasedObject) -> RStr<'_> {
    env(data).meta.id_json.into()
}
extern "C" fn reply_to(data: &ErasedObject) -> ROption<RStr<'_>> {
    env(data).meta.reply_to.map(RStr::from).into()
}
extern "C" fn correlation_id(data: &ErasedObject) -> ROption<RStr<'_>> {
    env(data).meta.correlation_id.map(RStr::from).into()
}
extern "C" fn redelivered(data: &ErasedObject) -> bool {
    env(data).meta.redelivered
}
extern "C" fn exchange(data: &ErasedObject) -> RStr<'_> {
    env(data).meta.exchange.into()
}
extern "C" fn traceparent(data: &ErasedObject) -> RStr<'_> {
    env(data).meta.traceparent.unwrap_or_default().into()
}
extern "C" fn deadline(data: &ErasedObject) -> u64 {
    env(data).meta.deadline.unwrap_or(0)
}

extern "C" fn request<'a>(
    data: &'a ErasedObject,
    routing_key: RStr<'a>,
    params_json: RStr<'a>,
    timeout_ms: u64,
) -> CallResult {
    let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms));
    guarded("request", || {
        let env = env(data);
        env.bus
            .request(
                &env.meta,
                routing_key.as_str(),
                params_json.as_str(),
                timeout,
            )
            .map(RString::from)
    })
}

extern "C" fn notify<'a>(
    data: &'a ErasedObject,
    routing_key: RStr<'a>,
    params_json: RStr<'a>,
) -> RResult<(), RpcErrorAbi> {
    guarded("notify", || {
        let env = env(data);
        env.bus
            .notify(&env.meta, routing_key.as_str(), params_json.as_str())
    })
}

extern "C" fn respond<'a>(
    data: &'a ErasedObject,
    queue: RStr<'a>,
    id_json: RStr<'a>,
    result_json: RStr<'a>,
) -> RResult<(), RpcErrorAbi> {
    guarded("respond", || {
        let env = env(data);
        env.bus.respond(
            &env.meta,
            queue.as_str(),
            id_json.as_str(),
            result_json.as_str(),
        )
    })
}

extern "C" fn publish<'a>(
    data: &'a ErasedObject,
    exchange: RStr<'a>,
    routing_key: RStr<'a>,
    body: RStr<'a>,
) -> RResult<(), RpcErrorAbi> {
    guarded("publish", || {
        let env = env(data);
        env.bus.publish(
            &env.meta,
            exchange.as_str(),
            routing_key.as_str(),
            body.as_str(),
        )
    })
}

extern "C" fn request_async<'a>(
    data: &'a ErasedObject,
    routing_key: RStr<'a>,
    params_json: RStr<'a>,
    timeout_ms: u64,
    done: Completion,
) {
    let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms));
    let reply = ReplyTo(Some(done));
    // A panic drops `reply`, which answers -32603.
    let _ = catch_unwind(AssertUnwindSafe(move || {
        let env = env(data);
        env.bus.request_async(
            &env.meta,
            routing_key.as_str(),
            params_json.as_str(),
            timeout,
            reply,
        );
    }));
}

/// `Message::log_*` (and everything a 1.1 plugin logs): the service name is
/// the target, having no other.
extern "C" fn log<'a>(data: &'a ErasedObject, level: u8, message: RStr<'a>) {
    let _ = guarded("log", || {
        let env = env(data);
        host_log::emit(
            level,
            env.service,
            Some(host_log::Call {
                method: env.meta.method,
                id_json: env.meta.id_json,
            }),
            env.service,
            message.as_str(),
        );
        Ok(())
    });
}

/// The sink of [`HostLogger`]: a plugin's `tracing` event or `log` record,
/// from any thread; inside a call on this thread it joins that request.
extern "C" fn host_log_record<'a>(record: &'a LogRecord<'a>) {
    let _ = guarded("log", || {
        let service = record.service.as_str();
        current_call(|call| {
            let meta = call
                .filter(|c| c.service == service)
                .map(|c| host_log::Call {
                    method: c.meta.method,
                    id_json: c.meta.id_json,
                });
            host_log::emit(
                record.level,
                service,
                meta,
                record.target.as_str(),
                record.message.as_str(),
            );
        });
        Ok(())
    });
}

const HOST_VTABLE_WM: &WithMetadata<HostVTable> = &WithMetadata::new(HostVTable {
    routing_key,
    method,
    id_json,
    reply_to,
    correlation_id,
    redelivered,
    request,
    notify,
    respond,
    exchange,
    log,
    traceparent,
    publish,
    deadline,
    request_async,
});

/// This crate's host vtable.
const HOST_VTABLE: HostVTableRef = HostVTableRef(HOST_VTABLE_WM.static_as_prefix());
