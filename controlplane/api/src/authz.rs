//! Istio `AuthorizationPolicy` (security.istio.io/v1): the supported subset, validated, and its
//! evaluation. Plain Rust, shared by both planes: the control plane validates manifests with
//! it, the data plane compiles policies per core and evaluates requests with it.
//!
//! Semantics follow Istio: DENY policies are checked first; if any ALLOW policy applies to the
//! workload, a request must match one of its rules; an ALLOW policy with no rules (an empty
//! spec) therefore denies everything; AUDIT only marks. A request without a verified identity
//! never matches `principals` or `namespaces` (and does match their `not` forms, as in Istio, so
//! that "deny everyone but X" also denies plaintext callers). A field weft does not support is
//! an error at load time, never ignored.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// `spec` of an AuthorizationPolicy, as written in YAML.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPolicySpec {
    #[serde(default)]
    pub selector: Option<RawSelector>,
    /// ALLOW (default), DENY or AUDIT. CUSTOM is not supported.
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub rules: Option<Vec<RawRule>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    #[serde(default)]
    pub from: Option<Vec<RawFrom>>,
    #[serde(default)]
    pub to: Option<Vec<RawTo>>,
    #[serde(default)]
    pub when: Option<Vec<RawCondition>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFrom {
    pub source: RawSource,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawSource {
    pub principals: Option<Vec<String>>,
    pub not_principals: Option<Vec<String>>,
    pub namespaces: Option<Vec<String>>,
    pub not_namespaces: Option<Vec<String>>,
    pub ip_blocks: Option<Vec<String>>,
    pub not_ip_blocks: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTo {
    pub operation: RawOperation,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawOperation {
    pub hosts: Option<Vec<String>>,
    pub not_hosts: Option<Vec<String>>,
    pub ports: Option<Vec<String>>,
    pub not_ports: Option<Vec<String>>,
    pub methods: Option<Vec<String>>,
    pub not_methods: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
    pub not_paths: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawCondition {
    pub key: String,
    pub values: Option<Vec<String>>,
    pub not_values: Option<Vec<String>>,
}

/// A field that does not validate: its path in the spec and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PolicyError {
    pub field: String,
    pub reason: String,
}

fn perr(field: impl Into<String>, reason: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

/// Istio string matching: exact, `prefix*`, `*suffix`, or `*` (presence).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl Pattern {
    fn parse(s: &str, field: &str) -> Result<Pattern, PolicyError> {
        if s == "*" {
            return Ok(Pattern::Presence);
        }
        let stars = s.matches('*').count();
        match (stars, s.strip_prefix('*'), s.strip_suffix('*')) {
            (0, _, _) => Ok(Pattern::Exact(s.to_string())),
            (1, Some(rest), _) => Ok(Pattern::Suffix(rest.to_string())),
            (1, _, Some(rest)) => Ok(Pattern::Prefix(rest.to_string())),
            _ => Err(perr(
                field,
                format!("`{s}`: `*` is allowed only alone, at the start or at the end"),
            )),
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            Pattern::Exact(e) => v == e,
            Pattern::Prefix(p) => v.starts_with(p.as_str()),
            Pattern::Suffix(p) => v.ends_with(p.as_str()),
            Pattern::Presence => !v.is_empty(),
        }
    }

    fn matches_ci(&self, v: &str) -> bool {
        let v = v.to_ascii_lowercase();
        match self {
            Pattern::Exact(e) => v == e.to_ascii_lowercase(),
            Pattern::Prefix(p) => v.starts_with(&p.to_ascii_lowercase()),
            Pattern::Suffix(p) => v.ends_with(&p.to_ascii_lowercase()),
            Pattern::Presence => !v.is_empty(),
        }
    }
}

/// An IP block (CIDR or single address).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IpBlock {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpBlock {
    fn parse(s: &str, field: &str) -> Result<IpBlock, PolicyError> {
        let (a, p) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = a
            .parse()
            .map_err(|_| perr(field, format!("`{s}` is not an IP or CIDR block")))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| perr(field, format!("`{s}`: bad prefix length")))?,
        };
        Ok(IpBlock { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Source {
    pub principals: Vec<Pattern>,
    pub not_principals: Vec<Pattern>,
    pub namespaces: Vec<Pattern>,
    pub not_namespaces: Vec<Pattern>,
    pub ip_blocks: Vec<IpBlock>,
    pub not_ip_blocks: Vec<IpBlock>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Operation {
    pub hosts: Vec<Pattern>,
    pub not_hosts: Vec<Pattern>,
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub methods: Vec<Pattern>,
    pub not_methods: Vec<Pattern>,
    pub paths: Vec<Pattern>,
    pub not_paths: Vec<Pattern>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ConditionKey {
    SourcePrincipal,
    SourceNamespace,
    RequestHeader(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Condition {
    pub key: ConditionKey,
    pub values: Vec<Pattern>,
    pub not_values: Vec<Pattern>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// `namespace/name`, for metrics and logs.
    pub name: String,
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
    pub action: Action,
    pub rules: Vec<Rule>,
}

fn patterns(v: &Option<Vec<String>>, field: &str) -> Result<Vec<Pattern>, PolicyError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    if v.is_empty() {
        return Err(perr(field, "must not be empty (omit the field instead)"));
    }
    v.iter()
        .enumerate()
        .map(|(i, s)| Pattern::parse(s, &format!("{field}[{i}]")))
        .collect()
}

fn principals(v: &Option<Vec<String>>, field: &str) -> Result<Vec<Pattern>, PolicyError> {
    let p = patterns(v, field)?;
    for (i, pat) in p.iter().enumerate() {
        if let Pattern::Exact(s) | Pattern::Prefix(s) | Pattern::Suffix(s) = pat {
            if s.starts_with("spiffe://") {
                return Err(perr(format!("{field}[{i}]"), "write principals as Istio does, without `spiffe://` (e.g. cluster.local/ns/prod/sa/order)"));
            }
        }
    }
    Ok(p)
}

fn blocks(v: &Option<Vec<String>>, field: &str) -> Result<Vec<IpBlock>, PolicyError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    v.iter()
        .enumerate()
        .map(|(i, s)| IpBlock::parse(s, &format!("{field}[{i}]")))
        .collect()
}

fn ports(v: &Option<Vec<String>>, field: &str) -> Result<Vec<u16>, PolicyError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    v.iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| perr(format!("{field}[{i}]"), format!("`{s}` is not a port")))
        })
        .collect()
}

impl Policy {
    /// Validates a policy spec; `namespace/name` identify it.
    pub fn from_raw(
        namespace: &str,
        name: &str,
        raw: &RawPolicySpec,
    ) -> Result<Policy, PolicyError> {
        let action = match raw.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            "AUDIT" => Action::Audit,
            other => {
                return Err(perr(
                    "spec.action",
                    format!("`{other}` is not supported (ALLOW, DENY, AUDIT)"),
                ))
            }
        };
        let mut rules = Vec::new();
        for (r, rule) in raw.rules.iter().flatten().enumerate() {
            let at = |f: &str| format!("spec.rules[{r}].{f}");
            let mut from = Vec::new();
            for (i, f) in rule.from.iter().flatten().enumerate() {
                let s = &f.source;
                let a = |x: &str| at(&format!("from[{i}].source.{x}"));
                from.push(Source {
                    principals: principals(&s.principals, &a("principals"))?,
                    not_principals: principals(&s.not_principals, &a("notPrincipals"))?,
                    namespaces: patterns(&s.namespaces, &a("namespaces"))?,
                    not_namespaces: patterns(&s.not_namespaces, &a("notNamespaces"))?,
                    ip_blocks: blocks(&s.ip_blocks, &a("ipBlocks"))?,
                    not_ip_blocks: blocks(&s.not_ip_blocks, &a("notIpBlocks"))?,
                });
            }
            let mut to = Vec::new();
            for (i, t) in rule.to.iter().flatten().enumerate() {
                let o = &t.operation;
                let a = |x: &str| at(&format!("to[{i}].operation.{x}"));
                to.push(Operation {
                    hosts: patterns(&o.hosts, &a("hosts"))?,
                    not_hosts: patterns(&o.not_hosts, &a("notHosts"))?,
                    ports: ports(&o.ports, &a("ports"))?,
                    not_ports: ports(&o.not_ports, &a("notPorts"))?,
                    methods: patterns(&o.methods, &a("methods"))?,
                    not_methods: patterns(&o.not_methods, &a("notMethods"))?,
                    paths: patterns(&o.paths, &a("paths"))?,
                    not_paths: patterns(&o.not_paths, &a("notPaths"))?,
                });
            }
            let mut when = Vec::new();
            for (i, c) in rule.when.iter().flatten().enumerate() {
                let a = |x: &str| at(&format!("when[{i}].{x}"));
                let key = match c.key.as_str() {
                    "source.principal" => ConditionKey::SourcePrincipal,
                    "source.namespace" => ConditionKey::SourceNamespace,
                    k => match k.strip_prefix("request.headers[").and_then(|h| h.strip_suffix(']')) {
                        Some(h) if !h.is_empty() => ConditionKey::RequestHeader(h.to_ascii_lowercase()),
                        _ => return Err(perr(a("key"), format!("`{k}` is not supported (source.principal, source.namespace, request.headers[NAME])"))),
                    },
                };
                let values = patterns(&c.values, &a("values"))?;
                let not_values = patterns(&c.not_values, &a("notValues"))?;
                if values.is_empty() && not_values.is_empty() {
                    return Err(perr(a("values"), "a condition needs values or notValues"));
                }
                when.push(Condition {
                    key,
                    values,
                    not_values,
                });
            }
            rules.push(Rule { from, to, when });
        }
        Ok(Policy {
            name: format!("{namespace}/{name}"),
            namespace: namespace.to_string(),
            selector: raw
                .selector
                .as_ref()
                .map(|s| s.match_labels.clone())
                .unwrap_or_default(),
            action,
            rules,
        })
    }

    /// Does the policy apply to a workload in `namespace` with `labels`? (A policy in the root
    /// namespace would apply mesh-wide; weft has none yet, so policies are namespace-scoped.)
    pub fn applies_to(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        self.namespace == namespace && self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

impl Operation {
    fn has_http_fields(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }
}

impl Rule {
    fn has_http_fields(&self) -> bool {
        self.to.iter().any(Operation::has_http_fields)
            || self
                .when
                .iter()
                .any(|c| matches!(c.key, ConditionKey::RequestHeader(_)))
    }
}

impl Policy {
    /// The policy as it applies to a plain TCP connection, Istio's way. HTTP-only attributes
    /// (hosts, methods, paths, request headers) cannot be known there: a rule of an ALLOW or
    /// AUDIT policy that names one never matches, so it is dropped (an ALLOW policy left without
    /// rules denies every connection); in a DENY policy they are ignored, so the rule matches
    /// more connections, never fewer.
    pub fn for_tcp(&self) -> Policy {
        let rules = match self.action {
            Action::Deny => self
                .rules
                .iter()
                .map(|r| Rule {
                    from: r.from.clone(),
                    to: r
                        .to
                        .iter()
                        .map(|o| Operation {
                            ports: o.ports.clone(),
                            not_ports: o.not_ports.clone(),
                            ..Operation::default()
                        })
                        .collect(),
                    when: r
                        .when
                        .iter()
                        .filter(|c| !matches!(c.key, ConditionKey::RequestHeader(_)))
                        .cloned()
                        .collect(),
                })
                .collect(),
            Action::Allow | Action::Audit => self
                .rules
                .iter()
                .filter(|r| !r.has_http_fields())
                .cloned()
                .collect(),
        };
        Policy {
            rules,
            ..self.clone()
        }
    }
}

/// What a request looks like to authorization. `principal` is the verified peer identity in
/// Istio's form (`cluster.local/ns/prod/sa/order`), None without mTLS.
pub struct Request<'a> {
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub source_ip: IpAddr,
    pub host: &'a str,
    pub port: u16,
    pub method: &'a str,
    /// Normalized path, without the query.
    pub path: &'a str,
    pub header: &'a dyn Fn(&str) -> Option<&'a str>,
}

fn any(p: &[Pattern], v: &str) -> bool {
    p.iter().any(|p| p.matches(v))
}

/// Positive identity match: never for a request without a verified identity.
fn id_in(p: &[Pattern], v: Option<&str>) -> bool {
    v.is_some_and(|v| any(p, v))
}

impl Source {
    fn matches(&self, r: &Request<'_>) -> bool {
        (self.principals.is_empty() || id_in(&self.principals, r.principal))
            && !id_in(&self.not_principals, r.principal)
            && (self.namespaces.is_empty() || id_in(&self.namespaces, r.namespace))
            && !id_in(&self.not_namespaces, r.namespace)
            && (self.ip_blocks.is_empty() || self.ip_blocks.iter().any(|b| b.contains(r.source_ip)))
            && !self.not_ip_blocks.iter().any(|b| b.contains(r.source_ip))
    }
}

fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i) if !host.starts_with('[') && host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => {
            &host[..i]
        }
        _ => host,
    }
}

