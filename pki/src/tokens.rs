//! Join tokens and operator bearer tokens.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::error::{PkiError, Result};

/// Length in hex characters of a join token's id.
pub const JOIN_TOKEN_ID_LEN: usize = 16;
/// Length in hex characters of a join token's secret (128 bits).
pub const JOIN_TOKEN_SECRET_LEN: usize = 32;
/// Length in hex characters of a CA fingerprint (SHA-256).
pub const FINGERPRINT_LEN: usize = 64;
/// Prefix of operator bearer tokens.
pub const OPERATOR_TOKEN_PREFIX: &str = "efo_";
/// Hex characters after the prefix of an operator token.
pub const OPERATOR_TOKEN_HEX_LEN: usize = 40;
/// Hex characters of an operator token's id (the first ones after the prefix).
pub const OPERATOR_TOKEN_ID_LEN: usize = 8;

/// A join token, `<id>.<secret>.<ca-fingerprint>`, all lower-case hex: id 16
/// characters, secret 32 (128 bits from the OS CSPRNG), fingerprint 64 (the
/// SHA-256 of the CA certificate the agent pins on its first connection).
///
/// `Display` renders the token string; `Debug` hides the secret. The control
/// plane stores only `id` and [`hash_secret`]`(secret)`.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinTokenSecret {
    pub id: String,
    pub secret: String,
    pub ca_fingerprint: String,
}

impl JoinTokenSecret {
    /// A new token for the CA whose fingerprint is given (stored lower-cased).
    pub fn generate(ca_fingerprint: &str) -> Self {
        let id: [u8; JOIN_TOKEN_ID_LEN / 2] = rand::random();
        let secret: [u8; JOIN_TOKEN_SECRET_LEN / 2] = rand::random();
        JoinTokenSecret {
            id: hex::encode(id),
            secret: hex::encode(secret),
            ca_fingerprint: ca_fingerprint.trim().to_ascii_lowercase(),
        }
    }

    /// Parses a token string (surrounding white space is ignored, hex may be
    /// upper case; the result is lower case). Error messages never contain
    /// the secret.
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        if parts.len() != 3 {
            return Err(PkiError::InvalidJoinToken(format!(
                "expected 3 parts separated by '.' (<id>.<secret>.<ca-fingerprint>), found {}",
                parts.len()
            )));
        }
        let id = hex_part("id", parts[0], JOIN_TOKEN_ID_LEN)?;
        let secret = hex_part("secret", parts[1], JOIN_TOKEN_SECRET_LEN)?;
        let ca_fingerprint = hex_part("CA fingerprint", parts[2], FINGERPRINT_LEN)?;
        Ok(JoinTokenSecret {
            id,
            secret,
            ca_fingerprint,
        })
    }

    /// `hash_secret(&self.secret)`.
    pub fn secret_hash(&self) -> String {
        hash_secret(&self.secret)
    }
}

fn hex_part(what: &str, part: &str, len: usize) -> Result<String> {
    if part.len() != len {
        return Err(PkiError::InvalidJoinToken(format!(
            "the {what} must be {len} hex characters, found {}",
            part.len()
        )));
    }
    if !part.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(PkiError::InvalidJoinToken(format!(
            "the {what} must be hexadecimal"
        )));
    }
    Ok(part.to_ascii_lowercase())
}

impl fmt::Display for JoinTokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.id, self.secret, self.ca_fingerprint)
    }
}

impl fmt::Debug for JoinTokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinTokenSecret")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish()
    }
}

