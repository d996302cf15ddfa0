//! A decision while it is made: borrowed from the request and the catalog snapshot, so planning copies nothing.

use std::collections::BTreeMap;

use crate::check::Reason;
use crate::quota::{LimitState, Outcome};

/// Who the caller is, as far as the decision got (metadata for Envoy and the access log).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity<'a> {
    /// The catalog app the credential belongs to (none for a portal token).
    pub app: Option<&'a str>,
    /// Developer e-mail.
    pub developer: Option<&'a str>,
    /// The developer's company, which owns a portal account's quota and usage.
    pub company: Option<&'a str>,
    /// The Stripe customer billed for the call's usage.
    pub stripe_customer: Option<&'a str>,
    /// The product that covered the request.
    pub product: Option<&'a str>,
    /// The operation that covered the request.
    pub operation: Option<&'a str>,
    /// The covered operation's attributes (its product's overlaid with its own).
    pub attributes: Option<&'a BTreeMap<String, String>>,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'a> {
    /// Why; also says whether the request is allowed.
    pub reason: Reason,
    /// For denials, what to fix (never a secret).
    pub message: String,
    /// The caller, as far as known.
    pub identity: Identity<'a>,
    /// The API id the request was matched against.
    pub api: &'a str,
    /// The environment this sidecar serves.
    pub environment: Option<&'a str>,
    /// The quota state for `ratelimit-*` headers.
    pub ratelimit: Option<LimitState>,
    /// For a 429: seconds until the exhausted limit's window ends (`retry-after`).
    pub retry_after: Option<u64>,
    /// On an allowed prepaid call: the owner's balance left (`tollgate-credits-remaining`).
    pub credits_remaining: Option<u64>,
    /// On an allowed call under a token quota: the units it holds until its access-log entry settles them.
    pub quota_reserved: u64,
}

impl Decision<'_> {
    /// Whether the request goes through.
    pub fn allowed(&self) -> bool {
        self.reason.allows()
    }
}

/// What the quota step answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaAnswer {
    /// The quota store's answer.
    Store(Outcome),
    /// The store failed and `on_store_error` is `allow`: this replica's own count decided.
    Fallback(Outcome),
    /// The store failed and `on_store_error` is `deny`.
    Unavailable,
    /// The call has no quota to charge (a prepaid product without one).
    NoQuota,
}