impl Operation {
    fn matches(&self, r: &Request<'_>) -> bool {
        let host = strip_port(r.host);
        let host_ok = |p: &[Pattern]| p.iter().any(|p| p.matches_ci(host) || p.matches_ci(r.host));
        (self.hosts.is_empty() || host_ok(&self.hosts))
            && !host_ok(&self.not_hosts)
            && (self.ports.is_empty() || self.ports.contains(&r.port))
            && !self.not_ports.contains(&r.port)
            && (self.methods.is_empty() || any(&self.methods, r.method))
            && !any(&self.not_methods, r.method)
            && (self.paths.is_empty() || any(&self.paths, r.path))
            && !any(&self.not_paths, r.path)
    }
}

impl Condition {
    fn matches(&self, r: &Request<'_>) -> bool {
        let v = match &self.key {
            ConditionKey::SourcePrincipal => r.principal,
            ConditionKey::SourceNamespace => r.namespace,
            ConditionKey::RequestHeader(h) => (r.header)(h),
        };
        let identity = !matches!(self.key, ConditionKey::RequestHeader(_));
        let positive = self.values.is_empty()
            || if identity {
                id_in(&self.values, v)
            } else {
                v.is_some_and(|v| any(&self.values, v))
            };
        let negative = v.is_some_and(|v| any(&self.not_values, v));
        positive && !negative
    }
}

