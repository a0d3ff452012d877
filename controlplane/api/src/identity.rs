//! Workload identities: SPIFFE IDs and WorkloadEntry references.

use std::fmt;
use std::str::FromStr;

/// A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("spiffe id must start with spiffe://")]
    Scheme,
    #[error("invalid trust domain `{0}`")]
    TrustDomain(String),
    #[error("expected /ns/<namespace>/sa/<service-account> (or namespace/name for a workload)")]
    Path,
    #[error("invalid path segment `{0}`")]
    Segment(String),
}

/// Trust domains: lowercase letters, digits, `.`, `-`, `_` (SPIFFE ID spec §2.1).
fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// Path segments: letters, digits, `.`, `-`, `_`; not `.` or `..` (SPIFFE ID spec §2.2).
fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix("spiffe://").ok_or(SpiffeIdError::Scheme)?;
        let (td, path) = rest.split_once('/').ok_or(SpiffeIdError::Path)?;
        if !valid_trust_domain(td) {
            return Err(SpiffeIdError::TrustDomain(td.to_string()));
        }
        let parts: Vec<&str> = path.split('/').collect();
        let ["ns", ns, "sa", sa] = parts.as_slice() else {
            return Err(SpiffeIdError::Path);
        };
        for seg in [ns, sa] {
            if !valid_segment(seg) {
                return Err(SpiffeIdError::Segment((*seg).to_string()));
            }
        }
        Ok(SpiffeId {
            trust_domain: td.to_string(),
            namespace: (*ns).to_string(),
            service_account: (*sa).to_string(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl SpiffeId {
    /// The SVID identity of a service account.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, SpiffeIdError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// The short form operators read: `prod/checkout`.
    pub fn short(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
    }
}

/// `namespace/name` of a WorkloadEntry (e.g. `prod/checkout-1`).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct WorkloadRef {
    pub namespace: String,
    pub name: String,
}

impl FromStr for WorkloadRef {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ns, name) = s.split_once('/').ok_or(SpiffeIdError::Path)?;
        for seg in [ns, name] {
            if !valid_segment(seg) {
                return Err(SpiffeIdError::Segment(seg.to_string()));
            }
        }
        Ok(WorkloadRef {
            namespace: ns.to_string(),
            name: name.to_string(),
        })
    }
}

impl TryFrom<String> for WorkloadRef {
    type Error = SpiffeIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<WorkloadRef> for String {
    fn from(w: WorkloadRef) -> String {
        w.to_string()
    }
}

impl fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The SPIFFE ID of an X.509-SVID (exactly one URI SAN) and its notAfter (Unix seconds).
/// Parsing only: chain and signature checks belong to the TLS verifier.
pub fn spiffe_of(der: &[u8]) -> Result<(SpiffeId, i64), String> {
    let (_, x) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unparseable certificate: {e}"))?;
    let uris: Vec<String> = x
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [one] => Ok((
            one.parse().map_err(|e| format!("{e}"))?,
            x.validity().not_after.timestamp(),
        )),
        _ => Err(format!(
            "an SVID has exactly one URI SAN, this one has {}",
            uris.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id: SpiffeId = "spiffe://cluster.local/ns/prod/sa/checkout"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(id.short(), "prod/checkout");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/prod/sa/checkout");
        for bad in [
            "http://cluster.local/ns/prod/sa/x",
            "spiffe://Cluster.local/ns/prod/sa/x",
            "spiffe://cluster.local/ns/prod/sa/x/extra",
            "spiffe://cluster.local/ns/../sa/x",
            "spiffe://cluster.local/ns/prod/sa/",
            "spiffe://cluster.local",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }
}
