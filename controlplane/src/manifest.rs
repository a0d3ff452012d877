//! Manifests: the Kubernetes-style YAML that operators write, validated into one `MeshState`.
//!
//! Kinds: `MeshConfig` (weft.dev/v1), `ServiceEntry` and `WorkloadEntry`
//! (networking.istio.io/v1) — the fields a mesh on plain hosts needs. A field weft does not
//! support is an error, never ignored. The whole folder is validated as one set: one bad
//! document rejects the set, and errors name the file, the resource and the field.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use weft_api::{SpiffeId, WorkloadRef};

/// `FILE: KIND NAMESPACE/NAME: FIELD: REASON`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}: {resource}: {field}: {reason}")]
pub struct ManifestError {
    pub file: String,
    pub resource: String,
    pub field: String,
    pub reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Meta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MeshConfigSpec {
    /// Trust domain of every SPIFFE ID. Default `cluster.local`.
    #[serde(rename = "trustDomain", default)]
    trust_domain: Option<String>,
    /// Lifetime of issued SVIDs, e.g. `24h`, `20s`. Default `24h`.
    #[serde(rename = "certTTL", default)]
    cert_ttl: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceEntrySpec {
    hosts: Vec<String>,
    #[serde(default)]
    ports: Vec<RawPort>,
    #[serde(default)]
    workload_selector: Option<Selector>,
    /// Only `MESH_INTERNAL`.
    #[serde(default)]
    location: Option<String>,
    /// Only `STATIC`.
    #[serde(default)]
    resolution: Option<String>,
    /// Namespaces that may call this service: `*` (default), `.` (own namespace), or names.
    #[serde(default)]
    export_to: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPort {
    number: u32,
    name: String,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    target_port: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Selector {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WorkloadEntrySpec {
    /// IP of the workload's sidecar.
    address: String,
    /// Service port name → the sidecar's inbound port.
    #[serde(default)]
    ports: BTreeMap<String, u32>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Default `default`.
    #[serde(default)]
    service_account: Option<String>,
}

/// Protocols weft's data plane knows; others are accepted here (they are valid Istio) and left
/// for the proxy to accept or NACK.
pub const KNOWN_PROTOCOLS: &[&str] = &[
    "HTTP", "HTTP2", "GRPC", "TCP", "TLS", "HTTPS", "MONGO", "REDIS", "MYSQL", "UDP",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortSpec {
    pub number: u16,
    pub name: String,
    pub protocol: String,
    pub target_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    pub hosts: Vec<String>,
    pub ports: Vec<PortSpec>,
    pub selector: BTreeMap<String, String>,
    pub export_to: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkloadSpec {
    pub workload: WorkloadRef,
    pub address: IpAddr,
    pub ports: BTreeMap<String, u16>,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
}

/// The validated mesh: what every snapshot and certificate is computed from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MeshState {
    pub trust_domain: String,
    #[serde(with = "secs")]
    pub cert_ttl: Duration,
    // Arc: a change re-assembles the set from cached files without copying every spec
    pub services: BTreeMap<(String, String), Arc<ServiceSpec>>,
    pub workloads: BTreeMap<WorkloadRef, Arc<WorkloadSpec>>,
    /// Service → the workloads it selects (computed once per accepted set).
    #[serde(skip)]
    pub selected: BTreeMap<(String, String), Vec<WorkloadRef>>,
    /// AuthorizationPolicies and PeerAuthentications, in (kind, namespace, name) order.
    pub security: Vec<Security>,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}s", d.as_secs()))
    }
}

impl MeshState {
    pub fn spiffe_id(&self, w: &WorkloadSpec) -> Option<SpiffeId> {
        SpiffeId::new(
            &self.trust_domain,
            &w.workload.namespace,
            &w.service_account,
        )
        .ok()
    }

    /// Workloads a service selects (same namespace, every selector label matches), from the
    /// index built at validation.
    pub fn endpoints_of<'a>(
        &'a self,
        s: &'a ServiceSpec,
    ) -> impl Iterator<Item = &'a WorkloadSpec> + 'a {
        self.selected
            .get(&(s.namespace.clone(), s.name.clone()))
            .into_iter()
            .flatten()
            .filter_map(|w| self.workloads.get(w).map(|w| &**w))
    }

    /// Like `endpoints_of`, as the shared `Arc`s (so callers can tell unchanged ones apart).
    pub fn endpoint_arcs<'a>(
        &'a self,
        s: &'a ServiceSpec,
    ) -> impl Iterator<Item = &'a Arc<WorkloadSpec>> + 'a {
        self.selected
            .get(&(s.namespace.clone(), s.name.clone()))
            .into_iter()
            .flatten()
            .filter_map(|w| self.workloads.get(w))
    }

    /// May workloads of namespace `ns` call service `s`?
    pub fn visible(s: &ServiceSpec, ns: &str) -> bool {
        s.export_to
            .iter()
            .any(|e| e == "*" || e == ns || (e == "." && s.namespace == ns))
    }
}

pub use weft_api::units::parse_duration;

fn valid_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn valid_host(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(valid_dns_label)
}

/// Parsed files by path, with the (size, mtime) they were parsed at.
#[derive(Debug, Default)]
pub struct DirCache {
    files: BTreeMap<PathBuf, ((u64, u128), ParsedFile)>,
}

/// Like `load_dir`, re-parsing only files whose size or mtime changed since the last call.
pub fn load_dir_cached(dir: &Path, cache: &mut DirCache) -> Result<MeshState, Vec<ManifestError>> {
    let read_err = |f: &Path, e: std::io::Error| {
        vec![ManifestError {
            file: f.display().to_string(),
            resource: "-".into(),
            field: "-".into(),
            reason: format!("cannot read: {e}"),
        }]
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| read_err(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    paths.sort();
    cache.files.retain(|p, _| paths.contains(p));
    for p in &paths {
        let meta = std::fs::metadata(p).map_err(|e| read_err(p, e))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let sig = (meta.len(), mtime);
        if cache.files.get(p).is_some_and(|(s, _)| *s == sig) {
            continue;
        }
        let text = std::fs::read_to_string(p).map_err(|e| read_err(p, e))?;
        cache.files.insert(
            p.clone(),
            (sig, parse_file(&p.display().to_string(), &text)),
        );
    }
    assemble(cache.files.values().map(|(_, f)| f))
}

/// All errors of a rejected set, one per line (for logs, the admin page and the CLI).
pub fn report(errors: &[ManifestError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads every `*.yaml`/`*.yml` file of `dir` (sorted) and validates the set.
pub fn load_dir(dir: &Path) -> Result<MeshState, Vec<ManifestError>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect(),
        Err(e) => {
            return Err(vec![ManifestError {
                file: dir.display().to_string(),
                resource: "-".into(),
                field: "-".into(),
                reason: format!("cannot read folder: {e}"),
            }])
        }
    };
    files.sort();
    let mut docs = Vec::new();
    for f in &files {
        match std::fs::read_to_string(f) {
            Ok(text) => docs.push((f.display().to_string(), text)),
            Err(e) => {
                return Err(vec![ManifestError {
                    file: f.display().to_string(),
                    resource: "-".into(),
                    field: "-".into(),
                    reason: format!("cannot read: {e}"),
                }])
            }
        }
    }
    parse_set(&docs)
}

/// One file's documents, parsed and checked on their own; cached by the watcher so that a change
/// to one file re-parses only that file (the set is still validated as a whole).
#[derive(Debug, Clone, Default)]
pub struct ParsedFile {
    mesh_config: Option<(String, MeshConfigSpec)>,
    security: Securities,
    services: Services,
    workloads: Workloads,
    errors: Vec<ManifestError>,
}

/// Parses one file's multi-document YAML.
pub fn parse_file(file: &str, text: &str) -> ParsedFile {
    let mut p = ParsedFile::default();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                p.errors.push(err(
                    file,
                    &format!("document {}", i + 1),
                    "-",
                    e.to_string(),
                ));
                break;
            }
        };
        if let Err(e) = parse_doc(
            file,
            i,
            value,
            &mut p.mesh_config,
            &mut p.services,
            &mut p.workloads,
            &mut p.security,
        ) {
            p.errors.push(e);
        }
    }
    p
}

/// Validates a set of (file name, YAML text) as one mesh state.
pub fn parse_set(files: &[(String, String)]) -> Result<MeshState, Vec<ManifestError>> {
    let parsed: Vec<ParsedFile> = files.iter().map(|(f, t)| parse_file(f, t)).collect();
    assemble(parsed.iter())
}

/// Merges parsed files into one mesh state, checking what spans files.
pub fn assemble<'a>(
    files: impl Iterator<Item = &'a ParsedFile>,
) -> Result<MeshState, Vec<ManifestError>> {
    let mut errors = Vec::new();
    let mut mesh_config: Option<(String, MeshConfigSpec)> = None;
    let mut services: Services = BTreeMap::new();
    let mut workloads: Workloads = BTreeMap::new();
    let mut security: Securities = BTreeMap::new();
    for p in files {
        errors.extend(p.errors.iter().cloned());
        if let Some((file, spec)) = &p.mesh_config {
            match &mesh_config {
                Some((other, _)) => errors.push(err(
                    file,
                    "MeshConfig",
                    "kind",
                    format!("a second MeshConfig (the first is in {other})"),
                )),
                None => mesh_config = Some((file.clone(), spec.clone())),
            }
        }
        for (k, (file, v)) in &p.services {
            if let Some((other, _)) = services.insert(k.clone(), (file.clone(), v.clone())) {
                errors.push(err(
                    file,
                    &format!("ServiceEntry {}/{}", k.0, k.1),
                    "metadata.name",
                    format!("duplicate ServiceEntry (also in {other})"),
                ));
            }
        }
        for (k, (file, v)) in &p.security {
            if let Some((other, _)) = security.insert(k.clone(), (file.clone(), v.clone())) {
                errors.push(err(
                    file,
                    &format!("{} {}/{}", k.0, k.1, k.2),
                    "metadata.name",
                    format!("duplicate {} (also in {other})", k.0),
                ));
            }
        }
        for (k, (file, v)) in &p.workloads {
            if let Some((other, _)) = workloads.insert(k.clone(), (file.clone(), v.clone())) {
                errors.push(err(
                    file,
                    &format!("WorkloadEntry {k}"),
                    "metadata.name",
                    format!("duplicate WorkloadEntry (also in {other})"),
                ));
            }
        }
    }
    let (trust_domain, cert_ttl) = match &mesh_config {
        None => ("cluster.local".to_string(), Duration::from_secs(24 * 3600)),
        Some((file, spec)) => {
            let td = spec
                .trust_domain
                .clone()
                .unwrap_or_else(|| "cluster.local".into());
            if !valid_host(&td) {
                errors.push(err(
                    file,
                    "MeshConfig",
                    "spec.trustDomain",
                    format!("`{td}` is not a valid trust domain"),
                ));
            }
            let ttl = match parse_duration(spec.cert_ttl.as_deref().unwrap_or("24h")) {
                Ok(d) if d >= Duration::from_secs(10) && d <= Duration::from_secs(365 * 86400) => d,
                Ok(_) => {
                    errors.push(err(
                        file,
                        "MeshConfig",
                        "spec.certTTL",
                        "must be between 10s and 365d".into(),
                    ));
                    Duration::from_secs(86400)
                }
                Err(e) => {
                    errors.push(err(file, "MeshConfig", "spec.certTTL", e));
                    Duration::from_secs(86400)
                }
            };
            (td, ttl)
        }
    };
    // hosts must be unique across services
    let mut hosts = BTreeMap::new();
    for s in services
        .values()
        .map(|(_, s): &(String, Arc<ServiceSpec>)| s)
    {
        for h in &s.hosts {
            if let Some(other) = hosts.insert(h.clone(), format!("{}/{}", s.namespace, s.name)) {
                let file = &services[&(s.namespace.clone(), s.name.clone())].0;
                errors.push(err(
                    file,
                    &format!("ServiceEntry {}/{}", s.namespace, s.name),
                    "spec.hosts",
                    format!("host `{h}` is already declared by ServiceEntry {other}"),
                ));
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let services: BTreeMap<_, _> = services.into_iter().map(|(k, (_, v))| (k, v)).collect();
    let workloads: BTreeMap<_, _> = workloads.into_iter().map(|(k, (_, v))| (k, v)).collect();
    let selected = select(&services, &workloads);
    let security = security.into_values().map(|(_, v)| v).collect();
    Ok(MeshState {
        trust_domain,
        cert_ttl,
        services,
        workloads,
        selected,
        security,
    })
}

/// Indexes workloads by (namespace, label, value) so each service's selection is a lookup of its
/// rarest label instead of a scan of every workload.
fn select(
    services: &BTreeMap<(String, String), Arc<ServiceSpec>>,
    workloads: &BTreeMap<WorkloadRef, Arc<WorkloadSpec>>,
) -> BTreeMap<(String, String), Vec<WorkloadRef>> {
    let mut by_label: BTreeMap<(&str, &str, &str), Vec<&WorkloadSpec>> = BTreeMap::new();
    for w in workloads.values() {
        for (k, v) in &w.labels {
            by_label
                .entry((&w.workload.namespace, k, v))
                .or_default()
                .push(w);
        }
    }
    services
        .iter()
        .map(|(key, s)| {
            let candidates = s
                .selector
                .iter()
                .map(|(k, v)| {
                    by_label
                        .get(&(s.namespace.as_str(), k.as_str(), v.as_str()))
                        .map_or(&[][..], Vec::as_slice)
                })
                .min_by_key(|c| c.len())
                .unwrap_or(&[]);
            let chosen = candidates
                .iter()
                .filter(|w| s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                .map(|w| w.workload.clone())
                .collect();
            (key.clone(), chosen)
        })
        .collect()
}

fn err(file: &str, resource: &str, field: &str, reason: String) -> ManifestError {
    ManifestError {
        file: file.to_string(),
        resource: resource.to_string(),
        field: field.to_string(),
        reason,
    }
}

/// A validated security resource, with its spec re-serialized as JSON for the snapshot (the
/// proxy validates it again with the same code).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Security {
    Authz(Arc<weft_api::authz::Policy>, String),
    PeerAuthn(Arc<weft_api::peerauthn::PeerAuthentication>, String),
}

type Securities = BTreeMap<(String, String, String), (String, Security)>;
type Services = BTreeMap<(String, String), (String, Arc<ServiceSpec>)>;
type Workloads = BTreeMap<WorkloadRef, (String, Arc<WorkloadSpec>)>;

fn typed<T: serde::de::DeserializeOwned>(
    file: &str,
    resource: &str,
    prefix: &str,
    v: serde_yaml::Value,
) -> Result<T, ManifestError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            prefix.to_string()
        } else {
            format!("{prefix}.{path}")
        };
        err(file, resource, &field, e.into_inner().to_string())
    })
}

