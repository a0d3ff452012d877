//! Control-plane snapshots → the proxy's `Snapshot`: the sidecar's listeners and clusters.
//!
//! A sidecar has two listeners: `inbound` (the workload's address in the mesh, forwarding to the
//! app) and `outbound` (the app calls it and names the service in `Host`). Each service port
//! becomes a cluster `outbound|PORT|HOST` whose endpoints are the sidecars of the workloads that
//! back it, with the identities allowed to serve it. Plain Rust: unit-tested directly.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use weft_api::proto;

use crate::config::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_IDLE, DEFAULT_UPSTREAM_IDLE,
};
use crate::snapshot::{
    parse_duration, Cluster, HostMatch, Limits, Listener, ListenerKind, PathMatch, Route, Snapshot,
};

/// Where this sidecar listens and where its app is.
#[derive(Debug, Clone)]
pub struct Sidecar {
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub app: SocketAddr,
}

/// Protocols the data plane proxies today. Others are valid Istio, so the control plane accepts
/// them, and the proxy NACKs the snapshot naming the service and port.
const SUPPORTED: &[&str] = &["HTTP", "TCP"];

fn cluster(name: String, endpoints: Vec<SocketAddr>, identities: Vec<String>) -> Cluster {
    let d = |s: &str| parse_duration(s).unwrap_or_default();
    Cluster {
        name,
        endpoints,
        connect_timeout: d(DEFAULT_CONNECT_TIMEOUT),
        max_connections: DEFAULT_MAX_CONNECTIONS,
        max_idle_per_endpoint: DEFAULT_MAX_IDLE,
        idle_timeout: d(DEFAULT_UPSTREAM_IDLE),
        identities,
    }
}

