//! What the catalog says about credits: a product's `prepaid` cost and refill, and the Stripe prices that
//! top balances up (CONTRACT §9).

use crate::credits::ledger::Refill;
use crate::quota::{Unit, window_at};

/// A prepaid product: each allowed call spends credits of its owner's balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prepaid {
    /// Credits one call spends (an operation may set its own).
    pub cost: u64,
    /// A free tier's top-up at each calendar period.
    pub refill: Option<RefillPolicy>,
}

/// `prepaid.refill`: the balance is topped up to `amount` at the start of every `every` (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefillPolicy {
    /// The balance after a refill, when it was below.
    pub amount: u64,
    /// The calendar period.
    pub every: Unit,
}

impl RefillPolicy {
    /// The refill due for `product` in the period that contains `now` (Unix seconds).
    pub fn at<'a>(&self, product: &'a str, now: i64) -> Refill<'a> {
        Refill {
            product,
            amount: self.amount,
            period_start: window_at(now, self.every, 1).start,
        }
    }
}

/// The owner of a prepaid balance: the company, else the developer.
pub fn owner<'a>(company: Option<&'a str>, developer: Option<&'a str>) -> Option<&'a str> {
    company.or(developer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_monthly_refill_changes_period_at_the_first_of_the_month_utc() {
        let policy = RefillPolicy {
            amount: 1000,
            every: Unit::Month,
        };
        // 2027-01-31T23:59:59Z and 2027-02-01T00:00:00Z.
        let last = policy.at("free", 1_801_439_999);
        let first = policy.at("free", 1_801_440_000);
        assert_eq!(last.period_start, 1_798_761_600); // 2027-01-01
        assert_eq!(first.period_start, 1_801_440_000);
        assert_ne!(last.period_start, first.period_start);
    }
}
