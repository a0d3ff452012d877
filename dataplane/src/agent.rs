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
use crate::core::{CoreEvent, CoreMsg};
use crate::snapshot::Snapshot;

/// How long the agent waits for every core to apply the first snapshot.
const FIRST_APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a metrics scrape waits for a core's report.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);

pub struct AgentOptions {
    pub config: PathBuf,
    pub admin: SocketAddr,
    pub drain: Duration,
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
}

impl AgentState {
    pub fn readiness(&self) -> (bool, String) {
        if self.draining {
            return (false, "draining".into());
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
    crate::metrics::render(&reports, &extra)
}

/// Runs the agent until a drain completes. Returns an error only for start-up failures
/// (admin bind, first snapshot rejected by a core).
pub fn run(
    opts: AgentOptions,
    first: Snapshot,
    cores: Vec<Sender<CoreMsg>>,
    events: mpsc::UnboundedReceiver<CoreEvent>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, agent(opts, first, cores, events))
}

async fn agent(
    opts: AgentOptions,
    first: Snapshot,
    cores: Vec<Sender<CoreMsg>>,
    mut events: mpsc::UnboundedReceiver<CoreEvent>,
) -> anyhow::Result<()> {
    let n = cores.len();
    let first = Arc::new(first);
    let state = Rc::new(RefCell::new(AgentState {
        current: first.clone(),
        applied: vec![0; n],
        cores,
        draining: false,
        reloads_ok: 0,
        reloads_failed: 0,
        last_error: None,
    }));
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    // first snapshot: every core must bind and apply it before we call ourselves started
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
    let admin = tokio::net::TcpListener::bind(opts.admin)
        .await
        .map_err(|e| anyhow::anyhow!("admin: cannot bind {}: {e}", opts.admin))?;
    tokio::task::spawn_local(crate::admin::serve(admin, state.clone()));
    info!(cores = n, version = first.version, admin = %opts.admin, "weft-proxy serving");

    let mut next_version = first.version + 1;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                match config::load_file(&opts.config, next_version) {
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
            ev = events.recv() => match ev {
                Some(CoreEvent::Applied { core, version, error: None }) => state.borrow_mut().applied[core] = version,
                Some(CoreEvent::Applied { core, version, error: Some(e) }) => {
                    warn!(core, version, "core rejected snapshot: {e}");
                    state.borrow_mut().last_error = Some(e);
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
