//! X.509-SVID verification for rustls, both directions: rustls (webpki) checks the chain to the
//! trust bundle, the validity window and the key usage for the side; weft adds the SVID rules
//! webpki does not know — exactly one URI SAN that is a SPIFFE ID of the mesh's trust domain,
//! not a CA, `digitalSignature` and no certificate signing — and, for a client verifying a
//! server, secure naming: the server's identity must be one allowed to serve the destination.
//! Sans-I/O: usable from the glommio data plane and the tokio control plane alike.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::SpiffeId;

/// Checks the SVID rules on a leaf webpki has already verified; returns its identity.
pub fn check_shape(der: &[u8], trust_domain: &str) -> Result<SpiffeId, String> {
    let (_, x) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unparseable certificate: {e}"))?;
    if x.basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca)
    {
        return Err("an SVID leaf must not be a CA".into());
    }
    // X509-SVID §4.3: a leaf sets digitalSignature and neither keyCertSign nor cRLSign
    let ku = x
        .key_usage()
        .ok()
        .flatten()
        .ok_or("an SVID leaf needs a key usage extension with digitalSignature")?;
    if !ku.value.digital_signature() {
        return Err("an SVID leaf needs the digitalSignature key usage".into());
    }
    if ku.value.key_cert_sign() || ku.value.crl_sign() {
        return Err("an SVID leaf must not sign certificates or CRLs".into());
    }
    let (id, _) = crate::identity::spiffe_of(der)?;
    if id.trust_domain != trust_domain {
        return Err(format!("{id} is not in trust domain {trust_domain}"));
    }
    Ok(id)
}

fn general(e: impl Into<String>) -> rustls::Error {
    rustls::Error::General(e.into())
}

/// Verifies a server's SVID (used by the outbound side).
#[derive(Debug)]
pub struct SvidServerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: String,
    /// Identities allowed to serve the destination; empty: any SVID of the trust domain.
    allowed: Vec<SpiffeId>,
    provider: Arc<CryptoProvider>,
}

