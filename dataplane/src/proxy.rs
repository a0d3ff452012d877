//! The HTTP/1.1 reverse proxy: one task per downstream connection, requests in sequence
//! (keep-alive, pipelining-safe), bodies streamed through bounded buffers in both directions.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use tracing::debug;

use crate::core::{ClusterState, Core, ListenerCtx, Tables};
use crate::http::{self, BodyKind, ChunkedDecoder, ChunkedError, RequestHead, ResponseHead};
use crate::io::{deadline, BufConn, IoError};
use crate::pool::Upstream;
use crate::tls::{self, Accepted, Peer, Stream};
use weft_api::peerauthn::Mode;

/// The largest response head weft accepts from an upstream (bytes).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Why a request could not be proxied, with the side that failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route")]
    NoRoute,
    #[error("no healthy upstream")]
    NoEndpoint,
    #[error("upstream overflow")]
    Overflow,
    #[error("upstream connect error: connection refused")]
    ConnectRefused,
    #[error("upstream connect timeout")]
    ConnectTimeout,
    #[error("upstream connect error: {0}")]
    Connect(std::io::Error),
    #[error("upstream connection reset")]
    UpstreamReset,
    #[error("upstream request timeout")]
    UpstreamTimeout,
    #[error("upstream sent a malformed response")]
    UpstreamProtocol,
    #[error("malformed request body: {0}")]
    BadBody(ChunkedError),
    #[error("downstream closed or stalled mid-request")]
    DownstreamGone,
    #[error("upstream TLS handshake failed: {0}")]
    Tls(String),
    #[error("upstream secure naming check failed: {0}")]
    SecureNaming(String),
    #[error("no workload certificate yet for an mTLS upstream")]
    NoCertificate,
}

impl ProxyError {
    /// The status weft answers with (0: nothing can be answered).
    pub fn status(&self) -> u16 {
        match self {
            ProxyError::NoRoute => 404,
            ProxyError::NoEndpoint | ProxyError::Overflow | ProxyError::NoCertificate => 503,
            ProxyError::ConnectRefused
            | ProxyError::Connect(_)
            | ProxyError::UpstreamReset
            | ProxyError::UpstreamProtocol
            | ProxyError::Tls(_)
            | ProxyError::SecureNaming(_) => 502,
            ProxyError::ConnectTimeout | ProxyError::UpstreamTimeout => 504,
            ProxyError::BadBody(_) => 400,
            ProxyError::DownstreamGone => 0,
        }
    }

    /// Envoy-style response flag, for logs.
    pub fn flag(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "NR",
            ProxyError::NoEndpoint => "UH",
            ProxyError::Overflow => "UO",
            ProxyError::ConnectRefused
            | ProxyError::ConnectTimeout
            | ProxyError::Connect(_)
            | ProxyError::NoCertificate => "UF",
            ProxyError::Tls(_) | ProxyError::SecureNaming(_) => "UF,URX",
            ProxyError::UpstreamReset => "UC",
            ProxyError::UpstreamTimeout => "UT",
            ProxyError::UpstreamProtocol => "UPE",
            ProxyError::BadBody(_) => "DPE",
            ProxyError::DownstreamGone => "DC",
        }
    }
}

/// An error while moving a body, by side.
enum CopyError {
    Read,
    Write,
    Framing(ChunkedError),
}

/// Holds a cluster's per-core active count up for the life of one upstream exchange.
struct ActiveGuard(Rc<ClusterState>);

