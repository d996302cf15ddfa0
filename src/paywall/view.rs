//! `GET /v1/subscriptions?customer=`: what tollgate believes of a customer's Stripe subscriptions, and why
//! each product sold through Stripe is granted or refused.

use axum::Json;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::paywall::Paywall;
use crate::paywall::access::{Access, access, access_ends, day, denial_message};
use crate::paywall::model::PaidSubscription;
use crate::state::api::ApiError;
use crate::util::clock::unix_now;

/// The query.
#[derive(Debug, Deserialize)]
pub struct CustomerQuery {
    /// `cus_…`.
    pub customer: Option<String>,
}

/// One subscription as tollgate holds it.
#[derive(Debug, Serialize)]
pub struct SubscriptionView {
    /// `sub_…`.
    pub id: String,
    /// Stripe's status.
    pub status: &'static str,
    /// Price ids of its items.
    pub prices: Vec<String>,
    /// Lookup keys of those prices, where they have one.
    pub lookup_keys: Vec<String>,
    /// Catalog products its items sell.
    pub products: Vec<String>,
    /// When the period whose payment failed ended (RFC 3339), while past due.
    pub past_due_since: Option<String>,
    /// When a past-due subscription's access ends (RFC 3339).
    pub access_ends_at: Option<String>,
    /// Where tollgate learned it: an event id, `fetch` (read after an event) or `resync`.
    pub learned_from: String,
    /// The time of that observation (RFC 3339).
    pub as_of: String,
}

/// One product sold through Stripe, as the next Check would see it for this customer.
#[derive(Debug, Serialize)]
pub struct ProductView {
    /// The catalog product.
    pub product: String,
    /// `granted`, `payment_required` (402) or `forbidden` (403).
    pub access: &'static str,
    /// The subscription that decides, if any.
    pub subscription: Option<String>,
    /// In words.
    pub why: String,
}

/// The answer.
#[derive(Debug, Serialize)]
pub struct CustomerView {
    /// `cus_…`.
    pub customer: String,
    /// Its subscriptions, as stored.
    pub subscriptions: Vec<SubscriptionView>,
    /// Every product sold through Stripe.
    pub products: Vec<ProductView>,
}

impl Paywall {
    /// What tollgate believes of `customer` at `now`, read from the store.
    pub async fn believed(
        &self,
        customer: &str,
        now: i64,
    ) -> Result<CustomerView, crate::state::StoreError> {
        let paid = self.inner.store.paid_subscriptions(customer).await?;
        let catalog = self.inner.catalog.snapshot();
        let grace = self.inner.grace;
        let sells = |s: &PaidSubscription| {
            catalog
                .sold_through_stripe()
                .iter()
                .filter_map(|&id| catalog.product(id))
                .filter(|p| {
                    s.state
                        .items
                        .iter()
                        .any(|i| p.stripe_prices.iter().any(|r| r.matches(i)))
                })
                .map(|p| p.name.clone())
                .collect()
        };
        let subscriptions = paid
            .iter()
            .map(|s| SubscriptionView {
                id: s.state.id.clone(),
                status: s.state.status.as_str(),
                prices: s.state.items.iter().map(|i| i.price.clone()).collect(),
                lookup_keys: s
                    .state
                    .items
                    .iter()
                    .filter_map(|i| i.lookup_key.clone())
                    .collect(),
                products: sells(s),
                past_due_since: s.past_due_since.map(day),
                access_ends_at: access_ends(s, grace).map(day),
                learned_from: s.source.clone(),
                as_of: day(s.as_of / 1000),
            })
            .collect();
        let products = catalog
            .sold_through_stripe()
            .iter()
            .filter_map(|&id| catalog.product(id))
            .map(|p| {
                let decided = access(&paid, &p.stripe_prices, now, grace);
                let (label, subscription, why) = match decided {
                    Access::Granted(s) => {
                        let why = match access_ends(s, grace) {
                            Some(end) => format!(
                                "subscription {} for product {} is past_due since {}; access ends {}",
                                s.state.id,
                                p.name,
                                s.past_due_since.map(day).unwrap_or_default(),
                                day(end)
                            ),
                            None => format!("subscription {} is {}", s.state.id, s.state.status.as_str()),
                        };
                        ("granted", Some(s.state.id.clone()), why)
                    }
                    Access::PaymentRequired(s) => (
                        "payment_required",
                        Some(s.state.id.clone()),
                        denial_message(&p.name, decided, grace),
                    ),
                    Access::NotSubscribed(s) => (
                        "forbidden",
                        s.map(|s| s.state.id.clone()),
                        denial_message(&p.name, decided, grace),
                    ),
                };
                ProductView {
                    product: p.name.clone(),
                    access: label,
                    subscription,
                    why,
                }
            })
            .collect();
        Ok(CustomerView {
            customer: customer.to_owned(),
            subscriptions,
            products,
        })
    }
}

/// The answer to `GET /v1/subscriptions` (served by the management API, behind the admin token).
pub async fn answer(paywall: &Paywall, query: CustomerQuery) -> Response {
    let Some(customer) = query.customer.filter(|c| !c.trim().is_empty()) else {
        return ApiError::invalid("customer", "the query needs ?customer=cus_…").into_response();
    };
    match paywall.believed(&customer, unix_now()).await {
        Ok(view) => Json(view).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}
