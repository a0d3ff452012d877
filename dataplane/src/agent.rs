//! The agent thread: a tokio current-thread runtime that owns everything off the request path:
//! configuration (static file today, control-plane stream later), signals, snapshot
//! distribution, drain, and the admin server. It reaches cores only through `CoreMsg`.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::config;
use crate::control::{self, Applied, Certified, ControlOptions};
use crate::core::{CoreEvent, CoreMsg};
use crate::mesh::{self, Sidecar};
use crate::snapshot::{Limits, Snapshot};
use crate::tls::TlsMaterial;

/// How long the agent waits for every core to apply the first snapshot.
const FIRST_APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a metrics scrape waits for a core's report.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);

/// Where configuration comes from.
pub enum Source {
    /// A static file, re-read on SIGHUP.
    File(PathBuf),
    /// The control plane's snapshot stream.
    Control {
        control: ControlOptions,
        sidecar: Sidecar,
    },
}

pub struct AgentOptions {
    pub source: Source,
    pub admin: SocketAddr,
    pub drain: Duration,
}

/// A snapshot distributed to the cores whose outcome the control plane is waiting for.
struct PendingAck {
    version: u64,
    waiting: usize,
    error: Option<String>,
}

/// The agent's view of the cores, shared with the admin handlers (same thread).
pub struct AgentState {
    pub current: Arc<Snapshot>,
    /// Snapshot version each core serves.
    pub applied: Vec<u64>,
    cores: Vec<Sender<CoreMsg>>,
    pub draining: bool,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub last_error: Option<String>,
    /// False until every core has applied a first snapshot (control-plane mode starts empty).
    pub configured: bool,
    /// The workload certificate (control-plane mode).
    pub cert: Rc<RefCell<Option<Rc<Certified>>>>,
}

impl AgentState {
    pub fn readiness(&self) -> (bool, String) {
        if self.draining {
            return (false, "draining".into());
        }
        if !self.configured {
            return (
                false,
                "not ready: waiting for the first snapshot from the control plane".into(),
            );
        }
        let behind = self
            .applied
            .iter()
            .filter(|v| **v != self.current.version)
            .count();
        if behind == 0 {
            (
                true,
                format!(
                    "ready: {} cores serve version {}",
                    self.applied.len(),
                    self.current.version
                ),
            )
        } else {
            (
                false,
                format!(
                    "not ready: {behind} of {} cores have not applied version {}",
                    self.applied.len(),
                    self.current.version
                ),
            )
        }
    }

    pub fn config_dump(&self) -> String {
        let cores: Vec<_> = self
            .applied
            .iter()
            .enumerate()
            .map(|(i, v)| serde_json::json!({"core": i, "version": v}))
            .collect();
        let dump = serde_json::json!({
            "version": self.current.version,
            "cores": cores,
            "last_error": self.last_error,
            "snapshot": &*self.current,
        });
        serde_json::to_string_pretty(&dump).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// `/certs`: the workload certificate and trust bundle, as JSON.
    pub fn certs(&self) -> Option<String> {
        let cert = self.cert.borrow();
        cert.as_ref()
            .map(|c| serde_json::to_string_pretty(&c.view()).unwrap_or_default())
    }

    fn broadcast(&self, msg: impl Fn() -> CoreMsg) {
        for tx in &self.cores {
            let _ = tx.send(msg());
        }
    }
}

/// Asks every core for its counters and renders them.
pub async fn gather_metrics(state: &Rc<RefCell<AgentState>>) -> String {
    let mut waits = Vec::new();
    for tx in &state.borrow().cores {
        let (reply, rx) = oneshot::channel();
        if tx.send(CoreMsg::Stats(reply)).is_ok() {
            waits.push(rx);
        }
    }
    let mut reports = Vec::new();
    for rx in waits {
        if let Ok(Ok(r)) = tokio::time::timeout(STATS_TIMEOUT, rx).await {
            reports.push(r);
        }
    }
    let s = state.borrow();
    let extra = format!(
        "# HELP weft_config_reloads_total Configuration reloads, by result.\n# TYPE weft_config_reloads_total counter\n\
         weft_config_reloads_total{{result=\"ok\"}} {}\nweft_config_reloads_total{{result=\"rejected\"}} {}\n\
         # HELP weft_snapshot_version The snapshot version the agent distributes.\n# TYPE weft_snapshot_version gauge\n\
         weft_snapshot_version {}\n",
        s.reloads_ok, s.reloads_failed, s.current.version
    );
    let mut extra = extra;
    if let Some(c) = s.cert.borrow().as_ref() {
        extra.push_str(&format!(
            "# HELP weft_cert_expiry_timestamp_seconds When the workload certificate expires (Unix time).\n\
             # TYPE weft_cert_expiry_timestamp_seconds gauge\nweft_cert_expiry_timestamp_seconds {}\n",
            c.not_after
        ));
    }
    crate::metrics::render(&reports, &extra)
}

/// Runs the agent until a drain completes. Returns an error only for start-up failures
/// (admin bind, first snapshot rejected by a core).
pub fn run(
    opts: AgentOptions,
    first: Option<Snapshot>,
    cores: Vec<Sender<CoreMsg>>,
    events: mpsc::UnboundedReceiver<CoreEvent>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, agent(opts, first, cores, events))
}

