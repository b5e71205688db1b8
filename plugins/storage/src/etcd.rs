//! A blocking client of etcd's v2 keys API (`/v2/keys/...`), the API the
//! original's python-etcd speaks: one pooled HTTP agent per store, every
//! call bounded in time.

use std::time::Duration;

use serde_json::Value;

use crate::config::{ConfigError, HandlerDef};
use crate::error::StorageError;
use crate::tls;

/// How long a connection to etcd may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one call to etcd may take in all.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest etcd answer read (a recursive listing of every model).
const MAX_ANSWER: u64 = 64 * 1024 * 1024;
/// Idle connections kept for reuse: one per worker thread is plenty.
const IDLE_CONNECTIONS: usize = 64;

/// One node of an etcd answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub key: String,
    /// `None` for a directory.
    pub value: Option<String>,
    pub nodes: Vec<Node>,
}

impl Node {
    fn from_json(v: &Value) -> Self {
        Self {
            key: v
                .get("key")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            value: v.get("value").and_then(Value::as_str).map(str::to_owned),
            nodes: v
                .get("nodes")
                .and_then(Value::as_array)
                .map(|ns| ns.iter().map(Node::from_json).collect())
                .unwrap_or_default(),
        }
    }

    /// The values of every leaf under this node, depth first (a recursive
    /// read's items).
    pub fn leaf_values(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.collect_leaves(&mut out);
        out
    }

    fn collect_leaves<'a>(&'a self, out: &mut Vec<&'a str>) {
        if let Some(v) = &self.value {
            out.push(v);
        }
        for n in &self.nodes {
            n.collect_leaves(out);
        }
    }
}

/// What a write answered.
#[derive(Debug)]
pub struct Written {
    pub node: Node,
    /// etcd answered 201 Created: the key is new (python-etcd's `newKey`).
    pub created: bool,
}

/// What a delete answered: the node as it was.
#[derive(Debug)]
pub struct Deleted {
    pub prev_node: Option<Node>,
}

/// An etcd server, by its client URL.
#[derive(Debug, Clone)]
pub struct EtcdClient {
    base: String,
    agent: ureq::Agent,
    /// Whether it speaks TLS, and shows etcd a client certificate (for
    /// the hint when etcd refuses the handshake).
    tls: Option<tls::Shown>,
}

impl EtcdClient {
    /// A client of the etcd `handler` names (`server_url`, and over
    /// `https://` its `certificate_*` files, read here: a bad one is an
    /// error now, not on a request).
    pub fn new(handler: &HandlerDef) -> Result<Self, ConfigError> {
        let server_url = handler.server_url();
        let (config, tls) = if handler.uses_tls() {
            let files = handler.tls_files();
            let shown = match files.client {
                Some(_) => tls::Shown::ClientCert,
                None => tls::Shown::Nothing,
            };
            (tls::tls_config(&handler.name, files)?, Some(shown))
        } else {
            (tls::no_tls(), None)
        };
        let agent = ureq::Agent::config_builder()
            .tls_config(config)
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(CALL_TIMEOUT))
            .max_idle_connections(IDLE_CONNECTIONS)
            .max_idle_connections_per_host(IDLE_CONNECTIONS)
            .build()
            .into();
        Ok(Self {
            base: server_url.trim_end_matches('/').to_owned(),
            agent,
            tls,
        })
    }

    fn url(&self, key: &str) -> String {
        format!("{}/v2/keys{}", self.base, crate::url_path(key))
    }

    /// Reads `key`; with `recursive`, every node below it too (sorted by
    /// key, so lists come out in a stable order).
    pub fn get(&self, key: &str, recursive: bool) -> Result<Node, StorageError> {
        let mut request = self.agent.get(self.url(key));
        if recursive {
            request = request.query("recursive", "true").query("sorted", "true");
        }
        let (_, answer) = self.answer(request.call())?;
        Ok(Node::from_json(answer.get("node").unwrap_or(&Value::Null)))
    }

    /// Sets `key` to `value`.
    pub fn set(&self, key: &str, value: &str) -> Result<Written, StorageError> {
        let response = self.agent.put(self.url(key)).send_form([("value", value)]);
        let (status, answer) = self.answer(response)?;
        Ok(Written {
            node: Node::from_json(answer.get("node").unwrap_or(&Value::Null)),
            created: status == 201,
        })
    }

    /// Deletes the (non-directory) `key`.
    pub fn delete(&self, key: &str) -> Result<Deleted, StorageError> {
        let (_, answer) = self.answer(self.agent.delete(self.url(key)).call())?;
        Ok(Deleted {
            prev_node: answer.get("prevNode").map(Node::from_json),
        })
    }

    /// The status and JSON of an answer; etcd's own errors as
    /// [`StorageError::Etcd`], anything else as [`StorageError::EtcdDown`].
    fn answer(
        &self,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(u16, Value), StorageError> {
        let down = |why: String| StorageError::EtcdDown(format!("{why} (etcd at {})", self.base));
        let mut response = response.map_err(|e| down(tls::why_failed(&e, self.tls)))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_string()
            .map_err(|e| down(e.to_string()))?;
        let answer: Value = serde_json::from_str(&text)
            .map_err(|e| down(format!("an answer that is not etcd's (HTTP {status}): {e}")))?;
        if let Some(code) = answer.get("errorCode").and_then(Value::as_i64) {
            let text = |k: &str| {
                answer
                    .get(k)
                    .map(|v| match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .unwrap_or_default()
            };
            return Err(StorageError::Etcd {
                code,
                message: text("message"),
                cause: text("cause"),
            });
        }
        if !(200..300).contains(&status) {
            return Err(down(format!("HTTP {status} without an etcd error")));
        }
        Ok((status, answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_of_a_recursive_read() {
        let v = serde_json::json!({"key": "/d", "dir": true, "nodes": [
            {"key": "/d/a", "value": "1"},
            {"key": "/d/s", "dir": true, "nodes": [{"key": "/d/s/b", "value": "2"}]}]});
        assert_eq!(Node::from_json(&v).leaf_values(), ["1", "2"]);
    }
}
