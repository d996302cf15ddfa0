//! Key material: what kind of key each source holds, which algorithms fit it, and key sets looked up by `kid`.

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

/// RFC 7518 §3.3: RSA keys of 2048 bits or larger MUST be used.
const MIN_RSA_MODULUS_BYTES: usize = 256;

/// The kind of a verification key; it decides which algorithms may use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyKind {
    Hmac,
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyKind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Hmac => "an HMAC secret",
            Self::Rsa => "an RSA key",
            Self::EcP256 => "a P-256 key",
            Self::EcP384 => "a P-384 key",
            Self::Ed25519 => "an Ed25519 key",
        }
    }

    /// What the contract's default allow-list is for this key type.
    pub(crate) fn default_algorithm(self) -> Algorithm {
        match self {
            Self::Hmac => Algorithm::HS256,
            Self::Rsa => Algorithm::RS256,
            Self::EcP256 => Algorithm::ES256,
            Self::EcP384 => Algorithm::ES384,
            Self::Ed25519 => Algorithm::EdDSA,
        }
    }

    /// Whether `alg` may be verified with this kind of key; the guard against algorithm confusion.
    pub(crate) fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            Self::Hmac => matches!(alg, HS256 | HS384 | HS512),
            Self::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            Self::EcP256 => alg == ES256,
            Self::EcP384 => alg == ES384,
            Self::Ed25519 => alg == EdDSA,
        }
    }
}

/// Parses an allow-list entry; `none` and unknown names are refused.
pub(crate) fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    if name.eq_ignore_ascii_case("none") {
        return Err("algorithm none is never allowed".into());
    }
    name.parse::<Algorithm>().map_err(|_| {
        format!(
            "unknown algorithm {name:?} (use HS256/384/512, RS256/384/512, PS256/384/512, ES256/384 or EdDSA)"
        )
    })
}

/// RFC 7518 §3.2: an HMAC key must be at least as long as the hash output.
pub(crate) fn min_hmac_secret_bytes(algorithms: &[Algorithm]) -> usize {
    algorithms
        .iter()
        .map(|alg| match alg {
            Algorithm::HS384 => 48,
            Algorithm::HS512 => 64,
            _ => 32,
        })
        .max()
        .unwrap_or(32)
}

/// One verification key and the algorithms it may verify.
#[derive(Debug)]
pub(crate) struct VerifyKey {
    pub(crate) kid: Option<String>,
    pub(crate) key: DecodingKey,
    pub(crate) algorithms: Vec<Algorithm>,
}

/// The keys of one provider; `kid` lookups never leave this set.
#[derive(Debug, Default)]
pub(crate) struct KeySet {
    keys: Vec<VerifyKey>,
}

/// Why no key was found in a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyMiss {
    /// No key has this `kid`, or none fits the algorithm.
    Unknown,
    /// The key with this `kid` exists but may not verify this algorithm.
    WrongAlgorithm,
}

impl KeySet {
    pub(crate) fn new(keys: Vec<VerifyKey>) -> Self {
        Self { keys }
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Finds the key for a token: by `kid` when the token has one (a single unnamed key also answers any `kid`),
    /// otherwise the only key that fits `alg`; several candidates are ambiguous and never all tried.
    pub(crate) fn find(&self, kid: Option<&str>, alg: Algorithm) -> Result<&VerifyKey, KeyMiss> {
        let candidate = match kid {
            Some(kid) => match self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)) {
                Some(key) => Some(key),
                None if self.keys.len() == 1 && self.keys[0].kid.is_none() => Some(&self.keys[0]),
                None => None,
            },
            None => {
                let mut fitting = self.keys.iter().filter(|k| k.algorithms.contains(&alg));
                match (fitting.next(), fitting.next()) {
                    (Some(only), None) => Some(only),
                    _ => None,
                }
            }
        };
        match candidate {
            Some(key) if key.algorithms.contains(&alg) => Ok(key),
            Some(_) => Err(KeyMiss::WrongAlgorithm),
            None => Err(KeyMiss::Unknown),
        }
    }

    /// Whether two sets hold the same keys (same kids, algorithms and material), so a refresh changed nothing.
    pub(crate) fn same_as(&self, other: &KeySet) -> bool {
        self.keys.len() == other.keys.len()
            && self.keys.iter().zip(&other.keys).all(|(a, b)| {
                a.kid == b.kid
                    && a.algorithms == b.algorithms
                    && a.key.family() == b.key.family()
                    && same_material(&a.key, &b.key)
            })
    }
}

fn same_material(a: &DecodingKey, b: &DecodingKey) -> bool {
    use jsonwebtoken::DecodingKeyKind::{RsaModulusExponent, SecretOrDer};
    match (a.kind(), b.kind()) {
        (SecretOrDer(x), SecretOrDer(y)) => x == y,
        (RsaModulusExponent { n: n1, e: e1 }, RsaModulusExponent { n: n2, e: e2 }) => {
            n1 == n2 && e1 == e2
        }
        _ => false,
    }
}

