//! Per-core upstream connection pool: idle keep-alive connections per endpoint, newest first.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::io::BufConn;
use crate::tls::Stream;

pub type Upstream = BufConn<Stream>;

#[derive(Default)]
pub struct Pool {
    idle: RefCell<HashMap<SocketAddr, Vec<(Upstream, Instant)>>>,
}

impl Pool {
    /// The most recently used idle connection to `addr` not older than `max_idle`.
    pub fn take(&self, addr: SocketAddr, max_idle: Duration) -> Option<Upstream> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        while let Some((conn, since)) = list.pop() {
            if since.elapsed() < max_idle {
                return Some(conn);
            }
        }
        None
    }

    /// Returns a connection for reuse; dropped (closed) when the endpoint already has `cap` idle.
    pub fn put(&self, addr: SocketAddr, conn: Upstream, cap: usize) {
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(addr).or_default();
        if list.len() >= cap {
            // the oldest goes: it is the most likely to have been closed by the upstream
            list.remove(0);
        }
        if cap > 0 {
            list.push((conn, Instant::now()));
        }
    }

    /// Drops idle connections past `max_idle` and those of endpoints no longer configured.
    pub fn sweep(&self, keep: impl Fn(&SocketAddr) -> Option<Duration>) {
        self.idle
            .borrow_mut()
            .retain(|addr, list| match keep(addr) {
                Some(max) => {
                    list.retain(|(_, since)| since.elapsed() < max);
                    !list.is_empty()
                }
                None => false,
            });
    }

    pub fn clear(&self) {
        self.idle.borrow_mut().clear();
    }
}
