//! The TOML config loader (`host.toml`).
//!
//! Properties: a text either loads or yields one error whose location is
//! the file, `file:line:col` pointing inside the text when it has one; and
//! no error message repeats the bus URI's password.
#![no_main]

use std::path::Path;

use commissaire_host::config::{HostConfig, Overrides};
use libfuzzer_sys::fuzz_target;

const FILE: &str = "/nonexistent/fuzz/host.toml";

/// The environment the loader sees: an HTTP token, nothing else.
fn env(name: &str) -> Option<String> {
    (name == "COMMISSAIRE_HTTP_TOKEN").then(|| "fuzz-token-0123".to_owned())
}

/// The passwords of `[bus] uri` (one URI or a list), read by a plain TOML
/// reading and URI rule: after `scheme://user:`, up to the last `@`.
fn passwords(text: &str) -> Vec<String> {
    let Ok(doc) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let uris: Vec<String> = match doc.get("bus").and_then(|b| b.get("uri")) {
        Some(toml::Value::String(s)) => vec![s.clone()],
        Some(toml::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    uris.iter()
        .flat_map(|u| u.split(';'))
        .filter_map(|u| {
            let rest = &u[u.find("://")? + 3..];
            let userinfo = &rest[..rest.rfind('@')?];
            Some(userinfo[userinfo.find(':')? + 1..].to_owned())
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Err(e) =
        HostConfig::load_text(Path::new(FILE), text.to_owned(), &Overrides::default(), env)
    else {
        return;
    };
    let rest = e
        .location
        .strip_prefix(FILE)
        .unwrap_or_else(|| panic!("error located outside the file: {e}"));
    if let Some(rest) = rest.strip_prefix(':') {
        // `[bus] uri`-style names are fine; numbers must be a place.
        let mut parts = rest.split(':');
        if let (Some(line), Some(col), None) = (parts.next(), parts.next(), parts.next()) {
            if let (Ok(line), Ok(col)) = (line.parse::<usize>(), col.parse::<usize>()) {
                let lines: Vec<&str> = text.split('\n').collect();
                assert!(
                    line >= 1 && line <= lines.len(),
                    "line {line} of {}: {e}",
                    lines.len()
                );
                assert!(
                    col >= 1 && col <= lines[line - 1].len() + 1,
                    "col {col}: {e}"
                );
            }
        }
    }
    let message = e.to_string();
    for password in passwords(text) {
        // Only a password that the text holds once, as written, can be
        // told from other text an error may quote.
        if password.len() >= 6
            && text.matches(password.as_str()).count() == 1
            && message.contains(&password)
        {
            assert!(
                !from_the_password(text, &password),
                "password in the error: {e}"
            );
        }
    }
});

/// Whether an error quoting `password` got it from the password: the same
/// text with another password in its place gives an error without it (or
/// none). A password spelled like a word of the message (`exchange`, a
/// field name) is there with any password.
fn from_the_password(text: &str, password: &str) -> bool {
    let other: String = password
        .chars()
        .map(|c| if c == 'Q' { 'Z' } else { 'Q' })
        .collect();
    let masked = text.replacen(password, &other, 1);
    match HostConfig::load_text(Path::new(FILE), masked, &Overrides::default(), env) {
        Ok(_) => true,
        Err(e) => !e.to_string().contains(password),
    }
}