fn parse_doc(
    file: &str,
    index: usize,
    value: serde_yaml::Value,
    mesh_config: &mut Option<(String, MeshConfigSpec)>,
    services: &mut Services,
    workloads: &mut Workloads,
    security: &mut Securities,
) -> Result<(), ManifestError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Envelope {
        api_version: String,
        kind: String,
        metadata: serde_yaml::Value,
        #[serde(default)]
        spec: serde_yaml::Value,
    }
    let doc = format!("document {}", index + 1);
    let env: Envelope = typed(file, &doc, "", value)?;
    let meta: Meta = typed(
        file,
        &format!("{} ({doc})", env.kind),
        "metadata",
        env.metadata,
    )?;
    let ns = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let resource = format!("{} {ns}/{}", env.kind, meta.name);
    if !valid_dns_label(&meta.name.replace('.', "-")) {
        return Err(err(
            file,
            &resource,
            "metadata.name",
            format!("`{}` is not a valid name", meta.name),
        ));
    }
    if !valid_dns_label(&ns) {
        return Err(err(
            file,
            &resource,
            "metadata.namespace",
            format!("`{ns}` is not a valid namespace"),
        ));
    }
    let _ = (&meta.labels, &meta.annotations);
    let want_version = |v: &str| -> Result<(), ManifestError> {
        if env.api_version == v {
            Ok(())
        } else {
            Err(err(
                file,
                &resource,
                "apiVersion",
                format!("`{}` for kind {} must be `{v}`", env.api_version, env.kind),
            ))
        }
    };
    match env.kind.as_str() {
        "MeshConfig" => {
            want_version("weft.dev/v1")?;
            let spec: MeshConfigSpec = typed(file, &resource, "spec", env.spec)?;
            if let Some((other, _)) = mesh_config {
                return Err(err(
                    file,
                    &resource,
                    "kind",
                    format!("a second MeshConfig (the first is in {other})"),
                ));
            }
            *mesh_config = Some((file.to_string(), spec));
        }
        "ServiceEntry" => {
            want_version("networking.istio.io/v1")?;
            let spec: ServiceEntrySpec = typed(file, &resource, "spec", env.spec)?;
            let s = validate_service(file, &resource, &ns, &meta.name, spec)?;
            if let Some((other, _)) = services.insert(
                (ns.clone(), meta.name.clone()),
                (file.to_string(), Arc::new(s)),
            ) {
                return Err(err(
                    file,
                    &resource,
                    "metadata.name",
                    format!("duplicate ServiceEntry (also in {other})"),
                ));
            }
        }
        "WorkloadEntry" => {
            want_version("networking.istio.io/v1")?;
            let spec: WorkloadEntrySpec = typed(file, &resource, "spec", env.spec)?;
            let w = validate_workload(file, &resource, &ns, &meta.name, spec)?;
            if let Some((other, _)) =
                workloads.insert(w.workload.clone(), (file.to_string(), Arc::new(w)))
            {
                return Err(err(
                    file,
                    &resource,
                    "metadata.name",
                    format!("duplicate WorkloadEntry (also in {other})"),
                ));
            }
        }
        "AuthorizationPolicy" | "PeerAuthentication" => {
            want_version("security.istio.io/v1")?;
            let item = if env.kind == "AuthorizationPolicy" {
                let raw: weft_api::authz::RawPolicySpec = typed(file, &resource, "spec", env.spec)?;
                let p = weft_api::authz::Policy::from_raw(&ns, &meta.name, &raw)
                    .map_err(|e| err(file, &resource, &e.field, e.reason))?;
                Security::Authz(Arc::new(p), serde_json::to_string(&raw).unwrap_or_default())
            } else {
                let raw: weft_api::peerauthn::RawPeerAuthenticationSpec =
                    typed(file, &resource, "spec", env.spec)?;
                let p = weft_api::peerauthn::PeerAuthentication::from_raw(&ns, &meta.name, &raw)
                    .map_err(|e| err(file, &resource, &e.field, e.reason))?;
                Security::PeerAuthn(Arc::new(p), serde_json::to_string(&raw).unwrap_or_default())
            };
            let key = (env.kind.clone(), ns.clone(), meta.name.clone());
            if let Some((other, _)) = security.insert(key, (file.to_string(), item)) {
                return Err(err(
                    file,
                    &resource,
                    "metadata.name",
                    format!("duplicate {} (also in {other})", env.kind),
                ));
            }
        }
        other => {
            return Err(err(
                file,
                &resource,
                "kind",
                format!("`{other}` is not supported (MeshConfig, ServiceEntry, WorkloadEntry, AuthorizationPolicy, PeerAuthentication)"),
            ));
        }
    }
    Ok(())
}

