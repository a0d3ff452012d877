//! mTLS between sidecars and identity-based authorization, end to end: weft-control and real
//! sidecars on loopback, with test apps behind them and test clients in front.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use weft_tests::{
    client_cert, free_port, mesh_yaml, tls_request, trust_bundle, wait_for, CertCase, Client,
    Control, Origin, Reply, Sidecar, TempDir, Wl,
};

const ORDER: &str = "spiffe://cluster.local/ns/prod/sa/order";
const CHECKOUT: &str = "spiffe://cluster.local/ns/prod/sa/checkout";
const CHECKOUT_HOST: &str = "checkout.prod.svc.cluster.local";

fn strict() -> &'static str {
    "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: prod}\nspec: {mtls: {mode: STRICT}}\n"
}

fn permissive() -> &'static str {
    "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: prod}\nspec: {mtls: {mode: PERMISSIVE}}\n"
}

/// An AuthorizationPolicy on checkout's workloads with the given action and rules (YAML flow).
fn policy(name: &str, action: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: prod}}\n\
         spec: {{selector: {{matchLabels: {{app: checkout}}}}, action: {action}, rules: {rules}}}\n"
    )
}

fn allow_order() -> String {
    policy(
        "checkout-allow-order",
        "ALLOW",
        "[{from: [{source: {principals: [cluster.local/ns/prod/sa/order]}}]}]",
    )
}

/// The demo's three workloads on free ports.
fn workloads() -> Vec<Wl> {
    vec![
        Wl::new("checkout-1", "checkout"),
        Wl::new("order-1", "order"),
        Wl::new("other-1", "other"),
    ]
}

/// weft-control on the demo workloads plus `extra` manifests, an XFCC app, and checkout's
/// sidecar in front of it.
fn checkout_alone(extra: &str) -> (Vec<Wl>, Control, Origin, Sidecar) {
    let w = workloads();
    let control = Control::start(&mesh_yaml("1h", &w, extra));
    let app = xfcc_app();
    let checkout = Sidecar::start(&control, "prod/checkout-1", w[0].inbound, app.addr, 1);
    (w, control, app, checkout)
}

/// An app that answers with the x-forwarded-client-cert it received ("none" without one).
fn xfcc_app() -> Origin {
    Origin::start(|r| Reply::ok(r.header("x-forwarded-client-cert").unwrap_or("none")))
}

fn get(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()
}

/// Waits until every core of `sidecar` serves a snapshot whose dump satisfies `f` and the
/// control plane has its ACK for it.
fn wait_applied(control: &Control, sidecar: &Sidecar, workload: &str, f: impl Fn(&str) -> bool) {
    wait_for(
        "snapshot applied and ACKed",
        Duration::from_secs(20),
        || {
            let dump = sidecar.proxy.config_dump();
            let v = dump["version"].as_u64()?;
            if !f(&dump.to_string()) {
                return None;
            }
            let acked = control.proxy(workload)?["acked_version"].as_u64()?;
            (acked == v).then_some(())
        },
    );
}