impl Rule {
    /// Does the request match this rule (all of from, to and when)?
    pub fn matches(&self, r: &Request<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(r)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(r)))
            && self.when.iter().all(|c| c.matches(r))
    }
}

/// The outcome, with the policy that decided it (for metrics and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The DENY policy that matched, or the ALLOW policy whose rule matched.
    pub policy: Option<String>,
    /// AUDIT policies whose rules matched.
    pub audited: Vec<String>,
}

/// Evaluates `policies` (already narrowed to the workload) in Istio's order.
pub fn evaluate(policies: &[Policy], r: &Request<'_>) -> Decision {
    decide_by(
        policies,
        |p| p,
        |p| p.rules.iter().any(|rule| rule.matches(r)),
    )
}

/// Istio's order over `items` (each holding a policy), where `hit` says whether any rule of an
/// item matches the request — the one place that order is written, for the reference evaluator
/// and for compiled per-core tables alike.
pub fn decide_by<T>(
    items: &[T],
    policy: impl Fn(&T) -> &Policy,
    hit: impl Fn(&T) -> bool,
) -> Decision {
    let policy = &policy;
    let with = |action: Action| items.iter().filter(move |t| policy(t).action == action);
    let audited = with(Action::Audit)
        .filter(|t| hit(t))
        .map(|t| policy(t).name.clone())
        .collect();
    if let Some(t) = with(Action::Deny).find(|t| hit(t)) {
        return Decision {
            allowed: false,
            policy: Some(policy(t).name.clone()),
            audited,
        };
    }
    let mut allows = with(Action::Allow).peekable();
    if allows.peek().is_none() {
        return Decision {
            allowed: true,
            policy: None,
            audited,
        };
    }
    match allows.find(|t| hit(t)) {
        Some(t) => Decision {
            allowed: true,
            policy: Some(policy(t).name.clone()),
            audited,
        },
        None => Decision {
            allowed: false,
            policy: None,
            audited,
        },
    }
}