/// The algorithms a key may verify: the allow-list filtered by key kind, else the kind's default.
pub(crate) fn algorithms_for(kind: KeyKind, allow_list: Option<&[Algorithm]>) -> Vec<Algorithm> {
    match allow_list {
        Some(list) => list.iter().copied().filter(|alg| kind.fits(*alg)).collect(),
        None => vec![kind.default_algorithm()],
    }
}

/// Reads a PEM public key, refusing private keys and keys too weak to trust.
pub(crate) fn key_from_pem(pem: &[u8]) -> Result<(KeyKind, DecodingKey), String> {
    let text = std::str::from_utf8(pem).map_err(|_| "the key file is not PEM text".to_owned())?;
    if text.contains("PRIVATE KEY") {
        return Err("the key file holds a private key; give the public key only".into());
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        let der = key
            .try_get_as_bytes()
            .map_err(|_| "unreadable RSA public key".to_owned())?;
        let modulus = rsa_modulus_len(der).ok_or("unreadable RSA public key")?;
        if modulus < MIN_RSA_MODULUS_BYTES {
            return Err(format!(
                "the RSA key has {} bits; at least 2048 are required",
                modulus * 8
            ));
        }
        return Ok((KeyKind::Rsa, key));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        let point = key
            .try_get_as_bytes()
            .map_err(|_| "unreadable EC public key".to_owned())?;
        return match point.len() {
            65 => Ok((KeyKind::EcP256, key)),
            97 => Ok((KeyKind::EcP384, key)),
            _ => Err("the EC key is on an unsupported curve (use P-256 or P-384)".into()),
        };
    }
    if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        return Ok((KeyKind::Ed25519, key));
    }
    Err("the key file holds no RSA, P-256, P-384 or Ed25519 public key in PEM (SPKI) form".into())
}

/// Length in bytes of the modulus of a DER PKCS#1 RSAPublicKey, without its sign byte.
fn rsa_modulus_len(der: &[u8]) -> Option<usize> {
    let (tag, body, _) = der_element(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, modulus, _) = der_element(body)?;
    if tag != 0x02 {
        return None;
    }
    let significant = modulus
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(modulus.len());
    Some(modulus.len() - significant)
}

/// Splits one DER element into (tag, contents, rest).
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[count..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// A JWKS document: only `keys` matters.
#[derive(Deserialize)]
struct JwksDocument {
    keys: Vec<serde_json::Value>,
}

/// What parsing a JWKS found.
#[derive(Debug)]
pub(crate) struct ParsedJwks {
    pub(crate) set: KeySet,
    /// Keys left out (encryption keys, symmetric keys, unsupported curves, unfit algorithms, malformed).
    pub(crate) skipped: usize,
}

/// Parses a JWKS, keeping only public signature keys that fit the allow-list; symmetric (`oct`) keys are never
/// taken from a JWKS.
pub(crate) fn parse_jwks(
    bytes: &[u8],
    allow_list: Option<&[Algorithm]>,
) -> Result<ParsedJwks, String> {
    let doc: JwksDocument =
        serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = Vec::with_capacity(doc.keys.len());
    let mut skipped = 0;
    for raw in doc.keys {
        match jwk_to_key(raw, allow_list) {
            Some(key) => keys.push(key),
            None => skipped += 1,
        }
    }
    Ok(ParsedJwks {
        set: KeySet::new(keys),
        skipped,
    })
}

fn jwk_to_key(raw: serde_json::Value, allow_list: Option<&[Algorithm]>) -> Option<VerifyKey> {
    let jwk: Jwk = serde_json::from_value(raw).ok()?;
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return None;
    }
    if let Some(ops) = &jwk.common.key_operations
        && !ops.iter().any(|op| matches!(op, KeyOperations::Verify))
    {
        return None;
    }
    let kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(params) => {
            let n = base64_url_len(&params.n)?;
            (n >= MIN_RSA_MODULUS_BYTES).then_some(KeyKind::Rsa)?
        }
        AlgorithmParameters::EllipticCurve(params) => match params.curve {
            EllipticCurve::P256 => KeyKind::EcP256,
            EllipticCurve::P384 => KeyKind::EcP384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(params) => match params.curve {
            EllipticCurve::Ed25519 => KeyKind::Ed25519,
            _ => return None,
        },
        _ => return None,
    };
    let algorithms = match jwk.common.key_algorithm {
        Some(declared) => {
            let alg = signing_algorithm(declared)?;
            let allowed = allow_list.is_none_or(|list| list.contains(&alg));
            if !(kind.fits(alg) && allowed) {
                return None;
            }
            vec![alg]
        }
        None => algorithms_for(kind, allow_list),
    };
    if algorithms.is_empty() {
        return None;
    }
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    Some(VerifyKey {
        kid: jwk.common.key_id,
        key,
        algorithms,
    })
}

