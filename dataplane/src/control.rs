//! The control-plane client, on the agent thread: join-token bootstrap, SVID issuance and
//! renewal, and the snapshot stream (ACK/NACK).
//!
//! The key pair is generated here and never leaves the process. The first contact verifies the
//! control plane by the root fingerprint the join token carries; every later connection uses mTLS
//! with the current SVID and the trust bundle. When the control plane is away the proxy keeps
//! its last snapshot and certificate and reconnects with jittered backoff.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use serde::Serialize;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};
use weft_api::proto::mesh_client::MeshClient;
use weft_api::proto::{self, subscribe_request::Kind};
use weft_api::units::rfc3339;
use weft_api::{JoinToken, WorkloadRef};

/// The name the control plane's certificate carries (DNS SAN) and the identity it must have.
const CONTROL_DNS: &str = "weft-control";
const CONTROL_NS: &str = "weft-system";
const CONTROL_SA: &str = "weft-control";
/// HTTP/2 receive window for the control stream (bytes).
const SNAPSHOT_WINDOW: u32 = 8 * 1024 * 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct ControlOptions {
    pub address: SocketAddr,
    pub token_file: PathBuf,
}

/// The proxy's current certificate, key and trust bundle.
pub struct Certified {
    pub chain: Vec<CertificateDer<'static>>,
    pub key_der: Vec<u8>,
    pub bundle: Vec<CertificateDer<'static>>,
    pub spiffe_id: String,
    pub not_before: i64,
    pub not_after: i64,
    pub serial: String,
    /// When this process received it (notBefore is backdated for clock skew).
    pub received: i64,
}

/// Agent → control task: the outcome of applying a snapshot on every core.
#[derive(Debug)]
pub enum Applied {
    Ack(u64),
    Nack(u64, String),
}

#[derive(Serialize)]
pub struct BundleEntry {
    pub serial: String,
    pub subject: String,
    pub not_after: String,
}

#[derive(Serialize)]
pub struct CertsView {
    pub spiffe_id: String,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    pub expires_in_seconds: i64,
    pub trust_bundle: Vec<BundleEntry>,
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn cert_facts(der: &[u8]) -> (String, String, i64, i64) {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, x)) => (
            weft_api::hex(x.raw_serial()),
            x.subject().to_string(),
            x.validity().not_before.timestamp(),
            x.validity().not_after.timestamp(),
        ),
        Err(_) => (String::new(), String::new(), 0, 0),
    }
}

impl Certified {
    fn new(
        chain: Vec<CertificateDer<'static>>,
        key_der: Vec<u8>,
        bundle: Vec<CertificateDer<'static>>,
    ) -> Result<Certified, String> {
        let leaf = chain.first().ok_or("empty certificate chain")?;
        let (id, _) = weft_api::identity::spiffe_of(leaf)?;
        let (serial, _, not_before, not_after) = cert_facts(leaf);
        Ok(Certified {
            chain,
            key_der,
            bundle,
            spiffe_id: id.to_string(),
            not_before,
            not_after,
            serial,
            received: now_secs(),
        })
    }

    pub fn view(&self) -> CertsView {
        CertsView {
            spiffe_id: self.spiffe_id.clone(),
            serial: self.serial.clone(),
            not_before: rfc3339(self.not_before),
            not_after: rfc3339(self.not_after),
            expires_in_seconds: self.not_after - now_secs(),
            trust_bundle: self
                .bundle
                .iter()
                .map(|c| {
                    let (serial, subject, _, not_after) = cert_facts(c);
                    BundleEntry {
                        serial,
                        subject,
                        not_after: rfc3339(not_after),
                    }
                })
                .collect(),
        }
    }

    /// When to renew: half the remaining lifetime at receipt, ±10% jitter. (notBefore is
    /// backdated, so it is not where the lifetime starts.)
    fn renew_at(&self, jitter: f64) -> i64 {
        let life = (self.not_after - self.received).max(2) as f64;
        self.received + (life * (0.5 + 0.1 * (jitter * 2.0 - 1.0))) as i64
    }
}