/// Why a path cannot be authorized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("encoded slash or backslash in path")]
    EncodedSeparator,
    #[error("invalid percent-encoding in path")]
    BadEncoding,
    #[error("path must start with /")]
    NotAbsolute,
    #[error("parameters on a dot segment in path")]
    DotSegmentParameter,
}

/// Normalizes a request path before authorization (the request forwarded must be this one):
/// percent-decodes unreserved characters, rejects `%2F` and `%5C`, merges `//`, and resolves
/// `.` and `..` segments (never above the root).
/// A path that needs no change is returned as it is, without allocating.
pub fn normalize_path(raw: &str) -> Result<std::borrow::Cow<'_, str>, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(raw) {
        return Ok(std::borrow::Cow::Borrowed(raw));
    }
    let bytes = raw.as_bytes();
    let mut decoded: Vec<u8> = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEncoding)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return Err(PathError::BadEncoding);
                }
                let nibble = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
                let v = nibble(hex[0]) << 4 | nibble(hex[1]);
                match v {
                    b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        decoded.push(v)
                    }
                    _ => {
                        decoded.push(b'%');
                        decoded.extend(hex.iter().map(u8::to_ascii_uppercase));
                    }
                }
                i += 3;
            }
            // some servers take a backslash for a slash: refused, like its encoded form
            b'\\' => return Err(PathError::EncodedSeparator),
            b => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    // only unreserved ASCII was decoded, so the bytes are as valid UTF-8 as `raw`
    let decoded = String::from_utf8(decoded).map_err(|_| PathError::BadEncoding)?;
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            // `..;x` is `..` to servers that strip path parameters (Tomcat and friends)
            s if s.starts_with(".;") || s.starts_with("..;") => {
                return Err(PathError::DotSegmentParameter)
            }
            s => out.push(s),
        }
    }
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut path = format!("/{}", out.join("/"));
    if trailing && path != "/" {
        path.push('/');
    }
    Ok(std::borrow::Cow::Owned(path))
}