impl ActiveGuard {
    fn new(c: &Rc<ClusterState>) -> Self {
        c.active.set(c.active.get() + 1);
        ActiveGuard(c.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.set(self.0.active.get().saturating_sub(1));
    }
}

enum HeadRead {
    Head(RequestHead),
    Closed,
    Reply(u16, String),
}

/// Serves one downstream connection until it closes, errs, idles out or the core drains.
pub async fn serve(core: &Rc<Core>, ctx: &Rc<ListenerCtx>, conn: Accepted) {
    let peer = conn.stream.tcp().peer_addr().ok();
    let caller = conn.peer;
    let mut down = BufConn::new(conn.stream, core.tables().limits.buffer_bytes);
    requests(core, ctx, &mut down, peer, caller.as_deref()).await;
    finish(&mut down).await;
}

/// How long a closing connection may take to say goodbye (TLS close_notify, the peer's FIN).
const LINGER: Duration = Duration::from_secs(1);
/// Bytes read and dropped while lingering (an unread request body, a pipelined request).
const LINGER_BYTES: usize = 256 * 1024;

/// Closes the write side (TLS: close_notify first), then reads and drops what the client still
/// sends until it closes too, within bounds: closing a socket with unread bytes makes the
/// kernel send a reset, which can destroy the response the client has not read yet.
async fn finish(down: &mut BufConn<Stream>) {
    let _ = deadline(LINGER, async {
        down.io.close().await.map_err(IoError::Io)?;
        let mut dropped = 0;
        while dropped < LINGER_BYTES {
            // what is buffered (a whole buffer after a 431) goes first, so `fill` has room
            let n = down.buffered().len();
            down.consume(n);
            dropped += down.fill(0).await?;
        }
        Ok(())
    })
    .await;
}

/// Serves requests in sequence until the connection must close.
async fn requests(
    core: &Rc<Core>,
    ctx: &Rc<ListenerCtx>,
    down: &mut BufConn<Stream>,
    peer: Option<SocketAddr>,
    caller: Option<&Peer>,
) {
    let mut first = true;
    loop {
        if !first && down.buffered().is_empty() {
            // Let the other connections of this core run before reading the next request: under
            // load the client's next request has usually arrived by then, so the read needs no
            // readiness poll (an io_uring op and a completion).
            futures_lite::future::yield_now().await;
        }
        let tables = core.tables();
        let head = match read_head(core, &tables, down, first).await {
            HeadRead::Head(h) => h,
            HeadRead::Closed => return,
            HeadRead::Reply(status, why) => {
                ctx.counters.bad_request(status);
                debug!(core = core.id, listener = %ctx.name, ?peer, status, "bad request: {why}");
                reply(down, ctx, status, &why, true).await;
                return;
            }
        };
        first = false;
        // the tables of now, not of when the wait for this request began: a snapshot applied
        // while the connection was idle (routes, policies, the mTLS mode) governs the request
        let tables = core.tables();
        if ctx.inbound && caller.is_none() && tables.mode(&ctx.name) == Mode::Strict {
            // opened under PERMISSIVE without an identity; the port is STRICT now
            debug!(core = core.id, listener = %ctx.name, ?peer, "mTLS is STRICT now: closing a connection without a verified identity");
            return;
        }
        if caller.is_some_and(|c| c.not_after <= crate::control::now_secs()) {
            // the identity was proven with a certificate that has expired since: the caller
            // reconnects with its renewed one
            debug!(core = core.id, listener = %ctx.name, ?peer, "the caller's certificate has expired: closing");
            return;
        }
        let started = Instant::now();
        let from = Downstream { addr: peer, caller };
        let keep = exchange(core, ctx, &tables, down, &head, &from).await;
        core.metrics.request_done(started.elapsed());
        if !keep {
            return;
        }
    }
}

async fn read_head(
    core: &Core,
    tables: &Tables,
    down: &mut BufConn<Stream>,
    first: bool,
) -> HeadRead {
    let l = &tables.limits;
    let mut header_deadline: Option<Instant> = None;
    loop {
        if !down.buffered().is_empty() {
            match RequestHead::parse(
                down.buffered(),
                l.max_request_header_bytes,
                l.max_request_headers,
            ) {
                Ok(Some((h, n))) => {
                    down.consume(n);
                    return HeadRead::Head(h);
                }
                Ok(None) => {}
                Err(e) => return HeadRead::Reply(e.status(), e.to_string()),
            }
            header_deadline.get_or_insert_with(|| Instant::now() + l.header_read_timeout);
        }
        let wait = match header_deadline {
            Some(at) => at.saturating_duration_since(Instant::now()),
            None if first => l.header_read_timeout,
            None => l.keepalive_idle_timeout,
        };
        let read = deadline(wait, down.fill(l.max_request_header_bytes + 1));
        let result = if header_deadline.is_none() {
            // between requests a drain closes the connection at once
            futures_lite::future::or(read, async {
                core.drain.wait().await;
                Err(IoError::Eof)
            })
            .await
        } else {
            read.await
        };
        match result {
            Ok(_) => {}
            Err(IoError::Timeout) if header_deadline.is_some() => {
                return HeadRead::Reply(408, "request header read timeout".into());
            }
            Err(IoError::Full) => {
                return HeadRead::Reply(431, "request header section too large".into())
            }
            Err(_) => return HeadRead::Closed,
        }
    }
}

/// Writes a locally generated response; returns whether the connection may stay open.
async fn reply(
    down: &mut BufConn<Stream>,
    ctx: &ListenerCtx,
    status: u16,
    why: &str,
    close: bool,
) -> bool {
    let body = format!("{why}\n");
    let mut out = String::with_capacity(160 + body.len());
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{body}",
        http::reason(status),
        body.len(),
        if close { "connection: close\r\n" } else { "" }
    );
    ctx.counters.response(status);
    ctx.counters.add_out(out.len() as u64);
    let ok = down.write_all(out.as_bytes()).await.is_ok();
    ok && !close
}

