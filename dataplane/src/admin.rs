//! The admin HTTP server on the agent thread: `/ready`, `/metrics`, `/config_dump`.
//!
//! Deliberately tiny (one request per connection, `Connection: close`): it serves operators and
//! scrapers, never traffic, and must not pull a second HTTP stack into the proxy.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use crate::agent::AgentState;

/// The largest admin request head read (bytes).
const MAX_ADMIN_REQUEST: usize = 8 * 1024;

pub async fn serve(listener: TcpListener, state: Rc<RefCell<AgentState>>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("admin accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::task::spawn_local(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), handle(stream, state)).await;
        });
    }
}

async fn handle(mut stream: TcpStream, state: Rc<RefCell<AgentState>>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let (method, path) = loop {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                break (
                    req.method.unwrap_or("").to_string(),
                    req.path.unwrap_or("/").to_string(),
                );
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_ADMIN_REQUEST => continue,
            _ => return respond(&mut stream, 400, "text/plain", "bad request\n").await,
        }
    };
    let path = path.split('?').next().unwrap_or("/").to_string();
    if method != "GET" {
        return respond(&mut stream, 405, "text/plain", "only GET\n").await;
    }
    match path.as_str() {
        "/ready" => {
            let (ready, why) = state.borrow().readiness();
            let status = if ready { 200 } else { 503 };
            respond(&mut stream, status, "text/plain", &format!("{why}\n")).await
        }
        "/metrics" => {
            let text = crate::agent::gather_metrics(&state).await;
            respond(&mut stream, 200, "text/plain; version=0.0.4", &text).await
        }
        "/config_dump" => {
            let body = state.borrow().config_dump();
            respond(&mut stream, 200, "application/json", &body).await
        }
        "/" => {
            respond(
                &mut stream,
                200,
                "text/plain",
                "weft-proxy admin: /ready /metrics /config_dump /certs\n",
            )
            .await
        }
        "/certs" => {
            let body = state.borrow().certs();
            match body {
                Some(b) => respond(&mut stream, 200, "application/json", &b).await,
                None => {
                    let why = "no workload certificate (static mode, or not issued yet)\n";
                    respond(&mut stream, 404, "text/plain", why).await
                }
            }
        }
        _ => respond(&mut stream, 404, "text/plain", "not found\n").await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        crate::http::reason(status),
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
