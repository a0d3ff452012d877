//! weft-tests: the harness for end-to-end tests that start the real weft binaries on loopback.
//!
//! It builds the binaries once per test run (`cargo build`), starts `weft-proxy` with a config
//! written to a fresh temporary folder and free ports, and offers a scriptable origin server and
//! raw HTTP/1.1 clients, so that tests see weft exactly as a user or an app does.

#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

static BUILD: Once = Once::new();

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Path of a workspace binary, built (debug profile) on first use.
pub fn bin(name: &str) -> PathBuf {
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(root())
            // one build of every binary: separate builds of subsets resolve features
            // differently and rebuild each other's dependencies on every test run
            .args([
                "build",
                "-q",
                "-p",
                "weft-dataplane",
                "-p",
                "weft-bench",
                "-p",
                "weft-controlplane",
                "--bins",
            ])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build of the weft binaries failed");
    });
    let target =
        std::env::var("CARGO_TARGET_DIR").map_or_else(|_| root().join("target"), PathBuf::from);
    target.join("debug").join(name)
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh temporary folder, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "weft-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `within`.
pub fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `weft-proxy`.
pub struct Proxy {
    pub child: Child,
    pub admin: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
    _dir: TempDir,
}

impl Proxy {
    /// Starts weft-proxy on `config` (YAML) with `cores` cores and waits until /ready is 200.
    pub fn start(config: &str, cores: usize) -> Proxy {
        Self::start_with(config, &["--cores", &cores.to_string()])
    }

    pub fn start_with(config: &str, extra: &[&str]) -> Proxy {
        let p = Self::spawn(config, extra);
        let admin = p.admin;
        wait_for("weft-proxy /ready", Duration::from_secs(20), || {
            if let Some(status) = p.try_exit() {
                panic!(
                    "weft-proxy exited during start-up ({status}):\n{}",
                    p.log_text()
                );
            }
            match admin_get(admin, "/ready") {
                Some((200, _)) => Some(()),
                _ => None,
            }
        });
        p
    }

    /// Starts weft-proxy without waiting for it.
    pub fn spawn(config: &str, extra: &[&str]) -> Proxy {
        Self::launch(Some(config), extra)
    }

