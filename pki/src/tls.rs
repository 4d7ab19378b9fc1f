//! rustls configurations of the fleet's TLS connections, all on the ring
//! crypto provider (never the process-wide default provider).

use std::fmt;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::ca::IssuedKeyPair;
use crate::certs::{fingerprint_der, parse_certificate_chain_pem, parse_private_key_pem};
use crate::error::{PkiError, Result};

/// The ALPN protocol of gRPC.
pub const ALPN_H2: &[u8] = b"h2";

/// The ring crypto provider every config of this crate uses.
///
/// rustls deprecates it since 0.23.48 as it has no post-quantum key
/// exchange (X25519MLKEM768), which only its aws-lc-rs provider offers.
/// Kept on purpose (the project's design names the ring provider):
/// aws-lc-rs builds a C library (a C toolchain for each
/// device target, CMake on some) and took the agent from 19.41 to 21.96 MB
/// stripped (built alone, rustls's `aws-lc-rs` and `prefer-post-quantum`
/// features added, ring kept for rcgen; measured by hand in stop 61), over
/// its 20 MB target (docs/benchmarks.md, "Footprint"). The fleet's
/// connections keep rustls's safe defaults (TLS 1.3 and 1.2, its cipher
/// suites), not post-quantum, with one change: the key exchange groups in
/// [`KX_GROUPS`]'s order, X25519 first.
#[allow(deprecated)]
pub fn crypto_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.kx_groups = KX_GROUPS.to_vec();
    Arc::new(provider)
}

/// The key exchange groups our clients offer and our servers prefer, in
/// that order. rustls 0.23.48 put P-384 first in the ring provider's list
/// (its `DEFAULT_KX_GROUPS`), and ring computes P-384 with generic bignum
/// code: a handshake between a client and a server of ours takes about
/// four times the CPU on P-384 as on X25519 (`edgefleet-bench tls`, its
/// handshake table; docs/benchmarks.md). X25519 is what other clients
/// (curl, browsers, Python's ssl, gRPC's C core) offer first, too. P-256
/// and P-384 stay, for clients that offer only those.
#[allow(deprecated)]
pub static KX_GROUPS: [&dyn rustls::crypto::SupportedKxGroup; 3] = [
    rustls::crypto::ring::kx_group::X25519,
    rustls::crypto::ring::kx_group::SECP256R1,
    rustls::crypto::ring::kx_group::SECP384R1,
];

fn tls_err(what: &str) -> impl FnOnce(rustls::Error) -> PkiError + '_ {
    move |e| PkiError::Tls(format!("{what}: {e}"))
}

fn roots_from_pem(ca_pem: &str) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certificate_chain_pem(ca_pem)? {
        roots
            .add(cert)
            .map_err(tls_err("cannot use the CA certificate as a trust anchor"))?;
    }
    Ok(Arc::new(roots))
}