/// One request/response exchange. Returns whether the downstream connection stays open.
async fn exchange(
    core: &Rc<Core>,
    ctx: &Rc<ListenerCtx>,
    tables: &Tables,
    down: &mut BufConn<Stream>,
    head: &RequestHead,
    from: &Downstream<'_>,
) -> bool {
    ctx.counters.add_in(head_len_estimate(head));
    let mut target = None;
    if ctx.inbound {
        match inbound_checks(core, ctx, tables, head, from) {
            Ok(t) => target = t,
            Err((status, why)) => {
                if status == 400 {
                    ctx.counters.bad_request(400);
                }
                debug!(core = core.id, listener = %ctx.name, method = head.method(), path = head.path(), status, "request refused: {why}");
                // a body left unread means the connection cannot carry another request
                let close = head.body != BodyKind::None || !head.keep_alive;
                return reply(down, ctx, status, &why, close).await;
            }
        }
    }
    let path = match target
        .as_deref()
        .map_or(head.path(), |t| t.split_once('?').map_or(t, |(p, _)| p))
    {
        // `OPTIONS *` asks about the server as a whole: the routes for `/` answer it
        "*" => "/",
        p => p,
    };
    let route = tables
        .http
        .get(&ctx.name)
        .and_then(|t| t.find(head.host(), path));
    let mut state = State {
        body_done: head.body == BodyKind::None,
        response_started: false,
    };
    let result = match route {
        None => Err(ProxyError::NoRoute),
        Some(cluster) => {
            // the inbound sidecar says who called: By=<itself>;URI=<the verified caller>
            let by = from.caller.filter(|_| ctx.inbound).and_then(|_| core.tls());
            let up = UpstreamHead {
                target: target.as_deref().unwrap_or(head.target()),
                from,
                xfcc: by
                    .as_ref()
                    .zip(from.caller)
                    .map(|(t, caller)| (&*t.spiffe_id, caller.spiffe_id.as_str())),
            };
            forward(core, ctx, tables, cluster, down, head, &up, &mut state).await
        }
    };
    match result {
        Ok(keep) => keep && head.keep_alive && !core.drain.is_fired(),
        Err(e) => {
            if let Some(c) = route {
                match e {
                    ProxyError::ConnectRefused
                    | ProxyError::ConnectTimeout
                    | ProxyError::Connect(_)
                    | ProxyError::Tls(_)
                    | ProxyError::SecureNaming(_) => c.counters.connect_error(),
                    ProxyError::UpstreamTimeout => c.counters.timeout(),
                    ProxyError::Overflow => c.counters.overflowed(),
                    _ => {}
                }
            }
            if let ProxyError::Tls(_) | ProxyError::SecureNaming(_) = e {
                tracing::warn!(core = core.id, listener = %ctx.name, host = head.host(), flag = e.flag(), "request failed: {e}");
            } else {
                debug!(core = core.id, listener = %ctx.name, method = head.method(), path = head.path(), flag = e.flag(), "request failed: {e}");
            }
            if state.response_started || e.status() == 0 {
                return false;
            }
            if let ProxyError::BadBody(_) = e {
                ctx.counters.bad_request(400);
            }
            let close = !state.body_done || !head.keep_alive || core.drain.is_fired();
            reply(down, ctx, e.status(), &e.to_string(), close).await
        }
    }
}

