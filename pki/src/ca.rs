//! The fleet's certificate authority: creation, loading, issuing.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};

use crate::certs::{
    fingerprint_der, now_plus, parse_certificate_pem, parse_x509, serial_hex, to_offset_date_time,
};
use crate::error::{PkiError, Result};
use crate::files::{write_private_file, write_public_file};

/// File name of the CA certificate inside the CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key inside the CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Common name of the fleet CA.
pub const CA_COMMON_NAME: &str = "edgefleet fleet CA";
/// Common name of the control plane's server certificates.
pub const SERVER_COMMON_NAME: &str = "edgefleet control plane";
/// Validity of a new CA: 10 years.
pub const CA_VALIDITY: Duration = Duration::from_secs(3650 * 24 * 3600);
/// How far in the past issued certificates start, to absorb clock skew.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Prefix of the URI subject alternative name of device certificates.
pub const DEVICE_URI_PREFIX: &str = "urn:edgefleet:device:";

/// A certificate with a fresh private key (PKCS#8 PEM). `Debug` hides the key.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedKeyPair {
    pub certificate_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for IssuedKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedKeyPair")
            .field("certificate_pem", &self.certificate_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A certificate signed for a device's CSR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    pub certificate_pem: String,
    /// Lower-case hex, as in [`crate::CertificateInfo::serial_hex`].
    pub serial_hex: String,
    pub not_after_unix_ms: i64,
}

/// The fleet CA: an ECDSA P-256 key and its self-signed certificate.
pub struct CertificateAuthority {
    certificate_pem: String,
    certificate_der: Vec<u8>,
    fingerprint: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads `dir/ca.crt` and `dir/ca.key`, or creates both (the key with mode
    /// 0600, the directory if missing) when neither exists. Returns the CA and
    /// whether it was created. Fails if only one of the files exists, if they
    /// don't belong together, or if the certificate is not a CA.
    pub fn load_or_create(dir: &Path) -> Result<(CertificateAuthority, bool)> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_exists = exists(&cert_path)?;
        let key_exists = exists(&key_path)?;
        match (cert_exists, key_exists) {
            (true, true) => {
                let cert_pem =
                    std::fs::read_to_string(&cert_path).map_err(|e| PkiError::io(&cert_path, e))?;
                let key_pem =
                    std::fs::read_to_string(&key_path).map_err(|e| PkiError::io(&key_path, e))?;
                warn_if_key_readable_by_others(&key_path);
                let ca = Self::from_pem(&cert_pem, &key_pem).map_err(|e| {
                    PkiError::Certificate(format!(
                        "CA in {}: {}",
                        dir.display(),
                        e.to_string().trim_start_matches("certificate error: ")
                    ))
                })?;
                Ok((ca, false))
            }
            (false, false) => {
                std::fs::create_dir_all(dir).map_err(|e| PkiError::io(dir, e))?;
                let (ca, key_pem) = Self::generate()?;
                // The key first: a crash in between leaves a key without a
                // certificate, which the next start reports instead of
                // silently replacing.
                write_private_file(&key_path, key_pem.as_bytes())?;
                write_public_file(&cert_path, ca.certificate_pem.as_bytes())?;
                Ok((ca, true))
            }
            (true, false) => Err(PkiError::Certificate(format!(
                "{} exists but {} does not: restore the CA key, or remove the certificate to create a new CA (every device must then enroll again)",
                cert_path.display(),
                key_path.display()
            ))),
            (false, true) => Err(PkiError::Certificate(format!(
                "{} exists but {} does not: restore the CA certificate, or remove the key to create a new CA (every device must then enroll again)",
                key_path.display(),
                cert_path.display()
            ))),
        }
    }

