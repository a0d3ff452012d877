//! Static configuration: the YAML file of `weft-proxy --config FILE`.
//!
//! Raw serde structs (unknown fields are errors) are turned into a validated [`Snapshot`] once,
//! here; the rest of the proxy never sees YAML. Every error names the file, the field path and
//! the reason.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

use crate::snapshot::{
    parse_duration, Cluster, HostMatch, Limits, Listener, ListenerKind, PathMatch, Route, Snapshot,
};

/// A configuration error: `FILE: FIELD: REASON`.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {field}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub field: String,
    pub reason: String,
}

/// The top of the static file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Listeners to bind on every core.
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    /// Upstream clusters referenced by routes and TCP listeners.
    #[serde(default)]
    pub clusters: Vec<RawCluster>,
    /// Limits and timeouts; every field has a safe default.
    #[serde(default)]
    pub limits: RawLimits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    /// Unique name, used as the `listener` label in metrics.
    pub name: String,
    /// `IP:PORT` to bind (SO_REUSEPORT, one socket per core).
    pub address: String,
    /// `http` or `tcp`.
    pub protocol: String,
    /// HTTP only: routes, first match wins.
    #[serde(default)]
    pub routes: Option<Vec<RawRoute>>,
    /// TCP only: the cluster to forward to.
    #[serde(default)]
    pub cluster: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Host patterns: `*`, `api.example.com` or `*.example.com`. Default `["*"]`.
    #[serde(default)]
    pub hosts: Option<Vec<String>>,
    /// Path prefix match (mutually exclusive with `exact`). Default `/`.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Exact path match (the query string is not part of the path).
    #[serde(default)]
    pub exact: Option<String>,
    /// Target cluster name.
    pub cluster: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub name: String,
    /// `IP:PORT` endpoints, balanced round robin per core. May be empty (requests get 503).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Upstream connect timeout. Default `5s`.
    #[serde(default)]
    pub connect_timeout: Option<String>,
    /// Upstream connections per core before requests get 503 (overflow). Default 1024.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Idle pooled connections kept per endpoint per core. Default 64.
    #[serde(default)]
    pub max_idle_per_endpoint: Option<usize>,
    /// How long an idle pooled connection is kept. Default `30s`.
    #[serde(default)]
    pub idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Bytes of request line + headers before 431. Default 61440 (60 KiB).
    pub max_request_header_bytes: Option<usize>,
    /// Request header count before 431. Default 100.
    pub max_request_headers: Option<usize>,
    /// Time to receive a complete request head before 408. Default `10s`.
    pub header_read_timeout: Option<String>,
    /// Idle time between requests on a keep-alive connection. Default `60s`.
    pub keepalive_idle_timeout: Option<String>,
    /// Time from a complete request head to the end of the response head. Default `15s`.
    pub request_timeout: Option<String>,
    /// TCP proxy idle time (no bytes either way) before both sides close. Default `1h`.
    pub tcp_idle_timeout: Option<String>,
    /// Downstream connections per core; more are closed at accept. Default 16384.
    pub max_connections_per_core: Option<usize>,
    /// Per-connection I/O buffer, bytes. Default 16384.
    pub buffer_bytes: Option<usize>,
}

/// Default upstream connect timeout (Envoy uses 5 s as well).
pub const DEFAULT_CONNECT_TIMEOUT: &str = "5s";
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
pub const DEFAULT_MAX_IDLE: usize = 64;
pub const DEFAULT_UPSTREAM_IDLE: &str = "30s";

/// Reads and validates a static configuration file.
pub fn load_file(path: &Path, version: u64) -> Result<Snapshot, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        field: "-".into(),
        reason: format!("cannot read: {e}"),
    })?;
    parse(&file, &text, version)
}

/// Parses YAML text into a validated snapshot; `file` is used in error messages.
pub fn parse(file: &str, text: &str, version: u64) -> Result<Snapshot, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ConfigError {
            file: file.to_string(),
            field: if path == "." { "-".into() } else { path },
            reason: e.into_inner().to_string(),
        }
    })?;
    validate(file, raw, version)
}