/// True when `normalize_path` would return `raw` unchanged: nothing encoded, no backslash, and
/// no empty (but the last), `.`, `..` or dot-with-parameters segment.
fn is_normal(raw: &str) -> bool {
    if raw.bytes().any(|b| b == b'%' || b == b'\\') {
        return false;
    }
    let mut segments = raw[1..].split('/').peekable();
    while let Some(s) = segments.next() {
        let last = segments.peek().is_none();
        if (s.is_empty() && !last)
            || s == "."
            || s == ".."
            || s.starts_with(".;")
            || s.starts_with("..;")
        {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Policy {
        let raw: RawPolicySpec = serde_yaml_like(yaml);
        Policy::from_raw("prod", "p", &raw).unwrap_or_else(|e| panic!("{e}"))
    }

    // serde_json is a dependency here; the tests write specs as JSON
    fn serde_yaml_like(json: &str) -> RawPolicySpec {
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"))
    }

    fn req<'a>(
        principal: Option<&'a str>,
        method: &'a str,
        path: &'a str,
        header: &'a dyn Fn(&str) -> Option<&'a str>,
    ) -> Request<'a> {
        Request {
            principal,
            namespace: principal.and_then(|p| p.split('/').nth(2)),
            source_ip: "10.1.2.3".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            host: "checkout.prod.svc.cluster.local:80",
            port: 80,
            method,
            path,
            header,
        }
    }

    const ORDER: &str = "cluster.local/ns/prod/sa/order";
    const OTHER: &str = "cluster.local/ns/prod/sa/other";

    #[test]
    fn on_tcp_http_fields_drop_allow_rules_and_widen_deny_rules() {
        let none = |_: &str| None;
        let tcp = |principal| Request {
            method: "",
            path: "",
            host: "",
            ..req(principal, "", "", &none)
        };
        // ALLOW: the rule naming a path is dropped; the one on identity alone stays
        let allow = policy(
            r#"{"rules": [{"to": [{"operation": {"paths": ["/public/*"]}}]},
                          {"from": [{"source": {"principals": ["cluster.local/ns/prod/sa/order"]}}]}]}"#,
        )
        .for_tcp();
        assert_eq!(allow.rules.len(), 1);
        assert!(evaluate(std::slice::from_ref(&allow), &tcp(Some(ORDER))).allowed);
        assert!(!evaluate(std::slice::from_ref(&allow), &tcp(None)).allowed);
        // an ALLOW policy of HTTP rules only denies every connection
        let http_only = policy(r#"{"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}"#);
        assert!(!evaluate(&[http_only.for_tcp()], &tcp(Some(ORDER))).allowed);
        // DENY: the path is ignored, so the rule denies the caller on any connection
        let deny = policy(
            r#"{"action": "DENY", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/prod/sa/other"]}}],
                                             "to": [{"operation": {"paths": ["/admin"], "ports": ["80"]}}],
                                             "when": [{"key": "request.headers[x-debug]", "values": ["1"]}]}]}"#,
        )
        .for_tcp();
        assert!(!evaluate(std::slice::from_ref(&deny), &tcp(Some(OTHER))).allowed);
        assert!(evaluate(std::slice::from_ref(&deny), &tcp(Some(ORDER))).allowed);
    }

    #[test]
    fn only_order_may_call_checkout() {
        let allow = policy(
            r#"{"action": "ALLOW", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/prod/sa/order"]}}]}]}"#,
        );
        let none = |_: &str| None;
        assert!(
            evaluate(
                std::slice::from_ref(&allow),
                &req(Some(ORDER), "GET", "/", &none)
            )
            .allowed
        );
        assert!(
            !evaluate(
                std::slice::from_ref(&allow),
                &req(Some(OTHER), "GET", "/", &none)
            )
            .allowed
        );
        assert!(
            !evaluate(&[allow], &req(None, "GET", "/", &none)).allowed,
            "plaintext never matches principals"
        );
        assert!(
            evaluate(&[], &req(None, "GET", "/", &none)).allowed,
            "no policy: allow"
        );
    }

    #[test]
    fn deny_overrides_allow_and_empty_allow_denies_all() {
        let none = |_: &str| None;
        let allow_all = policy(r#"{"rules": [{}]}"#);
        let deny_admin = policy(
            r#"{"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}"#,
        );
        let ps = [allow_all, deny_admin];
        assert!(evaluate(&ps, &req(Some(ORDER), "GET", "/pay", &none)).allowed);
        let d = evaluate(&ps, &req(Some(ORDER), "GET", "/admin/x", &none));
        assert!(!d.allowed);
        assert_eq!(d.policy.as_deref(), Some("prod/p"));
        let empty = policy("{}");
        assert!(
            !evaluate(&[empty], &req(Some(ORDER), "GET", "/", &none)).allowed,
            "ALLOW with empty spec denies all"
        );
    }

    #[test]
    fn not_forms_and_plaintext() {
        let none = |_: &str| None;
        let deny_but_order = policy(
            r#"{"action": "DENY", "rules": [{"from": [{"source": {"notPrincipals": ["cluster.local/ns/prod/sa/order"]}}]}]}"#,
        );
        assert!(
            evaluate(
                std::slice::from_ref(&deny_but_order),
                &req(Some(ORDER), "GET", "/", &none)
            )
            .allowed
        );
        assert!(
            !evaluate(
                std::slice::from_ref(&deny_but_order),
                &req(Some(OTHER), "GET", "/", &none)
            )
            .allowed
        );
        assert!(
            !evaluate(&[deny_but_order], &req(None, "GET", "/", &none)).allowed,
            "plaintext is denied too"
        );
        let ns = policy(
            r#"{"rules": [{"from": [{"source": {"namespaces": ["prod"]}}], "to": [{"operation": {"methods": ["GET"], "notPaths": ["/private*"]}}]}]}"#,
        );
        assert!(
            evaluate(
                std::slice::from_ref(&ns),
                &req(Some(ORDER), "GET", "/x", &none)
            )
            .allowed
        );
        assert!(
            !evaluate(
                std::slice::from_ref(&ns),
                &req(Some(ORDER), "POST", "/x", &none)
            )
            .allowed
        );
        assert!(
            !evaluate(
                std::slice::from_ref(&ns),
                &req(Some(ORDER), "GET", "/private/a", &none)
            )
            .allowed
        );
        assert!(
            !evaluate(&[ns], &req(None, "GET", "/x", &none)).allowed,
            "plaintext never matches namespaces"
        );
    }

    #[test]
    fn when_conditions_and_patterns() {
        let p = policy(
            r#"{"rules": [{"when": [{"key": "request.headers[x-tenant]", "values": ["acme-*"]}, {"key": "source.principal", "notValues": ["*/sa/other"]}]}]}"#,
        );
        let acme = |h: &str| (h == "x-tenant").then_some("acme-eu");
        let none = |_: &str| None;
        assert!(
            evaluate(
                std::slice::from_ref(&p),
                &req(Some(ORDER), "GET", "/", &acme)
            )
            .allowed
        );
        assert!(
            !evaluate(
                std::slice::from_ref(&p),
                &req(Some(OTHER), "GET", "/", &acme)
            )
            .allowed
        );
        assert!(!evaluate(&[p], &req(Some(ORDER), "GET", "/", &none)).allowed);
        let hosts = policy(
            r#"{"rules": [{"to": [{"operation": {"hosts": ["*.svc.cluster.local"], "ports": ["80"]}}], "from": [{"source": {"ipBlocks": ["10.1.0.0/16"]}}]}]}"#,
        );
        assert!(evaluate(&[hosts], &req(None, "GET", "/", &none)).allowed);
    }

    #[test]
    fn audit_marks_without_deciding() {
        let none = |_: &str| None;
        let audit = policy(
            r#"{"action": "AUDIT", "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]}"#,
        );
        let d = evaluate(&[audit], &req(Some(ORDER), "DELETE", "/", &none));
        assert!(d.allowed);
        assert_eq!(d.audited, vec!["prod/p".to_string()]);
    }

    #[test]
    fn unsupported_fields_are_errors() {
        for (json, field) in [
            (r#"{"action": "CUSTOM"}"#, "spec.action"),
            (
                r#"{"rules": [{"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}]}"#,
                "spec.rules[0].when[0].key",
            ),
            (
                r#"{"rules": [{"from": [{"source": {"principals": ["spiffe://cluster.local/ns/prod/sa/order"]}}]}]}"#,
                "principals[0]",
            ),
            (
                r#"{"rules": [{"to": [{"operation": {"paths": ["/a*b*"]}}]}]}"#,
                "paths[0]",
            ),
            (
                r#"{"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}"#,
                "ports[0]",
            ),
        ] {
            let raw = serde_yaml_like(json);
            let e = Policy::from_raw("prod", "p", &raw).expect_err(json);
            assert!(e.field.contains(field), "{e} should name {field}");
        }
        assert!(
            serde_json::from_str::<RawPolicySpec>(r#"{"provider": {"name": "x"}}"#).is_err(),
            "unknown fields rejected"
        );
    }

    #[test]
    fn path_normalization() {
        let cases = [
            ("/a/../admin", Ok("/admin")),
            ("//admin", Ok("/admin")),
            ("/%2e%2e/admin", Ok("/admin")),
            ("/a/./b/", Ok("/a/b/")),
            ("/../../x", Ok("/x")),
            ("/%41%62c", Ok("/Abc")),
            ("/a%20b", Ok("/a%20b")),
            ("/a%2Fb", Err(PathError::EncodedSeparator)),
            ("/a%5cb", Err(PathError::EncodedSeparator)),
            ("/a%zz", Err(PathError::BadEncoding)),
            ("/a%2", Err(PathError::BadEncoding)),
            ("admin", Err(PathError::NotAbsolute)),
            ("/a%+5", Err(PathError::BadEncoding)),
            ("/public/..\\admin", Err(PathError::EncodedSeparator)),
            ("/public/..;/admin", Err(PathError::DotSegmentParameter)),
            ("/public/.;x/admin", Err(PathError::DotSegmentParameter)),
            ("/a;b/c", Ok("/a;b/c")),
            ("/caf\u{e9}/%2e/x", Ok("/caf\u{e9}/x")),
        ];
        for (raw, want) in cases {
            assert_eq!(
                normalize_path(raw).as_deref().map_err(Clone::clone),
                want,
                "{raw}"
            );
        }
    }

    #[test]
    fn a_normal_path_is_returned_without_a_copy() {
        for raw in [
            "/",
            "/a",
            "/a/b/",
            "/a;b/c",
            "/caf\u{e9}",
            "/.well-known/x",
            "/a..b",
        ] {
            assert!(
                matches!(normalize_path(raw), Ok(std::borrow::Cow::Borrowed(p)) if p == raw),
                "{raw}"
            );
        }
        for raw in ["//a", "/a/./b", "/a/..", "/%41"] {
            let n = normalize_path(raw);
            assert!(matches!(n, Ok(std::borrow::Cow::Owned(_))), "{raw}: {n:?}");
        }
    }
}
