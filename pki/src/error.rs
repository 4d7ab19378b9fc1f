//! The crate's error type.

use std::path::PathBuf;

/// The result of this crate's fallible operations.
pub type Result<T> = std::result::Result<T, PkiError>;

/// Everything that can go wrong with certificates, keys, tokens and TLS.
///
/// Messages never contain secret material (keys, token secrets).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A file or directory could not be read, written or created.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Input that should have been PEM was not (or held no object of the expected kind).
    #[error("invalid PEM: {0}")]
    InvalidPem(String),
    /// A private key could not be parsed or used.
    #[error("invalid private key: {0}")]
    InvalidKey(String),
    /// A certificate signing request could not be parsed or its signature did not verify.
    #[error("invalid certificate signing request: {0}")]
    InvalidCsr(String),
    /// A device id that cannot be put into a certificate.
    #[error("invalid device id {0:?}: expected 1 to 64 characters among A-Z a-z 0-9 . _ -")]
    InvalidDeviceId(String),
    /// A certificate could not be created or parsed, or the CA files are inconsistent.
    #[error("certificate error: {0}")]
    Certificate(String),
    /// A TLS configuration could not be built.
    #[error("TLS error: {0}")]
    Tls(String),
    /// A join token that is not `<16 hex id>.<32 hex secret>.<64 hex CA fingerprint>`.
    #[error("invalid join token: {0}")]
    InvalidJoinToken(String),
    /// A URL that is not `https://host[:port]`.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// The server presented no certificate whose SHA-256 is the pinned CA fingerprint.
    #[error(
        "{server}: the server's certificate did not match the join token's CA fingerprint \
         (expected CA {expected}); is the token for this control plane?"
    )]
    CaFingerprintMismatch { server: String, expected: String },
    /// The server answered the TLS handshake with something other than TLS:
    /// a plaintext listener.
    #[error(
        "cannot connect to {server}: TLS handshake failed: the server answered with something other than TLS (a plaintext listener?)"
    )]
    NotTls { server: String },
    /// The server's certificate is not from the CA the client trusts
    /// (another fleet's server, or a CA file of another fleet).
    #[error(
        "cannot connect to {server}: TLS handshake failed: the server's certificate is not from the CA this client trusts ({reason})"
    )]
    UntrustedServer { server: String, reason: String },
    /// The TCP connection, the TLS handshake or the HTTP/2 setup with a server failed.
    #[error("cannot connect to {server}: {reason}")]
    Connect { server: String, reason: String },
}

impl PkiError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PkiError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Renders an error and its chain of sources as `a: b: c`, skipping repeats.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        source = e.source();
    }
    out
}
