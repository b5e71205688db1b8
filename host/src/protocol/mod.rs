//! The JSON-RPC rules of docs/protocol.md, and nothing else: parsing a
//! request, the id to answer with, result and error bodies, the method a
//! routing key names. No I/O and no transport: everything that reads or
//! writes a JSON-RPC body (dispatch, the client, the HTTP endpoint,
//! metrics, the fuzz targets) comes here, and nothing here knows where the
//! bytes came from.

mod relay;
mod request;
mod response;

pub use relay::{Envelope, EnvelopeError};
pub use request::{parse_request, request_body, Rejected, Request};
pub use response::{error_body, read_response, result_body, Response};

/// The method a request's routing key names: its last `.`-separated
/// segment (`simple.add` names `add`), as PROTOCOL.md says.
pub fn method_of(routing_key: &str) -> &str {
    // A plain loop over the bytes: `rsplit('.')` and `rfind('.')` cost
    // about 150 instructions here (their searcher's set-up), and this runs
    // several times per request. A `.` is never inside a UTF-8 sequence.
    match routing_key.bytes().rposition(|b| b == b'.') {
        Some(dot) => &routing_key[dot + 1..],
        None => routing_key,
    }
}

/// The service a routing key names: everything before its method
/// (`simple.add` names `simple`; `simple` alone names itself).
pub fn service_of(routing_key: &str) -> &str {
    match routing_key.bytes().rposition(|b| b == b'.') {
        Some(dot) => &routing_key[..dot],
        None => routing_key,
    }
}

#[cfg(test)]
mod tests {
    use super::{method_of, service_of};

    #[test]
    fn the_service_is_what_comes_before_the_method() {
        assert_eq!(service_of("simple.add"), "simple");
        assert_eq!(service_of("a.b.c"), "a.b");
        assert_eq!(service_of("simple"), "simple");
    }

    #[test]
    fn the_method_is_the_last_segment() {
        assert_eq!(method_of("simple.add"), "add");
        assert_eq!(method_of("a.b.c"), "c");
        assert_eq!(method_of("plain"), "plain");
        assert_eq!(method_of("trailing."), "");
    }
}
