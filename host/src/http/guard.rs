//! The checks a request to `/rpc/*` passes before it is relayed, each a
//! pure function of the request's parts.

use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, ORIGIN};
use axum::http::{HeaderMap, HeaderValue};
use subtle::ConstantTimeEq as _;

use crate::config::HttpToken;

/// Whether `headers` carry `Authorization: Bearer <token>`. The token is
/// compared in constant time (only its length can be learnt by timing).
pub(super) fn bearer_matches(headers: &HeaderMap, token: &HttpToken) -> bool {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return false;
    };
    let Some((scheme, presented)) = value
        .as_bytes()
        .iter()
        .position(|&b| b == b' ')
        .map(|space| value.as_bytes().split_at(space))
    else {
        return false;
    };
    // The scheme is case-insensitive (RFC 9110, 11.1); the token is not.
    scheme.eq_ignore_ascii_case(b"bearer")
        && bool::from(presented.trim_ascii().ct_eq(token.expose()))
}

/// Whether the body is declared `application/json` (parameters such as
/// `charset` allowed). Anything else is what a browser may send cross-site
/// without asking first (`text/plain`, a form), so it is refused.
pub(super) fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// Whether `[http] allow` lets `routing_key` through (no list: all). The
/// key's length is checked before this is called: matching is recursive
/// on `#`.
pub(super) fn is_allowed(allow: Option<&[String]>, routing_key: &str) -> bool {
    allow.is_none_or(|patterns| {
        patterns
            .iter()
            .any(|p| crate::bus::topic::matches(p, routing_key))
    })
}

/// The request's `Origin`, when `[http] cors_origins` lists it.
pub(super) fn listed_origin<'h>(
    headers: &'h HeaderMap,
    origins: &[String],
) -> Option<&'h HeaderValue> {
    let origin = headers.get(ORIGIN)?;
    let text = origin.to_str().ok()?;
    origins
        .iter()
        .any(|o| o.eq_ignore_ascii_case(text))
        .then_some(origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_str(value).unwrap());
        }
        h
    }

    fn token(text: &str) -> HttpToken {
        crate::config::HostConfig::load(None, &Default::default(), |name| {
            (name == crate::config::HTTP_TOKEN_ENV).then(|| text.to_owned())
        })
        .unwrap()
        .http
        .token
        .unwrap()
    }

    #[test]
    fn only_the_exact_bearer_token_passes() {
        let t = token("s3cret-token");
        assert!(bearer_matches(
            &headers(&[("authorization", "Bearer s3cret-token")]),
            &t
        ));
        assert!(bearer_matches(
            &headers(&[("authorization", "bearer s3cret-token")]),
            &t
        ));
        for wrong in [
            "Bearer s3cret-toke",
            "Bearer s3cret-token2",
            "Bearer S3CRET-TOKEN",
            "Basic s3cret-token",
            "s3cret-token",
            "Bearer",
            "Bearer ",
        ] {
            assert!(
                !bearer_matches(&headers(&[("authorization", wrong)]), &t),
                "{wrong}"
            );
        }
        assert!(!bearer_matches(&HeaderMap::new(), &t));
    }

    #[test]
    fn only_json_bodies_are_taken() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON;charset=UTF-8",
        ] {
            assert!(is_json(&headers(&[("content-type", ok)])), "{ok}");
        }
        for refused in [
            "text/plain",
            "text/plain;charset=UTF-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonp",
            "",
        ] {
            assert!(
                !is_json(&headers(&[("content-type", refused)])),
                "{refused}"
            );
        }
        assert!(!is_json(&HeaderMap::new()));
    }

    #[test]
    fn the_allow_list_uses_topic_patterns() {
        let allow = ["simple.*".to_owned(), "demo.ping".to_owned()];
        assert!(is_allowed(None, "anything.at.all"));
        assert!(is_allowed(Some(&allow), "simple.add"));
        assert!(is_allowed(Some(&allow), "demo.ping"));
        assert!(!is_allowed(Some(&allow), "demo.greet"));
        assert!(!is_allowed(Some(&allow), "simple.a.b"));
        assert!(!is_allowed(Some(&[]), "simple.add"));
    }

    #[test]
    fn only_listed_origins_are_echoed() {
        let origins = ["https://ops.example.com".to_owned()];
        let h = headers(&[("origin", "https://ops.example.com")]);
        assert_eq!(
            listed_origin(&h, &origins).map(HeaderValue::as_bytes),
            Some(&b"https://ops.example.com"[..])
        );
        let h = headers(&[("origin", "https://evil.example.com")]);
        assert_eq!(listed_origin(&h, &origins), None);
        assert_eq!(listed_origin(&HeaderMap::new(), &origins), None);
    }
}
