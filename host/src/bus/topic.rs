//! Routing keys: AMQP topic matching (`*` is one word, `#` is zero or
//! more words), and the method a routing key names.

/// The method a request's routing key names: its last `.`-separated
/// segment (`simple.add` names `add`), as PROTOCOL.md says.
pub fn method_of(routing_key: &str) -> &str {
    routing_key.rsplit('.').next().unwrap_or(routing_key)
}

/// The longest routing key a bus carries: an AMQP short string.
pub const MAX_ROUTING_KEY_BYTES: usize = 255;

/// Why a routing key cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutingKeyError {
    /// Nothing to route by.
    #[error("the routing key is empty")]
    Empty,
    /// Over [`MAX_ROUTING_KEY_BYTES`].
    #[error("routing key `{shown}…` is {len} bytes long; at most 255 can be sent")]
    TooLong {
        /// Its first characters.
        shown: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A control character (a newline, a NUL…): AMQP would carry it, but
    /// no service binds such a key, and it garbles logs.
    #[error("routing key {shown:?} holds a control character")]
    Control {
        /// Its first characters, escaped.
        shown: String,
    },
}

/// Checks a routing key a caller gave (HTTP, `call`, a handler's bus call)
/// before it is published or matched: matching is recursive on `#`, so the
/// key's length is bounded first.
pub fn check_routing_key(key: &str) -> Result<(), RoutingKeyError> {
    let shown = || key.chars().take(40).collect::<String>();
    if key.is_empty() {
        Err(RoutingKeyError::Empty)
    } else if key.len() > MAX_ROUTING_KEY_BYTES {
        Err(RoutingKeyError::TooLong {
            shown: shown(),
            len: key.len(),
        })
    } else if key.chars().any(char::is_control) {
        Err(RoutingKeyError::Control { shown: shown() })
    } else {
        Ok(())
    }
}

/// Whether `routing_key` matches binding `pattern`.
pub fn matches(pattern: &str, routing_key: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = routing_key.split('.').collect();
    match_words(&pattern, &key)
}

fn match_words(pattern: &[&str], key: &[&str]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        Some((&"#", rest)) => (0..=key.len()).any(|skip| match_words(rest, &key[skip..])),
        Some((&"*", rest)) => !key.is_empty() && match_words(rest, &key[1..]),
        Some((word, rest)) => key.first() == Some(word) && match_words(rest, &key[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn star_is_exactly_one_word() {
        assert!(matches("simple.*", "simple.add"));
        assert!(!matches("simple.*", "simple"));
        assert!(!matches("simple.*", "simple.a.b"));
        assert!(!matches("simple.*", "other.add"));
    }

    #[test]
    fn hash_is_any_number_of_words() {
        assert!(matches("#", "a.b.c"));
        assert!(matches("queues.#", "queues"));
        assert!(matches("queues.#.x", "queues.a.b.x"));
        assert!(!matches("queues.#.x", "queues.a.b"));
    }

    #[test]
    fn the_method_is_the_last_segment() {
        assert_eq!(super::method_of("simple.add"), "add");
        assert_eq!(super::method_of("a.b.c"), "c");
        assert_eq!(super::method_of("plain"), "plain");
        assert_eq!(super::method_of("trailing."), "");
    }

    #[test]
    fn routing_keys_a_bus_cannot_carry_are_refused() {
        use super::{check_routing_key, RoutingKeyError};
        assert_eq!(check_routing_key("simple.add"), Ok(()));
        assert_eq!(check_routing_key(&"a".repeat(255)), Ok(()));
        assert_eq!(check_routing_key(""), Err(RoutingKeyError::Empty));
        let long = "é".repeat(128);
        match check_routing_key(&long) {
            Err(RoutingKeyError::TooLong { shown, len }) => {
                assert_eq!((shown.chars().count(), len), (40, 256));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            check_routing_key("simple.add\n"),
            Err(RoutingKeyError::Control { .. })
        ));
        assert!(matches!(
            check_routing_key("simple\0add"),
            Err(RoutingKeyError::Control { .. })
        ));
    }

    #[test]
    fn literal_keys() {
        assert!(matches("simple.add", "simple.add"));
        assert!(!matches("simple.add", "simple.sub"));
    }
}
