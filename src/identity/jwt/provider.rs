//! One trusted issuer: its algorithm allow-list, its keys and how its tokens are checked.

use std::path::Path;
use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::claims::{Trust, as_seconds};
use super::config::{ClaimNames, JwtConfig, ProviderConfig};
use super::error::JwtConfigError;
use super::error::JwtRejection;
use super::jwks::{JwksSettings, Refresh, RemoteJwks, parse_jwks_url};
use super::keys::{
    KeyKind, KeyMiss, KeySet, VerifyKey, algorithms_for, key_from_pem, min_hmac_secret_bytes,
    parse_algorithm, parse_jwks,
};
use super::metrics::{JwtMetrics, ProviderCounters};
use super::token::Peeked;
use crate::util::clock::unix_now;

/// Every asymmetric algorithm: what a JWKS provider without an allow-list may see (each key still limits it).
const ASYMMETRIC: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

enum Keys {
    Static(Arc<KeySet>),
    Remote(Arc<RemoteJwks>),
}

/// A configured provider, ready to verify.
pub(crate) struct Provider {
    pub(crate) name: Arc<str>,
    pub(crate) issuer: String,
    claims: ClaimNames,
    trust: Trust,
    /// The required `typ`, normalised (see [`normalised_typ`]).
    typ: Option<String>,
    /// `max_token_lifetime` in seconds.
    max_lifetime: Option<i64>,
    leeway: i64,
    validations: Vec<(Algorithm, Validation)>,
    keys: Keys,
    pub(crate) counters: ProviderCounters,
}

