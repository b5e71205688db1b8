//! A blocking client of custodia's secrets API over its Unix socket, as
//! the original's custodia store speaks it: HTTP/1.1 with
//! `REMOTE_USER: commissaire`, one connection per call (custodia closes
//! each), every call bounded in time.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a read or write on the socket may wait.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer read (a secret is a few KiB).
const MAX_ANSWER: u64 = 1024 * 1024;

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

    /// Sends `method path` with `body` (and its content type).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
        accept: Option<&str>,
    ) -> Result<Answer, CustodiaDown> {
        self.exchange(method, path, body, accept)
            .map_err(|source| CustodiaDown {
                socket: self.socket.display().to_string(),
                source,
            })
    }

    fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
        accept: Option<&str>,
    ) -> std::io::Result<Answer> {
        let mut stream = UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut head = format!(
            "{method} {} HTTP/1.1\r\nHost: localhost\r\nREMOTE_USER: commissaire\r\nConnection: close\r\n",
            crate::url_path(path)
        );
        if let Some(accept) = accept {
            head.push_str(&format!("Accept: {accept}\r\n"));
        }
        let (content_type, data) = body.unwrap_or(("", b""));
        if body.is_some() {
            head.push_str(&format!("Content-Type: {content_type}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", data.len()));
        stream.write_all(head.as_bytes())?;
        stream.write_all(data)?;
        let mut raw = Vec::new();
        (&mut stream).take(MAX_ANSWER).read_to_end(&mut raw)?;
        parse(&raw).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "an answer that is not HTTP",
            )
        })
    }
}

/// Status, reason and body of an HTTP/1.x answer read to its end.
fn parse(raw: &[u8]) -> Option<Answer> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.splitn(3, ' ');
    let _version = parts.next()?;
    let status: u16 = parts.next()?.parse().ok()?;
    let reason = parts.next().unwrap_or_default().to_owned();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                let len: usize = value.trim().parse().ok()?;
                body.truncate(len);
            }
        }
    }
    Some(Answer {
        status,
        reason,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_answer() {
        let a = parse(b"HTTP/1.0 404 Not Found\r\nContent-Length: 2\r\n\r\nabXX").unwrap();
        assert_eq!(
            (a.status, a.reason.as_str(), a.body.as_slice()),
            (404, "Not Found", &b"ab"[..])
        );
        assert!(parse(b"garbage").is_none());
    }

    #[test]
    fn the_originals_url() {
        let c = CustodiaClient::new(Path::new("/var/run/custodia/custodia.sock"));
        assert_eq!(
            c.url("/secrets/hosts/10.0.0.1"),
            "http+unix://%2Fvar%2Frun%2Fcustodia%2Fcustodia.sock/secrets/hosts/10.0.0.1"
        );
    }
}
