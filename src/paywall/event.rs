//! Stripe's JSON, read into plain values: webhook events and subscription objects (from events or the API).

use serde::Deserialize;

use crate::paywall::model::{Observation, PaidStatus, PriceItem, StripeEvent, SubscriptionState};

/// The event types that move access.
pub const HANDLED: [&str; 7] = [
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.paused",
    "customer.subscription.resumed",
    "invoice.paid",
    "invoice.payment_failed",
];

/// Why Stripe's JSON could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unreadable Stripe {what}: {message}")]
pub struct EventError {
    /// event, subscription, …
    pub what: &'static str,
    /// What is wrong (never a secret: Stripe objects hold none tollgate keeps).
    pub message: String,
}

/// A verified webhook body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// An event that moves access.
    Handled(StripeEvent),
    /// An event of another type (or an invoice of no subscription): acknowledged, nothing to do.
    Ignored {
        /// `evt_…`.
        id: String,
        /// Its type.
        kind: String,
    },
}

#[derive(Deserialize)]
struct RawEvent {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    created: i64,
    data: RawData,
}

#[derive(Deserialize)]
struct RawData {
    object: serde_json::Value,
}

/// An id, or the object it names when the field was expanded.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum Expandable {
    Id(String),
    Object { id: String },
}

impl Expandable {
    /// The id, whether the field was expanded or not.
    pub(crate) fn id(self) -> String {
        match self {
            Expandable::Id(id) | Expandable::Object { id } => id,
        }
    }
}

/// A subscription object, as far as tollgate reads it.
#[derive(Deserialize)]
pub struct RawSubscription {
    id: String,
    customer: Expandable,
    status: String,
    items: RawList<RawItem>,
}

#[derive(Deserialize)]
struct RawList<T> {
    data: Vec<T>,
}

#[derive(Deserialize)]
struct RawItem {
    price: RawPrice,
    current_period_start: Option<i64>,
}

#[derive(Deserialize)]
struct RawPrice {
    id: String,
    lookup_key: Option<String>,
}

#[derive(Deserialize)]
struct RawInvoice {
    customer: Option<Expandable>,
    parent: Option<RawParent>,
    /// Where API versions before 2025-03-31 named the subscription.
    subscription: Option<Expandable>,
    period_end: Option<i64>,
}

#[derive(Deserialize)]
struct RawParent {
    subscription_details: Option<RawSubscriptionDetails>,
}

#[derive(Deserialize)]
struct RawSubscriptionDetails {
    subscription: Option<Expandable>,
}

impl RawSubscription {
    /// The plain state; an unknown status is refused rather than guessed.
    pub fn state(self) -> Result<SubscriptionState, EventError> {
        let status = PaidStatus::parse(&self.status).ok_or_else(|| EventError {
            what: "subscription",
            message: format!("unknown status {:?}", self.status),
        })?;
        let period_start = self
            .items
            .data
            .iter()
            .filter_map(|i| i.current_period_start)
            .max();
        Ok(SubscriptionState {
            id: self.id,
            customer: self.customer.id(),
            status,
            items: self
                .items
                .data
                .into_iter()
                .map(|i| PriceItem {
                    price: i.price.id,
                    lookup_key: i.price.lookup_key,
                })
                .collect(),
            period_start,
        })
    }
}

/// Reads a subscription object (`GET /v1/subscriptions/{id}`).
pub fn subscription(json: &str) -> Result<SubscriptionState, EventError> {
    serde_json::from_str::<RawSubscription>(json)
        .map_err(|e| EventError {
            what: "subscription",
            message: e.to_string(),
        })?
        .state()
}

#[derive(Deserialize)]
struct RawPage {
    data: Vec<RawSubscription>,
    has_more: bool,
}

/// Reads one page of `GET /v1/subscriptions`: the subscriptions and whether more follow.
pub fn subscription_page(json: &str) -> Result<(Vec<SubscriptionState>, bool), EventError> {
    let page: RawPage = serde_json::from_str(json).map_err(|e| EventError {
        what: "subscription list",
        message: e.to_string(),
    })?;
    let states = page
        .data
        .into_iter()
        .map(RawSubscription::state)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((states, page.has_more))
}

