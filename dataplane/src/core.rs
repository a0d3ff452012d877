//! One core: a pinned glommio executor that owns its listeners, tables, pool and counters.
//!
//! The agent talks to a core only through its crossbeam channel (`CoreMsg`) and hears back
//! through `CoreEvent`s. Everything else here is core-local (`Rc`, `Cell`, `RefCell`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, TryRecvError};
use glommio::net::{TcpListener, TcpStream};
use glommio::Task;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use weft_api::peerauthn::Mode;

use crate::authz::Compiled;
use crate::drain::Drain;
use crate::lb::RoundRobin;
use crate::metrics::{ClusterCounters, CoreMetrics, CoreReport, ListenerCounters};
use crate::pool::Pool;
use crate::route::RouteTable;
use crate::snapshot::{Cluster, Limits, Listener, ListenerKind, Snapshot};
use crate::tls::{self, Accepted, CoreTls, Stream, TlsMaterial};
use crate::{proxy, tcp};

/// How often an idle core looks at its control channel. Bounds config-push latency per core.
const CONTROL_POLL: Duration = Duration::from_millis(2);
/// How often the pool drops connections past their idle timeout.
const POOL_SWEEP: Duration = Duration::from_secs(5);

/// Agent → core.
#[derive(Debug)]
pub enum CoreMsg {
    Apply(Arc<Snapshot>),
    /// A new workload certificate or trust bundle: rebuild this core's rustls configs (their
    /// session caches start empty) and drop pooled mTLS connections.
    Tls(Arc<TlsMaterial>),
    Stats(oneshot::Sender<CoreReport>),
    /// Stop accepting, finish in-flight requests, then stop the executor.
    Drain,
}

/// Core → agent.
#[derive(Debug)]
pub enum CoreEvent {
    /// A snapshot was applied (`error: None`) or rejected with the reason.
    Applied {
        core: usize,
        version: u64,
        error: Option<String>,
    },
    /// Every connection of the core has closed after a drain.
    Drained { core: usize },
}

/// An upstream cluster as one core sees it.
pub struct ClusterState {
    pub spec: Cluster,
    pub lb: RoundRobin,
    /// Requests (or TCP sessions) holding an upstream connection now.
    pub active: Cell<usize>,
    pub counters: Rc<ClusterCounters>,
}

/// The compiled tables of one snapshot, on one core.
pub struct Tables {
    pub version: u64,
    pub limits: Limits,
    pub http: HashMap<String, RouteTable<Rc<ClusterState>>>,
    pub tcp: HashMap<String, Rc<ClusterState>>,
    /// The workload's AuthorizationPolicies, compiled for this core (inbound listeners only).
    pub authz: Compiled,
    /// The same, as they apply to plain TCP connections (`Policy::for_tcp`).
    pub authz_tcp: Compiled,
    /// The mTLS mode of each sidecar inbound listener, read at every accept and request.
    pub modes: HashMap<String, Mode>,
}

impl Tables {
    /// The mode a sidecar inbound listener enforces now (STRICT if it is gone).
    pub fn mode(&self, listener: &str) -> Mode {
        self.modes.get(listener).copied().unwrap_or(Mode::Strict)
    }
}

impl Tables {
    fn compile(s: &Snapshot, metrics: &CoreMetrics) -> Tables {
        let clusters: HashMap<String, Rc<ClusterState>> = s
            .clusters
            .iter()
            .map(|(name, c)| {
                (
                    name.clone(),
                    Rc::new(ClusterState {
                        spec: c.clone(),
                        lb: RoundRobin::default(),
                        active: Cell::new(0),
                        counters: metrics.cluster(name),
                    }),
                )
            })
            .collect();
        let mut http = HashMap::new();
        let mut tcp = HashMap::new();
        for l in &s.listeners {
            match &l.kind {
                ListenerKind::Http { routes } => {
                    // validation guarantees every referenced cluster exists
                    let table = RouteTable::compile(routes, |c| clusters[c].clone());
                    http.insert(l.name.clone(), table);
                }
                ListenerKind::Tcp { cluster } => {
                    tcp.insert(l.name.clone(), clusters[cluster].clone());
                }
            }
        }
        Tables {
            version: s.version,
            limits: s.limits.clone(),
            http,
            tcp,
            authz: Compiled::new(&s.authz),
            modes: s
                .listeners
                .iter()
                .filter_map(|l| Some((l.name.clone(), l.mtls?)))
                .collect(),
            authz_tcp: Compiled::new(
                &s.authz
                    .iter()
                    .map(weft_api::authz::Policy::for_tcp)
                    .collect::<Vec<_>>(),
            ),
        }
    }
}

