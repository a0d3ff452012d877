//! Per-core counters (plain `Cell`s, never shared across cores) and the Prometheus text that
//! the agent renders after gathering every core's report by message.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::Duration;

/// Request-duration histogram bucket upper bounds, seconds.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Counters of one listener on one core.
#[derive(Default)]
pub struct ListenerCounters {
    /// Responses by status class: index 0 = 1xx … 4 = 5xx.
    pub responses: [Cell<u64>; 5],
    pub bytes_in: Cell<u64>,
    pub bytes_out: Cell<u64>,
    pub connections: Cell<u64>,
    pub active: Cell<u64>,
    /// Connections closed at accept because the per-core cap was reached.
    pub rejected: Cell<u64>,
    /// Requests refused for bad input, by status (400, 408, 431, 501).
    pub bad_requests: RefCell<BTreeMap<u16, u64>>,
}

/// Counters of one upstream cluster on one core.
#[derive(Default)]
pub struct ClusterCounters {
    pub connect_errors: Cell<u64>,
    pub timeouts: Cell<u64>,
    pub overflow: Cell<u64>,
    pub requests: Cell<u64>,
}

fn inc(c: &Cell<u64>, by: u64) {
    c.set(c.get().wrapping_add(by));
}

impl ListenerCounters {
    pub fn response(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        inc(&self.responses[class], 1);
    }
    pub fn bad_request(&self, status: u16) {
        *self.bad_requests.borrow_mut().entry(status).or_default() += 1;
    }
    pub fn add_in(&self, n: u64) {
        inc(&self.bytes_in, n);
    }
    pub fn add_out(&self, n: u64) {
        inc(&self.bytes_out, n);
    }
    pub fn opened(&self) {
        inc(&self.connections, 1);
        inc(&self.active, 1);
    }
    pub fn closed(&self) {
        self.active.set(self.active.get().saturating_sub(1));
    }
    pub fn reject(&self) {
        inc(&self.rejected, 1);
    }

    fn report(&self) -> ListenerReport {
        ListenerReport {
            responses: std::array::from_fn(|i| self.responses[i].get()),
            bytes_in: self.bytes_in.get(),
            bytes_out: self.bytes_out.get(),
            connections: self.connections.get(),
            active: self.active.get(),
            rejected: self.rejected.get(),
            bad_requests: self.bad_requests.borrow().clone(),
        }
    }
}

impl ClusterCounters {
    pub fn connect_error(&self) {
        inc(&self.connect_errors, 1);
    }
    pub fn timeout(&self) {
        inc(&self.timeouts, 1);
    }
    pub fn overflowed(&self) {
        inc(&self.overflow, 1);
    }
    pub fn request(&self) {
        inc(&self.requests, 1);
    }
}

/// One core's metrics registry.
#[derive(Default)]
pub struct CoreMetrics {
    listeners: RefCell<BTreeMap<String, Rc<ListenerCounters>>>,
    clusters: RefCell<BTreeMap<String, Rc<ClusterCounters>>>,
    requests: Cell<u64>,
    buckets: [Cell<u64>; DURATION_BUCKETS.len()],
    duration_sum_us: Cell<u64>,
    /// (side, full|resumed) → handshakes.
    handshakes: RefCell<BTreeMap<(&'static str, &'static str), u64>>,
    /// (side, reason) → failed handshakes.
    handshake_failures: RefCell<BTreeMap<(&'static str, &'static str), u64>>,
    /// policy ("" when no policy decided) → [allow, deny, audit].
    authz: RefCell<std::collections::HashMap<String, [u64; 3]>>,
}

