//! The plugin half of the ABI, instantiated by `#[service]` for one type.

use std::any::Any;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use abi_stable::library::{CheckTypeLayout, LibHeader, RootModuleResult};
use abi_stable::marker_type::ErasedObject;
use abi_stable::prefix_type::{PrefixTypeTrait, WithMetadata};
use abi_stable::std_types::{RResult, RStr, RString};

use crate::abi::{
    AsyncHandle, CallCtx, CallResult, Completion, HostLogger, PluginRoot, PluginRootRef,
    PluginVTable, PluginVTableRef, RpcErrorAbi, ServiceHandle, API_VERSION, HOST_VTABLE_LAYOUT,
    PLUGIN_VTABLE_LAYOUT,
};
use crate::{Message, RpcError};

/// Implemented by `#[service]` for the service type. Not part of the
/// stable API; implementing it by hand is safe but pointless.
pub trait ServiceImpl: Sized + Send + Sync + 'static {
    /// The bus name of the service.
    const NAME: &'static str;
    /// The plugin crate's version.
    const VERSION: &'static str;
    /// The service description (doc comment of the `impl`).
    const DESCRIPTION: &'static str;
    /// JSON array describing the methods.
    const METHODS_JSON: &'static str;
    /// `cfg!(panic = "unwind")` in the plugin crate (the host refuses
    /// plugins that would abort on a panic).
    const PANIC_UNWIND: bool;

    /// Builds the service from its config section (`init` or `Default`).
    fn construct(config: serde_json::Value) -> Result<Self, RpcError>;

    /// Decodes `params` for `method`, calls the handler, encodes its result.
    /// An async handler is driven to its end here, on the caller's thread,
    /// with the plugin's runtime for its I/O (for a host older than
    /// plugin-api 1.5, which knows only this entry).
    fn dispatch(&self, msg: &Message<'_>, method: &str, params: &str) -> Result<String, RpcError>;

    /// The service's OpenRPC document (JSON text, built once); empty for
    /// none.
    fn contract() -> &'static str {
        ""
    }

    /// Whether `method` is an `async fn` handler.
    fn is_async(method: &str) -> bool {
        let _ = method;
        false
    }

    /// The future of async method `method`, which decodes `params`, runs
    /// the handler and encodes its result; `None` for any other method.
    /// The message lives for `'m` only: the future may not keep it longer.
    fn dispatch_async<'m>(
        self: Arc<Self>,
        msg: Message<'m>,
        method: &str,
        params: String,
    ) -> Option<HandlerFuture<'m>> {
        let _ = (msg, method, params);
        None
    }
}

/// An async handler's future, as `#[service]` boxes it.
pub type HandlerFuture<'m> = Pin<Box<dyn Future<Output = Result<String, RpcError>> + Send + 'm>>;

/// Boxes an async handler's future (the type the macro's code needs).
pub fn boxed<'m, F>(future: F) -> HandlerFuture<'m>
where
    F: Future<Output = Result<String, RpcError>> + Send + 'm,
{
    Box::pin(future)
}

