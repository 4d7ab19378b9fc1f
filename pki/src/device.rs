//! The device side of enrollment: a key and a CSR for it.

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};

use crate::error::{PkiError, Result};

/// A fresh ECDSA P-256 private key, PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
pub fn generate_device_key() -> Result<String> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| PkiError::InvalidKey(format!("cannot generate a key: {e}")))?;
    Ok(key.serialize_pem())
}

/// A certificate signing request (PEM) for the key `key_pem`, signed by it.
///
/// The subject's CN is `hostname_hint` (printable characters only, at most 64;
/// `edgefleet device` if that leaves nothing) — informational only: the CA
/// ignores the subject and names the certificate after the device id it
/// assigns. The CSR has no extensions.
pub fn device_csr(key_pem: &str, hostname_hint: &str) -> Result<String> {
    let key = KeyPair::from_pem(key_pem)
        .map_err(|e| PkiError::InvalidKey(format!("cannot load the device key: {e}")))?;
    let mut cn: String = hostname_hint
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(64)
        .collect();
    cn = cn.trim().to_string();
    if cn.is_empty() {
        cn = "edgefleet device".into();
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    let csr = params
        .serialize_request(&key)
        .map_err(|e| PkiError::InvalidCsr(format!("cannot create the CSR: {e}")))?;
    csr.pem()
        .map_err(|e| PkiError::InvalidCsr(format!("cannot encode the CSR: {e}")))
}