impl CoreMetrics {
    /// The counters of a listener (created on first use; kept across reloads so they stay monotonic).
    pub fn listener(&self, name: &str) -> Rc<ListenerCounters> {
        self.listeners
            .borrow_mut()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    pub fn cluster(&self, name: &str) -> Rc<ClusterCounters> {
        // a snapshot recompiles every cluster: look up before allocating a key
        if let Some(c) = self.clusters.borrow().get(name) {
            return c.clone();
        }
        self.clusters
            .borrow_mut()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    pub fn request_done(&self, elapsed: Duration) {
        inc(&self.requests, 1);
        let secs = elapsed.as_secs_f64();
        if let Some(i) = DURATION_BUCKETS.iter().position(|b| secs <= *b) {
            inc(&self.buckets[i], 1);
        }
        inc(&self.duration_sum_us, elapsed.as_micros() as u64);
    }

    pub fn handshake(&self, side: &'static str, resumed: bool) {
        let kind = if resumed { "resumed" } else { "full" };
        *self
            .handshakes
            .borrow_mut()
            .entry((side, kind))
            .or_default() += 1;
    }

    pub fn handshake_failed(&self, side: &'static str, reason: &'static str) {
        *self
            .handshake_failures
            .borrow_mut()
            .entry((side, reason))
            .or_default() += 1;
    }

    /// Counts an authorization decision under the policy that made it, and each AUDIT match.
    pub fn authz(&self, d: &weft_api::authz::Decision) {
        let mut m = self.authz.borrow_mut();
        let mut count = |name: &str, slot: usize| match m.get_mut(name) {
            Some(v) => v[slot] += 1,
            None => {
                let mut v = [0; 3];
                v[slot] = 1;
                m.insert(name.to_string(), v);
            }
        };
        count(
            d.policy.as_deref().unwrap_or(""),
            if d.allowed { 0 } else { 1 },
        );
        for a in &d.audited {
            count(a, 2);
        }
    }

    pub fn report(&self, core: usize, version: u64) -> CoreReport {
        CoreReport {
            handshakes: self.handshakes.borrow().clone(),
            handshake_failures: self.handshake_failures.borrow().clone(),
            authz: self
                .authz
                .borrow()
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            core,
            version,
            requests: self.requests.get(),
            buckets: std::array::from_fn(|i| self.buckets[i].get()),
            duration_sum_us: self.duration_sum_us.get(),
            listeners: self
                .listeners
                .borrow()
                .iter()
                .map(|(k, v)| (k.clone(), v.report()))
                .collect(),
            clusters: self
                .clusters
                .borrow()
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        ClusterReport {
                            connect_errors: v.connect_errors.get(),
                            timeouts: v.timeouts.get(),
                            overflow: v.overflow.get(),
                            requests: v.requests.get(),
                        },
                    )
                })
                .collect(),
        }
    }
}

/// Plain-data copies sent from a core to the agent when metrics are scraped.
#[derive(Debug, Clone, Default)]
pub struct ListenerReport {
    pub responses: [u64; 5],
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub connections: u64,
    pub active: u64,
    pub rejected: u64,
    pub bad_requests: BTreeMap<u16, u64>,
}

#[derive(Debug, Clone, Default)]
pub struct ClusterReport {
    pub connect_errors: u64,
    pub timeouts: u64,
    pub overflow: u64,
    pub requests: u64,
}

#[derive(Debug, Clone)]
pub struct CoreReport {
    pub core: usize,
    pub version: u64,
    pub requests: u64,
    /// Non-cumulative bucket counts (`DURATION_BUCKETS`); the rest went over the last bound.
    pub buckets: [u64; DURATION_BUCKETS.len()],
    pub duration_sum_us: u64,
    pub listeners: BTreeMap<String, ListenerReport>,
    pub clusters: BTreeMap<String, ClusterReport>,
    pub handshakes: BTreeMap<(&'static str, &'static str), u64>,
    pub handshake_failures: BTreeMap<(&'static str, &'static str), u64>,
    pub authz: BTreeMap<String, [u64; 3]>,
}