/// Drives an async handler to its end for a caller that waits (a host
/// older than plugin-api 1.5 calls every method through the sync entry),
/// with the plugin's runtime for its I/O. On a thread of a runtime (a
/// sync bus call from inside an async handler), on a scoped thread of its
/// own, where blocking is allowed.
pub fn block_on<F>(service: &str, future: F) -> Result<String, RpcError>
where
    F: Future<Output = Result<String, RpcError>> + Send,
{
    let runtime = crate::runtime::runtime(service)?;
    if tokio::runtime::Handle::try_current().is_err() {
        return runtime.block_on(future);
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| runtime.block_on(future))
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Encodes a handler's result.
pub fn encode_result<T: serde::Serialize>(method: &str, value: &T) -> Result<String, RpcError> {
    serde_json::to_string(value).map_err(|e| {
        RpcError::internal_error(format!("cannot encode the result of `{method}`: {e}"))
    })
}

/// The header abi_stable's loader looks for in a plugin of service `S`,
/// under the symbol `#[service]` exports it as.
pub const fn lib_header<S: ServiceImpl>() -> LibHeader {
    // SAFETY: `root_module_loader::<S>` returns the root module of type
    // `PluginRootRef`, the type given here.
    unsafe {
        LibHeader::from_constructor::<PluginRootRef>(root_module_loader::<S>, CheckTypeLayout::Yes)
    }
}

extern "C" fn root_module_loader<S: ServiceImpl>() -> RootModuleResult {
    // Semver-exempt in abi_stable, hence the exact version pin.
    abi_stable::library::__call_root_module_loader(Exports::<S>::root_module)
}

/// The exported entry points for service type `S`.
pub(crate) struct Exports<S>(PhantomData<S>);

impl<S: ServiceImpl> Exports<S> {
    const VTABLE_WM: &'static WithMetadata<PluginVTable> = &WithMetadata::new(PluginVTable {
        api_version: RStr::from_str(API_VERSION),
        service_name: RStr::from_str(S::NAME),
        plugin_version: RStr::from_str(S::VERSION),
        methods_json: RStr::from_str(S::METHODS_JSON),
        new_service: Self::new_service,
        drop_service: Self::drop_service,
        call: Self::call,
        description: RStr::from_str(S::DESCRIPTION),
        set_host_logger: Self::set_host_logger,
        call_async: Self::call_async,
        end_async,
        contract: Self::contract,
    });

    /// The plugin vtable of `S`.
    pub(crate) const VTABLE: PluginVTableRef = PluginVTableRef(Self::VTABLE_WM.static_as_prefix());

    fn root_module() -> PluginRootRef {
        install_panic_hook();
        PluginRoot {
            panic_unwind: S::PANIC_UNWIND,
            host_vtable_layout: HOST_VTABLE_LAYOUT,
            plugin_vtable_layout: PLUGIN_VTABLE_LAYOUT,
            plugin: Self::VTABLE,
        }
        .leak_into_prefix()
    }

    extern "C" fn new_service(config_json: RStr<'_>) -> RResult<ServiceHandle, RpcErrorAbi> {
        let built = catch_unwind(|| {
            let text = config_json.as_str();
            let config = if text.trim().is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_str(text).map_err(|e| {
                    RpcError::invalid_params(format!("the config of `{}`: {e}", S::NAME))
                })?
            };
            S::construct(config)
        });
        match built {
            Ok(Ok(service)) => {
                // An `Arc`: an async call's task holds the service until
                // its future is gone, even past `drop_service`.
                let ptr = Arc::into_raw(Arc::new(service)).cast::<ErasedObject>();
                RResult::ROk(ServiceHandle(ptr))
            }
            Ok(Err(e)) => RResult::RErr(e.into_abi()),
            Err(panic) => RResult::RErr(
                RpcError::internal_error(format!(
                    "`{}` panicked while starting: {}",
                    S::NAME,
                    panic_text(panic.as_ref())
                ))
                .into_abi(),
            ),
        }
    }

    extern "C" fn contract() -> RStr<'static> {
        // A panic while building it (in an author's `JsonSchema` impl)
        // must not unwind into the host: the plugin then has no contract.
        match catch_unwind(S::contract) {
            Ok(text) => RStr::from_str(text),
            Err(_) => RStr::from_str(""),
        }
    }

    extern "C" fn drop_service(service: ServiceHandle) {
        // SAFETY: `service` was made by `new_service` from an `Arc<S>`; the
        // host half (`ServiceInstance`, the test kit) owns that reference
        // and drops it once, after its last call.
        let shared = unsafe { Arc::from_raw(service.0.cast::<S>()) };
        // A panicking Drop must not unwind into the host.
        let _ = catch_unwind(AssertUnwindSafe(move || drop(shared)));
    }

    extern "C" fn call<'a>(
        service: ServiceHandle,
        ctx: &CallCtx<'a>,
        method: RStr<'a>,
        params: RStr<'a>,
    ) -> CallResult {
        // SAFETY: `service` was made by `new_service` from an `Arc<S>` and
        // the host half keeps it alive for as long as it calls.
        let service = unsafe { &*service.0.cast::<S>() };
        let msg = Message::from_ctx(ctx);
        let method = method.as_str();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            service.dispatch(&msg, method, params.as_str())
        }));
        match outcome {
            Ok(Ok(json)) => RResult::ROk(RString::from(json)),
            Ok(Err(e)) => RResult::RErr(e.into_abi()),
            Err(panic) => RResult::RErr(
                RpcError::internal_error(format!(
                    "the handler of `{method}` panicked: {}",
                    panic_text(panic.as_ref())
                ))
                .into_abi(),
            ),
        }
    }

    extern "C" fn call_async<'a>(
        service: ServiceHandle,
        ctx: &CallCtx<'a>,
        method: RStr<'a>,
        params: RStr<'a>,
        poll_here: bool,
        done: Completion,
    ) -> AsyncHandle {
        let finish = Finish(Some(done));
        let started = catch_unwind(AssertUnwindSafe(|| {
            Self::start(
                service,
                ctx,
                method.as_str(),
                params.as_str(),
                poll_here,
                finish,
            )
        }));
        // A panic dropped `finish`, which told the host.
        started.unwrap_or(AsyncHandle(std::ptr::null()))
    }

    fn start(
        service: ServiceHandle,
        ctx: &CallCtx<'_>,
        method: &str,
        params: &str,
        poll_here: bool,
        mut finish: Finish,
    ) -> AsyncHandle {
        let runtime = match crate::runtime::runtime(S::NAME) {
            Ok(runtime) => runtime,
            Err(e) => {
                finish.send(RResult::RErr(e.into_abi()));
                return AsyncHandle(std::ptr::null());
            }
        };
        let ptr = service.0.cast::<S>();
        // SAFETY: `service` was made by `new_service` from an `Arc<S>` and
        // is live during this call; the task takes a reference of its own.
        let service = unsafe {
            Arc::increment_strong_count(ptr);
            Arc::from_raw(ptr)
        };
        // SAFETY: by `call_async`'s contract the host keeps `ctx.data`
        // valid until `done`, which `Guarded` calls only once the future
        // holding this context is gone.
        let ctx = unsafe { ctx.extended() };
        let msg = Message::from_ctx(&ctx);
        // Only async methods: a sync one would run where a cancellation
        // cannot stop it, past the life of the call's data.
        let Some(future) = S::dispatch_async(service, msg, method, params.to_owned()) else {
            finish.send(RResult::RErr(
                RpcError::method_not_found(&format!("{method} (as an async handler)")).into_abi(),
            ));
            return AsyncHandle(std::ptr::null());
        };
        let mut guarded = Guarded {
            future: Some(future),
            finish,
            method: method.to_owned(),
        };
        // A first poll here, in the runtime's context, on the host's thread
        // (when the host found the method quick): a handler with nothing to
        // wait for ends without a hop to the runtime's threads and back.
        // Its waker is a no-op: a future still pending is polled again by
        // the runtime at once, and registers the runtime's waker then.
        if poll_here {
            let _entered = runtime.enter();
            let mut noop = Context::from_waker(std::task::Waker::noop());
            if Pin::new(&mut guarded).poll(&mut noop).is_ready() {
                return AsyncHandle(std::ptr::null());
            }
        }
        let task = runtime.spawn(guarded);
        let handle = Box::new(task.abort_handle());
        AsyncHandle(Box::into_raw(handle).cast::<ErasedObject>())
    }

    extern "C" fn set_host_logger(logger: HostLogger) {
        // Installing a subscriber must not unwind into the host.
        let _ = catch_unwind(|| crate::plugin_log::set_host_logger(logger, S::NAME));
    }
}

