//! Mutual TLS between sidecars: the workload's SVID and the trust bundle turned into per-core
//! rustls configs (each core owns its configs, session caches and counters), the inbound
//! handshake per PeerAuthentication mode (STRICT / PERMISSIVE by first byte / DISABLE) and the
//! outbound handshake with secure naming.
//!
//! A resumed session never outlives what was checked when it was made: configs (and so their
//! session caches) are rebuilt whenever the certificate or the trust bundle changes, and every
//! handshake, full or resumed, checks the peer leaf's validity window again before a byte of a
//! request moves.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncWrite};
use futures_rustls::{TlsAcceptor, TlsConnector};
use glommio::net::TcpStream;
use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::ServerSessionMemoryCache;
use rustls::{ClientConfig, HandshakeKind, ServerConfig};
use weft_api::peerauthn::Mode;
use weft_api::svid::{SvidClientVerifier, SvidServerVerifier};

/// Sessions kept per config per core (client and server side alike).
const SESSION_CACHE: usize = 4096;
/// PERMISSIVE: how long to wait for a client's first byte before taking it for plaintext.
const DETECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// The workload's certificate, key and trust bundle, as the agent sends them to every core.
#[derive(Debug)]
pub struct TlsMaterial {
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8.
    pub key_der: Vec<u8>,
    pub bundle: Vec<CertificateDer<'static>>,
    pub trust_domain: String,
    pub spiffe_id: String,
}

/// One core's rustls configs, built from one `TlsMaterial`.
pub struct CoreTls {
    /// This workload's SPIFFE ID (the `By=` of x-forwarded-client-cert).
    pub spiffe_id: Rc<str>,
    /// Which build of this core's configs this is: a pooled connection made under an older
    /// certificate or bundle is never reused.
    pub generation: u64,
    trust_domain: String,
    strict: TlsAcceptor,
    permissive: TlsAcceptor,
    client: TlsConnector,
}

impl CoreTls {
    pub fn build(m: &TlsMaterial, generation: u64) -> Result<CoreTls, String> {
        let provider = weft_api::crypto_provider();
        let key = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(m.key_der.clone()));
        let server = |mandatory: bool| -> Result<Arc<ServerConfig>, String> {
            let verifier =
                SvidClientVerifier::new(&m.bundle, &m.trust_domain, mandatory, provider.clone())
                    .map_err(|e| format!("trust bundle: {e}"))?;
            let mut c = ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_client_cert_verifier(Arc::new(verifier))
                .with_single_cert(m.chain.clone(), key())
                .map_err(|e| format!("workload certificate: {e}"))?;
            c.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
            Ok(Arc::new(c))
        };
        // secure naming is checked per destination after the handshake (`connect`); the
        // verifier checks the chain and the SVID shape
        let verifier =
            SvidServerVerifier::new(&m.bundle, &m.trust_domain, Vec::new(), provider.clone())
                .map_err(|e| format!("trust bundle: {e}"))?;
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(m.chain.clone(), key())
            .map_err(|e| format!("workload certificate: {e}"))?;
        // SVIDs carry no DNS name; the name below only keys the session cache
        client.enable_sni = false;
        client.resumption = Resumption::in_memory_sessions(SESSION_CACHE);
        Ok(CoreTls {
            spiffe_id: m.spiffe_id.as_str().into(),
            generation,
            trust_domain: m.trust_domain.clone(),
            strict: TlsAcceptor::from(server(true)?),
            permissive: TlsAcceptor::from(server(false)?),
            client: TlsConnector::from(Arc::new(client)),
        })
    }
}

/// The verified identity of the other side of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// `spiffe://cluster.local/ns/prod/sa/order`
    pub spiffe_id: String,
    /// Istio's form for authorization: `cluster.local/ns/prod/sa/order`.
    pub principal: String,
    pub namespace: String,
    /// The certificate's notAfter (Unix seconds).
    pub not_after: i64,
}

