//! `weft-proxy`: command line, host checks, core start-up, then the agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use glommio::{LocalExecutorBuilder, Placement};
use tokio::sync::mpsc;
use weft_dataplane::agent::{self, AgentOptions, Source};
use weft_dataplane::config;
use weft_dataplane::control::ControlOptions;
use weft_dataplane::core::{self as wcore, CoreMsg};
use weft_dataplane::mesh::Sidecar;
use weft_dataplane::sys::{self, HostError};

/// weft-proxy: the thread-per-core weft data plane (sidecar and edge gateway).
#[derive(Debug, Parser)]
#[command(name = "weft-proxy", version, about)]
struct Args {
    /// Static configuration file (YAML: listeners, clusters, routes, limits). Re-read on SIGHUP.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "control",
        conflicts_with = "control"
    )]
    config: Option<PathBuf>,
    /// Control plane gRPC address; configuration and certificates come from it.
    #[arg(long, value_name = "ADDR", requires_all = ["token_file", "inbound", "outbound", "app"])]
    control: Option<SocketAddr>,
    /// Join token file (from `weft-control token NS/WORKLOAD`), for the first certificate.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Sidecar inbound listener: the workload's address in the mesh (its WorkloadEntry port).
    #[arg(long, value_name = "ADDR")]
    inbound: Option<SocketAddr>,
    /// Sidecar outbound listener: the app calls services through it (Host names the service).
    #[arg(long, value_name = "ADDR")]
    outbound: Option<SocketAddr>,
    /// The app this sidecar fronts; inbound requests go there.
    #[arg(long, value_name = "ADDR")]
    app: Option<SocketAddr>,
    /// Number of cores (pinned executors) to run; default: every online CPU.
    #[arg(long, value_name = "N", conflicts_with = "cpus")]
    cores: Option<usize>,
    /// Exact CPUs to pin executors to, e.g. `0,2` or `0-3`.
    #[arg(long, value_name = "LIST")]
    cpus: Option<String>,
    /// Admin server address (/ready, /metrics, /config_dump).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Longest time SIGTERM waits for in-flight requests before exiting (seconds).
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
    drain_seconds: f64,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG wins when set.
    #[arg(long, value_name = "FILTER", default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| args.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-proxy: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn choose_cpus(args: &Args) -> Result<Vec<usize>, HostError> {
    let online = sys::online_cpus();
    if let Some(list) = &args.cpus {
        let cpus = sys::parse_cpu_list(list).map_err(|e| HostError::Cpu(format!("--cpus: {e}")))?;
        if let Some(c) = cpus.iter().find(|c| !online.contains(c)) {
            return Err(HostError::Cpu(format!(
                "--cpus: CPU {c} is not online (online: {online:?})"
            )));
        }
        return Ok(cpus);
    }
    match args.cores {
        None => Ok(online),
        Some(0) => Err(HostError::Cpu("--cores must be at least 1".into())),
        Some(n) if n > online.len() => Err(HostError::Cpu(format!(
            "--cores {n}: only {} CPUs are online; one pinned executor per CPU is the most that helps",
            online.len()
        ))),
        Some(n) => Ok(online[..n].to_vec()),
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if !(0.0..=3600.0).contains(&args.drain_seconds) {
        anyhow::bail!("--drain-seconds must be between 0 and 3600");
    }
    let cpus = choose_cpus(&args)?;
    sys::preflight()?;
    let (source, first) = match (&args.config, args.control) {
        (Some(path), _) => (
            Source::File(path.clone()),
            Some(config::load_file(path, 1)?),
        ),
        (None, Some(address)) => {
            let need = |v: Option<SocketAddr>, flag: &str| {
                v.ok_or_else(|| anyhow::anyhow!("--control needs {flag}"))
            };
            let sidecar = Sidecar {
                inbound: need(args.inbound, "--inbound")?,
                outbound: need(args.outbound, "--outbound")?,
                app: need(args.app, "--app")?,
            };
            let token_file = args
                .token_file
                .clone()
                .ok_or_else(|| anyhow::anyhow!("--control needs --token-file"))?;
            weft_api::JoinToken::parse_unverified(
                std::fs::read_to_string(&token_file)
                    .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", token_file.display()))?
                    .trim(),
            )
            .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", token_file.display()))?;
            (
                Source::Control {
                    control: ControlOptions {
                        address,
                        token_file,
                    },
                    sidecar,
                },
                None,
            )
        }
        (None, None) => anyhow::bail!("either --config FILE or --control ADDR is required"),
    };

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let mut cores = Vec::with_capacity(cpus.len());
    for (id, cpu) in cpus.iter().copied().enumerate() {
        let (tx, rx) = crossbeam_channel::unbounded::<CoreMsg>();
        cores.push(tx);
        let events = events_tx.clone();
        let started = started_tx.clone();
        std::thread::Builder::new()
            .name(format!("weft-core-{id}"))
            .spawn(move || {
                let built = LocalExecutorBuilder::new(Placement::Fixed(cpu))
                    .name(&format!("weft-core-{id}"))
                    .make();
                match built {
                    Ok(ex) => {
                        let _ = started.send(Ok(()));
                        ex.run(wcore::run(id, rx, events));
                    }
                    Err(e) => {
                        let _ = started.send(Err(e.to_string()));
                    }
                }
            })?;
    }
    drop(started_tx);
    drop(events_tx);
    for _ in &cpus {
        match started_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e))
                if e.to_lowercase().contains("memlock") || e.to_lowercase().contains("locked") =>
            {
                return Err(HostError::MemLock {
                    limit: sys::memlock_limit(),
                }
                .into());
            }
            Ok(Err(e)) => return Err(HostError::IoUring(e).into()),
            Err(_) => {
                return Err(
                    HostError::IoUring("a core thread exited during start-up".into()).into(),
                )
            }
        }
    }
    let opts = AgentOptions {
        source,
        admin: args.admin,
        drain: Duration::from_secs_f64(args.drain_seconds),
    };
    std::thread::Builder::new()
        .name("weft-agent".into())
        .spawn(move || agent::run(opts, first, cores, events_rx))?
        .join()
        .map_err(|_| anyhow::anyhow!("agent thread panicked"))?
}
