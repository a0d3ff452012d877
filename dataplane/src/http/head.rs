//! Request and response heads: parsing, strict framing decisions, header access.

use std::ops::Range;

use super::{tokens, trim};

/// The most headers weft will parse in one head, whatever the configured limit (stack array).
pub const MAX_HEADERS_CEILING: usize = 256;

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(u64),
    Chunked,
    /// Response only: the body runs until the upstream closes.
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("request header section too large")]
    TooLarge,
    #[error("too many request headers")]
    TooManyHeaders,
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("unsupported transfer-encoding")]
    UnsupportedCoding,
    #[error("unsupported method: {0}")]
    UnsupportedMethod(&'static str),
}

impl HeadError {
    /// The status weft answers with, and the metric/log label.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge | HeadError::TooManyHeaders => 431,
            HeadError::Malformed(_) => 400,
            HeadError::UnsupportedCoding | HeadError::UnsupportedMethod(_) => 501,
        }
    }
}

/// Raw head bytes plus offsets of its parts (no per-header allocation).
#[derive(Debug, Clone)]
struct Raw {
    bytes: Vec<u8>,
    headers: Vec<(Range<usize>, Range<usize>)>,
}

impl Raw {
    fn capture(buf: &[u8], len: usize, hdrs: &[httparse::Header<'_>]) -> Raw {
        let base = buf.as_ptr() as usize;
        let off = |s: &[u8]| {
            let start = s.as_ptr() as usize - base;
            start..start + s.len()
        };
        Raw {
            bytes: buf[..len].to_vec(),
            headers: hdrs
                .iter()
                .map(|h| (off(h.name.as_bytes()), off(h.value)))
                .collect(),
        }
    }

    fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers
            .iter()
            .map(|(n, v)| (&self.bytes[n.clone()], &self.bytes[v.clone()]))
    }

    fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }
}

/// A parsed, framing-checked request head.
#[derive(Debug, Clone)]
pub struct RequestHead {
    raw: Raw,
    method: Range<usize>,
    target: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub body: BodyKind,
    /// The client wants the connection kept open after this exchange.
    pub keep_alive: bool,
    pub expect_continue: bool,
}

/// A parsed response head.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    raw: Raw,
    pub status: u16,
    reason: Range<usize>,
    pub minor_version: u8,
    pub body: BodyKind,
    pub keep_alive: bool,
}

/// Every LF in a head must end a CRLF: RFC 9112 lets a recipient accept bare LF, but two
/// parsers that disagree about line ends are how requests get smuggled, so weft refuses it.
fn has_bare_lf(head: &[u8]) -> bool {
    head.iter()
        .enumerate()
        .any(|(i, b)| *b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
}

/// Content-Length values: every value of every header must be the same decimal number.
fn content_length<'a>(
    mut values: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<u64>, HeadError> {
    let mut found: Option<u64> = None;
    values.try_for_each(|v| {
        for part in v.split(|b| *b == b',') {
            let part = trim(part);
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(HeadError::Malformed("invalid content-length"));
            }
            let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            match found {
                Some(prev) if prev != n => {
                    return Err(HeadError::Malformed("conflicting content-length"))
                }
                _ => found = Some(n),
            }
        }
        Ok(())
    })?;
    Ok(found)
}

/// Transfer-Encoding: weft forwards only plain `chunked`. Returns whether the header is present.
fn transfer_encoding<'a>(values: impl Iterator<Item = &'a [u8]>) -> Result<bool, HeadError> {
    let mut codings = 0usize;
    let mut present = false;
    for v in values {
        present = true;
        for t in tokens(v) {
            codings += 1;
            if !t.eq_ignore_ascii_case(b"chunked") {
                return Err(HeadError::UnsupportedCoding);
            }
        }
    }
    if present && codings != 1 {
        // empty value, or `chunked, chunked`
        return Err(HeadError::Malformed("invalid transfer-encoding"));
    }
    Ok(present)
}

fn connection_has(raw: &Raw, token: &str) -> bool {
    raw.get_all("connection")
        .any(|v| tokens(v).any(|t| t.eq_ignore_ascii_case(token.as_bytes())))
}

fn map_parse_error(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders,
        httparse::Error::HeaderName => HeadError::Malformed("invalid header name"),
        httparse::Error::HeaderValue => HeadError::Malformed("invalid header value"),
        httparse::Error::NewLine => HeadError::Malformed("invalid line ending"),
        httparse::Error::Version => HeadError::Malformed("invalid http version"),
        httparse::Error::Token => HeadError::Malformed("invalid token"),
        httparse::Error::Status => HeadError::Malformed("invalid status"),
    }
}

