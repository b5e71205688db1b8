//! An async client of etcd's v2 keys API (`/v2/keys/...`), the API the
//! original's python-etcd speaks: one pooled hyper client per store (built
//! once, its connections reused by every call of every handler), every
//! call bounded in time.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{ConfigError, HandlerDef};
use crate::deadline::Deadline;
use crate::error::StorageError;
use crate::tls;

/// How long a connection to etcd may take to open (TCP, and then the
/// TLS handshake).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one call to etcd may take in all (less when the request's
/// deadline is nearer).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest etcd answer read (a recursive listing of every model).
const MAX_ANSWER: usize = 64 * 1024 * 1024;
/// Idle connections kept for reuse: more than a worker has calls in
/// flight at once is waste.
const IDLE_CONNECTIONS: usize = 64;
/// How long an idle connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

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
    client: Client<Connector, Full<Bytes>>,
    /// Whether it speaks TLS, and shows etcd a client certificate (for
    /// the hint when etcd refuses the handshake).
    tls: Option<tls::Shown>,
}

impl EtcdClient {
    /// A client of the etcd `handler` names (`server_url`, and over
    /// `https://` its `certificate_*` files, read here: a bad one is an
    /// error now, not on a request). Needs no runtime: connections are
    /// opened on the first calls, on the runtime the handlers run on.
    pub fn new(handler: &HandlerDef) -> Result<Self, ConfigError> {
        let server_url = handler.server_url();
        let (tls_connector, tls) = if handler.uses_tls() {
            let files = handler.tls_files();
            let shown = match files.client {
                Some(_) => tls::Shown::ClientCert,
                None => tls::Shown::Nothing,
            };
            let config = tls::tls_config(&handler.name, files)?;
            (Some(TlsConnector::from(config)), Some(shown))
        } else {
            (None, None)
        };
        let mut http = HttpConnector::new();
        // https:// too: the TLS is ours, on top.
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_max_idle_per_host(IDLE_CONNECTIONS)
            .build(Connector {
                http,
                tls: tls_connector,
            });
        Ok(Self {
            base: server_url.trim_end_matches('/').to_owned(),
            client,
            tls,
        })
    }

    fn url(&self, key: &str) -> String {
        format!("{}/v2/keys{}", self.base, crate::url_path(key))
    }

    /// Reads `key`; with `recursive`, every node below it too (sorted by
    /// key, so lists come out in a stable order). Every call is bounded by
    /// the request's `deadline` too.
    pub async fn get(
        &self,
        key: &str,
        recursive: bool,
        deadline: Deadline,
    ) -> Result<Node, StorageError> {
        let mut url = self.url(key);
        if recursive {
            url.push_str("?recursive=true&sorted=true");
        }
        let (_, answer) = self.call(Method::GET, url, None, deadline).await?;
        Ok(Node::from_json(answer.get("node").unwrap_or(&Value::Null)))
    }

    /// Sets `key` to `value`.
    pub async fn set(
        &self,
        key: &str,
        value: &str,
        deadline: Deadline,
    ) -> Result<Written, StorageError> {
        let form = format!("value={}", crate::form_value(value));
        let (status, answer) = self
            .call(Method::PUT, self.url(key), Some(form), deadline)
            .await?;
        Ok(Written {
            node: Node::from_json(answer.get("node").unwrap_or(&Value::Null)),
            created: status == 201,
        })
    }

    /// Deletes the (non-directory) `key`.
    pub async fn delete(&self, key: &str, deadline: Deadline) -> Result<Deleted, StorageError> {
        let (_, answer) = self
            .call(Method::DELETE, self.url(key), None, deadline)
            .await?;
        Ok(Deleted {
            prev_node: answer.get("prevNode").map(Node::from_json),
        })
    }

    fn down(&self, why: String) -> StorageError {
        StorageError::EtcdDown(format!("{why} (etcd at {})", self.base))
    }

    /// Sends one request (`form`: a form-encoded body) and reads its
    /// answer, within [`CALL_TIMEOUT`] and the request's deadline.
    async fn call(
        &self,
        method: Method,
        url: String,
        form: Option<String>,
        deadline: Deadline,
    ) -> Result<(u16, Value), StorageError> {
        let uri: Uri = url
            .parse()
            .map_err(|e| self.down(format!("the URL {url}: {e}")))?;
        let mut request = Request::builder().method(method).uri(uri);
        if form.is_some() {
            request = request.header(
                hyper::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            );
        }
        let request = request
            .body(Full::new(Bytes::from(form.unwrap_or_default())))
            .map_err(|e| self.down(format!("the request to {url}: {e}")))?;
        let limit = deadline.limit(CALL_TIMEOUT);
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| self.down(tls::why_failed(&e, self.tls)))?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| self.down(tls::why_failed(&*e, self.tls)))?
                .to_bytes();
            Ok::<_, StorageError>((status, body))
        };
        let (status, body) = tokio::time::timeout(limit, exchange).await.map_err(|_| {
            self.down(format!(
                "timeout: no answer within {} ms",
                limit.as_millis()
            ))
        })??;
        self.answer(status, &body)
    }

    /// The status and JSON of an answer; etcd's own errors as
    /// [`StorageError::Etcd`], anything else as [`StorageError::EtcdDown`].
    fn answer(&self, status: u16, body: &[u8]) -> Result<(u16, Value), StorageError> {
        let answer: Value = serde_json::from_slice(body)
            .map_err(|e| self.down(format!("an answer that is not etcd's (HTTP {status}): {e}")))?;
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
            return Err(self.down(format!("HTTP {status} without an etcd error")));
        }
        Ok((status, answer))
    }
}

/// Opens a connection to etcd: TCP, then TLS for a TLS handler.
#[derive(Clone)]
struct Connector {
    http: HttpConnector,
    tls: Option<TlsConnector>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

type BoxError = Box<dyn StdError + Send + Sync>;

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<EtcdStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower_service::Service::<Uri>::poll_ready(&mut self.http, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut http = self.http.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let tcp = http.call(uri).await?.into_inner();
            let Some(tls) = tls else {
                return Ok(TokioIo::new(EtcdStream::Plain(tcp)));
            };
            let name = rustls::pki_types::ServerName::try_from(host)?;
            // Bounded here too: the pool may finish a connection whose
            // call gave up, and a hung etcd must not keep it forever.
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(name, tcp))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "timeout: the TLS handshake")
                })??;
            Ok(TokioIo::new(EtcdStream::Tls(Box::new(stream))))
        })
    }
}

/// A connection to etcd, plain or TLS.
#[derive(Debug)]
enum EtcdStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for EtcdStream {
    fn connected(&self) -> Connected {
        match self {
            EtcdStream::Plain(s) => s.connected(),
            EtcdStream::Tls(s) => s.get_ref().0.connected(),
        }
    }
}

impl AsyncRead for EtcdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            EtcdStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            EtcdStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for EtcdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            EtcdStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            EtcdStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            EtcdStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            EtcdStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            EtcdStream::Plain(s) => s.is_write_vectored(),
            EtcdStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            EtcdStream::Plain(s) => Pin::new(s).poll_flush(cx),
            EtcdStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            EtcdStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            EtcdStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
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
