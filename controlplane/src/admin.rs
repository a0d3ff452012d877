//! The control plane's admin HTTP server: `/proxies`, `/ready`, `/state`.
//!
//! One request per connection, `Connection: close`: it serves operators and scripts only.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::server::Shared;

pub async fn serve(addr: SocketAddr, shared: Arc<Shared>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("admin: cannot bind {addr}: {e}"))?;
    loop {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), handle(s, shared)).await;
        });
    }
}

async fn handle(mut s: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    let path = loop {
        let r = s.read(&mut buf[n..]).await?;
        if r == 0 {
            return Ok(());
        }
        n += r;
        let text = String::from_utf8_lossy(&buf[..n]);
        if text.contains("\r\n\r\n") {
            let line = text.lines().next().unwrap_or("");
            let mut parts = line.split(' ');
            let method = parts.next().unwrap_or("");
            let path = parts
                .next()
                .unwrap_or("/")
                .split('?')
                .next()
                .unwrap_or("/")
                .to_string();
            if method != "GET" {
                return respond(&mut s, 405, "text/plain", "only GET\n").await;
            }
            break path;
        }
        if n == buf.len() {
            return respond(&mut s, 431, "text/plain", "request too large\n").await;
        }
    };
    match path.as_str() {
        "/proxies" => {
            let list: Vec<_> = shared
                .proxies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned()
                .collect();
            let body = serde_json::to_string_pretty(&list).unwrap_or_default();
            respond(&mut s, 200, "application/json", &body).await
        }
        "/state" => {
            let state = shared.state.borrow().clone();
            let ca = shared.ca.borrow().clone();
            let last_error = shared
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let roots: Vec<_> = ca
                .roots
                .iter()
                .map(|r| serde_json::json!({"serial": r.serial, "subject": r.subject, "active": r.serial == ca.active}))
                .collect();
            let body = serde_json::json!({
                "generation": shared.generation.load(Ordering::SeqCst),
                "last_error": last_error,
                "trust_domain": state.trust_domain,
                "cert_ttl_seconds": state.cert_ttl.as_secs(),
                "services": state.services.len(),
                "workloads": state.workloads.len(),
                "roots": roots,
            });
            respond(
                &mut s,
                200,
                "application/json",
                &serde_json::to_string_pretty(&body).unwrap_or_default(),
            )
            .await
        }
        "/ready" => respond(&mut s, 200, "text/plain", "ready\n").await,
        _ => {
            respond(
                &mut s,
                404,
                "text/plain",
                "not found: try /proxies, /state, /ready\n",
            )
            .await
        }
    }
}

async fn respond(s: &mut TcpStream, status: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        match status {
            200 => "OK",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Error",
        },
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}
