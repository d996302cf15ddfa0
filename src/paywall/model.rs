//! Stripe subscription state as plain values, and the rules that fold a new observation into what is stored.

use serde::{Deserialize, Serialize};

/// A Stripe subscription's `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaidStatus {
    /// Paid and in force.
    Active,
    /// In a free trial.
    Trialing,
    /// A renewal payment failed; Stripe retries.
    PastDue,
    /// Stripe gave up retrying and keeps the subscription open, unpaid.
    Unpaid,
    /// The first payment has not succeeded yet.
    Incomplete,
    /// The first payment never succeeded (terminal).
    IncompleteExpired,
    /// Ended (terminal).
    Canceled,
    /// Paused: a trial ended without a payment method, or collection is paused.
    Paused,
}

impl PaidStatus {
    /// Stripe's name of the status.
    pub fn as_str(self) -> &'static str {
        match self {
            PaidStatus::Active => "active",
            PaidStatus::Trialing => "trialing",
            PaidStatus::PastDue => "past_due",
            PaidStatus::Unpaid => "unpaid",
            PaidStatus::Incomplete => "incomplete",
            PaidStatus::IncompleteExpired => "incomplete_expired",
            PaidStatus::Canceled => "canceled",
            PaidStatus::Paused => "paused",
        }
    }

    /// The status Stripe names `text`, if it is one.
    pub fn parse(text: &str) -> Option<PaidStatus> {
        serde_json::from_value(serde_json::Value::String(text.to_owned())).ok()
    }
}

/// One item of a subscription: the price it bills.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PriceItem {
    /// `price_…`.
    pub price: String,
    /// The price's lookup key, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookup_key: Option<String>,
}

/// What a Stripe subscription object says, as read from an event or the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionState {
    /// `sub_…`.
    pub id: String,
    /// `cus_…`.
    pub customer: String,
    /// Its status.
    pub status: PaidStatus,
    /// The prices it bills.
    pub items: Vec<PriceItem>,
    /// Start of the items' current billing period (Unix seconds; the latest when items differ).
    #[serde(default)]
    pub period_start: Option<i64>,
}

/// What tollgate believes of one subscription: the latest state it saw, and since when it is past due.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaidSubscription {
    /// The subscription as last seen.
    #[serde(flatten)]
    pub state: SubscriptionState,
    /// When the period whose payment failed ended (Unix seconds); set while `past_due`.
    #[serde(default)]
    pub past_due_since: Option<i64>,
    /// The time of the observation this state comes from (an event's `created`, or when Stripe was read):
    /// an older observation never replaces it.
    pub as_of: i64,
    /// Where it was learned: an event id, `fetch` (read from Stripe after an event) or `resync`.
    pub source: String,
}

/// A new observation of a subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Observation {
    /// The whole subscription, as of `as_of`.
    State {
        /// The subscription.
        state: SubscriptionState,
        /// When it was true.
        as_of: i64,
    },
    /// An invoice of the subscription was paid (`paid`) or failed, as of `as_of`; `period_end` ends the
    /// period it bills.
    Invoice {
        /// `sub_…`.
        subscription: String,
        /// Whether the payment succeeded.
        paid: bool,
        /// End of the billed period (Unix seconds).
        period_end: Option<i64>,
        /// The event's `created`.
        as_of: i64,
    },
}

impl Observation {
    /// The subscription observed.
    pub fn subscription(&self) -> &str {
        match self {
            Observation::State { state, .. } => &state.id,
            Observation::Invoice { subscription, .. } => subscription,
        }
    }

    /// When the observation was true.
    pub fn as_of(&self) -> i64 {
        match self {
            Observation::State { as_of, .. } | Observation::Invoice { as_of, .. } => *as_of,
        }
    }
}

/// Folds `seen` (learned from `source`) into `stored`: the new state, or `None` when nothing changes: the
/// observation is older than what is stored (Stripe does not deliver events in order), changes nothing, or is
/// an invoice of a subscription not known yet (its subscription event, or the next read, brings it).
pub fn fold(
    stored: Option<&PaidSubscription>,
    seen: &Observation,
    source: &str,
) -> Option<PaidSubscription> {
    if stored.is_some_and(|s| s.as_of > seen.as_of()) {
        return None;
    }
    let next = match seen {
        Observation::State { state, as_of } => {
            let past_due_since = (state.status == PaidStatus::PastDue).then(|| {
                stored
                    .filter(|s| s.state.status == PaidStatus::PastDue)
                    .and_then(|s| s.past_due_since)
                    .or(state.period_start)
                    .unwrap_or(*as_of)
            });
            PaidSubscription {
                state: state.clone(),
                past_due_since,
                as_of: *as_of,
                source: source.to_owned(),
            }
        }
        Observation::Invoice {
            paid,
            period_end,
            as_of,
            ..
        } => {
            let stored = stored?;
            let status = stored.state.status;
            let (status, past_due_since) = match (paid, status) {
                (true, PaidStatus::PastDue | PaidStatus::Unpaid | PaidStatus::Incomplete) => {
                    (PaidStatus::Active, None)
                }
                (false, PaidStatus::Active | PaidStatus::Trialing) => (
                    PaidStatus::PastDue,
                    Some(period_end.or(stored.state.period_start).unwrap_or(*as_of)),
                ),
                _ => (status, stored.past_due_since),
            };
            PaidSubscription {
                state: SubscriptionState {
                    status,
                    ..stored.state.clone()
                },
                past_due_since,
                as_of: *as_of,
                source: source.to_owned(),
            }
        }
    };
    let same =
        stored.is_some_and(|s| s.state == next.state && s.past_due_since == next.past_due_since);
    (!same).then_some(next)
}

