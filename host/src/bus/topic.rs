//! Routing keys: AMQP topic matching (`*` is one word, `#` is zero or
//! more words), and the method a routing key names.

/// The method a request's routing key names: its last `.`-separated
/// segment (`simple.add` names `add`), as PROTOCOL.md says.
pub fn method_of(routing_key: &str) -> &str {
    routing_key.rsplit('.').next().unwrap_or(routing_key)
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
    fn literal_keys() {
        assert!(matches("simple.add", "simple.add"));
        assert!(!matches("simple.add", "simple.sub"));
    }
}