    /// Starts weft-proxy with `--config` (written to a fresh folder) when given, and `extra`.
    fn launch(config: Option<&str>, extra: &[&str]) -> Proxy {
        let dir = TempDir::new("proxy");
        let path = dir.0.join("weft.yaml");
        let mut cmd = Command::new(bin("weft-proxy"));
        if let Some(text) = config {
            std::fs::write(&path, text).unwrap();
            cmd.arg("--config").arg(&path);
        }
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.0.join("proxy.log");
        let child = cmd
            .arg("--admin")
            .arg(admin.to_string())
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Proxy {
            child,
            admin,
            config: path,
            log,
            _dir: dir,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn try_exit(&self) -> Option<ExitStatus> {
        // SAFETY-free: waitpid through a clone of the handle is not possible; use kill(0)
        let pid = self.child.id() as i32;
        let mut status = 0;
        #[allow(unsafe_code)]
        // SAFETY: waitpid on our own child pid with WNOHANG only reads its state.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            use std::os::unix::process::ExitStatusExt;
            Some(ExitStatus::from_raw(status))
        } else {
            None
        }
    }

    pub fn signal(&self, sig: i32) {
        #[allow(unsafe_code)]
        // SAFETY: sends a signal to our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for the process to exit and returns its status, or None after `within`.
    pub fn wait_exit(&self, within: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + within;
        loop {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            if Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        admin_get(self.admin, path)
            .unwrap_or_else(|| panic!("admin {path} unreachable:\n{}", self.log_text()))
    }

    pub fn config_dump(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/config_dump").1).unwrap()
    }

    pub fn version(&self) -> u64 {
        self.config_dump()["version"].as_u64().unwrap()
    }

    /// The value of a metric line (`name{labels}`) summed over matching lines.
    pub fn metric(&self, prefix: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Writes a new config, sends SIGHUP, and waits until every core serves a newer version.
    pub fn reload(&self, config: &str) -> u64 {
        let before = self.version();
        std::fs::write(&self.config, config).unwrap();
        self.signal(libc::SIGHUP);
        wait_for(
            "reload applied on every core",
            Duration::from_secs(10),
            || {
                let dump = self.config_dump();
                let v = dump["version"].as_u64()?;
                let all = dump["cores"]
                    .as_array()?
                    .iter()
                    .all(|c| c["version"].as_u64() == Some(v));
                (v > before && all).then_some(v)
            },
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET on the admin server; None when it cannot be reached.
pub fn admin_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.get(9..12)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// A request as the origin received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub conn: usize,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the origin answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub chunked: bool,
    pub delay: Duration,
}

impl Reply {
    pub fn ok(body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status: 200,
            headers: vec![],
            body: body.into(),
            chunked: false,
            delay: Duration::ZERO,
        }
    }
}

type Handler = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

/// A scriptable HTTP/1.1 origin (thread per connection, keep-alive, CL and chunked bodies).
pub struct Origin {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    pub connections: Arc<AtomicUsize>,
    arrivals: Mutex<Receiver<Received>>,
}

impl Origin {
    pub fn start(handler: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = channel();
        let handler: Handler = Arc::new(handler);
        let (rec, conns) = (received.clone(), connections.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let id = conns.fetch_add(1, Ordering::SeqCst);
                let (h, rec, tx) = (handler.clone(), rec.clone(), tx.clone());
                std::thread::spawn(move || origin_conn(stream, id, &h, &rec, &tx));
            }
        });
        Origin {
            addr,
            received,
            connections,
            arrivals: Mutex::new(rx),
        }
    }

    /// An origin answering 200 with a fixed body.
    pub fn fixed(body: &str) -> Origin {
        let body = body.to_string();
        Origin::start(move |_| Reply::ok(body.clone()))
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Blocks until the next request arrives (its head and body).
    pub fn next_arrival(&self, within: Duration) -> Option<Received> {
        self.arrivals.lock().unwrap().recv_timeout(within).ok()
    }
}

fn read_line(r: &mut impl BufRead) -> Option<String> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line),
    }
}

fn origin_conn(
    stream: TcpStream,
    id: usize,
    handler: &Handler,
    rec: &Mutex<Vec<Received>>,
    tx: &Sender<Received>,
) {
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    loop {
        let Some(line) = read_line(&mut r) else {
            return;
        };
        let mut parts = line.trim_end().splitn(3, ' ');
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut headers = Vec::new();
        loop {
            let Some(h) = read_line(&mut r) else { return };
            let h = h.trim_end_matches(['\r', '\n']);
            if h.is_empty() {
                break;
            }
            if let Some((n, v)) = h.split_once(':') {
                headers.push((n.trim().to_string(), v.trim().to_string()));
            }
        }
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                let Some(size) = read_line(&mut r) else {
                    return;
                };
                let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                    .unwrap_or(0);
                if size == 0 {
                    while read_line(&mut r).is_some_and(|l| !l.trim().is_empty()) {}
                    break;
                }
                let mut chunk = vec![0; size + 2];
                if r.read_exact(&mut chunk).is_err() {
                    return;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            body.resize(n, 0);
            if r.read_exact(&mut body).is_err() {
                return;
            }
        }
        let req = Received {
            conn: id,
            method,
            path,
            headers,
            body,
        };
        rec.lock().unwrap().push(req.clone());
        let _ = tx.send(req.clone());
        let reply = handler(&req);
        if !reply.delay.is_zero() {
            std::thread::sleep(reply.delay);
        }
        let mut out = format!("HTTP/1.1 {} X\r\n", reply.status).into_bytes();
        for (n, v) in &reply.headers {
            out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        if reply.chunked {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
            if w.write_all(&out).is_err() {
                return;
            }
            for piece in reply.body.chunks(7919) {
                let mut c = format!("{:x}\r\n", piece.len()).into_bytes();
                c.extend_from_slice(piece);
                c.extend_from_slice(b"\r\n");
                if w.write_all(&c).is_err() {
                    return;
                }
            }
            if w.write_all(b"0\r\n\r\n").is_err() {
                return;
            }
        } else {
            out.extend_from_slice(
                format!("content-length: {}\r\n\r\n", reply.body.len()).as_bytes(),
            );
            out.extend_from_slice(&reply.body);
            if w.write_all(&out).is_err() {
                return;
            }
        }
    }
}

/// A response as a client saw it.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw keep-alive HTTP/1.1 client connection.
pub struct Client {
    r: BufReader<TcpStream>,
    pub w: TcpStream,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }

    pub fn send(&mut self, raw: &[u8]) {
        self.w.write_all(raw).unwrap();
    }

    pub fn get(&mut self, path: &str) -> Response {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes());
        self.response().expect("response")
    }

    /// Reads one response (any framing); None when the connection closed first.
    pub fn response(&mut self) -> Option<Response> {
        read_response(&mut self.r)
    }

    /// True when the server has closed the connection (EOF or reset) within `within`; false
    /// when the connection is still open then, or sends more bytes.
    pub fn closed_within(&mut self, within: Duration) -> bool {
        self.w.set_read_timeout(Some(within)).unwrap();
        let mut b = [0u8; 1];
        match self.r.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }

    pub fn shutdown_write(&self) {
        let _ = self.w.shutdown(Shutdown::Write);
    }
}

/// Reads one HTTP/1.1 response (any framing); None when the connection closed first.
pub fn read_response(r: &mut impl BufRead) -> Option<Response> {
    let line = read_line(r)?;
    let status: u16 = line.get(9..12)?.parse().ok()?;
    let mut headers = HashMap::new();
    loop {
        let h = read_line(r)?;
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        let (n, v) = h.split_once(':')?;
        headers.insert(n.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let mut body = Vec::new();
    if (100..200).contains(&status) {
        return Some(Response {
            status,
            headers,
            body,
        });
    }
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let size = read_line(r)?;
            let size = usize::from_str_radix(size.trim(), 16).ok()?;
            if size == 0 {
                read_line(r)?;
                break;
            }
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk).ok()?;
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(n) = headers
        .get("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        body.resize(n, 0);
        r.read_exact(&mut body).ok()?;
    } else {
        r.read_to_end(&mut body).ok()?;
    }
    Some(Response {
        status,
        headers,
        body,
    })
}

/// One request on a fresh connection.
pub fn request(addr: SocketAddr, raw: &[u8]) -> Option<Response> {
    let mut c = Client::connect(addr);
    c.send(raw);
    c.response()
}

/// Deterministic pseudo-random bytes (xorshift), for byte-exact body checks.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A minimal HTTP listener config forwarding everything to `upstream`.
pub fn http_config(listen: u16, endpoints: &[SocketAddr], limits: &str) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "listeners:\n  - name: web\n    address: 127.0.0.1:{listen}\n    protocol: http\n    routes:\n      - cluster: app\n\
         clusters:\n  - name: app\n    endpoints: [{}]\n{limits}",
        eps.join(", ")
    )
}

/// Builds the control plane too (first use).
pub fn control_bin() -> PathBuf {
    bin("weft-control")
}

/// A running `weft-control serve` with its own manifest folder and data folder.
pub struct Control {
    pub child: Option<Child>,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub config_dir: PathBuf,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub dir: TempDir,
}

impl Control {
    pub fn start(manifests: &str) -> Control {
        let dir = TempDir::new("control");
        let config_dir = dir.0.join("config");
        let data_dir = dir.0.join("data");
        std::fs::create_dir_all(&config_dir).unwrap();
        std::fs::write(config_dir.join("mesh.yaml"), manifests).unwrap();
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.0.join("control.log");
        let mut c = Control {
            child: None,
            listen,
            admin,
            config_dir,
            data_dir,
            log,
            dir,
        };
        c.launch();
        c
    }

    /// (Re)starts the process on the same ports and folders and waits until it answers.
    pub fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(control_bin())
            .args(["serve", "--config"])
            .arg(&self.config_dir)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--listen",
                &self.listen.to_string(),
                "--admin",
                &self.admin.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let admin = self.admin;
        wait_for(
            "weft-control /ready",
            Duration::from_secs(20),
            || match admin_get(admin, "/ready") {
                Some((200, _)) => Some(()),
                _ => None,
            },
        );
        let listen = self.listen;
        wait_for("weft-control gRPC port", Duration::from_secs(10), || {
            TcpStream::connect(listen).ok().map(|_| ())
        });
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(control_bin())
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "weft-control {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn token(&self, workload: &str, ttl: &str) -> String {
        self.cli(&["token", workload, "--ttl", ttl])
    }

    /// Writes a token to a file for `--token-file`.
    pub fn token_file(&self, workload: &str) -> PathBuf {
        let p = self
            .dir
            .0
            .join(format!("{}.token", workload.replace('/', "_")));
        std::fs::write(&p, self.token(workload, "1h")).unwrap();
        p
    }

    pub fn mint(&self, workload: &str) -> PathBuf {
        let out = self
            .dir
            .0
            .join(format!("mint-{}", workload.replace('/', "_")));
        self.cli(&["mint", workload, "--out", out.to_str().unwrap()]);
        out
    }

    pub fn rotate(&self) -> String {
        self.cli(&["ca", "rotate"])
    }

    pub fn retire(&self, serial: &str) {
        self.cli(&["ca", "retire", serial]);
    }

    pub fn write_manifests(&self, text: &str) {
        let tmp = self.config_dir.join("mesh.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.config_dir.join("mesh.yaml")).unwrap();
    }

    pub fn json(&self, path: &str) -> serde_json::Value {
        let (status, body) = admin_get(self.admin, path)
            .unwrap_or_else(|| panic!("control admin {path} unreachable"));
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// `/proxies` entry of one workload.
    pub fn proxy(&self, workload: &str) -> Option<serde_json::Value> {
        self.json("/proxies")
            .as_array()?
            .iter()
            .find(|p| p["workload"] == workload)
            .cloned()
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One workload of a test mesh: its sidecar's inbound port is in the WorkloadEntry.
#[derive(Debug, Clone)]
pub struct Wl {
    pub name: &'static str,
    pub sa: &'static str,
    pub app: &'static str,
    pub inbound: u16,
}

impl Wl {
    /// A workload of namespace `prod` whose app label and service account are `sa`, with its
    /// sidecar's inbound port on a free port.
    pub fn new(name: &'static str, sa: &'static str) -> Wl {
        Wl {
            name,
            sa,
            app: sa,
            inbound: free_port(),
        }
    }
}

/// A mesh with services `checkout` and `order` in `prod`, and the given workloads.
pub fn mesh_yaml(cert_ttl: &str, workloads: &[Wl], extra: &str) -> String {
    let mut y = format!(
        "apiVersion: weft.dev/v1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec: {{trustDomain: cluster.local, certTTL: {cert_ttl}}}\n"
    );
    for svc in ["checkout", "order"] {
        y.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {svc}, namespace: prod}}\n\
             spec:\n  hosts: [{svc}.prod.svc.cluster.local]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  workloadSelector: {{labels: {{app: {svc}}}}}\n"
        ));
    }
    for w in workloads {
        y.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {}, namespace: prod}}\n\
             spec:\n  address: 127.0.0.1\n  ports: {{http: {}}}\n  labels: {{app: {}}}\n  serviceAccount: {}\n",
            w.name, w.inbound, w.app, w.sa
        ));
    }
    y.push_str(extra);
    y
}

