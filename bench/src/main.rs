//! weft-bench: closed-loop HTTP/1.1 load generator and fixed-response origin server, for
//! measuring weft side by side with HAProxy and nginx on the same machine in the same run.
//!
//! Threading model: a tokio runtime with `--threads` workers (default 1, so that on a small
//! machine the load generator does not steal the cores it is measuring). Latency is recorded
//! per connection in an hdrhistogram (microseconds) and merged at the end.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod authz;
mod push;

#[derive(Debug, Parser)]
#[command(
    name = "weft-bench",
    version,
    about = "Load generator and origin for weft benchmarks"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Closed-loop HTTP/1.1 keep-alive load against one URL.
    Load {
        /// Target, `http://IP:PORT/path`.
        #[arg(long)]
        url: String,
        /// Concurrent keep-alive connections (each with one request in flight).
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Measured duration, seconds.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Warm-up before measuring, seconds (requests sent, not recorded).
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        /// Runtime worker threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Host header to send (default: the URL's authority).
        #[arg(long)]
        host: Option<String>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// A label printed with the result.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Config-push propagation: manifest change → every proxy ACKed (real weft-control and
    /// weft-proxy processes).
    Push(push::PushArgs),
    /// Authorization decisions per second (10 / 1000 / 10000 rules; reference, compiled, cached).
    Authz {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
    },
    /// A fixed-response HTTP/1.1 server to stand as the app.
    Origin {
        #[arg(long, default_value = "127.0.0.1:18080")]
        listen: SocketAddr,
        /// Response body size, bytes (a run of `x`).
        #[arg(long, default_value_t = 64)]
        body_bytes: usize,
        /// Response body text instead of `--body-bytes` of `x`.
        #[arg(long)]
        body: Option<String>,
        /// Runtime worker threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Append the request's path and its x-forwarded-client-cert (who called, as the
        /// inbound sidecar says) to each response body: the demo apps.
        #[arg(long)]
        echo: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Cmd::Authz { seconds } = args.cmd {
        return authz::run(seconds);
    }
    if let Cmd::Push(push_args) = args.cmd {
        return push::run(push_args);
    }
    let threads = match &args.cmd {
        Cmd::Load { threads, .. } | Cmd::Origin { threads, .. } => (*threads).max(1),
        Cmd::Push(_) | Cmd::Authz { .. } => 1,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match args.cmd {
            Cmd::Load {
                url,
                connections,
                duration,
                warmup,
                host,
                json,
                label,
                ..
            } => load(&url, connections, duration, warmup, host, json, &label).await,
            Cmd::Origin {
                listen,
                body_bytes,
                body,
                echo,
                ..
            } => origin(listen, body.unwrap_or_else(|| "x".repeat(body_bytes)), echo).await,
            Cmd::Push(_) | Cmd::Authz { .. } => Ok(()), // handled before the runtime starts
        }
    })
}

/// `http://IP:PORT/path` → (address, authority, path).
fn parse_url(url: &str) -> anyhow::Result<(SocketAddr, String, String)> {
    let rest = url
        .strip_prefix("http://")
        .context("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = authority
        .parse()
        .with_context(|| format!("`{authority}` must be IP:PORT (no DNS in the benchmark path)"))?;
    Ok((addr, authority.to_string(), path.to_string()))
}

#[derive(Default)]
struct ConnResult {
    hist: Option<Histogram<u64>>,
    requests: u64,
    errors: u64,
}

async fn load(
    url: &str,
    connections: usize,
    duration: f64,
    warmup: f64,
    host: Option<String>,
    json: bool,
    label: &str,
) -> anyhow::Result<()> {
    if connections == 0 || duration <= 0.0 || warmup < 0.0 {
        bail!("--connections and --duration must be positive");
    }
    let (addr, authority, path) = parse_url(url)?;
    let host = host.unwrap_or(authority);
    let request = Arc::new(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: weft-bench\r\n\r\n")
            .into_bytes(),
    );
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(warmup);
    let stop_at = measure_from + Duration::from_secs_f64(duration);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let request = request.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            conn_loop(addr, &request, measure_from, stop_at, &stop).await
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut requests, mut errors) = (0u64, 0u64);
    for t in tasks {
        let r = t.await?;
        if let Some(h) = r.hist {
            hist.add(h)?;
        }
        requests += r.requests;
        errors += r.errors;
    }
    stop.store(true, Ordering::Relaxed);
    let rps = requests as f64 / duration;
    let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
    if json {
        let v = serde_json::json!({
            "label": label, "url": url, "connections": connections, "duration_s": duration,
            "requests": requests, "errors": errors, "rps": rps,
            "p50_ms": q(0.5), "p99_ms": q(0.99), "p999_ms": q(0.999), "max_ms": hist.max() as f64 / 1000.0,
        });
        println!("{v}");
    } else {
        println!(
            "{label:<12} {url}  conns={connections} {duration}s  requests={requests} errors={errors}  rps={rps:.0}  p50={:.3}ms p99={:.3}ms p99.9={:.3}ms max={:.3}ms",
            q(0.5),
            q(0.99),
            q(0.999),
            hist.max() as f64 / 1000.0
        );
    }
    Ok(())
}

