//! Async handlers through the test kit: the path the host takes
//! (`call_async`, the plugin's own runtime, the completion), with no host.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use commissaire_plugin_api::prelude::*;
use commissaire_plugin_api::testing::TestService;

#[derive(Default)]
struct Waiter;

static HOLDING: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

#[service(name = "waiter")]
impl Waiter {
    /// Sleeps on the plugin's runtime (tokio's timer needs its reactor).
    async fn on_nap(&self, ms: u64) -> Result<u64, RpcError> {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(ms)
    }

    fn on_add(&self, x: i64, y: i64) -> Result<i64, RpcError> {
        Ok(x + y)
    }

    /// An awaited bus request, to a sync method of its own.
    async fn on_inc(&self, msg: &Message, x: i64) -> Result<i64, RpcError> {
        msg.bus().request_async("waiter.add", [x, 1]).await
    }

    /// Awaited bus requests, to an async method of its own.
    async fn on_inc_twice(&self, msg: &Message, x: i64) -> Result<i64, RpcError> {
        let once: i64 = msg.bus().request_async("waiter.inc", [x]).await?;
        msg.bus().request_async("waiter.inc", [once]).await
    }

    /// What the message says, after an `.await`.
    async fn on_who(&self, msg: &Message) -> Result<Value, RpcError> {
        tokio::task::yield_now().await;
        Ok(json!({
            "routing_key": msg.routing_key(),
            "id": msg.id(),
            "has_deadline": msg.remaining().is_some(),
        }))
    }

    /// Sleeps, counting the calls asleep at once.
    async fn on_hold(&self, ms: u64) -> Result<(), RpcError> {
        let now = HOLDING.fetch_add(1, Ordering::SeqCst) + 1;
        PEAK.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        HOLDING.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }

    async fn on_boom(&self) -> Result<(), RpcError> {
        panic!("boom")
    }

    async fn on_fails(&self, why: String) -> std::io::Result<()> {
        Err(std::io::Error::other(why))
    }
}

#[test]
fn an_async_handler_runs_on_the_plugins_runtime() {
    let svc = TestService::<Waiter>::new();
    assert_eq!(svc.call("nap", json!([5])), Ok(json!(5)));
    assert_eq!(svc.call("nap", json!({"ms": 1})), Ok(json!(1)));
    let bad = svc.call("nap", json!(["x"])).unwrap_err();
    assert_eq!(bad.code, RpcError::INVALID_PARAMS, "{bad:?}");
    assert_eq!(
        svc.call("who", json!([])),
        Ok(json!({"routing_key": "waiter.who", "id": "test", "has_deadline": true}))
    );
}

#[test]
fn async_handlers_await_the_bus_and_each_other() {
    let svc = TestService::<Waiter>::new();
    assert_eq!(svc.call("inc", json!([1])), Ok(json!(2)));
    assert_eq!(svc.call("inc_twice", json!([1])), Ok(json!(3)));
    let keys: Vec<String> = svc.requests().into_iter().map(|r| r.0).collect();
    assert_eq!(
        keys,
        [
            "waiter.add",
            "waiter.inc",
            "waiter.add",
            "waiter.inc",
            "waiter.add"
        ]
    );
}

#[test]
fn an_async_handler_s_panic_and_error_are_answers() {
    let svc = TestService::<Waiter>::new();
    let boom = svc.call("boom", json!([])).unwrap_err();
    assert_eq!(boom.code, RpcError::INTERNAL_ERROR);
    assert_eq!(boom.message, "the handler of `boom` panicked: boom");
    let failed = svc.call("fails", json!(["disk"])).unwrap_err();
    assert_eq!(failed.message, "disk");
    // The runtime lives on.
    assert_eq!(svc.call("nap", json!([0])), Ok(json!(0)));
}

/// 200 calls that sleep 300 ms each, from 200 threads: they are all
/// asleep at once on the plugin runtime's few threads, none holding one.
#[test]
fn waiting_async_handlers_hold_no_thread() {
    let svc = std::sync::Arc::new(TestService::<Waiter>::new());
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let svc = svc.clone();
            std::thread::spawn(move || svc.call("hold", json!([300])))
        })
        .collect();
    for call in calls {
        assert_eq!(call.join().ok(), Some(Ok(json!(null))));
    }
    let threads = commissaire_plugin_api::runtime::threads();
    let peak = PEAK.load(Ordering::SeqCst);
    assert!(
        peak > 4 * threads,
        "at most {peak} asleep at once on {threads} threads"
    );
}

/// A test of its own can be async too.
#[tokio::test]
async fn the_kit_works_from_an_async_test() {
    let svc = TestService::<Waiter>::new();
    assert_eq!(svc.call("inc", json!([41])), Ok(json!(42)));
}
