//! The Check path with its one piece of I/O: take a catalog snapshot, plan, ask the quota store, finish.
//!
//! Protocol-free: the Envoy adapter (`envoy::authz`) turns protobuf into a [`Request`] and the resulting
//! [`Decision`] back into protobuf.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::catalog::{Catalog, CatalogHandle};
use crate::decision::{self, Decision, OnStoreError, Plan, QuotaAnswer, Request, Settings};
use crate::identity::jwt::JwtVerifier;
use crate::identity::{self, Caller, Presented};
use crate::quota::memory::MemoryStore;
use crate::quota::{QuotaStore, StoreError};
use crate::telemetry::Metrics;
use crate::util::clock::unix_now;

/// Everything a Check needs, shared by all requests.
pub struct Authorizer {
    catalog: Arc<CatalogHandle>,
    quota: Arc<dyn QuotaStore>,
    /// Counts requests let through while the quota store fails under `on_store_error: allow`, so each
    /// replica still applies the limits on its own until the store is back.
    fallback: MemoryStore,
    /// Second of the last store-failure log line.
    last_store_warning: AtomicI64,
    jwt: Option<JwtVerifier>,
    settings: Settings,
    metrics: Metrics,
}

impl Authorizer {
    /// Wires the catalog, the quota store, the token verifier (when JWT providers are configured) and the
    /// settings together.
    pub fn new(
        catalog: Arc<CatalogHandle>,
        quota: Arc<dyn QuotaStore>,
        jwt: Option<JwtVerifier>,
        mut settings: Settings,
        metrics: Metrics,
    ) -> Self {
        settings.bearer = jwt.is_some();
        Authorizer {
            catalog,
            quota,
            fallback: MemoryStore::new(),
            last_store_warning: AtomicI64::new(i64::MIN),
            jwt,
            settings,
            metrics,
        }
    }

    /// The catalog snapshot a request is decided against; hold it while the decision is in use.
    pub fn snapshot(&self) -> Arc<Catalog> {
        self.catalog.snapshot()
    }

    /// The settings decisions are made with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Finds the request's credential and verifies it when it is a token (the only step of identification
    /// that may wait: a JWKS refresh for an unknown `kid`).
    pub async fn identify<'r>(&self, request: &Request<'r>) -> Caller<'r> {
        match identity::presented(request, &self.settings.api_key, self.jwt.is_some()) {
            Presented::Nothing => Caller::Nothing,
            Presented::ApiKey { key } => Caller::ApiKey { key },
            Presented::Bearer(token) => match &self.jwt {
                Some(jwt) => Caller::Token(jwt.verify(token).await),
                None => Caller::Nothing,
            },
        }
    }

    /// Decides one request from its identified `caller` against `catalog` (a snapshot from
    /// [`Authorizer::snapshot`]).
    pub async fn decide<'a>(
        &'a self,
        request: &Request<'a>,
        caller: &'a Caller<'a>,
        catalog: &'a Catalog,
    ) -> Decision<'a> {
        let now = unix_now();
        let decision = match decision::plan(request, caller, catalog, &self.settings, now) {
            Plan::Decided(decision) => decision,
            Plan::Charge(pending) => {
                let charge = pending.charge(now);
                let answer = match self.quota.charge(&charge).await {
                    Ok(outcome) => QuotaAnswer::Store(outcome),
                    Err(e) => {
                        self.metrics.quota_store_errors.inc();
                        let policy = pending.on_store_error(&self.settings);
                        self.warn_store_failure(&e, policy, now);
                        match policy {
                            OnStoreError::Deny => QuotaAnswer::Unavailable,
                            OnStoreError::Allow => {
                                self.metrics.quota_fallbacks.inc();
                                match self.fallback.charge(&charge).await {
                                    Ok(outcome) => QuotaAnswer::Fallback(outcome),
                                    Err(_) => QuotaAnswer::Unavailable,
                                }
                            }
                        }
                    }
                };
                pending.finish(answer)
            }
        };
        self.metrics.record_decision(decision.reason);
        decision
    }

    /// Logs a quota store failure at most once a second, with how many failed since the last line: a dead
    /// store fails every Check, and a log line per Check would flood stderr on the hot path.
    fn warn_store_failure(&self, error: &StoreError, policy: OnStoreError, now: i64) {
        let last = self.last_store_warning.load(Ordering::Relaxed);
        if now > last
            && self
                .last_store_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let failed = self.metrics.quota_store_errors.get();
            tracing::warn!(%error, ?policy, failed_so_far = failed, "quota store failed");
        }
    }

    /// Frees quota windows that ended before `now`, in the store and in the local fallback; `i64::MAX` at
    /// shutdown also hands leased units back to a shared store.
    pub async fn sweep(&self, now: i64) {
        self.quota.sweep(now).await;
        self.fallback.sweep(now).await;
    }

    /// The metrics this authorizer records into.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}
