//! The decision as a pure function: [`plan`] decides or says what to charge, [`Pending::finish`] completes
//! it with the quota store's answer. Neither does I/O, so the whole decision table is unit-tested.

use crate::catalog::{Catalog, Product, SubscriptionStatus};
use crate::check::buckets::bucket_key;
use crate::check::decision::{Decision, Identity, QuotaAnswer};
use crate::check::entitle::entitle;
use crate::check::message::{no_product_message, quota_message};
use crate::check::{OnStoreError, Reason, Request, Settings};
use crate::credits::catalog::owner as credit_owner;
use crate::credits::ledger::Refill;
use crate::identity::Caller;
use crate::matching::{self, Match, Target, path};
use crate::paywall::access::{Access, access, denial_message};
use crate::quota::{Charge, Limit, Outcome};

/// A decision that waits for the quota store, the credit ledger, or both.
#[derive(Debug)]
pub struct Pending<'a> {
    decision: Decision<'a>,
    bucket: String,
    limits: &'a [Limit],
    cost: u64,
    /// The token quota's reserve (the call's cost then), or 0 for a call quota.
    reserve: u64,
    product: &'a Product,
    credits: Option<CreditCharge<'a>>,
    now: i64,
}

/// What a prepaid call spends: `cost` credits of `owner`'s balance, after `refill` when one is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditCharge<'a> {
    /// The balance's owner: the company, else the developer.
    pub owner: &'a str,
    /// Credits the call spends.
    pub cost: u64,
    /// The product's free-tier refill for the current period.
    pub refill: Option<Refill<'a>>,
}

