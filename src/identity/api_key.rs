//! API keys: generation, hashing, and the stored hash form (`sha256:` + 64 lowercase hex).
//!
//! The catalog only ever holds hashes. A presented key is hashed once, looked up by its hash in O(1), and the
//! stored hash is then compared in constant time. The map lookup before that compares SHA-256 outputs, whose
//! timing says nothing about how much of a key was right: no step compares key material in variable time.

use std::fmt;

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX: &str = "sha256:";
/// Random bytes in a generated key: 256 bits, above the contract's 192.
const KEY_BYTES: usize = 32;

/// The SHA-256 of an API key, as the catalog stores it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// Hashes a presented key.
    pub fn of(key: &str) -> KeyHash {
        KeyHash(Sha256::digest(key.as_bytes()).into())
    }

    /// Parses the stored form `sha256:<64 lowercase hex>`.
    pub fn parse(stored: &str) -> Result<KeyHash, KeyHashError> {
        let hex_part = stored.strip_prefix(PREFIX).ok_or(KeyHashError::Prefix)?;
        if hex_part.len() != 64
            || !hex_part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(KeyHashError::Digits);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| KeyHashError::Digits)?;
        Ok(KeyHash(out))
    }

    /// Constant-time equality, for the final compare after a lookup.
    pub fn ct_eq(&self, other: &KeyHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", hex::encode(self.0))
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A stored key hash is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyHashError {
    /// The text does not start with `sha256:`.
    #[error("key hash must start with \"sha256:\"")]
    Prefix,
    /// The digest part is not 64 lowercase hex digits.
    #[error("key hash must be \"sha256:\" followed by 64 lowercase hex digits")]
    Digits,
}

/// Whether a generated key is for live or test traffic (only its prefix differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// `tg_live_…`
    Live,
    /// `tg_test_…`
    Test,
}

/// A fresh random API key: `tg_live_` or `tg_test_` + base58 of 32 bytes from the thread-local CSPRNG
/// (ChaCha seeded from the OS).
pub fn generate(kind: KeyKind) -> String {
    let mut bytes = [0u8; KEY_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    let prefix = match kind {
        KeyKind::Live => "tg_live_",
        KeyKind::Test => "tg_test_",
    };
    format!("{prefix}{}", bs58::encode(bytes).into_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_match_the_sha256_test_vectors() {
        // FIPS 180-2 "abc" and the empty string.
        assert_eq!(
            KeyHash::of("abc").to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            KeyHash::of("").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn stored_form_round_trips_and_rejects_junk() {
        let h = KeyHash::of("tg_test_example");
        assert_eq!(KeyHash::parse(&h.to_string()), Ok(h));
        assert_eq!(KeyHash::parse("md5:abc"), Err(KeyHashError::Prefix));
        assert_eq!(KeyHash::parse("sha256:abc"), Err(KeyHashError::Digits));
        let upper = h.to_string().to_uppercase().replace("SHA256:", "sha256:");
        assert_eq!(KeyHash::parse(&upper), Err(KeyHashError::Digits));
        let non_hex = format!("sha256:{}", "g".repeat(64));
        assert_eq!(KeyHash::parse(&non_hex), Err(KeyHashError::Digits));
    }

    #[test]
    fn constant_time_compare_agrees_with_equality() {
        let a = KeyHash::of("a");
        let b = KeyHash::of("b");
        assert!(a.ct_eq(&a));
        assert!(!a.ct_eq(&b));
    }

    #[test]
    fn generated_keys_have_the_prefix_and_enough_entropy() {
        let live = generate(KeyKind::Live);
        let test = generate(KeyKind::Test);
        assert!(live.starts_with("tg_live_"));
        assert!(test.starts_with("tg_test_"));
        let body = &live["tg_live_".len()..];
        assert_eq!(bs58::decode(body).into_vec().unwrap().len(), 32);
        assert_ne!(generate(KeyKind::Live), live);
    }
}
