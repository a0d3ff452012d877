//! weft-control and control-plane mode of weft-proxy, seen from outside: join tokens, SVIDs,
//! CA persistence and rotation, snapshot push, ACK/NACK, outages and renewal.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, KeyPair, SanType};
use weft_api::proto::{mesh_client::MeshClient, CertifyRequest, CertifyResponse};
use weft_api::JoinToken;
use weft_tests::*;
use x509_parser::prelude::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn csr(san: Option<&str>) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    if let Some(s) = san {
        p.subject_alt_names = vec![SanType::URI(s.try_into().unwrap())];
    }
    p.serialize_request(&key).unwrap().der().to_vec()
}

/// Certify with a join token over a connection pinned to the token's root fingerprint.
fn certify(
    control: &Control,
    token: &str,
    csr_der: Vec<u8>,
) -> Result<CertifyResponse, tonic::Status> {
    let claims = JoinToken::parse_unverified(token).unwrap();
    rt().block_on(async {
        let cfg =
            weft_dataplane::control::client_config(Some(claims.root_fingerprint), None).unwrap();
        let mut client: MeshClient<_> = weft_dataplane::control::connect(control.listen, cfg)
            .await
            .unwrap();
        client
            .certify(CertifyRequest {
                join_token: token.to_string(),
                csr_der,
            })
            .await
            .map(|r| r.into_inner())
    })
}

