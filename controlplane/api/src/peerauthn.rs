//! Istio `PeerAuthentication` (security.istio.io/v1): which mTLS mode a workload's inbound port
//! accepts, with Istio's precedence — a workload-specific policy (with a selector) wins over the
//! namespace-wide one (no selector), which wins over the mesh-wide one (in the root namespace,
//! `weft-system`); `portLevelMtls` wins over the policy's own `mtls.mode`; UNSET inherits from
//! the next level; the default is PERMISSIVE.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::authz::PolicyError;

/// The namespace whose policies apply mesh-wide.
pub const ROOT_NAMESPACE: &str = "weft-system";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Mode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<crate::authz::RawSelector>,
    #[serde(default)]
    pub mtls: Option<RawMtls>,
    /// Port number (as a string, as in YAML maps) → mode.
    #[serde(default)]
    pub port_level_mtls: Option<BTreeMap<String, RawMtls>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawMtls {
    #[serde(default)]
    pub mode: Option<Mode>,
}

/// A validated PeerAuthentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
    pub mode: Mode,
    pub ports: BTreeMap<u16, Mode>,
}

impl PeerAuthentication {
    pub fn from_raw(
        namespace: &str,
        name: &str,
        raw: &RawPeerAuthenticationSpec,
    ) -> Result<Self, PolicyError> {
        let selector = raw
            .selector
            .as_ref()
            .map(|s| s.match_labels.clone())
            .unwrap_or_default();
        let mut ports = BTreeMap::new();
        for (p, m) in raw.port_level_mtls.iter().flatten() {
            let field = format!("spec.portLevelMtls.{p}");
            let port = p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| PolicyError {
                    field: field.clone(),
                    reason: format!("`{p}` is not a port"),
                })?;
            if selector.is_empty() {
                return Err(PolicyError {
                    field,
                    reason: "portLevelMtls needs a workload selector (as in Istio)".into(),
                });
            }
            ports.insert(port, m.mode.unwrap_or(Mode::Unset));
        }
        Ok(PeerAuthentication {
            name: format!("{namespace}/{name}"),
            namespace: namespace.to_string(),
            selector,
            mode: raw
                .mtls
                .as_ref()
                .and_then(|m| m.mode)
                .unwrap_or(Mode::Unset),
            ports,
        })
    }

    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// The effective mode for `port` of a workload in `namespace` with `labels`.
pub fn effective_mode(
    policies: &[PeerAuthentication],
    namespace: &str,
    labels: &BTreeMap<String, String>,
    port: u16,
) -> Mode {
    // the oldest (first) matching policy wins at each level, as Istio documents for conflicts
    let workload = policies
        .iter()
        .find(|p| p.namespace == namespace && !p.selector.is_empty() && p.selects(labels));
    let namespace_wide = policies
        .iter()
        .find(|p| p.namespace == namespace && p.selector.is_empty());
    let mesh = policies
        .iter()
        .find(|p| p.namespace == ROOT_NAMESPACE && p.selector.is_empty());
    let levels = [
        workload.and_then(|p| p.ports.get(&port).copied()),
        workload.map(|p| p.mode),
        namespace_wide.map(|p| p.mode),
        mesh.map(|p| p.mode),
    ];
    levels
        .into_iter()
        .flatten()
        .find(|m| *m != Mode::Unset)
        .unwrap_or(Mode::Permissive)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pa(ns: &str, json: &str) -> PeerAuthentication {
        let raw: RawPeerAuthenticationSpec =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
        PeerAuthentication::from_raw(ns, "pa", &raw).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn istio_precedence() {
        let labels: BTreeMap<String, String> = [("app".to_string(), "checkout".to_string())].into();
        let mesh = pa(ROOT_NAMESPACE, r#"{"mtls": {"mode": "STRICT"}}"#);
        let ns = pa("prod", r#"{"mtls": {"mode": "PERMISSIVE"}}"#);
        let wl = pa(
            "prod",
            r#"{"selector": {"matchLabels": {"app": "checkout"}}, "mtls": {"mode": "UNSET"}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}"#,
        );
        assert_eq!(
            effective_mode(&[], "prod", &labels, 80),
            Mode::Permissive,
            "default"
        );
        assert_eq!(
            effective_mode(std::slice::from_ref(&mesh), "prod", &labels, 80),
            Mode::Strict,
            "mesh-wide"
        );
        assert_eq!(
            effective_mode(&[mesh.clone(), ns.clone()], "prod", &labels, 80),
            Mode::Permissive,
            "namespace wins"
        );
        let all = [mesh, ns, wl];
        assert_eq!(
            effective_mode(&all, "prod", &labels, 8080),
            Mode::Disable,
            "port level wins"
        );
        assert_eq!(
            effective_mode(&all, "prod", &labels, 80),
            Mode::Permissive,
            "UNSET inherits"
        );
        assert_eq!(
            effective_mode(&all, "dev", &labels, 80),
            Mode::Strict,
            "other namespace: mesh-wide"
        );
    }

    #[test]
    fn invalid_specs() {
        for json in [
            r#"{"portLevelMtls": {"80": {"mode": "STRICT"}}}"#,
            r#"{"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {"http": {"mode": "STRICT"}}}"#,
        ] {
            let raw: RawPeerAuthenticationSpec =
                serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                PeerAuthentication::from_raw("prod", "x", &raw).is_err(),
                "{json}"
            );
        }
        assert!(serde_json::from_str::<RawPeerAuthenticationSpec>(
            r#"{"mtls": {"mode": "MAYBE"}}"#
        )
        .is_err());
        assert!(serde_json::from_str::<RawPeerAuthenticationSpec>(
            r#"{"mtls": {"mode": "STRICT"}, "extra": 1}"#
        )
        .is_err());
    }
}