impl RequestHead {
    /// Parses a request head at the start of `buf`. `Ok(None)`: incomplete, read more.
    /// On success returns the head and the number of bytes it used.
    pub fn parse(
        buf: &[u8],
        max_bytes: usize,
        max_headers: usize,
    ) -> Result<Option<(RequestHead, usize)>, HeadError> {
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS_CEILING];
        let slots = max_headers.clamp(1, MAX_HEADERS_CEILING);
        let mut req = httparse::Request::new(&mut storage[..slots]);
        let len = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return if buf.len() > max_bytes {
                    Err(HeadError::TooLarge)
                } else {
                    Ok(None)
                };
            }
            Err(e) => {
                // a partial head that is already over the limit is "too large", not "malformed"
                return Err(map_parse_error(e));
            }
        };
        if len > max_bytes {
            return Err(HeadError::TooLarge);
        }
        if has_bare_lf(&buf[..len]) {
            return Err(HeadError::Malformed("bare LF in request head"));
        }
        let method = req.method.ok_or(HeadError::Malformed("missing method"))?;
        let target = req
            .path
            .ok_or(HeadError::Malformed("missing request target"))?;
        let minor_version = req.version.ok_or(HeadError::Malformed("missing version"))?;
        let base = buf.as_ptr() as usize;
        let method_r =
            method.as_ptr() as usize - base..method.as_ptr() as usize - base + method.len();
        let target_r =
            target.as_ptr() as usize - base..target.as_ptr() as usize - base + target.len();
        let raw = Raw::capture(buf, len, req.headers);

        if method == "CONNECT" {
            return Err(HeadError::UnsupportedMethod("CONNECT"));
        }
        if !(target.starts_with('/') || (target == "*" && method == "OPTIONS")) {
            return Err(HeadError::Malformed(
                "request target must be in origin form",
            ));
        }
        let host_check = {
            let mut hosts = raw.get_all("host");
            (hosts.next(), hosts.next())
        };
        match host_check {
            (Some(h), None) if !trim(h).is_empty() || minor_version == 0 => {}
            (None, _) if minor_version == 0 => {}
            (None, _) => return Err(HeadError::Malformed("missing host header")),
            _ => return Err(HeadError::Malformed("multiple or empty host headers")),
        }

        let chunked = transfer_encoding(raw.get_all("transfer-encoding"))?;
        let length = content_length(raw.get_all("content-length"))?;
        let body = match (chunked, length) {
            (true, Some(_)) => {
                return Err(HeadError::Malformed(
                    "both content-length and transfer-encoding",
                ))
            }
            (true, None) if minor_version == 0 => {
                return Err(HeadError::Malformed("transfer-encoding in HTTP/1.0"))
            }
            (true, None) => BodyKind::Chunked,
            (false, Some(0)) | (false, None) => BodyKind::None,
            (false, Some(n)) => BodyKind::Length(n),
        };
        let keep_alive = if minor_version == 0 {
            connection_has(&raw, "keep-alive")
        } else {
            !connection_has(&raw, "close")
        };
        let mut expect_continue = false;
        for v in raw.get_all("expect") {
            if trim(v).eq_ignore_ascii_case(b"100-continue") && minor_version == 1 {
                expect_continue = true;
            } else {
                return Err(HeadError::Malformed("unsupported expectation"));
            }
        }
        Ok(Some((
            RequestHead {
                raw,
                method: method_r,
                target: target_r,
                minor_version,
                body,
                keep_alive,
                expect_continue,
            },
            len,
        )))
    }

    pub fn method(&self) -> &str {
        // httparse only yields token characters, which are ASCII
        std::str::from_utf8(&self.raw.bytes[self.method.clone()]).unwrap_or("")
    }

    /// The request target as received (path and query).
    pub fn target(&self) -> &str {
        std::str::from_utf8(&self.raw.bytes[self.target.clone()]).unwrap_or("/")
    }

    /// The path without the query string.
    pub fn path(&self) -> &str {
        let t = self.target();
        t.split_once('?').map_or(t, |(p, _)| p)
    }

    /// The Host header, or "" when absent (HTTP/1.0).
    pub fn host(&self) -> &str {
        self.header("host")
            .and_then(|h| std::str::from_utf8(trim(h)).ok())
            .unwrap_or("")
    }

    pub fn header<'a>(&'a self, name: &'a str) -> Option<&'a [u8]> {
        self.raw.get_all(name).next()
    }

    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.raw.headers()
    }

    /// Tokens listed in `Connection` headers (those headers are hop-by-hop too).
    pub fn connection_tokens(&self) -> Vec<&[u8]> {
        self.raw.get_all("connection").flat_map(tokens).collect()
    }

    pub fn is_head(&self) -> bool {
        self.method() == "HEAD"
    }
}