/// Reads a verified webhook body.
pub fn parse(body: &[u8]) -> Result<Parsed, EventError> {
    let bad = |what: &'static str| {
        move |e: serde_json::Error| EventError {
            what,
            message: e.to_string(),
        }
    };
    let mut event: RawEvent = serde_json::from_slice(body).map_err(bad("event"))?;
    let ignored = |event: RawEvent| Parsed::Ignored {
        id: event.id,
        kind: event.kind,
    };
    let as_of = event.created.saturating_mul(1000);
    let (customer, observation) = match event.kind.as_str() {
        kind if kind.starts_with("customer.subscription.") && HANDLED.contains(&kind) => {
            let raw: RawSubscription =
                serde_json::from_value(event.data.object.take()).map_err(bad("subscription"))?;
            let state = raw.state()?;
            (state.customer.clone(), Observation::State { state, as_of })
        }
        "invoice.paid" | "invoice.payment_failed" => {
            let raw: RawInvoice =
                serde_json::from_value(event.data.object.take()).map_err(bad("invoice"))?;
            let subscription = raw
                .parent
                .and_then(|p| p.subscription_details)
                .and_then(|d| d.subscription)
                .or(raw.subscription)
                .map(Expandable::id);
            match (subscription, raw.customer.map(Expandable::id)) {
                (Some(subscription), Some(customer)) => (
                    customer,
                    Observation::Invoice {
                        subscription,
                        paid: event.kind == "invoice.paid",
                        period_end: raw.period_end,
                        as_of,
                    },
                ),
                _ => return Ok(ignored(event)),
            }
        }
        _ => return Ok(ignored(event)),
    };
    Ok(Parsed::Handled(StripeEvent {
        id: event.id,
        kind: event.kind,
        created: event.created,
        customer,
        observation,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscription_json(status: &str) -> serde_json::Value {
        serde_json::json!({
            "id": "sub_1", "object": "subscription", "customer": "cus_1", "status": status,
            "items": {"object": "list", "has_more": false, "url": "/v1/subscription_items", "data": [
                {"id": "si_1", "current_period_start": 100, "current_period_end": 200,
                 "price": {"id": "price_a", "lookup_key": "starter"}},
            ]},
        })
    }

    fn event(kind: &str, object: serde_json::Value) -> Vec<u8> {
        serde_json::json!({"id": "evt_1", "object": "event", "type": kind, "created": 1234,
                           "data": {"object": object}})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn subscription_events_carry_the_whole_state() {
        let Parsed::Handled(e) = parse(&event(
            "customer.subscription.updated",
            subscription_json("past_due"),
        ))
        .unwrap() else {
            panic!("handled")
        };
        assert_eq!(e.customer, "cus_1");
        let Observation::State { state, as_of } = e.observation else {
            panic!("state")
        };
        assert_eq!(as_of, 1_234_000, "milliseconds");
        assert_eq!(state.status, PaidStatus::PastDue);
        assert_eq!(state.period_start, Some(100));
        assert_eq!(state.items[0].lookup_key.as_deref(), Some("starter"));
    }

    #[test]
    fn invoices_name_their_subscription_through_the_parent() {
        let invoice = serde_json::json!({"id": "in_1", "object": "invoice", "customer": {"id": "cus_1"},
            "period_end": 300, "parent": {"type": "subscription_details",
            "subscription_details": {"subscription": "sub_1"}}});
        let Parsed::Handled(e) = parse(&event("invoice.payment_failed", invoice)).unwrap() else {
            panic!("handled")
        };
        assert_eq!(
            e.observation,
            Observation::Invoice {
                subscription: "sub_1".into(),
                paid: false,
                period_end: Some(300),
                as_of: 1_234_000
            }
        );
        let one_off = serde_json::json!({"id": "in_2", "customer": "cus_1", "parent": null});
        assert!(matches!(
            parse(&event("invoice.paid", one_off)).unwrap(),
            Parsed::Ignored { .. }
        ));
    }

    #[test]
    fn other_types_are_ignored_and_garbage_is_an_error() {
        assert!(matches!(
            parse(&event("customer.created", serde_json::json!({}))).unwrap(),
            Parsed::Ignored { .. }
        ));
        assert!(parse(b"not json").is_err());
        assert!(
            parse(&event(
                "customer.subscription.updated",
                subscription_json("weird")
            ))
            .is_err()
        );
        assert!(
            parse(&event(
                "customer.subscription.updated",
                serde_json::json!({"id": 1})
            ))
            .is_err()
        );
    }
}
