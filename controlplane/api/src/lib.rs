//! weft-api: the control-plane protobuf service (`proto`) and the runtime-free types both planes
//! share: SPIFFE IDs and workload references (`identity`), join tokens (`token`).
//!
//! Threading model: none; plain data and parsing. The generated gRPC code uses tonic types, but
//! nothing here starts a runtime or does I/O.

pub mod authz;
pub mod identity;
pub mod peerauthn;
pub mod svid;
pub mod token;
pub mod units;

pub use identity::{SpiffeId, SpiffeIdError, WorkloadRef};
pub use token::{JoinToken, TokenError};

/// The generated protobuf messages and the `Mesh` gRPC service.
#[allow(clippy::all, missing_docs, unreachable_pub)]
pub mod proto {
    tonic::include_proto!("weft.v1");
}

/// Lowercase hex SHA-256 of a DER certificate: how tokens pin the CA root.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    hex(d.as_ref())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The one rustls crypto provider weft uses in both planes: ring (no C toolchain beyond cc, no
/// cmake). rustls marks it deprecated because it lacks post-quantum key exchange.
#[allow(deprecated)]
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