#[test]
fn the_scene_plaintext_and_tls_denied_mtls_allowed_other_caller_forbidden() {
    let w = workloads();
    let extra = format!("{}{}", strict(), allow_order());
    let control = Control::start(&mesh_yaml("1h", &w, &extra));
    let app = xfcc_app();
    let checkout = Sidecar::start(&control, "prod/checkout-1", w[0].inbound, app.addr, 1);
    let order = Sidecar::start(&control, "prod/order-1", w[1].inbound, app.addr, 1);
    let other = Sidecar::start(&control, "prod/other-1", w[2].inbound, app.addr, 1);

    // 1. plaintext straight to checkout's sidecar: STRICT closes it without an answer
    let mut c = Client::connect(checkout.inbound);
    c.send(&get(CHECKOUT_HOST, "/"));
    assert!(c.response().is_none(), "plaintext must get no response");
    // 2. TLS where only the server proves its name: the handshake is refused
    let bundle = trust_bundle(&control);
    // (the client sees the certificate_required alert, or a reset when the server closes first)
    tls_request(checkout.inbound, &bundle, None, &get(CHECKOUT_HOST, "/"))
        .expect_err("server-only TLS must be refused");
    // 3. mTLS from order: allowed; the app learns both names, and a forged XFCC is dropped
    let mut c = Client::connect(order.outbound);
    c.send(
        format!(
            "GET / HTTP/1.1\r\nHost: {CHECKOUT_HOST}\r\nx-forwarded-client-cert: By=spiffe://cluster.local/ns/prod/sa/checkout;URI=spiffe://cluster.local/ns/prod/sa/admin\r\n\r\n"
        )
        .as_bytes(),
    );
    let r = c.response().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), format!("By={CHECKOUT};URI={ORDER}"));
    let seen = app.requests();
    let last = seen.last().unwrap();
    let xfccs = last
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("x-forwarded-client-cert"))
        .count();
    assert_eq!(xfccs, 1, "the forged header must be replaced, not joined");
    // 4. mTLS from prod/other: 403
    let r = other.call(CHECKOUT_HOST, "/").unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.text().trim(), "RBAC: access denied");
    assert_eq!(
        app.requests().len(),
        1,
        "a denied request never reaches the app"
    );
    // a denied request with a body still gets its 403 (not a reset), and the connection serves on
    let mut c = Client::connect(other.outbound);
    let body = vec![b'x'; 200_000];
    c.send(
        format!(
            "POST /upload HTTP/1.1\r\nHost: {CHECKOUT_HOST}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    c.send(&body);
    let r = c.response().unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.text().trim(), "RBAC: access denied");
    c.send(&get(CHECKOUT_HOST, "/"));
    assert_eq!(c.response().unwrap().status, 403);

    let m = |name: &str| checkout.proxy.metric(name);
    assert_eq!(
        m("weft_authz_decisions_total{policy=\"prod/checkout-allow-order\",decision=\"allow\"}"),
        1.0
    );
    assert_eq!(
        m("weft_authz_decisions_total{policy=\"\",decision=\"deny\"}"),
        3.0
    );
    assert!(m("weft_tls_handshake_failures_total{side=\"inbound\",reason=\"not_tls\"}") >= 1.0);
    assert!(
        m("weft_tls_handshake_failures_total{side=\"inbound\",reason=\"no_client_certificate\"}")
            >= 1.0
    );
    // order's connection, other's, and other's again after the refused body closed it
    assert_eq!(
        m("weft_tls_handshakes_total{side=\"inbound\",kind=\"full\"}")
            + m("weft_tls_handshakes_total{side=\"inbound\",kind=\"resumed\"}"),
        3.0
    );
    assert_eq!(
        order
            .proxy
            .metric("weft_tls_handshakes_total{side=\"outbound\""),
        1.0
    );
}

#[test]
fn client_certificates_must_be_valid_svids_of_the_mesh() {
    let (_, control, app, checkout) = checkout_alone(strict());
    let bundle = trust_bundle(&control);
    let call = |case| {
        tls_request(
            checkout.inbound,
            &bundle,
            Some(client_cert(&control, ORDER, case)),
            &get(CHECKOUT_HOST, "/"),
        )
    };

    let r = call(CertCase::Good).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), format!("By={CHECKOUT};URI={ORDER}"));

    let failures = |reason: &str| {
        checkout.proxy.metric(&format!(
            "weft_tls_handshake_failures_total{{side=\"inbound\",reason=\"{reason}\"}}"
        ))
    };
    for (case, reasons) in [
        (CertCase::Expired, &["certificate_expired"][..]),
        (CertCase::NotYetValid, &["certificate_not_yet_valid"]),
        (CertCase::OtherCa, &["unknown_ca"]),
        (CertCase::OtherTrustDomain, &["not_an_svid"]),
        (CertCase::TwoUriSans, &["not_an_svid"]),
        (CertCase::CaTrue, &["not_an_svid", "bad_certificate"]),
    ] {
        let before: f64 = reasons.iter().map(|r| failures(r)).sum();
        let e = call(case).expect_err(&format!("{case:?} must be refused"));
        assert!(!e.is_empty());
        wait_for(
            &format!("{case:?} counted as {reasons:?}"),
            Duration::from_secs(5),
            || (reasons.iter().map(|r| failures(r)).sum::<f64>() == before + 1.0).then_some(()),
        );
    }
    assert_eq!(
        app.requests().len(),
        1,
        "only the good certificate got through"
    );
}

