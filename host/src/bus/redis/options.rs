//! The transport options a `redis://` URI's query carries.

use std::time::Duration;

/// kombu's default visibility timeout.
pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(3600);

/// The transport options read from the URI query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RedisOptions {
    /// After how long an unacked delivery goes back to its queue.
    pub visibility_timeout: Duration,
    /// How often a consuming connection looks for such deliveries.
    pub restore_interval: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self::with_visibility(DEFAULT_VISIBILITY_TIMEOUT, None)
    }
}

impl RedisOptions {
    fn with_visibility(visibility_timeout: Duration, restore: Option<Duration>) -> Self {
        let restore_interval = restore.unwrap_or_else(|| {
            (visibility_timeout / 2).clamp(Duration::from_millis(500), Duration::from_secs(10))
        });
        Self {
            visibility_timeout,
            restore_interval,
        }
    }
}

/// Splits our options off the URI's query; the rest goes to the client.
/// A bad value is an error naming it.
pub fn parse_uri(uri: &str) -> Result<(String, RedisOptions), String> {
    let (base, query) = match uri.split_once('?') {
        Some((base, query)) => (base, query),
        None => (uri, ""),
    };
    let seconds = |key: &str, value: &str| {
        value
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .ok_or_else(|| format!("`{key}` must be a positive number of seconds, not `{value}`"))
    };
    let mut visibility = None;
    let mut restore = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "visibility_timeout" => visibility = Some(seconds(key, value)?),
            "unacked_restore_interval" => restore = Some(seconds(key, value)?),
            _ => rest.push(pair),
        }
    }
    let mut client_uri = base.to_owned();
    if !rest.is_empty() {
        client_uri.push('?');
        client_uri.push_str(&rest.join("&"));
    }
    let options =
        RedisOptions::with_visibility(visibility.unwrap_or(DEFAULT_VISIBILITY_TIMEOUT), restore);
    Ok((client_uri, options))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_from_the_query() {
        let (uri, o) =
            parse_uri("redis://:pw@h:6379/3?visibility_timeout=2&protocol=resp3").unwrap();
        assert_eq!(uri, "redis://:pw@h:6379/3?protocol=resp3");
        assert_eq!(o.visibility_timeout, Duration::from_secs(2));
        assert_eq!(o.restore_interval, Duration::from_secs(1));
        let (uri, o) = parse_uri("redis://h/").unwrap();
        assert_eq!((uri.as_str(), o), ("redis://h/", RedisOptions::default()));
        assert_eq!(o.visibility_timeout, Duration::from_secs(3600));
        assert_eq!(o.restore_interval, Duration::from_secs(10));
        let (_, o) =
            parse_uri("redis://h/?visibility_timeout=0.2&unacked_restore_interval=3").unwrap();
        assert_eq!(o.restore_interval, Duration::from_secs(3));
        assert!(parse_uri("redis://h/?visibility_timeout=soon")
            .unwrap_err()
            .contains("visibility_timeout"));
    }
}
