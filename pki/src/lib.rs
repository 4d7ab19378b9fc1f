//! The fleet's public-key infrastructure: the certificate authority, device
//! enrollment (CSR in, certificate out), join tokens, and the rustls
//! configurations of mutual TLS between agents and the control plane.
//!
//! All TLS uses the ring crypto provider explicitly ([`crypto_provider`]);
//! nothing depends on a process-wide default provider.
//!
//! Device certificates: CN = the device id (1 to 64 of `A-Z a-z 0-9 . _ -`),
//! a URI subject alternative name `urn:edgefleet:device:<id>`, EKU
//! clientAuth, a random positive 16-byte serial. The device's CSR only
//! contributes its public key (its signature is verified).

mod ca;
mod certs;
mod device;
mod error;
mod files;
mod signing;
mod tls;
mod tokens;
mod transport;

pub use ca::{
    BACKDATE, CA_CERT_FILE, CA_COMMON_NAME, CA_KEY_FILE, CA_VALIDITY, CertificateAuthority,
    DEVICE_URI_PREFIX, IssuedCertificate, IssuedKeyPair, SERVER_BACKDATE, SERVER_COMMON_NAME,
    validate_device_id,
};
pub use certs::{
    CertificateInfo, certificate_info_der, certificate_info_pem, certificate_matches_key,
    fingerprint_der, fingerprint_pem,
};
pub use device::{device_csr, generate_device_key};
pub use error::{PkiError, Result, error_chain};
pub use files::{
    create_private_file, create_public_file, warn_if_key_readable_by_others, write_private_file,
    write_public_file,
};
pub use signing::{RELEASE_KEY_FILE, ReleaseKey, verify_model_signature};
pub use tls::{
    ALPN_H2, ALPN_HTTP11, CaFingerprintMismatch, KX_GROUPS, PinnedCaVerifier,
    agent_server_tls_config, ca_client_tls_config, crypto_provider, listener_tls_config,
    mtls_client_tls_config, operator_server_tls_config, pinned_client_tls_config,
};
pub use tokens::{
    FINGERPRINT_LEN, JOIN_TOKEN_ID_LEN, JOIN_TOKEN_SECRET_LEN, JoinTokenSecret,
    OPERATOR_TOKEN_PREFIX, generate_operator_token, hash_secret, operator_token_id,
    secret_matches_hash,
};
pub use transport::{
    DEFAULT_HANDSHAKE_TIMEOUT, MAX_CONCURRENT_HANDSHAKES, PeerInfo, TlsConnection, TlsIncoming,
    connect_tls, peer_certificate_info, peer_device_id, peer_info,
    rejected_client_certificate_alert, tls_incoming, tls_incoming_from, tls_incoming_with_timeout,
};