#[test]
fn a_server_with_another_workloads_svid_is_refused_before_the_request_is_sent() {
    let w = workloads();
    let control = Control::start(&mesh_yaml("1h", &w, ""));
    let app = xfcc_app();
    // prod/other-1's sidecar listens where checkout-1's WorkloadEntry says checkout is
    let _impostor = Sidecar::start(&control, "prod/other-1", w[0].inbound, app.addr, 1);
    let order = Sidecar::start(&control, "prod/order-1", w[1].inbound, app.addr, 1);
    let r = order.call(CHECKOUT_HOST, "/").unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    let body = r.text();
    assert!(
        body.contains("secure naming") && body.contains("spiffe://cluster.local/ns/prod/sa/other"),
        "{body}"
    );
    assert!(app.requests().is_empty(), "no byte of the request was sent");
    assert_eq!(
        order.proxy.metric(
            "weft_tls_handshake_failures_total{side=\"outbound\",reason=\"secure_naming\"}"
        ),
        1.0
    );
}

#[test]
fn permissive_plaintext_passes_rules_without_identities_but_never_those_with_them() {
    let w = workloads();
    let rules = "[{to: [{operation: {paths: [/public/*]}}]}, \
                 {from: [{source: {principals: [cluster.local/ns/prod/sa/order]}}], to: [{operation: {paths: [/private]}}]}, \
                 {from: [{source: {namespaces: [prod]}}], to: [{operation: {paths: [/prod-only]}}]}]";
    let extra = format!(
        "{}{}",
        permissive(),
        policy("checkout-mixed", "ALLOW", rules)
    );
    let control = Control::start(&mesh_yaml("1h", &w, &extra));
    let app = xfcc_app();
    let checkout = Sidecar::start(&control, "prod/checkout-1", w[0].inbound, app.addr, 1);
    let order = Sidecar::start(&control, "prod/order-1", w[1].inbound, app.addr, 1);

    let plain = |path: &str| {
        let mut c = Client::connect(checkout.inbound);
        c.send(&get(CHECKOUT_HOST, path));
        c.response().unwrap()
    };
    let r = plain("/public/a");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "none", "plaintext carries no identity");
    assert_eq!(plain("/private").status, 403);
    assert_eq!(plain("/prod-only").status, 403);

    for path in ["/public/a", "/private", "/prod-only"] {
        let r = order.call(CHECKOUT_HOST, path).unwrap();
        assert_eq!(r.status, 200, "{path} over mTLS as prod/order");
        assert_eq!(r.text(), format!("By={CHECKOUT};URI={ORDER}"));
    }
}

#[test]
fn paths_are_normalized_before_authorization_and_deny_overrides_allow() {
    let w = workloads();
    let extra = format!(
        "{}{}{}",
        strict(),
        allow_order(),
        policy(
            "checkout-deny-admin",
            "DENY",
            "[{to: [{operation: {paths: [/admin, /admin/*]}}]}]"
        )
    );
    let control = Control::start(&mesh_yaml("1h", &w, &extra));
    let app = Origin::start(|r| Reply::ok(r.path.clone()));
    let _checkout = Sidecar::start(&control, "prod/checkout-1", w[0].inbound, app.addr, 1);
    let order = Sidecar::start(&control, "prod/order-1", w[1].inbound, app.addr, 1);

    let status = |path: &str| order.call(CHECKOUT_HOST, path).unwrap();
    // DENY wins over the ALLOW that order's identity matches
    for path in [
        "/admin",
        "/admin/users",
        "/a/../admin",
        "//admin",
        "/%2e%2e/admin",
        "/./admin",
        "/%61dmin",
    ] {
        let r = status(path);
        assert_eq!(r.status, 403, "{path}: {}", r.text());
    }
    for path in ["/x%2Fadmin", "/x%5Cadmin", "/x%2fadmin"] {
        let r = status(path);
        assert_eq!(r.status, 400, "{path}: {}", r.text());
    }
    // the app receives the request that was checked
    let r = status("/a/./b/../c?q=%2F");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "/a/c?q=%2F");
    let r = status("/ok");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "/ok");
    // `OPTIONS *` has no path: routed as `/`, matched by no `paths` rule
    let mut c = Client::connect(order.outbound);
    c.send(format!("OPTIONS * HTTP/1.1\r\nHost: {CHECKOUT_HOST}\r\n\r\n").as_bytes());
    let r = c.response().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "*");
    assert_eq!(app.requests().len(), 3);
}

