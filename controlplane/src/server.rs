//! The gRPC edge: `Certify` and `Subscribe` over TLS with the control plane's own SVID, the
//! folder and CA watchers, and the per-proxy push loops.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateSigningRequestParams, KeyPair, SanType};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, error, info, warn};
use weft_api::proto::mesh_server::{Mesh, MeshServer};
use weft_api::proto::{self, subscribe_request::Kind};
use weft_api::{JoinToken, SpiffeId, WorkloadRef};

use crate::ca::{self, Ca};
use crate::manifest::{self, MeshState};
use crate::snapshot;
use weft_api::units::rfc3339;

/// The control plane's own identity, and the DNS name proxies verify it by.
pub const CONTROL_NS: &str = "weft-system";
pub const CONTROL_SA: &str = "weft-control";
pub const CONTROL_DNS: &str = "weft-control";
/// Folders are re-checked on every inotify event and at least this often (in case events are
/// lost, e.g. on network filesystems).
const WATCH_PERIOD: Duration = Duration::from_secs(1);
/// Lifetime of the control plane's serving certificate (re-issued on every start and rotation).
const SERVING_TTL: Duration = Duration::from_secs(30 * 86400);

/// What one connected proxy reports; shown on the admin `/proxies`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProxyStatus {
    pub workload: String,
    pub identity: String,
    pub acked_version: u64,
    pub sent_version: u64,
    pub last_nack: Option<String>,
    pub last_nack_version: Option<u64>,
    pub cert_expiry: String,
    pub cores: u32,
}

pub struct Shared {
    pub data_dir: PathBuf,
    pub config_dir: PathBuf,
    pub state: watch::Receiver<Arc<MeshState>>,
    pub ca: watch::Receiver<Arc<Ca>>,
    /// Bumped on every accepted manifest or CA change; snapshot versions come from it.
    pub generation: AtomicU64,
    pub token_key: Vec<u8>,
    // control plane (tokio) side: off any data path
    pub proxies: Mutex<BTreeMap<u64, ProxyStatus>>,
    pub next_id: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// The service table of the current state, shared by every push loop.
    /// Keyed by the state itself (kept alive here, compared by pointer).
    pub table: Mutex<Option<(Arc<MeshState>, Arc<snapshot::ServiceTable>)>>,
}