fn uris(der: &[u8]) -> Vec<String> {
    let (_, x) = parse_x509_certificate(der).unwrap();
    x.subject_alternative_name()
        .unwrap()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(|n| match n {
                    GeneralName::URI(u) => (*u).to_string(),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn workloads() -> Vec<Wl> {
    vec![
        Wl::new("order-1", "order"),
        Wl::new("checkout-1", "checkout"),
    ]
}

/// order's app reaches checkout through order's sidecar.
fn assert_reaches_checkout(order: &Sidecar) {
    let r = order
        .call("checkout.prod.svc.cluster.local", "/")
        .expect("response");
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Apps and sidecars for prod/checkout-1 (1 core) and prod/order-1 (`order_cores`); the
/// checkout app answers `checkout`.
fn order_and_checkout(
    control: &Control,
    wls: &[Wl],
    order_cores: usize,
) -> ([Origin; 2], Sidecar, Sidecar) {
    let apps = [Origin::fixed("checkout"), Origin::fixed("order")];
    let checkout = Sidecar::start(control, "prod/checkout-1", wls[1].inbound, apps[0].addr, 1);
    let order = Sidecar::start(
        control,
        "prod/order-1",
        wls[0].inbound,
        apps[1].addr,
        order_cores,
    );
    (apps, checkout, order)
}

#[test]
fn join_tokens_prove_exactly_one_identity_once() {
    let control = Control::start(&mesh_yaml("1h", &workloads(), ""));
    let order = "spiffe://cluster.local/ns/prod/sa/order";
    let checkout = "spiffe://cluster.local/ns/prod/sa/checkout";

    // a CSR asking for another identity is refused, and does not burn the token
    let token = control.token("prod/order-1", "1h");
    let err = certify(&control, &token, csr(Some(checkout))).expect_err("another SAN");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains(checkout), "{}", err.message());

    // the order-1 token yields prod/order, whatever the CSR's subject says
    let ok = certify(&control, &token, csr(None)).expect("certify");
    assert_eq!(uris(&ok.chain_der[0]), vec![order.to_string()]);
    assert_ne!(ok.spiffe_id, checkout);
    assert_eq!(ok.workload, "prod/order-1");

    // single use
    let again = certify(&control, &token, csr(None)).expect_err("reused");
    assert_eq!(again.code(), tonic::Code::PermissionDenied);
    assert!(
        again.message().contains("already used"),
        "{}",
        again.message()
    );

    // expired
    let short = control.token("prod/order-1", "1s");
    let exp = JoinToken::parse_unverified(&short).unwrap().expires;
    wait_for("token expiry", Duration::from_secs(5), || {
        (SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            >= exp)
            .then_some(())
    });
    let err = certify(&control, &short, csr(None)).expect_err("expired");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("expired"), "{}", err.message());

    // a forged token (claims edited, signature kept) is refused
    let token = control.token("prod/order-1", "1h");
    let mut claims = JoinToken::parse_unverified(&token).unwrap();
    claims.workload = "prod/checkout-1".parse().unwrap();
    let forged_claims = claims.sign(b"not-the-key");
    let forged = format!(
        "{}.{}",
        forged_claims.rsplit_once('.').unwrap().0,
        token.rsplit_once('.').unwrap().1
    );
    let err = certify(&control, &forged, csr(None)).expect_err("forged");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
}

#[test]
fn issued_svids_follow_the_x509_svid_spec() {
    let control = Control::start(&mesh_yaml("2h", &workloads(), ""));
    let token = control.token("prod/checkout-1", "1h");
    let resp = certify(&control, &token, csr(None)).unwrap();
    let (_, leaf) = parse_x509_certificate(&resp.chain_der[0]).unwrap();
    let (_, root) = parse_x509_certificate(&resp.chain_der[1]).unwrap();
    // exactly one URI SAN, the SPIFFE ID, and no other names
    assert_eq!(
        uris(&resp.chain_der[0]),
        vec!["spiffe://cluster.local/ns/prod/sa/checkout".to_string()]
    );
    let bc = leaf
        .basic_constraints()
        .unwrap()
        .expect("basicConstraints present");
    assert!(!bc.value.ca, "leaf must be CA:FALSE");
    let ku = leaf.key_usage().unwrap().expect("keyUsage present");
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    let eku = leaf
        .extended_key_usage()
        .unwrap()
        .expect("extendedKeyUsage present");
    assert!(eku.value.server_auth && eku.value.client_auth);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    assert!(nb <= now - 60, "notBefore is backdated");
    assert!(
        (na - now - 7200).abs() <= 30,
        "lifetime is certTTL: {}",
        na - now
    );
    // chains to a trusted root, which is in the bundle
    leaf.verify_signature(Some(root.public_key()))
        .expect("signed by the root");
    assert!(root.basic_constraints().unwrap().unwrap().value.ca);
    assert!(resp.trust_bundle_der.contains(&resp.chain_der[1]));
    // mint writes the same shape to PEM files
    let out = control.mint("prod/order-1");
    for f in ["svid.pem", "key.pem", "bundle.pem"] {
        assert!(out.join(f).exists(), "{f}");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let ca_key = std::fs::read_dir(control.data_dir.join("ca"))
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().ends_with(".key.pem"))
        .unwrap();
    assert_eq!(
        ca_key.metadata().unwrap().permissions().mode() & 0o777,
        0o600,
        "root key is 0600"
    );
}

#[test]
fn a_restart_keeps_the_root() {
    let mut control = Control::start(&mesh_yaml("1h", &workloads(), ""));
    let before = control.json("/state")["roots"].clone();
    let old = certify(&control, &control.token("prod/order-1", "1h"), csr(None)).unwrap();
    control.kill();
    control.launch();
    assert_eq!(
        control.json("/state")["roots"],
        before,
        "same root after restart"
    );
    let new = certify(&control, &control.token("prod/order-1", "1h"), csr(None)).unwrap();
    assert_eq!(
        old.chain_der[1], new.chain_der[1],
        "new SVIDs chain to the same root"
    );
    let (_, root) = parse_x509_certificate(&new.trust_bundle_der[0]).unwrap();
    let (_, old_leaf) = parse_x509_certificate(&old.chain_der[0]).unwrap();
    old_leaf
        .verify_signature(Some(root.public_key()))
        .expect("existing SVIDs still verify");
}

#[test]
fn sidecars_get_identity_config_and_survive_control_plane_outages() {
    let wls = workloads();
    let mut control = Control::start(&mesh_yaml("1h", &wls, ""));
    let checkout_app = Origin::fixed("checkout app");
    let order_app = Origin::fixed("order app");
    let checkout = Sidecar::start(
        &control,
        "prod/checkout-1",
        wls[1].inbound,
        checkout_app.addr,
        1,
    );
    let order = Sidecar::start(&control, "prod/order-1", wls[0].inbound, order_app.addr, 2);

    let r = order
        .call("checkout.prod.svc.cluster.local", "/pay")
        .unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "checkout app"));
    assert_eq!(
        order.certs()["spiffe_id"],
        "spiffe://cluster.local/ns/prod/sa/order"
    );
    assert!(order.certs()["expires_in_seconds"].as_i64().unwrap() > 3000);
    assert!(order.proxy.metric("weft_cert_expiry_timestamp_seconds") > 0.0);
    let p = wait_for("order ACK on /proxies", Duration::from_secs(10), || {
        control
            .proxy("prod/order-1")
            .filter(|p| p["acked_version"].as_u64() > Some(0))
    });
    assert_eq!(p["identity"], "spiffe://cluster.local/ns/prod/sa/order");
    assert!(p["cert_expiry"].as_str().unwrap().ends_with('Z'));

    // the control plane goes away: traffic keeps flowing on the last snapshot
    control.kill();
    for _ in 0..5 {
        assert_reaches_checkout(&order);
    }
    // it comes back: both sidecars reconnect by themselves
    control.launch();
    wait_for("both sidecars reconnected", Duration::from_secs(20), || {
        (control.proxy("prod/order-1").is_some() && control.proxy("prod/checkout-1").is_some())
            .then_some(())
    });
    assert_reaches_checkout(&order);
    drop(checkout);
}

