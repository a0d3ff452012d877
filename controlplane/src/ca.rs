//! The mesh CA: P-256 roots on disk, SVID issuance, rotation with overlap.
//!
//! Layout under `DATA/ca/`: `<serial>.crt.pem`, `<serial>.key.pem` (mode 0600) per trusted
//! root, and `active` naming the root that signs. `rotate` adds a root and makes it active;
//! the old one stays trusted (in the bundle) until `retire`. Files are rewritten atomically.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use weft_api::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("{0}")]
    State(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Root lifetime: long, because rotation (not expiry) is how roots are replaced.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86400);
/// SVIDs start this far in the past, for clock skew between hosts.
pub const BACKDATE: Duration = Duration::from_secs(300);

pub struct Root {
    pub serial: String,
    pub der: CertificateDer<'static>,
    pub pem: String,
    pub key: KeyPair,
    pub subject: String,
    pub not_after: OffsetDateTime,
}

pub struct Ca {
    pub dir: PathBuf,
    pub roots: Vec<Root>,
    pub active: String,
}

/// Writes `bytes` to `path` atomically with `mode`.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // SystemRandom only fails if the OS RNG is unavailable, which is fatal anyway
    let _ = SystemRandom::new().fill(&mut b);
    b
}

fn serial() -> (SerialNumber, String) {
    let mut b = random_bytes::<16>();
    // positive, and never a leading zero byte: DER drops those, and the serial must read back
    // exactly as the file name that holds it
    b[0] = (b[0] & 0x7f) | 0x01;
    (SerialNumber::from_slice(&b), weft_api::hex(&b))
}

impl Ca {
    /// Loads the CA from `data_dir`, creating the first root when there is none.
    pub fn open_or_init(data_dir: &Path) -> Result<Ca, CaError> {
        let dir = data_dir.join("ca");
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
        let ca = Self::load(&dir)?;
        if !ca.roots.is_empty() {
            return Ok(ca);
        }
        let serial = create_root(&dir)?;
        write_file(&dir.join("active"), serial.as_bytes(), 0o600)?;
        Self::load(&dir)
    }

