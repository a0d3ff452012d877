//! `weft-bench authz`: authorization decisions per second with 10, 1 000 and 10 000 rules —
//! the reference evaluator (every rule), the per-core compiled tables (principal index), and
//! the decision cache.

use std::time::{Duration, Instant};

use weft_api::authz::{evaluate, Policy, RawPolicySpec, Request};
use weft_dataplane::authz::Compiled;

fn policy(rules: usize) -> anyhow::Result<Policy> {
    let mut r = Vec::with_capacity(rules);
    for i in 0..rules {
        r.push(format!(
            r#"{{"from": [{{"source": {{"principals": ["cluster.local/ns/prod/sa/sa-{i}"]}}}}], "to": [{{"operation": {{"methods": ["GET"], "paths": ["/api/{i}/*"]}}}}]}}"#
        ));
    }
    let raw: RawPolicySpec = serde_json::from_str(&format!(r#"{{"rules": [{}]}}"#, r.join(",")))?;
    Ok(Policy::from_raw("prod", "bench", &raw)?)
}

/// Runs `f` over the requests for at least `min` and returns decisions per second.
fn rate(
    min: Duration,
    requests: &[(String, String)],
    mut f: impl FnMut(&Request<'_>) -> bool,
) -> f64 {
    let none = |_: &str| None;
    let start = Instant::now();
    let mut n = 0u64;
    let mut allowed = 0u64;
    while start.elapsed() < min {
        for (principal, path) in requests {
            let r = Request {
                principal: Some(principal),
                namespace: Some("prod"),
                source_ip: std::net::IpAddr::from([10, 0, 0, 1]),
                host: "checkout.prod.svc.cluster.local",
                port: 80,
                method: "GET",
                path,
                header: &none,
            };
            allowed += u64::from(f(&r));
            n += 1;
        }
    }
    std::hint::black_box(allowed);
    n as f64 / start.elapsed().as_secs_f64()
}

pub fn run(seconds: f64) -> anyhow::Result<()> {
    let min = Duration::from_secs_f64(seconds.max(0.1));
    println!("| rules | reference (every rule) | compiled (principal index) | compiled + decision cache |");
    println!("|---|---|---|---|");
    for rules in [10usize, 1_000, 10_000] {
        let p = vec![policy(rules)?];
        let c = Compiled::new(&p);
        // 256 distinct (caller, path) pairs: half allowed, half denied
        let requests: Vec<(String, String)> = (0..256)
            .map(|i| {
                let who = (i * 7919) % rules;
                let path = if i % 2 == 0 {
                    format!("/api/{who}/x")
                } else {
                    format!("/api/{}/x", (who + 1) % rules.max(2))
                };
                (format!("cluster.local/ns/prod/sa/sa-{who}"), path)
            })
            .collect();
        let reference = rate(min, &requests, |r| evaluate(&p, r).allowed);
        let compiled = rate(min, &requests, |r| c.evaluate(r).allowed);
        let cached = rate(min, &requests, |r| c.decide(r).allowed);
        println!("| {rules} | {reference:.0}/s | {compiled:.0}/s | {cached:.0}/s |");
    }
    Ok(())
}
