//! Join tokens: a proxy's credential for its first certificate.
//!
//! `weft1.<claims>.<mac>`: base64url JSON claims (workload, expiry, a unique id and the CA
//! root's SHA-256 fingerprint) and an HMAC-SHA256 over them with the control plane's token key.
//! The fingerprint lets a proxy verify the control plane on first contact (as kubeadm's discovery
//! hash does); the id makes the token single-use.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::identity::WorkloadRef;

const PREFIX: &str = "weft1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinToken {
    /// The WorkloadEntry this token may obtain a certificate for.
    pub workload: WorkloadRef,
    /// Expiry, seconds since the Unix epoch.
    pub expires: u64,
    /// Unique id (hex), recorded when used.
    pub id: String,
    /// SHA-256 (hex) of the CA root the control plane's serving certificate chains to.
    pub root_fingerprint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed join token")]
    Malformed,
    #[error("join token signature does not verify")]
    BadSignature,
    #[error("join token expired")]
    Expired,
}

impl JoinToken {
    /// Signs the claims with `key` into the token string.
    pub fn sign(&self, key: &[u8]) -> String {
        let claims = B64.encode(serde_json::to_vec(self).unwrap_or_default());
        let mac = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), claims.as_bytes());
        format!("{PREFIX}.{claims}.{}", B64.encode(mac.as_ref()))
    }

    /// Reads the claims without checking the signature (the proxy side, which has no key).
    pub fn parse_unverified(token: &str) -> Result<JoinToken, TokenError> {
        let (claims, _) = split(token)?;
        let bytes = B64.decode(claims).map_err(|_| TokenError::Malformed)?;
        serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
    }

    /// Checks the signature (constant time) and the expiry against `now` (Unix seconds).
    pub fn verify(token: &str, key: &[u8], now: u64) -> Result<JoinToken, TokenError> {
        let (claims, mac) = split(token)?;
        let mac = B64.decode(mac).map_err(|_| TokenError::Malformed)?;
        hmac::verify(
            &hmac::Key::new(hmac::HMAC_SHA256, key),
            claims.as_bytes(),
            &mac,
        )
        .map_err(|_| TokenError::BadSignature)?;
        let t = Self::parse_unverified(token)?;
        if t.expires <= now {
            return Err(TokenError::Expired);
        }
        if t.id.is_empty() || !t.id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::Malformed);
        }
        Ok(t)
    }
}

fn split(token: &str) -> Result<(&str, &str), TokenError> {
    let mut parts = token.trim().split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(PREFIX), Some(c), Some(m), None) if !c.is_empty() && !m.is_empty() => Ok((c, m)),
        _ => Err(TokenError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> JoinToken {
        JoinToken {
            workload: "prod/checkout-1".parse().unwrap_or_else(|e| panic!("{e}")),
            expires: 1000,
            id: "abcd".into(),
            root_fingerprint: "00ff".into(),
        }
    }

    #[test]
    fn sign_verify_and_tamper() {
        let key = b"k".repeat(32);
        let token = claims().sign(&key);
        assert_eq!(JoinToken::verify(&token, &key, 999), Ok(claims()));
        assert_eq!(
            JoinToken::verify(&token, &key, 1000),
            Err(TokenError::Expired)
        );
        assert_eq!(
            JoinToken::verify(&token, b"other", 1),
            Err(TokenError::BadSignature)
        );
        assert_eq!(JoinToken::parse_unverified(&token), Ok(claims()));
        // swapping in other claims breaks the signature
        let mut forged = claims();
        forged.workload = "prod/admin-1".parse().unwrap_or_else(|e| panic!("{e}"));
        let (_, mac) = token.rsplit_once('.').unwrap_or_default();
        let other = forged.sign(b"attacker");
        let (head, _) = other.rsplit_once('.').unwrap_or_default();
        assert_eq!(
            JoinToken::verify(&format!("{head}.{mac}"), &key, 1),
            Err(TokenError::BadSignature)
        );
        for bad in [
            "",
            "weft1",
            "weft1..",
            "weft2.a.b",
            "weft1.!!.b",
            "weft1.a.b.c",
        ] {
            assert!(JoinToken::verify(bad, &key, 1).is_err(), "{bad}");
        }
    }
}