fn port_number(file: &str, resource: &str, field: &str, n: u32) -> Result<u16, ManifestError> {
    u16::try_from(n).ok().filter(|p| *p > 0).ok_or_else(|| {
        err(
            file,
            resource,
            field,
            format!("{n} is not a port number (1-65535)"),
        )
    })
}

fn validate_service(
    file: &str,
    resource: &str,
    ns: &str,
    name: &str,
    spec: ServiceEntrySpec,
) -> Result<ServiceSpec, ManifestError> {
    if spec.hosts.is_empty() {
        return Err(err(
            file,
            resource,
            "spec.hosts",
            "at least one host is required".into(),
        ));
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        if !valid_host(h) {
            return Err(err(
                file,
                resource,
                &format!("spec.hosts[{i}]"),
                format!("`{h}` is not a valid host name (wildcards are not supported)"),
            ));
        }
    }
    if let Some(l) = spec.location.as_deref().filter(|l| *l != "MESH_INTERNAL") {
        return Err(err(
            file,
            resource,
            "spec.location",
            format!("`{l}` is not supported (only MESH_INTERNAL)"),
        ));
    }
    if let Some(r) = spec.resolution.as_deref().filter(|r| *r != "STATIC") {
        return Err(err(
            file,
            resource,
            "spec.resolution",
            format!("`{r}` is not supported (only STATIC)"),
        ));
    }
    let mut ports = Vec::new();
    let mut names = BTreeSet::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let at = |f: &str| format!("spec.ports[{i}].{f}");
        let number = port_number(file, resource, &at("number"), p.number)?;
        if !valid_dns_label(&p.name) || !names.insert(p.name.clone()) {
            return Err(err(
                file,
                resource,
                &at("name"),
                format!("`{}` must be a unique lowercase name", p.name),
            ));
        }
        let protocol = p
            .protocol
            .clone()
            .unwrap_or_else(|| "TCP".into())
            .to_ascii_uppercase();
        if !KNOWN_PROTOCOLS.contains(&protocol.as_str()) {
            return Err(err(
                file,
                resource,
                &at("protocol"),
                format!("`{protocol}` is not an Istio protocol"),
            ));
        }
        let target_port = p
            .target_port
            .map(|t| port_number(file, resource, &at("targetPort"), t))
            .transpose()?;
        ports.push(PortSpec {
            number,
            name: p.name.clone(),
            protocol,
            target_port,
        });
    }
    if ports.is_empty() {
        return Err(err(
            file,
            resource,
            "spec.ports",
            "at least one port is required".into(),
        ));
    }
    let selector = spec.workload_selector.map(|s| s.labels).unwrap_or_default();
    if selector.is_empty() {
        return Err(err(
            file,
            resource,
            "spec.workloadSelector.labels",
            "a workload selector is required (weft resolves endpoints from WorkloadEntries)".into(),
        ));
    }
    let export_to = spec.export_to.unwrap_or_else(|| vec!["*".into()]);
    for (i, e) in export_to.iter().enumerate() {
        if !(e == "*" || e == "." || valid_dns_label(e)) {
            return Err(err(
                file,
                resource,
                &format!("spec.exportTo[{i}]"),
                format!("`{e}` is not `*`, `.` or a namespace"),
            ));
        }
    }
    Ok(ServiceSpec {
        namespace: ns.into(),
        name: name.into(),
        hosts: spec.hosts,
        ports,
        selector,
        export_to,
    })
}

