//! HTTP/1.1 message parsing and framing, sans-I/O.
//!
//! `head` parses request and response heads with httparse and decides message framing the
//! strict way (RFC 9112 §6): anything ambiguous is an error, never a guess, because a proxy that
//! guesses differently from its upstream is a request-smuggling vector. `chunked` decodes and
//! re-encodes chunked bodies as they stream through.

pub mod chunked;
pub mod head;

pub use chunked::{ChunkedDecoder, ChunkedError};
pub use head::{BodyKind, HeadError, RequestHead, ResponseHead};

/// Hop-by-hop header names (RFC 9110 §7.6.1), never forwarded; plus any named in `Connection`.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Is this header hop-by-hop, given the tokens listed in the message's `Connection` headers?
pub fn is_hop_by_hop(name: &[u8], connection_tokens: &[&[u8]]) -> bool {
    // `Connection: host` must not strip the Host that routing and authorization saw, nor
    // `Connection: content-length` the framing of a message
    if name.eq_ignore_ascii_case(b"host") || name.eq_ignore_ascii_case(b"content-length") {
        return false;
    }
    HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
        || connection_tokens
            .iter()
            .any(|t| name.eq_ignore_ascii_case(t))
}

/// Splits a comma-separated header value list into trimmed, non-empty tokens.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(trim)
        .filter(|t| !t.is_empty())
}

pub fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// The reason phrase weft uses for the statuses it generates itself.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}
