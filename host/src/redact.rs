//! Keeping passwords out of logs and error messages.

/// `amqp://user:secret@host/vhost` → `amqp://user:***@host/vhost`. URIs
/// without a password are returned unchanged.
pub fn redact_uri(uri: &str) -> String {
    let Some(scheme_end) = uri.find("://") else {
        return uri.to_owned();
    };
    let rest = &uri[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return uri.to_owned();
    };
    let userinfo = &authority[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &uri[..scheme_end + 3],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => uri.to_owned(),
    }
}

/// Replaces every occurrence of `uri`'s password in `text` (for error
/// messages of libraries that echo the URI).
pub fn scrub(text: &str, uri: &str) -> String {
    let redacted = redact_uri(uri);
    let mut out = text.replace(uri, &redacted);
    if let Some(password) = password_of(uri) {
        if !password.is_empty() {
            out = out.replace(password, "***");
        }
    }
    out
}

fn password_of(uri: &str) -> Option<&str> {
    let rest = &uri[uri.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    Some(&userinfo[userinfo.find(':')? + 1..])
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
    fn leaves_uris_without_password_alone() {
        for uri in [
            "memory://",
            "amqp://127.0.0.1",
            "amqp://user@h/v",
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
