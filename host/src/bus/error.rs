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
    /// lapin's error (`amqp://`, `amqps://`).
    Amqp(lapin::Error),
    /// redis-rs's error (`redis://`, `rediss://`).
    Redis(::redis::RedisError),
}

impl ConnectCause {
    /// The message a user reads: for a broker's refusal, the broker's own
    /// words (`ACCESS_REFUSED - Login was refused …`) rather than lapin's
    /// wrapping of them.
    fn describe(&self) -> String {
        match self {
            Self::Uri(reason) => format!("bad URI: {reason}"),
            Self::Amqp(e) => match e.kind() {
                lapin::ErrorKind::ProtocolError(amqp) => amqp.get_message().to_string(),
                lapin::ErrorKind::IOError(io) if is_tls_failure(io) => format!("TLS failed: {io}"),
                _ => e.to_string(),
            },
            // redis-rs writes `description - Kind: detail`; the kind is its
            // Debug form, noise to a user.
            Self::Redis(e) => {
                let text = e.to_string();
                match (text.split_once(" - "), e.detail()) {
                    (Some((description, _)), Some(detail)) => format!("{description}: {detail}"),
                    (Some((description, _)), None) => description.to_owned(),
                    (None, _) => text,
                }
            }
        }
    }
}

impl From<lapin::Error> for ConnectCause {
    fn from(e: lapin::Error) -> Self {
        Self::Amqp(e)
    }
}

impl From<::redis::RedisError> for ConnectCause {
    fn from(e: ::redis::RedisError) -> Self {
        Self::Redis(e)
    }
}

/// Whether retrying cannot help: the broker refused the login or the vhost
/// (or Redis the password or the database), TLS failed, or the URI is
/// wrong. Everything else (refused or dropped connections, a broker
/// starting or stopping, timeouts) is worth retrying.
pub fn is_permanent(error: &BusError) -> bool {
    use ::redis::ErrorKind as RedisKind;
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    let cause = match error {
        BusError::UnsupportedUri(_)
        | BusError::Refused { .. }
        | BusError::TooLong { .. }
        | BusError::RoutingKey(_) => return true,
        BusError::Connect { cause, .. } => &*cause.cause,
        BusError::Operation { .. }
        | BusError::Lost { .. }
        | BusError::Unroutable { .. }
        | BusError::NoExchange { .. }
        | BusError::Closed => return false,
    };
    match cause {
        ConnectCause::Uri(_) => true,
        ConnectCause::Amqp(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(amqp) => matches!(
                amqp.kind(),
                // 403: the login; 530: the vhost (or the user's access to it); 402: a bad vhost name.
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                    | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED | AMQPHardError::INVALIDPATH)
            ),
            lapin::ErrorKind::AuthProviderError(_)
            | lapin::ErrorKind::InvalidProtocolVersion(_) => true,
            lapin::ErrorKind::IOError(io) => is_tls_failure(io),
            _ => false,
        },
        ConnectCause::Redis(e) => {
            matches!(
                e.kind(),
                RedisKind::AuthenticationFailed | RedisKind::InvalidClientConfig
            ) || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
                // SELECT of a database the server does not have.
                || e.to_string().contains("refused to switch database")
                || io_error_in(e).is_some_and(is_tls_failure)
        }
    }
}

/// rustls reports a failed handshake or certificate check, and a TLS
/// client talking to a plain port, as `InvalidData`; a dropped or refused
/// connection has kinds of its own.
fn is_tls_failure(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::InvalidData
}

fn io_error_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
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
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};

    fn amqp(kind: lapin::ErrorKind) -> BusError {
        BusError::connect(
            "amqp://guest:s3cret@127.0.0.1:5672/%2f",
            lapin::Error::from(kind),
        )
    }

    fn refused(kind: AMQPErrorKind, text: &str) -> BusError {
        amqp(lapin::ErrorKind::ProtocolError(AMQPError::new(
            kind,
            text.into(),
        )))
    }

    fn io(kind: std::io::ErrorKind) -> BusError {
        amqp(lapin::ErrorKind::IOError(std::sync::Arc::new(
            std::io::Error::new(kind, "x"),
        )))
    }

    fn redis(e: ::redis::RedisError) -> BusError {
        BusError::connect("redis://:s3cret@127.0.0.1:6379/0", e)
    }

    #[test]
    fn refusals_that_retrying_cannot_change_are_permanent() {
        let login = refused(
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            "ACCESS_REFUSED - Login was refused",
        );
        assert!(is_permanent(&login));
        assert_eq!(
            login.to_string(),
            "cannot connect to amqp://guest:***@127.0.0.1:5672/%2f: ACCESS_REFUSED - Login was refused"
        );
        assert!(is_permanent(&refused(
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED),
            "NOT_ALLOWED - vhost nope not found"
        )));
        assert!(is_permanent(&io(std::io::ErrorKind::InvalidData)));
        assert!(is_permanent(&BusError::connect(
            "amqp://h:x/",
            ConnectCause::Uri("invalid port number".into())
        )));
        assert!(is_permanent(&BusError::UnsupportedUri("nats://h".into())));
        let wrong_password = redis(
            (
                ::redis::ErrorKind::AuthenticationFailed,
                "Password authentication failed",
            )
                .into(),
        );
        assert!(is_permanent(&wrong_password));
        assert_eq!(
            wrong_password.to_string(),
            "cannot connect to redis://:***@127.0.0.1:6379/0: Password authentication failed"
        );
        assert!(is_permanent(&redis(
            (
                ::redis::ErrorKind::InvalidClientConfig,
                "Invalid database number"
            )
                .into()
        )));
    }

    #[test]
    fn an_unreachable_or_restarting_broker_is_worth_retrying() {
        assert!(!is_permanent(&io(std::io::ErrorKind::ConnectionRefused)));
        assert!(!is_permanent(&io(std::io::ErrorKind::ConnectionReset)));
        assert!(!is_permanent(&refused(
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
            "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"
        )));
        assert!(!is_permanent(&amqp(
            lapin::ErrorKind::MissingHeartbeatError
        )));
        assert!(!is_permanent(&redis(::redis::RedisError::from(
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
        ))));
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
