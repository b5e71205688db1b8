//! An async client of custodia's secrets API over its Unix socket, as
//! the original's custodia store speaks it: HTTP/1.1 with
//! `REMOTE_USER: commissaire`, one connection per call (custodia closes
//! each), every call bounded in time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use crate::deadline::Deadline;

/// How long one call to custodia may take in all (less when the
/// request's deadline is nearer).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer read (a secret is a few KiB).
const MAX_ANSWER: usize = 1024 * 1024;

/// An answer: its status, reason phrase and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub reason: String,
    pub body: Vec<u8>,
}

/// Why a call did not get an answer.
#[derive(Debug, thiserror::Error)]
#[error("custodia at {socket} did not answer: {source}")]
pub struct CustodiaDown {
    socket: String,
    #[source]
    source: std::io::Error,
}

/// A custodia server, by its socket.
#[derive(Debug, Clone)]
pub struct CustodiaClient {
    socket: PathBuf,
}

impl CustodiaClient {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
        }
    }

    /// The URL the original's requests named in its errors:
    /// `http+unix://<socket, percent-encoded>/<path>`.
    pub fn url(&self, path: &str) -> String {
        let mut quoted = String::new();
        for b in self.socket.to_string_lossy().bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                quoted.push(char::from(b));
            } else {
                quoted.push_str(&format!("%{b:02X}"));
            }
        }
        format!("http+unix://{quoted}{path}")
    }

    /// Sends `method path` with `body` (and its content type), within
    /// [`CALL_TIMEOUT`] and the request's `deadline`.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
        accept: Option<&str>,
        deadline: Deadline,
    ) -> Result<Answer, CustodiaDown> {
        let limit = deadline.limit(CALL_TIMEOUT);
        let answer = tokio::time::timeout(limit, self.exchange(method, path, body, accept))
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("timeout: no answer within {} ms", limit.as_millis()),
                ))
            });
        answer.map_err(|source| CustodiaDown {
            socket: self.socket.display().to_string(),
            source,
        })
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
        accept: Option<&str>,
    ) -> std::io::Result<Answer> {
        let stream = UnixStream::connect(&self.socket).await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        // The connection's own task, ended with this call (answered,
        // timed out or dropped) so that a hung custodia keeps nothing.
        let _connection = AbortOnDrop(tokio::spawn(connection).abort_handle());
        let (content_type, data) = body.unwrap_or(("", b""));
        let mut request = Request::builder()
            .method(method)
            .uri(crate::url_path(path))
            .header("Host", "localhost")
            .header("REMOTE_USER", "commissaire")
            .header("Connection", "close");
        if let Some(accept) = accept {
            request = request.header("Accept", accept);
        }
        if body.is_some() {
            request = request.header("Content-Type", content_type);
        }
        let request = request
            .header("Content-Length", data.len())
            .body(Full::new(Bytes::copy_from_slice(data)))
            .map_err(std::io::Error::other)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(std::io::Error::other)?;
        let status = response.status();
        let reason = response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
            .or_else(|| status.canonical_reason().map(str::to_owned))
            .unwrap_or_default();
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes()
            .to_vec();
        Ok(Answer {
            status: status.as_u16(),
            reason,
            body,
        })
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_originals_url() {
        let c = CustodiaClient::new(Path::new("/var/run/custodia/custodia.sock"));
        assert_eq!(
            c.url("/secrets/hosts/10.0.0.1"),
            "http+unix://%2Fvar%2Frun%2Fcustodia%2Fcustodia.sock/secrets/hosts/10.0.0.1"
        );
    }
}
