//! Why a request was allowed or denied: one table for metadata, metrics, HTTP status and error code.

/// Why a request was allowed or denied: the `reason` in metadata and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Allowed and counted.
    Allowed,
    /// Allowed because the quota store failed and `on_store_error` is `allow`.
    AllowedStoreError,
    /// The request carried no API key or bearer token.
    MissingCredential,
    /// A key the catalog does not know.
    UnknownKey,
    /// A revoked key.
    RevokedKey,
    /// An expired key.
    ExpiredKey,
    /// A bearer token that failed verification.
    InvalidToken,
    /// A valid token naming an app the catalog does not know.
    UnknownApp,
    /// A token's issuer keys could not be loaded yet.
    KeysUnavailable,
    /// The app is revoked.
    AppRevoked,
    /// The product that would cover the request is pending approval for the app.
    ProductPending,
    /// The app's subscription to the product that would cover the request is revoked.
    ProductRevoked,
    /// The product that would cover the request is not offered in this environment.
    ProductNotOffered,
    /// The token lacks every scope of the product that would cover the request.
    MissingScope,
    /// No product of the app covers the request.
    NoProduct,
    /// The route names no API: `api_context_extension` is configured and the route does not set it.
    NoApi,
    /// The path is dangerous.
    BadPath,
    /// The product is sold through Stripe and its subscription is past due beyond the grace period, unpaid or
    /// incomplete.
    PaymentRequired,
    /// The product is sold through Stripe and the caller's customer has no subscription in force for it.
    NoSubscription,
    /// The quota is spent.
    QuotaExceeded,
    /// The quota store failed and `on_store_error` is `deny`.
    StoreUnavailable,
    /// The product is prepaid and the owner's balance cannot cover the call.
    CreditsExhausted,
    /// The product is prepaid, this replica's lease is spent and the credit ledger does not answer.
    CreditsUnavailable,
    /// A request under `self_service.path_prefix` from an identified caller: tollgate answered it itself
    /// (`crate::selfservice`). Neither allowed nor denied: it never reaches the upstream, spends no quota and
    /// is never billed.
    SelfService,
}

impl Reason {
    /// Every reason, for pre-registering metrics.
    pub const ALL: [Reason; 24] = [
        Reason::Allowed,
        Reason::AllowedStoreError,
        Reason::MissingCredential,
        Reason::UnknownKey,
        Reason::RevokedKey,
        Reason::ExpiredKey,
        Reason::InvalidToken,
        Reason::UnknownApp,
        Reason::KeysUnavailable,
        Reason::AppRevoked,
        Reason::ProductPending,
        Reason::ProductRevoked,
        Reason::ProductNotOffered,
        Reason::MissingScope,
        Reason::NoProduct,
        Reason::NoApi,
        Reason::BadPath,
        Reason::PaymentRequired,
        Reason::NoSubscription,
        Reason::QuotaExceeded,
        Reason::StoreUnavailable,
        Reason::CreditsExhausted,
        Reason::CreditsUnavailable,
        Reason::SelfService,
    ];

    /// The snake_case name used in metadata and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::AllowedStoreError => "allowed_store_error",
            Reason::MissingCredential => "missing_credential",
            Reason::UnknownKey => "unknown_key",
            Reason::RevokedKey => "revoked_key",
            Reason::ExpiredKey => "expired_key",
            Reason::InvalidToken => "invalid_token",
            Reason::UnknownApp => "unknown_app",
            Reason::KeysUnavailable => "keys_unavailable",
            Reason::AppRevoked => "app_revoked",
            Reason::ProductPending => "product_pending",
            Reason::ProductRevoked => "product_revoked",
            Reason::ProductNotOffered => "product_not_offered",
            Reason::MissingScope => "missing_scope",
            Reason::NoProduct => "no_product",
            Reason::NoApi => "no_api",
            Reason::BadPath => "bad_path",
            Reason::PaymentRequired => "payment_required",
            Reason::NoSubscription => "no_subscription",
            Reason::QuotaExceeded => "quota_exceeded",
            Reason::StoreUnavailable => "store_unavailable",
            Reason::CreditsExhausted => "credits_exhausted",
            Reason::CreditsUnavailable => "credits_unavailable",
            Reason::SelfService => "self_service",
        }
    }

    /// Whether the request goes through.
    pub fn allows(self) -> bool {
        matches!(self, Reason::Allowed | Reason::AllowedStoreError)
    }

    /// The `decision` in metadata and metric labels: `allow`, `deny`, or `self_service` for a request tollgate
    /// answered itself, which metering counts neither as allowed nor as denied (and never bills).
    pub fn decision(self) -> &'static str {
        match self {
            Reason::SelfService => "self_service",
            r if r.allows() => "allow",
            _ => "deny",
        }
    }

    /// The HTTP status of a denial (200 for an allow; a self-service answer carries its own status).
    pub fn http_status(self) -> u16 {
        match self {
            Reason::Allowed | Reason::AllowedStoreError | Reason::SelfService => 200,
            Reason::BadPath => 400,
            Reason::MissingCredential
            | Reason::UnknownKey
            | Reason::RevokedKey
            | Reason::ExpiredKey
            | Reason::InvalidToken
            | Reason::UnknownApp => 401,
            Reason::AppRevoked
            | Reason::ProductPending
            | Reason::ProductRevoked
            | Reason::ProductNotOffered
            | Reason::MissingScope
            | Reason::NoProduct
            | Reason::NoSubscription
            | Reason::NoApi => 403,
            Reason::PaymentRequired | Reason::CreditsExhausted => 402,
            Reason::QuotaExceeded => 429,
            Reason::StoreUnavailable | Reason::KeysUnavailable | Reason::CreditsUnavailable => 503,
        }
    }

    /// The `error` field of a denial's JSON body (CONTRACT §4).
    pub fn error_code(self) -> &'static str {
        if self == Reason::CreditsExhausted {
            return "credits_exhausted";
        }
        match self.http_status() {
            400 => "bad_request",
            402 => "payment_required",
            401 => "unauthenticated",
            403 => "forbidden",
            429 => "quota_exceeded",
            503 => "unavailable",
            _ => "ok",
        }
    }
}