#[test]
fn manifest_changes_reach_every_core_and_bad_sets_or_nacks_keep_the_last_good() {
    let mut wls = workloads();
    let control = Control::start(&mesh_yaml("1h", &wls, ""));
    let (_apps, _checkout, order) = order_and_checkout(&control, &wls, 2);
    let v1 = order.proxy.version();

    // a new WorkloadEntry reaches every core of the running proxy
    // (it shares checkout-1's sidecar address, so every endpoint the proxy balances over is live)
    let shared_inbound = wls[1].inbound;
    wls.push(Wl {
        name: "checkout-2",
        sa: "checkout",
        app: "checkout",
        inbound: shared_inbound,
    });
    control.write_manifests(&mesh_yaml("1h", &wls, ""));
    let v2 = wait_for(
        "new snapshot on every core",
        Duration::from_secs(10),
        || {
            let dump = order.proxy.config_dump();
            let v = dump["version"].as_u64()?;
            let all = dump["cores"]
                .as_array()?
                .iter()
                .all(|c| c["version"].as_u64() == Some(v));
            (v > v1 && all).then_some(v)
        },
    );
    let dump = order.proxy.config_dump();
    let eps =
        &dump["snapshot"]["clusters"]["outbound|80|checkout.prod.svc.cluster.local"]["endpoints"];
    assert_eq!(eps.as_array().unwrap().len(), 2, "{eps}");
    wait_for("ACK of the new version", Duration::from_secs(10), || {
        control
            .proxy("prod/order-1")
            .filter(|p| p["acked_version"].as_u64() == Some(v2))
    });

    // an invalid set is rejected as a whole, with file, resource and field; nothing is pushed
    control.write_manifests(&mesh_yaml("1h", &wls, "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: bad-1, namespace: prod}\nspec: {address: not-an-ip}\n"));
    let err = wait_for("rejection on /state", Duration::from_secs(10), || {
        control.json("/state")["last_error"]
            .as_str()
            .map(str::to_string)
    });
    assert!(
        err.contains("mesh.yaml")
            && err.contains("WorkloadEntry prod/bad-1")
            && err.contains("spec.address"),
        "{err}"
    );
    assert!(control.log_text().contains("manifests rejected"));
    assert_eq!(order.proxy.version(), v2);
    assert_reaches_checkout(&order);

    // a snapshot the proxy cannot serve is NACKed: it stays on its version, the reason shows
    let udp = "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: dns, namespace: prod}\n\
               spec:\n  hosts: [dns.prod.svc.cluster.local]\n  ports: [{number: 53, name: dns, protocol: UDP}]\n  workloadSelector: {labels: {app: dns}}\n";
    control.write_manifests(&mesh_yaml("1h", &wls, udp));
    let p = wait_for("NACK on /proxies", Duration::from_secs(10), || {
        control
            .proxy("prod/order-1")
            .filter(|p| p["last_nack"].is_string())
    });
    assert!(
        p["last_nack"]
            .as_str()
            .unwrap()
            .contains("protocol UDP is not supported"),
        "{p}"
    );
    assert_eq!(p["acked_version"].as_u64(), Some(v2));
    assert_eq!(
        order.proxy.version(),
        v2,
        "the proxy keeps serving its previous snapshot"
    );
    assert_reaches_checkout(&order);
}

