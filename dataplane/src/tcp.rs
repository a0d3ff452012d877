//! The TCP proxy: bidirectional copy with half-close, connect timeout and idle timeout.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Instant;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use crate::core::{Core, ListenerCtx};
use crate::io::Half;
use crate::proxy::ProxyError;
use crate::tls::{Accepted, Stream};

/// Serves one TCP connection: connect upstream (round robin), then copy both ways. Each
/// direction forwards EOF as a half-close; the session ends when both directions are done or
/// no byte has moved for the idle timeout.
pub async fn serve(core: &Rc<Core>, ctx: &Rc<ListenerCtx>, conn: Accepted) {
    let tables = core.tables();
    let stream = conn.stream;
    if ctx.inbound && !tables.authz_tcp.is_empty() {
        // a sidecar's inbound TCP port: the policies as they apply to TCP (HTTP-only attributes
        // drop an ALLOW rule and are ignored in a DENY rule)
        let caller = conn.peer.as_deref();
        let r = weft_api::authz::Request {
            principal: caller.map(|p| p.principal.as_str()),
            namespace: caller.map(|p| p.namespace.as_str()),
            source_ip: stream
                .tcp()
                .peer_addr()
                .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip()),
            host: "",
            port: ctx.port,
            method: "",
            path: "",
            header: &|_| None,
        };
        let d = tables.authz_tcp.decide(&r);
        core.metrics.authz(&d);
        if !d.allowed {
            debug!(core = core.id, listener = %ctx.name, "RBAC: access denied; closing");
            return;
        }
    }
    let Some(cluster) = tables.tcp.get(&ctx.name).cloned() else {
        return;
    };
    let spec = &cluster.spec;
    let Some(i) = cluster.lb.pick(spec.endpoints.len()) else {
        debug!(core = core.id, listener = %ctx.name, "no endpoint: closing");
        return;
    };
    let endpoint = spec.endpoints[i];
    cluster.counters.request();
    let up = match crate::proxy::connect_upstream(core, spec, endpoint).await {
        Ok(s) => s,
        Err(e) => {
            cluster.counters.connect_error();
            if !matches!(e, ProxyError::ConnectRefused) {
                debug!(core = core.id, listener = %ctx.name, %endpoint, "connect failed: {e}");
            }
            return;
        }
    };
    cluster.active.set(cluster.active.get() + 1);
    let down = Half(Rc::new(RefCell::new(stream)));
    let up = Half(Rc::new(RefCell::new(up)));
    let last = Rc::new(Cell::new(Instant::now()));
    let buffer = tables.limits.buffer_bytes;
    let idle = tables.limits.tcp_idle_timeout;

    let c = ctx.clone();
    let to_up = pump(down.clone(), up.clone(), last.clone(), buffer, move |n| {
        c.counters.add_in(n)
    });
    let c = ctx.clone();
    let to_down = pump(up.clone(), down.clone(), last.clone(), buffer, move |n| {
        c.counters.add_out(n)
    });
    let both = async {
        futures_lite::future::zip(to_up, to_down).await;
    };
    let watchdog = async {
        loop {
            let since = last.get().elapsed();
            if since >= idle {
                debug!(core = core.id, listener = %ctx.name, "tcp idle timeout");
                return;
            }
            glommio::timer::sleep(idle - since).await;
        }
    };
    futures_lite::future::or(both, watchdog).await;
    cluster.active.set(cluster.active.get().saturating_sub(1));
}

/// Copies `from` → `to` until EOF (then half-closes `to`) or an error.
async fn pump(
    mut from: Half<Stream>,
    mut to: Half<Stream>,
    last: Rc<Cell<Instant>>,
    buffer: usize,
    count: impl Fn(u64),
) {
    let mut buf = vec![0u8; buffer];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        last.set(Instant::now());
        if to.write_all(&buf[..n]).await.is_err() || to.flush().await.is_err() {
            return;
        }
        count(n as u64);
    }
    let _ = to.close().await;
}