/// Renders the Prometheus text exposition of all cores' reports.
pub fn render(reports: &[CoreReport], extra: &str) -> String {
    let mut out = String::new();
    let mut listeners: BTreeMap<&str, ListenerReport> = BTreeMap::new();
    let mut clusters: BTreeMap<&str, ClusterReport> = BTreeMap::new();
    for r in reports {
        for (name, l) in &r.listeners {
            let t = listeners.entry(name).or_default();
            for i in 0..5 {
                t.responses[i] += l.responses[i];
            }
            t.bytes_in += l.bytes_in;
            t.bytes_out += l.bytes_out;
            t.connections += l.connections;
            t.active += l.active;
            t.rejected += l.rejected;
            for (s, n) in &l.bad_requests {
                *t.bad_requests.entry(*s).or_default() += n;
            }
        }
        for (name, c) in &r.clusters {
            let t = clusters.entry(name).or_default();
            t.connect_errors += c.connect_errors;
            t.timeouts += c.timeouts;
            t.overflow += c.overflow;
            t.requests += c.requests;
        }
    }
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    };
    let per_listener = |f: &dyn Fn(&ListenerReport) -> u64| -> Vec<(String, String)> {
        listeners
            .iter()
            .map(|(n, l)| (format!("listener=\"{n}\""), f(l).to_string()))
            .collect()
    };
    let mut rows = Vec::new();
    for (n, l) in &listeners {
        for (i, v) in l.responses.iter().enumerate() {
            rows.push((
                format!("listener=\"{n}\",class=\"{}xx\"", i + 1),
                v.to_string(),
            ));
        }
    }
    family(
        "weft_http_requests_total",
        "counter",
        "HTTP responses sent downstream, by listener and status class.",
        rows,
    );
    family(
        "weft_downstream_bytes_received_total",
        "counter",
        "Bytes received from downstream clients.",
        per_listener(&|l| l.bytes_in),
    );
    family(
        "weft_downstream_bytes_sent_total",
        "counter",
        "Bytes sent to downstream clients.",
        per_listener(&|l| l.bytes_out),
    );
    family(
        "weft_downstream_connections_total",
        "counter",
        "Downstream connections accepted.",
        per_listener(&|l| l.connections),
    );
    family(
        "weft_downstream_connections_active",
        "gauge",
        "Downstream connections open now.",
        per_listener(&|l| l.active),
    );
    family(
        "weft_downstream_connections_rejected_total",
        "counter",
        "Connections closed at accept by the per-core cap.",
        per_listener(&|l| l.rejected),
    );
    let mut rows = Vec::new();
    for (n, l) in &listeners {
        for (s, v) in &l.bad_requests {
            rows.push((format!("listener=\"{n}\",status=\"{s}\""), v.to_string()));
        }
    }
    family(
        "weft_downstream_bad_requests_total",
        "counter",
        "Requests refused for bad input (malformed, too large, too slow).",
        rows,
    );
    let per_cluster = |f: &dyn Fn(&ClusterReport) -> u64| -> Vec<(String, String)> {
        clusters
            .iter()
            .map(|(n, c)| (format!("cluster=\"{n}\""), f(c).to_string()))
            .collect()
    };
    family(
        "weft_upstream_requests_total",
        "counter",
        "Requests and TCP connections sent to the cluster.",
        per_cluster(&|c| c.requests),
    );
    family(
        "weft_upstream_connect_errors_total",
        "counter",
        "Upstream connection attempts that failed (refused, reset, timeout).",
        per_cluster(&|c| c.connect_errors),
    );
    family(
        "weft_upstream_timeouts_total",
        "counter",
        "Upstream requests that timed out.",
        per_cluster(&|c| c.timeouts),
    );
    family(
        "weft_upstream_overflow_total",
        "counter",
        "Requests refused with 503 because the cluster's per-core connection limit was reached.",
        per_cluster(&|c| c.overflow),
    );
    let mut handshakes: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let mut failures: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let mut authz: BTreeMap<&str, [u64; 3]> = BTreeMap::new();
    for r in reports {
        for (k, v) in &r.handshakes {
            *handshakes.entry(*k).or_default() += v;
        }
        for (k, v) in &r.handshake_failures {
            *failures.entry(*k).or_default() += v;
        }
        for (k, v) in &r.authz {
            let t = authz.entry(k).or_default();
            for i in 0..3 {
                t[i] += v[i];
            }
        }
    }
    family(
        "weft_tls_handshakes_total",
        "counter",
        "Completed TLS handshakes, by side (inbound, outbound) and kind (full, resumed).",
        handshakes
            .iter()
            .map(|((side, kind), v)| (format!("side=\"{side}\",kind=\"{kind}\""), v.to_string()))
            .collect(),
    );
    family(
        "weft_tls_handshake_failures_total",
        "counter",
        "Failed or refused TLS handshakes, by side and reason.",
        failures
            .iter()
            .map(|((side, reason), v)| {
                (
                    format!("side=\"{side}\",reason=\"{reason}\""),
                    v.to_string(),
                )
            })
            .collect(),
    );
    let mut rows = Vec::new();
    for (policy, v) in &authz {
        for (i, d) in ["allow", "deny", "audit"].iter().enumerate() {
            if v[i] > 0 {
                rows.push((
                    format!("policy=\"{policy}\",decision=\"{d}\""),
                    v[i].to_string(),
                ));
            }
        }
    }
    family(
        "weft_authz_decisions_total",
        "counter",
        "Authorization decisions on inbound requests and connections, by deciding policy \
         (empty: no policy applies, or no ALLOW matched) and decision.",
        rows,
    );
    family(
        "weft_core_requests_total",
        "counter",
        "HTTP requests completed, by core.",
        reports
            .iter()
            .map(|r| (format!("core=\"{}\"", r.core), r.requests.to_string()))
            .collect(),
    );
    family(
        "weft_core_snapshot_version",
        "gauge",
        "Snapshot version each core is serving.",
        reports
            .iter()
            .map(|r| (format!("core=\"{}\"", r.core), r.version.to_string()))
            .collect(),
    );

    let _ = writeln!(
        out,
        "# HELP weft_http_request_duration_seconds Time from a complete request head to the end of the response.\n# TYPE weft_http_request_duration_seconds histogram"
    );
    let mut cumulative = 0u64;
    for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
        cumulative += reports.iter().map(|r| r.buckets[i]).sum::<u64>();
        let _ = writeln!(
            out,
            "weft_http_request_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
        );
    }
    let count: u64 = reports.iter().map(|r| r.requests).sum();
    let sum_us: u64 = reports.iter().map(|r| r.duration_sum_us).sum();
    let _ = writeln!(
        out,
        "weft_http_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(
        out,
        "weft_http_request_duration_seconds_sum {}",
        sum_us as f64 / 1e6
    );
    let _ = writeln!(out, "weft_http_request_duration_seconds_count {count}");
    out.push_str(extra);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_summed_cores() {
        let m0 = CoreMetrics::default();
        let m1 = CoreMetrics::default();
        m0.listener("web").response(200);
        m1.listener("web").response(503);
        m1.listener("web").bad_request(431);
        m0.request_done(Duration::from_millis(3));
        m1.request_done(Duration::from_secs(20));
        let text = render(&[m0.report(0, 1), m1.report(1, 1)], "");
        assert!(text.contains("weft_http_requests_total{listener=\"web\",class=\"2xx\"} 1"));
        assert!(text.contains("weft_http_requests_total{listener=\"web\",class=\"5xx\"} 1"));
        assert!(
            text.contains("weft_downstream_bad_requests_total{listener=\"web\",status=\"431\"} 1")
        );
        assert!(text.contains("weft_core_requests_total{core=\"1\"} 1"));
        assert!(text.contains("weft_http_request_duration_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("weft_http_request_duration_seconds_bucket{le=\"10\"} 1"));
        assert!(text.contains("weft_http_request_duration_seconds_bucket{le=\"+Inf\"} 2"));
    }
}
