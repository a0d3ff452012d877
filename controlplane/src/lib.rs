//! weft-controlplane: `weft-control`, the control plane of the weft service mesh.
//!
//! Threading model: one tokio multi-thread runtime. The gRPC edge (tonic over rustls) issues
//! X.509-SVIDs (`Certify`) and streams per-proxy snapshots (`Subscribe`); a watcher polls the
//! manifest folder and the CA folder and publishes accepted changes through `watch` channels;
//! a small admin server shows connected proxies and the last error.
//!
//! What it is not: a Kubernetes controller (manifests come from a folder), or on any request
//! path (proxies keep serving without it).

pub mod admin;
pub mod ca;
pub mod manifest;
pub mod server;
pub mod snapshot;
