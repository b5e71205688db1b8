//! [`RpcError`]: the JSON-RPC error a handler returns.

use std::fmt;

use abi_stable::std_types::{ROption, RString};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::abi::RpcErrorAbi;

/// A JSON-RPC error: `code`, `message` and optional `data`.
///
/// Return it from a handler to answer the caller with that error; the host
/// passes the code, message and data through untouched.
///
/// A handler may also return any error that converts into `RpcError`, and
/// `?` converts for it: [`std::io::Error`], [`serde_json::Error`],
/// `Box<dyn std::error::Error + Send + Sync>` (and `anyhow::Error` with the
/// `anyhow` feature) become -32603 "Internal error" **whose message is the
/// error's text, with its causes: the caller sees it**. Map an error yourself
/// when its text could carry something the caller must not see (a path, a
/// password in a URL), or when another code fits better.
///
/// ```
/// use commissaire_plugin_api::RpcError;
/// let e = RpcError::new(404, "no such host").with_data(serde_json::json!({"host": "10.0.0.1"}));
/// assert_eq!(e.code, 404);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcError {
    /// The error code: a standard JSON-RPC code or your own.
    pub code: i64,
    /// A human-readable message. Never put a stack trace or a secret here.
    pub message: String,
    /// Optional structured detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    /// -32700: the body is not valid JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// -32600: JSON, but not a valid request.
    pub const INVALID_REQUEST: i64 = -32600;
    /// -32601: no handler for the method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// -32602: the params do not fit the handler.
    pub const INVALID_PARAMS: i64 = -32602;
    /// -32603: the handler failed unexpectedly.
    pub const INTERNAL_ERROR: i64 = -32603;
    /// -32000: the host lacks a callback the plugin needs (an older host).
    pub const HOST_UNSUPPORTED: i64 = -32000;
    /// -20000: Commissaire's storage lookup error.
    pub const STORAGE_LOOKUP: i64 = -20000;
    /// -20001: Commissaire's container manager error.
    pub const CONTAINER_MANAGER: i64 = -20001;

    /// An error with any code.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }

    /// Attaches structured `data`.
    #[must_use]
    pub fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    /// -32700 Parse error.
    pub fn parse_error(message: impl Into<String>) -> Self {
        Self::new(Self::PARSE_ERROR, message)
    }

    /// -32600 Invalid Request.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(Self::INVALID_REQUEST, message)
    }

    /// -32601 Method not found, naming the method.
    pub fn method_not_found(method: &str) -> Self {
        Self::new(
            Self::METHOD_NOT_FOUND,
            format!("method not found: `{method}`"),
        )
    }

    /// -32602 Invalid params.
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(Self::INVALID_PARAMS, message)
    }

    /// -32603 Internal error.
    pub fn internal_error(message: impl Into<String>) -> Self {
        Self::new(Self::INTERNAL_ERROR, message)
    }

    /// -32000: the host does not offer `callback` (it is older than the
    /// plugin-api this plugin was built with).
    pub fn host_unsupported(callback: &str) -> Self {
        Self::new(
            Self::HOST_UNSUPPORTED,
            format!("this host does not support `{callback}`; it needs a newer commissaire-host"),
        )
    }

    /// -32603 carrying `error`'s text and the text of its causes
    /// (`outer: cause: root cause`).
    fn from_error(error: &(dyn std::error::Error + 'static)) -> Self {
        let mut text = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            // Many errors repeat their cause in their own text.
            if !text.ends_with(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        Self::internal_error(text)
    }

    /// Converts to the boundary form.
    pub(crate) fn into_abi(self) -> RpcErrorAbi {
        RpcErrorAbi {
            code: self.code,
            message: RString::from(self.message),
            data_json: self
                .data
                .map(|d| RString::from(d.to_string()))
                .map_or(ROption::RNone, ROption::RSome),
        }
    }

    /// Converts from the boundary form. Unreadable `data` is kept as a
    /// JSON string rather than dropped.
    pub(crate) fn from_abi(e: RpcErrorAbi) -> Self {
        let data = e.data_json.into_option().map(|text| {
            serde_json::from_str(text.as_str()).unwrap_or_else(|_| Value::String(text.into()))
        });
        Self {
            code: e.code,
            message: e.message.into(),
            data,
        }
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.message, self.code)
    }
}

impl std::error::Error for RpcError {}

/// -32603 with the error's text: the caller sees it.
impl From<std::io::Error> for RpcError {
    fn from(e: std::io::Error) -> Self {
        Self::from_error(&e)
    }
}

/// -32603 with the error's text: the caller sees it.
impl From<serde_json::Error> for RpcError {
    fn from(e: serde_json::Error) -> Self {
        Self::from_error(&e)
    }
}

/// -32603 with the error's text and causes: the caller sees them.
impl From<Box<dyn std::error::Error + Send + Sync>> for RpcError {
    fn from(e: Box<dyn std::error::Error + Send + Sync>) -> Self {
        Self::from_error(e.as_ref())
    }
}

/// -32603 with the error's text and its context chain (`{:#}`): the caller
/// sees it.
#[cfg(feature = "anyhow")]
impl From<anyhow::Error> for RpcError {
    fn from(e: anyhow::Error) -> Self {
        Self::internal_error(format!("{e:#}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_round_trip_keeps_code_message_and_data() {
        let e = RpcError::new(409, "conflict").with_data(serde_json::json!({"k": [1, 2]}));
        assert_eq!(RpcError::from_abi(e.clone().into_abi()), e);
    }

    #[test]
    fn std_errors_become_internal_errors_with_their_text() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no /etc/foo.toml");
        assert_eq!(
            RpcError::from(io),
            RpcError::internal_error("no /etc/foo.toml")
        );

        let json = serde_json::from_str::<u8>("300").unwrap_err();
        let text = json.to_string();
        assert_eq!(RpcError::from(json), RpcError::internal_error(text));
    }

    #[test]
    fn a_boxed_error_keeps_its_causes() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("cannot read the inventory")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let boxed: Box<dyn std::error::Error + Send + Sync> =
            Box::new(Outer(std::io::Error::other("permission denied")));
        let e = RpcError::from(boxed);
        assert_eq!(e.code, RpcError::INTERNAL_ERROR);
        assert_eq!(e.message, "cannot read the inventory: permission denied");
    }

    #[cfg(feature = "anyhow")]
    #[test]
    fn anyhow_errors_keep_their_context() {
        let e = anyhow::anyhow!("disk full").context("cannot save the report");
        assert_eq!(
            RpcError::from(e),
            RpcError::internal_error("cannot save the report: disk full")
        );
    }

    #[test]
    fn serializes_without_data_when_absent() {
        let text = serde_json::to_string(&RpcError::method_not_found("x")).unwrap_or_default();
        assert_eq!(text, r#"{"code":-32601,"message":"method not found: `x`"}"#);
    }
}
