//! HTTP route matching, compiled per core from a snapshot's listener routes.
//!
//! Host selection follows Envoy's virtual-host order: an exact host first, then the longest
//! `*.suffix`, then `*`; within the chosen host, routes are tried in file order. Plain Rust, no
//! runtime types: unit-tested and benchmarked directly.

use std::collections::HashMap;

use crate::snapshot::{HostMatch, PathMatch, Route};

/// A route table for one HTTP listener; the value `T` is what a match yields (a cluster index).
#[derive(Debug)]
pub struct RouteTable<T> {
    exact: HashMap<String, Vec<(PathMatch, T)>>,
    /// Sorted by suffix length, longest first.
    suffix: Vec<(String, Vec<(PathMatch, T)>)>,
    any: Vec<(PathMatch, T)>,
}

impl<T: Clone> RouteTable<T> {
    /// Compiles routes; `resolve` maps a cluster name to the value a match returns.
    pub fn compile(routes: &[Route], mut resolve: impl FnMut(&str) -> T) -> Self {
        let mut exact: HashMap<String, Vec<(PathMatch, T)>> = HashMap::new();
        let mut suffix: Vec<(String, Vec<(PathMatch, T)>)> = Vec::new();
        let mut any = Vec::new();
        for r in routes {
            let target = resolve(&r.cluster);
            for h in &r.hosts {
                let entry = (r.path.clone(), target.clone());
                match h {
                    HostMatch::Any => any.push(entry),
                    HostMatch::Exact(name) => exact.entry(name.clone()).or_default().push(entry),
                    HostMatch::Suffix(s) => match suffix.iter_mut().find(|(k, _)| k == s) {
                        Some((_, v)) => v.push(entry),
                        None => suffix.push((s.clone(), vec![entry])),
                    },
                }
            }
        }
        suffix.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        RouteTable { exact, suffix, any }
    }

    /// Every target the table can yield.
    pub fn targets(&self) -> impl Iterator<Item = &T> {
        self.exact
            .values()
            .chain(self.suffix.iter().map(|(_, v)| v))
            .chain(std::iter::once(&self.any))
            .flatten()
            .map(|(_, t)| t)
    }

    /// Finds the target for a request. `host` is the Host header (any case, port allowed);
    /// `path` is the request path without the query.
    pub fn find(&self, host: &str, path: &str) -> Option<&T> {
        let host = strip_port(host);
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        let candidates = self
            .exact
            .get(host)
            .or_else(|| {
                self.suffix
                    .iter()
                    .find(|(s, _)| host.len() > s.len() && host.ends_with(s.as_str()))
                    .map(|(_, v)| v)
            })
            .unwrap_or(&self.any);
        candidates
            .iter()
            .find(|(m, _)| match m {
                PathMatch::Exact(p) => path == p,
                PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            })
            .map(|(_, t)| t)
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(hosts: &[HostMatch], path: PathMatch, cluster: &str) -> Route {
        Route {
            hosts: hosts.to_vec(),
            path,
            cluster: cluster.into(),
        }
    }

    #[test]
    fn host_precedence_then_path_order() {
        let routes = vec![
            route(&[HostMatch::Any], PathMatch::Prefix("/".into()), "default"),
            route(
                &[HostMatch::Suffix(".example.com".into())],
                PathMatch::Prefix("/".into()),
                "wild",
            ),
            route(
                &[HostMatch::Suffix(".api.example.com".into())],
                PathMatch::Prefix("/".into()),
                "wild-api",
            ),
            route(
                &[HostMatch::Exact("www.example.com".into())],
                PathMatch::Exact("/login".into()),
                "login",
            ),
            route(
                &[HostMatch::Exact("www.example.com".into())],
                PathMatch::Prefix("/static/".into()),
                "static",
            ),
        ];
        let t = RouteTable::compile(&routes, |c| c.to_string());
        let cases = [
            ("www.example.com", "/login", Some("login")),
            ("WWW.Example.COM:8080", "/static/a.css", Some("static")),
            ("www.example.com", "/other", None),
            ("shop.example.com", "/", Some("wild")),
            ("v1.api.example.com", "/", Some("wild-api")),
            ("example.com", "/", Some("default")),
            ("10.0.0.1:80", "/x", Some("default")),
            ("[::1]:80", "/x", Some("default")),
        ];
        for (host, path, want) in cases {
            assert_eq!(t.find(host, path).map(String::as_str), want, "{host}{path}");
        }
    }
}
