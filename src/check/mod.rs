//! The Check path, protocol-free: [`Authorizer::check`] takes a [`Request`] and returns one owned [`Verdict`].
//!
//! ```text
//! Request ─> identify (identity: API key | JWT verify; the only step that may wait)
//!         ─> a path under `self_service.path_prefix`? entitle, then crate::selfservice answers; stop here
//!         ─> entitle  (entitle.rs: the caller's app or portal account, its subscriptions)
//!         ─> match    (plan.rs -> matching: the product and operation that cover method + path)
//!         ─> quota    (authorizer.rs -> QuotaStore::charge, or the local fallback on a store failure)
//!         ─> decide   (plan.rs: Pending::finish) ─> Verdict (verdict.rs: what goes upstream, what is said)
//! ```
//!
//! [`plan`](plan::plan) and [`Pending::finish`](plan::Pending::finish) are pure functions of the request, the
//! catalog snapshot and the quota answer, so the whole decision table is unit-tested without a server
//! (`tests.rs`). While a decision is made it borrows from the request and the snapshot ([`Decision`]); only
//! the finished [`Verdict`] owns its strings, so the adapter maps it without holding the snapshot.

mod authorizer;
pub mod buckets;
pub mod decision;
pub(crate) mod entitle;
pub mod fallback;
mod message;
pub mod metrics;
pub mod plan;
mod reason;
mod request;
mod settings;
mod verdict;

#[cfg(test)]
mod tests;

pub use authorizer::Authorizer;
pub use buckets::{AppQuota, app_quotas};
pub use decision::{Decision, Identity, QuotaAnswer};
pub use metrics::CheckMetrics;
pub use plan::{Pending, Plan, plan};
pub use reason::Reason;
pub use request::{Pairs, Request};
pub use settings::{MetadataMode, OnStoreError, RateLimitHeaders, Settings};
pub use verdict::{Answer, Identified, OWN_HEADER_PREFIX, Upstream, Verdict};
