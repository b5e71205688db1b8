//! The `demo` service of the Commissaire service guide: `ping`, `echo`,
//! `fail`, plus a few methods that show what the host does with panics and
//! optional arguments.

use commissaire_plugin_api::prelude::*;

/// The service guide's example service.
#[derive(Debug)]
pub struct Demo {
    greeting: String,
}

/// The service guide's example service.
#[service(name = "demo")]
impl Demo {
    /// Builds the service from its config section; `greeting` defaults to
    /// "hello".
    fn init(config: Value) -> Result<Self, RpcError> {
        let greeting = match config.get("greeting") {
            None | Some(Value::Null) => "hello".to_owned(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(RpcError::invalid_params(format!(
                    "`greeting` must be a string, not {other}"
                )))
            }
        };
        Ok(Self { greeting })
    }

    /// Answers "pong". Takes no bus arguments.
    fn on_ping(&self, _msg: &Message) -> Result<String, RpcError> {
        Ok("pong".to_owned())
    }

    /// Returns `words` unchanged.
    fn on_echo(&self, _msg: &Message, words: Value) -> Result<Value, RpcError> {
        Ok(words)
    }

    /// Always fails, like the guide's `NotImplementedError`.
    fn on_fail(&self, _msg: &Message) -> Result<(), RpcError> {
        Err(RpcError::new(-20000, "I was never created")
            .with_data(json!({"exception": "NotImplementedError"})))
    }

    /// Greets `name` (or the world) with the configured greeting.
    fn on_greet(&self, _msg: &Message, name: Option<String>) -> Result<String, RpcError> {
        let name = name.as_deref().unwrap_or("world");
        Ok(format!("{}, {name}!", self.greeting))
    }

    /// Fails with any code and message, to show pass-through.
    fn on_raise(&self, _msg: &Message, code: i64, message: String) -> Result<(), RpcError> {
        Err(RpcError::new(code, message))
    }

    /// Panics (the host answers -32603 and carries on).
    fn on_panic(&self, _msg: &Message) -> Result<(), RpcError> {
        panic!("demo panic on request")
    }

    /// Aborts the whole process, as a segfault in native code would: on a
    /// broker only this worker dies, its requests go to another worker,
    /// and after `crash_limit` crashes the request is refused with -32603.
    fn on_abort(&self, _msg: &Message) -> Result<(), RpcError> {
        std::process::abort()
    }

    /// Sleeps `ms` milliseconds, then answers "slept": a slow or hung
    /// handler, for `handler_timeout`.
    fn on_sleep(&self, _msg: &Message, ms: u64) -> Result<String, RpcError> {
        std::thread::sleep(std::time::Duration::from_millis(ms));
        Ok("slept".to_owned())
    }

    /// Tells what the handler sees of its message.
    fn on_whoami(&self, msg: &Message) -> Result<Value, RpcError> {
        Ok(json!({
            "routing_key": msg.routing_key(),
            "method": msg.method(),
            "id": msg.id(),
            "reply_to": msg.reply_to(),
            "correlation_id": msg.correlation_id(),
            "redelivered": msg.redelivered(),
            "exchange": msg.exchange(),
        }))
    }

    /// Sends `params` as a notification to `routing_key`.
    fn on_relay(&self, msg: &Message, routing_key: String, params: Value) -> Result<(), RpcError> {
        msg.bus().notify(&routing_key, params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use commissaire_plugin_api::testing::TestService;

    #[test]
    fn the_guide_methods() {
        let svc = TestService::<Demo>::new();
        assert_eq!(svc.call("ping", Value::Null), Ok(json!("pong")));
        assert_eq!(svc.call("echo", json!(["hi"])), Ok(json!("hi")));
        assert_eq!(svc.call("fail", json!([])).unwrap_err().code, -20000);
    }

    #[test]
    fn config_reaches_init() {
        let svc = TestService::<Demo>::with_config(json!({"greeting": "hi"})).unwrap();
        assert_eq!(svc.call("greet", json!(["bob"])), Ok(json!("hi, bob!")));
        let bad = TestService::<Demo>::with_config(json!({"greeting": 3})).unwrap_err();
        assert_eq!(bad.code, RpcError::INVALID_PARAMS);
    }

    #[test]
    fn panic_becomes_internal_error() {
        let svc = TestService::<Demo>::new();
        let err = svc.call("panic", json!([])).unwrap_err();
        assert_eq!(err.code, RpcError::INTERNAL_ERROR);
        assert!(
            err.message.contains("demo panic on request"),
            "{}",
            err.message
        );
        assert_eq!(svc.call("ping", json!([])), Ok(json!("pong")));
    }

    #[test]
    fn relay_sends_a_notification() {
        let svc = TestService::<Demo>::new();
        svc.call("relay", json!(["simple.add", [1, 2]])).unwrap();
        assert_eq!(
            svc.notifications(),
            vec![("simple.add".to_owned(), json!([1, 2]))]
        );
    }
}
