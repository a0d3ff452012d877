//! `weft-control`: serve the control plane, mint join tokens and SVIDs, rotate the CA.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tokio::sync::watch;
use weft_api::{JoinToken, SpiffeId, WorkloadRef};
use weft_controlplane::ca::{self, Ca};
use weft_controlplane::manifest::{self, parse_duration};
use weft_controlplane::server::{self, Shared};

/// weft-control: the weft control plane (config store, CA, snapshot push).
#[derive(Debug, Parser)]
#[command(name = "weft-control", version, about)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the gRPC API (TLS) and the admin API, watching the manifest folder.
    Serve {
        /// Folder of manifests (`*.yaml`, multi-document): MeshConfig, ServiceEntry, WorkloadEntry.
        #[arg(long, value_name = "DIR")]
        config: PathBuf,
        /// State folder: CA roots and keys, token key, used tokens.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:15012")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:15014")]
        admin: SocketAddr,
        #[arg(long, default_value = "info")]
        log: String,
    },
    /// Print a single-use join token for a WorkloadEntry (`namespace/name`) on stdout.
    Token {
        workload: WorkloadRef,
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Token lifetime, e.g. 10m, 1h.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Write an SVID, its key and the trust bundle (svid.pem, key.pem, bundle.pem) for a
    /// WorkloadEntry, for clients outside the mesh and for tests.
    Mint {
        workload: WorkloadRef,
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Manifest folder (default: the last set `serve` accepted, saved in the data dir).
        #[arg(long, value_name = "DIR")]
        config: Option<PathBuf>,
        /// Certificate lifetime (default: the mesh's certTTL).
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Root CA management.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
}

#[derive(Debug, Subcommand)]
enum CaCmd {
    /// Add a new root and sign with it from now on; the old roots stay trusted.
    Rotate {
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
    },
    /// Stop trusting a root (by serial, as `/state` and `ca rotate` print it).
    Retire {
        serial: String,
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
    },
}

fn main() {
    let args = Args::parse();
    let result = match args.cmd {
        Cmd::Serve {
            config,
            data_dir,
            listen,
            admin,
            log,
        } => serve(config, data_dir, listen, admin, &log),
        Cmd::Token {
            workload,
            data_dir,
            ttl,
        } => token(&workload, &data_dir, &ttl),
        Cmd::Mint {
            workload,
            data_dir,
            out,
            config,
            ttl,
        } => mint(
            &workload,
            &data_dir,
            &out,
            config.as_deref(),
            ttl.as_deref(),
        ),
        Cmd::Ca {
            cmd: CaCmd::Rotate { data_dir },
        } => Ca::rotate(&data_dir)
            .map(|s| println!("{s}"))
            .map_err(Into::into),
        Cmd::Ca {
            cmd: CaCmd::Retire { serial, data_dir },
        } => Ca::retire(&data_dir, &serial).map_err(Into::into),
    };
    if let Err(e) = result {
        eprintln!("weft-control: error: {e:#}");
        std::process::exit(1);
    }
}

fn serve(
    config: PathBuf,
    data_dir: PathBuf,
    listen: SocketAddr,
    admin: SocketAddr,
    log: &str,
) -> anyhow::Result<()> {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| log.to_string());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let state = manifest::load_dir(&config)
        .map_err(|errs| anyhow::anyhow!("{}", manifest::report(&errs)))?;
    std::fs::create_dir_all(&data_dir).with_context(|| format!("{}", data_dir.display()))?;
    let ca = Ca::open_or_init(&data_dir)?;
    server::save_state(&data_dir, &state);
    let token_key = ca::token_key(&data_dir)?;
    let tls = server::tls_config(&ca, &state.trust_domain)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (state_tx, state_rx) = watch::channel(Arc::new(state));
        let (ca_tx, ca_rx) = watch::channel(Arc::new(ca));
        let (tls_tx, tls_rx) = watch::channel(tls);
        let shared = Arc::new(Shared {
            data_dir,
            config_dir: config,
            state: state_rx,
            ca: ca_rx,
            generation: AtomicU64::new(1),
            token_key,
            proxies: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            last_error: Mutex::new(None),
            table: Mutex::new(None),
        });
        tokio::spawn(server::watch_loop(shared.clone(), state_tx, ca_tx, tls_tx));
        tokio::spawn({
            let shared = shared.clone();
            async move {
                if let Err(e) = weft_controlplane::admin::serve(admin, shared).await {
                    tracing::error!("{e}");
                    std::process::exit(1);
                }
            }
        });
        tracing::info!(%listen, %admin, "weft-control serving");
        server::serve_grpc(listen, shared, tls_rx).await
    })
}

