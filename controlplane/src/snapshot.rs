//! Per-proxy snapshots: what one workload's sidecar needs, and nothing about the rest of the
//! mesh — its own workload, the services exported to its namespace, their endpoints and the
//! identities allowed to serve them, and the trust bundle.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prost::Message as _;
use ring::digest::{Context, SHA256};
use rustls_pki_types::CertificateDer;
use weft_api::proto;
use weft_api::WorkloadRef;

use crate::manifest::{MeshState, ServiceSpec};

/// Every service of a mesh state in snapshot form, computed once per accepted state and shared
/// by every proxy's push; the services visible from a namespace (and their digest) are computed
/// once per namespace.
pub struct ServiceTable {
    /// Each service with its encoding as one `ServiceList.services` field (tag, length,
    /// message), so a namespace's list is the concatenation of its visible entries.
    entries: Vec<(Arc<ServiceSpec>, Vec<u8>)>,
    // control plane only: filled lazily by the push tasks
    visible: Mutex<HashMap<String, Arc<Visible>>>,
}

/// The services one namespace may call, encoded once as a `ServiceList`, and its SHA-256.
pub struct Visible {
    pub encoded: prost::bytes::Bytes,
    pub digest: Vec<u8>,
}

impl ServiceTable {
    pub fn new(state: &MeshState) -> ServiceTable {
        ServiceTable {
            entries: service_table(state),
            visible: Mutex::new(HashMap::new()),
        }
    }

    pub fn visible(&self, namespace: &str) -> Arc<Visible> {
        let mut cache = self.visible.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .entry(namespace.to_string())
            .or_insert_with(|| {
                let mut encoded = Vec::new();
                for (_, field) in self
                    .entries
                    .iter()
                    .filter(|(s, _)| MeshState::visible(s, namespace))
                {
                    encoded.extend_from_slice(field);
                }
                let digest = ring::digest::digest(&SHA256, &encoded).as_ref().to_vec();
                Arc::new(Visible {
                    encoded: encoded.into(),
                    digest,
                })
            })
            .clone()
    }
}

fn service_table(state: &MeshState) -> Vec<(Arc<ServiceSpec>, Vec<u8>)> {
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
            // field 1 of ServiceList, length-delimited
            let mut field = Vec::with_capacity(service.encoded_len() + 6);
            prost::encoding::message::encode(1, &service, &mut field);
            (s.clone(), field)
        })
        .collect()
}

/// The snapshot for `workload` (version 0: the caller stamps it) and a digest of its content,
/// or None if the workload is gone.
pub fn for_workload(
    state: &MeshState,
    table: &ServiceTable,
    bundle: &[CertificateDer<'static>],
    workload: &WorkloadRef,
) -> Option<(proto::Snapshot, Vec<u8>)> {
    let me = state.workloads.get(workload)?;
    let visible = table.visible(&workload.namespace);
    let me = proto::Workload {
        namespace: me.workload.namespace.clone(),
        name: me.workload.name.clone(),
        service_account: me.service_account.clone(),
        spiffe_id: state
            .spiffe_id(me)
            .map(|i| i.to_string())
            .unwrap_or_default(),
        address: me.address.to_string(),
        labels: me.labels.clone().into_iter().collect(),
    };
    let mut ctx = Context::new(&SHA256);
    ctx.update(&visible.digest);
    ctx.update(&me.encode_to_vec());
    ctx.update(state.trust_domain.as_bytes());
    for c in bundle {
        ctx.update(&(c.len() as u64).to_be_bytes());
        ctx.update(c);
    }
    let snap = proto::Snapshot {
        version: 0,
        workload: Some(me),
        service_list: visible.encoded.clone(),
        trust_bundle_der: bundle.iter().map(|c| c.to_vec()).collect(),
        trust_domain: state.trust_domain.clone(),
    };
    Some((snap, ctx.finish().as_ref().to_vec()))
}
