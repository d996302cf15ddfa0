//! The quota script (`script.lua`, whose header documents KEYS, ARGV and replies): building its calls and
//! reading its answers as typed values.
//!
//! One `EVALSHA` settles a replica's leases and charges every limit of one bucket atomically; the `redis`
//! crate's `Script` loads the script again on `NOSCRIPT`, so a Redis restart or failover needs nothing here.

use redis::{Script, ScriptInvocation};

use super::super::StoreError;
use super::LEASE_DIVISOR;
use super::conn::Client;
use super::metrics::StoreMetrics;

/// Loads the script's text; it is sent to Redis on the first call (and after a `NOSCRIPT`).
pub(super) fn load() -> Script {
    Script::new(include_str!("script.lua"))
}

/// The fixed head of a call's ARGV.
pub(super) struct Header<'a> {
    /// Names this replica's `s:`/`r:`/`q:` fields.
    pub(super) replica: &'a str,
    /// 0 for an anonymous charge (no settling, no lease); else newer than every earlier call of the
    /// replica, so Redis can refuse a late retry as stale.
    pub(super) seq: u64,
    /// How many of the keys that follow are windows being left (settled only, not charged).
    pub(super) leaving: usize,
    /// Units to charge on every charged key.
    pub(super) cost: u64,
    /// Upper bound of the lease this call may grant; 0 grants none.
    pub(super) max_lease: u64,
    /// How much of the current lease stays reserved while the call is in flight.
    pub(super) keep: u64,
}

/// One invocation of the script, built key by key in the order the script reads them.
pub(super) struct Call<'s>(ScriptInvocation<'s>);

impl<'s> Call<'s> {
    /// Starts a call with `head`; the windows to leave must be added before the windows to charge.
    pub(super) fn new(script: &'s Script, head: &Header<'_>) -> Self {
        let mut call = script.prepare_invoke();
        call.arg(head.replica)
            .arg(head.seq)
            .arg(head.leaving)
            .arg(head.cost)
            .arg(head.max_lease)
            .arg(LEASE_DIVISOR)
            .arg(head.keep);
        Call(call)
    }

    /// Adds a window the replica leaves: Redis takes `claim` (the replica's absolute served total there, -1
    /// when it has no record) and releases the replica's lease on it.
    pub(super) fn leave(&mut self, key: &str, claim: i64) -> &mut Self {
        self.0.key(key).arg(claim);
        self
    }

    /// Adds a window to charge, with the replica's `claim` on it, its `limit` and the key's `ttl`.
    pub(super) fn charge(&mut self, key: &str, claim: i64, limit: u64, ttl: i64) -> &mut Self {
        self.0.key(key).arg(claim).arg(limit).arg(ttl);
        self
    }

    /// Runs the call as `op` and parses the answer.
    pub(super) async fn run(
        &self,
        client: &Client,
        metrics: &StoreMetrics,
        op: &'static str,
    ) -> Result<Answer, StoreError> {
        let values = client.eval(metrics, op, &self.0).await?;
        parse_answer(&values).ok_or_else(|| {
            metrics.failed();
            StoreError::Backend("unexpected answer from the quota script".into())
        })
    }
}

/// The parsed answer of the script.
pub(super) enum Answer {
    /// A newer call of this replica already reached one of the keys: nothing was done.
    Stale,
    /// Limit `index` (1-based, among the charged keys) has no room: nothing was charged.
    Exceeded {
        /// Which charged key refused.
        index: usize,
        /// Its `used` field.
        used: u64,
        /// Its `reserved` field.
        reserved: u64,
        /// The part of the lease the call kept.
        kept: u64,
    },
    /// Charged on every key.
    Allowed {
        /// Units newly leased on top of `kept`.
        lease: u64,
        /// The part of the old lease the call kept; the replica now holds `kept + lease`.
        kept: u64,
        /// (s, used, reserved) per charged key.
        rows: Vec<(u64, u64, u64)>,
    },
}

fn parse_answer(values: &[i64]) -> Option<Answer> {
    let n = |i: usize| values.get(i).and_then(|&v| u64::try_from(v).ok());
    match values.first()? {
        -1 => Some(Answer::Stale),
        0 => Some(Answer::Exceeded {
            index: usize::try_from(n(1)?).ok()?,
            used: n(2)?,
            reserved: n(3)?,
            kept: n(4)?,
        }),
        1 => {
            let lease = n(1)?;
            let kept = n(2)?;
            let rest = values.get(3..)?;
            if rest.len() % 3 != 0 {
                return None;
            }
            let rows = rest
                .chunks_exact(3)
                .map(|c| {
                    Some((
                        u64::try_from(c[0]).ok()?,
                        u64::try_from(c[1]).ok()?,
                        u64::try_from(c[2]).ok()?,
                    ))
                })
                .collect::<Option<Vec<_>>>()?;
            Some(Answer::Allowed { lease, kept, rows })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_answers_parse() {
        assert!(matches!(parse_answer(&[-1]), Some(Answer::Stale)));
        assert!(matches!(
            parse_answer(&[0, 2, 5, 1, 0]),
            Some(Answer::Exceeded {
                index: 2,
                used: 5,
                reserved: 1,
                kept: 0
            })
        ));
        match parse_answer(&[1, 7, 2, 3, 4, 9]) {
            Some(Answer::Allowed {
                lease: 7,
                kept: 2,
                rows,
            }) => assert_eq!(rows, vec![(3, 4, 9)]),
            _ => panic!("expected allowed"),
        }
        assert!(parse_answer(&[1, 7, 2, 3, 4]).is_none());
        assert!(parse_answer(&[]).is_none());
        assert!(parse_answer(&[2]).is_none());
    }
}
