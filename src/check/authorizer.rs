//! The Check path with its I/O: verify a token, take a catalog snapshot, plan, ask the quota store, finish.

use std::sync::Arc;
use std::time::Instant;

use crate::catalog::{Catalog, CatalogHandle};
use crate::check::decision::Identity;
use crate::check::entitle::entitle;
use crate::check::fallback::Fallback;
use crate::check::metrics::CheckMetrics;
use crate::check::plan::{self, Pending, Plan};
use crate::check::verdict::www_authenticate;
use crate::check::{Decision, OnStoreError, QuotaAnswer, Reason, Request, Settings, Verdict};
use crate::credits::{Credits, Spend, SpendError};
use crate::history::HistoryStore;
use crate::identity::jwt::JwtVerifier;
use crate::identity::{self, Caller, Presented};
use crate::quota::{Hold, Limit, QuotaStore, StoreError};
use crate::selfservice;
use crate::util::clock::unix_now;
use crate::util::throttle::OncePerSecond;

/// Everything a Check needs, shared by all requests.
pub struct Authorizer {
    catalog: Arc<CatalogHandle>,
    quota: Arc<dyn QuotaStore>,
    /// Prepaid balances; `None` refuses prepaid products (503) rather than serving them free.
    credits: Option<Arc<Credits>>,
    /// Hourly usage rollups, read for a self-service caller's month to date.
    history: Option<Arc<dyn HistoryStore>>,
    /// Credit ledger failures are logged once a second.
    last_ledger_warning: OncePerSecond,
    /// Counts requests let through while the quota store fails under `on_store_error: allow`, so each
    /// replica still applies the limits on its own, from the store's last word, until the store is back.
    fallback: Fallback,
    /// Store failures are logged once a second.
    last_store_warning: OncePerSecond,
    jwt: Option<JwtVerifier>,
    settings: Settings,
    /// The `www-authenticate` value of every 401, fixed by the settings.
    challenge: String,
    metrics: CheckMetrics,
}

impl Authorizer {
    /// Wires the catalog, the quota store, the token verifier (when JWT providers are configured) and the
    /// settings together.
    pub fn new(
        catalog: Arc<CatalogHandle>,
        quota: Arc<dyn QuotaStore>,
        jwt: Option<JwtVerifier>,
        mut settings: Settings,
        metrics: CheckMetrics,
    ) -> Self {
        settings.bearer = jwt.is_some();
        Authorizer {
            challenge: www_authenticate(&settings),
            catalog,
            quota,
            credits: None,
            history: None,
            last_ledger_warning: OncePerSecond::default(),
            fallback: Fallback::new(),
            last_store_warning: OncePerSecond::default(),
            jwt,
            settings,
            metrics,
        }
    }

    /// Spends prepaid products' credits through `credits` (without it they are refused with 503).
    pub fn with_credits(mut self, credits: Arc<Credits>) -> Self {
        self.credits = Some(credits);
        self
    }

    /// Reads self-service callers' month to date from `history` (without it their answer has none).
    pub fn with_history(mut self, history: Arc<dyn HistoryStore>) -> Self {
        self.history = Some(history);
        self
    }

    /// Decides one request: the only call the Envoy adapter makes.
    pub async fn check(&self, request: &Request<'_>) -> Verdict {
        let started = Instant::now();
        let caller = self.identify(request).await;
        let catalog = self.catalog.snapshot();
        let route = self
            .settings
            .self_service
            .as_ref()
            .and_then(|prefix| selfservice::route(request.path, prefix));
        if let Some(route) = route {
            // Not in the Check latency: its reads (bounded) are not the hot path's, and a partner polling its
            // usage must not move the figure operators watch for every call.
            return self.self_service(request, route, &caller, &catalog).await;
        }
        let decision = self.decide(request, &caller, &catalog).await;
        tracing::debug!(
            reason = decision.reason.as_str(),
            app = decision.identity.app,
            product = decision.identity.product,
            api = decision.api,
            method = request.method,
            "check"
        );
        let verdict = Verdict::new(decision, request, &self.settings, &self.challenge);
        self.metrics
            .check_duration
            .observe(started.elapsed().as_secs_f64());
        verdict
    }

    /// Answers a request under `self_service.path_prefix` (see [`crate::selfservice`]): the caller is
    /// identified and entitled exactly as for any call, and refused the same way; an entitled caller gets
    /// tollgate's own answer about itself. Nothing is charged.
    async fn self_service(
        &self,
        request: &Request<'_>,
        route: selfservice::Route,
        caller: &Caller<'_>,
        catalog: &Catalog,
    ) -> Verdict {
        let now = unix_now();
        let mut decision = Decision {
            reason: Reason::SelfService,
            message: String::new(),
            identity: Identity::default(),
            api: plan::api_of(request, &self.settings).unwrap_or(""),
            environment: self.settings.environment.as_deref(),
            ratelimit: None,
            retry_after: None,
            credits_remaining: None,
            quota_reserved: 0,
        };
        let answer = match entitle(caller, catalog, &self.settings, now, &mut decision.identity) {
            Err((reason, message)) => {
                decision.reason = reason;
                decision.message = message;
                None
            }
            Ok(entitled) => {
                let sources = selfservice::Sources {
                    quota: Arc::clone(&self.quota),
                    history: self.history.clone(),
                    credits: self.credits.clone(),
                };
                let answer = selfservice::respond(
                    &sources,
                    request.method,
                    route,
                    &entitled,
                    catalog,
                    &self.settings,
                    now,
                )
                .await;
                decision.identity = entitled.identity.clone();
                Some(answer)
            }
        };
        self.metrics.record_decision(decision.reason);
        tracing::debug!(
            reason = decision.reason.as_str(),
            app = decision.identity.app,
            status = answer.as_ref().map(|a| a.status),
            method = request.method,
            "self-service"
        );
        let mut verdict = Verdict::new(decision, request, &self.settings, &self.challenge);
        verdict.answer = answer;
        verdict
    }