/// The first half of a decision.
#[derive(Debug)]
pub enum Plan<'a> {
    /// Decided without the quota store.
    Decided(Decision<'a>),
    /// Allowed if the quota store agrees.
    Charge(Pending<'a>),
}

/// Identifies, entitles and matches a request; decides, or says what to charge.
pub fn plan<'a>(
    request: &Request<'a>,
    caller: &'a Caller<'a>,
    catalog: &'a Catalog,
    settings: &'a Settings,
    now: i64,
) -> Plan<'a> {
    let routed_api = api_of(request, settings);
    let mut decision = Decision {
        reason: Reason::Allowed,
        message: String::new(),
        identity: Identity::default(),
        api: routed_api.unwrap_or(""),
        environment: settings.environment.as_deref(),
        ratelimit: None,
        retry_after: None,
        credits_remaining: None,
        quota_reserved: 0,
    };
    let deny = |mut d: Decision<'a>, reason: Reason, message: String| {
        d.reason = reason;
        d.message = message;
        Plan::Decided(d)
    };

    let safe_path = match path::sanitize(request.path) {
        Ok(p) => p,
        Err(why) => {
            return deny(
                decision,
                Reason::BadPath,
                format!("request path refused: {why}"),
            );
        }
    };

    let entitled = match entitle(caller, catalog, settings, now, &mut decision.identity) {
        Ok(entitled) => entitled,
        Err((reason, message)) => return deny(decision, reason, message),
    };
    decision.identity = entitled.identity;

    let Some(api) = routed_api else {
        let extension = settings.api_context_extension.as_deref().unwrap_or("");
        let message = format!(
            "this route names no API (its ext_authz context extension {extension} is not set)"
        );
        return deny(decision, Reason::NoApi, message);
    };
    let target = Target {
        api,
        method: request.method,
        path: &safe_path,
    };
    let env = settings.environment.as_deref();
    let products = catalog.products();
    let owner = entitled.owner;
    let found = matching::select(
        products,
        &entitled.subscriptions,
        entitled.scopes,
        env,
        &target,
    );
    let (product, operation) = match found {
        Match::Covered { product, operation } => match products
            .get(product)
            .and_then(|p| Some((p, p.operations.get(operation)?)))
        {
            Some(found) => found,
            None => {
                return deny(
                    decision,
                    Reason::NoProduct,
                    no_product_message(owner, &target),
                );
            }
        },
        Match::NotApproved {
            product,
            status:
                status @ (SubscriptionStatus::PaymentRequired | SubscriptionStatus::Unsubscribed),
        } => {
            let paid = entitled
                .customer
                .map_or(&[][..], |c| catalog.paid_subscriptions(c));
            let grace = settings.stripe_grace;
            let decide = |id: usize| {
                products
                    .get(id)
                    .map(|p| (p.name.as_str(), access(paid, &p.stripe_prices, now, grace)))
            };
            // "No subscription" to the first product says less than an ended subscription to another product
            // that would cover the request: name the one the caller had.
            let (name, found) = decide(product)
                .filter(|(_, a)| !matches!(a, Access::NotSubscribed(None)))
                .or_else(|| {
                    entitled
                        .subscriptions
                        .iter()
                        .filter(|s| s.status == SubscriptionStatus::Unsubscribed)
                        .filter(|s| {
                            products.get(s.product).is_some_and(|p| {
                                p.operations.iter().any(|op| matching::covers(op, &target))
                            })
                        })
                        .filter_map(|s| decide(s.product))
                        .find(|(_, a)| matches!(a, Access::NotSubscribed(Some(_))))
                })
                .or_else(|| decide(product))
                .unwrap_or(("", Access::NotSubscribed(None)));
            let message = denial_message(name, found, grace);
            let reason = match status {
                SubscriptionStatus::PaymentRequired => Reason::PaymentRequired,
                _ => Reason::NoSubscription,
            };
            return deny(decision, reason, message);
        }
        Match::NotApproved { product, status } => {
            let name = products.get(product).map_or("", |p| p.name.as_str());
            let (reason, state) = match status {
                SubscriptionStatus::Revoked => (Reason::ProductRevoked, "revoked"),
                _ => (Reason::ProductPending, "pending approval"),
            };
            let message = format!(
                "{}'s subscription to product {name} is {state}",
                owner.label()
            );
            return deny(decision, reason, message);
        }
        Match::MissingScope { product } => {
            let (name, scopes) = products.get(product).map_or(("", String::new()), |p| {
                (p.name.as_str(), p.scopes.join(", "))
            });
            let message =
                format!("token has no scope that product {name} requires (one of: {scopes})");
            return deny(decision, Reason::MissingScope, message);
        }
        Match::NotOffered { product } => {
            let name = products.get(product).map_or("", |p| p.name.as_str());
            let message = match env {
                Some(env) => format!("product {name} is not offered in environment {env}"),
                None => format!(
                    "product {name} is limited to named environments and this gateway names none"
                ),
            };
            return deny(decision, Reason::ProductNotOffered, message);
        }
        Match::Uncovered => {
            return deny(
                decision,
                Reason::NoProduct,
                no_product_message(owner, &target),
            );
        }
    };
    decision.identity.product = Some(&product.name);
    decision.identity.operation = Some(&operation.name);
    decision.identity.attributes = Some(&operation.attributes);

    let (limits, bucket, tokens) = match &operation.quota {
        Some(limits) => (
            limits.as_slice(),
            bucket_key(owner, &product.name, Some(operation.counter())),
            operation.quota_tokens.as_ref(),
        ),
        None => (
            product.quota.as_slice(),
            bucket_key(owner, &product.name, None),
            product.quota_tokens.as_ref(),
        ),
    };
    let reserve = tokens.map_or(0, |t| t.reserve);
    let credits = match product.prepaid {
        Some(prepaid) => {
            let cost = operation.prepaid_cost.unwrap_or(prepaid.cost);
            let id = &decision.identity;
            match credit_owner(id.company, id.developer) {
                _ if cost == 0 => None,
                Some(owner) => Some(CreditCharge {
                    owner,
                    cost,
                    refill: prepaid.refill.map(|r| r.at(&product.name, now)),
                }),
                None => {
                    // Not reachable from the catalog (an app always has a developer): a setup error, not a
                    // balance to top up.
                    let message = format!(
                        "product {} is prepaid and {} has no developer or company to hold credits",
                        product.name,
                        owner.label()
                    );
                    return deny(decision, Reason::NoProduct, message);
                }
            }
        }
        None => None,
    };
    if limits.is_empty() && credits.is_none() {
        return Plan::Decided(decision);
    }
    Plan::Charge(Pending {
        decision,
        bucket,
        limits,
        cost: if reserve > 0 { reserve } else { operation.cost },
        reserve,
        product,
        credits,
        now,
    })
}

impl<'a> Pending<'a> {
    /// Whether the call has a quota to charge.
    pub fn has_quota(&self) -> bool {
        !self.limits.is_empty()
    }

