//! The `demo` service of the Commissaire service guide: `ping`, `echo`,
//! `fail`, plus a few methods that show what the host does with panics,
//! optional arguments, converted errors and a plugin's logs.

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
        tracing::info!(%greeting, "demo starting");
        Ok(Self { greeting })
    }

    /// Answers "pong". Takes no bus arguments.
    fn on_ping(&self) -> Result<String, RpcError> {
        Ok("pong".to_owned())
    }

    /// Returns `words` unchanged.
    fn on_echo(&self, words: Value) -> Result<Value, RpcError> {
        Ok(words)
    }

    /// Always fails, like the guide's `NotImplementedError`.
    fn on_fail(&self) -> Result<(), RpcError> {
        Err(RpcError::new(-20000, "I was never created")
            .with_data(json!({"exception": "NotImplementedError"})))
    }

    /// Greets `name` (or the world) with the configured greeting.
    fn on_greet(&self, name: Option<String>) -> Result<String, RpcError> {
        let name = name.as_deref().unwrap_or("world");
        Ok(format!("{}, {name}!", self.greeting))
    }

    /// Fails with any code and message, to show pass-through.
    fn on_raise(&self, code: i64, message: String) -> Result<(), RpcError> {
        Err(RpcError::new(code, message))
    }

    /// Panics (the host answers -32603 and carries on).
    fn on_panic(&self) -> Result<(), RpcError> {
        panic!("demo panic on request")
    }

    /// Logs `words` as a warning, then panics: the quarantine keeps the
    /// line with the request (`quarantine show`).
    fn on_log_and_panic(&self, words: String) -> Result<(), RpcError> {
        tracing::warn!(%words, "about to panic");
        panic!("demo panic after logging")
    }

    /// Aborts the whole process, as a segfault in native code would: on a
    /// broker only this worker dies, its requests go to another worker,
    /// and after `crash_limit` crashes the request is refused with -32603.
    fn on_abort(&self) -> Result<(), RpcError> {
        std::process::abort()
    }

    /// Sleeps `ms` milliseconds, then answers "slept": a slow or hung
    /// handler, for `handler_timeout`.
    fn on_sleep(&self, ms: u64) -> Result<String, RpcError> {
        std::thread::sleep(std::time::Duration::from_millis(ms));
        Ok("slept".to_owned())
    }

    /// Sleeps `ms` milliseconds on the plugin's runtime, then answers
    /// "napped": an async handler that waits without holding a thread
    /// (cancelled at `handler_timeout`).
    async fn on_nap(&self, ms: u64) -> Result<String, RpcError> {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        Ok("napped".to_owned())
    }

    /// Blocks its runtime thread for `ms` milliseconds inside an async
    /// handler, as a misbehaving one would: the watchdog's to catch.
    async fn on_block(&self, ms: u64) -> Result<String, RpcError> {
        std::thread::sleep(std::time::Duration::from_millis(ms));
        Ok("blocked".to_owned())
    }

    /// Increments `key` in the Redis at `url` with an async client: a
    /// real library, on the plugin's runtime (its reactor, its timers).
    async fn on_redis_incr(&self, url: String, key: String) -> Result<i64, RpcError> {
        let client = redis::Client::open(url.as_str())
            .map_err(|e| RpcError::invalid_params(format!("the Redis URL: {e}")))?;
        let mut redis = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| RpcError::internal_error(format!("cannot reach Redis: {e}")))?;
        redis::cmd("INCR")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .map_err(|e| RpcError::internal_error(format!("INCR failed: {e}")))
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
            "trace_id": msg.trace_id(),
            "traceparent": msg.traceparent(),
            "remaining_ms": msg.remaining().map(|r| r.as_millis() as u64),
        }))
    }

    /// Parses `text` as JSON.
    ///
    /// A `serde_json::Error` becomes -32603 with its text.
    fn on_parse(&self, text: String) -> Result<Value, serde_json::Error> {
        serde_json::from_str(&text)
    }

    /// Logs `words` at every level, then answers "logged".
    ///
    /// From the handler (with `tracing`, with `log` as a dependency would,
    /// and with `msg.log_info`) and from a thread of its own; the host
    /// records what its `COMMISSAIRE_LOG` lets through.
    fn on_chatter(&self, msg: &Message, words: String) -> Result<&'static str, RpcError> {
        let span = tracing::info_span!("chatter", words = words.len());
        let _entered = span.enter();
        tracing::trace!(%words, "trace");
        tracing::debug!(%words, "debug");
        tracing::info!(%words, "info");
        tracing::warn!(%words, "warn");
        tracing::error!(%words, "error");
        log::info!(target: "chatty_dependency", "log record: {words}");
        msg.log_info(&format!("log_info: {words}"));
        let thread_words = words.clone();
        std::thread::spawn(move || tracing::info!(words = %thread_words, "from a thread"))
            .join()
            .map_err(|_| RpcError::internal_error("the logging thread panicked"))?;
        Ok("logged")
    }

    /// Writes `line` to the process's stdout, as a careless plugin might:
    /// the host logs it, and never reads it as one of its own lines.
    fn on_print(&self, line: String) -> Result<(), RpcError> {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .map_err(|e| RpcError::internal_error(e.to_string()))
    }

    /// Sends `params` as a notification to `routing_key`.
    fn on_relay(&self, msg: &Message, routing_key: String, params: Value) -> Result<(), RpcError> {
        msg.bus().notify(&routing_key, params)
    }

    /// Publishes `body` as it is (no JSON-RPC envelope) to `routing_key`,
    /// as Commissaire services announce events.
    fn on_announce(
        &self,
        msg: &Message,
        routing_key: String,
        body: String,
    ) -> Result<(), RpcError> {
        msg.bus().publish(&routing_key, &body)
    }

    /// Requests `routing_key` with `params` over the bus and returns its
    /// result: within `timeout_ms` when given, else the host's default
    /// (`[bus] request_timeout`).
    fn on_ask(
        &self,
        msg: &Message,
        routing_key: String,
        params: Value,
        timeout_ms: Option<u64>,
    ) -> Result<Value, RpcError> {
        match timeout_ms {
            Some(ms) => msg.bus().request_with_timeout(
                &routing_key,
                params,
                std::time::Duration::from_millis(ms),
            ),
            None => msg.bus().request(&routing_key, params),
        }
    }

    /// Sends `result` to `queue` as a reply to this request's id, outside
    /// the request/reply cycle, then answers "responded".
    fn on_later(
        &self,
        msg: &Message,
        queue: String,
        result: Value,
    ) -> Result<&'static str, RpcError> {
        msg.bus().respond(&queue, msg.id(), result)?;
        Ok("responded")
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
    fn a_handler_knows_the_time_left() {
        let svc = TestService::<Demo>::new();
        let seen = svc.call("whoami", json!([])).unwrap();
        let left = seen["remaining_ms"].as_u64().unwrap();
        let full = commissaire_plugin_api::testing::TEST_TIMEOUT.as_millis() as u64;
        assert!(left <= full && left > full - 5_000, "{seen}");
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
    fn a_converted_error_carries_its_text() {
        let svc = TestService::<Demo>::new();
        assert_eq!(svc.call("parse", json!(["[1]"])), Ok(json!([1])));
        let err = svc.call("parse", json!(["[1"])).unwrap_err();
        assert_eq!(err.code, RpcError::INTERNAL_ERROR);
        assert!(err.message.contains("EOF while parsing"), "{}", err.message);
    }

    #[test]
    fn ask_requests_with_the_timeout_given_and_later_responds() {
        let svc = TestService::<Demo>::new().with_route("simple.*", |_, _| Ok(json!(3)));
        assert_eq!(svc.call("ask", json!(["simple.add", [1, 2]])), Ok(json!(3)));
        assert_eq!(
            svc.call("ask", json!(["simple.add", [1, 2], 1500])),
            Ok(json!(3))
        );
        let timeouts: Vec<_> = svc.requests().into_iter().map(|(_, _, t)| t).collect();
        assert_eq!(
            timeouts,
            [None, Some(std::time::Duration::from_millis(1500))]
        );
        assert_eq!(
            svc.call("later", json!(["elsewhere", {"done": true}])),
            Ok(json!("responded"))
        );
        assert_eq!(svc.responses().len(), 1);
        assert_eq!(svc.responses()[0].0, "elsewhere");
        assert_eq!(svc.responses()[0].2, json!({"done": true}));
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
