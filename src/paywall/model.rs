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
    /// The time of the observation this state comes from, Unix milliseconds (an event's `created`, or when the
    /// read of Stripe that returned it was sent): an observation that is not newer never replaces it.
    pub as_of: i64,
    /// Where it was learned: an event id, `fetch` (read from Stripe after an event) or `resync`.
    pub source: String,
}

/// A new observation of a subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Observation {
    /// The whole subscription, as of `as_of` (Unix milliseconds).
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
        /// The event's `created`, in milliseconds.
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

    /// When the observation was true (Unix milliseconds).
    pub fn as_of(&self) -> i64 {
        match self {
            Observation::State { as_of, .. } | Observation::Invoice { as_of, .. } => *as_of,
        }
    }
}

/// What folding an observation into the stored subscription comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Folded {
    /// The subscription changed: store it and tell the replicas.
    Changed(PaidSubscription),
    /// Newer, but the same state: store the newer `as_of` (so an older observation arriving later cannot
    /// win), nothing else changes.
    Confirmed(PaidSubscription),
    /// Not newer than what is stored (Stripe does not deliver events in order; on a tie the stored one stays),
    /// or an invoice of a subscription not known yet (its subscription event, or the next read, brings it).
    Stale,
}

/// Folds `seen` (learned from `source`) into `stored`.
pub fn fold(stored: Option<&PaidSubscription>, seen: &Observation, source: &str) -> Folded {
    if stored.is_some_and(|s| s.as_of >= seen.as_of()) {
        return Folded::Stale;
    }
    let next = match seen {
        Observation::State { state, as_of } => {
            let past_due_since = (state.status == PaidStatus::PastDue).then(|| {
                stored
                    .filter(|s| s.state.status == PaidStatus::PastDue)
                    .and_then(|s| s.past_due_since)
                    .or(state.period_start)
                    .unwrap_or(*as_of / 1000)
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
            let Some(stored) = stored else {
                return Folded::Stale;
            };
            let status = stored.state.status;
            let (status, past_due_since) = match (paid, status) {
                (true, PaidStatus::PastDue | PaidStatus::Unpaid | PaidStatus::Incomplete) => {
                    (PaidStatus::Active, None)
                }
                (false, PaidStatus::Active | PaidStatus::Trialing) => (
                    PaidStatus::PastDue,
                    Some(
                        period_end
                            .or(stored.state.period_start)
                            .unwrap_or(*as_of / 1000),
                    ),
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
    match stored {
        Some(s) if s.state == next.state && s.past_due_since == next.past_due_since => {
            Folded::Confirmed(PaidSubscription {
                source: s.source.clone(),
                ..next
            })
        }
        _ => Folded::Changed(next),
    }
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

    fn changed(folded: Folded) -> PaidSubscription {
        match folded {
            Folded::Changed(s) => s,
            other => panic!("expected a change, got {other:?}"),
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
        let active = changed(fold(None, &seen(PaidStatus::Active, 100, 10), "evt_a"));
        let canceled = changed(fold(
            Some(&active),
            &seen(PaidStatus::Canceled, 100, 20),
            "evt_c",
        ));
        assert_eq!(canceled.state.status, PaidStatus::Canceled);
        let older = seen(PaidStatus::Active, 100, 15);
        assert_eq!(fold(Some(&canceled), &older, "evt_b"), Folded::Stale);
        let tie = seen(PaidStatus::Active, 100, 20);
        assert_eq!(
            fold(Some(&canceled), &tie, "evt_b"),
            Folded::Stale,
            "on a tie the stored state stays"
        );
        let again = seen(PaidStatus::Canceled, 100, 30);
        let Folded::Confirmed(confirmed) = fold(Some(&canceled), &again, "resync") else {
            panic!("the same state, newer, is a confirmation")
        };
        assert_eq!((confirmed.as_of, confirmed.source.as_str()), (30, "evt_c"));
        let late = seen(PaidStatus::Active, 100, 25);
        assert_eq!(
            fold(Some(&confirmed), &late, "evt_late"),
            Folded::Stale,
            "once confirmed at 30, an observation from 25 cannot win"
        );
    }

    #[test]
    fn past_due_keeps_the_time_it_started() {
        let active = changed(fold(None, &seen(PaidStatus::Active, 100, 10), "e1"));
        let due = changed(fold(
            Some(&active),
            &seen(PaidStatus::PastDue, 200, 210),
            "e2",
        ));
        assert_eq!(due.past_due_since, Some(200));
        let still = changed(fold(Some(&due), &seen(PaidStatus::PastDue, 300, 400), "e3"));
        assert_eq!(
            still.past_due_since,
            Some(200),
            "a later past_due read keeps the first failure's time"
        );
        let paid = changed(fold(Some(&due), &seen(PaidStatus::Active, 200, 500), "e4"));
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
            Folded::Stale,
            "unknown subscription"
        );
        let active = changed(fold(None, &seen(PaidStatus::Active, 100, 10), "e1"));
        let failed = changed(fold(Some(&active), &paid(false, 20), "e2"));
        assert_eq!(failed.state.status, PaidStatus::PastDue);
        assert_eq!(failed.past_due_since, Some(250));
        let healed = changed(fold(Some(&failed), &paid(true, 30), "e3"));
        assert_eq!(healed.state.status, PaidStatus::Active);
        let canceled = changed(fold(
            Some(&healed),
            &seen(PaidStatus::Canceled, 100, 40),
            "e4",
        ));
        assert!(
            matches!(fold(Some(&canceled), &paid(true, 50), "e5"),
                Folded::Confirmed(c) if c.state.status == PaidStatus::Canceled),
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