/// Verifies the control plane: its chain must lead to a pinned root (by fingerprint, first
/// contact) or to the trust bundle, it must be valid for `weft-control`, and its SPIFFE ID must
/// be the control plane's. rustls's own chain and signature checks do the cryptography.
#[derive(Debug)]
struct ControlVerifier {
    pinned: Option<String>,
    bundle: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ControlVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchors: Vec<CertificateDer<'static>> = match &self.pinned {
            Some(fp) => intermediates
                .iter()
                .filter(|c| &weft_api::fingerprint(c) == fp)
                .map(|c| c.clone().into_owned())
                .collect(),
            None => self.bundle.clone(),
        };
        if anchors.is_empty() {
            return Err(rustls::Error::General(
                "the control plane's certificate does not chain to the root pinned by the join token".into(),
            ));
        }
        let mut roots = RootCertStore::empty();
        for a in anchors {
            roots
                .add(a)
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        }
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        let (id, _) = weft_api::identity::spiffe_of(end_entity).map_err(rustls::Error::General)?;
        if id.namespace != CONTROL_NS || id.service_account != CONTROL_SA {
            return Err(rustls::Error::General(format!(
                "{id} is not the control plane"
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

pub fn client_config(
    pinned: Option<String>,
    cert: Option<&Certified>,
) -> Result<Arc<ClientConfig>, String> {
    let provider = weft_api::crypto_provider();
    let verifier = ControlVerifier {
        pinned,
        bundle: cert.map(|c| c.bundle.clone()).unwrap_or_default(),
        provider: provider.clone(),
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut cfg = match cert {
        Some(c) => builder
            .with_client_auth_cert(
                c.chain.clone(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key_der.clone())),
            )
            .map_err(|e| e.to_string())?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

pub async fn connect(
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
) -> Result<MeshClient<Channel>, String> {
    let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let tls = tls.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(CONTROL_DNS).map_err(std::io::Error::other)?;
            let s = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
        }
    });
    let channel = Endpoint::from_static("http://weft-control")
        .connect_timeout(Duration::from_secs(5))
        // a snapshot of a large mesh is hundreds of KiB: a 64 KiB HTTP/2 window would make
        // each push wait for several WINDOW_UPDATE round trips
        .initial_stream_window_size(Some(SNAPSHOT_WINDOW))
        .initial_connection_window_size(Some(SNAPSHOT_WINDOW))
        .connect_with_connector(connector)
        .await
        .map_err(|e| {
            format!(
                "cannot reach the control plane at {addr}: {}",
                error_chain(&e)
            )
        })?;
    Ok(MeshClient::new(channel))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A fresh key pair and a CSR without names: the identity comes from the credential.
pub fn key_and_csr() -> Result<(KeyPair, Vec<u8>), String> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| e.to_string())?;
    Ok((key, csr.der().to_vec()))
}

async fn certify(client: &mut MeshClient<Channel>, token: &str) -> Result<Certified, String> {
    let (key, csr) = key_and_csr()?;
    let resp = client
        .certify(proto::CertifyRequest {
            join_token: token.to_string(),
            csr_der: csr,
        })
        .await
        .map_err(|s| format!("certify refused: {}", s.message()))?
        .into_inner();
    let chain = resp
        .chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let bundle = resp
        .trust_bundle_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    Certified::new(chain, key.serialize_der(), bundle)
}

/// Per-thread jitter source for backoff and renewal (not for secrets).
fn jitter() -> f64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1000) / 1000.0
}

fn backoff(attempt: u32) -> Duration {
    let base = BACKOFF_MIN
        .saturating_mul(1 << attempt.min(6))
        .min(BACKOFF_MAX);
    base.mul_f64(0.5 + jitter() / 2.0)
}