#[test]
fn root_rotation_keeps_both_roots_trusted_until_retire() {
    let wls = workloads();
    let control = Control::start(&mesh_yaml("1h", &wls, ""));
    let order = Sidecar::start(
        &control,
        "prod/order-1",
        wls[0].inbound,
        Origin::fixed("o").addr,
        1,
    );
    let bundle = |s: &Sidecar| -> Vec<String> {
        s.certs()["trust_bundle"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["serial"].as_str().unwrap().to_string())
            .collect()
    };
    let old = bundle(&order);
    assert_eq!(old.len(), 1);
    let new = control.rotate();
    let both = wait_for("bundle with both roots", Duration::from_secs(15), || {
        let b = bundle(&order);
        (b.len() == 2).then_some(b)
    });
    assert!(both.contains(&old[0]) && both.contains(&new), "{both:?}");
    // SVIDs issued now chain to the new root, and a new sidecar joins fine during the overlap
    let resp = certify(&control, &control.token("prod/checkout-1", "1h"), csr(None)).unwrap();
    assert_eq!(weft_api::fingerprint(&resp.chain_der[1]).len(), 64);
    let (_, root) = parse_x509_certificate(&resp.chain_der[1]).unwrap();
    assert_eq!(weft_api::hex(root.raw_serial()), new);
    control.retire(&old[0]);
    let after = wait_for("old root dropped", Duration::from_secs(15), || {
        let b = bundle(&order);
        (b.len() == 1).then_some(b)
    });
    assert_eq!(after, vec![new]);
}

#[test]
fn a_sidecar_renews_under_load_without_failing_a_request() {
    let wls = workloads();
    let control = Control::start(&mesh_yaml("20s", &wls, ""));
    let (_apps, _checkout, order) = order_and_checkout(&control, &wls, 1);
    let first_serial = order.certs()["serial"].as_str().unwrap().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let (load, ok, failed) = background_load(
        order.outbound,
        "checkout.prod.svc.cluster.local",
        2,
        stop.clone(),
    );
    let renewed = wait_for("certificate renewal", Duration::from_secs(25), || {
        let s = order.certs()["serial"].as_str()?.to_string();
        (s != first_serial).then_some(s)
    });
    let before = ok.load(Ordering::SeqCst);
    wait_for("traffic after renewal", Duration::from_secs(10), || {
        (ok.load(Ordering::SeqCst) > before + 50).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();
    assert_ne!(renewed, first_serial);
    assert!(order.proxy.log_text().contains("certificate renewed"));
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "no request failed across the renewal"
    );
    assert!(ok.load(Ordering::SeqCst) > 100);
}