    fn load(dir: &Path) -> Result<Ca, CaError> {
        let mut roots = Vec::new();
        let mut names: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().ends_with(".crt.pem"))
            .collect();
        names.sort();
        for crt in names {
            let file = crt
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let serial = file.trim_end_matches(".crt.pem").to_string();
            let keyp = dir.join(format!("{serial}.key.pem"));
            let pem = fs::read_to_string(&crt).map_err(io(&crt))?;
            let key = KeyPair::from_pem(&fs::read_to_string(&keyp).map_err(io(&keyp))?)?;
            let der = pem_to_der(&pem).ok_or_else(|| {
                CaError::State(format!("{}: not a PEM certificate", crt.display()))
            })?;
            let (subject, not_after) = {
                let (_, x) = x509_parser::parse_x509_certificate(&der)
                    .map_err(|e| CaError::State(format!("{}: {e}", crt.display())))?;
                (
                    x.subject().to_string(),
                    x.validity().not_after.to_datetime(),
                )
            };
            roots.push(Root {
                serial,
                der,
                pem,
                key,
                subject,
                not_after,
            });
        }
        let active_path = dir.join("active");
        let active = fs::read_to_string(&active_path)
            .unwrap_or_default()
            .trim()
            .to_string();
        if !roots.is_empty() && !roots.iter().any(|r| r.serial == active) {
            return Err(CaError::State(format!(
                "{}: active root `{active}` is not among the trusted roots",
                active_path.display()
            )));
        }
        Ok(Ca {
            dir: dir.to_path_buf(),
            roots,
            active,
        })
    }

    pub fn active_root(&self) -> &Root {
        // load() guarantees the active serial is present whenever roots exist
        self.roots
            .iter()
            .find(|r| r.serial == self.active)
            .unwrap_or(&self.roots[0])
    }

    /// Every trusted root, active first.
    pub fn bundle(&self) -> Vec<CertificateDer<'static>> {
        let mut out = vec![self.active_root().der.clone()];
        out.extend(
            self.roots
                .iter()
                .filter(|r| r.serial != self.active)
                .map(|r| r.der.clone()),
        );
        out
    }

    /// Adds a root and makes it the signing root. Returns its serial.
    pub fn rotate(data_dir: &Path) -> Result<String, CaError> {
        let ca = Self::open_or_init(data_dir)?;
        let serial = create_root(&ca.dir)?;
        write_file(&ca.dir.join("active"), serial.as_bytes(), 0o600)?;
        Ok(serial)
    }

    /// Stops trusting a root. The active root cannot be retired (rotate first).
    pub fn retire(data_dir: &Path, serial: &str) -> Result<(), CaError> {
        let ca = Self::load(&data_dir.join("ca"))?;
        if !ca.roots.iter().any(|r| r.serial == serial) {
            let known: Vec<_> = ca.roots.iter().map(|r| r.serial.as_str()).collect();
            return Err(CaError::State(format!(
                "no trusted root has serial {serial} (trusted: {})",
                known.join(", ")
            )));
        }
        if ca.active == serial {
            return Err(CaError::State(format!(
                "root {serial} is the active signing root: run `weft-control ca rotate` first"
            )));
        }
        for ext in ["crt.pem", "key.pem"] {
            let p = ca.dir.join(format!("{serial}.{ext}"));
            fs::remove_file(&p).map_err(io(&p))?;
        }
        Ok(())
    }

    /// Issues an X.509-SVID for `id` over `public_key`: exactly one URI SAN (plus `dns` names,
    /// for the control plane's own serving certificate), CA:FALSE, digitalSignature,
    /// serverAuth + clientAuth, backdated by `BACKDATE`, valid for `ttl`.
    pub fn issue(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        ttl: Duration,
        dns: &[&str],
    ) -> Result<CertificateDer<'static>, CaError> {
        let root = self.active_root();
        let issuer = Issuer::from_ca_cert_der(&root.der, &root.key)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "weft");
        dn.push(DnType::CommonName, id.short());
        p.distinguished_name = dn;
        let uri = id
            .to_string()
            .try_into()
            .map_err(|_| CaError::State(format!("`{id}` is not an IA5 string")))?;
        p.subject_alt_names = vec![SanType::URI(uri)];
        for d in dns {
            let name = (*d)
                .try_into()
                .map_err(|_| CaError::State(format!("`{d}` is not a DNS name")))?;
            p.subject_alt_names.push(SanType::DnsName(name));
        }
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - BACKDATE;
        p.not_after = now + ttl;
        p.serial_number = Some(serial().0);
        p.use_authority_key_identifier_extension = true;
        Ok(p.signed_by(public_key, &issuer)?.der().clone())
    }
}

fn create_root(dir: &Path) -> Result<String, CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let (sn, hex) = serial();
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "weft");
    dn.push(DnType::CommonName, format!("weft mesh root {}", &hex[..8]));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::from_secs(3600);
    p.not_after = now + ROOT_LIFETIME;
    p.serial_number = Some(sn);
    let cert = p.self_signed(&key)?;
    write_file(
        &dir.join(format!("{hex}.key.pem")),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(
        &dir.join(format!("{hex}.crt.pem")),
        cert.pem().as_bytes(),
        0o644,
    )?;
    Ok(hex)
}

/// The DER of the first certificate in a PEM text.
pub fn pem_to_der(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).ok()
}

/// PEM text of a DER certificate.
pub fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or(""));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The HMAC key that signs join tokens (`DATA/token.key`, 0600), created on first use.
pub fn token_key(data_dir: &Path) -> Result<Vec<u8>, CaError> {
    let path = data_dir.join("token.key");
    match fs::read(&path) {
        Ok(k) if k.len() >= 32 => Ok(k),
        Ok(_) => Err(CaError::State(format!("{}: too short", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(data_dir).map_err(io(data_dir))?;
            let k = random_bytes::<32>().to_vec();
            write_file(&path, &k, 0o600)?;
            Ok(k)
        }
        Err(e) => Err(CaError::Io {
            path: path.display().to_string(),
            source: e,
        }),
    }
}

/// Records a join token's id as used; false if it was used before. Persisted across restarts.
pub fn consume_token(data_dir: &Path, id: &str) -> Result<bool, CaError> {
    let dir = data_dir.join("tokens-used");
    fs::create_dir_all(&dir).map_err(io(&dir))?;
    let p = dir.join(id);
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p)
    {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(CaError::Io {
            path: p.display().to_string(),
            source: e,
        }),
    }
}