/// Runs the control-plane client until the agent stops. Snapshots go to `updates`; the agent's
/// ACK/NACKs come back on `applied`; the current certificate is published in `cert`, and
/// `cert_changed` hears of every new certificate or trust bundle (the data path's TLS follows).
pub async fn run(
    opts: ControlOptions,
    updates: mpsc::UnboundedSender<proto::Snapshot>,
    mut applied: mpsc::UnboundedReceiver<Applied>,
    cert: Rc<RefCell<Option<Rc<Certified>>>>,
    cert_changed: mpsc::UnboundedSender<()>,
    cores: u32,
) {
    let token = match std::fs::read_to_string(&opts.token_file) {
        Ok(t) => t.trim().to_string(),
        Err(e) => {
            warn!(
                "cannot read --token-file {}: {e}",
                opts.token_file.display()
            );
            return;
        }
    };
    let claims = match JoinToken::parse_unverified(&token) {
        Ok(c) => c,
        Err(e) => {
            warn!("--token-file {}: {e}", opts.token_file.display());
            return;
        }
    };
    let workload: WorkloadRef = claims.workload.clone();

    // 1. first certificate, authenticated by the join token, over a connection pinned to the root
    let mut attempt = 0;
    let first = loop {
        let result = async {
            let mut client = connect(
                opts.address,
                client_config(Some(claims.root_fingerprint.clone()), None)?,
            )
            .await?;
            certify(&mut client, &token).await
        }
        .await;
        match result {
            Ok(c) => break c,
            Err(e) => {
                warn!(%workload, "bootstrap failed, retrying: {e}");
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
        }
    };
    info!(spiffe_id = %first.spiffe_id, not_after = %rfc3339(first.not_after), "certificate issued");
    *cert.borrow_mut() = Some(Rc::new(first));
    let _ = cert_changed.send(());

    // 2. stream snapshots over mTLS; renew at half-life; reconnect with backoff
    let mut attempt = 0;
    let mut renew_jitter = jitter();
    loop {
        let current = cert.borrow().clone();
        let Some(current) = current else { return };
        let tls = match client_config(None, Some(&current)) {
            Ok(t) => t,
            Err(e) => {
                warn!("tls config: {e}");
                return;
            }
        };
        let mut client = match connect(opts.address, tls).await {
            Ok(c) => c,
            Err(e) => {
                warn!("{e}; keeping the last snapshot and certificate");
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
                continue;
            }
        };
        let (out_tx, out_rx) = mpsc::channel(16);
        let _ = out_tx
            .send(proto::SubscribeRequest {
                kind: Some(Kind::Hello(proto::Hello {
                    workload: workload.to_string(),
                    cores,
                })),
            })
            .await;
        let mut inbound = match client
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(out_rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => {
                warn!("subscribe refused: {}", s.message());
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
                continue;
            }
        };
        info!(%workload, "subscribed to the control plane");
        loop {
            let renew_in = Duration::from_secs(current_renew_in(&cert, renew_jitter));
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(snap)) => {
                        attempt = 0;
                        if !snap.trust_bundle_der.is_empty()
                            && update_bundle(&cert, &snap.trust_bundle_der)
                        {
                            let _ = cert_changed.send(());
                        }
                        let _ = updates.send(snap);
                    }
                    Ok(None) => { warn!("control plane closed the stream"); break; }
                    Err(s) => { warn!("control stream: {}", s.message()); break; }
                },
                Some(a) = applied.recv() => {
                    let kind = match a {
                        Applied::Ack(v) => Kind::Ack(proto::Ack { version: v }),
                        Applied::Nack(v, reason) => Kind::Nack(proto::Nack { version: v, reason }),
                    };
                    if out_tx.send(proto::SubscribeRequest { kind: Some(kind) }).await.is_err() {
                        break;
                    }
                }
                _ = tokio::time::sleep(renew_in) => {
                    match certify(&mut client, "").await {
                        Ok(c) => {
                            info!(not_after = %rfc3339(c.not_after), "certificate renewed");
                            *cert.borrow_mut() = Some(Rc::new(c));
                            let _ = cert_changed.send(());
                            renew_jitter = jitter();
                        }
                        Err(e) => {
                            warn!("renewal failed, keeping the current certificate: {e}");
                            tokio::time::sleep(backoff(attempt)).await;
                            attempt += 1;
                        }
                    }
                }
            }
        }
        tokio::time::sleep(backoff(attempt)).await;
        attempt += 1;
        debug!("reconnecting");
    }
}

fn current_renew_in(cert: &Rc<RefCell<Option<Rc<Certified>>>>, jitter: f64) -> u64 {
    cert.borrow()
        .as_ref()
        .map_or(60, |c| (c.renew_at(jitter) - now_secs()).max(0) as u64)
}

/// Takes a new trust bundle; returns whether it changed.
fn update_bundle(cert: &Rc<RefCell<Option<Rc<Certified>>>>, bundle: &[Vec<u8>]) -> bool {
    let mut slot = cert.borrow_mut();
    if let Some(c) = slot.as_ref() {
        let new: Vec<CertificateDer<'static>> = bundle
            .iter()
            .map(|b| CertificateDer::from(b.clone()))
            .collect();
        if new != c.bundle {
            *slot = Some(Rc::new(Certified {
                chain: c.chain.clone(),
                key_der: c.key_der.clone(),
                bundle: new,
                spiffe_id: c.spiffe_id.clone(),
                not_before: c.not_before,
                not_after: c.not_after,
                serial: c.serial.clone(),
                received: c.received,
            }));
            return true;
        }
    }
    false
}
