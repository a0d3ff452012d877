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

use crate::manifest::{MeshState, Security, ServiceSpec};

/// Every service of a mesh state in snapshot form, computed once per accepted state and shared
/// by every proxy's push; the services visible from a namespace (and their digest) are computed
/// once per namespace.
pub struct ServiceTable {
    /// Each service with its encoding as one `ServiceList.services` field (tag, length,
    /// message), so a namespace's list is the concatenation of its visible entries.
    entries: Vec<Entry>,
    trust_domain: String,
    // control plane only: filled lazily by the push tasks
    visible: Mutex<HashMap<String, Arc<Visible>>>,
}

/// One service, the workloads behind it (kept alive, compared by pointer), and its encoding.
struct Entry {
    spec: Arc<ServiceSpec>,
    workloads: Vec<Arc<crate::manifest::WorkloadSpec>>,
    field: Arc<Vec<u8>>,
}

/// The services one namespace may call, encoded once as a `ServiceList`, and its SHA-256.
pub struct Visible {
    pub encoded: prost::bytes::Bytes,
    pub digest: Vec<u8>,
}

impl ServiceTable {
    /// Builds the table for `state`, reusing the encoding of every service whose spec and
    /// selected workloads are the very same (`Arc`) values as in `previous`: a one-workload
    /// change re-encodes one service.
    pub fn new(state: &MeshState, previous: Option<&ServiceTable>) -> ServiceTable {
        let reuse: HashMap<(&str, &str), &Entry> = previous
            .filter(|p| p.trust_domain == state.trust_domain)
            .map(|p| {
                p.entries
                    .iter()
                    .map(|e| ((e.spec.namespace.as_str(), e.spec.name.as_str()), e))
                    .collect()
            })
            .unwrap_or_default();
        let entries = state
            .services
            .values()
            .map(|s| {
                let workloads: Vec<_> = state.endpoint_arcs(s).cloned().collect();
                let same = |e: &&&Entry| {
                    Arc::ptr_eq(&e.spec, s)
                        && e.workloads.len() == workloads.len()
                        && e.workloads
                            .iter()
                            .zip(&workloads)
                            .all(|(a, b)| Arc::ptr_eq(a, b))
                };
                let field = match reuse
                    .get(&(s.namespace.as_str(), s.name.as_str()))
                    .filter(same)
                {
                    Some(e) => e.field.clone(),
                    None => Arc::new(encode_service(state, s, &workloads)),
                };
                Entry {
                    spec: s.clone(),
                    workloads,
                    field,
                }
            })
            .collect();
        ServiceTable {
            entries,
            trust_domain: state.trust_domain.clone(),
            visible: Mutex::new(HashMap::new()),
        }
    }

    pub fn visible(&self, namespace: &str) -> Arc<Visible> {
        let mut cache = self.visible.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .entry(namespace.to_string())
            .or_insert_with(|| {
                let mut encoded = Vec::new();
                for e in self
                    .entries
                    .iter()
                    .filter(|e| MeshState::visible(&e.spec, namespace))
                {
                    encoded.extend_from_slice(&e.field);
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

/// One service as field 1 of a `ServiceList` (tag, length, message).
fn encode_service(
    state: &MeshState,
    s: &ServiceSpec,
    workloads: &[Arc<crate::manifest::WorkloadSpec>],
) -> Vec<u8> {
    let mut endpoints = Vec::new();
    for w in workloads {
        // validated at load: no need to re-parse
        let id = format!(
            "spiffe://{}/ns/{}/sa/{}",
            state.trust_domain, w.workload.namespace, w.service_account
        );
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
    let mut field = Vec::with_capacity(service.encoded_len() + 6);
    prost::encoding::message::encode(1, &service, &mut field);
    field
}

/// The snapshot for `workload` (version 0: the caller stamps it) and a digest of its content,
/// or None if the workload is gone.
pub fn for_workload(
    state: &MeshState,
    table: &ServiceTable,
    bundle: &[CertificateDer<'static>],
    workload: &WorkloadRef,
) -> Option<(proto::Snapshot, Vec<u8>)> {
    let spec = state.workloads.get(workload)?;
    let labels = spec.labels.clone();
    let me = spec;
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
    let security: Vec<proto::SecurityPolicy> = state
        .security
        .iter()
        .filter_map(|sec| match sec {
            Security::Authz(p, json) if p.applies_to(&workload.namespace, &labels) => {
                Some(proto::SecurityPolicy {
                    kind: "AuthorizationPolicy".into(),
                    namespace: p.namespace.clone(),
                    name: p.name.rsplit('/').next().unwrap_or_default().to_string(),
                    spec_json: json.clone(),
                })
            }
            Security::PeerAuthn(p, json)
                if p.namespace == workload.namespace
                    || p.namespace == weft_api::peerauthn::ROOT_NAMESPACE =>
            {
                Some(proto::SecurityPolicy {
                    kind: "PeerAuthentication".into(),
                    namespace: p.namespace.clone(),
                    name: p.name.rsplit('/').next().unwrap_or_default().to_string(),
                    spec_json: json.clone(),
                })
            }
            _ => None,
        })
        .collect();
    let mut ctx = Context::new(&SHA256);
    ctx.update(&visible.digest);
    for p in &security {
        ctx.update(&p.encode_to_vec());
    }
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
        security,
    };
    Some((snap, ctx.finish().as_ref().to_vec()))
}
