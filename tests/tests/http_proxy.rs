//! HTTP/1.1 reverse proxy behaviour, seen from a client and an origin on loopback.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use weft_tests::*;

fn addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

#[test]
fn keep_alive_reused_on_both_sides_with_forwarding_headers() {
    let origin = Origin::fixed("hello");
    let port = free_port();
    let proxy = Proxy::start(&http_config(port, &[origin.addr], ""), 1);
    let mut c = Client::connect(addr(port));
    for i in 0..5 {
        c.send(
            format!("GET /r{i} HTTP/1.1\r\nHost: test\r\nConnection: keep-alive, X-Drop\r\nX-Drop: secret\r\nKeep-Alive: timeout=5\r\n\r\n")
                .as_bytes(),
        );
        let r = c.response().expect("response");
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "hello");
        assert_eq!(
            r.header("connection"),
            None,
            "keep-alive is the HTTP/1.1 default"
        );
    }
    let seen = origin.requests();
    assert_eq!(seen.len(), 5);
    assert!(
        seen.iter().all(|r| r.conn == seen[0].conn),
        "one pooled upstream connection: {seen:?}"
    );
    assert_eq!(origin.connections.load(Ordering::SeqCst), 1);
    let first = &seen[0];
    assert_eq!(first.header("x-forwarded-for"), Some("127.0.0.1"));
    let id = first
        .header("x-request-id")
        .expect("x-request-id generated");
    assert_eq!(id.len(), 36, "{id}");
    assert_ne!(Some(id), seen[1].header("x-request-id"));
    for hop in ["x-drop", "keep-alive", "connection"] {
        assert_eq!(first.header(hop), None, "{hop} must not be forwarded");
    }
    assert_eq!(
        proxy.metric("weft_downstream_connections_total{listener=\"web\"}"),
        1.0
    );

    // a client-supplied request id and forwarded-for chain are kept and extended
    c.send(
        b"GET / HTTP/1.1\r\nHost: test\r\nX-Request-Id: abc\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n",
    );
    assert_eq!(c.response().unwrap().status, 200);
    let last = origin.requests().pop().unwrap();
    assert_eq!(last.header("x-request-id"), Some("abc"));
    assert_eq!(last.header("x-forwarded-for"), Some("10.0.0.1, 127.0.0.1"));
}

#[test]
fn bodies_stream_byte_exact_in_both_directions() {
    // the origin echoes the request body, chunked when the request was chunked
    let origin = Origin::start(|req| {
        let chunked = req.header("transfer-encoding").is_some();
        Reply {
            chunked,
            ..Reply::ok(req.body.clone())
        }
    });
    let port = free_port();
    let _proxy = Proxy::start(&http_config(port, &[origin.addr], ""), 1);
    let mut c = Client::connect(addr(port));

    let big = pattern(10 * 1024 * 1024, 7);
    c.send(
        format!(
            "POST /cl HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
            big.len()
        )
        .as_bytes(),
    );
    c.send(&big);
    let r = c.response().unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.body == big,
        "10 MiB content-length body echoed byte-exact"
    );

    let data = pattern(10 * 1024 * 1024 + 123, 9);
    c.send(b"POST /chunked HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n");
    let mut sizes = [1usize, 4095, 65536, 333, 1 << 20].iter().cycle();
    let mut rest = &data[..];
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap()).min(rest.len());
        c.send(format!("{n:x};ext=1\r\n").as_bytes());
        c.send(&rest[..n]);
        c.send(b"\r\n");
        rest = &rest[n..];
    }
    c.send(b"0\r\nX-Trailer: t\r\n\r\n");
    let r = c.response().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert!(
        r.body == data,
        "chunked body echoed byte-exact in both directions"
    );
    let got = origin.requests();
    assert!(got
        .iter()
        .all(|q| q.body.len() == big.len() || q.body == data));

    // the connection is still usable
    assert_eq!(c.get("/after").status, 200);
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let origin = Origin::start(|req| Reply::ok(format!("got {}", req.body.len())));
    let port = free_port();
    let _proxy = Proxy::start(&http_config(port, &[origin.addr], ""), 1);
    let mut c = Client::connect(addr(port));
    c.send(
        b"PUT /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n",
    );
    let interim = c.response().expect("interim response");
    assert_eq!(interim.status, 100);
    c.send(b"hello world");
    let r = c.response().unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "got 11"));
    let req = origin.requests().pop().unwrap();
    assert_eq!(
        req.header("expect"),
        None,
        "weft answered the expectation itself"
    );
    assert_eq!(req.body, b"hello world");
}

