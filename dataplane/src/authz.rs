//! Per-core authorization: a workload's policies compiled into lookup tables, with a decision
//! cache, recompiled on each snapshot. Plain Rust (no runtime types): benchmarked directly by
//! `weft-bench authz`.
//!
//! Rules are indexed by the exact principals they name, so a request looks at the rules for
//! its caller plus the rules that do not depend on an exact principal, instead of every rule.
//! Decisions are cached per (caller, host, port, method, path) when no applicable rule reads
//! request headers (those decisions depend on more than the key).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use weft_api::authz::{decide_by, ConditionKey, Decision, Pattern, Policy, Request};

/// Decisions kept per core before the cache is cleared (bounded memory, no LRU bookkeeping).
const CACHE_ENTRIES: usize = 65_536;

/// (caller, host, port, method, path).
type CacheKey = (Option<String>, String, u16, String, String);
/// A cached decision, shared with every request that hits it.
type Cached = (CacheKey, Rc<Decision>);

/// One policy, split so that its rules are reachable through the principal index.
struct Indexed {
    policy: Policy,
    /// principal → rules of `policy` that name it exactly.
    by_principal: HashMap<String, Vec<usize>>,
    /// Rules that must be checked whatever the caller is.
    generic: Vec<usize>,
}

pub struct Compiled {
    policies: Vec<Indexed>,
    cacheable: bool,
    /// Request headers some rule reads (`when: request.headers[...]`), lowercase.
    headers: Vec<String>,
    /// hash of the key → entries with that hash (collisions are compared field by field).
    cache: RefCell<HashMap<u64, Vec<Cached>>>,
}

impl Compiled {
    pub fn new(policies: &[Policy]) -> Compiled {
        let mut cacheable = true;
        let indexed = policies
            .iter()
            .map(|p| {
                let mut by_principal: HashMap<String, Vec<usize>> = HashMap::new();
                let mut generic = Vec::new();
                for (i, r) in p.rules.iter().enumerate() {
                    if r.when
                        .iter()
                        .any(|c| matches!(c.key, ConditionKey::RequestHeader(_)))
                        || r.from
                            .iter()
                            .any(|s| !s.ip_blocks.is_empty() || !s.not_ip_blocks.is_empty())
                    {
                        cacheable = false;
                    }
                    // a rule is reachable by principal only if every source names exact principals
                    let exact: Option<Vec<&str>> = if r.from.is_empty() {
                        None
                    } else {
                        r.from
                            .iter()
                            .map(|s| {
                                if s.principals.is_empty() {
                                    return None;
                                }
                                s.principals
                                    .iter()
                                    .map(|p| match p {
                                        Pattern::Exact(e) => Some(e.as_str()),
                                        _ => None,
                                    })
                                    .collect::<Option<Vec<&str>>>()
                            })
                            .collect::<Option<Vec<Vec<&str>>>>()
                            .map(|v| v.concat())
                    };
                    match exact {
                        Some(names) => {
                            for n in names {
                                let e = by_principal.entry(n.to_string()).or_default();
                                if e.last() != Some(&i) {
                                    e.push(i);
                                }
                            }
                        }
                        None => generic.push(i),
                    }
                }
                Indexed {
                    policy: p.clone(),
                    by_principal,
                    generic,
                }
            })
            .collect();
        let mut headers: Vec<String> = policies
            .iter()
            .flat_map(|p| &p.rules)
            .flat_map(|r| &r.when)
            .filter_map(|c| match &c.key {
                ConditionKey::RequestHeader(h) => Some(h.to_ascii_lowercase()),
                _ => None,
            })
            .collect();
        headers.sort();
        headers.dedup();
        Compiled {
            policies: indexed,
            cacheable,
            headers,
            cache: RefCell::new(HashMap::new()),
        }
    }