/// Builds the sidecar's snapshot, or the reason it cannot serve this one (sent as NACK).
pub fn from_control(
    snap: &proto::Snapshot,
    sidecar: &Sidecar,
    source: &str,
) -> Result<Snapshot, String> {
    let workload = snap
        .workload
        .as_ref()
        .ok_or("snapshot without a workload")?;
    let mut clusters = BTreeMap::new();
    clusters.insert(
        "inbound|app".to_string(),
        cluster("inbound|app".into(), vec![sidecar.app], Vec::new()),
    );
    let mut routes = Vec::new();
    let mut routed = std::collections::HashSet::new();
    let list = <proto::ServiceList as prost::Message>::decode(snap.service_list.clone())
        .map_err(|e| format!("undecodable service list: {e}"))?;
    for s in &list.services {
        for p in &s.ports {
            if !SUPPORTED.contains(&p.protocol.as_str()) {
                return Err(format!(
                    "service {} port {} ({}): protocol {} is not supported by this proxy (supported: {})",
                    s.host,
                    p.number,
                    p.name,
                    p.protocol,
                    SUPPORTED.join(", ")
                ));
            }
            let name = format!("outbound|{}|{}", p.number, s.host);
            let mut endpoints = Vec::new();
            let mut identities = Vec::new();
            for e in s.endpoints.iter().filter(|e| e.port_name == p.name) {
                let addr: SocketAddr = e.address.parse().map_err(|_| {
                    format!(
                        "service {}: endpoint `{}` is not IP:PORT",
                        s.host, e.address
                    )
                })?;
                endpoints.push(addr);
                if !identities.contains(&e.spiffe_id) {
                    identities.push(e.spiffe_id.clone());
                }
            }
            // the first HTTP port of a host takes its Host-based route
            if p.protocol == "HTTP" && routed.insert(s.host.to_ascii_lowercase()) {
                routes.push(Route {
                    hosts: vec![HostMatch::Exact(s.host.to_ascii_lowercase())],
                    path: PathMatch::Prefix("/".into()),
                    cluster: name.clone(),
                });
            }
            clusters.insert(name.clone(), cluster(name, endpoints, identities));
        }
    }
    let mut authz = Vec::new();
    let mut peer_authentications = Vec::new();
    for p in &snap.security {
        let what = format!("{} {}/{}", p.kind, p.namespace, p.name);
        let bad = |e: String| format!("{what}: {e}");
        match p.kind.as_str() {
            "AuthorizationPolicy" => {
                let raw = serde_json::from_str(&p.spec_json).map_err(|e| bad(e.to_string()))?;
                authz.push(
                    weft_api::authz::Policy::from_raw(&p.namespace, &p.name, &raw)
                        .map_err(|e| bad(e.to_string()))?,
                );
            }
            "PeerAuthentication" => {
                let raw = serde_json::from_str(&p.spec_json).map_err(|e| bad(e.to_string()))?;
                peer_authentications.push(
                    weft_api::peerauthn::PeerAuthentication::from_raw(&p.namespace, &p.name, &raw)
                        .map_err(|e| bad(e.to_string()))?,
                );
            }
            other => {
                return Err(format!(
                    "{what}: kind `{other}` is not supported by this proxy"
                ))
            }
        }
    }
    // the inbound port speaks what the workload's own service ports declare: TCP when every
    // one of them is TCP, HTTP otherwise
    let me = format!("{}/{}", workload.namespace, workload.name);
    let own: Vec<&str> = list
        .services
        .iter()
        .flat_map(|s| {
            s.endpoints
                .iter()
                .filter(|e| e.workload == me)
                .filter_map(move |e| s.ports.iter().find(|p| p.name == e.port_name))
        })
        .map(|p| p.protocol.as_str())
        .collect();
    let inbound_kind = if !own.is_empty() && own.iter().all(|p| *p == "TCP") {
        ListenerKind::Tcp {
            cluster: "inbound|app".into(),
        }
    } else {
        ListenerKind::Http {
            routes: vec![Route {
                hosts: vec![HostMatch::Any],
                path: PathMatch::Prefix("/".into()),
                cluster: "inbound|app".into(),
            }],
        }
    };
    let labels: std::collections::BTreeMap<String, String> = workload
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mode = weft_api::peerauthn::effective_mode(
        &peer_authentications,
        &workload.namespace,
        &labels,
        sidecar.inbound.port(),
    );
    Ok(Snapshot {
        version: snap.version,
        source: source.to_string(),
        listeners: vec![
            Listener {
                name: "inbound".into(),
                address: sidecar.inbound,
                kind: inbound_kind,
                mtls: Some(mode),
            },
            Listener {
                name: "outbound".into(),
                address: sidecar.outbound,
                kind: ListenerKind::Http { routes },
                mtls: None,
            },
        ],
        clusters,
        limits: Limits::default(),
        workload: Some(format!("{}/{}", workload.namespace, workload.name)),
        authz,
        peer_authentications,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(protocol: &str) -> proto::Snapshot {
        proto::Snapshot {
            version: 7,
            workload: Some(proto::Workload {
                namespace: "prod".into(),
                name: "order-1".into(),
                ..Default::default()
            }),
            service_list: prost::Message::encode_to_vec(&proto::ServiceList {
                services: vec![proto::Service {
                    host: "checkout.prod.svc.cluster.local".into(),
                    namespace: "prod".into(),
                    name: "checkout".into(),
                    ports: vec![proto::Port {
                        number: 80,
                        name: "http".into(),
                        protocol: protocol.into(),
                    }],
                    endpoints: vec![proto::Endpoint {
                        address: "127.0.0.1:16101".into(),
                        port_name: "http".into(),
                        spiffe_id: "spiffe://cluster.local/ns/prod/sa/checkout".into(),
                        workload: "prod/checkout-1".into(),
                    }],
                }],
            })
            .into(),
            trust_bundle_der: vec![],
            trust_domain: "cluster.local".into(),
            security: vec![],
        }
    }

    fn sidecar() -> Sidecar {
        let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        Sidecar {
            inbound: a(16201),
            outbound: a(15201),
            app: a(18201),
        }
    }

    #[test]
    fn builds_inbound_and_outbound() {
        let s =
            from_control(&snap("HTTP"), &sidecar(), "control").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.version, 7);
        assert_eq!(s.workload.as_deref(), Some("prod/order-1"));
        let c = &s.clusters["outbound|80|checkout.prod.svc.cluster.local"];
        assert_eq!(c.endpoints, vec![SocketAddr::from(([127, 0, 0, 1], 16101))]);
        assert_eq!(
            c.identities,
            vec!["spiffe://cluster.local/ns/prod/sa/checkout".to_string()]
        );
        assert_eq!(s.clusters["inbound|app"].endpoints, vec![sidecar().app]);
    }

    #[test]
    fn security_policies_are_validated_again() {
        let mut snap = snap("HTTP");
        snap.security = vec![proto::SecurityPolicy {
            kind: "AuthorizationPolicy".into(),
            namespace: "prod".into(),
            name: "checkout-allow".into(),
            spec_json: r#"{"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/prod/sa/order"]}}]}]}"#.into(),
        }];
        let s = from_control(&snap, &sidecar(), "control").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.authz.len(), 1);
        snap.security[0].spec_json = r#"{"action": "CUSTOM"}"#.into();
        let e = from_control(&snap, &sidecar(), "control").expect_err("CUSTOM");
        assert!(
            e.contains("AuthorizationPolicy prod/checkout-allow") && e.contains("spec.action"),
            "{e}"
        );
    }

    #[test]
    fn inbound_mode_follows_peer_authentication_and_tcp_services_get_a_tcp_port() {
        let mut snap = snap("TCP");
        // the workload is checkout-1: its only service port is TCP
        if let Some(w) = snap.workload.as_mut() {
            w.name = "checkout-1".into();
            w.labels.insert("app".into(), "checkout".into());
        }
        let pa = |name: &str, spec: &str| proto::SecurityPolicy {
            kind: "PeerAuthentication".into(),
            namespace: "prod".into(),
            name: name.into(),
            spec_json: spec.into(),
        };
        snap.security = vec![
            pa("default", r#"{"mtls": {"mode": "STRICT"}}"#),
            pa(
                "checkout",
                r#"{"selector": {"matchLabels": {"app": "checkout"}}, "portLevelMtls": {"16201": {"mode": "DISABLE"}}}"#,
            ),
        ];
        let s = from_control(&snap, &sidecar(), "control").unwrap_or_else(|e| panic!("{e}"));
        let inbound = &s.listeners[0];
        assert!(matches!(inbound.kind, ListenerKind::Tcp { .. }));
        // port-level on the workload's policy wins over the namespace-wide STRICT
        assert_eq!(inbound.mtls, Some(weft_api::peerauthn::Mode::Disable));
        assert_eq!(s.listeners[1].mtls, None, "outbound is plain");
    }

    #[test]
    fn unsupported_protocol_is_a_nack_reason() {
        let e = from_control(&snap("UDP"), &sidecar(), "control").expect_err("UDP");
        assert!(e.contains("protocol UDP is not supported"), "{e}");
    }
}
