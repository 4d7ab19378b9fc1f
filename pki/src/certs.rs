//! Parsing certificates and keys: facts, fingerprints, PEM helpers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::{PkiError, Result};

/// Parsed facts of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// The subject's first common name (empty if it has none). For device
    /// certificates this is the device id.
    pub common_name: String,
    /// The serial number in lower-case hex, big-endian, without leading zero bytes.
    pub serial_hex: String,
    pub not_before_unix_ms: i64,
    pub not_after_unix_ms: i64,
    /// The issuer's first common name (empty if it has none).
    pub issuer_common_name: String,
}

/// Parses the first certificate of a PEM document.
pub fn certificate_info_pem(pem: &str) -> Result<CertificateInfo> {
    let der = parse_certificate_pem(pem)?;
    certificate_info_der(&der)
}

/// Parses a DER certificate.
pub fn certificate_info_der(der: &[u8]) -> Result<CertificateInfo> {
    let cert = parse_x509(der)?;
    Ok(CertificateInfo {
        common_name: first_common_name(cert.subject()),
        serial_hex: serial_hex(cert.raw_serial()),
        not_before_unix_ms: cert.validity().not_before.timestamp().saturating_mul(1000),
        not_after_unix_ms: cert.validity().not_after.timestamp().saturating_mul(1000),
        issuer_common_name: first_common_name(cert.issuer()),
    })
}

/// Whether the certificate (the first of a PEM document) is for the private
/// key `key_pem` (PKCS#8 PEM): its subject public key is the key's.
pub fn certificate_matches_key(certificate_pem: &str, key_pem: &str) -> Result<bool> {
    let der = parse_certificate_pem(certificate_pem)?;
    let cert = parse_x509(&der)?;
    let key = rcgen::KeyPair::from_pem(key_pem)
        .map_err(|e| PkiError::InvalidKey(format!("cannot load the key: {e}")))?;
    Ok(cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
}

/// Lower-case hex SHA-256 of the DER of the first certificate of a PEM document.
pub fn fingerprint_pem(pem: &str) -> Result<String> {
    Ok(fingerprint_der(&parse_certificate_pem(pem)?))
}

/// Lower-case hex SHA-256 of a DER certificate (64 characters).
pub fn fingerprint_der(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

pub(crate) fn parse_x509(der: &[u8]) -> Result<X509Certificate<'_>> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::Certificate(format!("cannot parse certificate: {e}")))?;
    Ok(cert)
}

fn first_common_name(name: &x509_parser::x509::X509Name<'_>) -> String {
    name.iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string()
}

pub(crate) fn serial_hex(raw: &[u8]) -> String {
    let mut bytes = raw;
    while bytes.len() > 1 && bytes[0] == 0 {
        bytes = &bytes[1..];
    }
    hex::encode(bytes)
}

/// The first `CERTIFICATE` of a PEM document.
pub(crate) fn parse_certificate_pem(pem: &str) -> Result<CertificateDer<'static>> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::InvalidPem(format!("expected a CERTIFICATE: {e}")))
}

/// All `CERTIFICATE`s of a PEM document (at least one).
pub(crate) fn parse_certificate_chain_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| PkiError::InvalidPem(format!("expected CERTIFICATEs: {e}")))?;
    if chain.is_empty() {
        return Err(PkiError::InvalidPem("no CERTIFICATE found".into()));
    }
    Ok(chain)
}

/// The private key of a PEM document (PKCS#8, SEC1 or PKCS#1).
pub(crate) fn parse_private_key_pem(pem: &str) -> Result<PrivateKeyDer<'static>> {
    // The error of the PEM parser never contains key material.
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::InvalidPem(format!("expected a PRIVATE KEY: {e}")))
}

/// Converts to the `time` type rcgen uses, at whole-second precision
/// (certificates cannot hold more).
pub(crate) fn to_offset_date_time(t: SystemTime) -> Result<time::OffsetDateTime> {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).ok(),
        Err(e) => i64::try_from(e.duration().as_secs()).ok().map(|s| -s),
    };
    secs.and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .ok_or_else(|| PkiError::Certificate(format!("time {t:?} is out of range")))
}

pub(crate) fn now_plus(validity: Duration) -> Result<SystemTime> {
    SystemTime::now()
        .checked_add(validity)
        .ok_or_else(|| PkiError::Certificate(format!("validity {validity:?} is out of range")))
}