    /// A new CA in memory. Returns it with its private key (PKCS#8 PEM).
    pub fn generate() -> Result<(CertificateAuthority, String)> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| PkiError::Certificate(format!("cannot generate the CA key: {e}")))?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, CA_COMMON_NAME);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "edgefleet");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = to_offset_date_time(now - BACKDATE)?;
        params.not_after = to_offset_date_time(now_plus(CA_VALIDITY)?)?;
        params.serial_number = Some(random_serial());
        let cert = params
            .self_signed(&key)
            .map_err(|e| PkiError::Certificate(format!("cannot create the CA certificate: {e}")))?;
        let key_pem = key.serialize_pem();
        let certificate_der = cert.der().to_vec();
        Ok((
            CertificateAuthority {
                certificate_pem: cert.pem(),
                fingerprint: fingerprint_der(&certificate_der),
                certificate_der,
                issuer: Issuer::new(params, key),
            },
            key_pem,
        ))
    }

    /// A CA from its certificate and private key (PEM). Fails if they don't
    /// match or the certificate is not a CA.
    pub fn from_pem(certificate_pem: &str, key_pem: &str) -> Result<CertificateAuthority> {
        let der = parse_certificate_pem(certificate_pem)?;
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| PkiError::InvalidKey(format!("cannot load the CA key: {e}")))?;
        {
            let cert = parse_x509(&der)?;
            if !cert.is_ca() {
                return Err(PkiError::Certificate(
                    "the certificate is not a CA certificate".into(),
                ));
            }
            if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                return Err(PkiError::Certificate(
                    "the CA certificate and the CA key do not match".into(),
                ));
            }
        }
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(|e| PkiError::Certificate(format!("cannot use the CA certificate: {e}")))?;
        let mut certificate_pem = certificate_pem.trim().to_string();
        certificate_pem.push('\n');
        Ok(CertificateAuthority {
            certificate_pem,
            fingerprint: fingerprint_der(&der),
            certificate_der: der.to_vec(),
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// The CA certificate, DER.
    pub fn certificate_der(&self) -> &[u8] {
        &self.certificate_der
    }

    /// Lower-case hex SHA-256 of the CA certificate's DER (64 characters).
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// A server certificate and fresh ECDSA P-256 key for the control plane.
    ///
    /// Subject alternative names: `localhost`, `127.0.0.1`, `::1`, the machine's
    /// host name (when it is a valid DNS name), and `extra_sans` (DNS names or
    /// IP literals; an invalid one is an error). EKU serverAuth; valid from 5
    /// minutes ago for `validity`.
    pub fn issue_server_certificate(
        &self,
        extra_sans: &[String],
        validity: Duration,
    ) -> Result<IssuedKeyPair> {
        let mut sans: Vec<SanType> = Vec::new();
        let mut push = |san: SanType| {
            if !sans.contains(&san) {
                sans.push(san);
            }
        };
        push(dns_san("localhost")?);
        push(SanType::IpAddress(IpAddr::from([127, 0, 0, 1])));
        push(SanType::IpAddress(IpAddr::from([
            0u16, 0, 0, 0, 0, 0, 0, 1,
        ])));
        if let Some(host) = hostname::get().ok().and_then(|h| h.into_string().ok()) {
            let host = host.trim().to_ascii_lowercase();
            if !host.is_empty() && rustls_pki_types::DnsName::try_from(host.as_str()).is_ok() {
                push(dns_san(&host)?);
            }
        }
        for san in extra_sans {
            let san = san.trim();
            let san = san
                .strip_prefix('[')
                .and_then(|s| s.strip_suffix(']'))
                .unwrap_or(san);
            if let Ok(ip) = san.parse::<IpAddr>() {
                push(SanType::IpAddress(ip));
            } else if rustls_pki_types::DnsName::try_from(san).is_ok() {
                push(dns_san(&san.to_ascii_lowercase())?);
            } else {
                return Err(PkiError::Certificate(format!(
                    "invalid subject alternative name {san:?}: expected a DNS name or an IP address"
                )));
            }
        }

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| PkiError::Certificate(format!("cannot generate a server key: {e}")))?;
        let now = SystemTime::now();
        let mut params = leaf_params(SERVER_COMMON_NAME, now - BACKDATE, now_plus(validity)?)?;
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| {
            PkiError::Certificate(format!("cannot sign the server certificate: {e}"))
        })?;
        Ok(IssuedKeyPair {
            certificate_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a device's certificate signing request.
    ///
    /// The CSR's signature is verified (proof of possession of the key), and
    /// everything it asks for besides its public key — subject, alternative
    /// names, extensions — is ignored. The certificate has CN = `device_id`, a
    /// URI subject alternative name `urn:edgefleet:device:<device_id>`, EKU
    /// clientAuth, a random positive 16-byte serial, and is valid from 5 minutes
    /// ago to now + `validity`.
    ///
    /// `device_id` must be 1 to 64 characters among `A-Z a-z 0-9 . _ -`.
    pub fn sign_device_csr(
        &self,
        csr_pem: &str,
        device_id: &str,
        validity: Duration,
    ) -> Result<IssuedCertificate> {
        let now = SystemTime::now();
        self.sign_device_csr_with_validity(csr_pem, device_id, now - BACKDATE, now_plus(validity)?)
    }

    /// [`sign_device_csr`](Self::sign_device_csr) with an explicit validity
    /// period, which may lie in the past (tests that need an expired
    /// certificate). `not_after` must be later than `not_before`.
    pub fn sign_device_csr_with_validity(
        &self,
        csr_pem: &str,
        device_id: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCertificate> {
        validate_device_id(device_id)?;
        if not_after <= not_before {
            return Err(PkiError::Certificate(
                "not_after must be later than not_before".into(),
            ));
        }
        let csr = parse_csr(csr_pem)?;
        let mut params = leaf_params(device_id, not_before, not_after)?;
        params.subject_alt_names = vec![SanType::URI(
            format!("{DEVICE_URI_PREFIX}{device_id}")
                .try_into()
                .map_err(|e| PkiError::InvalidDeviceId(format!("{device_id} ({e})")))?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| {
                PkiError::Certificate(format!("cannot sign the device certificate: {e}"))
            })?;
        let parsed = parse_x509(cert.der())?;
        Ok(IssuedCertificate {
            serial_hex: serial_hex(parsed.raw_serial()),
            not_after_unix_ms: parsed.validity().not_after.timestamp().saturating_mul(1000),
            certificate_pem: cert.pem(),
        })
    }
}

/// Checks that a device id can be a certificate's common name and URI:
/// 1 to 64 characters among `A-Z a-z 0-9 . _ -`.
pub fn validate_device_id(device_id: &str) -> Result<()> {
    let ok = !device_id.is_empty()
        && device_id.len() <= 64
        && device_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::InvalidDeviceId(
            device_id.chars().take(80).collect(),
        ))
    }
}

fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams> {
    if !csr_pem.contains("-----BEGIN CERTIFICATE REQUEST-----") {
        return Err(PkiError::InvalidCsr(
            "expected a PEM \"CERTIFICATE REQUEST\"".into(),
        ));
    }
    CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
        PkiError::InvalidCsr(match e {
            rcgen::Error::InvalidCertificationRequestSignature => {
                "the signature does not verify".into()
            }
            rcgen::Error::UnsupportedExtension => {
                "it requests an unsupported extension (send a CSR without extensions)".into()
            }
            other => other.to_string(),
        })
    })
}

fn leaf_params(
    common_name: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = to_offset_date_time(not_before)?;
    params.not_after = to_offset_date_time(not_after)?;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn dns_san(name: &str) -> Result<SanType> {
    Ok(SanType::DnsName(name.try_into().map_err(|e| {
        PkiError::Certificate(format!("invalid DNS name {name:?}: {e}"))
    })?))
}

/// 16 random bytes with the top bit clear (positive) and a non-zero first byte
/// (so the DER encoding keeps all 16 bytes).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}

fn exists(path: &Path) -> Result<bool> {
    path.try_exists().map_err(|e| PkiError::io(path, e))
}

fn warn_if_key_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{mode:o}"),
                    "the CA private key is readable by other users; chmod 600 it"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}