#[test]
fn upstream_failures_map_to_502_503_504_with_reasons() {
    let dead = addr(free_port()); // nothing listens here
    let slow = Origin::start(|_| Reply {
        delay: Duration::from_secs(3),
        ..Reply::ok("late")
    });
    let port = free_port();
    let config = format!(
        "listeners:\n  - name: web\n    address: 127.0.0.1:{port}\n    protocol: http\n    routes:\n\
         \x20     - prefix: /down\n        cluster: down\n\
         \x20     - prefix: /empty\n        cluster: empty\n\
         \x20     - prefix: /slow\n        cluster: slow\n\
         \x20     - hosts: [\"only.example.com\"]\n        cluster: down\n\
         clusters:\n  - name: down\n    endpoints: [\"{dead}\"]\n  - name: empty\n    endpoints: []\n\
         \x20 - name: slow\n    endpoints: [\"{}\"]\nlimits:\n  request_timeout: 500ms\n",
        slow.addr
    );
    let proxy = Proxy::start(&config, 1);
    let mut c = Client::connect(addr(port));
    let r = c.get("/down");
    assert_eq!(r.status, 502);
    assert!(r.text().contains("connection refused"), "{}", r.text());
    let r = c.get("/empty");
    assert_eq!(r.status, 503);
    assert!(r.text().contains("no healthy upstream"), "{}", r.text());
    let r = c.get("/slow");
    assert_eq!(r.status, 504);
    assert!(
        r.text().contains("upstream request timeout"),
        "{}",
        r.text()
    );
    let r = c.get("/nothing");
    assert_eq!(r.status, 404);
    assert!(r.text().contains("no route"));
    assert_eq!(
        proxy.metric("weft_upstream_connect_errors_total{cluster=\"down\"}"),
        1.0
    );
    assert_eq!(
        proxy.metric("weft_upstream_timeouts_total{cluster=\"slow\"}"),
        1.0
    );
    assert_eq!(
        proxy.metric("weft_http_requests_total{listener=\"web\",class=\"5xx\"}"),
        3.0
    );
}

#[test]
fn header_limits_answer_431() {
    let origin = Origin::fixed("ok");
    let port = free_port();
    let proxy = Proxy::start(&http_config(port, &[origin.addr], ""), 1);
    let many: String = (0..101).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = request(
        addr(port),
        format!("GET / HTTP/1.1\r\nHost: t\r\n{many}\r\n").as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 431);
    let big = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(61 * 1024)
    );
    let r = request(addr(port), big.as_bytes()).unwrap();
    assert_eq!(r.status, 431);
    // just under the limits is fine
    let fine: String = (0..90).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = request(
        addr(port),
        format!("GET / HTTP/1.1\r\nHost: t\r\n{fine}\r\n").as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(origin.requests().len(), 1);
    assert_eq!(
        proxy.metric("weft_downstream_bad_requests_total{listener=\"web\",status=\"431\"}"),
        2.0
    );
}

