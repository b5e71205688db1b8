//! What goes wrong in the storage service, and the JSON-RPC error each
//! answers with: the codes, messages and `data` the original sent, so
//! that callers matching on them keep working.

use commissaire_plugin_api::prelude::*;

use crate::pyfmt;

/// JSON-RPC code of a failed storage lookup (`StorageLookupError`).
pub const STORAGE_LOOKUP_ERROR: i64 = -20000;

/// A storage failure. Each variant stands for the Python exception the
/// original raised in that case; [`StorageError::into_rpc`] answers as
/// the original's service loop did.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A name that is not in a registry (`KeyError`; the message is the
    /// key's `repr`).
    #[error("{0}")]
    KeyError(String),
    /// Data that does not fit a model (`TypeError`).
    #[error("{0}")]
    TypeError(String),
    /// `model_json_data` given as a string that is not JSON.
    #[error("{0}")]
    BadJson(#[source] serde_json::Error),
    /// A model whose attributes fail validation (`ValidationError`).
    #[error("{}", validation_message(class, errors))]
    Validation {
        class: &'static str,
        errors: Vec<String>,
    },
    /// The model is not in the store (`StorageLookupError`).
    #[error("({STORAGE_LOOKUP_ERROR}) {message}")]
    Lookup {
        /// etcd's `message : cause`.
        message: String,
        class: &'static str,
        model_safe: Value,
    },
    /// etcd answered with an error of its own (`errorCode`).
    #[error("{message} : {cause}")]
    Etcd {
        code: i64,
        message: String,
        cause: String,
    },
    /// etcd could not be reached, or answered something that is not its
    /// API (`EtcdConnectionFailed`).
    #[error("Connection to etcd failed due to {0}")]
    EtcdDown(String),
    /// custodia answered an HTTP error (`requests.HTTPError`).
    #[error("{status} {} Error: {reason} for url: {url}", if *status >= 500 { "Server" } else { "Client" })]
    CustodiaHttp {
        status: u16,
        reason: String,
        url: String,
    },
    /// custodia could not be reached (`requests.ConnectionError`).
    #[error("{0}")]
    CustodiaDown(String),
}

fn validation_message(class: &str, errors: &[String]) -> String {
    let items: Vec<String> = errors.iter().map(|e| pyfmt::repr_str(e)).collect();
    format!(
        "({}, [{}])",
        pyfmt::repr_str(&format!(
            "{class} instance is invalid due to {} errors.",
            errors.len()
        )),
        items.join(", ")
    )
}

/// etcd's "Key not found".
pub const ETCD_KEY_NOT_FOUND: i64 = 100;

/// The python-etcd exception class for an etcd `errorCode`.
fn etcd_exception(code: i64) -> &'static str {
    match code {
        100 => "etcd.EtcdKeyNotFound",
        101 => "etcd.EtcdCompareFailed",
        102 => "etcd.EtcdNotFile",
        104 => "etcd.EtcdNotDir",
        105 => "etcd.EtcdAlreadyExist",
        108 => "etcd.EtcdDirNotEmpty",
        200..=299 => "etcd.EtcdValueError",
        300..=399 => "etcd.EtcdException",
        _ => "etcd.EtcdException",
    }
}

impl StorageError {
    /// The reply the original sent for this failure: its own code for a
    /// lookup error, else -32700 for bad JSON and -32600 for the rest,
    /// with the Python exception's class in `data.exception`.
    pub fn into_rpc(self) -> RpcError {
        let message = self.to_string();
        let exception = match &self {
            StorageError::Lookup {
                class, model_safe, ..
            } => {
                return RpcError::new(STORAGE_LOOKUP_ERROR, message).with_data(json!({
                    "model_json_data": [model_safe],
                    "model_type_name": class,
                }))
            }
            StorageError::BadJson(_) => {
                return RpcError::parse_error(message)
                    .with_data(json!({"exception": "<class 'json.decoder.JSONDecodeError'>"}))
            }
            StorageError::KeyError(_) => "KeyError".to_owned(),
            StorageError::TypeError(_) => "TypeError".to_owned(),
            StorageError::Validation { .. } => "commissaire.models.ValidationError".to_owned(),
            StorageError::Etcd { code, .. } => etcd_exception(*code).to_owned(),
            StorageError::EtcdDown(_) => "etcd.EtcdConnectionFailed".to_owned(),
            StorageError::CustodiaHttp { .. } => "requests.exceptions.HTTPError".to_owned(),
            StorageError::CustodiaDown(_) => "requests.exceptions.ConnectionError".to_owned(),
        };
        RpcError::invalid_request(message)
            .with_data(json!({"exception": format!("<class '{exception}'>")}))
    }
}

impl From<StorageError> for RpcError {
    fn from(e: StorageError) -> Self {
        e.into_rpc()
    }
}

/// A configuration the service cannot start with.
#[derive(Debug, thiserror::Error)]
#[error("storage configuration: {0}")]
pub struct ConfigError(pub String);
