//! weft-api: runtime-free types shared by the weft control plane and data plane.
//!
//! Threading model: none; plain data and parsing only (no tokio, glommio or tonic types), so
//! both planes and their tests can use it directly. What it is not: the gRPC service itself
//! (generated here once the control-plane issue lands) or any I/O.

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
    #[error("path must be /ns/<namespace>/sa/<service-account>")]
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
    /// The short form operators read: `prod/checkout`.
    pub fn short(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
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
