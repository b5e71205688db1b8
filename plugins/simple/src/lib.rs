//! The `simple` service: Commissaire's example, as a commissaire-host plugin.

use commissaire_plugin_api::prelude::*;

/// Adds numbers, directly or by asking itself over the bus.
#[derive(Debug, Default)]
pub struct Simple;

/// Adds numbers, directly or by asking itself over the bus.
#[service(name = "simple")]
impl Simple {
    /// Adds two integers.
    fn on_add(&self, x: i64, y: i64) -> Result<i64, RpcError> {
        x.checked_add(y).ok_or_else(|| {
            RpcError::invalid_params(format!("{x} + {y} overflows a 64-bit integer"))
        })
    }

    /// Adds two integers by calling `simple.add` over the bus, and says so.
    fn on_wordy_add(&self, msg: &Message, x: i64, y: i64) -> Result<String, RpcError> {
        let sum: i64 = msg.bus().request("simple.add", [x, y])?;
        Ok(format!("Adding {x} plus {y} results in {sum}"))
    }

    /// Adds two integers, as an async handler with nothing to await: what
    /// the async path itself costs (`scripts/bench.sh`'s `host-async`).
    async fn on_add_async(&self, x: i64, y: i64) -> Result<i64, RpcError> {
        self.on_add(x, y)
    }

    /// Adds two integers by calling `simple.add` over the bus, as an async
    /// handler: no thread waits for the reply.
    async fn on_async_add(&self, msg: &Message, x: i64, y: i64) -> Result<i64, RpcError> {
        msg.bus().request_async("simple.add", [x, y]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use commissaire_plugin_api::testing::TestService;

    #[test]
    fn add_by_position_and_by_name() {
        let svc = TestService::<Simple>::new();
        assert_eq!(svc.call("add", json!([1, 2])), Ok(json!(3)));
        assert_eq!(svc.call("add", json!({"y": 2, "x": 40})), Ok(json!(42)));
    }

    #[test]
    fn add_overflow_is_an_error_not_a_panic() {
        let svc = TestService::<Simple>::new();
        let err = svc.call("add", json!([i64::MAX, 1])).unwrap_err();
        assert_eq!(err.code, RpcError::INVALID_PARAMS);
    }

    #[test]
    fn wordy_add_calls_add_over_the_bus() {
        let svc = TestService::<Simple>::new();
        assert_eq!(
            svc.call("wordy_add", json!([1, 2])),
            Ok(json!("Adding 1 plus 2 results in 3"))
        );
    }

    #[test]
    fn async_add_awaits_add_over_the_bus() {
        let svc = TestService::<Simple>::new();
        assert_eq!(svc.call("async_add", json!([40, 2])), Ok(json!(42)));
        let svc = TestService::<Simple>::new()
            .with_route("simple.add", |_, _| Err(RpcError::new(409, "busy")));
        assert_eq!(
            svc.call("async_add", json!([1, 2])),
            Err(RpcError::new(409, "busy"))
        );
    }

    #[test]
    fn wordy_add_passes_on_the_error_of_add() {
        let svc = TestService::<Simple>::new()
            .with_route("simple.*", |_, _| Err(RpcError::new(409, "busy")));
        assert_eq!(
            svc.call("wordy_add", json!([1, 2])),
            Err(RpcError::new(409, "busy"))
        );
    }
}