struct Ctx<'a> {
    file: &'a str,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn duration(
        &self,
        field: String,
        v: &Option<String>,
        default: &str,
    ) -> Result<std::time::Duration, ConfigError> {
        let text = v.as_deref().unwrap_or(default);
        let d = parse_duration(text).map_err(|r| self.err(&field, r))?;
        if d.is_zero() {
            return Err(self.err(field, "must be greater than zero"));
        }
        Ok(d)
    }

    fn positive(
        &self,
        field: &str,
        v: Option<usize>,
        default: usize,
    ) -> Result<usize, ConfigError> {
        match v {
            Some(0) => Err(self.err(field, "must be greater than zero")),
            Some(n) => Ok(n),
            None => Ok(default),
        }
    }
}

fn validate(file: &str, raw: RawConfig, version: u64) -> Result<Snapshot, ConfigError> {
    let cx = Ctx { file };
    let limits = validate_limits(&cx, &raw.limits)?;

    let mut clusters = BTreeMap::new();
    for (i, c) in raw.clusters.iter().enumerate() {
        let at = |f: &str| format!("clusters[{i}].{f}");
        if c.name.trim().is_empty() {
            return Err(cx.err(at("name"), "must not be empty"));
        }
        let mut endpoints = Vec::with_capacity(c.endpoints.len());
        for (j, e) in c.endpoints.iter().enumerate() {
            let addr: SocketAddr = e.parse().map_err(|_| {
                cx.err(
                    at(&format!("endpoints[{j}]")),
                    format!("`{e}` is not an IP:PORT address"),
                )
            })?;
            endpoints.push(addr);
        }
        let cluster = Cluster {
            name: c.name.clone(),
            endpoints,
            identities: Vec::new(),
            connect_timeout: cx.duration(
                at("connect_timeout"),
                &c.connect_timeout,
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            max_connections: cx.positive(
                &at("max_connections"),
                c.max_connections,
                DEFAULT_MAX_CONNECTIONS,
            )?,
            max_idle_per_endpoint: c.max_idle_per_endpoint.unwrap_or(DEFAULT_MAX_IDLE),
            idle_timeout: cx.duration(
                at("idle_timeout"),
                &c.idle_timeout,
                DEFAULT_UPSTREAM_IDLE,
            )?,
        };
        if clusters.insert(c.name.clone(), cluster).is_some() {
            return Err(cx.err(at("name"), format!("duplicate cluster name `{}`", c.name)));
        }
    }

    let mut names = HashSet::new();
    let mut addrs = HashSet::new();
    let mut listeners = Vec::with_capacity(raw.listeners.len());
    for (i, l) in raw.listeners.iter().enumerate() {
        let at = |f: &str| format!("listeners[{i}].{f}");
        if l.name.trim().is_empty() {
            return Err(cx.err(at("name"), "must not be empty"));
        }
        if !names.insert(l.name.clone()) {
            return Err(cx.err(at("name"), format!("duplicate listener name `{}`", l.name)));
        }
        let address: SocketAddr = l.address.parse().map_err(|_| {
            cx.err(
                at("address"),
                format!("`{}` is not an IP:PORT address", l.address),
            )
        })?;
        if !addrs.insert(address) {
            return Err(cx.err(
                at("address"),
                format!("address {address} is used by another listener"),
            ));
        }
        let cluster_ref = |field: String, name: &str| -> Result<String, ConfigError> {
            if clusters.contains_key(name) {
                Ok(name.to_string())
            } else {
                Err(cx.err(field, format!("unknown cluster `{name}`")))
            }
        };
        let kind = match l.protocol.as_str() {
            "http" => {
                if l.cluster.is_some() {
                    return Err(cx.err(
                        at("cluster"),
                        "an http listener routes with `routes`, not `cluster`",
                    ));
                }
                let raw_routes = match &l.routes {
                    Some(r) if !r.is_empty() => r,
                    _ => {
                        return Err(
                            cx.err(at("routes"), "an http listener needs at least one route")
                        )
                    }
                };
                let mut routes = Vec::with_capacity(raw_routes.len());
                for (j, r) in raw_routes.iter().enumerate() {
                    let rat = |f: &str| at(&format!("routes[{j}].{f}"));
                    routes.push(Route {
                        hosts: validate_hosts(&cx, &rat("hosts"), r.hosts.as_deref())?,
                        path: validate_path(&cx, &rat(""), r)?,
                        cluster: cluster_ref(rat("cluster"), &r.cluster)?,
                    });
                }
                ListenerKind::Http { routes }
            }
            "tcp" => {
                if l.routes.is_some() {
                    return Err(cx.err(
                        at("routes"),
                        "a tcp listener forwards to `cluster`, it has no routes",
                    ));
                }
                let Some(c) = &l.cluster else {
                    return Err(cx.err(at("cluster"), "a tcp listener needs a cluster"));
                };
                ListenerKind::Tcp {
                    cluster: cluster_ref(at("cluster"), c)?,
                }
            }
            other => {
                return Err(cx.err(at("protocol"), format!("`{other}` is not one of http, tcp")))
            }
        };
        listeners.push(Listener {
            name: l.name.clone(),
            address,
            kind,
            mtls: None,
        });
    }

    Ok(Snapshot {
        version,
        source: file.to_string(),
        listeners,
        clusters,
        limits,
        workload: None,
        authz: Vec::new(),
        peer_authentications: Vec::new(),
    })
}

fn validate_limits(cx: &Ctx<'_>, l: &RawLimits) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    let dur = |f: &str, v: &Option<String>, def: std::time::Duration| {
        cx.duration(
            format!("limits.{f}"),
            v,
            &crate::snapshot::format_duration(def),
        )
    };
    let limits = Limits {
        max_request_header_bytes: cx.positive(
            "limits.max_request_header_bytes",
            l.max_request_header_bytes,
            d.max_request_header_bytes,
        )?,
        max_request_headers: cx.positive(
            "limits.max_request_headers",
            l.max_request_headers,
            d.max_request_headers,
        )?,
        header_read_timeout: dur(
            "header_read_timeout",
            &l.header_read_timeout,
            d.header_read_timeout,
        )?,
        keepalive_idle_timeout: dur(
            "keepalive_idle_timeout",
            &l.keepalive_idle_timeout,
            d.keepalive_idle_timeout,
        )?,
        request_timeout: dur("request_timeout", &l.request_timeout, d.request_timeout)?,
        tcp_idle_timeout: dur("tcp_idle_timeout", &l.tcp_idle_timeout, d.tcp_idle_timeout)?,
        max_connections_per_core: cx.positive(
            "limits.max_connections_per_core",
            l.max_connections_per_core,
            d.max_connections_per_core,
        )?,
        buffer_bytes: cx.positive("limits.buffer_bytes", l.buffer_bytes, d.buffer_bytes)?,
    };
    // A buffer below 1 KiB makes every body a syscall storm; above 1 MiB defeats the bound.
    if !(1024..=1024 * 1024).contains(&limits.buffer_bytes) {
        return Err(cx.err("limits.buffer_bytes", "must be between 1024 and 1048576"));
    }
    if limits.max_request_header_bytes > 1024 * 1024 {
        return Err(cx.err("limits.max_request_header_bytes", "must be at most 1048576"));
    }
    Ok(limits)
}

