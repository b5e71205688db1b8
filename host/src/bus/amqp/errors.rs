//! How lapin's connection errors read to a user, and which of them
//! retrying cannot change.

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

use crate::bus::error::is_tls_failure;
use crate::bus::ConnectCause;

impl From<lapin::Error> for ConnectCause {
    fn from(e: lapin::Error) -> Self {
        Self::Transport {
            words: words(&e),
            permanent: permanent(&e),
            source: Box::new(e),
        }
    }
}

/// For a broker's refusal, the broker's own words rather than lapin's
/// wrapping of them.
fn words(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => amqp.get_message().to_string(),
        lapin::ErrorKind::IOError(io) if is_tls_failure(io) => format!("TLS failed: {io}"),
        _ => e.to_string(),
    }
}

/// The broker refused the login or the vhost, or TLS failed.
fn permanent(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => matches!(
            amqp.kind(),
            // 403: the login; 530: the vhost (or the user's access to it); 402: a bad vhost name.
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED | AMQPHardError::INVALIDPATH)
        ),
        lapin::ErrorKind::AuthProviderError(_) | lapin::ErrorKind::InvalidProtocolVersion(_) => {
            true
        }
        lapin::ErrorKind::IOError(io) => is_tls_failure(io),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use lapin::protocol::AMQPError;

    use super::*;
    use crate::bus::{is_permanent, BusError};

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
    }
}
