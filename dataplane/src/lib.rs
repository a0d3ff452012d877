//! weft-dataplane: `weft-proxy`, the thread-per-core data plane of the weft service mesh.
//!
//! Threading model: one glommio `LocalExecutor` per core, pinned, each owning its listeners
//! (SO_REUSEPORT), compiled tables, upstream pool and counters; no lock or shared atomic on the
//! request path. One agent thread (tokio, current-thread) loads configuration, handles signals,
//! serves the admin API and sends each core an `Arc<Snapshot>` by crossbeam channel.
//!
//! Domain logic (`config`, `snapshot`, `route`, `lb`, `http`, `metrics`) has no runtime types;
//! the runtime glue is `core`, `io`, `proxy`, `tcp`, `pool`, `drain`, `agent` and `admin`.
//!
//! In control-plane mode the agent also runs the control client (`control`): join-token
//! bootstrap, SVID renewal and the snapshot stream; `mesh` turns those snapshots into listeners
//! and clusters; `tls` holds each core's rustls configs and the inbound/outbound mTLS handshakes,
//! `authz` the per-core compiled AuthorizationPolicies.

pub mod admin;
pub mod agent;
pub mod authz;
pub mod config;
pub mod control;
pub mod core;
pub mod drain;
pub mod http;
pub mod io;
pub mod lb;
pub mod mesh;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod route;
pub mod snapshot;
pub mod sys;
pub mod tcp;
pub mod tls;
