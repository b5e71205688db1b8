//! Transport failures, and which of them retrying cannot help.

use super::topic;

/// A transport failure. Messages never contain a password.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The URI is not one we serve.
    #[error(
        "unsupported bus URI {0} (expected amqp://, amqps://, redis://, rediss:// or memory://)"
    )]
    UnsupportedUri(String),
    /// Could not connect.
    #[error("cannot connect to {uri}: {cause}")]
    Connect {
        /// The redacted URI.
        uri: String,
        /// Why, kept whole for [`is_permanent`]. Its text is in this
        /// message (so that every log line carries it), hence not also
        /// returned by `source()`.
        cause: ConnectError,
    },
    /// A broker operation failed.
    #[error("{operation} failed: {reason}")]
    Operation {
        /// What was attempted.
        operation: String,
        /// Why.
        reason: String,
    },
    /// The connection (or the channel) went away during an operation:
    /// whatever was not settled goes back to its queue with it. Any other
    /// failure is taken as permanent for that message.
    #[error("{operation} failed: the connection is gone ({reason})")]
    Lost {
        /// What was attempted.
        operation: String,
        /// Why.
        reason: String,
    },
    /// The broker refused an operation for good (a queue declared with
    /// other arguments than it has, a permission; a Redis `reply_to` naming
    /// the transport's own keys, or a key that is not a list): retrying
    /// cannot help.
    #[error("{operation} refused: {reason}")]
    Refused {
        /// What was attempted.
        operation: String,
        /// The broker's reason.
        reason: String,
    },
    /// A request no queue is bound to take.
    #[error("no queue is bound to {routing_key} on exchange {exchange}")]
    Unroutable {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
    /// A request sent to an exchange the broker does not have: no service
    /// has declared it, so none can take the request.
    #[error(
        "no exchange `{exchange}` on this broker: no service has declared it (is a host \
         serving here with the same [bus] exchange, or --bus-exchange?)"
    )]
    NoExchange {
        /// The exchange.
        exchange: String,
    },
    /// A name the transport cannot carry (an AMQP short string holds at
    /// most 255 bytes).
    #[error("{what} `{shown}` is {len} bytes long; at most 255 can be sent")]
    TooLong {
        /// What it names: a routing key, an exchange, a queue.
        what: &'static str,
        /// Its first bytes.
        shown: String,
        /// Its length.
        len: usize,
    },
    /// The transport is closed.
    #[error("the bus connection is closed")]
    Closed,
    /// A routing key no transport should be asked to carry.
    #[error(transparent)]
    RoutingKey(#[from] topic::RoutingKeyError),
}

impl BusError {
    /// A failed connection to `uri` (the URI as given: its password is
    /// redacted here, and scrubbed from the cause's message).
    pub(crate) fn connect(uri: &str, cause: impl Into<ConnectCause>) -> Self {
        let cause = cause.into();
        Self::Connect {
            uri: crate::redact::redact_uri(uri),
            cause: ConnectError {
                message: crate::redact::scrub(&cause.describe(), uri),
                cause: Box::new(cause),
            },
        }
    }

    pub(crate) fn op(operation: impl Into<String>, reason: impl ToString) -> Self {
        Self::Operation {
            operation: operation.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn lost(operation: impl Into<String>, reason: impl ToString) -> Self {
        Self::Lost {
            operation: operation.into(),
            reason: reason.to_string(),
        }
    }

    /// Whether retrying cannot help (see [`is_permanent`]).
    pub fn is_permanent(&self) -> bool {
        is_permanent(self)
    }

    /// Whether the connection went away (retrying on it is pointless; the
    /// broker gives unsettled deliveries back).
    pub fn is_lost(&self) -> bool {
        matches!(self, Self::Lost { .. } | Self::Closed)
    }

    /// Whether the broker refused the message for good (drop it at once).
    pub fn is_refused(&self) -> bool {
        matches!(self, Self::Refused { .. })
    }
}

/// Why a connection could not be made: the transport's own error, and its
/// message with the URI's password scrubbed out (`Debug` shows only that).
pub struct ConnectError {
    // Boxed: lapin's and redis-rs's errors are large, and every `Result`
    // of the bus carries a `BusError`.
    cause: Box<ConnectCause>,
    message: String,
}

impl ConnectError {
    /// The transport's error.
    pub fn cause(&self) -> &ConnectCause {
        &self.cause
    }
}

impl std::fmt::Debug for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectError")
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The error a transport's client library gave when connecting.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConnectCause {
    /// The URI cannot be read.
    Uri(String),
    /// The client library's error, as its transport (`bus/<name>/`) reads
    /// it.
    Transport {
        /// What a user reads: for a broker's refusal, the broker's own
        /// words (`ACCESS_REFUSED - Login was refused …`).
        words: String,
        /// Whether retrying cannot help (a refused login, TLS failed…).
        permanent: bool,
        /// The library's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ConnectCause {
    fn describe(&self) -> String {
        match self {
            Self::Uri(reason) => format!("bad URI: {reason}"),
            Self::Transport { words, .. } => words.clone(),
        }
    }
}

/// Whether retrying cannot help: the broker refused the login or the vhost
/// (or Redis the password or the database), TLS failed, or the URI is
/// wrong. Everything else (refused or dropped connections, a broker
/// starting or stopping, timeouts) is worth retrying.
pub fn is_permanent(error: &BusError) -> bool {
    match error {
        BusError::UnsupportedUri(_)
        | BusError::Refused { .. }
        | BusError::TooLong { .. }
        | BusError::RoutingKey(_) => true,
        BusError::Connect { cause, .. } => match &*cause.cause {
            ConnectCause::Uri(_) => true,
            ConnectCause::Transport { permanent, .. } => *permanent,
        },
        BusError::Operation { .. }
        | BusError::Lost { .. }
        | BusError::Unroutable { .. }
        | BusError::NoExchange { .. }
        | BusError::Closed => false,
    }
}

/// rustls reports a failed handshake or certificate check, and a TLS
/// client talking to a plain port, as `InvalidData`; a dropped or refused
/// connection has kinds of its own.
pub(super) fn is_tls_failure(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::InvalidData
}

pub(super) fn io_error_in<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a std::io::Error> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_no_transport_can_change_is_permanent() {
        assert!(is_permanent(&BusError::connect(
            "amqp://h:x/",
            ConnectCause::Uri("invalid port number".into())
        )));
        assert!(is_permanent(&BusError::UnsupportedUri("nats://h".into())));
        assert!(!is_permanent(&BusError::Closed));
        assert!(!is_permanent(&BusError::op("declaring queue `q`", "x")));
    }

    #[test]
    fn the_password_is_scrubbed_from_the_cause() {
        let e = BusError::connect(
            "amqp://guest:s3cret@h/%2f",
            ConnectCause::Uri("s3cret is not a port".into()),
        );
        assert!(!e.to_string().contains("s3cret"), "{e}");
        assert!(!format!("{e:?}").contains("s3cret"), "{e:?}");
    }
}