/// Who sent the request: the address, and the verified identity on an mTLS connection.
struct Downstream<'a> {
    addr: Option<SocketAddr>,
    caller: Option<&'a Peer>,
}

/// What the upstream request head is built from, besides the downstream head.
struct UpstreamHead<'a> {
    /// The target to send: the normalized one on a sidecar's inbound listener.
    target: &'a str,
    from: &'a Downstream<'a>,
    /// `x-forwarded-client-cert` to set (inbound, with a verified caller): (By, URI).
    xfcc: Option<(&'a str, &'a str)>,
}

/// A sidecar inbound's checks before routing: path normalization, then authorization. Returns
/// the normalized target when it differs from the one received, or the status and reason.
fn inbound_checks(
    core: &Core,
    ctx: &ListenerCtx,
    tables: &Tables,
    head: &RequestHead,
    from: &Downstream<'_>,
) -> Result<Option<String>, (u16, Cow<'static, str>)> {
    let raw_path = head.path();
    if raw_path == "*" {
        // `OPTIONS *`: no path to normalize or to match (a `paths` rule never matches it)
        return authorize(core, ctx, tables, head, from, "*").map(|()| None);
    }
    let normalized =
        weft_api::authz::normalize_path(raw_path).map_err(|e| (400, Cow::Owned(e.to_string())))?;
    authorize(core, ctx, tables, head, from, &normalized)?;
    match normalized {
        Cow::Borrowed(_) => Ok(None),
        Cow::Owned(n) => Ok(Some(format!("{n}{}", &head.target()[raw_path.len()..]))),
    }
}

/// The workload's policies on one request; Err: 403.
fn authorize(
    core: &Core,
    ctx: &ListenerCtx,
    tables: &Tables,
    head: &RequestHead,
    from: &Downstream<'_>,
    normalized: &str,
) -> Result<(), (u16, Cow<'static, str>)> {
    if !tables.authz.is_empty() {
        // a header the policies read, as the app will see it: every value, comma-joined (a
        // value that is not UTF-8 cannot be matched as the app reads it: 400)
        let mut joined: Vec<(&str, String)> = Vec::new();
        for name in tables.authz.header_names() {
            let mut values: Vec<&str> = Vec::new();
            for (_, v) in head
                .headers()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            {
                values.push(std::str::from_utf8(http::trim(v)).map_err(|_| {
                    (
                        400,
                        Cow::Borrowed("a header the authorization policy reads is not UTF-8"),
                    )
                })?);
            }
            if !values.is_empty() {
                joined.push((name.as_str(), values.join(",")));
            }
        }
        let header = |name: &str| {
            joined
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let r = weft_api::authz::Request {
            principal: from.caller.map(|p| p.principal.as_str()),
            namespace: from.caller.map(|p| p.namespace.as_str()),
            source_ip: from.addr.map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip()),
            host: head.host(),
            port: ctx.port,
            method: head.method(),
            path: normalized,
            header: &header,
        };
        let d = tables.authz.decide(&r);
        core.metrics.authz(&d);
        if !d.allowed {
            return Err((403, Cow::Borrowed("RBAC: access denied")));
        }
    }
    Ok(())
}

