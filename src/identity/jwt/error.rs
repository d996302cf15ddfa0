//! Why a token was refused, and why a JWT configuration cannot be used.

use std::path::PathBuf;

/// Why a token was refused: Display is a short sentence for the 401 body that never includes the token or a claim value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtRejection {
    /// Longer than `max_token_bytes`.
    #[error("token is too large")]
    Oversized,
    /// Not three base64url parts with JSON header and payload.
    #[error("token is not a well-formed JWT")]
    Malformed,
    /// `alg: none`: unsigned tokens are never accepted.
    #[error("unsigned tokens (alg none) are not accepted")]
    AlgNone,
    /// An `alg` this verifier does not implement.
    #[error("token algorithm is not supported")]
    UnsupportedAlgorithm,
    /// An `alg` outside the provider's allow-list or unfit for its key (algorithm confusion).
    #[error("token algorithm is not allowed for this issuer")]
    AlgorithmNotAllowed,
    /// The header lists `crit` extensions, which this verifier does not implement (RFC 7515 §4.1.11).
    #[error("token has critical header parameters that are not supported")]
    UnsupportedCritical,
    /// No `iss` claim, so no provider can be chosen.
    #[error("token has no issuer")]
    MissingIssuer,
    /// `iss` names no configured provider.
    #[error("token issuer is not trusted")]
    UntrustedIssuer,
    /// The token's `kid` (or, without `kid`, its algorithm) matches no key of its provider.
    #[error("token signing key is not known")]
    UnknownKey,
    /// The provider's JWKS has never been loaded.
    #[error("signing keys for this issuer are not available yet")]
    KeysUnavailable,
    /// The signature does not verify with the provider's key.
    #[error("token signature is invalid")]
    InvalidSignature,
    /// `exp` is in the past (beyond the leeway).
    #[error("token has expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token is not valid yet")]
    NotYetValid,
    /// A required registered claim is absent.
    #[error("token has no {0} claim")]
    MissingClaim(&'static str),
    /// A registered claim has the wrong type.
    #[error("token claim {0} is malformed")]
    InvalidClaim(&'static str),
    /// No `aud` value equals one of the provider's audiences.
    #[error("token audience is not accepted")]
    WrongAudience,
    /// The `typ` header is not the one the provider requires.
    #[error("token type is not accepted")]
    WrongType,
    /// `iat` lies in the future (beyond the leeway): no issuer mints tokens ahead of time.
    #[error("token is issued in the future")]
    IssuedInFuture,
    /// The token lives longer than the provider's `max_token_lifetime`.
    #[error("token lifetime is longer than this issuer allows")]
    LifetimeTooLong,
}

impl JwtRejection {
    /// A stable snake_case code for metrics labels and the `reason` metadata.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Oversized => "oversized",
            Self::Malformed => "malformed",
            Self::AlgNone => "alg_none",
            Self::UnsupportedAlgorithm => "unsupported_algorithm",
            Self::AlgorithmNotAllowed => "algorithm_not_allowed",
            Self::UnsupportedCritical => "unsupported_critical",
            Self::MissingIssuer => "missing_issuer",
            Self::UntrustedIssuer => "untrusted_issuer",
            Self::UnknownKey => "unknown_key",
            Self::KeysUnavailable => "keys_unavailable",
            Self::InvalidSignature => "invalid_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::MissingClaim(_) => "missing_claim",
            Self::InvalidClaim(_) => "invalid_claim",
            Self::WrongAudience => "wrong_audience",
            Self::WrongType => "wrong_type",
            Self::IssuedInFuture => "issued_in_future",
            Self::LifetimeTooLong => "lifetime_too_long",
        }
    }
}

/// Why `identity.jwt` cannot be used; messages name the provider and never include a secret.
#[derive(Debug, thiserror::Error)]
pub enum JwtConfigError {
    /// A provider's settings are inconsistent or unusable.
    #[error("identity.jwt provider {provider}: {message}")]
    Provider {
        /// The provider's `name`.
        provider: String,
        /// What to fix.
        message: String,
    },
    /// A key file could not be read.
    #[error("identity.jwt provider {provider}: cannot read {}: {source}", path.display())]
    ReadKey {
        /// The provider's `name`.
        provider: String,
        /// The resolved path.
        path: PathBuf,
        /// The I/O failure.
        source: std::io::Error,
    },
    /// A setting outside any one provider is unusable.
    #[error("identity.jwt: {0}")]
    Invalid(String),
    /// The HTTP client for JWKS fetches could not be built.
    #[error("identity.jwt: cannot build the JWKS HTTP client: {0}")]
    HttpClient(reqwest::Error),
}

impl JwtConfigError {
    pub(crate) fn provider(provider: &str, message: impl Into<String>) -> Self {
        Self::Provider {
            provider: provider.to_owned(),
            message: message.into(),
        }
    }
}

/// Why `mint_hs256` could not make a token.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// The provider has no `hs256_secret`.
    #[error("provider {0} has no hs256_secret to sign with")]
    NoSecret(String),
    /// The secret or provider settings are unusable.
    #[error(transparent)]
    Config(#[from] JwtConfigError),
    /// An extra claim tried to set a claim that minting controls.
    #[error("claim {0} is set by the minting command and cannot be overridden")]
    ReservedClaim(String),
    /// The time to live must be positive.
    #[error("token time to live must be more than zero")]
    ZeroTtl,
    /// Signing failed.
    #[error("cannot sign the token: {0}")]
    Sign(jsonwebtoken::errors::Error),
}
