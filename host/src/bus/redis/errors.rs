//! How redis-rs's connection errors read to a user, and which of them
//! retrying cannot change.

use ::redis::ErrorKind as RedisKind;

use crate::bus::error::{io_error_in, is_tls_failure};
use crate::bus::ConnectCause;

impl From<::redis::RedisError> for ConnectCause {
    fn from(e: ::redis::RedisError) -> Self {
        Self::Transport {
            words: words(&e),
            permanent: permanent(&e),
            source: Box::new(e),
        }
    }
}

/// redis-rs writes `description - Kind: detail`; the kind is its Debug
/// form, noise to a user.
fn words(e: &::redis::RedisError) -> String {
    let text = e.to_string();
    match (text.split_once(" - "), e.detail()) {
        (Some((description, _)), Some(detail)) => format!("{description}: {detail}"),
        (Some((description, _)), None) => description.to_owned(),
        (None, _) => text,
    }
}

/// The password, the user's rights or the database refused, or TLS
/// failed.
fn permanent(e: &::redis::RedisError) -> bool {
    matches!(
        e.kind(),
        RedisKind::AuthenticationFailed | RedisKind::InvalidClientConfig
    ) || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
        // SELECT of a database the server does not have.
        || e.to_string().contains("refused to switch database")
        || io_error_in(e).is_some_and(is_tls_failure)
}

#[cfg(test)]
mod tests {
    use crate::bus::{is_permanent, BusError};

    fn redis(e: ::redis::RedisError) -> BusError {
        BusError::connect("redis://:s3cret@127.0.0.1:6379/0", e)
    }

    #[test]
    fn a_refused_password_or_database_is_permanent() {
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
    fn an_unreachable_server_is_worth_retrying() {
        assert!(!is_permanent(&redis(::redis::RedisError::from(
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
        ))));
    }
}
