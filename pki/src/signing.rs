//! The fleet release key: Ed25519, signs the SHA-256 digest of every model
//! the fleet ships; agents verify before they activate anything.

use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::error::{PkiError, Result};
use crate::files::create_private_file;

/// File name of the release key (PKCS#8 DER) in the server's data dir.
pub const RELEASE_KEY_FILE: &str = "release.key";

/// The fleet's model-signing key.
pub struct ReleaseKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for ReleaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleaseKey")
            .field("public_key", &hex::encode(self.public_key()))
            .finish_non_exhaustive()
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl ReleaseKey {
    /// Loads `DIR/release.key`, or creates it (0600). Returns (key, created).
    /// The file is created, never replaced: servers starting together on one
    /// (shared) data dir all end with the key of the one that created it.
    pub fn load_or_create(dir: &Path) -> Result<(ReleaseKey, bool)> {
        let path: PathBuf = dir.join(RELEASE_KEY_FILE);
        let load = |der: &[u8]| {
            Ed25519KeyPair::from_pkcs8(der)
                .map(|pair| ReleaseKey { pair })
                .map_err(|e| {
                    PkiError::InvalidKey(format!("{} is not an Ed25519 key: {e}", path.display()))
                })
        };
        match std::fs::read(&path) {
            Ok(der) => Ok((load(&der)?, false)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let der = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|e| {
                    PkiError::InvalidKey(format!("cannot generate a release key: {e}"))
                })?;
                std::fs::create_dir_all(dir).map_err(io_error(dir))?;
                if create_private_file(&path, der.as_ref())? {
                    Ok((load(der.as_ref())?, true))
                } else {
                    // Another server created it meanwhile.
                    let der = std::fs::read(&path).map_err(io_error(&path))?;
                    Ok((load(&der)?, false))
                }
            }
            Err(err) => Err(io_error(&path)(err)),
        }
    }

    /// An operator's own signing key from a file: Ed25519 in PKCS#8, DER or
    /// PEM (`openssl genpkey -algorithm ed25519 -out signing.pem` makes one;
    /// so does a server's `release.key`).
    pub fn from_key_file(path: &Path) -> Result<ReleaseKey> {
        use rustls_pki_types::PrivatePkcs8KeyDer;
        use rustls_pki_types::pem::PemObject;
        let bytes = std::fs::read(path).map_err(io_error(path))?;
        let der = if bytes.starts_with(b"-----BEGIN") {
            PrivatePkcs8KeyDer::from_pem_slice(&bytes)
                .map_err(|e| {
                    PkiError::InvalidKey(format!(
                        "{} holds no PKCS#8 private key (\"BEGIN PRIVATE KEY\"): {e}",
                        path.display()
                    ))
                })?
                .secret_pkcs8_der()
                .to_vec()
        } else {
            bytes
        };
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(|e| {
            PkiError::InvalidKey(format!(
                "{} is not an Ed25519 private key in PKCS#8: {e}",
                path.display()
            ))
        })?;
        Ok(ReleaseKey { pair })
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    /// Signs a model's hex SHA-256 (the signature covers the raw digest).
    pub fn sign_model(&self, sha256_hex: &str) -> Result<Vec<u8>> {
        let digest = decode_digest(sha256_hex)?;
        Ok(self.pair.sign(&digest).as_ref().to_vec())
    }
}

fn decode_digest(sha256_hex: &str) -> Result<[u8; 32]> {
    let bytes = hex::decode(sha256_hex)
        .map_err(|_| PkiError::Certificate(format!("{sha256_hex:?} is not a hex SHA-256")))?;
    bytes
        .try_into()
        .map_err(|_| PkiError::Certificate(format!("{sha256_hex:?} is not a hex SHA-256")))
}

/// Checks an Ed25519 signature of a model's digest against a raw 32-byte
/// public key.
pub fn verify_model_signature(public_key: &[u8], sha256_hex: &str, signature: &[u8]) -> Result<()> {
    let digest = decode_digest(sha256_hex)?;
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&digest, signature)
        .map_err(|_| {
            PkiError::Certificate(format!(
                "the signature of model {sha256_hex} does not verify with key {}",
                hex::encode(public_key)
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_creating_the_release_key_together_agree_on_one() {
        for _ in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let results: Vec<(Vec<u8>, bool)> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..4)
                    .map(|_| {
                        scope.spawn(|| {
                            let (key, created) = ReleaseKey::load_or_create(dir.path()).unwrap();
                            (key.public_key(), created)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(results.iter().filter(|(_, created)| *created).count(), 1);
            let (again, created) = ReleaseKey::load_or_create(dir.path()).unwrap();
            assert!(!created);
            assert!(results.iter().all(|(key, _)| *key == again.public_key()));
        }
    }

    #[test]
    fn an_operator_key_file_loads_from_der_or_pem_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // A server's release key (PKCS#8 v2 DER).
        let (key, _) = ReleaseKey::load_or_create(dir.path()).unwrap();
        let from_der = ReleaseKey::from_key_file(&dir.path().join(RELEASE_KEY_FILE)).unwrap();
        assert_eq!(from_der.public_key(), key.public_key());
        // A key another tool made, as PEM and as DER.
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let pem_path = dir.path().join("signing.pem");
        std::fs::write(&pem_path, other.serialize_pem()).unwrap();
        let from_pem = ReleaseKey::from_key_file(&pem_path).unwrap();
        assert_eq!(from_pem.public_key(), other.public_key_raw());
        let der_path = dir.path().join("signing.der");
        std::fs::write(&der_path, other.serialize_der()).unwrap();
        assert_eq!(
            ReleaseKey::from_key_file(&der_path).unwrap().public_key(),
            other.public_key_raw()
        );
        // As OpenSSL writes Ed25519 keys: PKCS#8 v1, without the public key
        // (RFC 8410's fixed 16-byte prefix, then the 32-byte seed).
        let seed = [7u8; 32];
        let mut v1 = hex::decode("302e020100300506032b657004220420").unwrap();
        v1.extend_from_slice(&seed);
        let v1_path = dir.path().join("openssl.der");
        std::fs::write(&v1_path, &v1).unwrap();
        let expected = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
        assert_eq!(
            ReleaseKey::from_key_file(&v1_path).unwrap().public_key(),
            expected.public_key().as_ref()
        );

        let garbage = dir.path().join("garbage");
        std::fs::write(&garbage, b"not a key").unwrap();
        let err = ReleaseKey::from_key_file(&garbage).unwrap_err().to_string();
        assert!(err.contains("not an Ed25519 private key"), "{err}");
        let err = ReleaseKey::from_key_file(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn signatures_verify_and_tampering_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let (key, created) = ReleaseKey::load_or_create(dir.path()).unwrap();
        assert!(created);
        let (again, created) = ReleaseKey::load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(key.public_key(), again.public_key());
        let digest = "ab".repeat(32);
        let signature = key.sign_model(&digest).unwrap();
        verify_model_signature(&key.public_key(), &digest, &signature).unwrap();
        let other = "cd".repeat(32);
        assert!(verify_model_signature(&key.public_key(), &other, &signature).is_err());
        let mut flipped = signature.clone();
        flipped[0] ^= 1;
        assert!(verify_model_signature(&key.public_key(), &digest, &flipped).is_err());
        let (stranger, _) = ReleaseKey::load_or_create(&dir.path().join("x")).unwrap();
        assert!(verify_model_signature(&stranger.public_key(), &digest, &signature).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(RELEASE_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