fn token(workload: &WorkloadRef, data_dir: &Path, ttl: &str) -> anyhow::Result<()> {
    let ttl = parse_duration(ttl).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
    if ttl.is_zero() {
        bail!("--ttl must be positive");
    }
    let ca = Ca::open_or_init(data_dir)?;
    let key = ca::token_key(data_dir)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let t = JoinToken {
        workload: workload.clone(),
        expires: now + ttl.as_secs().max(1),
        id: weft_api::hex(&ca::random_bytes::<16>()),
        root_fingerprint: weft_api::fingerprint(&ca.active_root().der),
    };
    println!("{}", t.sign(&key));
    Ok(())
}

fn mint(
    workload: &WorkloadRef,
    data_dir: &Path,
    out: &Path,
    config: Option<&Path>,
    ttl: Option<&str>,
) -> anyhow::Result<()> {
    let (td, sa, default_ttl) = match config {
        Some(dir) => {
            let state = manifest::load_dir(dir)
                .map_err(|errs| anyhow::anyhow!("{}", manifest::report(&errs)))?;
            let w = state
                .workloads
                .get(workload)
                .with_context(|| format!("no WorkloadEntry {workload} in {}", dir.display()))?;
            (
                state.trust_domain.clone(),
                w.service_account.clone(),
                state.cert_ttl,
            )
        }
        None => {
            let path = data_dir.join("mesh.json");
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "{}: run `weft-control serve` once on this data dir, or pass --config DIR",
                    path.display()
                )
            })?;
            let v: serde_json::Value = serde_json::from_str(&text)?;
            let sa = v["workloads"][workload.to_string()]
                .as_str()
                .with_context(|| {
                    format!(
                        "no WorkloadEntry {workload} in the mesh saved in {}",
                        path.display()
                    )
                })?;
            let td = v["trust_domain"]
                .as_str()
                .unwrap_or("cluster.local")
                .to_string();
            (
                td,
                sa.to_string(),
                Duration::from_secs(v["cert_ttl_seconds"].as_u64().unwrap_or(86400)),
            )
        }
    };
    let ttl = match ttl {
        Some(t) => parse_duration(t).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?,
        None => default_ttl,
    };
    let ca = Ca::open_or_init(data_dir)?;
    let id = SpiffeId::new(&td, &workload.namespace, &sa)?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let leaf = ca.issue(&id, &key, ttl, &[])?;
    std::fs::create_dir_all(out).with_context(|| format!("{}", out.display()))?;
    let mut svid = ca::der_to_pem(&leaf);
    svid.push_str(&ca.active_root().pem);
    ca::write_file(&out.join("svid.pem"), svid.as_bytes(), 0o644)?;
    ca::write_file(&out.join("key.pem"), key.serialize_pem().as_bytes(), 0o600)?;
    let bundle: String = ca.bundle().iter().map(|c| ca::der_to_pem(c)).collect();
    ca::write_file(&out.join("bundle.pem"), bundle.as_bytes(), 0o644)?;
    eprintln!("wrote {id} to {}/{{svid,key,bundle}}.pem", out.display());
    Ok(())
}
