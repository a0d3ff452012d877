//! `weft-bench push`: config-push propagation time. A mesh of S services and W workloads is
//! served by a real weft-control; P real weft-proxy sidecars subscribe. Each change rewrites the
//! manifest folder (one workload's port moves, so every proxy's snapshot changes) and the clock
//! runs until the control plane's `/proxies` shows every proxy has ACKed it — i.e. every core
//! of every proxy applied it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;

#[derive(Debug, clap::Args)]
pub struct PushArgs {
    #[arg(long, default_value_t = 1000)]
    pub services: usize,
    #[arg(long, default_value_t = 5000)]
    pub workloads: usize,
    #[arg(long, default_value_t = 10)]
    pub proxies: usize,
    #[arg(long, default_value_t = 100)]
    pub changes: usize,
    #[arg(long, default_value = "target/release/weft-control")]
    pub control_bin: PathBuf,
    #[arg(long, default_value = "target/release/weft-proxy")]
    pub proxy_bin: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.starts_with("HTTP/1.1 200")
        .then(|| text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()))?
}

/// Workloads per manifest file: operators keep manifests in many files, and a change rewrites one.
const PER_FILE: usize = 100;

fn services_yaml(services: usize) -> String {
    let mut y = String::from(
        "apiVersion: weft.dev/v1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {certTTL: 24h}\n",
    );
    for s in 0..services {
        y.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: svc-{s}, namespace: bench}}\n\
             spec: {{hosts: [svc-{s}.bench.svc.cluster.local], ports: [{{number: 80, name: http, protocol: HTTP}}], workloadSelector: {{labels: {{app: svc-{s}}}}}}}\n"
        ));
    }
    y
}

/// The file holding workloads `chunk*PER_FILE ..`.
fn workloads_yaml(services: usize, ports: &[u16], chunk: usize) -> String {
    let mut y = String::new();
    let start = chunk * PER_FILE;
    for (w, port) in ports.iter().enumerate().skip(start).take(PER_FILE) {
        y.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: wl-{w}, namespace: bench}}\n\
             spec: {{address: 127.0.0.1, ports: {{http: {port}}}, labels: {{app: svc-{}}}, serviceAccount: sa-{}}}\n",
            w % services,
            w % services
        ));
    }
    y
}

fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// (all proxies connected and caught up, max sent version)
fn proxies_state(admin: SocketAddr, n: usize) -> Option<(bool, u64)> {
    let body = get(admin, "/proxies")?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let list = v.as_array()?;
    let caught_up = list.len() == n
        && list.iter().all(|p| {
            let sent = p["sent_version"].as_u64().unwrap_or(0);
            sent > 0 && p["acked_version"].as_u64() == Some(sent)
        });
    let max_sent = list
        .iter()
        .filter_map(|p| p["sent_version"].as_u64())
        .min()
        .unwrap_or(0);
    Some((caught_up, max_sent))
}

pub fn run(a: PushArgs) -> anyhow::Result<()> {
    if a.proxies == 0 || a.proxies > a.workloads || a.services == 0 || a.changes == 0 {
        bail!("need 0 < proxies <= workloads, services > 0, changes > 0");
    }
    for b in [&a.control_bin, &a.proxy_bin] {
        if !b.exists() {
            bail!(
                "{} not found: cargo build --release -p weft-controlplane -p weft-dataplane",
                b.display()
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("weft-push-{}", std::process::id()));
    let config = dir.join("config");
    std::fs::create_dir_all(&config)?;
    let mut ports: Vec<u16> = (0..a.workloads)
        .map(|w| 30000 + (w % 20000) as u16)
        .collect();
    for p in ports.iter_mut().take(a.proxies) {
        *p = free_port()?;
    }
    write_atomic(&config.join("services.yaml"), &services_yaml(a.services))?;
    let chunks = a.workloads.div_ceil(PER_FILE);
    let chunk_file = |c: usize| config.join(format!("workloads-{c:03}.yaml"));
    for c in 0..chunks {
        write_atomic(&chunk_file(c), &workloads_yaml(a.services, &ports, c))?;
    }
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mut procs = Procs(Vec::new());
    let log = std::fs::File::create(dir.join("control.log"))?;
    procs.0.push(
        Command::new(&a.control_bin)
            .args(["serve", "--log", "warn", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args([
                "--listen",
                &listen.to_string(),
                "--admin",
                &admin.to_string(),
            ])
            .stderr(log)
            .spawn()
            .context("start weft-control")?,
    );
    let until = Instant::now() + Duration::from_secs(60);
    while get(admin, "/ready").is_none() {
        if Instant::now() > until {
            bail!(
                "weft-control did not start; see {}",
                dir.join("control.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (i, port) in ports.iter().enumerate().take(a.proxies) {
        let out = Command::new(&a.control_bin)
            .args(["token", &format!("bench/wl-{i}"), "--data-dir"])
            .arg(dir.join("data"))
            .output()?;
        let token = dir.join(format!("wl-{i}.token"));
        std::fs::write(&token, &out.stdout)?;
        let log = std::fs::File::create(dir.join(format!("proxy-{i}.log")))?;
        procs.0.push(
            Command::new(&a.proxy_bin)
                .args(["--control", &listen.to_string(), "--token-file"])
                .arg(&token)
                .args(["--inbound", &format!("127.0.0.1:{port}")])
                .args(["--outbound", &format!("127.0.0.1:{}", free_port()?)])
                .args(["--app", "127.0.0.1:9", "--cores", "1", "--log", "warn"])
                .args(["--admin", &format!("127.0.0.1:{}", free_port()?)])
                .stderr(log)
                .stdout(Stdio::null())
                .spawn()
                .context("start weft-proxy")?,
        );
    }
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some((true, _)) = proxies_state(admin, a.proxies) {
            break;
        }
        if Instant::now() > until {
            bail!(
                "proxies did not all connect and ACK; logs in {}",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    for i in 0..a.changes {
        let (_, before) = proxies_state(admin, a.proxies).context("/proxies")?;
        // move one non-proxy workload's port: its service's endpoints change for every proxy
        let w = a.proxies + i % (a.workloads - a.proxies).max(1);
        ports[w] = 40000 + (i % 20000) as u16;
        let text = workloads_yaml(a.services, &ports, w / PER_FILE);
        let t0 = Instant::now();
        write_atomic(&chunk_file(w / PER_FILE), &text)?;
        loop {
            if let Some((true, sent)) = proxies_state(admin, a.proxies) {
                if sent > before {
                    break;
                }
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("change {i} not ACKed by every proxy within 30 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        hist.record(t0.elapsed().as_micros().max(1) as u64)?;
    }
    let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"services": a.services, "workloads": a.workloads, "proxies": a.proxies, "changes": a.changes,
                "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": hist.max() as f64 / 1000.0})
        );
    } else {
        println!(
            "push: {} services, {} workloads, {} proxies, {} changes: p50={:.1}ms p99={:.1}ms max={:.1}ms (manifest write -> every proxy ACKed)",
            a.services,
            a.workloads,
            a.proxies,
            a.changes,
            q(0.5),
            q(0.99),
            hist.max() as f64 / 1000.0
        );
    }
    drop(procs);
    if std::env::var_os("WEFT_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("logs kept in {}", dir.display());
    }
    Ok(())
}
