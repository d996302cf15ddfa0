//! Whether a customer's Stripe subscriptions give access to a product sold through Stripe, and the words that
//! say why not: pure functions of the stored subscriptions, the product's prices, the time and the grace.

use crate::paywall::model::{PaidStatus, PaidSubscription, PriceItem};

/// One entry of a product's `stripe_prices`: a price id, or `lookup_key:` and a price's lookup key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PriceRef {
    /// `price_…`.
    Id(String),
    /// A price's `lookup_key`.
    LookupKey(String),
}

impl PriceRef {
    /// Reads a catalog entry: `price_…` or `lookup_key:NAME`.
    pub fn parse(text: &str) -> Result<PriceRef, String> {
        let text = text.trim();
        if let Some(key) = text.strip_prefix("lookup_key:") {
            let key = key.trim();
            if key.is_empty() {
                return Err("lookup_key: needs a lookup key after it".into());
            }
            return Ok(PriceRef::LookupKey(key.to_owned()));
        }
        if text.is_empty() || text.contains(char::is_whitespace) {
            return Err(format!(
                "{text:?} is neither a price id (price_…) nor lookup_key:NAME"
            ));
        }
        Ok(PriceRef::Id(text.to_owned()))
    }

    /// Whether a subscription item bills this price.
    pub fn matches(&self, item: &PriceItem) -> bool {
        match self {
            PriceRef::Id(id) => item.price == *id,
            PriceRef::LookupKey(key) => item.lookup_key.as_deref() == Some(key.as_str()),
        }
    }
}

/// What a customer's subscriptions mean for one product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access<'a> {
    /// Active, trialing, or past due within the grace period.
    Granted(&'a PaidSubscription),
    /// Past due beyond the grace period, unpaid or incomplete: 402.
    PaymentRequired(&'a PaidSubscription),
    /// Canceled, expired, paused, or no subscription at all: 403.
    NotSubscribed(Option<&'a PaidSubscription>),
}

/// The best access `subscriptions` give to a product sold at `prices`: a grant beats a payment due, which beats
/// nothing.
pub fn access<'a>(
    subscriptions: &'a [PaidSubscription],
    prices: &[PriceRef],
    now: i64,
    grace: i64,
) -> Access<'a> {
    let mut best = Access::NotSubscribed(None);
    let bills = |s: &PaidSubscription| {
        s.state
            .items
            .iter()
            .any(|item| prices.iter().any(|p| p.matches(item)))
    };
    for s in subscriptions.iter().filter(|s| bills(s)) {
        let this = match s.state.status {
            PaidStatus::Active | PaidStatus::Trialing => return Access::Granted(s),
            PaidStatus::PastDue if access_ends(s, grace).is_none_or(|end| now < end) => {
                return Access::Granted(s);
            }
            PaidStatus::PastDue | PaidStatus::Unpaid | PaidStatus::Incomplete => {
                Access::PaymentRequired(s)
            }
            PaidStatus::Canceled | PaidStatus::IncompleteExpired | PaidStatus::Paused => {
                Access::NotSubscribed(Some(s))
            }
        };
        if rank(this) > rank(best) {
            best = this;
        }
    }
    best
}

/// Which refusal says more: a payment due (pay and you are back) over an ended subscription over none.
fn rank(access: Access<'_>) -> u8 {
    match access {
        Access::Granted(_) => 3,
        Access::PaymentRequired(_) => 2,
        Access::NotSubscribed(Some(_)) => 1,
        Access::NotSubscribed(None) => 0,
    }
}

/// When a past-due subscription's access ends: the failed period's end plus the grace period.
pub fn access_ends(subscription: &PaidSubscription, grace: i64) -> Option<i64> {
    (subscription.state.status == PaidStatus::PastDue)
        .then_some(subscription.past_due_since)
        .flatten()
        .map(|since| since.saturating_add(grace))
}

/// What a denial says: which product, which subscription, which status, and what to do.
pub fn denial_message(product: &str, access: Access<'_>, grace: i64) -> String {
    match access {
        Access::Granted(_) => String::new(),
        Access::PaymentRequired(s) => {
            let id = &s.state.id;
            match (s.past_due_since, access_ends(s, grace)) {
                (Some(since), Some(end)) => format!(
                    "subscription {id} for product {product} is past_due since {}; access ended {}: pay the \
                     open invoice to restore it",
                    day(since),
                    day(end)
                ),
                _ => format!(
                    "subscription {id} for product {product} is {}: pay the open invoice to restore access",
                    s.state.status.as_str()
                ),
            }
        }
        Access::NotSubscribed(Some(s)) => format!(
            "no active subscription for product {product} (subscription {} is {})",
            s.state.id,
            s.state.status.as_str()
        ),
        Access::NotSubscribed(None) => format!("no active subscription for product {product}"),
    }
}