fn signing_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// Decoded length of a base64url modulus, without leading zero bytes.
fn base64_url_len(value: &str) -> Option<usize> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .ok()?;
    let significant = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    Some(bytes.len() - significant)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/jwt/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn pem_kinds_are_recognised() {
        assert_eq!(
            key_from_pem(&fixture("rsa_a.pub.pem")).unwrap().0,
            KeyKind::Rsa
        );
        assert_eq!(
            key_from_pem(&fixture("ec_p256.pub.pem")).unwrap().0,
            KeyKind::EcP256
        );
        assert_eq!(
            key_from_pem(&fixture("ec_p384.pub.pem")).unwrap().0,
            KeyKind::EcP384
        );
        assert_eq!(
            key_from_pem(&fixture("ed25519.pub.pem")).unwrap().0,
            KeyKind::Ed25519
        );
    }

    #[test]
    fn private_keys_and_junk_are_refused() {
        let err = key_from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
            .unwrap_err();
        assert!(err.contains("private key"), "{err}");
        assert!(key_from_pem(b"hello").is_err());
    }

    #[test]
    fn algorithm_names_are_checked() {
        assert_eq!(parse_algorithm("PS256").unwrap(), Algorithm::PS256);
        assert!(parse_algorithm("none").unwrap_err().contains("never"));
        assert!(parse_algorithm("NONE").is_err());
        assert!(parse_algorithm("ES512").unwrap_err().contains("unknown"));
    }

    #[test]
    fn key_kinds_only_fit_their_family() {
        assert!(KeyKind::Rsa.fits(Algorithm::PS512));
        assert!(!KeyKind::Rsa.fits(Algorithm::HS256));
        assert!(!KeyKind::EcP256.fits(Algorithm::ES384));
        assert!(!KeyKind::Hmac.fits(Algorithm::RS256));
        assert_eq!(
            min_hmac_secret_bytes(&[Algorithm::HS256, Algorithm::HS512]),
            64
        );
    }

    #[test]
    fn jwks_keeps_signature_keys_only() {
        let doc = serde_json::json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"},
            {"kty": "EC", "crv": "P-256", "kid": "enc", "use": "enc",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "EC", "crv": "P-256", "kid": "sig",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "RSA", "kid": "weak", "n": "AQAB", "e": "AQAB"},
            {"kty": "EC", "crv": "P-256", "kid": "wrong-alg", "alg": "RS256",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "XYZ", "kid": "alien"}
        ]});
        let parsed = parse_jwks(doc.to_string().as_bytes(), None).unwrap();
        assert_eq!(parsed.set.len(), 1);
        assert_eq!(parsed.skipped, 5);
        assert!(parsed.set.find(Some("sig"), Algorithm::ES256).is_ok());
        assert_eq!(
            parsed.set.find(Some("sig"), Algorithm::ES384).unwrap_err(),
            KeyMiss::WrongAlgorithm
        );
        assert_eq!(
            parsed.set.find(Some("sym"), Algorithm::HS256).unwrap_err(),
            KeyMiss::Unknown
        );
    }

    #[test]
    fn lookup_without_kid_needs_exactly_one_fitting_key() {
        let parsed = parse_jwks(&fixture("jwks_ab.json"), None).unwrap();
        assert_eq!(parsed.set.len(), 3);
        assert_eq!(
            parsed.set.find(None, Algorithm::RS256).unwrap_err(),
            KeyMiss::Unknown
        );
        assert_eq!(
            parsed
                .set
                .find(None, Algorithm::ES256)
                .unwrap()
                .kid
                .as_deref(),
            Some("ec-a")
        );
        assert_eq!(
            parsed.set.find(Some("nope"), Algorithm::RS256).unwrap_err(),
            KeyMiss::Unknown
        );
    }

    #[test]
    fn key_set_equality_sees_rotation() {
        let a = parse_jwks(&fixture("jwks_a.json"), None).unwrap().set;
        let a2 = parse_jwks(&fixture("jwks_a.json"), None).unwrap().set;
        let b = parse_jwks(&fixture("jwks_b.json"), None).unwrap().set;
        assert!(a.same_as(&a2));
        assert!(!a.same_as(&b));
    }

    #[test]
    fn der_modulus_length_is_read() {
        // SEQUENCE { INTEGER 0x00 0x80 .. (257 bytes), INTEGER 65537 }
        let mut modulus = vec![0x00, 0x80];
        modulus.extend(std::iter::repeat_n(0x11, 255));
        let mut body = vec![0x02, 0x82, 0x01, 0x01];
        body.extend(&modulus);
        body.extend([0x02, 0x03, 0x01, 0x00, 0x01]);
        let mut der = vec![0x30, 0x82, (body.len() >> 8) as u8, body.len() as u8];
        der.extend(&body);
        assert_eq!(rsa_modulus_len(&der), Some(256));
        assert_eq!(rsa_modulus_len(&der[..10]), None);
    }
}