/// One keep-alive connection sending requests back to back until `stop_at`; reconnects after
/// errors (counted). Bounded by time: it always ends at `stop_at`.
async fn conn_loop(
    addr: SocketAddr,
    request: &[u8],
    measure_from: Instant,
    stop_at: Instant,
    stop: &AtomicBool,
) -> ConnResult {
    let mut res = ConnResult::default();
    let Ok(mut hist) = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3) else {
        return res;
    };
    let mut buf = vec![0u8; 64 * 1024];
    'outer: while Instant::now() < stop_at && !stop.load(Ordering::Relaxed) {
        let remaining = stop_at.saturating_duration_since(Instant::now());
        let mut s = match tokio::time::timeout(remaining, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            _ => {
                res.errors += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        loop {
            let now = Instant::now();
            if now >= stop_at {
                break 'outer;
            }
            let t0 = Instant::now();
            let ok = tokio::time::timeout(
                stop_at - now + Duration::from_secs(5),
                exchange(&mut s, request, &mut buf),
            )
            .await;
            match ok {
                Ok(Ok(keep)) => {
                    if t0 >= measure_from && Instant::now() <= stop_at {
                        res.requests += 1;
                        let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
                    }
                    if !keep {
                        continue 'outer;
                    }
                }
                _ => {
                    if t0 >= measure_from {
                        res.errors += 1;
                    }
                    continue 'outer;
                }
            }
        }
    }
    res.hist = Some(hist);
    res
}

/// Sends one request and reads one response (Content-Length or chunked body, 2xx expected).
/// Returns whether the connection can be reused.
async fn exchange(s: &mut TcpStream, request: &[u8], buf: &mut [u8]) -> anyhow::Result<bool> {
    s.write_all(request).await?;
    let mut filled = 0;
    loop {
        let n = s.read(&mut buf[filled..]).await?;
        if n == 0 {
            bail!("closed");
        }
        filled += n;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = resp.parse(&buf[..filled])? {
            let code = resp.code.unwrap_or(0);
            if !(200..300).contains(&code) {
                bail!("status {code}");
            }
            let mut len = None;
            let mut close = false;
            for h in resp.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    len = std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse::<usize>().ok());
                } else if h.name.eq_ignore_ascii_case("connection") {
                    close = h.value.eq_ignore_ascii_case(b"close");
                }
            }
            let Some(len) = len else {
                bail!("benchmark responses need content-length")
            };
            let mut have = filled - head;
            while have < len {
                let n = s.read(buf).await?;
                if n == 0 {
                    bail!("closed mid-body");
                }
                have += n;
            }
            return Ok(!close);
        }
        if filled == buf.len() {
            bail!("response head too large");
        }
    }
}

async fn origin(listen: SocketAddr, body: String, echo: bool) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    let body_bytes = body.len();
    let text = Arc::new(body.clone());
    let response = Arc::new(
        format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {body_bytes}\r\n\r\n{body}").into_bytes(),
    );
    eprintln!("weft-bench origin listening on {listen}, {body_bytes}-byte responses");
    loop {
        let (mut s, _) = listener.accept().await?;
        let response = response.clone();
        let text = text.clone();
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut buf = vec![0u8; 16 * 1024];
            let mut filled = 0;
            loop {
                let n = match s.read(&mut buf[filled..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                filled += n;
                // answer every complete request head in the buffer (pipelining-safe);
                // request bodies are skipped by content-length
                let mut start = 0;
                loop {
                    let mut headers = [httparse::EMPTY_HEADER; 64];
                    let mut req = httparse::Request::new(&mut headers);
                    match req.parse(&buf[start..filled]) {
                        Ok(httparse::Status::Complete(n)) => {
                            let body: usize = req
                                .headers
                                .iter()
                                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                                .and_then(|h| {
                                    std::str::from_utf8(h.value).ok()?.trim().parse().ok()
                                })
                                .unwrap_or(0);
                            if filled - start - n < body {
                                break; // wait for the body (small bodies only)
                            }
                            start += n + body;
                            let echoed;
                            let out: &[u8] = if echo {
                                let xfcc = req
                                    .headers
                                    .iter()
                                    .find(|h| {
                                        h.name.eq_ignore_ascii_case("x-forwarded-client-cert")
                                    })
                                    .map_or("(none)".into(), |h| {
                                        String::from_utf8_lossy(h.value).into_owned()
                                    });
                                let b = format!(
                                    "{text}\npath: {}\nx-forwarded-client-cert: {xfcc}\n",
                                    req.path.unwrap_or("")
                                );
                                echoed = format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{b}", b.len());
                                echoed.as_bytes()
                            } else {
                                &response
                            };
                            if s.write_all(out).await.is_err() {
                                return;
                            }
                        }
                        Ok(httparse::Status::Partial) => break,
                        Err(_) => return,
                    }
                }
                buf.copy_within(start..filled, 0);
                filled -= start;
                if filled == buf.len() {
                    return;
                }
            }
        });
    }
}