impl Provider {
    /// Builds a provider from its config: exactly one key source, an allow-list that fits the key.
    pub(crate) fn build(
        cfg: &ProviderConfig,
        config: &JwtConfig,
        base_dir: &Path,
        jwks: Option<&JwksSettings>,
        metrics: &JwtMetrics,
    ) -> Result<Self, JwtConfigError> {
        let name = cfg.name.as_str();
        let err = |message: String| JwtConfigError::provider(name, message);
        if cfg.issuer.is_empty() {
            return Err(err("issuer is empty".into()));
        }
        if cfg.audiences.is_empty() || cfg.audiences.iter().any(String::is_empty) {
            return Err(err(
                "audiences must list at least one non-empty audience".into()
            ));
        }
        let allow_list = match &cfg.algorithms {
            None => None,
            Some(names) if names.is_empty() => {
                return Err(err("algorithms is empty; remove it or list some".into()));
            }
            Some(names) => Some(
                names
                    .iter()
                    .map(|n| parse_algorithm(n))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(err)?,
            ),
        };
        let sources = [
            cfg.hs256_secret.is_some(),
            cfg.public_key_path.is_some(),
            cfg.jwks_path.is_some(),
            cfg.jwks_url.is_some(),
        ];
        if sources.iter().filter(|set| **set).count() != 1 {
            return Err(err(
                "set exactly one of hs256_secret, public_key_path, jwks_path, jwks_url".into(),
            ));
        }

        let (keys, allowed) = if let Some(secret) = &cfg.hs256_secret {
            let allowed = static_allow_list(KeyKind::Hmac, allow_list.as_deref()).map_err(err)?;
            check_hmac_secret(name, secret, &allowed)?;
            let key = VerifyKey {
                kid: None,
                key: DecodingKey::from_secret(secret.as_bytes()),
                algorithms: allowed.clone(),
            };
            (Keys::Static(Arc::new(KeySet::new(vec![key]))), allowed)
        } else if let Some(path) = &cfg.public_key_path {
            let pem = read_key_file(name, base_dir, path)?;
            let (kind, key) = key_from_pem(&pem).map_err(err)?;
            let allowed = static_allow_list(kind, allow_list.as_deref()).map_err(err)?;
            let key = VerifyKey {
                kid: None,
                key,
                algorithms: allowed.clone(),
            };
            (Keys::Static(Arc::new(KeySet::new(vec![key]))), allowed)
        } else if let Some(path) = &cfg.jwks_path {
            let allowed = jwks_allow_list(allow_list.as_deref()).map_err(err)?;
            let bytes = read_key_file(name, base_dir, path)?;
            let parsed = parse_jwks(&bytes, allow_list.as_deref()).map_err(err)?;
            if parsed.set.is_empty() {
                return Err(err(format!(
                    "jwks_path holds no usable signature key ({} skipped)",
                    parsed.skipped
                )));
            }
            (Keys::Static(Arc::new(parsed.set)), allowed)
        } else if let Some(raw_url) = &cfg.jwks_url {
            let allowed = jwks_allow_list(allow_list.as_deref()).map_err(err)?;
            let url = parse_jwks_url(raw_url).map_err(err)?;
            let settings = jwks
                .ok_or_else(|| err("no HTTP client for jwks_url".into()))?
                .clone();
            let remote = RemoteJwks::new(
                Arc::from(name),
                url,
                allow_list.clone(),
                settings,
                metrics.clone(),
            );
            (Keys::Remote(Arc::new(remote)), allowed)
        } else {
            return Err(err(
                "set exactly one of hs256_secret, public_key_path, jwks_path, jwks_url".into(),
            ));
        };

        let leeway = config.leeway.as_secs();
        let validations = allowed
            .iter()
            .map(|alg| (*alg, validation(*alg, cfg, leeway)))
            .collect();
        if cfg.typ.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(err("typ is empty; remove it or name the type".into()));
        }
        if cfg.max_token_lifetime.is_some_and(|d| d.is_zero()) {
            return Err(err("max_token_lifetime must be longer than 0s".into()));
        }
        Ok(Self {
            name: Arc::from(name),
            issuer: cfg.issuer.clone(),
            claims: cfg.claims.clone(),
            trust: Trust {
                portal: cfg.portal_tokens,
                stripe_customer: cfg.stripe_customer_from_token,
            },
            typ: cfg.typ.as_deref().map(normalised_typ),
            max_lifetime: cfg
                .max_token_lifetime
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            leeway: i64::try_from(leeway).unwrap_or(i64::MAX),
            validations,
            keys,
            counters: metrics.for_provider(name),
        })
    }

    /// The remote JWKS, when the keys come from `jwks_url`.
    pub(crate) fn remote(&self) -> Option<&Arc<RemoteJwks>> {
        match &self.keys {
            Keys::Remote(remote) => Some(remote),
            Keys::Static(_) => None,
        }
    }

    /// The key-set generation: cached verifications from an older generation are re-checked.
    pub(crate) fn generation(&self) -> u64 {
        self.remote().map_or(0, |remote| remote.generation())
    }

    /// The claim names this provider's tokens use.
    pub(crate) fn claim_names(&self) -> &ClaimNames {
        &self.claims
    }

    /// What this provider's tokens may decide beyond who the caller is.
    pub(crate) fn trust(&self) -> Trust {
        self.trust
    }

    /// The checks the JWT library does not make: `typ`, `iat` not in the future, the lifetime bound.
    fn check_claims(
        &self,
        peeked: &Peeked,
        claims: &Map<String, Value>,
    ) -> Result<(), JwtRejection> {
        if let Some(want) = &self.typ
            && peeked.typ.as_deref().map(normalised_typ).as_ref() != Some(want)
        {
            return Err(JwtRejection::WrongType);
        }
        let now = unix_now();
        let seconds = |name: &'static str| match claims.get(name) {
            None => Ok(None),
            Some(v) => as_seconds(v)
                .map(Some)
                .ok_or(JwtRejection::InvalidClaim(name)),
        };
        let iat = seconds("iat")?;
        if iat.is_some_and(|iat| iat > now.saturating_add(self.leeway)) {
            return Err(JwtRejection::IssuedInFuture);
        }
        if let Some(max) = self.max_lifetime {
            let exp = seconds("exp")?.ok_or(JwtRejection::MissingClaim("exp"))?;
            let lifetime = exp.saturating_sub(iat.unwrap_or(now));
            if lifetime > max.saturating_add(self.leeway) {
                return Err(JwtRejection::LifetimeTooLong);
            }
        }
        Ok(())
    }

    /// Verifies signature and registered claims; returns the claims and the key generation used.
    pub(crate) async fn verify(
        &self,
        token: &str,
        peeked: &Peeked,
    ) -> Result<(Map<String, Value>, u64), JwtRejection> {
        let Some(validation) = self
            .validations
            .iter()
            .find(|(alg, _)| *alg == peeked.alg)
            .map(|(_, v)| v)
        else {
            return Err(JwtRejection::AlgorithmNotAllowed);
        };
        let kid = peeked.kid.as_deref();
        let (keys, generation) = match &self.keys {
            Keys::Static(set) => (Arc::clone(set), 0),
            Keys::Remote(remote) => (remote.keys(), remote.generation()),
        };
        match keys.find(kid, peeked.alg) {
            Ok(key) => {
                let claims = decode(token, &key.key, validation)?;
                self.check_claims(peeked, &claims)?;
                Ok((claims, generation))
            }
            Err(KeyMiss::WrongAlgorithm) => Err(JwtRejection::AlgorithmNotAllowed),
            Err(KeyMiss::Unknown) => {
                let Keys::Remote(remote) = &self.keys else {
                    return Err(JwtRejection::UnknownKey);
                };
                if remote.refresh_for_unknown_key(generation).await == Refresh::Running {
                    return Err(JwtRejection::KeysUnavailable);
                }
                let (keys, generation) = (remote.keys(), remote.generation());
                match keys.find(kid, peeked.alg) {
                    Ok(key) => {
                        let claims = decode(token, &key.key, validation)?;
                        self.check_claims(peeked, &claims)?;
                        Ok((claims, generation))
                    }
                    Err(KeyMiss::WrongAlgorithm) => Err(JwtRejection::AlgorithmNotAllowed),
                    Err(KeyMiss::Unknown) if !remote.is_loaded() => {
                        Err(JwtRejection::KeysUnavailable)
                    }
                    Err(KeyMiss::Unknown) => Err(JwtRejection::UnknownKey),
                }
            }
        }
    }
}