#[test]
fn smuggling_and_malformed_framing_get_400_and_never_reach_the_origin() {
    let origin = Origin::fixed("ok");
    let port = free_port();
    let proxy = Proxy::start(&http_config(port, &[origin.addr], ""), 1);
    let cases: &[(&str, &[u8])] = &[
        ("CL and TE", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("TE and CL", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"),
        ("differing CL", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"),
        ("CL list", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4, 5\r\n\r\nabcde"),
        ("bad chunk size", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
        ("negative chunk", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nabc\r\n0\r\n\r\n"),
        ("chunk overflow", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\nabc\r\n"),
        ("chunked twice", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: t\r\nX-A: one\r\n two\r\n\r\n"),
        ("bare LF", b"GET / HTTP/1.1\nHost: t\n\n"),
        ("bare LF in header", b"GET / HTTP/1.1\r\nHost: t\nX-A: b\r\n\r\n"),
        ("NUL in header", b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\0b\r\n\r\n"),
        ("space before colon", b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length : 5\r\n\r\nabcde"),
        ("no host", b"GET / HTTP/1.1\r\n\r\n"),
        ("two hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    ];
    for (name, raw) in cases {
        let mut c = Client::connect(addr(port));
        c.send(raw);
        let r = c
            .response()
            .unwrap_or_else(|| panic!("{name}: no response"));
        assert_eq!(r.status, 400, "{name}: {}", r.text());
        assert_eq!(r.header("connection"), Some("close"), "{name}");
        assert!(
            c.closed_within(Duration::from_secs(5)),
            "{name}: connection must close"
        );
    }
    assert_eq!(
        origin.requests().len(),
        0,
        "nothing reached the origin: {:?}",
        origin.requests()
    );
    assert_eq!(origin.connections.load(Ordering::SeqCst), 0);
    assert_eq!(
        proxy.metric("weft_downstream_bad_requests_total{listener=\"web\",status=\"400\"}"),
        cases.len() as f64
    );
}

#[test]
fn slowloris_is_cut_by_the_header_timeout_while_others_are_served() {
    let origin = Origin::fixed("ok");
    let port = free_port();
    let proxy = Proxy::start(
        &http_config(port, &[origin.addr], "limits:\n  header_read_timeout: 1s\n"),
        1,
    );
    let mut slow = Client::connect(addr(port));
    let stop = Arc::new(AtomicBool::new(false));
    let (s2, w) = (stop.clone(), slow.w.try_clone().unwrap());
    // trickle one header byte every 100 ms, bounded to 10 s
    let trickle = std::thread::spawn(move || {
        use std::io::Write;
        let mut w = w;
        let _ = w.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n");
        for _ in 0..100 {
            if s2.load(Ordering::SeqCst) || w.write_all(b"X").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    // meanwhile a normal client gets served, repeatedly
    let mut fast = Client::connect(addr(port));
    for _ in 0..5 {
        assert_eq!(fast.get("/").status, 200);
    }
    let r = slow.response().expect("408 before close");
    assert_eq!(r.status, 408);
    stop.store(true, Ordering::SeqCst);
    trickle.join().unwrap();
    assert_eq!(fast.get("/").status, 200);
    assert_eq!(
        proxy.metric("weft_downstream_bad_requests_total{listener=\"web\",status=\"408\"}"),
        1.0
    );
}

#[test]
fn sighup_reload_under_load_fails_no_request() {
    let a = Origin::fixed("a");
    let b = Origin::fixed("b");
    let port = free_port();
    let conf_a = http_config(port, &[a.addr], "");
    let conf_b = http_config(port, &[b.addr], "");
    let proxy = Proxy::start(&conf_a, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let (h, ok, failed) = background_load(addr(port), "t", 4, stop.clone());
    wait_for("load running", Duration::from_secs(10), || {
        (ok.load(Ordering::SeqCst) > 50).then_some(())
    });
    for i in 0..6 {
        let v = proxy.reload(if i % 2 == 0 { &conf_b } else { &conf_a });
        assert_eq!(v, i + 2);
        let before = ok.load(Ordering::SeqCst);
        wait_for("traffic after reload", Duration::from_secs(10), || {
            (ok.load(Ordering::SeqCst) > before + 20).then_some(())
        });
    }
    stop.store(true, Ordering::SeqCst);
    h.join().unwrap();
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "no request failed across 6 reloads"
    );
    assert!(
        !a.requests().is_empty() && !b.requests().is_empty(),
        "both configs served traffic"
    );
    assert_eq!(
        proxy.metric("weft_config_reloads_total{result=\"ok\"}"),
        6.0
    );
}

#[test]
fn bad_reload_is_rejected_and_the_previous_snapshot_keeps_serving() {
    let origin = Origin::fixed("still here");
    let port = free_port();
    let proxy = Proxy::start(&http_config(port, &[origin.addr], ""), 1);
    std::fs::write(
        &proxy.config,
        "listeners:\n  - name: web\n    address: 127.0.0.1:1\n    protocol: htp\n",
    )
    .unwrap();
    proxy.signal(libc::SIGHUP);
    let err = wait_for("reload rejected", Duration::from_secs(10), || {
        proxy.config_dump()["last_error"]
            .as_str()
            .map(str::to_string)
    });
    assert!(
        err.contains("listeners[0].protocol") && err.contains("htp"),
        "{err}"
    );
    assert!(err.contains("weft.yaml"), "names the file: {err}");
    assert_eq!(proxy.version(), 1);
    assert_eq!(
        proxy.metric("weft_config_reloads_total{result=\"rejected\"}"),
        1.0
    );
    let r = request(addr(port), b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "still here"));
    assert!(proxy.log_text().contains("reload rejected"));
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits() {
    let origin = Origin::start(|_| Reply {
        delay: Duration::from_millis(700),
        ..Reply::ok("finished")
    });
    let port = free_port();
    let proxy = Proxy::start_with(
        &http_config(port, &[origin.addr], ""),
        &["--cores", "1", "--drain-seconds", "5"],
    );
    let mut idle = Client::connect(addr(port));
    assert_eq!(idle.get("/warm").status, 200);
    let _ = origin.next_arrival(Duration::from_secs(1));
    let mut c = Client::connect(addr(port));
    c.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n");
    origin
        .next_arrival(Duration::from_secs(5))
        .expect("request reached the origin");
    proxy.signal(libc::SIGTERM);
    let r = c.response().expect("in-flight request completes");
    assert_eq!((r.status, r.text().as_str()), (200, "finished"));
    assert_eq!(r.header("connection"), Some("close"));
    assert!(
        idle.closed_within(Duration::from_secs(5)),
        "idle keep-alive connection closed by the drain"
    );
    let status = proxy
        .wait_exit(Duration::from_secs(6))
        .expect("exits within the drain period");
    assert!(status.success(), "{status}");
    assert!(
        std::net::TcpStream::connect(addr(port)).is_err(),
        "no longer accepting"
    );
}

#[test]
fn connections_spread_over_all_cores() {
    let origin = Origin::fixed("ok");
    let port = free_port();
    let proxy = Proxy::start(&http_config(port, &[origin.addr], ""), 2);
    for i in 0..64 {
        let r = request(
            addr(port),
            format!("GET /{i} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
        assert_eq!(r.status, 200);
    }
    let c0 = proxy.metric("weft_core_requests_total{core=\"0\"}");
    let c1 = proxy.metric("weft_core_requests_total{core=\"1\"}");
    assert_eq!(c0 + c1, 64.0);
    assert!(
        c0 > 0.0 && c1 > 0.0,
        "SO_REUSEPORT spreads connections: core0={c0} core1={c1}"
    );
    let (status, text) = proxy.get("/ready");
    assert_eq!(status, 200, "{text}");
    let dump = proxy.config_dump();
    assert_eq!(dump["cores"].as_array().unwrap().len(), 2);
    assert_eq!(dump["snapshot"]["listeners"][0]["name"], "web");
}

#[test]
fn invalid_config_fails_start_with_file_field_and_reason() {
    let mut p = Proxy::spawn(
        "listeners:\n  - name: web\n    address: 127.0.0.1:1\n    protocol: http\n    routes:\n      - cluster: nope\n",
        &["--cores", "1"],
    );
    let status = p.child.wait().unwrap();
    assert!(!status.success());
    let log = p.log_text();
    assert!(
        log.contains("weft.yaml: listeners[0].routes[0].cluster: unknown cluster `nope`"),
        "{log}"
    );
}

#[test]
fn too_little_locked_memory_is_a_clear_error_not_a_panic() {
    let dir = TempDir::new("memlock");
    let cfg = dir.0.join("c.yaml");
    std::fs::write(&cfg, http_config(free_port(), &[], "")).unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -l 64 && exec {} --config {} --cores 1",
            bin("weft-proxy").display(),
            cfg.display()
        ))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ulimit -l"), "{err}");
    assert!(err.contains("locked-memory limit"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
