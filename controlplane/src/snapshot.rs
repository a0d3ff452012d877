//! Per-proxy snapshots: what one workload's sidecar needs, and nothing about the rest of the
//! mesh — its own workload, the services exported to its namespace, their endpoints and the
//! identities allowed to serve them, and the trust bundle.

use rustls_pki_types::CertificateDer;
use weft_api::proto;
use weft_api::WorkloadRef;

use crate::manifest::{MeshState, ServiceSpec};

/// Every service of a mesh state in snapshot form, with its spec (for `exportTo`). Computed
/// once per accepted state and shared by every proxy's push.
pub type ServiceTable = Vec<(ServiceSpec, proto::Service)>;

pub fn service_table(state: &MeshState) -> ServiceTable {
    state
        .services
        .values()
        .map(|s| {
            let mut endpoints = Vec::new();
            for w in state.endpoints_of(s) {
                let id = state
                    .spiffe_id(w)
                    .map(|i| i.to_string())
                    .unwrap_or_default();
                for p in &s.ports {
                    let port = w
                        .ports
                        .get(&p.name)
                        .copied()
                        .or(p.target_port)
                        .unwrap_or(p.number);
                    endpoints.push(proto::Endpoint {
                        address: std::net::SocketAddr::new(w.address, port).to_string(),
                        port_name: p.name.clone(),
                        spiffe_id: id.clone(),
                        workload: w.workload.to_string(),
                    });
                }
            }
            let service = proto::Service {
                host: s.hosts.first().cloned().unwrap_or_default(),
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                ports: s
                    .ports
                    .iter()
                    .map(|p| proto::Port {
                        number: u32::from(p.number),
                        name: p.name.clone(),
                        protocol: p.protocol.clone(),
                    })
                    .collect(),
                endpoints,
            };
            (s.clone(), service)
        })
        .collect()
}

/// The snapshot for `workload` (version 0: the caller stamps it), or None if it is gone.
pub fn for_workload(
    state: &MeshState,
    table: &ServiceTable,
    bundle: &[CertificateDer<'static>],
    workload: &WorkloadRef,
) -> Option<proto::Snapshot> {
    let me = state.workloads.get(workload)?;
    let services = table
        .iter()
        .filter(|(s, _)| MeshState::visible(s, &workload.namespace))
        .map(|(_, p)| p.clone())
        .collect();
    Some(proto::Snapshot {
        version: 0,
        workload: Some(proto::Workload {
            namespace: me.workload.namespace.clone(),
            name: me.workload.name.clone(),
            service_account: me.service_account.clone(),
            spiffe_id: state
                .spiffe_id(me)
                .map(|i| i.to_string())
                .unwrap_or_default(),
            address: me.address.to_string(),
            labels: me.labels.clone().into_iter().collect(),
        }),
        services,
        trust_bundle_der: bundle.iter().map(|c| c.to_vec()).collect(),
        trust_domain: state.trust_domain.clone(),
    })
}