fn decode(
    token: &str,
    key: &DecodingKey,
    validation: &Validation,
) -> Result<Map<String, Value>, JwtRejection> {
    jsonwebtoken::decode::<Map<String, Value>>(token, key, validation).map(|data| data.claims).map_err(|e| {
        match e.kind() {
            ErrorKind::InvalidSignature => JwtRejection::InvalidSignature,
            ErrorKind::ExpiredSignature => JwtRejection::Expired,
            ErrorKind::ImmatureSignature => JwtRejection::NotYetValid,
            ErrorKind::InvalidIssuer => JwtRejection::UntrustedIssuer,
            ErrorKind::InvalidAudience => JwtRejection::WrongAudience,
            ErrorKind::InvalidAlgorithm => JwtRejection::AlgorithmNotAllowed,
            ErrorKind::MissingRequiredClaim(claim) => JwtRejection::MissingClaim(registered(claim)),
            ErrorKind::InvalidClaimFormat(claim) => JwtRejection::InvalidClaim(registered(claim)),
            ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidEddsaKey
            | ErrorKind::InvalidKeyFormat => {
                tracing::warn!(error = %e, "a configured JWT key cannot verify; check the provider's key");
                JwtRejection::InvalidSignature
            }
            _ => JwtRejection::Malformed,
        }
    })
}

/// `typ` compared as RFC 7515 says media types are: case-insensitively, `application/` optional.
fn normalised_typ(typ: &str) -> String {
    let typ = typ.trim().to_ascii_lowercase();
    match typ.strip_prefix("application/") {
        Some(rest) => rest.to_owned(),
        None => typ,
    }
}

/// Maps a claim name from the library to a static name, so a rejection never carries token text.
fn registered(claim: &str) -> &'static str {
    match claim {
        "exp" => "exp",
        "nbf" => "nbf",
        "iss" => "iss",
        "aud" => "aud",
        "sub" => "sub",
        _ => "registered",
    }
}

fn validation(alg: Algorithm, cfg: &ProviderConfig, leeway: u64) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = leeway;
    v.validate_exp = true;
    v.validate_nbf = true;
    v.validate_aud = true;
    v.set_issuer(&[cfg.issuer.as_str()]);
    v.set_audience(&cfg.audiences);
    v.set_required_spec_claims(&["exp", "iss", "aud"]);
    v
}

/// The allow-list of a single-key provider: every listed algorithm must fit the key (RFC 8725 §3.1).
fn static_allow_list(
    kind: KeyKind,
    allow_list: Option<&[Algorithm]>,
) -> Result<Vec<Algorithm>, String> {
    if let Some(list) = allow_list
        && let Some(bad) = list.iter().find(|alg| !kind.fits(**alg))
    {
        return Err(format!(
            "algorithm {bad:?} does not fit {} (refused to prevent algorithm confusion)",
            kind.label()
        ));
    }
    Ok(algorithms_for(kind, allow_list))
}

/// The allow-list of a JWKS provider: asymmetric algorithms only.
fn jwks_allow_list(allow_list: Option<&[Algorithm]>) -> Result<Vec<Algorithm>, String> {
    match allow_list {
        None => Ok(ASYMMETRIC.to_vec()),
        Some(list) => match list.iter().find(|alg| !ASYMMETRIC.contains(alg)) {
            Some(bad) => Err(format!(
                "algorithm {bad:?} needs a shared secret and cannot come from a JWKS"
            )),
            None => Ok(list.to_vec()),
        },
    }
}

/// RFC 7518 §3.2: refuse empty or short HMAC secrets (an unset `${JWT_SECRET}` expands to nothing).
pub(crate) fn check_hmac_secret(
    provider: &str,
    secret: &str,
    algorithms: &[Algorithm],
) -> Result<(), JwtConfigError> {
    if secret.is_empty() {
        return Err(JwtConfigError::provider(
            provider,
            "hs256_secret is empty (is its environment variable set?)",
        ));
    }
    let min = min_hmac_secret_bytes(algorithms);
    if secret.len() < min {
        return Err(JwtConfigError::provider(
            provider,
            format!(
                "hs256_secret is {} bytes; at least {min} are required (RFC 7518 section 3.2)",
                secret.len()
            ),
        ));
    }
    Ok(())
}

fn read_key_file(provider: &str, base_dir: &Path, path: &Path) -> Result<Vec<u8>, JwtConfigError> {
    let full = base_dir.join(path);
    std::fs::read(&full).map_err(|source| JwtConfigError::ReadKey {
        provider: provider.to_owned(),
        path: full,
        source,
    })
}