impl SvidServerVerifier {
    pub fn new(
        bundle: &[CertificateDer<'static>],
        trust_domain: &str,
        allowed: Vec<SpiffeId>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, rustls::Error> {
        let mut roots = RootCertStore::empty();
        for c in bundle {
            roots.add(c.clone())?;
        }
        Ok(SvidServerVerifier {
            roots: Arc::new(roots),
            trust_domain: trust_domain.to_string(),
            allowed,
            provider,
        })
    }
}

impl ServerCertVerifier for SvidServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // SVIDs carry no DNS name: the name check is secure naming below, not webpki's
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let id = check_shape(end_entity, &self.trust_domain).map_err(general)?;
        if !self.allowed.is_empty() && !self.allowed.contains(&id) {
            return Err(general(format!(
                "secure naming: {id} is not allowed to serve this destination"
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies a client's SVID (used by the inbound side). `mandatory`: STRICT mode.
#[derive(Debug)]
pub struct SvidClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl SvidClientVerifier {
    pub fn new(
        bundle: &[CertificateDer<'static>],
        trust_domain: &str,
        mandatory: bool,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, rustls::Error> {
        let mut roots = RootCertStore::empty();
        for c in bundle {
            roots.add(c.clone())?;
        }
        let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        let builder = if mandatory {
            builder
        } else {
            builder.allow_unauthenticated()
        };
        let inner = builder.build().map_err(|e| general(e.to_string()))?;
        Ok(SvidClientVerifier {
            inner,
            trust_domain: trust_domain.to_string(),
        })
    }
}

impl ClientCertVerifier for SvidClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_shape(end_entity, &self.trust_domain).map_err(general)?;
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType,
    };
    use time::{Duration, OffsetDateTime};

    struct Ca {
        der: CertificateDer<'static>,
        key: KeyPair,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let der = p
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("{e}"))
            .der()
            .clone();
        Ca { der, key }
    }

    struct Leaf {
        uris: Vec<&'static str>,
        is_ca: bool,
        from: i64,
        to: i64,
    }

    fn leaf(ca: &Ca, l: Leaf) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut p = CertificateParams::default();
        p.subject_alt_names = l
            .uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap_or_else(|_| panic!("uri"))))
            .collect();
        p.is_ca = if l.is_ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        p.not_before = now + Duration::hours(l.from);
        p.not_after = now + Duration::hours(l.to);
        let issuer = Issuer::from_ca_cert_der(&ca.der, &ca.key).unwrap_or_else(|e| panic!("{e}"));
        p.signed_by(&key, &issuer)
            .unwrap_or_else(|e| panic!("{e}"))
            .der()
            .clone()
    }

    const ORDER: &str = "spiffe://cluster.local/ns/prod/sa/order";
    const CHECKOUT: &str = "spiffe://cluster.local/ns/prod/sa/checkout";

    fn ok(uris: Vec<&'static str>) -> Leaf {
        Leaf {
            uris,
            is_ca: false,
            from: -1,
            to: 1,
        }
    }

    #[test]
    fn client_and_server_verification_cases() {
        let mesh = ca();
        let other = ca();
        let provider = crate::crypto_provider();
        let bundle = vec![mesh.der.clone()];
        let client = SvidClientVerifier::new(&bundle, "cluster.local", true, provider.clone())
            .unwrap_or_else(|e| panic!("{e}"));
        let allowed: Vec<SpiffeId> = vec![CHECKOUT.parse().unwrap_or_else(|e| panic!("{e}"))];
        let server = SvidServerVerifier::new(&bundle, "cluster.local", allowed, provider)
            .unwrap_or_else(|e| panic!("{e}"));
        let now = UnixTime::now();
        let name = ServerName::try_from("checkout").unwrap_or_else(|e| panic!("{e}"));
        let as_client =
            |c: &CertificateDer<'static>| client.verify_client_cert(c, &[], now).map(|_| ());
        let as_server = |c: &CertificateDer<'static>| {
            server
                .verify_server_cert(c, &[], &name, &[], now)
                .map(|_| ())
        };

        assert!(as_client(&leaf(&mesh, ok(vec![ORDER]))).is_ok());
        assert!(as_server(&leaf(&mesh, ok(vec![CHECKOUT]))).is_ok());
        let cases: Vec<(&str, CertificateDer<'static>)> = vec![
            (
                "expired",
                leaf(
                    &mesh,
                    Leaf {
                        from: -3,
                        to: -1,
                        ..ok(vec![ORDER])
                    },
                ),
            ),
            (
                "not yet valid",
                leaf(
                    &mesh,
                    Leaf {
                        from: 1,
                        to: 3,
                        ..ok(vec![ORDER])
                    },
                ),
            ),
            ("another CA", leaf(&other, ok(vec![ORDER]))),
            (
                "another trust domain",
                leaf(&mesh, ok(vec!["spiffe://example.org/ns/prod/sa/order"])),
            ),
            ("two URI SANs", leaf(&mesh, ok(vec![ORDER, CHECKOUT]))),
            (
                "CA:TRUE leaf",
                leaf(
                    &mesh,
                    Leaf {
                        is_ca: true,
                        ..ok(vec![ORDER])
                    },
                ),
            ),
            ("no URI SAN", leaf(&mesh, ok(vec![]))),
        ];
        for (name, cert) in &cases {
            assert!(as_client(cert).is_err(), "client verifier accepted {name}");
            assert!(as_server(cert).is_err(), "server verifier accepted {name}");
        }
        // secure naming: a valid SVID of another workload cannot serve checkout
        let e = as_server(&leaf(&mesh, ok(vec![ORDER]))).expect_err("secure naming");
        assert!(e.to_string().contains("secure naming"), "{e}");
    }
}