/// What a connection task needs to know about the listener that accepted it.
pub struct ListenerCtx {
    pub name: String,
    pub counters: Rc<ListenerCounters>,
    /// A sidecar inbound listener: mTLS per `Tables::mode`, authorization, XFCC.
    pub inbound: bool,
    pub port: u16,
}

struct Bound {
    spec: Listener,
    _accept: Task<()>,
}

pub struct Core {
    pub id: usize,
    tables: RefCell<Rc<Tables>>,
    listeners: RefCell<HashMap<String, Bound>>,
    pub pool: Pool,
    pub metrics: CoreMetrics,
    pub drain: Drain,
    /// This core's rustls configs, once the workload has a certificate.
    tls: RefCell<Option<Rc<CoreTls>>>,
    /// Downstream connections open on this core.
    pub active: Cell<usize>,
    rng: Cell<u64>,
}

impl Core {
    fn new(id: usize) -> Core {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ ((id as u64 + 1) << 48);
        Core {
            id,
            tables: RefCell::new(Rc::new(Tables {
                version: 0,
                limits: Limits::default(),
                http: HashMap::new(),
                tcp: HashMap::new(),
                authz: Compiled::new(&[]),
                authz_tcp: Compiled::new(&[]),
                modes: HashMap::new(),
            })),
            listeners: RefCell::new(HashMap::new()),
            pool: Pool::default(),
            metrics: CoreMetrics::default(),
            drain: Drain::default(),
            tls: RefCell::new(None),
            active: Cell::new(0),
            rng: Cell::new(seed | 1),
        }
    }

    /// The tables new requests use; a request keeps the `Rc` it took until it completes.
    pub fn tables(&self) -> Rc<Tables> {
        self.tables.borrow().clone()
    }

    pub fn tls(&self) -> Option<Rc<CoreTls>> {
        self.tls.borrow().clone()
    }