    /// The request headers the rules read (lowercase), to be gathered for `Request::header`.
    pub fn header_names(&self) -> &[String] {
        &self.headers
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The decision for `r`, from the cache when possible (a hit allocates nothing).
    pub fn decide(&self, r: &Request<'_>) -> Rc<Decision> {
        if !self.cacheable {
            return Rc::new(self.evaluate(r));
        }
        // look up by a hash of the borrowed fields; allocate the owned key only on a miss
        let hash = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (r.principal, r.host, r.port, r.method, r.path).hash(&mut h);
            h.finish()
        };
        let same = |k: &CacheKey| {
            k.0.as_deref() == r.principal
                && k.1 == r.host
                && k.2 == r.port
                && k.3 == r.method
                && k.4 == r.path
        };
        if let Some((_, d)) = self
            .cache
            .borrow()
            .get(&hash)
            .and_then(|v| v.iter().find(|(k, _)| same(k)))
        {
            return d.clone();
        }
        let d = Rc::new(self.evaluate(r));
        let mut cache = self.cache.borrow_mut();
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        let key = (
            r.principal.map(str::to_string),
            r.host.to_string(),
            r.port,
            r.method.to_string(),
            r.path.to_string(),
        );
        cache.entry(hash).or_default().push((key, d.clone()));
        d
    }

    /// Evaluation without the cache, through the principal index, in Istio's order (the same
    /// as `weft_api::authz::evaluate`, which the tests compare against).
    pub fn evaluate(&self, r: &Request<'_>) -> Decision {
        decide_by(
            &self.policies,
            |ix| &ix.policy,
            |ix| {
                let by_name = r
                    .principal
                    .and_then(|n| ix.by_principal.get(n))
                    .map_or(&[][..], Vec::as_slice);
                ix.generic
                    .iter()
                    .chain(by_name)
                    .any(|i| ix.policy.rules[*i].matches(r))
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::authz::RawPolicySpec;

    fn policy(json: &str) -> Policy {
        let raw: RawPolicySpec = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
        Policy::from_raw("prod", "p", &raw).unwrap_or_else(|e| panic!("{e}"))
    }

    fn req<'a>(
        principal: Option<&'a str>,
        path: &'a str,
        h: &'a dyn Fn(&str) -> Option<&'a str>,
    ) -> Request<'a> {
        Request {
            principal,
            namespace: principal.and_then(|p| p.split('/').nth(2)),
            source_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            host: "checkout",
            port: 80,
            method: "GET",
            path,
            header: h,
        }
    }

    #[test]
    fn compiled_and_cached_agree_with_the_reference_evaluator() {
        let mut rules = String::new();
        for i in 0..200 {
            rules.push_str(&format!(r#"{{"from": [{{"source": {{"principals": ["cluster.local/ns/prod/sa/sa-{i}"]}}}}], "to": [{{"operation": {{"paths": ["/p{i}*"]}}}}]}},"#));
        }
        rules.push_str(r#"{"from": [{"source": {"namespaces": ["ops"]}}]}"#);
        let allow = policy(&format!(r#"{{"rules": [{rules}]}}"#));
        let deny = policy(
            r#"{"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}"#,
        );
        let policies = vec![allow, deny];
        let c = Compiled::new(&policies);
        let none = |_: &str| None;
        let callers = [
            Some("cluster.local/ns/prod/sa/sa-7"),
            Some("cluster.local/ns/ops/sa/x"),
            Some("cluster.local/ns/prod/sa/zz"),
            None,
        ];
        for caller in callers {
            for path in ["/p7/x", "/p8", "/admin/a", "/"] {
                let r = req(caller, path, &none);
                let want = weft_api::authz::evaluate(&policies, &r).allowed;
                assert_eq!(c.evaluate(&r).allowed, want, "{caller:?} {path}");
                assert_eq!(c.decide(&r).allowed, want, "{caller:?} {path} (cache miss)");
                assert_eq!(c.decide(&r).allowed, want, "{caller:?} {path} (cache hit)");
            }
        }
    }

    #[test]
    fn header_conditions_disable_the_cache() {
        let p = policy(
            r#"{"rules": [{"when": [{"key": "request.headers[x-ok]", "values": ["yes"]}]}]}"#,
        );
        let c = Compiled::new(&[p]);
        let yes = |h: &str| (h == "x-ok").then_some("yes");
        let no = |_: &str| None;
        assert!(c.decide(&req(None, "/", &yes)).allowed);
        assert!(
            !c.decide(&req(None, "/", &no)).allowed,
            "same key, other header: not served from a cache"
        );
    }
}