extern "C" fn end_async(handle: AsyncHandle, cancel: bool) {
    if handle.0.is_null() {
        return;
    }
    // SAFETY: a non-null handle was made by `call_async` from a
    // `Box<AbortHandle>`, and the host gives it back exactly once.
    let abort = unsafe { Box::from_raw(handle.0.cast::<tokio::task::AbortHandle>().cast_mut()) };
    if cancel {
        abort.abort();
    }
}

/// The host's [`Completion`] of one async call: called once, with the
/// result, or with a cancellation error when dropped unsent.
struct Finish(Option<Completion>);

impl Finish {
    fn send(&mut self, result: CallResult) {
        if let Some(c) = self.0.take() {
            (c.done)(c.data, result);
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.send(RResult::RErr(
            RpcError::internal_error("the handler was cancelled").into_abi(),
        ));
    }
}

/// An async call's task: polls the handler's future, a panic in it
/// becoming a -32603, and tells the host once the future is gone, whether
/// it ended or was cancelled (dropped).
struct Guarded {
    future: Option<HandlerFuture<'static>>,
    finish: Finish,
    method: String,
}

impl Future for Guarded {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let Some(future) = this.future.as_mut() else {
            return Poll::Ready(());
        };
        let result = match catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(Ok(json))) => RResult::ROk(RString::from(json)),
            Ok(Poll::Ready(Err(e))) => RResult::RErr(e.into_abi()),
            Err(panic) => RResult::RErr(
                RpcError::internal_error(format!(
                    "the handler of `{}` panicked: {}",
                    this.method,
                    panic_text(panic.as_ref())
                ))
                .into_abi(),
            ),
        };
        // Gone before the host hears, which then frees the message's data.
        this.drop_future();
        this.finish.send(result);
        Poll::Ready(())
    }
}

