//! `[http]`: the endpoint's token, allow-list, origins, limits and
//! whether it checks params.

use std::time::Duration;

use toml::Spanned;

use super::file::HttpSection;
use super::{
    line_col, seconds, ConfigError, DEFAULT_HTTP_HEADER_TIMEOUT, DEFAULT_HTTP_MAX_BUFFERED_BYTES,
    DEFAULT_HTTP_MAX_CONNECTIONS, DEFAULT_HTTP_MAX_IN_FLIGHT, HTTP_TOKEN_ENV,
};

/// The HTTP endpoint's bearer token. Never printed: `Debug` shows `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpToken(String);

impl HttpToken {
    /// The token, to compare a request's `Authorization` with.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// A token that can be sent in an `Authorization` header: visible ASCII
    /// without spaces, not empty.
    pub(crate) fn parse(text: &str) -> Result<Self, &'static str> {
        if text.is_empty() {
            Err("is empty")
        } else if !text.bytes().all(|b| b.is_ascii_graphic()) {
            Err("must be visible ASCII characters without spaces")
        } else {
            Ok(Self(text.to_owned()))
        }
    }
}

impl std::fmt::Debug for HttpToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpToken(***)")
    }
}

/// How the HTTP endpoint guards itself (`[http]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    /// `/rpc/*` requires `Authorization: Bearer <token>` when set.
    pub token: Option<HttpToken>,
    /// Topic patterns of the routing keys relayed; `None` relays all.
    pub allow: Option<Vec<String>>,
    /// Origins whose browsers may call `/rpc/*` (CORS); none by default.
    pub cors_origins: Vec<String>,
    /// Requests relayed at once; beyond, 503.
    pub max_in_flight: usize,
    /// Connections open at once; beyond, a new one takes the place of the
    /// one waiting longest for a request head (or idle longest), or is
    /// closed at once when every one serves a request.
    pub max_connections: usize,
    /// Bytes of request bodies held in memory at once, all requests
    /// together; a body beyond gets 503.
    pub max_buffered_bytes: usize,
    /// How long a client has to send a whole request head.
    pub header_timeout: Duration,
    /// Check a request's params against its service's contract (asked
    /// over the bus, kept a while) and answer -32602 without relaying
    /// them when they do not fit.
    pub validate: bool,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            token: None,
            allow: None,
            cors_origins: Vec::new(),
            max_in_flight: DEFAULT_HTTP_MAX_IN_FLIGHT,
            max_connections: DEFAULT_HTTP_MAX_CONNECTIONS,
            max_buffered_bytes: DEFAULT_HTTP_MAX_BUFFERED_BYTES,
            header_timeout: DEFAULT_HTTP_HEADER_TIMEOUT,
            validate: false,
        }
    }
}

/// The `[http]` settings, with the token from the environment winning.
pub(super) fn http_settings(
    section: &HttpSection,
    env: impl Fn(&str) -> Option<String>,
    file: &str,
    text: &str,
) -> Result<HttpSettings, ConfigError> {
    let at = |span: std::ops::Range<usize>| {
        let (line, col) = line_col(text, span.start);
        format!("{file}:{line}:{col}")
    };
    let token = match (env(HTTP_TOKEN_ENV), &section.token) {
        (Some(value), _) => Some(HttpToken::parse(&value).map_err(|why| ConfigError {
            location: HTTP_TOKEN_ENV.to_owned(),
            message: format!("the HTTP token {why}"),
        })?),
        (None, Some(value)) => {
            Some(
                HttpToken::parse(value.get_ref()).map_err(|why| ConfigError {
                    location: at(value.span()),
                    message: format!("[http] token {why}"),
                })?,
            )
        }
        (None, None) => None,
    };
    let allow = match &section.allow {
        None => None,
        Some(patterns) => {
            let mut allow = Vec::with_capacity(patterns.len());
            for pattern in patterns {
                let p = pattern.get_ref();
                if p.is_empty() || p.len() > crate::bus::topic::MAX_ROUTING_KEY_BYTES {
                    return Err(ConfigError {
                        location: at(pattern.span()),
                        message: format!(
                            "[http] allow: `{p}` is not a routing-key pattern \
                             (1 to 255 bytes, e.g. \"simple.*\" or \"demo.#\")"
                        ),
                    });
                }
                allow.push(p.clone());
            }
            Some(allow)
        }
    };
    let mut cors_origins = Vec::new();
    for origin in section.cors_origins.iter().flatten() {
        let o = origin.get_ref();
        if !is_origin(o) {
            return Err(ConfigError {
                location: at(origin.span()),
                message: format!(
                    "[http] cors_origins: `{o}` is not an origin \
                     (scheme, host and optional port, e.g. \"https://ops.example.com\")"
                ),
            });
        }
        cors_origins.push(o.to_ascii_lowercase());
    }
    let limit = |value: &Option<Spanned<i64>>, key: &str, default: usize| match value {
        None => Ok(default),
        Some(v) => match usize::try_from(*v.get_ref()) {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(ConfigError {
                location: at(v.span()),
                message: format!("[http] {key} must be at least 1, not {}", v.get_ref()),
            }),
        },
    };
    Ok(HttpSettings {
        token,
        allow,
        cors_origins,
        max_in_flight: limit(
            &section.max_in_flight,
            "max_in_flight",
            DEFAULT_HTTP_MAX_IN_FLIGHT,
        )?,
        max_connections: limit(
            &section.max_connections,
            "max_connections",
            DEFAULT_HTTP_MAX_CONNECTIONS,
        )?,
        max_buffered_bytes: limit(
            &section.max_buffered_bytes,
            "max_buffered_bytes",
            DEFAULT_HTTP_MAX_BUFFERED_BYTES,
        )?,
        header_timeout: seconds(
            section.header_timeout.as_ref(),
            "[http] header_timeout",
            DEFAULT_HTTP_HEADER_TIMEOUT,
            file,
            text,
        )?,
        validate: section.validate.unwrap_or(false),
    })
}

/// `http://host[:port]` or `https://host[:port]`, as a browser sends it in
/// `Origin` (no path, no wildcard).
fn is_origin(text: &str) -> bool {
    let Some((scheme, rest)) = text.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}