/// A handshake that failed, with a reason from a small fixed set (a metric label).
#[derive(Debug)]
pub struct HandshakeError {
    pub reason: &'static str,
    pub detail: String,
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.detail, self.reason)
    }
}

fn failed(reason: &'static str, detail: impl Into<String>) -> HandshakeError {
    HandshakeError {
        reason,
        detail: detail.into(),
    }
}

/// Maps a handshake I/O error to a reason label.
fn classify(e: &io::Error) -> HandshakeError {
    use rustls::{CertificateError as C, Error as E};
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
        return failed("io", e.to_string());
    };
    let reason = match tls {
        E::NoCertificatesPresented => "no_client_certificate",
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => "certificate_expired",
        E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "certificate_not_yet_valid"
        }
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => "unknown_ca",
        E::InvalidCertificate(_) => "bad_certificate",
        E::General(_) => "not_an_svid",
        E::InvalidMessage(_) | E::InappropriateHandshakeMessage { .. } => "not_tls",
        E::AlertReceived(_) => "alert_received",
        _ => "tls_error",
    };
    failed(reason, tls.to_string())
}

/// A handshake bounded by `timeout`, its failure classified.
async fn within<T>(
    timeout: Duration,
    handshake: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, HandshakeError> {
    match crate::io::deadline(timeout, async {
        handshake.await.map_err(crate::io::IoError::Io)
    })
    .await
    {
        Ok(s) => Ok(s),
        Err(crate::io::IoError::Io(e)) => Err(classify(&e)),
        Err(e) => Err(failed("timeout", e.to_string())),
    }
}

/// Identity and freshness of the peer leaf, checked after every handshake (full or resumed).
fn peer_of(certs: &[CertificateDer<'_>], trust_domain: &str) -> Result<Peer, HandshakeError> {
    let leaf = certs
        .first()
        .ok_or_else(|| failed("no_client_certificate", "peer presented no certificate"))?;
    // the verifier checked the SVID's shape in the full handshake this session came from
    let (id, not_after) =
        weft_api::identity::spiffe_of(leaf).map_err(|e| failed("not_an_svid", e))?;
    if id.trust_domain != trust_domain {
        return Err(failed(
            "not_an_svid",
            format!("{id} is not in trust domain {trust_domain}"),
        ));
    }
    if not_after <= crate::control::now_secs() {
        return Err(failed(
            "certificate_expired",
            format!("{id}: certificate expired (resumed session)"),
        ));
    }
    let spiffe_id = id.to_string();
    Ok(Peer {
        principal: spiffe_id
            .strip_prefix("spiffe://")
            .unwrap_or(&spiffe_id)
            .to_string(),
        namespace: id.namespace.clone(),
        spiffe_id,
        not_after,
    })
}

/// How a downstream connection arrived.
pub struct Accepted {
    pub stream: Stream,
    pub peer: Option<Rc<Peer>>,
    /// `None`: plaintext; `Some(true)`: a resumed TLS session.
    pub resumed: Option<bool>,
}

/// The inbound handshake for `mode`. `tls` is None until the workload has a certificate: then
/// STRICT refuses every connection and PERMISSIVE accepts plaintext only.
pub async fn accept(
    tcp: TcpStream,
    tls: Option<&CoreTls>,
    mode: Mode,
    timeout: Duration,
) -> Result<Accepted, HandshakeError> {
    let plain = |tcp| Accepted {
        stream: Stream::Plain(tcp),
        peer: None,
        resumed: None,
    };
    let (tls, acceptor) = match (mode, tls) {
        (Mode::Disable, _) => return Ok(plain(tcp)),
        (Mode::Strict, None) => {
            return Err(failed(
                "no_workload_certificate",
                "STRICT mTLS, and this sidecar has no certificate yet",
            ))
        }
        (Mode::Strict, Some(t)) => (t, &t.strict),
        (_, tls) => {
            // PERMISSIVE (and UNSET, which means PERMISSIVE): TLS if the first byte says so
            let mut first = [0u8; 1];
            let peeked = crate::io::deadline(timeout.min(DETECT_TIMEOUT), async {
                tcp.peek(&mut first)
                    .await
                    .map_err(|e| crate::io::IoError::Io(e.into()))
            })
            .await;
            // a client that sends nothing first (a server-speaks-first protocol) is plaintext
            let n = match peeked {
                Ok(n) => n,
                Err(crate::io::IoError::Timeout) => 0,
                Err(e) => return Err(failed("io", e.to_string())),
            };
            match tls {
                Some(t) if n == 1 && first[0] == TLS_HANDSHAKE => (t, &t.permissive),
                _ => return Ok(plain(tcp)),
            }
        }
    };
    let s = within(timeout, acceptor.accept(tcp)).await?;
    let conn = s.get_ref().1;
    let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
    // a client may present no certificate in PERMISSIVE mode: TLS, but no identity
    let peer = match conn.peer_certificates() {
        None => None,
        Some(certs) => Some(Rc::new(peer_of(certs, &tls.trust_domain)?)),
    };
    Ok(Accepted {
        stream: Stream::Server(Box::new(s)),
        peer,
        resumed: Some(resumed),
    })
}

/// The session-cache key for an endpoint: a synthetic DNS name (never sent: SNI is off).
fn cache_name(endpoint: SocketAddr) -> ServerName<'static> {
    let ip = match endpoint.ip() {
        IpAddr::V4(v4) => weft_api::hex(&v4.octets()),
        IpAddr::V6(v6) => weft_api::hex(&v6.octets()),
    };
    ServerName::try_from(format!("p{}.a{ip}.weft.invalid", endpoint.port()))
        .unwrap_or_else(|_| ServerName::IpAddress(endpoint.ip().into()))
}

/// The outbound mTLS handshake, then secure naming: the server must hold one of `allowed`.
/// Returns the stream and whether the session was resumed.
pub async fn connect(
    tcp: TcpStream,
    tls: &CoreTls,
    endpoint: SocketAddr,
    allowed: &[String],
    timeout: Duration,
) -> Result<(Stream, bool), HandshakeError> {
    let s = within(timeout, tls.client.connect(cache_name(endpoint), tcp)).await?;
    let conn = s.get_ref().1;
    let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
    let peer = peer_of(conn.peer_certificates().unwrap_or(&[]), &tls.trust_domain)?;
    if !allowed.contains(&peer.spiffe_id) {
        return Err(failed(
            "secure_naming",
            format!(
                "upstream {endpoint} presented {}, which is not an identity of this service (allowed: {})",
                peer.spiffe_id,
                allowed.join(", ")
            ),
        ));
    }
    let server = Rc::new(Server {
        spiffe_id: peer.spiffe_id,
        not_after: peer.not_after,
        generation: tls.generation,
    });
    Ok((Stream::Client(Box::new(s), server), resumed))
}

/// A connection, plaintext or TLS, as the proxy reads and writes it.
pub enum Stream {
    Plain(TcpStream),
    Server(Box<futures_rustls::server::TlsStream<TcpStream>>),
    /// With what was verified of the server (checked again when a pooled connection is reused).
    Client(
        Box<futures_rustls::client::TlsStream<TcpStream>>,
        Rc<Server>,
    ),
}

/// What an outbound handshake verified.
#[derive(Debug)]
pub struct Server {
    pub spiffe_id: String,
    pub not_after: i64,
    /// `CoreTls::generation` of the configs it was made with.
    pub generation: u64,
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Server(s) => s.get_ref().0,
            Stream::Client(s, _) => s.get_ref().0,
        }
    }

    /// What was verified of an upstream mTLS server.
    pub fn server(&self) -> Option<&Server> {
        match self {
            Stream::Client(_, s) => Some(s),
            _ => None,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Client(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Client(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Client(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_close(cx),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_close(cx),
            Stream::Client(s, _) => Pin::new(s.as_mut()).poll_close(cx),
        }
    }
}
