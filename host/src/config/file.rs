//! The file as written: its sections, read strictly (unknown keys are
//! errors), with the spans that error messages point at.

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::QueueConfig;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    #[serde(default)]
    pub(super) bus: BusSection,
    #[serde(default)]
    pub(super) plugins: PluginsSection,
    #[serde(default)]
    pub(super) http: HttpSection,
    #[serde(default)]
    pub(super) host: HostSection,
    #[serde(default)]
    pub(super) service: Vec<ServiceSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HostSection {
    /// Seconds stopping waits for in-flight handlers.
    pub(super) shutdown_timeout: Option<Spanned<f64>>,
    /// Seconds a timed-out handler may still run before its worker is
    /// recycled.
    pub(super) handler_grace: Option<Spanned<f64>>,
    /// Let a SIGHUP roll swap in a plugin whose contract breaks callers.
    pub(super) allow_breaking_upgrades: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BusSection {
    /// One URI, or a failover list (also as kombu's `a;b;c`).
    pub(super) uri: Option<UriList>,
    pub(super) exchange: Option<String>,
    /// Seconds a request waits for its reply.
    pub(super) request_timeout: Option<Spanned<f64>>,
    /// Ack a request only once the broker confirmed its reply.
    pub(super) confirm_replies: Option<bool>,
    /// Microseconds an ack may wait to go out with others (AMQP).
    pub(super) ack_window_us: Option<Spanned<i64>>,
    /// The largest request or reply, in bytes.
    pub(super) max_message_bytes: Option<Spanned<i64>>,
    /// Where the host's own requests wait for replies: `named`, `direct`.
    pub(super) reply_queue: Option<crate::bus::ReplyQueueKind>,
    /// Prefixed to every service queue's name.
    pub(super) queue_prefix: Option<Spanned<String>>,
}

#[derive(Debug)]
pub(super) enum UriList {
    One(String),
    Several(Vec<String>),
}

impl<'de> Deserialize<'de> for UriList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Uris;
        impl<'de> serde::de::Visitor<'de> for Uris {
            type Value = UriList;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a URI string or a list of URI strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<UriList, E> {
                Ok(UriList::One(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<UriList, A::Error> {
                let mut uris = Vec::new();
                while let Some(uri) = seq.next_element::<String>()? {
                    uris.push(uri);
                }
                Ok(UriList::Several(uris))
            }
        }
        d.deserialize_any(Uris)
    }
}

impl UriList {
    /// kombu's failover form: `a;b;c`.
    pub(super) fn joined(self) -> String {
        match self {
            Self::One(uri) => uri,
            Self::Several(uris) => uris.join(";"),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PluginsSection {
    pub(super) dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HttpSection {
    pub(super) listen: Option<SocketAddr>,
    pub(super) token: Option<Spanned<String>>,
    pub(super) allow: Option<Vec<Spanned<String>>>,
    pub(super) cors_origins: Option<Vec<Spanned<String>>>,
    pub(super) max_in_flight: Option<Spanned<i64>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    /// Bytes of request bodies held at once.
    pub(super) max_buffered_bytes: Option<Spanned<i64>>,
    /// Seconds a request head may take.
    pub(super) header_timeout: Option<Spanned<f64>>,
    /// Check params against the callee's contract before relaying.
    pub(super) validate: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServiceSection {
    pub(super) name: Spanned<String>,
    pub(super) queues: Option<Vec<QueueConfig>>,
    pub(super) concurrency: Option<NonZeroU16>,
    pub(super) workers: Option<Spanned<NonZeroU16>>,
    pub(super) handler_timeout: Option<Spanned<f64>>,
    pub(super) crash_limit: Option<std::num::NonZeroU32>,
    /// Entries each of its quarantines keeps (0: off).
    pub(super) quarantine: Option<u32>,
    pub(super) inline_handlers: Option<bool>,
    pub(super) max_bus_waits: Option<u16>,
    /// Seconds a plugin's `init` may take in a new worker.
    pub(super) init_timeout: Option<Spanned<f64>>,
    /// A worker's resident memory past which it is replaced: bytes, or a
    /// string with a unit (`"512 MiB"`).
    pub(super) max_worker_rss: Option<Spanned<ByteSize>>,
    #[serde(default)]
    pub(super) config: toml::Table,
}

/// A size in bytes as the file may write it: a number, or a string with
/// a unit.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum ByteSize {
    Bytes(i64),
    Text(String),
}

impl ByteSize {
    /// The number of bytes, or why it is not one.
    pub(super) fn bytes(&self) -> Result<u64, String> {
        match self {
            Self::Bytes(n) => u64::try_from(*n).map_err(|_| format!("{n} is negative")),
            Self::Text(text) => {
                let t = text.trim();
                let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
                let (number, unit) = t.split_at(split);
                let number: u64 = number.parse().map_err(|_| {
                    format!("`{text}` is not a size (write e.g. 536870912 or \"512 MiB\")")
                })?;
                let scale: u64 = match unit.trim() {
                    "" | "B" => 1,
                    "K" | "KiB" | "k" => 1 << 10,
                    "KB" | "kB" => 1000,
                    "M" | "MiB" => 1 << 20,
                    "MB" => 1_000_000,
                    "G" | "GiB" => 1 << 30,
                    "GB" => 1_000_000_000,
                    other => {
                        return Err(format!(
                            "`{text}`: unknown unit `{other}` (B, KiB, MiB, GiB, KB, MB or GB)"
                        ))
                    }
                };
                number
                    .checked_mul(scale)
                    .ok_or_else(|| format!("`{text}` is too large"))
            }
        }
    }
}