/// A verified webhook event tollgate acts on, reduced to what it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeEvent {
    /// `evt_…`: events are de-duplicated by it.
    pub id: String,
    /// The event type (`customer.subscription.updated`, …).
    pub kind: String,
    /// When Stripe created it (Unix seconds).
    pub created: i64,
    /// `cus_…`.
    pub customer: String,
    /// What it says about a subscription.
    pub observation: Observation,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(status: PaidStatus, period_start: i64) -> SubscriptionState {
        SubscriptionState {
            id: "sub_1".into(),
            customer: "cus_1".into(),
            status,
            items: vec![PriceItem {
                price: "price_a".into(),
                lookup_key: None,
            }],
            period_start: Some(period_start),
        }
    }

    fn seen(status: PaidStatus, period_start: i64, as_of: i64) -> Observation {
        Observation::State {
            state: state(status, period_start),
            as_of,
        }
    }

    #[test]
    fn an_older_observation_never_replaces_a_newer_one() {
        let active = fold(None, &seen(PaidStatus::Active, 100, 10), "evt_a").unwrap();
        let canceled = fold(Some(&active), &seen(PaidStatus::Canceled, 100, 20), "evt_c").unwrap();
        assert_eq!(canceled.state.status, PaidStatus::Canceled);
        assert_eq!(
            fold(Some(&canceled), &seen(PaidStatus::Active, 100, 15), "evt_b"),
            None
        );
        assert_eq!(
            fold(
                Some(&canceled),
                &seen(PaidStatus::Canceled, 100, 30),
                "resync"
            ),
            None,
            "the same state again changes nothing"
        );
    }

    #[test]
    fn past_due_keeps_the_time_it_started() {
        let active = fold(None, &seen(PaidStatus::Active, 100, 10), "e1").unwrap();
        let due = fold(Some(&active), &seen(PaidStatus::PastDue, 200, 210), "e2").unwrap();
        assert_eq!(due.past_due_since, Some(200));
        let still = fold(Some(&due), &seen(PaidStatus::PastDue, 300, 400), "e3").unwrap();
        assert_eq!(
            still.past_due_since,
            Some(200),
            "a later past_due read keeps the first failure's time"
        );
        let paid = fold(Some(&due), &seen(PaidStatus::Active, 200, 500), "e4").unwrap();
        assert_eq!(paid.past_due_since, None);
    }

    #[test]
    fn invoices_move_a_known_subscription() {
        let paid = |paid: bool, as_of: i64| Observation::Invoice {
            subscription: "sub_1".into(),
            paid,
            period_end: Some(250),
            as_of,
        };
        assert_eq!(
            fold(None, &paid(true, 5), "e"),
            None,
            "unknown subscription"
        );
        let active = fold(None, &seen(PaidStatus::Active, 100, 10), "e1").unwrap();
        let failed = fold(Some(&active), &paid(false, 20), "e2").unwrap();
        assert_eq!(failed.state.status, PaidStatus::PastDue);
        assert_eq!(failed.past_due_since, Some(250));
        let healed = fold(Some(&failed), &paid(true, 30), "e3").unwrap();
        assert_eq!(healed.state.status, PaidStatus::Active);
        let canceled = fold(Some(&healed), &seen(PaidStatus::Canceled, 100, 40), "e4").unwrap();
        assert_eq!(
            fold(Some(&canceled), &paid(true, 50), "e5"),
            None,
            "paying does not revive a canceled one"
        );
    }

    #[test]
    fn statuses_parse_as_stripe_names_them() {
        assert_eq!(PaidStatus::parse("past_due"), Some(PaidStatus::PastDue));
        assert_eq!(
            PaidStatus::parse("incomplete_expired"),
            Some(PaidStatus::IncompleteExpired)
        );
        assert_eq!(PaidStatus::parse("bogus"), None);
        assert_eq!(PaidStatus::Unpaid.as_str(), "unpaid");
    }
}