/// Server config for the agent listener.
///
/// Presents the chain `[server certificate, CA certificate]` — the CA is
/// included so a joining agent can pin it by fingerprint. Client certificates
/// are optional (a joining agent has none yet), but one that is presented
/// must chain to the CA in `ca_pem` and be valid now: an expired one, or one
/// from another CA, fails the handshake. ALPN h2.
pub fn agent_server_tls_config(server: &IssuedKeyPair, ca_pem: &str) -> Result<Arc<ServerConfig>> {
    let provider = crypto_provider();
    let roots = roots_from_pem(ca_pem)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::Tls(format!("cannot build the client verifier: {e}")))?;
    let mut chain = parse_certificate_chain_pem(&server.certificate_pem)?;
    for ca in parse_certificate_chain_pem(ca_pem)? {
        if !chain.contains(&ca) {
            chain.push(ca);
        }
    }
    let key = parse_private_key_pem(&server.key_pem)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_err("protocol versions"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(tls_err("cannot use the server certificate and key"))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Server config for operator listeners: no client authentication. ALPN h2.
/// `server.certificate_pem` may hold a chain (leaf first).
pub fn operator_server_tls_config(server: &IssuedKeyPair) -> Result<Arc<ServerConfig>> {
    let chain = parse_certificate_chain_pem(&server.certificate_pem)?;
    let key = parse_private_key_pem(&server.key_pem)?;
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err("protocol versions"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(tls_err("cannot use the server certificate and key"))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The ALPN protocol of HTTP/1.1, which an HTTP listener offers beside
/// [`ALPN_H2`]: a client that offers only it (Python's urllib3, `curl
/// --http1.1`) is refused by a listener that does not.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Server config for a listener whose certificate its operator supplies
/// (the agent's inference listeners): presents `cert_pem` (leaf first, may
/// hold a chain) with `key_pem`, which must be the leaf's key. With
/// `client_ca_pem`, every client must present a certificate that chains to
/// one of its certificates and is valid now (mutual TLS); without, none is
/// asked for. Offers the `alpn` protocols, in that order of preference.
pub fn listener_tls_config(
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: Option<&str>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>> {
    let context = |what: &'static str| move |e: PkiError| PkiError::Tls(format!("{what}: {e}"));
    let provider = crypto_provider();
    let chain = parse_certificate_chain_pem(cert_pem).map_err(context("the certificate"))?;
    let key = parse_private_key_pem(key_pem).map_err(context("the key"))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls_err("protocol versions"))?;
    let builder = match client_ca_pem {
        Some(ca_pem) => {
            let roots = roots_from_pem(ca_pem).map_err(context("the client CA"))?;
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| PkiError::Tls(format!("cannot build the client verifier: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            PkiError::Tls("the key is not the certificate's (their public keys differ)".into())
        }
        e => PkiError::Tls(format!("cannot use the certificate and key: {e}")),
    })?;
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Client config trusting the CA whose SHA-256 fingerprint (hex) is given —
/// for an agent's first connection with a join token. See
/// [`PinnedCaVerifier`]. No client certificate. ALPN h2.
pub fn pinned_client_tls_config(ca_fingerprint: &str) -> Result<Arc<ClientConfig>> {
    let provider = crypto_provider();
    let verifier = Arc::new(PinnedCaVerifier::new(ca_fingerprint, provider.clone())?);
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_err("protocol versions"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Mutual-TLS client config: trusts only `ca_pem`, presents `cert_pem`
/// (leaf first, may hold a chain) with `key_pem`. ALPN h2.
pub fn mtls_client_tls_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<ClientConfig>> {
    let roots = roots_from_pem(ca_pem)?;
    let chain = parse_certificate_chain_pem(cert_pem)?;
    let key = parse_private_key_pem(key_pem)?;
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err("protocol versions"))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(tls_err("cannot use the client certificate and key"))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Client config trusting only `ca_pem`, without a client certificate (the
/// operator CLI over TLS). ALPN h2.
pub fn ca_client_tls_config(ca_pem: &str) -> Result<Arc<ClientConfig>> {
    let roots = roots_from_pem(ca_pem)?;
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err("protocol versions"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The error a [`PinnedCaVerifier`] reports (inside
/// `rustls::Error::InvalidCertificate(CertificateError::Other(..))`) when no
/// presented certificate has the pinned fingerprint.
#[derive(Clone, PartialEq, Eq)]
pub struct CaFingerprintMismatch {
    pub expected: String,
}

// rustls renders `CertificateError::Other` with `Debug`: make that the
// readable message too.
impl fmt::Debug for CaFingerprintMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for CaFingerprintMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "certificate did not match the join token's CA fingerprint (expected CA {})",
            self.expected
        )
    }
}

impl std::error::Error for CaFingerprintMismatch {}

/// A server certificate verifier for trust on a known CA fingerprint.
///
/// Among the certificates the server presented (end entity and
/// intermediates) it looks for the one whose DER SHA-256 equals the pinned
/// fingerprint, then verifies the end entity against that certificate as the
/// only root with webpki — chain, validity period, server name and key usage
/// checked as usual. No presented certificate with the fingerprint fails with
/// [`CaFingerprintMismatch`].
pub struct PinnedCaVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for PinnedCaVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedCaVerifier")
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl PinnedCaVerifier {
    /// `fingerprint`: 64 hex characters (any case).
    pub fn new(fingerprint: &str, provider: Arc<CryptoProvider>) -> Result<Self> {
        let fingerprint = fingerprint.trim().to_ascii_lowercase();
        if fingerprint.len() != 64 || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(PkiError::Tls(
                "a CA fingerprint must be 64 hex characters (SHA-256)".into(),
            ));
        }
        Ok(PinnedCaVerifier {
            fingerprint,
            provider,
        })
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = std::iter::once(end_entity)
            .chain(intermediates)
            .find(|c| fingerprint_der(c) == self.fingerprint)
        else {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(CaFingerprintMismatch {
                    expected: self.fingerprint.clone(),
                })),
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(format!("pinned CA verifier: {e}")))?;
        let others: Vec<CertificateDer<'_>> =
            intermediates.iter().filter(|c| *c != ca).cloned().collect();
        verifier.verify_server_cert(end_entity, &others, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The rustls error a handshake failed with, through the I/O errors that
/// carry it.
pub(crate) fn rustls_error<'e>(
    error: &'e (dyn std::error::Error + 'static),
) -> Option<&'e rustls::Error> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && let Some(tls) = rustls_error(inner)
        {
            return Some(tls);
        }
        current = e.source();
    }
    None
}

/// What a failed TLS handshake with `server` means for its client, from the
/// rustls error behind `error` (one walk of its chain): a pinned CA that is
/// not the server's, a peer that does not speak TLS, a certificate from
/// another CA, or another failure, with rustls' words.
pub(crate) fn handshake_failure(
    server: &str,
    error: &(dyn std::error::Error + 'static),
) -> PkiError {
    let server = server.to_string();
    let tls = rustls_error(error);
    if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) = tls
        && let Some(mismatch) = other.0.downcast_ref::<CaFingerprintMismatch>()
    {
        return PkiError::CaFingerprintMismatch {
            server,
            expected: mismatch.expected.clone(),
        };
    }
    match tls {
        Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) => {
            PkiError::NotTls { server }
        }
        Some(rustls::Error::InvalidCertificate(
            reason @ (CertificateError::BadSignature | CertificateError::UnknownIssuer),
        )) => PkiError::UntrustedServer {
            server,
            reason: format!("{reason:?}"),
        },
        _ => PkiError::Connect {
            server,
            reason: format!("TLS handshake failed: {error}"),
        },
    }
}