impl Shared {
    /// The service table for `state`, computed once per accepted state.
    pub fn service_table(&self, state: &Arc<MeshState>) -> Arc<snapshot::ServiceTable> {
        let mut slot = lock(&self.table);
        match &*slot {
            Some((k, t)) if Arc::ptr_eq(k, state) => t.clone(),
            previous => {
                let t = Arc::new(snapshot::ServiceTable::new(
                    state,
                    previous.as_ref().map(|(_, t)| &**t),
                ));
                *slot = Some((state.clone(), t.clone()));
                t
            }
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub use weft_api::identity::spiffe_of;

fn peer_identity<T>(req: &Request<T>) -> Result<Option<(SpiffeId, i64)>, Status> {
    match req.peer_certs() {
        Some(certs) if !certs.is_empty() => spiffe_of(&certs[0])
            .map(Some)
            .map_err(Status::unauthenticated),
        _ => Ok(None),
    }
}

pub struct MeshService {
    pub shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Mesh for MeshService {
    async fn certify(
        &self,
        req: Request<proto::CertifyRequest>,
    ) -> Result<Response<proto::CertifyResponse>, Status> {
        let peer = peer_identity(&req)?;
        let r = req.into_inner();
        let state = self.shared.state.borrow().clone();
        let (id, workload, token_id) = if !r.join_token.is_empty() {
            let t = JoinToken::verify(&r.join_token, &self.shared.token_key, now_secs())
                .map_err(|e| Status::unauthenticated(e.to_string()))?;
            let w = state.workloads.get(&t.workload).ok_or_else(|| {
                Status::permission_denied(format!("no WorkloadEntry {} in the mesh", t.workload))
            })?;
            let id = state
                .spiffe_id(w)
                .ok_or_else(|| Status::internal("invalid identity"))?;
            (id, t.workload.to_string(), Some(t.id))
        } else {
            let (id, _) = peer.ok_or_else(|| {
                Status::unauthenticated("a join token or a client SVID (mTLS) is required")
            })?;
            if id.trust_domain != state.trust_domain {
                return Err(Status::permission_denied(format!(
                    "{id} is not in trust domain {}",
                    state.trust_domain
                )));
            }
            // a renewal keeps an identity alive only while some WorkloadEntry still uses it
            let in_use = state.workloads.values().any(|w| {
                w.workload.namespace == id.namespace && w.service_account == id.service_account
            });
            if !in_use {
                return Err(Status::permission_denied(format!(
                    "no WorkloadEntry runs as {id} any more"
                )));
            }
            (id, String::new(), None)
        };
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(
            r.csr_der,
        ))
        .map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        let want = id.to_string();
        for san in &csr.params.subject_alt_names {
            let asked = match san {
                SanType::URI(u) if u.as_str() == want => continue,
                SanType::URI(u) => u.as_str().to_string(),
                other => format!("{other:?}"),
            };
            warn!(%id, asked, "refused a CSR asking for another identity");
            return Err(Status::permission_denied(format!(
                "the CSR asks for {asked}, but the credential proves {id}"
            )));
        }
        // the token is spent only by a request that would otherwise succeed
        if let Some(tid) = token_id {
            match ca::consume_token(&self.shared.data_dir, &tid) {
                Ok(true) => {}
                Ok(false) => return Err(Status::permission_denied("join token already used")),
                Err(e) => return Err(Status::internal(e.to_string())),
            }
        }
        let ca = self.shared.ca.borrow().clone();
        let leaf = ca
            .issue(&id, &csr.public_key, state.cert_ttl, &[])
            .map_err(|e| Status::internal(e.to_string()))?;
        info!(%id, workload, renewal = workload.is_empty(), "issued SVID");
        Ok(Response::new(proto::CertifyResponse {
            chain_der: vec![leaf.to_vec(), ca.active_root().der.to_vec()],
            trust_bundle_der: ca.bundle().into_iter().map(|c| c.to_vec()).collect(),
            spiffe_id: want,
            workload,
        }))
    }

    type SubscribeStream = ReceiverStream<Result<proto::Snapshot, Status>>;

    async fn subscribe(
        &self,
        req: Request<Streaming<proto::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let (id, not_after) = peer_identity(&req)?
            .ok_or_else(|| Status::unauthenticated("Subscribe needs a client SVID (mTLS)"))?;
        let mut inbound = req.into_inner();
        let hello = match inbound.message().await? {
            Some(proto::SubscribeRequest {
                kind: Some(Kind::Hello(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        let workload: WorkloadRef = hello
            .workload
            .parse()
            .map_err(|e| Status::invalid_argument(format!("workload: {e}")))?;
        {
            let state = self.shared.state.borrow();
            let w = state
                .workloads
                .get(&workload)
                .ok_or_else(|| Status::not_found(format!("no WorkloadEntry {workload}")))?;
            if state.spiffe_id(w).as_ref() != Some(&id) {
                return Err(Status::permission_denied(format!(
                    "{id} may not act as workload {workload}"
                )));
            }
        }
        let conn = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.shared.proxies).insert(
            conn,
            ProxyStatus {
                workload: workload.to_string(),
                identity: id.to_string(),
                acked_version: 0,
                sent_version: 0,
                last_nack: None,
                last_nack_version: None,
                cert_expiry: rfc3339(not_after),
                cores: hello.cores,
            },
        );
        info!(%workload, %id, "proxy subscribed");
        let (tx, rx) = mpsc::channel(4);
        let shared = self.shared.clone();
        let push = tokio::spawn(push_loop(shared.clone(), conn, workload.clone(), tx));
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(proto::SubscribeRequest {
                        kind: Some(Kind::Ack(a)),
                    })) => {
                        if let Some(p) = lock(&shared.proxies).get_mut(&conn) {
                            p.acked_version = p.acked_version.max(a.version);
                            debug!(workload = %p.workload, version = a.version, "ACK");
                        }
                    }
                    Ok(Some(proto::SubscribeRequest {
                        kind: Some(Kind::Nack(n)),
                    })) => {
                        warn!(%workload, version = n.version, "proxy rejected snapshot: {}", n.reason);
                        if let Some(p) = lock(&shared.proxies).get_mut(&conn) {
                            p.last_nack = Some(n.reason);
                            p.last_nack_version = Some(n.version);
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            push.abort();
            lock(&shared.proxies).remove(&conn);
            info!(%workload, "proxy disconnected");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Sends `workload` a new snapshot whenever what it needs changes.
async fn push_loop(
    shared: Arc<Shared>,
    conn: u64,
    workload: WorkloadRef,
    tx: mpsc::Sender<Result<proto::Snapshot, Status>>,
) {
    let mut state_rx = shared.state.clone();
    let mut ca_rx = shared.ca.clone();
    // what was last sent, as a SHA-256 of the encoded snapshot (version 0): cheaper to keep and
    // compare than the snapshot itself
    let mut last: Option<Vec<u8>> = None;
    loop {
        let state = state_rx.borrow_and_update().clone();
        let ca = ca_rx.borrow_and_update().clone();
        let table = shared.service_table(&state);
        match snapshot::for_workload(&state, &table, &ca.bundle(), &workload) {
            Some((mut snap, digest)) => {
                if last.as_ref() != Some(&digest) {
                    last = Some(digest);
                    snap.version = shared.generation.load(Ordering::SeqCst);
                    let version = snap.version;
                    if tx.send(Ok(snap)).await.is_err() {
                        return;
                    }
                    if let Some(p) = lock(&shared.proxies).get_mut(&conn) {
                        p.sent_version = version;
                    }
                    debug!(%workload, version, "snapshot pushed");
                }
            }
            None => {
                let _ = tx
                    .send(Err(Status::not_found(format!(
                        "WorkloadEntry {workload} was removed"
                    ))))
                    .await;
                return;
            }
        }
        tokio::select! {
            r = state_rx.changed() => if r.is_err() { return },
            r = ca_rx.changed() => if r.is_err() { return },
            _ = tx.closed() => return,
        }
    }
}

/// The serving TLS config: the control plane's SVID (with DNS `weft-control`), client
/// certificates optional (join-token calls have none) and verified against the bundle.
pub fn tls_config(ca: &Ca, trust_domain: &str) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = weft_api::crypto_provider();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let id = SpiffeId::new(trust_domain, CONTROL_NS, CONTROL_SA)?;
    let leaf = ca.issue(&id, &key, SERVING_TTL, &[CONTROL_DNS])?;
    let mut roots = RootCertStore::empty();
    for r in ca.bundle() {
        roots.add(r)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let chain: Vec<CertificateDer<'static>> = vec![leaf, ca.active_root().der.clone()];
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A cheap signature of a folder's `*.yaml` files (names, sizes, mtimes), to notice changes.
fn dir_signature(dir: &std::path::Path, suffixes: &[&str]) -> Vec<(String, u64, u128)> {
    let mut sig: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| {
            suffixes
                .iter()
                .any(|s| e.file_name().to_string_lossy().ends_with(s))
        })
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            let mtime = m
                .modified()
                .ok()?
                .duration_since(UNIX_EPOCH)
                .ok()?
                .as_nanos();
            Some((e.file_name().to_string_lossy().into_owned(), m.len(), mtime))
        })
        .collect();
    sig.sort();
    sig
}

/// Persists what `weft-control mint` needs to know about the mesh without `--config`.
pub fn save_state(data_dir: &std::path::Path, state: &MeshState) {
    let accounts: BTreeMap<String, String> = state
        .workloads
        .values()
        .map(|w| (w.workload.to_string(), w.service_account.clone()))
        .collect();
    let v = serde_json::json!({"trust_domain": state.trust_domain, "cert_ttl_seconds": state.cert_ttl.as_secs(), "workloads": accounts});
    if let Err(e) = ca::write_file(&data_dir.join("mesh.json"), v.to_string().as_bytes(), 0o644) {
        warn!("cannot save mesh state: {e}");
    }
}

type Events = inotify::EventStream<[u8; 4096]>;

/// An inotify stream over `dirs`, or None (then the watcher polls every `WATCH_PERIOD`).
fn folder_events(dirs: &[&std::path::Path]) -> Option<Events> {
    use inotify::{Inotify, WatchMask};
    let ino = Inotify::init()
        .map_err(|e| warn!("inotify unavailable, polling folders: {e}"))
        .ok()?;
    let mask = WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MODIFY;
    for d in dirs {
        if let Err(e) = ino.watches().add(d, mask) {
            warn!("cannot watch {}: {e}; polling it", d.display());
        }
    }
    ino.into_event_stream([0u8; 4096])
        .map_err(|e| warn!("inotify stream: {e}"))
        .ok()
}

/// Watches the manifest folder and the CA folder; publishes accepted changes.
pub async fn watch_loop(
    shared: Arc<Shared>,
    state_tx: watch::Sender<Arc<MeshState>>,
    ca_tx: watch::Sender<Arc<Ca>>,
    tls_tx: watch::Sender<Arc<ServerConfig>>,
) {
    let mut config_sig = dir_signature(&shared.config_dir, &[".yaml", ".yml"]);
    let mut ca_sig = dir_signature(&shared.data_dir.join("ca"), &[".pem", "active"]);
    let mut tick = tokio::time::interval(WATCH_PERIOD);
    let mut cache = manifest::DirCache::default();
    let _ = manifest::load_dir_cached(&shared.config_dir, &mut cache);
    let mut events = folder_events(&[&shared.config_dir, &shared.data_dir.join("ca")]);
    loop {
        match events.as_mut() {
            Some(ev) => {
                tokio::select! {
                    e = tokio_stream::StreamExt::next(ev) => if e.is_none() { events = None },
                    _ = tick.tick() => {}
                }
            }
            None => {
                tick.tick().await;
            }
        }
        let sig = dir_signature(&shared.config_dir, &[".yaml", ".yml"]);
        if sig != config_sig {
            config_sig = sig;
            let started = std::time::Instant::now();
            let loaded = manifest::load_dir_cached(&shared.config_dir, &mut cache);
            debug!(
                elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
                "manifests loaded"
            );
            match loaded {
                Ok(state) => {
                    *lock(&shared.last_error) = None;
                    // every accepted change is published; a proxy whose snapshot did not change is
                    // not pushed to (the push loops compare digests), so no deep compare here
                    {
                        let g = shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
                        info!(
                            generation = g,
                            services = state.services.len(),
                            workloads = state.workloads.len(),
                            "manifests accepted"
                        );
                        let state = Arc::new(state);
                        state_tx.send_replace(state.clone());
                        // off the push path: mesh.json only serves `weft-control mint`
                        let dir = shared.data_dir.clone();
                        tokio::task::spawn_blocking(move || save_state(&dir, &state));
                    }
                }
                Err(errors) => {
                    let text = manifest::report(&errors);
                    error!("manifests rejected, still serving the last good set:\n{text}");
                    *lock(&shared.last_error) = Some(text);
                }
            }
        }
        let sig = dir_signature(&shared.data_dir.join("ca"), &[".pem", "active"]);
        if sig != ca_sig {
            ca_sig = sig;
            match Ca::open_or_init(&shared.data_dir) {
                Ok(ca) => {
                    let td = state_tx.borrow().trust_domain.clone();
                    match tls_config(&ca, &td) {
                        Ok(cfg) => {
                            let g = shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
                            info!(generation = g, active = %ca.active, roots = ca.roots.len(), "CA roots changed");
                            tls_tx.send_replace(cfg);
                            ca_tx.send_replace(Arc::new(ca));
                        }
                        Err(e) => {
                            error!("CA changed but the serving certificate cannot be issued: {e}")
                        }
                    }
                }
                Err(e) => error!("CA folder changed but cannot be loaded: {e}"),
            }
        }
    }
}

/// Accepts TLS connections and serves the Mesh service on them.
pub async fn serve_grpc(
    listen: SocketAddr,
    shared: Arc<Shared>,
    tls: watch::Receiver<Arc<ServerConfig>>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind {listen}: {e}"))?;
    let (conn_tx, conn_rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            // snapshots and ACKs are small writes: Nagle would hold them for the peer's delayed ACK
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.borrow().clone());
            let conn_tx = conn_tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = conn_tx.send(Ok::<_, std::io::Error>(s)).await;
                    }
                    Ok(Err(e)) => debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tonic::transport::Server::builder()
        .serve_with_incoming(
            MeshServer::new(MeshService { shared }),
            ReceiverStream::new(conn_rx),
        )
        .await?;
    Ok(())
}
