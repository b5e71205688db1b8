//! The test Redis: its URIs, a minimal RESP client for what the tests
//! inspect and clean up, and the host spec on it.

use serde_json::Value;

use crate::host::HostSpec;

/// The Redis the tests use, without database number
/// (`COMMISSAIRE_TEST_REDIS` overrides; default `redis://127.0.0.1:6379`).
pub fn redis_server() -> String {
    std::env::var("COMMISSAIRE_TEST_REDIS")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
        .trim_end_matches('/')
        .to_owned()
}

/// Database `db` of the test Redis, with an optional query
/// (`?visibility_timeout=2`).
pub fn redis_uri(db: u8, query: &str) -> String {
    format!("{}/{db}{query}", redis_server())
}

impl HostSpec {
    /// `simple` and `demo` on database `db` of the test Redis, with fresh
    /// exchange and queue names.
    pub fn redis(db: u8) -> Self {
        Self {
            bus_uri: redis_uri(db, ""),
            ..Self::amqp()
        }
    }
}

/// A Redis reply, as the tests need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    /// A nil reply.
    Nil,
    /// An integer.
    Int(i64),
    /// A simple or bulk string (lossy UTF-8).
    Str(String),
    /// An array.
    Array(Vec<Resp>),
    /// An error reply.
    Error(String),
}

impl Resp {
    /// The strings of an array reply. Panics on anything else (an error
    /// reply above all: a failed `KEYS` or a `WRONGTYPE` is no empty
    /// list), and on an item that is not a string.
    pub fn strings(&self) -> Vec<String> {
        match self {
            Resp::Array(items) => items
                .iter()
                .map(|i| match i {
                    Resp::Str(s) => s.clone(),
                    other => panic!("Redis array item is not a string: {other:?} in {self:?}"),
                })
                .collect(),
            other => panic!("Redis replied {other:?}, not an array of strings"),
        }
    }

    /// The integer of an integer reply. Panics on anything else (an error
    /// reply above all: a `WRONGTYPE` is no 0).
    pub fn int(&self) -> i64 {
        match self {
            Resp::Int(i) => *i,
            other => panic!("Redis replied {other:?}, not an integer"),
        }
    }
}

fn read_resp(r: &mut impl std::io::BufRead) -> std::io::Result<Resp> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at(line.len().min(1));
    let bad = || std::io::Error::other(format!("bad RESP line {line:?}"));
    Ok(match kind {
        "+" => Resp::Str(rest.to_owned()),
        "-" => Resp::Error(rest.to_owned()),
        ":" => Resp::Int(rest.parse().map_err(|_| bad())?),
        "$" => {
            let len: i64 = rest.parse().map_err(|_| bad())?;
            if len < 0 {
                Resp::Nil
            } else {
                let mut buf = vec![0; usize::try_from(len).map_err(|_| bad())? + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(buf.len() - 2);
                Resp::Str(String::from_utf8_lossy(&buf).into_owned())
            }
        }
        "*" => {
            let len: i64 = rest.parse().map_err(|_| bad())?;
            if len < 0 {
                Resp::Nil
            } else {
                let mut items = Vec::new();
                for _ in 0..len {
                    items.push(read_resp(r)?);
                }
                Resp::Array(items)
            }
        }
        _ => return Err(bad()),
    })
}

/// Runs commands on the database of `uri` (`redis://[:password@]host:port/db`),
/// one connection for all; a tiny RESP client so that the tests need no
/// Redis crate of their own.
pub fn redis_commands(uri: &str, commands: &[Vec<String>]) -> Vec<Resp> {
    let rest = uri
        .split_once("://")
        .map_or(uri, |(_, r)| r)
        .split('?')
        .next()
        .unwrap_or_default();
    let (authority, db) = rest.split_once('/').unwrap_or((rest, "0"));
    let (password, addr) = match authority.rsplit_once('@') {
        Some((userinfo, addr)) => (userinfo.split_once(':').map(|(_, p)| p.to_owned()), addr),
        None => (None, authority),
    };
    let addr = if addr.contains(':') {
        addr.to_owned()
    } else {
        format!("{addr}:6379")
    };
    let stream = std::net::TcpStream::connect(&addr).expect("connect to Redis");
    let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone stream"));
    let mut writer = stream;
    let mut all = Vec::new();
    if let Some(p) = password {
        all.push(vec!["AUTH".to_owned(), p]);
    }
    let db = if db.is_empty() { "0" } else { db };
    all.push(vec!["SELECT".to_owned(), db.to_owned()]);
    let setup = all.len();
    all.extend(commands.iter().cloned());
    let mut replies = Vec::new();
    for (n, command) in all.iter().enumerate() {
        let mut out = format!("*{}\r\n", command.len()).into_bytes();
        for arg in command {
            out.extend(format!("${}\r\n", arg.len()).into_bytes());
            out.extend(arg.as_bytes());
            out.extend(b"\r\n");
        }
        std::io::Write::write_all(&mut writer, &out).expect("write to Redis");
        let reply = read_resp(&mut reader).expect("read from Redis");
        // A failed SELECT would leave the test on database 0, a failed
        // AUTH unable to do anything: neither goes unnoticed.
        if n < setup {
            assert_eq!(
                reply,
                Resp::Str("OK".to_owned()),
                "{} on {addr}: {reply:?}",
                command[0]
            );
        }
        replies.push(reply);
    }
    replies.split_off(setup)
}