impl Guarded {
    fn drop_future(&mut self) {
        let future = self.future.take();
        // A panicking Drop must not unwind into the runtime.
        let _ = catch_unwind(AssertUnwindSafe(move || drop(future)));
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // The future first: `finish` (dropped after this) tells the host.
        self.drop_future();
    }
}

fn panic_text(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Installs this plugin's panic hook, once. A plugin links its own copy of
/// std, so no hook of the host's reaches its panics. std's default hook
/// (with `RUST_BACKTRACE` set) resolves the backtrace before the panic
/// unwinds, which reads the debug info of the whole process the first
/// time: the caller of a panicking handler waited about 0.4 s for its
/// -32603 in a fresh worker. This hook writes the panic's message at once
/// and leaves the backtrace, if one is wanted, to a thread of its own.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(report_panic)));
}

fn report_panic(info: &std::panic::PanicHookInfo<'_>) {
    use std::io::Write as _;
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("<unnamed>");
    let location = info
        .location()
        .map_or_else(|| "an unknown place".to_owned(), ToString::to_string);
    let message = panic_text(info.payload());
    // Not `eprintln!`: a failed write must not panic inside the hook.
    let _ = writeln!(
        std::io::stderr().lock(),
        "thread '{name}' panicked at {location}:\n{message}"
    );
    // std holds one lock while it resolves a backtrace, which capturing
    // takes too: no capture while the printer is at work, or this panic
    // would wait for it. A plugin panicking faster than backtraces print
    // loses some of them.
    if PRINTING.swap(true, Ordering::SeqCst) {
        return;
    }
    // Frames only: resolving them to names is the slow part.
    let backtrace = std::backtrace::Backtrace::capture();
    let sent = backtrace.status() == std::backtrace::BacktraceStatus::Captured
        && backtrace_printer().is_some_and(|p| p.try_send((location, backtrace)).is_ok());
    if !sent {
        PRINTING.store(false, Ordering::SeqCst);
    }
}

/// Whether the printer thread has a backtrace to print.
static PRINTING: AtomicBool = AtomicBool::new(false);

/// The thread that resolves and prints backtraces, started on first use.
fn backtrace_printer(
) -> Option<&'static std::sync::mpsc::SyncSender<(String, std::backtrace::Backtrace)>> {
    static PRINTER: std::sync::OnceLock<
        Option<std::sync::mpsc::SyncSender<(String, std::backtrace::Backtrace)>>,
    > = std::sync::OnceLock::new();
    PRINTER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(String, std::backtrace::Backtrace)>(1);
            std::thread::Builder::new()
                .name("panic-backtraces".to_owned())
                .spawn(move || {
                    use std::io::Write as _;
                    for (location, backtrace) in rx {
                        // Resolved before stderr is locked: panics of other
                        // threads write their message meanwhile.
                        let text = backtrace.to_string();
                        let _ = writeln!(
                            std::io::stderr().lock(),
                            "stack backtrace of the panic at {location}:\n{text}"
                        );
                        PRINTING.store(false, Ordering::SeqCst);
                    }
                })
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}