#[test]
fn a_policy_pushed_while_connections_are_open_applies_to_their_next_request() {
    let w = workloads();
    let base = mesh_yaml("1h", &w, &format!("{}{}", strict(), allow_order()));
    let control = Control::start(&base);
    let app = xfcc_app();
    let checkout = Sidecar::start(&control, "prod/checkout-1", w[0].inbound, app.addr, 1);
    let order = Sidecar::start(&control, "prod/order-1", w[1].inbound, app.addr, 1);

    let mut c = Client::connect(order.outbound);
    c.send(&get(CHECKOUT_HOST, "/"));
    assert_eq!(c.response().unwrap().status, 200);

    let deny = policy(
        "checkout-deny-order",
        "DENY",
        "[{from: [{source: {principals: [cluster.local/ns/prod/sa/order]}}]}]",
    );
    control.write_manifests(&format!("{base}{deny}"));
    wait_applied(&control, &checkout, "prod/checkout-1", |d| {
        d.contains("checkout-deny-order")
    });

    // the same downstream connection, and the same pooled mTLS connection between the sidecars
    c.send(&get(CHECKOUT_HOST, "/"));
    let r = c.response().unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(
        checkout
            .proxy
            .metric("weft_tls_handshakes_total{side=\"inbound\""),
        1.0,
        "the second request rode the connection opened before the push"
    );

    control.write_manifests(&base);
    wait_applied(&control, &checkout, "prod/checkout-1", |d| {
        !d.contains("checkout-deny-order")
    });
    c.send(&get(CHECKOUT_HOST, "/"));
    assert_eq!(c.response().unwrap().status, 200);
}