/// A sidecar for `workload` in front of `app`, started against `control`; waits for /ready.
pub struct Sidecar {
    pub proxy: Proxy,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
}

impl Sidecar {
    pub fn start(
        control: &Control,
        workload: &str,
        inbound: u16,
        app: SocketAddr,
        cores: usize,
    ) -> Sidecar {
        let token = control.token_file(workload);
        let outbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let inbound: SocketAddr = format!("127.0.0.1:{inbound}").parse().unwrap();
        let args = [
            "--control".to_string(),
            control.listen.to_string(),
            "--token-file".into(),
            token.to_str().unwrap().into(),
            "--inbound".into(),
            inbound.to_string(),
            "--outbound".into(),
            outbound.to_string(),
            "--app".into(),
            app.to_string(),
            "--cores".into(),
            cores.to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = Proxy::spawn_control(&args);
        let admin = p.admin;
        wait_for("sidecar /ready", Duration::from_secs(30), || {
            if let Some(status) = p.try_exit() {
                panic!("sidecar exited ({status}):\n{}", p.log_text());
            }
            match admin_get(admin, "/ready") {
                Some((200, _)) => Some(()),
                _ => None,
            }
        });
        Sidecar {
            proxy: p,
            outbound,
            inbound,
        }
    }

    /// GET through the outbound listener to a mesh service.
    pub fn call(&self, host: &str, path: &str) -> Option<Response> {
        let mut c = Client::connect(self.outbound);
        c.send(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
        c.response()
    }

    pub fn certs(&self) -> serde_json::Value {
        serde_json::from_str(&self.proxy.get("/certs").1).unwrap()
    }
}

impl Proxy {
    /// Starts weft-proxy in control-plane mode (no config file).
    pub fn spawn_control(extra: &[&str]) -> Proxy {
        Self::launch(None, extra)
    }
}

/// Keep-alive GET load with `Host: host` from `conns` threads until `stop` (and at most 20 000
/// requests per thread); returns the join handle and the (ok, failed) counters. A failed request
/// reconnects.
pub fn background_load(
    addr: SocketAddr,
    host: &str,
    conns: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (
    std::thread::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicU64>,
    Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::AtomicU64;
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let (ok2, failed2) = (ok.clone(), failed.clone());
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let h = std::thread::spawn(move || {
        let workers: Vec<_> = (0..conns)
            .map(|_| {
                let (stop, ok, failed, request) =
                    (stop.clone(), ok2.clone(), failed2.clone(), request.clone());
                std::thread::spawn(move || {
                    let mut c = Client::connect(addr);
                    for _ in 0..20_000 {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        c.send(request.as_bytes());
                        match c.response() {
                            Some(r) if r.status == 200 => {
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                            _ => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                c = Client::connect(addr);
                            }
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
    });
    (h, ok, failed)
}

/// How a test client certificate deviates from a good X.509-SVID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertCase {
    Good,
    Expired,
    NotYetValid,
    OtherCa,
    OtherTrustDomain,
    TwoUriSans,
    CaTrue,
    /// Valid now, expiring in 3 seconds.
    ShortLived,
}

/// A client certificate for `spiffe_id` (e.g. `spiffe://cluster.local/ns/prod/sa/order`), signed
/// by the control plane's active root (or by a fresh CA for `OtherCa`), shaped as `case` says.
pub fn client_cert(
    control: &Control,
    spiffe_id: &str,
    case: CertCase,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let dir = control.data_dir.join("ca");
    let active = std::fs::read_to_string(dir.join("active")).unwrap();
    let active = active.trim();
    let (ca_pem, ca_key) = if case == CertCase::OtherCa {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        (p.self_signed(&key).unwrap().pem(), key)
    } else {
        (
            std::fs::read_to_string(dir.join(format!("{active}.crt.pem"))).unwrap(),
            KeyPair::from_pem(
                &std::fs::read_to_string(dir.join(format!("{active}.key.pem"))).unwrap(),
            )
            .unwrap(),
        )
    };
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    let id = if case == CertCase::OtherTrustDomain {
        spiffe_id.replacen("cluster.local", "other.example", 1)
    } else {
        spiffe_id.to_string()
    };
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    if case == CertCase::TwoUriSans {
        p.subject_alt_names.push(SanType::URI(
            "spiffe://cluster.local/ns/prod/sa/admin"
                .try_into()
                .unwrap(),
        ));
    }
    p.is_ca = if case == CertCase::CaTrue {
        IsCa::Ca(BasicConstraints::Unconstrained)
    } else {
        IsCa::ExplicitNoCa
    };
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    (p.not_before, p.not_after) = match case {
        CertCase::Expired => (now - hour * 3, now - hour),
        CertCase::NotYetValid => (now + hour, now + hour * 3),
        CertCase::ShortLived => (now - hour, now + time::Duration::seconds(3)),
        _ => (now - hour, now + hour),
    };
    let cert = p.signed_by(&key, &issuer).unwrap();
    (
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

/// The control plane's trust bundle (every root it trusts), DER.
pub fn trust_bundle(control: &Control) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let dir = control.data_dir.join("ca");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.to_string_lossy().ends_with(".crt.pem") {
            let pem = std::fs::read_to_string(&p).unwrap();
            let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
            out.push(pem_der(&b64).into());
        }
    }
    out
}

fn pem_der(b64: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

/// A TLS client with its own session cache (so a second connection can resume the first's
/// session). The server's SVID is verified against `bundle` (chain and SVID shape; no name).
/// `client`: the certificate to present.
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
}

impl TlsClient {
    pub fn new(
        bundle: &[rustls::pki_types::CertificateDer<'static>],
        client: Option<(
            Vec<rustls::pki_types::CertificateDer<'static>>,
            rustls::pki_types::PrivateKeyDer<'static>,
        )>,
    ) -> TlsClient {
        let provider = weft_api::crypto_provider();
        let verifier = weft_api::svid::SvidServerVerifier::new(
            bundle,
            "cluster.local",
            Vec::new(),
            provider.clone(),
        )
        .unwrap();
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let config = match client {
            Some((chain, key)) => b.with_client_auth_cert(chain, key).unwrap(),
            None => b.with_no_client_auth(),
        };
        TlsClient {
            config: Arc::new(config),
        }
    }

    /// One request on a new connection. Err: the handshake or the exchange failed, with why.
    pub fn request(&self, addr: SocketAddr, raw: &[u8]) -> Result<Response, String> {
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let conn = rustls::ClientConnection::new(self.config.clone(), name).unwrap();
        let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(raw).map_err(|e| format!("write: {e}"))?;
        tls.flush().map_err(|e| format!("flush: {e}"))?;
        let mut r = BufReader::new(tls);
        match read_response(&mut r) {
            Some(resp) => Ok(resp),
            None => {
                // the alert, if any, is what the read failed with
                let mut b = [0u8; 1];
                Err(match r.get_mut().read(&mut b) {
                    Err(e) => e.to_string(),
                    Ok(_) => "connection closed without a response".into(),
                })
            }
        }
    }
}

/// One request over TLS on a fresh client (no session to resume): see `TlsClient`.
pub fn tls_request(
    addr: SocketAddr,
    bundle: &[rustls::pki_types::CertificateDer<'static>],
    client: Option<(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
    raw: &[u8],
) -> Result<Response, String> {
    TlsClient::new(bundle, client).request(addr, raw)
}