impl ResponseHead {
    /// Parses a response head; `Ok(None)` when incomplete. `head_request`: the request was HEAD,
    /// so the response has no body whatever its headers say.
    pub fn parse(
        buf: &[u8],
        max_bytes: usize,
        head_request: bool,
    ) -> Result<Option<(ResponseHead, usize)>, HeadError> {
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS_CEILING];
        let mut res = httparse::Response::new(&mut storage);
        let len = match res.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return if buf.len() > max_bytes {
                    Err(HeadError::TooLarge)
                } else {
                    Ok(None)
                };
            }
            Err(e) => return Err(map_parse_error(e)),
        };
        if len > max_bytes {
            return Err(HeadError::TooLarge);
        }
        let status = res.code.ok_or(HeadError::Malformed("missing status"))?;
        let minor_version = res.version.ok_or(HeadError::Malformed("missing version"))?;
        let reason = res.reason.unwrap_or("");
        let base = buf.as_ptr() as usize;
        let reason_r = if reason.is_empty() {
            0..0
        } else {
            reason.as_ptr() as usize - base..reason.as_ptr() as usize - base + reason.len()
        };
        let raw = Raw::capture(buf, len, res.headers);
        let chunked = transfer_encoding(raw.get_all("transfer-encoding"))?;
        let length = content_length(raw.get_all("content-length"))?;
        let body = if head_request || (100..200).contains(&status) || status == 204 || status == 304
        {
            BodyKind::None
        } else {
            match (chunked, length) {
                (true, Some(_)) => {
                    return Err(HeadError::Malformed(
                        "both content-length and transfer-encoding",
                    ))
                }
                (true, None) => BodyKind::Chunked,
                (false, Some(0)) => BodyKind::None,
                (false, Some(n)) => BodyKind::Length(n),
                (false, None) => BodyKind::UntilClose,
            }
        };
        let keep_alive = body != BodyKind::UntilClose
            && if minor_version == 0 {
                connection_has(&raw, "keep-alive")
            } else {
                !connection_has(&raw, "close")
            };
        Ok(Some((
            ResponseHead {
                raw,
                status,
                reason: reason_r,
                minor_version,
                body,
                keep_alive,
            },
            len,
        )))
    }

    pub fn reason(&self) -> &[u8] {
        &self.raw.bytes[self.reason.clone()]
    }

    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.raw.headers()
    }

    pub fn connection_tokens(&self) -> Vec<&[u8]> {
        self.raw.get_all("connection").flat_map(tokens).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> Result<Option<(RequestHead, usize)>, HeadError> {
        RequestHead::parse(text.as_bytes(), 60 * 1024, 100)
    }

    #[test]
    fn framing_of_good_requests() {
        let cases = [
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", BodyKind::None, true),
            (
                "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
                BodyKind::Length(5),
                true,
            ),
            (
                "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n",
                BodyKind::Length(5),
                true,
            ),
            (
                "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n",
                BodyKind::Chunked,
                true,
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                BodyKind::None,
                false,
            ),
            ("GET / HTTP/1.0\r\n\r\n", BodyKind::None, false),
            (
                "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                BodyKind::None,
                true,
            ),
        ];
        for (text, body, ka) in cases {
            let (h, n) = req(text).expect(text).expect(text);
            assert_eq!(n, text.len());
            assert_eq!(h.body, body, "{text}");
            assert_eq!(h.keep_alive, ka, "{text}");
        }
    }

    #[test]
    fn smuggling_and_malformed_framing_rejected() {
        let cases = [
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\n\r\n", 400),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n", 400),
            ("GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            ("GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\n\r\n", 400),
            ("CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 501),
        ];
        for (text, status) in cases {
            let err = req(text).expect_err(text);
            assert_eq!(err.status(), status, "{text}: {err}");
        }
    }

    #[test]
    fn limits_give_431() {
        let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
        let text = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
        assert_eq!(req(&text).map(|_| ()), Err(HeadError::TooManyHeaders));
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "v".repeat(70 * 1024)
        );
        assert_eq!(req(&big).map(|_| ()), Err(HeadError::TooLarge));
        // incomplete but already over the limit
        let partial = format!("GET / HTTP/1.1\r\nX: {}", "v".repeat(70 * 1024));
        assert_eq!(req(&partial).map(|_| ()), Err(HeadError::TooLarge));
        assert!(matches!(req("GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None)));
    }

    #[test]
    fn accessors() {
        let (h, _) = req("GET /a/b?q=1 HTTP/1.1\r\nHost: Example.com:80\r\nConnection: keep-alive, X-Secret\r\nExpect: 100-continue\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert_eq!(h.method(), "GET");
        assert_eq!(h.target(), "/a/b?q=1");
        assert_eq!(h.path(), "/a/b");
        assert_eq!(h.host(), "Example.com:80");
        assert!(h.expect_continue);
        assert_eq!(
            h.connection_tokens(),
            vec![&b"keep-alive"[..], &b"X-Secret"[..]]
        );
    }

    #[test]
    fn response_framing() {
        let cases: [(&str, bool, BodyKind, bool); 6] = [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
                false,
                BodyKind::Length(3),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
                true,
                BodyKind::None,
                true,
            ),
            (
                "HTTP/1.1 204 No Content\r\n\r\n",
                false,
                BodyKind::None,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
                BodyKind::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\n\r\n",
                false,
                BodyKind::UntilClose,
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
                false,
                BodyKind::None,
                false,
            ),
        ];
        for (text, head, body, ka) in cases {
            let (r, _) = ResponseHead::parse(text.as_bytes(), 65536, head)
                .expect(text)
                .expect(text);
            assert_eq!((r.body, r.keep_alive), (body, ka), "{text}");
        }
    }
}
