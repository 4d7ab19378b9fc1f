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
use crate::files::{create_private_file, create_public_file};

/// How long a server that finds the CA key without its certificate waits for
/// the server creating them to write the certificate.
const CERTIFICATE_WAIT: Duration = Duration::from_secs(5);

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
/// How far in the past device certificates start. The control plane checks
/// them by its own clock, so this only absorbs skew between its replicas;
/// agents reckon a certificate's issue time from it (renewal).
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// How far in the past the control plane's server certificates, and a new
/// CA, start. Devices check them by their own clocks, and a server
/// certificate is issued at every start of the control plane: with only a
/// few minutes, a device whose clock is slow by more could not connect
/// after any restart. A day absorbs any clock that is merely wrong (not
/// reset to 1970) without keeping the certificate for later: it expires
/// when it would anyway.
pub const SERVER_BACKDATE: Duration = Duration::from_secs(24 * 3600);
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
    ///
    /// Servers starting together on one (shared) data dir agree on one CA:
    /// the files are created, never replaced (the key first, as the token of
    /// the creator), and a server that finds a key without its certificate
    /// waits a while for the one creating them.
    pub fn load_or_create(dir: &Path) -> Result<(CertificateAuthority, bool)> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_exists = exists(&cert_path)?;
        let key_exists = exists(&key_path)?;
        match (cert_exists, key_exists) {
            (true, true) => Self::load(dir),
            (false, false) => {
                std::fs::create_dir_all(dir).map_err(|e| PkiError::io(dir, e))?;
                let (ca, key_pem) = Self::generate()?;
                // The key first: a crash in between leaves a key without a
                // certificate, which the next start reports instead of
                // silently replacing.
                if !create_private_file(&key_path, key_pem.as_bytes())? {
                    // Another server is creating the CA: use its.
                    return Self::load_once_certified(dir);
                }
                if !create_public_file(&cert_path, ca.certificate_pem.as_bytes())? {
                    return Err(PkiError::Certificate(format!(
                        "{} appeared while this server was creating the CA: remove {} and {} to create a new CA",
                        cert_path.display(),
                        key_path.display(),
                        cert_path.display()
                    )));
                }
                Ok((ca, true))
            }
            (true, false) => Err(PkiError::Certificate(format!(
                "{} exists but {} does not: restore the CA key, or remove the certificate to create a new CA (every device must then enroll again)",
                cert_path.display(),
                key_path.display()
            ))),
            (false, true) => Self::load_once_certified(dir),
        }
    }

    /// Loads the CA once its certificate is there: another server that has
    /// written the key writes the certificate right after. A key alone for
    /// longer is an error.
    fn load_once_certified(dir: &Path) -> Result<(CertificateAuthority, bool)> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let deadline = std::time::Instant::now() + CERTIFICATE_WAIT;
        while !exists(&cert_path)? {
            if std::time::Instant::now() >= deadline {
                return Err(PkiError::Certificate(format!(
                    "{} exists but {} does not: restore the CA certificate, or remove the key to create a new CA (every device must then enroll again)",
                    key_path.display(),
                    cert_path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Self::load(dir)
    }

    fn load(dir: &Path) -> Result<(CertificateAuthority, bool)> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem =
            std::fs::read_to_string(&cert_path).map_err(|e| PkiError::io(&cert_path, e))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(|e| PkiError::io(&key_path, e))?;
        crate::files::warn_if_key_readable_by_others(&key_path, "the CA private key");
        let ca = Self::from_pem(&cert_pem, &key_pem).map_err(|e| {
            PkiError::Certificate(format!(
                "CA in {}: {}",
                dir.display(),
                e.to_string().trim_start_matches("certificate error: ")
            ))
        })?;
        Ok((ca, false))
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
        params.not_before = to_offset_date_time(now - SERVER_BACKDATE)?;
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
    /// IP literals; an invalid one is an error). EKU serverAuth; valid from
    /// [`SERVER_BACKDATE`] (a day) ago for `validity`.
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
        let mut params = leaf_params(
            SERVER_COMMON_NAME,
            now - SERVER_BACKDATE,
            now_plus(validity)?,
        )?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{certificate_info_pem, fingerprint_pem};
    use crate::device::{device_csr, generate_device_key};
    use crate::files::{write_private_file, write_public_file};
    use x509_parser::extensions::{GeneralName, ParsedExtension};

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn now_ms() -> i64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    }

    #[test]
    fn a_device_certificate_matches_its_key_and_no_other() {
        let (ca, _) = CertificateAuthority::generate().unwrap();
        let key = generate_device_key().unwrap();
        let other = generate_device_key().unwrap();
        let csr = device_csr(&key, "host").unwrap();
        let issued = ca.sign_device_csr(&csr, "dev-1", DAY).unwrap();
        assert!(crate::certificate_matches_key(&issued.certificate_pem, &key).unwrap());
        assert!(!crate::certificate_matches_key(&issued.certificate_pem, &other).unwrap());
        assert!(!crate::certificate_matches_key(ca.certificate_pem(), &key).unwrap());
        assert!(crate::certificate_matches_key(&issued.certificate_pem, "not a key").is_err());
    }

    #[test]
    fn load_or_create_creates_then_loads_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let (ca, created) = CertificateAuthority::load_or_create(&ca_dir).unwrap();
        assert!(created);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |f: &str| {
                std::fs::metadata(ca_dir.join(f))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777
            };
            assert_eq!(mode(CA_KEY_FILE), 0o600);
            assert_eq!(mode(CA_CERT_FILE), 0o644);
        }
        let fp = ca.fingerprint();
        assert_eq!(fp.len(), 64);
        assert!(
            fp.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_eq!(fingerprint_pem(ca.certificate_pem()).unwrap(), fp);
        assert_eq!(crate::fingerprint_der(ca.certificate_der()), fp);

        let (again, created) = CertificateAuthority::load_or_create(&ca_dir).unwrap();
        assert!(!created);
        assert_eq!(again.fingerprint(), fp);
        assert_eq!(again.certificate_der(), ca.certificate_der());

        // A certificate signed by the loaded CA chains to the original one.
        let key = generate_device_key().unwrap();
        let csr = device_csr(&key, "host").unwrap();
        let issued = again.sign_device_csr(&csr, "dev-1", DAY).unwrap();
        let info = certificate_info_pem(&issued.certificate_pem).unwrap();
        assert_eq!(info.issuer_common_name, CA_COMMON_NAME);
        let leaf_der = crate::certs::parse_certificate_pem(&issued.certificate_pem).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.certificate_der()).unwrap();
        leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
    }

    #[test]
    fn the_ca_certificate_is_a_constrained_ca() {
        let (ca, _key) = CertificateAuthority::generate().unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(ca.certificate_der()).unwrap();
        let info = certificate_info_pem(ca.certificate_pem()).unwrap();
        assert_eq!(info.common_name, CA_COMMON_NAME);
        assert_eq!(info.issuer_common_name, CA_COMMON_NAME);
        let bc = cert.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        let years = (info.not_after_unix_ms - now_ms()) as f64 / (365.25 * 86_400_000.0);
        assert!((9.9..10.1).contains(&years), "{years}");
        cert.verify_signature(None).unwrap();
    }

    #[test]
    fn servers_creating_the_ca_together_agree_on_one() {
        for _ in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let results: Vec<(String, bool)> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..4)
                    .map(|_| {
                        scope.spawn(|| {
                            let (ca, created) =
                                CertificateAuthority::load_or_create(dir.path()).unwrap();
                            (ca.fingerprint(), created)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(
                results.iter().filter(|(_, created)| *created).count(),
                1,
                "{results:?}"
            );
            let (again, created) = CertificateAuthority::load_or_create(dir.path()).unwrap();
            assert!(!created);
            assert!(
                results.iter().all(|(fp, _)| *fp == again.fingerprint()),
                "{results:?}"
            );
        }
    }

    #[test]
    fn only_one_ca_file_or_mismatched_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (ca1, key1) = CertificateAuthority::generate().unwrap();
        let (ca2, _key2) = CertificateAuthority::generate().unwrap();

        let only_cert = dir.path().join("only-cert");
        std::fs::create_dir(&only_cert).unwrap();
        write_public_file(
            &only_cert.join(CA_CERT_FILE),
            ca1.certificate_pem().as_bytes(),
        )
        .unwrap();
        let err = CertificateAuthority::load_or_create(&only_cert).unwrap_err();
        assert!(err.to_string().contains("ca.key"), "{err}");
        assert!(!only_cert.join(CA_KEY_FILE).exists());

        let only_key = dir.path().join("only-key");
        std::fs::create_dir(&only_key).unwrap();
        write_private_file(&only_key.join(CA_KEY_FILE), key1.as_bytes()).unwrap();
        let err = CertificateAuthority::load_or_create(&only_key).unwrap_err();
        assert!(err.to_string().contains("ca.crt"), "{err}");
        assert!(!only_key.join(CA_CERT_FILE).exists());

        let mismatched = dir.path().join("mismatched");
        std::fs::create_dir(&mismatched).unwrap();
        write_private_file(&mismatched.join(CA_KEY_FILE), key1.as_bytes()).unwrap();
        write_public_file(
            &mismatched.join(CA_CERT_FILE),
            ca2.certificate_pem().as_bytes(),
        )
        .unwrap();
        let err = CertificateAuthority::load_or_create(&mismatched).unwrap_err();
        assert!(err.to_string().contains("do not match"), "{err}");

        let garbage = dir.path().join("garbage");
        std::fs::create_dir(&garbage).unwrap();
        write_private_file(&garbage.join(CA_KEY_FILE), b"not a key").unwrap();
        write_public_file(
            &garbage.join(CA_CERT_FILE),
            ca1.certificate_pem().as_bytes(),
        )
        .unwrap();
        assert!(CertificateAuthority::load_or_create(&garbage).is_err());

        // A leaf certificate is not a CA.
        let server = ca1.issue_server_certificate(&[], DAY).unwrap();
        let err =
            CertificateAuthority::from_pem(&server.certificate_pem, &server.key_pem).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    #[test]
    fn device_certificates_ignore_the_csr_subject() {
        let (ca, _) = CertificateAuthority::generate().unwrap();
        let key = generate_device_key().unwrap();
        assert!(key.contains("-----BEGIN PRIVATE KEY-----"));
        let csr = device_csr(&key, "admin.example.com").unwrap();
        let before = now_ms();
        let issued = ca.sign_device_csr(&csr, "dev_01.a-b", 30 * DAY).unwrap();
        let info = certificate_info_pem(&issued.certificate_pem).unwrap();
        assert_eq!(info.common_name, "dev_01.a-b");
        assert_eq!(info.issuer_common_name, CA_COMMON_NAME);
        assert_eq!(info.serial_hex, issued.serial_hex);
        assert_eq!(issued.serial_hex.len(), 32);
        assert_eq!(info.not_after_unix_ms, issued.not_after_unix_ms);
        let expected_after = before + 30 * 86_400_000;
        assert!((info.not_after_unix_ms - expected_after).abs() < 5_000);
        let expected_before = before - 300_000;
        assert!((info.not_before_unix_ms - expected_before).abs() < 5_000);

        let der = crate::certs::parse_certificate_pem(&issued.certificate_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let mut uris = Vec::new();
        let mut client_auth = false;
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::URI(u) => uris.push(u.to_string()),
                            other => panic!("unexpected SAN {other:?}"),
                        }
                    }
                }
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    client_auth = eku.client_auth;
                    assert!(!eku.server_auth);
                }
                ParsedExtension::BasicConstraints(bc) => assert!(!bc.ca),
                _ => {}
            }
        }
        assert_eq!(uris, ["urn:edgefleet:device:dev_01.a-b"]);
        assert!(client_auth);
        assert!(!issued.certificate_pem.contains("admin"));
        assert!(
            !format!("{:?}", cert.subject()).contains("admin"),
            "{:?}",
            cert.subject()
        );

        // Two certificates never share a serial.
        let other = ca.sign_device_csr(&csr, "dev-2", DAY).unwrap();
        assert_ne!(other.serial_hex, issued.serial_hex);
    }

    #[test]
    fn bad_csrs_and_device_ids_are_rejected() {
        let (ca, _) = CertificateAuthority::generate().unwrap();
        for garbage in [
            "",
            "garbage",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            ca.certificate_pem(),
        ] {
            let err = ca.sign_device_csr(garbage, "dev-1", DAY).unwrap_err();
            assert!(matches!(err, PkiError::InvalidCsr(_)), "{err}");
        }
        // A tampered CSR: one base64 character of the body changed.
        let key = generate_device_key().unwrap();
        let csr = device_csr(&key, "host").unwrap();
        let mut lines: Vec<String> = csr.lines().map(str::to_string).collect();
        let line = &mut lines[2];
        let c = line.remove(10);
        line.insert(10, if c == 'A' { 'B' } else { 'A' });
        let tampered = lines.join("\n");
        let err = ca.sign_device_csr(&tampered, "dev-1", DAY).unwrap_err();
        assert!(matches!(err, PkiError::InvalidCsr(_)), "{err}");

        for id in ["", "a b", "dev/1", "dév", &"x".repeat(65)] {
            let err = ca.sign_device_csr(&csr, id, DAY).unwrap_err();
            assert!(matches!(err, PkiError::InvalidDeviceId(_)), "{id:?}: {err}");
        }
        let now = SystemTime::now();
        assert!(
            ca.sign_device_csr_with_validity(&csr, "d", now, now - DAY)
                .is_err()
        );
        // An expired certificate can be made on purpose.
        let expired = ca
            .sign_device_csr_with_validity(&csr, "d", now - 2 * DAY, now - DAY)
            .unwrap();
        assert!(expired.not_after_unix_ms < now_ms());
        assert!(device_csr("not a key", "h").is_err());
    }

    #[test]
    fn server_certificates_name_the_local_host_and_extras() {
        let (ca, _) = CertificateAuthority::generate().unwrap();
        let issued = ca
            .issue_server_certificate(
                &[
                    "cp.example.com".into(),
                    "10.1.2.3".into(),
                    "[fd00::1]".into(),
                ],
                DAY,
            )
            .unwrap();
        assert!(!format!("{issued:?}").contains("PRIVATE KEY"));
        let der = crate::certs::parse_certificate_pem(&issued.certificate_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        let names: Vec<String> = san
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => d.to_string(),
                GeneralName::IPAddress(ip) => match ip.len() {
                    4 => std::net::IpAddr::from(<[u8; 4]>::try_from(*ip).unwrap()).to_string(),
                    _ => std::net::IpAddr::from(<[u8; 16]>::try_from(*ip).unwrap()).to_string(),
                },
                other => format!("{other:?}"),
            })
            .collect();
        for expected in [
            "localhost",
            "127.0.0.1",
            "::1",
            "cp.example.com",
            "10.1.2.3",
            "fd00::1",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} not in {names:?}"
            );
        }
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        // Valid from a day ago: a device whose clock is slow (by up to a
        // day) accepts a server certificate issued a moment ago.
        let info = certificate_info_pem(&issued.certificate_pem).unwrap();
        assert!(
            info.not_before_unix_ms <= now_ms() - 24 * 3_600_000 + 5_000,
            "not_before {} is less than a day ago",
            info.not_before_unix_ms
        );
        let ca_info = certificate_info_pem(ca.certificate_pem()).unwrap();
        assert!(ca_info.not_before_unix_ms <= now_ms() - 24 * 3_600_000 + 5_000);
        let err = ca
            .issue_server_certificate(&["not a name!".into()], DAY)
            .unwrap_err();
        assert!(err.to_string().contains("not a name!"), "{err}");
    }
}