fn validate_hosts(
    cx: &Ctx<'_>,
    field: &str,
    hosts: Option<&[String]>,
) -> Result<Vec<HostMatch>, ConfigError> {
    let Some(hosts) = hosts else {
        return Ok(vec![HostMatch::Any]);
    };
    if hosts.is_empty() {
        return Err(cx.err(field, "must not be empty (omit it to match any host)"));
    }
    let valid = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    };
    hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let h = h.to_ascii_lowercase();
            if h == "*" {
                Ok(HostMatch::Any)
            } else if let Some(rest) = h.strip_prefix("*.") {
                if valid(rest) {
                    Ok(HostMatch::Suffix(format!(".{rest}")))
                } else {
                    Err(cx.err(
                        format!("{field}[{i}]"),
                        format!("`{h}` is not a valid wildcard host"),
                    ))
                }
            } else if valid(&h) {
                Ok(HostMatch::Exact(h))
            } else {
                Err(cx.err(
                    format!("{field}[{i}]"),
                    format!("`{h}` is not a valid host (use `*`, `name` or `*.suffix`)"),
                ))
            }
        })
        .collect()
}

fn validate_path(cx: &Ctx<'_>, at: &str, r: &RawRoute) -> Result<PathMatch, ConfigError> {
    let check = |f: &str, p: &str| {
        if p.starts_with('/')
            && !p.contains('?')
            && !p.bytes().any(|b| b.is_ascii_control() || b == b' ')
        {
            Ok(p.to_string())
        } else {
            Err(cx.err(
                format!("{at}{f}"),
                format!("`{p}` must start with `/` and hold no query, space or control characters"),
            ))
        }
    };
    match (&r.prefix, &r.exact) {
        (Some(_), Some(_)) => Err(cx.err(
            format!("{at}exact"),
            "set either `prefix` or `exact`, not both",
        )),
        (Some(p), None) => Ok(PathMatch::Prefix(check("prefix", p)?)),
        (None, Some(p)) => Ok(PathMatch::Exact(check("exact", p)?)),
        (None, None) => Ok(PathMatch::Prefix("/".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listeners:
  - name: web
    address: 127.0.0.1:15001
    protocol: http
    routes:
      - hosts: ["api.example.com"]
        prefix: /v1
        cluster: api
      - cluster: web
  - name: db
    address: 127.0.0.1:15002
    protocol: tcp
    cluster: api
clusters:
  - name: api
    endpoints: ["127.0.0.1:9000", "127.0.0.1:9001"]
    connect_timeout: 250ms
  - name: web
    endpoints: []
limits:
  header_read_timeout: 3s
"#;

    #[test]
    fn good_file_validates() {
        let s = parse("t.yaml", GOOD, 7).expect("valid");
        assert_eq!(s.version, 7);
        assert_eq!(s.listeners.len(), 2);
        assert_eq!(s.clusters["api"].endpoints.len(), 2);
        assert_eq!(s.clusters["api"].connect_timeout.as_millis(), 250);
        assert_eq!(s.limits.header_read_timeout.as_secs(), 3);
        assert_eq!(s.limits.max_request_headers, 100);
        match &s.listeners[0].kind {
            ListenerKind::Http { routes } => {
                assert_eq!(
                    routes[0].hosts,
                    vec![HostMatch::Exact("api.example.com".into())]
                );
                assert_eq!(routes[1].path, PathMatch::Prefix("/".into()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_file_field_and_reason() {
        let cases = [
            (
                GOOD.replace("127.0.0.1:15002", "nowhere"),
                "listeners[1].address",
                "not an IP:PORT",
            ),
            (
                GOOD.replace("cluster: web", "cluster: nope"),
                "listeners[0].routes[1].cluster",
                "unknown cluster `nope`",
            ),
            (
                GOOD.replace("protocol: tcp", "protocol: udp"),
                "listeners[1].protocol",
                "`udp`",
            ),
            (
                GOOD.replace("250ms", "fast"),
                "clusters[0].connect_timeout",
                "not a duration",
            ),
            (
                GOOD.replace("header_read_timeout", "header_reed_timeout"),
                "limits",
                "unknown field",
            ),
            (
                GOOD.replace("name: db", "name: web"),
                "listeners[1].name",
                "duplicate",
            ),
            (
                GOOD.replace("api.example.com", "api example"),
                "listeners[0].routes[0].hosts[0]",
                "not a valid host",
            ),
            (
                GOOD.replace("prefix: /v1", "prefix: v1"),
                "listeners[0].routes[0].prefix",
                "must start with `/`",
            ),
        ];
        for (text, field, reason) in cases {
            let err = parse("t.yaml", &text, 1).expect_err(field);
            let msg = err.to_string();
            assert!(msg.starts_with("t.yaml: "), "{msg}");
            assert!(msg.contains(field), "{msg} should name {field}");
            assert!(msg.contains(reason), "{msg} should say {reason}");
        }
    }
}