struct State {
    /// The request body has been read completely from downstream.
    body_done: bool,
    /// Bytes of the response have gone downstream: an error can only close the connection.
    response_started: bool,
}

fn head_len_estimate(head: &RequestHead) -> u64 {
    let headers: usize = head.headers().map(|(n, v)| n.len() + v.len() + 4).sum();
    (head.method().len() + head.target().len() + 12 + headers + 2) as u64
}

/// Builds the request head sent upstream: hop-by-hop headers removed, framing normalized,
/// `x-forwarded-for` appended, `x-request-id` added when absent.
fn upstream_head(core: &Core, head: &RequestHead, up: &UpstreamHead<'_>) -> Vec<u8> {
    let peer = up.from.addr;
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(head.method().as_bytes());
    out.push(b' ');
    out.extend_from_slice(up.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let conn_tokens = head.connection_tokens();
    let mut xff: Option<Vec<u8>> = None;
    let mut has_id = false;
    for (name, value) in head.headers() {
        if http::is_hop_by_hop(name, &conn_tokens)
            || name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"expect")
            // only an inbound sidecar says who called, from the verified certificate
            || name.eq_ignore_ascii_case(b"x-forwarded-client-cert")
        {
            continue;
        }
        if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            let v = xff.get_or_insert_with(Vec::new);
            if !v.is_empty() {
                v.extend_from_slice(b", ");
            }
            v.extend_from_slice(http::trim(value));
            continue;
        }
        if name.eq_ignore_ascii_case(b"x-request-id") {
            has_id = true;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(ip) = peer.map(|p| p.ip()) {
        let v = xff.get_or_insert_with(Vec::new);
        if !v.is_empty() {
            v.extend_from_slice(b", ");
        }
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let _ = write!(StrBuf(v), "{ip}");
    }
    if let Some(v) = xff {
        out.extend_from_slice(b"x-forwarded-for: ");
        out.extend_from_slice(&v);
        out.extend_from_slice(b"\r\n");
    }
    if let Some((by, uri)) = up.xfcc {
        // Envoy's format
        let _ = write!(
            StrBuf(&mut out),
            "x-forwarded-client-cert: By={by};URI={uri}\r\n"
        );
    }
    if !has_id {
        let (a, b) = (core.random(), core.random());
        // a version-4 UUID from the core's generator
        let _ = write!(
            StrBuf(&mut out),
            "x-request-id: {:08x}-{:04x}-4{:03x}-{:04x}-{:012x}\r\n",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            (b >> 48) & 0x3fff | 0x8000,
            b & 0xffff_ffff_ffff
        );
    }
    match head.body {
        BodyKind::Length(n) => {
            let _ = write!(StrBuf(&mut out), "content-length: {n}\r\n");
        }
        BodyKind::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        BodyKind::None | BodyKind::UntilClose => {}
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Builds the response head sent downstream.
fn downstream_head(resp: &ResponseHead, close: bool, http10_keep_alive: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    let _ = write!(StrBuf(&mut out), "HTTP/1.1 {} ", resp.status);
    out.extend_from_slice(resp.reason());
    out.extend_from_slice(b"\r\n");
    let conn_tokens = resp.connection_tokens();
    for (name, value) in resp.headers() {
        if http::is_hop_by_hop(name, &conn_tokens) {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if resp.body == BodyKind::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if http10_keep_alive {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

struct StrBuf<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for StrBuf<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Opens a connection to `addr` for `spec`: mTLS with secure naming when the cluster names the
/// identities allowed to serve it (a mesh service), plaintext otherwise.
pub async fn connect_upstream(
    core: &Core,
    spec: &crate::snapshot::Cluster,
    addr: SocketAddr,
) -> Result<Stream, ProxyError> {
    let tcp = connect_tcp(addr, spec.connect_timeout).await?;
    if spec.identities.is_empty() {
        return Ok(Stream::Plain(tcp));
    }
    let Some(t) = core.tls() else {
        return Err(ProxyError::NoCertificate);
    };
    match tls::connect(tcp, &t, addr, &spec.identities, spec.connect_timeout).await {
        Ok((stream, resumed)) => {
            core.metrics.handshake("outbound", resumed);
            Ok(stream)
        }
        Err(e) => {
            core.metrics.handshake_failed("outbound", e.reason);
            Err(if e.reason == "secure_naming" {
                ProxyError::SecureNaming(e.detail)
            } else {
                ProxyError::Tls(e.to_string())
            })
        }
    }
}

/// Whether a pooled connection may serve `spec`: plaintext for a plain cluster; for a mesh
/// service, mTLS made with this core's current certificate and bundle, to a server holding one
/// of the service's identities, whose certificate has not expired since.
pub fn fits(core: &Core, stream: &Stream, spec: &crate::snapshot::Cluster) -> bool {
    match stream.server() {
        None => spec.identities.is_empty(),
        Some(s) => {
            spec.identities.contains(&s.spiffe_id)
                && core.tls().is_some_and(|t| t.generation == s.generation)
                && s.not_after > crate::control::now_secs()
        }
    }
}

async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ProxyError> {
    let stream = deadline(timeout, async {
        TcpStream::connect(addr)
            .await
            .map_err(|e| IoError::Io(e.into()))
    })
    .await
    .map_err(|e| match e {
        IoError::Timeout => ProxyError::ConnectTimeout,
        IoError::Io(e) if e.kind() == ErrorKind::ConnectionRefused => ProxyError::ConnectRefused,
        IoError::Io(e) => ProxyError::Connect(e),
        IoError::Eof | IoError::Full => ProxyError::UpstreamReset,
    })?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    core: &Rc<Core>,
    ctx: &ListenerCtx,
    tables: &Tables,
    cluster: &Rc<ClusterState>,
    down: &mut BufConn<Stream>,
    head: &RequestHead,
    up_head: &UpstreamHead<'_>,
    state: &mut State,
) -> Result<bool, ProxyError> {
    let l = &tables.limits;
    let spec = &cluster.spec;
    let started = Instant::now();
    let Some(i) = cluster.lb.pick(spec.endpoints.len()) else {
        return Err(ProxyError::NoEndpoint);
    };
    if cluster.active.get() >= spec.max_connections {
        return Err(ProxyError::Overflow);
    }
    let _active = ActiveGuard::new(cluster);
    let endpoint = spec.endpoints[i];

    // Validate the first chunk-size line before anything goes upstream, so a request with a
    // malformed chunked body never reaches the app. (Not with 100-continue: the client waits.)
    // Body bytes already buffered ride in the same write as the head.
    let mut decoder = ChunkedDecoder::new();
    let mut pending = Vec::new();
    let mut body_left = 0u64;
    match head.body {
        BodyKind::Chunked if !head.expect_continue => {
            while !down.buffered().contains(&b'\n') && down.buffered().len() < 4096 {
                deadline(l.header_read_timeout, down.fill(l.buffer_bytes))
                    .await
                    .map_err(|_| ProxyError::DownstreamGone)?;
            }
            let used = decoder
                .decode(down.buffered(), &mut pending)
                .map_err(ProxyError::BadBody)?;
            ctx.counters.add_in(used as u64);
            down.consume(used);
            state.body_done = decoder.is_done();
        }
        BodyKind::Length(n) => {
            let take = if head.expect_continue {
                0
            } else {
                (down.buffered().len() as u64).min(n) as usize
            };
            pending.extend_from_slice(&down.buffered()[..take]);
            ctx.counters.add_in(take as u64);
            down.consume(take);
            body_left = n - take as u64;
            state.body_done = body_left == 0;
        }
        _ => {}
    }

    let mut out = upstream_head(core, head, up_head);
    out.extend_from_slice(&pending);
    // a reused connection may have been closed by the upstream while idle: one retry on a fresh
    // connection is safe while no part of a streamed body has been sent
    let retry_safe = state.body_done;
    let mut attempt = 0;
    let (mut up, resp) = loop {
        attempt += 1;
        let pooled = core
            .pool
            .take(endpoint, spec.idle_timeout)
            .filter(|c| fits(core, &c.io, spec));
        let reused = pooled.is_some();
        let mut up = match pooled {
            Some(c) => c,
            None => BufConn::new(
                connect_upstream(core, spec, endpoint).await?,
                l.buffer_bytes,
            ),
        };
        cluster.counters.request();
        let may_retry = reused && retry_safe && attempt == 1;
        if deadline(l.request_timeout, up.write_all(&out))
            .await
            .is_err()
        {
            if may_retry {
                continue;
            }
            return Err(ProxyError::UpstreamReset);
        }
        if !state.body_done {
            if head.expect_continue {
                down.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .await
                    .map_err(|_| ProxyError::DownstreamGone)?;
            }
            let sent = match head.body {
                BodyKind::Length(_) => {
                    copy_length(down, &mut up.io, body_left, l.request_timeout).await
                }
                _ => copy_chunked(down, &mut up.io, &mut decoder, l.request_timeout).await,
            };
            match sent {
                Ok(n) => ctx.counters.add_in(n),
                Err(CopyError::Read) => return Err(ProxyError::DownstreamGone),
                Err(CopyError::Framing(e)) => return Err(ProxyError::BadBody(e)),
                Err(CopyError::Write) => return Err(ProxyError::UpstreamReset),
            }
            state.body_done = true;
        }
        let remaining = l.request_timeout.saturating_sub(started.elapsed());
        match read_response_head(&mut up, remaining, head.is_head()).await {
            Ok(resp) => break (up, resp),
            Err(ProxyError::UpstreamReset) if may_retry => continue,
            Err(e) => return Err(e),
        }
    };

    let close = !head.keep_alive || resp.body == BodyKind::UntilClose || core.drain.is_fired();
    let mut out = downstream_head(&resp, close, head.minor_version == 0 && head.keep_alive);
    // whatever of the body is already buffered goes out with the head, in one write
    let mut resp_decoder = ChunkedDecoder::new();
    let mut resp_left = 0u64;
    match resp.body {
        BodyKind::None => {}
        BodyKind::Length(n) => {
            let take = (up.buffered().len() as u64).min(n) as usize;
            out.extend_from_slice(&up.buffered()[..take]);
            up.consume(take);
            resp_left = n - take as u64;
        }
        BodyKind::Chunked => {
            let used = resp_decoder
                .decode(up.buffered(), &mut out)
                .map_err(|_| ProxyError::UpstreamProtocol)?;
            up.consume(used);
        }
        BodyKind::UntilClose => {
            out.extend_from_slice(up.buffered());
            let n = up.buffered().len();
            up.consume(n);
        }
    }
    state.response_started = true;
    ctx.counters.response(resp.status);
    ctx.counters.add_out(out.len() as u64);
    deadline(l.request_timeout, down.write_all(&out))
        .await
        .map_err(|_| ProxyError::DownstreamGone)?;
    let copied = match resp.body {
        BodyKind::None => Ok(0),
        BodyKind::Length(_) => {
            copy_length(&mut up, &mut down.io, resp_left, l.request_timeout).await
        }
        BodyKind::Chunked => {
            copy_chunked(&mut up, &mut down.io, &mut resp_decoder, l.request_timeout).await
        }
        BodyKind::UntilClose => copy_until_close(&mut up, &mut down.io, l.request_timeout).await,
    };
    match copied {
        Ok(n) => ctx.counters.add_out(n),
        Err(CopyError::Read) | Err(CopyError::Framing(_)) => return Err(ProxyError::UpstreamReset),
        Err(CopyError::Write) => return Err(ProxyError::DownstreamGone),
    }
    if resp.keep_alive
        && resp.body != BodyKind::UntilClose
        && up.buffered().is_empty()
        && fits(core, &up.io, spec)
    {
        core.pool.put(endpoint, up, spec.max_idle_per_endpoint);
    }
    Ok(!close)
}

async fn read_response_head(
    up: &mut Upstream,
    wait: Duration,
    head_request: bool,
) -> Result<ResponseHead, ProxyError> {
    let until = Instant::now() + wait;
    loop {
        if !up.buffered().is_empty() {
            match ResponseHead::parse(up.buffered(), MAX_RESPONSE_HEAD, head_request) {
                Ok(Some((resp, n))) => {
                    up.consume(n);
                    if (100..200).contains(&resp.status) {
                        if resp.status == 101 {
                            // weft strips Upgrade, so a switch is a protocol error
                            return Err(ProxyError::UpstreamProtocol);
                        }
                        continue; // interim response: weft answered 100-continue itself
                    }
                    return Ok(resp);
                }
                Ok(None) => {}
                Err(_) => return Err(ProxyError::UpstreamProtocol),
            }
        }
        match deadline(
            until.saturating_duration_since(Instant::now()),
            up.fill(MAX_RESPONSE_HEAD + 1),
        )
        .await
        {
            Ok(_) => {}
            Err(IoError::Timeout) => return Err(ProxyError::UpstreamTimeout),
            Err(IoError::Full) => return Err(ProxyError::UpstreamProtocol),
            Err(_) => return Err(ProxyError::UpstreamReset),
        }
    }
}

/// Moves exactly `len` body bytes. Returns the count.
async fn copy_length<R, W>(
    from: &mut BufConn<R>,
    to: &mut W,
    len: u64,
    idle: Duration,
) -> Result<u64, CopyError>
where
    R: AsyncRead + AsyncWrite + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut left = len;
    while left > 0 {
        if from.buffered().is_empty() {
            deadline(idle, from.fill(0))
                .await
                .map_err(|_| CopyError::Read)?;
        }
        let n = (from.buffered().len() as u64).min(left) as usize;
        write(to, &from.buffered()[..n], idle).await?;
        from.consume(n);
        left -= n as u64;
    }
    Ok(len)
}

/// Moves a chunked body, re-encoded by the decoder. Returns the bytes read.
async fn copy_chunked<R, W>(
    from: &mut BufConn<R>,
    to: &mut W,
    dec: &mut ChunkedDecoder,
    idle: Duration,
) -> Result<u64, CopyError>
where
    R: AsyncRead + AsyncWrite + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    let mut out = Vec::new();
    while !dec.is_done() {
        if from.buffered().is_empty() {
            deadline(idle, from.fill(0))
                .await
                .map_err(|_| CopyError::Read)?;
        }
        out.clear();
        let used = dec
            .decode(from.buffered(), &mut out)
            .map_err(CopyError::Framing)?;
        from.consume(used);
        total += used as u64;
        if !out.is_empty() {
            write(to, &out, idle).await?;
        }
    }
    Ok(total)
}

async fn copy_until_close<R, W>(
    from: &mut BufConn<R>,
    to: &mut W,
    idle: Duration,
) -> Result<u64, CopyError>
where
    R: AsyncRead + AsyncWrite + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    loop {
        if from.buffered().is_empty() {
            match deadline(idle, from.fill(0)).await {
                Ok(_) => {}
                Err(IoError::Eof) => return Ok(total),
                Err(_) => return Err(CopyError::Read),
            }
        }
        let n = from.buffered().len();
        write(to, from.buffered(), idle).await?;
        from.consume(n);
        total += n as u64;
    }
}

async fn write<W: AsyncWrite + Unpin>(
    to: &mut W,
    bytes: &[u8],
    idle: Duration,
) -> Result<(), CopyError> {
    deadline(idle, async {
        to.write_all(bytes).await.map_err(IoError::Io)?;
        to.flush().await.map_err(IoError::Io)
    })
    .await
    .map_err(|_| CopyError::Write)
}