/// One command on the database of `uri`.
pub fn redis_command(uri: &str, args: &[&str]) -> Resp {
    let command = args.iter().map(|a| (*a).to_owned()).collect();
    redis_commands(uri, &[command]).pop().unwrap_or(Resp::Nil)
}

/// Every key of the database of `uri`.
pub fn redis_keys(uri: &str) -> std::collections::BTreeSet<String> {
    redis_command(uri, &["KEYS", "*"])
        .strings()
        .into_iter()
        .collect()
}

/// Deletes a test's Redis objects: the exchange's binding sets, the
/// queues' lists (with their priority lists), and unacked entries of
/// messages sent through the exchange.
pub fn cleanup_redis(uri: &str, exchange: &str, queues: &[String]) {
    let mut del = vec![
        "DEL".to_owned(),
        format!("_kombu.binding.{exchange}"),
        format!("_kombu.binding_permanent.{exchange}"),
    ];
    for q in queues {
        del.push(q.clone());
        for step in [3, 6, 9] {
            del.push(format!("{q}\x06\x16{step}"));
        }
    }
    let mut commands = vec![del];
    let unacked = redis_command(uri, &["HGETALL", "unacked"]).strings();
    for pair in unacked.chunks(2) {
        if let [tag, stored] = pair {
            // kombu records the exchange; the host records the default
            // exchange and the queue it took the message from.
            let ours = serde_json::from_str::<Value>(stored).ok().is_some_and(|v| {
                v[1] == exchange || (v[1] == "" && queues.iter().any(|q| v[2] == q.as_str()))
            });
            if ours {
                commands.push(vec!["HDEL".to_owned(), "unacked".to_owned(), tag.clone()]);
                commands.push(vec![
                    "ZREM".to_owned(),
                    "unacked_index".to_owned(),
                    tag.clone(),
                ]);
            }
        }
    }
    redis_commands(uri, &commands);
}

/// A `redis-server` of the test's own, on a free port in a temporary
/// directory: the tests that flush or restart Redis use one, never the
/// machine's shared server. Killed on drop.
#[derive(Debug)]
pub struct PrivateRedis {
    /// Its port.
    pub port: u16,
    aof: bool,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    /// Starts one, with persistence (append-only file, fsync on every
    /// write: a kill loses nothing) or without any (no RDB either).
    pub fn start(aof: bool) -> Self {
        let mut redis = Self {
            port: crate::host::free_addr().port(),
            aof,
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        // The port was free a moment ago: another process may have taken
        // it since, then another one.
        let mut failures = Vec::new();
        for _ in 0..5 {
            match redis.try_spawn() {
                Ok(()) => return redis,
                Err(e) => failures.push(e),
            }
            redis.port = crate::host::free_addr().port();
        }
        panic!("cannot start a redis-server: {failures:?}");
    }

    /// Database `db` of it.
    pub fn uri(&self, db: u8) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    fn spawn(&mut self) {
        if let Err(e) = self.try_spawn() {
            panic!("{e}");
        }
    }

    /// Starts redis-server on its port; an error if it exits (the port
    /// taken meanwhile, above all).
    fn try_spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("redis.log"))
            .expect("redis log");
        let aof = if self.aof { "yes" } else { "no" };
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", aof, "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(log)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let started = std::time::Instant::now();
        // Up once it answers (with an append-only file, once loaded:
        // until then it answers -LOADING), and still running: if another
        // process took the port first, what answers there is not ours.
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                let log = std::fs::read_to_string(self.dir.path().join("redis.log"));
                return Err(format!(
                    "redis-server on port {} exited ({status}): {}",
                    self.port,
                    log.unwrap_or_default()
                ));
            }
            if self.pongs() {
                return Ok(());
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "redis-server on port {} not up within 10 s",
                self.port
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Whether it answers PING with PONG (not -LOADING).
    fn pongs(&self) -> bool {
        let Ok(stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let Ok(mut writer) = stream.try_clone() else {
            return false;
        };
        if std::io::Write::write_all(&mut writer, b"PING\r\n").is_err() {
            return false;
        }
        let mut reader = std::io::BufReader::new(stream);
        matches!(read_resp(&mut reader), Ok(Resp::Str(s)) if s == "PONG")
    }

    /// Starts it again after [`Self::kill`], on the same port and
    /// directory.
    pub fn start_again(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    /// Kills it (`SIGKILL`: what is not on disk is lost).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "not an integer")]
    fn an_error_reply_is_no_zero() {
        Resp::Error("WRONGTYPE Operation against a key holding the wrong kind of value".into())
            .int();
    }

    #[test]
    #[should_panic(expected = "not an array of strings")]
    fn an_error_reply_is_no_empty_list() {
        Resp::Error("ERR unknown command".into()).strings();
    }

    #[test]
    #[should_panic(expected = "not an integer")]
    fn a_wrongtype_from_redis_is_no_zero() {
        // A key of this run's own, gone in a minute whatever happens.
        let key = crate::host::unique("fuzzcat-wrongtype");
        let uri = redis_uri(1, "");
        redis_command(&uri, &["SET", &key, "x", "EX", "60"]);
        redis_command(&uri, &["LLEN", &key]).int();
    }

    #[test]
    #[should_panic(expected = "SELECT")]
    fn a_failed_select_is_no_database_0() {
        redis_command(&redis_uri(99, ""), &["PING"]);
    }
}