    /// The credits the call spends, when its product is prepaid.
    pub fn credits(&self) -> Option<CreditCharge<'a>> {
        self.credits
    }

    /// Refuses the call: its owner's balance (`balance` as last seen) cannot cover it. The message names the
    /// app, not the owner (a company or a developer's e-mail), which a leaked key must not reveal.
    pub fn credits_exhausted(self, balance: u64) -> Decision<'a> {
        let mut decision = self.decision;
        let cost = self.credits.map_or(0, |c| c.cost);
        let prices: Vec<&str> = self
            .product
            .credit_prices
            .iter()
            .map(|(p, _)| p.as_str())
            .collect();
        let how = if prices.is_empty() {
            "ask the API provider to grant credits".to_owned()
        } else {
            format!(
                "buy a top-up (Stripe price {}) or ask the API provider to grant credits",
                prices.join(", ")
            )
        };
        let whose = match decision.identity.app {
            Some(app) => format!("app {app}'s owner"),
            None => "this account".to_owned(),
        };
        decision.reason = Reason::CreditsExhausted;
        decision.message = format!(
            "the prepaid credits of {whose} are exhausted (balance {balance}, this call costs {cost}): {how}"
        );
        decision
    }

    /// Refuses the call: the credit ledger cannot be asked and this replica holds too few credits.
    pub fn credits_unavailable(self) -> Decision<'a> {
        let mut decision = self.decision;
        decision.reason = Reason::CreditsUnavailable;
        decision.message = "credit service is unavailable, try again shortly".into();
        decision
    }

    /// The bucket and limits charged, when the call's quota counts tokens (what its hold names).
    pub fn token_bucket(&self) -> Option<(String, &'a [Limit])> {
        (self.reserve > 0).then(|| (self.bucket.clone(), self.limits))
    }

    /// What to ask the quota store.
    pub fn charge(&self, now: i64) -> Charge<'_> {
        Charge {
            bucket: &self.bucket,
            limits: self.limits,
            cost: self.cost,
            now,
        }
    }

    /// What a store failure means for this request: `quota.on_store_error`, or the override for its API.
    pub fn on_store_error(&self, settings: &Settings) -> OnStoreError {
        settings.on_store_error_for(self.decision.api)
    }

    /// Completes the decision with the quota answer.
    pub fn finish(self, answer: QuotaAnswer) -> Decision<'a> {
        let mut decision = self.decision;
        let (outcome, fallback) = match answer {
            QuotaAnswer::Store(outcome) => (outcome, false),
            QuotaAnswer::Fallback(outcome) => (outcome, true),
            QuotaAnswer::Unavailable => {
                decision.reason = Reason::StoreUnavailable;
                decision.message = "quota service is unavailable, try again shortly".into();
                return decision;
            }
            QuotaAnswer::NoQuota => return decision,
        };
        match outcome {
            Outcome::Allowed(state) => {
                decision.ratelimit = Some(state);
                // Only a reserve the shared store holds is settled: one the local fallback counted stays there.
                if !fallback {
                    decision.quota_reserved = self.reserve;
                }
                if fallback {
                    decision.reason = Reason::AllowedStoreError;
                }
            }
            Outcome::Exceeded(state) => {
                // Limits of a list differ in (unit, interval): the one whose window ends when the state says
                // is the exhausted one.
                let limit = self
                    .limits
                    .iter()
                    .find(|l| {
                        l.limit == state.limit
                            && l.window(self.now).seconds_left(self.now) == state.reset_secs
                    })
                    .or_else(|| self.limits.iter().find(|l| l.limit == state.limit))
                    .copied();
                decision.reason = Reason::QuotaExceeded;
                decision.message = quota_message(&self.product.name, limit, state);
                decision.ratelimit = Some(state);
                decision.retry_after = Some(state.reset_secs);
            }
        }
        decision
    }
}

/// The API id: the configured context extension, else the `:authority` host without its port.
///
/// With a context extension configured, a route without it names no API (`None`) unless `api_host_fallback`:
/// the client chooses its `:authority`, so a route Envoy's operator forgot to tag (a catch-all reached through
/// an encoded path, say) would otherwise be matched under whatever API the client names.
pub(crate) fn api_of<'a>(request: &Request<'a>, settings: &Settings) -> Option<&'a str> {
    let Some(name) = settings.api_context_extension.as_deref() else {
        return Some(host_of(request.authority));
    };
    match request.context_extensions.get(name) {
        Some(api) => Some(api),
        None if settings.api_host_fallback => Some(host_of(request.authority)),
        None => None,
    }
}

/// The host of an `:authority`, without its port (an IPv6 literal keeps its brackets).
pub(crate) fn host_of(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .find(']')
            .map_or(authority, |end| &authority[..=end]);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}
