//! A raw HTTP/1.1 client for the endpoint's tests: requests written byte
//! by byte as an attacker would, replies read to the end of the
//! connection.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

/// An HTTP answer, read to the end.
#[derive(Debug)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// Header names in lower case.
    pub headers: HashMap<String, String>,
    /// The body as JSON (a string when it is not JSON, null when empty).
    pub body: Value,
}

/// Sends `head` (request line and headers, without the blank line) and
/// `body` on a connection of its own, with `Connection: close`.
pub fn send(addr: SocketAddr, head: &str, body: &[u8]) -> Reply {
    try_send(addr, head, body).expect("an HTTP reply")
}

/// [`send`], the failure to get a reply returned.
pub fn try_send(addr: SocketAddr, head: &str, body: &[u8]) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut request = format!(
        "{head}\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request)?;
    try_read_reply(&mut stream)
}

/// The reply on `stream`.
pub fn read_reply(stream: &mut TcpStream) -> Reply {
    try_read_reply(stream).expect("an HTTP reply")
}

/// The reply on `stream`. A refusal may come before the whole request was
/// read; the reset that follows does not undo what already arrived.
pub fn try_read_reply(stream: &mut TcpStream) -> std::io::Result<Reply> {
    let mut raw = Vec::new();
    if let Err(e) = stream.read_to_end(&mut raw) {
        if raw.is_empty() {
            return Err(e);
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {text:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()))
    };
    Ok(Reply {
        status,
        headers,
        body,
    })
}