/// Runs `cmd` with `input` on stdin; returns stdout.
fn run(cmd: &mut Command, input: &[u8]) -> String {
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (is it installed? .ci/run installs it)"));
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn interop_curl_and_openssl_with_an_svid_from_weft_control_call_the_inbound_port() {
    let w = workloads();
    let control = Control::start(&mesh_yaml(
        "1h",
        &w,
        &format!("{}{}", strict(), allow_order()),
    ));
    let app = xfcc_app();
    let checkout = Sidecar::start(&control, "prod/checkout-1", w[0].inbound, app.addr, 1);
    let svid = control.mint("prod/order-1");
    let f = |n: &str| svid.join(n).to_str().unwrap().to_string();
    let expected = format!("By={CHECKOUT};URI={ORDER}");

    // curl cannot check a SPIFFE ID (no DNS name in an SVID): -k skips only its own check of
    // the server; the sidecar still verifies curl's certificate
    let out = run(
        Command::new("curl").args([
            "-sk",
            "--cert",
            &f("svid.pem"),
            "--key",
            &f("key.pem"),
            &format!("https://{}/", checkout.inbound),
        ]),
        b"",
    );
    assert_eq!(out, expected, "curl");
    // without a client certificate curl gets nothing
    let out = run(
        Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("https://{}/", checkout.inbound)),
        b"",
    );
    assert_eq!(out, "000", "curl without a certificate");

    // openssl verifies the server's chain against the bundle and presents the SVID
    let out = run(
        Command::new("openssl").args([
            "s_client",
            "-connect",
            &checkout.inbound.to_string(),
            "-cert",
            &f("svid.pem"),
            "-key",
            &f("key.pem"),
            "-CAfile",
            &f("bundle.pem"),
            "-verify_return_error",
            "-quiet",
        ]),
        format!("GET / HTTP/1.1\r\nHost: {CHECKOUT_HOST}\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    assert!(out.contains("HTTP/1.1 200"), "openssl: {out}");
    assert!(out.contains(&expected), "openssl: {out}");
}

#[test]
fn interop_weft_outbound_calls_nginx_that_verifies_client_certificates() {
    let nginx_port = free_port();
    let w = workloads();
    // a mesh service "legacy" served by nginx, which holds an SVID minted by weft-control
    let legacy = format!(
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: legacy, namespace: prod}}\n\
         spec:\n  hosts: [legacy.prod.svc.cluster.local]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  workloadSelector: {{labels: {{app: legacy}}}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: legacy-1, namespace: prod}}\n\
         spec:\n  address: 127.0.0.1\n  ports: {{http: {nginx_port}}}\n  labels: {{app: legacy}}\n  serviceAccount: legacy\n"
    );
    let control = Control::start(&mesh_yaml("1h", &w, &legacy));
    let svid = control.mint("prod/legacy-1");
    let dir = TempDir::new("nginx");
    let f = |n: &str| svid.join(n).to_str().unwrap().to_string();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n\
           server {{\n    listen 127.0.0.1:{nginx_port} ssl;\n    ssl_protocols TLSv1.3;\n\
             ssl_certificate {cert};\n    ssl_certificate_key {key};\n\
             ssl_client_certificate {bundle};\n    ssl_verify_client on;\n\
             location / {{ return 200 \"verify=$ssl_client_verify\"; }}\n  }}\n}}\n",
        d = dir.0.display(),
        cert = f("svid.pem"),
        key = f("key.pem"),
        bundle = f("bundle.pem"),
    );
    let conf_path = dir.0.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let mut nginx = Command::new("nginx")
        .arg("-c")
        .arg(&conf_path)
        .arg("-p")
        .arg(&dir.0)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("nginx: {e} (apt-get install nginx-light; .ci/run does)"));
    let addr: SocketAddr = format!("127.0.0.1:{nginx_port}").parse().unwrap();
    wait_for("nginx listening", Duration::from_secs(10), || {
        std::net::TcpStream::connect(addr).ok().map(|_| ())
    });
    let app = xfcc_app();
    let order = Sidecar::start(&control, "prod/order-1", w[1].inbound, app.addr, 1);
    let r = order.call("legacy.prod.svc.cluster.local", "/").unwrap();
    let _ = nginx.kill();
    let _ = nginx.wait();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "verify=SUCCESS");
    assert_eq!(
        order
            .proxy
            .metric("weft_tls_handshakes_total{side=\"outbound\""),
        1.0
    );
}

#[test]
fn a_tcp_port_closes_connections_the_policy_denies() {
    let w = workloads();
    let ledger_port = free_port();
    let extra = format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: ledger, namespace: prod}}\n\
         spec:\n  hosts: [ledger.prod.svc.cluster.local]\n  ports: [{{number: 5432, name: tcp, protocol: TCP}}]\n  workloadSelector: {{labels: {{app: ledger}}}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: ledger-1, namespace: prod}}\n\
         spec:\n  address: 127.0.0.1\n  ports: {{tcp: {ledger_port}}}\n  labels: {{app: ledger}}\n  serviceAccount: ledger\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ledger-allow-order, namespace: prod}}\n\
         spec: {{selector: {{matchLabels: {{app: ledger}}}}, rules: [{{from: [{{source: {{principals: [cluster.local/ns/prod/sa/order]}}}}]}}]}}\n",
        strict()
    );
    let control = Control::start(&mesh_yaml("1h", &w, &extra));
    // the app speaks HTTP, which a TCP port carries as bytes
    let app = xfcc_app();
    let ledger = Sidecar::start(&control, "prod/ledger-1", ledger_port, app.addr, 1);
    let dump = ledger.proxy.config_dump();
    assert!(
        dump["snapshot"]["listeners"][0].get("tcp").is_some(),
        "inbound is a TCP listener: {}",
        dump["snapshot"]["listeners"][0]
    );
    let bundle = trust_bundle(&control);
    let raw = get("ledger", "/");
    let r = tls_request(
        ledger.inbound,
        &bundle,
        Some(client_cert(&control, ORDER, CertCase::Good)),
        &raw,
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "none", "a TCP port adds no header");
    tls_request(
        ledger.inbound,
        &bundle,
        Some(client_cert(
            &control,
            "spiffe://cluster.local/ns/prod/sa/other",
            CertCase::Good,
        )),
        &raw,
    )
    .expect_err("prod/other is denied: the connection is closed");
    assert_eq!(app.requests().len(), 1);
    assert_eq!(
        ledger
            .proxy
            .metric("weft_authz_decisions_total{policy=\"\",decision=\"deny\"}"),
        1.0
    );
}

