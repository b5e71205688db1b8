//! Keeping passwords out of logs and error messages.

/// `amqp://user:secret@host/vhost` → `amqp://user:***@host/vhost`. URIs
/// without a password are returned unchanged; a failover list
/// (`amqp://a;amqp://b`, kombu's form) is redacted URI by URI.
///
/// The password ends at the *last* `@` of a URI, so one holding a raw `/`,
/// `?`, `#` or `@` (which should have been percent-encoded) is still
/// hidden; at worst more than the password is.
pub fn redact_uri(uri: &str) -> String {
    uris(uri).map(redact_one).collect::<Vec<_>>().join(";")
}

/// The URIs of a failover list: split at each `;` that a `scheme://`
/// follows, so that a `;` inside a password does not end the URI (and
/// leave the password's pieces unredacted). A password holding
/// `;scheme://` cannot be told from a list: percent-encode it.
fn uris(list: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(list);
    std::iter::from_fn(move || {
        let text = rest?;
        let end = text
            .match_indices(';')
            .map(|(at, _)| at)
            .find(|&at| starts_with_scheme(&text[at + 1..]));
        match end {
            Some(at) => {
                rest = Some(&text[at + 1..]);
                Some(&text[..at])
            }
            None => {
                rest = None;
                Some(text)
            }
        }
    })
}

/// Whether `text` opens with `scheme://` (RFC 3986 scheme characters).
fn starts_with_scheme(text: &str) -> bool {
    text.split_once("://").is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    })
}

fn redact_one(uri: &str) -> String {
    match password_span(uri) {
        Some((start, end)) => format!("{}***{}", &uri[..start], &uri[end..]),
        None => uri.to_owned(),
    }
}

/// The byte range of `uri`'s password: after the first `:` of the
/// userinfo, up to the last `@`.
fn password_span(uri: &str) -> Option<(usize, usize)> {
    let rest_at = uri.find("://")? + 3;
    let rest = &uri[rest_at..];
    let at = rest.rfind('@')?;
    let colon = rest[..at].find(':')?;
    Some((rest_at + colon + 1, rest_at + at))
}

/// Replaces every occurrence of `uri`'s passwords in `text` (for error
/// messages of libraries that echo the URI).
pub fn scrub(text: &str, uri: &str) -> String {
    let mut out = text.replace(uri, &redact_uri(uri));
    for one in uris(uri) {
        if let Some((start, end)) = password_span(one) {
            let password = &one[start..end];
            if !password.is_empty() {
                out = out.replace(password, "***");
            }
        }
    }
    out
}

/// `text` as it is safe to print to a terminal: control characters (but
/// `\n` when `keep_newlines`), and the bidirectional overrides that
/// reorder a terminal's text, escaped. Whatever came from outside (a
/// request, a discovery answer) goes through it before a command prints
/// it.
pub fn escape(text: &str, keep_newlines: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if (c == '\n' && keep_newlines) || !(c.is_control() || bidi) {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hides_the_password_only() {
        assert_eq!(
            redact_uri("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_uri("amqps://u:p@h"), "amqps://u:***@h");
        assert_eq!(redact_uri("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
    }

    #[test]
    fn hides_passwords_holding_uri_delimiters() {
        for password in ["pa/ss", "p?w", "p#w", "p@w", "a/b?c#d@e"] {
            let uri = format!("amqp://guest:{password}@h:5672/%2f");
            let redacted = redact_uri(&uri);
            assert_eq!(redacted, "amqp://guest:***@h:5672/%2f", "{password}");
            assert!(!scrub(&format!("x {uri} {password} y"), &uri).contains(password));
        }
    }

    /// Found while writing the `redact` fuzz target's reference: a `;` in
    /// a password split the URI as if it were a failover list, and both
    /// halves of the password were shown.
    #[test]
    fn hides_passwords_holding_a_semicolon() {
        for password in ["pa;ss", ";", "a;b;c", "x;@y"] {
            let uri = format!("amqp://guest:{password}@h:5672/%2f");
            assert_eq!(
                redact_uri(&uri),
                "amqp://guest:***@h:5672/%2f",
                "{password}"
            );
            let scrubbed = scrub(&format!("x {uri} {password} y"), &uri);
            assert!(!scrubbed.contains(password), "{scrubbed}");
        }
        assert_eq!(
            redact_uri("amqp://u:a;b@h1;amqps://v:c;d@h2"),
            "amqp://u:***@h1;amqps://v:***@h2"
        );
    }

    #[test]
    fn redacts_each_uri_of_a_failover_list() {
        assert_eq!(
            redact_uri("amqp://u:a@h1;amqp://h2;amqp://v:b@h3/%2f"),
            "amqp://u:***@h1;amqp://h2;amqp://v:***@h3/%2f"
        );
    }

    #[test]
    fn leaves_uris_without_password_alone() {
        for uri in [
            "memory://",
            "amqp://127.0.0.1",
            "amqp://user@h/v",
            "amqp://h/vhost@x",
            "nonsense",
        ] {
            assert_eq!(redact_uri(uri), uri);
        }
    }

    #[test]
    fn scrubs_messages() {
        let uri = "amqp://guest:s3cret@h/%2f";
        assert_eq!(
            scrub("failed s3cret at amqp://guest:s3cret@h/%2f", uri),
            "failed *** at amqp://guest:***@h/%2f"
        );
    }
}
