//! URI redaction (`redact_uri`, `scrub`), of one URI and of kombu's
//! failover lists.
//!
//! Properties: no byte sequence of a password survives in the output
//! (checked where the password cannot be confused with the rest of the
//! URI), and what is not the password is kept as it was.
#![no_main]

use arbitrary::Arbitrary;
use commissaire_host::redact::{redact_uri, scrub};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Uri {
    scheme: u8,
    user: String,
    password: String,
    host: String,
}

impl Uri {
    fn scheme(&self) -> &'static str {
        ["amqp", "amqps", "redis", "rediss"][usize::from(self.scheme % 4)]
    }

    /// Whether the URI can be read one way only: a user without `:`, a
    /// password not holding `;scheme://` (a failover list's separator:
    /// such a password must be percent-encoded) and a host without `@` or
    /// `;`.
    fn unambiguous(&self) -> bool {
        let ambiguous = self.password.is_empty()
            || self.user.contains([':', ';', '@'])
            || self.user.contains("://")
            || (self.password.contains(';') && self.password.contains("://"))
            || self.host.contains(['@', ';']);
        !ambiguous
    }

    fn text(&self) -> String {
        format!(
            "{}://{}:{}@{}",
            self.scheme(),
            self.user,
            self.password,
            self.host
        )
    }

    fn redacted(&self) -> String {
        format!("{}://{}:***@{}", self.scheme(), self.user, self.host)
    }
}

fuzz_target!(|uris: Vec<Uri>| {
    if uris.is_empty() || uris.len() > 4 || !uris.iter().all(Uri::unambiguous) {
        return;
    }
    let list = uris.iter().map(Uri::text).collect::<Vec<_>>().join(";");
    let want = uris.iter().map(Uri::redacted).collect::<Vec<_>>().join(";");
    // Exactly the URIs with their passwords masked: no password survives
    // `redact_uri` (a check of `got` for the password after this would be
    // this same comparison again).
    let got = redact_uri(&list);
    assert_eq!(got, want, "redacting {list:?}");
    for u in &uris {
        // A password that is also part of the URI's other text can't be
        // told apart, nor one holding the mask's `*` (the masks and their
        // neighbours can spell it again); any other must be gone from a
        // message `scrub` cleans, wherever it stands.
        if !want.contains(&u.password) && !u.password.contains('*') {
            let message = format!("failed: {list} (password {})", u.password);
            let scrubbed = scrub(&message, &list);
            assert!(
                !scrubbed.contains(&u.password),
                "scrub {message:?} -> {scrubbed:?}"
            );
        }
    }
});