/// A Unix time as RFC 3339 in UTC, to the second.
pub fn day(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| secs.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paywall::model::SubscriptionState;

    fn sub(id: &str, status: PaidStatus, price: &str, since: Option<i64>) -> PaidSubscription {
        PaidSubscription {
            state: SubscriptionState {
                id: id.into(),
                customer: "cus_1".into(),
                status,
                items: vec![PriceItem {
                    price: price.into(),
                    lookup_key: Some(format!("{price}_key")),
                }],
                period_start: since,
            },
            past_due_since: since,
            as_of: 0,
            source: "evt".into(),
        }
    }

    #[test]
    fn prices_parse_and_match_by_id_or_lookup_key() {
        let item = PriceItem {
            price: "price_a".into(),
            lookup_key: Some("starter".into()),
        };
        assert!(PriceRef::parse("price_a").unwrap().matches(&item));
        assert!(
            PriceRef::parse("lookup_key:starter")
                .unwrap()
                .matches(&item)
        );
        assert!(!PriceRef::parse("lookup_key:pro").unwrap().matches(&item));
        assert!(PriceRef::parse("lookup_key: ").is_err());
        assert!(PriceRef::parse("price a").is_err());
    }

    #[test]
    fn status_and_grace_decide() {
        let prices = [PriceRef::Id("price_a".into())];
        let grace = 100;
        let check = |s: PaidSubscription, now: i64| {
            let subs = [s];
            match access(&subs, &prices, now, grace) {
                Access::Granted(_) => "granted",
                Access::PaymentRequired(_) => "payment_required",
                Access::NotSubscribed(_) => "not_subscribed",
            }
        };
        assert_eq!(
            check(sub("s", PaidStatus::Active, "price_a", None), 0),
            "granted"
        );
        assert_eq!(
            check(sub("s", PaidStatus::Trialing, "price_a", None), 0),
            "granted"
        );
        assert_eq!(
            check(sub("s", PaidStatus::PastDue, "price_a", Some(1000)), 1099),
            "granted"
        );
        assert_eq!(
            check(sub("s", PaidStatus::PastDue, "price_a", Some(1000)), 1100),
            "payment_required"
        );
        assert_eq!(
            check(sub("s", PaidStatus::Unpaid, "price_a", None), 0),
            "payment_required"
        );
        assert_eq!(
            check(sub("s", PaidStatus::Incomplete, "price_a", None), 0),
            "payment_required"
        );
        for ended in [
            PaidStatus::Canceled,
            PaidStatus::IncompleteExpired,
            PaidStatus::Paused,
        ] {
            assert_eq!(check(sub("s", ended, "price_a", None), 0), "not_subscribed");
        }
        assert_eq!(
            check(sub("s", PaidStatus::Active, "price_other", None), 0),
            "not_subscribed",
            "another product's price grants nothing"
        );
    }

    #[test]
    fn the_best_subscription_wins_and_the_message_names_it() {
        let prices = [PriceRef::LookupKey("price_a_key".into())];
        let subs = [
            sub("sub_old", PaidStatus::Canceled, "price_a", None),
            sub("sub_due", PaidStatus::Unpaid, "price_a", None),
        ];
        let a = access(&subs, &prices, 0, 0);
        assert_eq!(a, Access::PaymentRequired(&subs[1]));
        assert_eq!(
            denial_message("starter", a, 0),
            "subscription sub_due for product starter is unpaid: pay the open invoice to restore access"
        );
        let due = [sub(
            "sub_1",
            PaidStatus::PastDue,
            "price_a",
            Some(1_764_547_200),
        )];
        let a = access(&due, &prices, 1_764_547_200 + 300_000, 259_200);
        assert_eq!(
            denial_message("starter", a, 259_200),
            "subscription sub_1 for product starter is past_due since 2025-12-01T00:00:00Z; access ended \
             2025-12-04T00:00:00Z: pay the open invoice to restore it"
        );
        let a = access(&subs[..1], &prices, 0, 0);
        assert_eq!(
            denial_message("starter", a, 0),
            "no active subscription for product starter (subscription sub_old is canceled)"
        );
        assert_eq!(
            denial_message("starter", access(&[], &prices, 0, 0), 0),
            "no active subscription for product starter"
        );
        let mixed = [
            subs[1].clone(),
            sub("sub_ok", PaidStatus::Active, "price_a", None),
        ];
        assert_eq!(access(&mixed, &prices, 0, 0), Access::Granted(&mixed[1]));
    }
}