#[test]
fn a_resumed_session_never_outlives_a_bundle_change_or_the_peer_certificate() {
    let (_, control, _app, checkout) = checkout_alone(strict());
    let raw = get(CHECKOUT_HOST, "/");
    let handshakes = |kind: &str| {
        checkout.proxy.metric(&format!(
            "weft_tls_handshakes_total{{side=\"inbound\",kind=\"{kind}\"}}"
        ))
    };

    // a second connection of the same client resumes the first one's session
    let client = weft_tests::TlsClient::new(
        &trust_bundle(&control),
        Some(client_cert(&control, ORDER, CertCase::Good)),
    );
    assert_eq!(client.request(checkout.inbound, &raw).unwrap().status, 200);
    assert_eq!(client.request(checkout.inbound, &raw).unwrap().status, 200);
    assert_eq!((handshakes("full"), handshakes("resumed")), (1.0, 1.0));

    // a new root joins the bundle: the sidecar's session caches start empty
    let acked = |c: &Control| c.proxy("prod/checkout-1").unwrap()["acked_version"].as_u64();
    let before = acked(&control);
    control.rotate();
    wait_for("the new bundle ACKed", Duration::from_secs(20), || {
        (acked(&control) > before && checkout.certs()["trust_bundle"].as_array()?.len() == 2)
            .then_some(())
    });
    assert_eq!(client.request(checkout.inbound, &raw).unwrap().status, 200);
    assert_eq!(
        (handshakes("full"), handshakes("resumed")),
        (2.0, 1.0),
        "no resumption across a bundle change"
    );

    // a session made with a certificate that has since expired is not resumed
    let short = weft_tests::TlsClient::new(
        &trust_bundle(&control),
        Some(client_cert(&control, ORDER, CertCase::ShortLived)),
    );
    assert_eq!(short.request(checkout.inbound, &raw).unwrap().status, 200);
    let expired = |reason: &str| {
        checkout.proxy.metric(&format!(
            "weft_tls_handshake_failures_total{{side=\"inbound\",reason=\"{reason}\"}}"
        ))
    };
    // the certificate expires 3 s after it was made: resume until the sidecar refuses
    wait_for(
        "the resumed session refused",
        Duration::from_secs(15),
        || short.request(checkout.inbound, &raw).err(),
    );
    assert_eq!(expired("certificate_expired"), 1.0);
    assert!(
        handshakes("resumed") >= 2.0,
        "the short-lived session was resumed before"
    );
}

#[test]
fn permissive_to_strict_closes_plaintext_connections_already_open() {
    let w = workloads();
    let base = mesh_yaml("1h", &w, permissive());
    let control = Control::start(&base);
    let app = xfcc_app();
    let checkout = Sidecar::start(&control, "prod/checkout-1", w[0].inbound, app.addr, 1);
    let mut plain = Client::connect(checkout.inbound);
    plain.send(&get(CHECKOUT_HOST, "/"));
    assert_eq!(plain.response().unwrap().status, 200);

    control.write_manifests(&mesh_yaml("1h", &w, strict()));
    wait_applied(&control, &checkout, "prod/checkout-1", |d| {
        d.contains("\"mtls\":\"STRICT\"")
    });
    plain.send(&get(CHECKOUT_HOST, "/"));
    assert!(
        plain.response().is_none(),
        "the open plaintext connection is closed"
    );
    let mut fresh = Client::connect(checkout.inbound);
    fresh.send(&get(CHECKOUT_HOST, "/"));
    assert!(
        fresh.response().is_none(),
        "a new plaintext connection is refused"
    );
    let r = tls_request(
        checkout.inbound,
        &trust_bundle(&control),
        Some(client_cert(&control, ORDER, CertCase::Good)),
        &get(CHECKOUT_HOST, "/"),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(app.requests().len(), 2);
}