fn validate_workload(
    file: &str,
    resource: &str,
    ns: &str,
    name: &str,
    spec: WorkloadEntrySpec,
) -> Result<WorkloadSpec, ManifestError> {
    let address: IpAddr = spec.address.parse().map_err(|_| {
        err(
            file,
            resource,
            "spec.address",
            format!(
                "`{}` is not an IP address (hostnames are not supported)",
                spec.address
            ),
        )
    })?;
    let mut ports = BTreeMap::new();
    for (k, v) in &spec.ports {
        ports.insert(
            k.clone(),
            port_number(file, resource, &format!("spec.ports.{k}"), *v)?,
        );
    }
    let sa = spec.service_account.unwrap_or_else(|| "default".into());
    let workload = WorkloadRef {
        namespace: ns.into(),
        name: name.into(),
    };
    SpiffeId::new("x", ns, &sa)
        .map_err(|e| err(file, resource, "spec.serviceAccount", e.to_string()))?;
    Ok(WorkloadSpec {
        workload,
        address,
        ports,
        labels: spec.labels,
        service_account: sa,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: weft.dev/v1
kind: MeshConfig
metadata: {name: mesh}
spec: {trustDomain: cluster.local, certTTL: 1h}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: checkout, namespace: prod}
spec:
  hosts: [checkout.prod.svc.cluster.local]
  ports: [{number: 80, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: checkout}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: checkout-1, namespace: prod}
spec:
  address: 127.0.0.1
  ports: {http: 16001}
  labels: {app: checkout}
  serviceAccount: checkout
"#;

    fn set(text: &str) -> Result<MeshState, Vec<ManifestError>> {
        parse_set(&[("mesh.yaml".to_string(), text.to_string())])
    }

    #[test]
    fn good_set() {
        let m = set(GOOD).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(m.cert_ttl, Duration::from_secs(3600));
        let s = &m.services[&("prod".to_string(), "checkout".to_string())];
        let eps: Vec<_> = m.endpoints_of(s).collect();
        assert_eq!(eps.len(), 1);
        assert_eq!(
            m.spiffe_id(eps[0]).map(|i| i.to_string()).as_deref(),
            Some("spiffe://cluster.local/ns/prod/sa/checkout")
        );
    }

    #[test]
    fn security_kinds() {
        let sec = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: checkout, namespace: prod}\n\
                   spec:\n  selector: {matchLabels: {app: checkout}}\n  action: ALLOW\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/prod/sa/order]}\n\
                   ---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: prod}\nspec: {mtls: {mode: STRICT}}\n";
        let m = set(&format!("{GOOD}{sec}")).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(m.security.len(), 2);
        let bad = sec.replace("action: ALLOW", "action: CUSTOM");
        let errs = set(&format!("{GOOD}{bad}")).expect_err("CUSTOM");
        let msg = errs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            msg.contains("AuthorizationPolicy prod/checkout") && msg.contains("spec.action"),
            "{msg}"
        );
        let unknown = sec.replace("action: ALLOW", "action: ALLOW\n  provider: {name: x}");
        let errs = set(&format!("{GOOD}{unknown}")).expect_err("provider");
        assert!(errs[0].to_string().contains("provider"), "{:?}", errs);
    }

    #[test]
    fn errors_name_file_resource_and_field() {
        let cases = [
            (
                GOOD.replace("address: 127.0.0.1", "address: nowhere"),
                "WorkloadEntry prod/checkout-1",
                "spec.address",
            ),
            (
                GOOD.replace("protocol: HTTP", "protocol: SMTP"),
                "ServiceEntry prod/checkout",
                "spec.ports[0].protocol",
            ),
            (
                GOOD.replace("serviceAccount: checkout", "serviceAcount: checkout"),
                "WorkloadEntry prod/checkout-1",
                "spec",
            ),
            (
                GOOD.replace("certTTL: 1h", "certTTL: soon"),
                "MeshConfig",
                "spec.certTTL",
            ),
            (
                GOOD.replace("kind: ServiceEntry", "kind: Gateway"),
                "Gateway prod/checkout",
                "kind",
            ),
            (
                GOOD.replace(
                    "networking.istio.io/v1\nkind: WorkloadEntry",
                    "v9\nkind: WorkloadEntry",
                ),
                "WorkloadEntry prod/checkout-1",
                "apiVersion",
            ),
            (
                format!(
                    "{GOOD}\n---\n{}",
                    GOOD.split("---").nth(2).unwrap_or_default()
                ),
                "WorkloadEntry prod/checkout-1",
                "duplicate",
            ),
        ];
        for (text, resource, field) in cases {
            let errs = set(&text).expect_err(field);
            let msg = errs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n");
            assert!(msg.starts_with("mesh.yaml: "), "{msg}");
            assert!(msg.contains(resource), "{msg} should name {resource}");
            assert!(msg.contains(field), "{msg} should name {field}");
        }
    }
}
