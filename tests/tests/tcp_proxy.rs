//! TCP proxy listeners: bidirectional copy with half-close.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

use weft_tests::*;

#[test]
fn tcp_proxy_copies_both_ways_and_propagates_half_close() {
    // the app reads until the client half-closes, then answers and closes its side
    let app = TcpListener::bind("127.0.0.1:0").unwrap();
    let app_addr = app.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut s, _) = app.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            let reply = format!(
                "got {} bytes, sum {}",
                got.len(),
                got.iter().map(|b| *b as u64).sum::<u64>()
            );
            s.write_all(reply.as_bytes()).unwrap();
        }
    });
    let port = free_port();
    let config = format!(
        "listeners:\n  - name: db\n    address: 127.0.0.1:{port}\n    protocol: tcp\n    cluster: app\n\
         clusters:\n  - name: app\n    endpoints: [\"{app_addr}\"]\n"
    );
    let proxy = Proxy::start(&config, 1);
    for size in [5usize, 3 * 1024 * 1024] {
        let data = pattern(size, size as u64);
        let mut s = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(&data).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        let sum: u64 = data.iter().map(|b| *b as u64).sum();
        assert_eq!(reply, format!("got {size} bytes, sum {sum}"));
    }
    server.join().unwrap();
    assert!(
        proxy.metric("weft_downstream_bytes_received_total{listener=\"db\"}")
            >= (3 * 1024 * 1024) as f64
    );
}

#[test]
fn tcp_proxy_closes_when_upstream_is_down() {
    let dead = format!("127.0.0.1:{}", free_port());
    let port = free_port();
    let config = format!(
        "listeners:\n  - name: db\n    address: 127.0.0.1:{port}\n    protocol: tcp\n    cluster: app\n\
         clusters:\n  - name: app\n    endpoints: [\"{dead}\"]\n"
    );
    let proxy = Proxy::start(&config, 1);
    let mut s = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 8];
    assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)), "closed");
    assert_eq!(
        proxy.metric("weft_upstream_connect_errors_total{cluster=\"app\"}"),
        1.0
    );
}