    /// Finds the request's credential and verifies it when it is a token (the only step of identification
    /// that may wait: a JWKS refresh for an unknown `kid`).
    async fn identify<'r>(&self, request: &Request<'r>) -> Caller<'r> {
        let bearer = self.jwt.is_some();
        match identity::presented(
            request.headers,
            request.path,
            &self.settings.api_key,
            bearer,
        ) {
            Presented::Nothing => Caller::Nothing,
            Presented::ApiKey { key } => Caller::ApiKey { key },
            Presented::Bearer(token) => match &self.jwt {
                Some(jwt) => Caller::Token(jwt.verify(token).await),
                None => Caller::Nothing,
            },
        }
    }

    /// Decides one request from its identified `caller` against a `catalog` snapshot.
    async fn decide<'a>(
        &'a self,
        request: &Request<'a>,
        caller: &'a Caller<'a>,
        catalog: &'a Catalog,
    ) -> Decision<'a> {
        let now = unix_now();
        let decision = match plan::plan(request, caller, catalog, &self.settings, now) {
            Plan::Decided(decision) => decision,
            Plan::Charge(pending) => {
                let request_id = request.headers.get("x-request-id");
                self.charge(pending, request_id, now).await
            }
        };
        self.metrics.record_decision(decision.reason);
        decision
    }

    /// Holds the call's credits, charges its quota, and completes the decision: credits are committed only
    /// when the call is allowed, so a refusal by either spends neither.
    async fn charge<'a>(
        &'a self,
        pending: Pending<'a>,
        request_id: Option<&str>,
        now: i64,
    ) -> Decision<'a> {
        let hold = match pending.credits() {
            None => None,
            Some(c) => {
                let spent = match &self.credits {
                    Some(credits) => credits.take(c.owner, c.cost, c.refill, now).await,
                    None => Err(SpendError::NotConfigured),
                };
                match spent {
                    Ok(Spend::Held(hold)) => Some(hold),
                    Ok(Spend::Exhausted { balance }) => return pending.credits_exhausted(balance),
                    Err(e) => {
                        if self.last_ledger_warning.allow(now) {
                            tracing::warn!(error = %e, "prepaid call refused: credit ledger unavailable");
                        }
                        return pending.credits_unavailable();
                    }
                }
            }
        };
        let answer = if pending.has_quota() {
            self.charge_quota(&pending, now).await
        } else {
            QuotaAnswer::NoQuota
        };
        let token_bucket = pending.token_bucket();
        let mut decision = pending.finish(answer);
        if let Some((bucket, limits)) = token_bucket
            && decision.quota_reserved > 0
        {
            self.hold(request_id, &bucket, limits, decision.quota_reserved, now)
                .await;
        }
        if let (true, Some(hold), Some(credits)) = (decision.allowed(), hold, &self.credits) {
            decision.credits_remaining = Some(credits.commit(hold));
        }
        decision
    }

    /// Records a token quota's reserve as held until its access-log entry settles it. A failure leaves the
    /// reserve charged without a timeout (its entry still settles it), so it is logged, not refused.
    async fn hold(
        &self,
        request_id: Option<&str>,
        bucket: &str,
        limits: &[Limit],
        reserve: u64,
        now: i64,
    ) {
        let Some(id) = request_id.filter(|id| !id.is_empty()) else {
            return;
        };
        let hold = Hold {
            id,
            bucket,
            limits,
            reserve,
            at: now,
            until: now.saturating_add(self.settings.hold_timeout),
        };
        if let Err(e) = self.quota.hold(&hold).await {
            self.metrics.quota_store_errors.inc();
            if self.last_store_warning.allow(now) {
                tracing::warn!(error = %e, "token quota reserve not recorded: it is settled by the access log but never released by its timeout");
            }
        }
    }

    /// Asks the quota store, or the local fallback when it fails and the API's policy allows.
    async fn charge_quota(&self, pending: &Pending<'_>, now: i64) -> QuotaAnswer {
        let charge = pending.charge(now);
        let policy = pending.on_store_error(&self.settings);
        let charged = if pending.token_bucket().is_some() {
            self.quota.reserve(&charge).await
        } else {
            self.quota.charge(&charge).await
        };
        match charged {
            Ok(outcome) => {
                if policy == OnStoreError::Allow {
                    self.fallback.observe(&charge, &outcome);
                }
                QuotaAnswer::Store(outcome)
            }
            Err(e) => {
                self.metrics.quota_store_errors.inc();
                self.warn_store_failure(&e, policy, now);
                match policy {
                    OnStoreError::Deny => QuotaAnswer::Unavailable,
                    OnStoreError::Allow => {
                        self.metrics.quota_fallbacks.inc();
                        QuotaAnswer::Fallback(self.fallback.charge(&charge).await)
                    }
                }
            }
        }
    }

    /// Logs a quota store failure at most once a second, with how many failed since the last line: a dead
    /// store fails every Check, and a log line per Check would flood stderr on the hot path.
    fn warn_store_failure(&self, error: &StoreError, policy: OnStoreError, now: i64) {
        if self.last_store_warning.allow(now) {
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
}