/// Sends every core the current certificate and trust bundle, if they changed since last time.
fn sync_tls(
    state: &Rc<RefCell<AgentState>>,
    cert: &Rc<RefCell<Option<Rc<control::Certified>>>>,
    last: &mut Option<Rc<control::Certified>>,
) {
    let Some(c) = cert.borrow().clone() else {
        return;
    };
    if last.as_ref().is_some_and(|l| Rc::ptr_eq(l, &c)) {
        return;
    }
    let trust_domain = c
        .spiffe_id
        .parse::<weft_api::SpiffeId>()
        .map(|id| id.trust_domain)
        .unwrap_or_default();
    let material = Arc::new(TlsMaterial {
        chain: c.chain.clone(),
        key_der: c.key_der.clone(),
        bundle: c.bundle.clone(),
        trust_domain,
        spiffe_id: c.spiffe_id.clone(),
    });
    info!(spiffe_id = %c.spiffe_id, serial = %c.serial, "workload certificate / trust bundle to every core");
    state.borrow().broadcast(|| CoreMsg::Tls(material.clone()));
    *last = Some(c);
}

async fn agent(
    opts: AgentOptions,
    first: Option<Snapshot>,
    cores: Vec<Sender<CoreMsg>>,
    mut events: mpsc::UnboundedReceiver<CoreEvent>,
) -> anyhow::Result<()> {
    let n = cores.len();
    let configured = first.is_some();
    let first = Arc::new(first.unwrap_or_else(|| Snapshot {
        version: 0,
        source: "none yet".into(),
        listeners: Vec::new(),
        clusters: Default::default(),
        limits: Limits::default(),
        workload: None,
        authz: Vec::new(),
        peer_authentications: Vec::new(),
    }));
    let cert = Rc::new(RefCell::new(None));
    let state = Rc::new(RefCell::new(AgentState {
        current: first.clone(),
        applied: vec![0; n],
        cores,
        draining: false,
        reloads_ok: 0,
        reloads_failed: 0,
        last_error: None,
        configured: false,
        cert: cert.clone(),
    }));
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    if configured {
        // static file: every core must bind and apply it before we call ourselves started
        state.borrow().broadcast(|| CoreMsg::Apply(first.clone()));
        let mut pending = n;
        let deadline = tokio::time::sleep(FIRST_APPLY_TIMEOUT);
        tokio::pin!(deadline);
        while pending > 0 {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(CoreEvent::Applied { core, version, error: None }) => {
                        state.borrow_mut().applied[core] = version;
                        pending -= 1;
                    }
                    Some(CoreEvent::Applied { error: Some(e), .. }) => anyhow::bail!("{e}"),
                    Some(CoreEvent::Drained { .. }) | None => anyhow::bail!("a core stopped during start-up"),
                },
                _ = &mut deadline => anyhow::bail!("cores did not apply the first snapshot within {FIRST_APPLY_TIMEOUT:?}"),
            }
        }
        state.borrow_mut().configured = true;
    }
    let admin = tokio::net::TcpListener::bind(opts.admin)
        .await
        .map_err(|e| anyhow::anyhow!("admin: cannot bind {}: {e}", opts.admin))?;
    tokio::task::spawn_local(crate::admin::serve(admin, state.clone()));

    // control-plane mode: snapshots arrive from the control task, ACK/NACKs go back to it
    let (updates_tx, mut updates_rx) = mpsc::unbounded_channel::<weft_api::proto::Snapshot>();
    let (applied_tx, applied_rx) = mpsc::unbounded_channel::<Applied>();
    let (cert_tx, mut cert_rx) = mpsc::unbounded_channel::<()>();
    // the certificate the cores' TLS configs were last built from
    let mut tls_from: Option<Rc<control::Certified>> = None;
    let (config_path, sidecar) = match &opts.source {
        Source::File(p) => (Some(p.clone()), None),
        Source::Control {
            control: c,
            sidecar,
        } => {
            tokio::task::spawn_local(control::run(
                c.clone(),
                updates_tx,
                applied_rx,
                cert.clone(),
                cert_tx,
                n as u32,
            ));
            info!(control = %c.address, "waiting for the control plane");
            (
                None,
                Some((sidecar.clone(), format!("control:{}", c.address))),
            )
        }
    };
    info!(cores = n, version = first.version, admin = %opts.admin, "weft-proxy serving");

    let mut next_version = first.version + 1;
    let mut pending: Option<PendingAck> = None;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let Some(path) = &config_path else {
                    info!("SIGHUP ignored: configuration comes from the control plane");
                    continue;
                };
                match config::load_file(path, next_version) {
                    Ok(snap) => {
                        let snap = Arc::new(snap);
                        info!(version = snap.version, "configuration reloaded; distributing");
                        next_version += 1;
                        let mut s = state.borrow_mut();
                        s.current = snap.clone();
                        s.reloads_ok += 1;
                        s.last_error = None;
                        s.broadcast(|| CoreMsg::Apply(snap.clone()));
                    }
                    Err(e) => {
                        error!("configuration reload rejected, still serving version {}: {e}", state.borrow().current.version);
                        let mut s = state.borrow_mut();
                        s.reloads_failed += 1;
                        s.last_error = Some(e.to_string());
                    }
                }
            }
            Some(()) = cert_rx.recv() => sync_tls(&state, &cert, &mut tls_from),
            Some(update) = updates_rx.recv() => {
                let Some((sidecar, source)) = &sidecar else { continue };
                // a trust bundle that came with this snapshot reaches the cores before it
                sync_tls(&state, &cert, &mut tls_from);
                let version = update.version;
                match mesh::from_control(&update, sidecar, source) {
                    Ok(snap) => {
                        let snap = Arc::new(snap);
                        info!(version, "snapshot from the control plane; distributing");
                        let mut s = state.borrow_mut();
                        s.current = snap.clone();
                        s.broadcast(|| CoreMsg::Apply(snap.clone()));
                        pending = Some(PendingAck { version, waiting: n, error: None });
                    }
                    Err(reason) => {
                        warn!(version, "snapshot rejected: {reason}");
                        state.borrow_mut().last_error = Some(reason.clone());
                        let _ = applied_tx.send(Applied::Nack(version, reason));
                    }
                }
            }
            ev = events.recv() => match ev {
                Some(CoreEvent::Applied { core, version, error }) => {
                    let mut s = state.borrow_mut();
                    match &error {
                        None => s.applied[core] = version,
                        Some(e) => {
                            warn!(core, version, "core rejected snapshot: {e}");
                            s.last_error = Some(e.clone());
                        }
                    }
                    if s.applied.iter().all(|v| *v == s.current.version) && s.current.version > 0 {
                        s.configured = true;
                    }
                    if let Some(p) = pending.as_mut().filter(|p| p.version == version) {
                        p.waiting -= 1;
                        if p.error.is_none() {
                            p.error = error;
                        }
                        if p.waiting == 0 {
                            let msg = match p.error.take() {
                                None => Applied::Ack(version),
                                Some(e) => Applied::Nack(version, e),
                            };
                            let _ = applied_tx.send(msg);
                            pending = None;
                        }
                    }
                }
                Some(CoreEvent::Drained { .. }) => {}
                None => anyhow::bail!("all cores stopped"),
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    // drain: stop accepting everywhere, let in-flight requests finish, bounded by opts.drain
    info!(seconds = opts.drain.as_secs_f64(), "draining");
    state.borrow_mut().draining = true;
    state.borrow().broadcast(|| CoreMsg::Drain);
    let mut left = n;
    let deadline = tokio::time::sleep(opts.drain);
    tokio::pin!(deadline);
    while left > 0 {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(CoreEvent::Drained { .. }) => left -= 1,
                Some(_) => {}
                None => break,
            },
            _ = &mut deadline => {
                warn!(cores_busy = left, "drain period over; closing remaining connections");
                break;
            }
        }
    }
    info!("drained");
    Ok(())
}
