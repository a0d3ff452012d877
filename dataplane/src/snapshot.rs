//! The validated, immutable configuration a core serves from.
//!
//! A `Snapshot` is built once (from a static file today, from a control-plane push later), shared
//! with every core as an `Arc<Snapshot>`, and compiled by each core into its own tables. Nothing
//! in here is ever mutated after validation.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Serialize, Serializer};

/// One immutable, validated configuration generation.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Monotonic version assigned by the agent that built it (1 for the first load).
    pub version: u64,
    /// Where it came from (the static file path, or the control plane).
    pub source: String,
    pub listeners: Vec<Listener>,
    pub clusters: BTreeMap<String, Cluster>,
    pub limits: Limits,
    /// The workload this sidecar serves (`namespace/name`), in control-plane mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// AuthorizationPolicies that apply to this workload (control-plane mode).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub authz: Vec<weft_api::authz::Policy>,
    /// PeerAuthentications of the workload's namespace and the root namespace.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peer_authentications: Vec<weft_api::peerauthn::PeerAuthentication>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    #[serde(flatten)]
    pub kind: ListenerKind,
    /// A sidecar's inbound listener: the mTLS mode its PeerAuthentications give this port.
    /// Such a listener also enforces the workload's AuthorizationPolicies and tells the app who
    /// called (`x-forwarded-client-cert`). None: a plain listener (edge, or sidecar outbound).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtls: Option<weft_api::peerauthn::Mode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    Http { routes: Vec<Route> },
    Tcp { cluster: String },
}

impl ListenerKind {
    pub fn protocol(&self) -> &'static str {
        match self {
            ListenerKind::Http { .. } => "http",
            ListenerKind::Tcp { .. } => "tcp",
        }
    }
}

/// An HTTP route: the first route (in file order) whose host and path match wins, after the
/// host has been narrowed Envoy-style (exact host, then longest `*.suffix`, then `*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    pub hosts: Vec<HostMatch>,
    pub path: PathMatch,
    pub cluster: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum HostMatch {
    /// `*`: any host.
    Any,
    /// An exact host name, lowercase, without port.
    Exact(String),
    /// `*.example.com`, stored as `.example.com` (lowercase).
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cluster {
    pub name: String,
    pub endpoints: Vec<SocketAddr>,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Upstream connections per core before new requests get 503 (overflow).
    pub max_connections: usize,
    /// Idle pooled connections kept per endpoint per core.
    pub max_idle_per_endpoint: usize,
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// SPIFFE IDs allowed to serve this cluster (secure naming), from the control plane.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
}

/// Safety limits and timeouts, on by default (see tuning/limits.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub max_request_header_bytes: usize,
    pub max_request_headers: usize,
    #[serde(serialize_with = "ser_duration")]
    pub header_read_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub keepalive_idle_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub request_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub tcp_idle_timeout: Duration,
    pub max_connections_per_core: usize,
    pub buffer_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // 60 KiB, as Envoy's max_request_headers_kb default.
            max_request_header_bytes: 60 * 1024,
            max_request_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            keepalive_idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(15),
            tcp_idle_timeout: Duration::from_secs(3600),
            max_connections_per_core: 16_384,
            // 16 KiB: one TLS record; bodies are streamed through a buffer of this size.
            buffer_bytes: 16 * 1024,
        }
    }
}

pub fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

pub use weft_api::units::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip() {
        for (text, ms) in [
            ("250ms", 250),
            ("10s", 10_000),
            ("5m", 300_000),
            ("1h", 3_600_000),
        ] {
            assert_eq!(parse_duration(text), Ok(Duration::from_millis(ms)));
        }
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(3)), "3s");
        for bad in ["", "10", "s", "-1s", "1.5s", "10 parsecs"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
