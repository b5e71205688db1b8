//! The host half of the ABI: what a host (the real one, or the test kit)
//! implements so that handlers can read their message and use the bus.
//!
//! Plugin authors do not need this module.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use abi_stable::marker_type::ErasedObject;
use abi_stable::prefix_type::WithMetadata;
use abi_stable::std_types::{ROption, RResult, RStr, RString};

use crate::abi::{CallCtx, CallResult, HostVTable, HostVTableRef, RpcErrorAbi};
use crate::RpcError;

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
}

/// The bus operations a handler may use, implemented by the host.
///
/// Implementations are called from handler threads and may block.
pub trait HostBus: Send + Sync {
    /// Sends a request and waits for the reply; returns the result's JSON
    /// text. `timeout` is `None` for the host's default.
    fn request(
        &self,
        routing_key: &str,
        params_json: &str,
        timeout: Option<Duration>,
    ) -> Result<String, RpcError>;

    /// Sends a notification.
    fn notify(&self, routing_key: &str, params_json: &str) -> Result<(), RpcError>;

    /// Sends `{"jsonrpc":"2.0","id":…,"result":…}` to `queue`.
    fn respond(&self, queue: &str, id_json: &str, result_json: &str) -> Result<(), RpcError>;

    /// A log event from the handler of `meta`. The default drops it.
    fn log(&self, meta: &RequestMeta<'_>, level: u8, message: &str) {
        let _ = (meta, level, message);
    }
}

/// The per-call data behind [`CallCtx::data`].
struct HostEnv<'a> {
    meta: RequestMeta<'a>,
    bus: &'a dyn HostBus,
}

/// Runs `f` with a [`CallCtx`] that serves `meta` and `bus` to the plugin.
pub fn with_call_ctx<R>(
    meta: RequestMeta<'_>,
    bus: &dyn HostBus,
    f: impl FnOnce(&CallCtx<'_>) -> R,
) -> R {
    let env = HostEnv { meta, bus };
    // SAFETY: `ErasedObject` is a zero-sized opaque type; the reference only
    // travels to our own callbacks below, which cast it back to `HostEnv`
    // while `env` is alive (the plugin may not keep it past the call).
    let data = unsafe { &*std::ptr::from_ref(&env).cast::<ErasedObject>() };
    let ctx = CallCtx {
        host: HOST_VTABLE,
        data,
    };
    f(&ctx)
}

fn env<'a>(data: &'a ErasedObject) -> &'a HostEnv<'a> {
    // SAFETY: every `ErasedObject` handed to these callbacks was made from a
    // `HostEnv` by `with_call_ctx`, which outlives the call.
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

extern "C" fn request<'a>(
    data: &'a ErasedObject,
    routing_key: RStr<'a>,
    params_json: RStr<'a>,
    timeout_ms: u64,
) -> CallResult {
    let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms));
    guarded("request", || {
        env(data)
            .bus
            .request(routing_key.as_str(), params_json.as_str(), timeout)
            .map(RString::from)
    })
}

extern "C" fn notify<'a>(
    data: &'a ErasedObject,
    routing_key: RStr<'a>,
    params_json: RStr<'a>,
) -> RResult<(), RpcErrorAbi> {
    guarded("notify", || {
        env(data)
            .bus
            .notify(routing_key.as_str(), params_json.as_str())
    })
}

extern "C" fn respond<'a>(
    data: &'a ErasedObject,
    queue: RStr<'a>,
    id_json: RStr<'a>,
    result_json: RStr<'a>,
) -> RResult<(), RpcErrorAbi> {
    guarded("respond", || {
        env(data)
            .bus
            .respond(queue.as_str(), id_json.as_str(), result_json.as_str())
    })
}

extern "C" fn log<'a>(data: &'a ErasedObject, level: u8, message: RStr<'a>) {
    let _ = guarded("log", || {
        let env = env(data);
        env.bus.log(&env.meta, level, message.as_str());
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
});

/// This crate's host vtable.
pub const HOST_VTABLE: HostVTableRef = HostVTableRef(HOST_VTABLE_WM.static_as_prefix());