impl std::str::FromStr for JoinTokenSecret {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

/// Lower-case hex SHA-256 of a secret's UTF-8 bytes. Join token secrets and
/// operator bearer tokens are stored only as this.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `hash_secret(secret)` equals `stored_hash` (hex, any case),
/// compared in constant time.
pub fn secret_matches_hash(secret: &str, stored_hash: &str) -> bool {
    let computed = hash_secret(secret);
    let stored = stored_hash.trim().to_ascii_lowercase();
    if computed.len() != stored.len() {
        return false;
    }
    computed
        .bytes()
        .zip(stored.bytes())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// A new operator bearer token: `efo_` + 40 lower-case hex characters (160
/// bits from the OS CSPRNG). Returns `(token, id)` where the id is the first 8
/// hex characters after the prefix — not secret (it may be logged and shown in
/// listings), the remaining 128 bits are. Store `hash_secret(token)` of the
/// whole token.
pub fn generate_operator_token() -> (String, String) {
    let bytes: [u8; OPERATOR_TOKEN_HEX_LEN / 2] = rand::random();
    let token = format!("{OPERATOR_TOKEN_PREFIX}{}", hex::encode(bytes));
    let id = operator_token_id(&token).unwrap_or_default();
    (token, id)
}

/// The id of a well-formed operator token (see [`generate_operator_token`]),
/// `None` if the token is malformed.
pub fn operator_token_id(token: &str) -> Option<String> {
    let rest = token.strip_prefix(OPERATOR_TOKEN_PREFIX)?;
    if rest.len() != OPERATOR_TOKEN_HEX_LEN
        || !rest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    Some(rest[..OPERATOR_TOKEN_ID_LEN].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn join_token_roundtrip() {
        let t = JoinTokenSecret::generate(&FP.to_ascii_uppercase());
        assert_eq!(t.id.len(), 16);
        assert_eq!(t.secret.len(), 32);
        assert_eq!(t.ca_fingerprint, FP);
        let s = t.to_string();
        assert_eq!(s.split('.').count(), 3);
        let parsed = JoinTokenSecret::parse(&s).unwrap();
        assert_eq!(parsed, t);
        let parsed: JoinTokenSecret = format!("  {}\n", s.to_ascii_uppercase()).parse().unwrap();
        assert_eq!(parsed, t);
        assert_ne!(JoinTokenSecret::generate(FP).secret, t.secret);
        assert!(!format!("{t:?}").contains(&t.secret));
    }

    #[test]
    fn malformed_join_tokens_are_rejected() {
        let good_id = "0123456789abcdef";
        let good_secret = "0123456789abcdef0123456789abcdef";
        let cases = [
            String::new(),
            format!("{good_id}.{good_secret}"),
            format!("{good_id}.{good_secret}.{FP}.x"),
            format!("{good_id}..{FP}"),
            format!("0123456789abcde.{good_secret}.{FP}"),
            format!("0123456789abcdef0.{good_secret}.{FP}"),
            format!("{good_id}.{}.{FP}", &good_secret[1..]),
            format!("{good_id}.{good_secret}.{}", &FP[2..]),
            format!("0123456789abcdeg.{good_secret}.{FP}"),
            format!("{good_id}.0123456789abcdef0123456789abcdez.{FP}"),
            format!("{good_id}.{good_secret}.{}", FP.replace('f', "x")),
            format!("{good_id}.{good_secret}.{}é", &FP[..63]),
        ];
        for case in cases {
            let err = JoinTokenSecret::parse(&case).unwrap_err();
            assert!(
                matches!(err, PkiError::InvalidJoinToken(_)),
                "{case}: {err}"
            );
        }
        let err =
            JoinTokenSecret::parse(&format!("{good_id}.zz23456789abcdef0123456789abcdef.{FP}"))
                .unwrap_err();
        assert!(!err.to_string().contains("zz2345"), "{err}");
        assert!(JoinTokenSecret::parse(&format!("{good_id}.{good_secret}.{FP}")).is_ok());
    }

    #[test]
    fn hashes_and_operator_tokens() {
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(secret_matches_hash(
            "abc",
            &hash_secret("abc").to_uppercase()
        ));
        assert!(!secret_matches_hash("abd", &hash_secret("abc")));
        assert!(!secret_matches_hash("abc", "ba78"));

        let (token, id) = generate_operator_token();
        assert!(token.starts_with("efo_"));
        assert_eq!(token.len(), 44);
        assert_eq!(id, &token[4..12]);
        assert_eq!(operator_token_id(&token), Some(id));
        assert_eq!(operator_token_id("efo_123"), None);
        assert_eq!(operator_token_id(&token.replace("efo_", "efx_")), None);
        assert_ne!(generate_operator_token().0, token);
    }
}
