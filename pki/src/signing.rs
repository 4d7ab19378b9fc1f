//! The fleet release key: Ed25519, signs the SHA-256 digest of every model
//! the fleet ships; agents verify before they activate anything.

use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::error::{PkiError, Result};
use crate::files::write_private_file;

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
    pub fn load_or_create(dir: &Path) -> Result<(ReleaseKey, bool)> {
        let path: PathBuf = dir.join(RELEASE_KEY_FILE);
        match std::fs::read(&path) {
            Ok(der) => {
                let pair = Ed25519KeyPair::from_pkcs8(&der).map_err(|e| {
                    PkiError::InvalidKey(format!("{} is not an Ed25519 key: {e}", path.display()))
                })?;
                Ok((ReleaseKey { pair }, false))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let der = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|e| {
                    PkiError::InvalidKey(format!("cannot generate a release key: {e}"))
                })?;
                std::fs::create_dir_all(dir).map_err(io_error(dir))?;
                write_private_file(&path, der.as_ref())?;
                let pair = Ed25519KeyPair::from_pkcs8(der.as_ref())
                    .map_err(|e| PkiError::InvalidKey(e.to_string()))?;
                Ok((ReleaseKey { pair }, true))
            }
            Err(err) => Err(io_error(&path)(err)),
        }
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
                "the signature of model {sha256_hex} does not verify with the fleet's release key"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

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