    /// xorshift64*: per-core, for request IDs and jitter (not for secrets).
    pub fn random(&self) -> u64 {
        let mut x = self.rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Applies a snapshot: binds new listeners first (all or nothing), then swaps the tables
    /// and stops listeners that are gone. Open connections keep serving throughout.
    fn apply(self: &Rc<Self>, snap: &Snapshot) -> Result<(), String> {
        let mut fresh: Vec<(Listener, TcpListener)> = Vec::new();
        {
            let bound = self.listeners.borrow();
            for l in &snap.listeners {
                if bound.get(&l.name).is_some_and(|b| same_socket(&b.spec, l)) {
                    continue;
                }
                // the same address may be held by a listener being renamed/changed: free it first
                let taken = bound.values().any(|b| b.spec.address == l.address);
                if taken {
                    continue;
                }
                match TcpListener::bind(l.address) {
                    Ok(sock) => fresh.push((l.clone(), sock)),
                    Err(e) => {
                        return Err(format!(
                            "listener `{}`: cannot bind {}: {e}",
                            l.name, l.address
                        ))
                    }
                }
            }
        }
        *self.tables.borrow_mut() = Rc::new(Tables::compile(snap, &self.metrics));
        let keep: HashMap<&str, &Listener> = snap
            .listeners
            .iter()
            .map(|l| (l.name.as_str(), l))
            .collect();
        let mut rebind = Vec::new();
        self.listeners
            .borrow_mut()
            .retain(|name, b| match keep.get(name.as_str()) {
                Some(l) if same_socket(&b.spec, l) => {
                    b.spec = (*l).clone();
                    true
                }
                Some(l) => {
                    rebind.push((*l).clone());
                    false
                }
                None => false,
            });
        for (spec, sock) in fresh {
            self.start_listener(spec, sock);
        }
        // listeners whose address was held by an old listener are bound now that it is gone
        for l in rebind.into_iter().chain(snap.listeners.iter().cloned()) {
            if self.listeners.borrow().contains_key(&l.name) {
                continue;
            }
            match TcpListener::bind(l.address) {
                Ok(sock) => self.start_listener(l, sock),
                Err(e) => {
                    return Err(format!(
                        "listener `{}`: cannot bind {}: {e}",
                        l.name, l.address
                    ))
                }
            }
        }
        Ok(())
    }

    fn start_listener(self: &Rc<Self>, spec: Listener, sock: TcpListener) {
        let ctx = Rc::new(ListenerCtx {
            name: spec.name.clone(),
            counters: self.metrics.listener(&spec.name),
            inbound: spec.mtls.is_some(),
            port: spec.address.port(),
        });
        let core = self.clone();
        let is_http = matches!(spec.kind, ListenerKind::Http { .. });
        debug!(core = self.id, listener = %spec.name, address = %spec.address, "listening");
        let accept = glommio::spawn_local(async move {
            loop {
                let stream = match sock.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning
                        warn!(core = core.id, listener = %ctx.name, "accept failed: {e}");
                        glommio::timer::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let limit = core.tables().limits.max_connections_per_core;
                if core.active.get() >= limit {
                    ctx.counters.reject();
                    drop(stream);
                    continue;
                }
                core.active.set(core.active.get() + 1);
                ctx.counters.opened();
                let (core2, ctx2) = (core.clone(), ctx.clone());
                glommio::spawn_local(async move {
                    if let Some(conn) = core2.handshake(&ctx2, stream).await {
                        if is_http {
                            proxy::serve(&core2, &ctx2, conn).await;
                        } else {
                            tcp::serve(&core2, &ctx2, conn).await;
                        }
                    }
                    ctx2.counters.closed();
                    core2.active.set(core2.active.get() - 1);
                })
                .detach();
            }
        });
        self.listeners.borrow_mut().insert(
            spec.name.clone(),
            Bound {
                spec,
                _accept: accept,
            },
        );
    }

    /// The inbound handshake of a sidecar listener (plaintext elsewhere); failures are counted
    /// by reason and close the connection.
    async fn handshake(&self, ctx: &ListenerCtx, stream: TcpStream) -> Option<Accepted> {
        let _ = stream.set_nodelay(true);
        if !ctx.inbound {
            return Some(Accepted {
                stream: Stream::Plain(stream),
                peer: None,
                resumed: None,
            });
        }
        let mode = self.tables().mode(&ctx.name);
        let tls = self.tls();
        let timeout = self.tables().limits.header_read_timeout;
        let peer = stream.peer_addr().ok();
        match tls::accept(stream, tls.as_deref(), mode, timeout).await {
            Ok(a) => {
                if let Some(resumed) = a.resumed {
                    self.metrics.handshake("inbound", resumed);
                }
                Some(a)
            }
            Err(e) => {
                self.metrics.handshake_failed("inbound", e.reason);
                debug!(core = self.id, listener = %ctx.name, ?peer, "inbound handshake refused: {e}");
                None
            }
        }
    }

    fn sweep_pool(&self) {
        let tables = self.tables();
        let mut max_idle: HashMap<SocketAddr, Duration> = HashMap::new();
        let all = tables
            .http
            .values()
            .flat_map(|t| t.targets())
            .chain(tables.tcp.values());
        for c in all {
            for e in &c.spec.endpoints {
                max_idle.insert(*e, c.spec.idle_timeout);
            }
        }
        self.pool.sweep(|a| max_idle.get(a).copied());
    }
}

fn same_socket(a: &Listener, b: &Listener) -> bool {
    a.address == b.address
        && a.kind.protocol() == b.kind.protocol()
        && a.mtls.is_some() == b.mtls.is_some()
}

/// The body of one core's executor: serve until drained.
pub async fn run(id: usize, rx: Receiver<CoreMsg>, events: mpsc::UnboundedSender<CoreEvent>) {
    let core = Rc::new(Core::new(id));
    let mut since_sweep = std::time::Instant::now();
    loop {
        match rx.try_recv() {
            Ok(CoreMsg::Apply(snap)) => {
                let result = core.apply(&snap);
                if let Err(e) = &result {
                    warn!(core = id, version = snap.version, "snapshot rejected: {e}");
                } else {
                    debug!(core = id, version = snap.version, "snapshot applied");
                }
                let _ = events.send(CoreEvent::Applied {
                    core: id,
                    version: snap.version,
                    error: result.err(),
                });
            }
            Ok(CoreMsg::Tls(m)) => match CoreTls::build(&m, core.random()) {
                Ok(t) => {
                    debug!(core = id, spiffe_id = %m.spiffe_id, "tls configs rebuilt");
                    *core.tls.borrow_mut() = Some(Rc::new(t));
                    core.pool.clear();
                }
                Err(e) => warn!(
                    core = id,
                    "tls material rejected, keeping the previous: {e}"
                ),
            },
            Ok(CoreMsg::Stats(reply)) => {
                let _ = reply.send(core.metrics.report(id, core.tables().version));
            }
            Ok(CoreMsg::Drain) => {
                info!(core = id, active = core.active.get(), "draining");
                core.listeners.borrow_mut().clear();
                core.pool.clear();
                core.drain.fire();
            }
            Err(TryRecvError::Empty) => {
                if core.drain.is_fired() && core.active.get() == 0 {
                    let _ = events.send(CoreEvent::Drained { core: id });
                    return;
                }
                if since_sweep.elapsed() >= POOL_SWEEP {
                    core.sweep_pool();
                    since_sweep = std::time::Instant::now();
                }
                glommio::timer::sleep(CONTROL_POLL).await;
            }
            Err(TryRecvError::Disconnected) => return,
        }
    }
}
