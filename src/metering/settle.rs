//! Token quotas' second half (CONTRACT §11): the Check charged and held `reserve` units of a quota that counts
//! a meter value; the access-log entry of the finished call says what the response reported, and the quota
//! store replaces the reserve by it ([`QuotaStore::settle`]), once. A hold whose entry never came was released
//! by its timeout (`quota.hold_timeout`); a late entry then adds its count afresh.
//!
//! Once: only records metering accepts as new are settled (a duplicate access-log entry settles nothing).
//! What is settled: the counter the Check charged, found again from the record's app (or account), product and
//! operation, in the window that held the call's start. What a response without the counted value settles
//! to: a successful (2xx) one keeps its reserve (a backend that stops reporting usage must not become
//! unlimited); any other gives the reserve back (nothing was generated). A stream cut by the client reports
//! what it sent, and that is what is counted.
//!
//! Bound: a call is admitted only while its reserve fits, so a window exceeds its limit by at most the sum,
//! over the calls in flight when it filled, of what each used beyond its reserve.

use std::sync::Arc;

use prometheus::IntCounterVec;

use crate::catalog::Catalog;
use crate::check::buckets::{Owner, bucket_key};
use crate::metering::UsageRecord;
use crate::quota::{Hold, Limit, QuotaStore, Settled};
use crate::util::throttle::OncePerSecond;

/// Waits between the tries of a settlement the store failed (a Redis restart, a failover).
const RETRIES: [std::time::Duration; 3] = [
    std::time::Duration::from_millis(500),
    std::time::Duration::from_secs(2),
    std::time::Duration::from_secs(8),
];

/// One hold to settle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Settlement {
    /// The request id the hold was recorded under.
    pub id: String,
    /// The quota store bucket the Check charged.
    pub bucket: String,
    /// Its limits.
    pub limits: Vec<Limit>,
    /// What the Check charged.
    pub reserve: u64,
    /// What the call counts for in the end.
    pub used: u64,
    /// When the call started (Unix seconds): its windows are the ones settled.
    pub at: i64,
    /// Whether the response reported the counted value (else the reserve was kept or given back).
    pub reported: bool,
}

/// What `record`'s reservation settles to, or `None` when it held none or its quota is gone from the catalog.
pub(crate) fn settlement(
    record: &UsageRecord,
    catalog: &Catalog,
    now_s: i64,
) -> Option<Settlement> {
    if record.quota_reserved == 0 || !record.allowed() {
        return None;
    }
    let product = catalog
        .product_id(&record.product)
        .and_then(|id| catalog.product(id))?;
    let operation = product
        .operations
        .iter()
        .find(|o| o.name == record.operation)?;
    let owner = if !record.app.is_empty() {
        Owner::App(&record.app)
    } else if !record.company.is_empty() {
        Owner::Account(&record.company)
    } else if !record.developer.is_empty() {
        Owner::Account(&record.developer)
    } else {
        return None;
    };
    let (limits, bucket, tokens) = match &operation.quota {
        Some(limits) => (
            limits,
            bucket_key(owner, &product.name, Some(operation.counter())),
            operation.quota_tokens.as_ref(),
        ),
        None => (
            &product.quota,
            bucket_key(owner, &product.name, None),
            product.quota_tokens.as_ref(),
        ),
    };
    let tokens = tokens?;
    let reported = record.usage.get(&tokens.counts).copied();
    let used = match reported {
        Some(used) => used,
        None if record.response_code / 100 == 2 => record.quota_reserved,
        None => 0,
    };
    let at = if record.start_ms > 0 {
        record.start_ms / 1000
    } else {
        now_s
    };
    Some(Settlement {
        id: record.request_id.clone(),
        bucket,
        limits: limits.clone(),
        reserve: record.quota_reserved,
        used,
        at,
        reported: reported.is_some(),
    })
}

/// Applies settlements to the quota store, counting how they went.
pub(crate) struct Settler {
    quota: Arc<dyn QuotaStore>,
    /// `tollgate_quota_settlements_total{result}`: settled, kept, refunded, late, error.
    results: IntCounterVec,
    warned: OncePerSecond,
}

impl Settler {
    /// A settler over `quota`, counting into `results`.
    pub(crate) fn new(quota: Arc<dyn QuotaStore>, results: IntCounterVec) -> Settler {
        Settler {
            quota,
            results,
            warned: OncePerSecond::default(),
        }
    }

    /// Applies each settlement; a store failure is counted and logged (at most once a second) and leaves the
    /// reserve as the Check charged it.
    pub(crate) async fn apply(&self, settlements: Vec<Settlement>, now_s: i64) {
        for s in settlements {
            let hold = Hold {
                id: &s.id,
                bucket: &s.bucket,
                limits: &s.limits,
                reserve: s.reserve,
                at: s.at,
                until: s.at,
            };
            let mut settled = self.quota.settle(&hold, s.used).await;
            for wait in RETRIES {
                if settled.is_ok() {
                    break;
                }
                tokio::time::sleep(wait).await;
                settled = self.quota.settle(&hold, s.used).await;
            }
            let result = match settled {
                Err(e) => {
                    if self.warned.allow(now_s) {
                        tracing::warn!(error = %e, "token quota settlement failed after retries; the reserve stays counted until its hold times out, then the call counts 0 there");
                    }
                    "error"
                }
                Ok(Settled::Released) => "late",
                Ok(Settled::Held) if s.reported => "settled",
                Ok(Settled::Held) if s.used == s.reserve => "kept",
                Ok(Settled::Held) => "refunded",
            };
            self.results.with_label_values(&[result]).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::parse;
    use crate::source::Source;

    const CATALOG: &str = "
products:
  - name: llm
    quota: {limit: 5000, unit: day, counts: genai:total_tokens, reserve: 500}
    operations:
      - {api: ai, name: chat, paths: [/chat]}
      - {api: ai, name: embed, paths: [/embed], quota: {limit: 100, unit: minute}}
";

    fn record(operation: &str, reserved: u64, usage: Option<u64>, status: u32) -> UsageRecord {
        UsageRecord {
            decision: "allow".into(),
            app: "app".into(),
            product: "llm".into(),
            operation: operation.into(),
            response_code: status,
            start_ms: 86_400_500,
            quota_reserved: reserved,
            usage: usage
                .map(|n| [("genai:total_tokens".to_owned(), n)].into())
                .unwrap_or_default(),
            ..UsageRecord::default()
        }
    }

    #[test]
    fn a_reserve_settles_to_what_the_response_reported() {
        let catalog = parse(&Source::from_text("c.yaml", CATALOG.to_owned())).unwrap();
        let s = settlement(&record("chat", 500, Some(730), 200), &catalog, 0).unwrap();
        assert_eq!(s.bucket, "app\u{1f}llm");
        assert_eq!(
            (s.reserve, s.used, s.at, s.reported),
            (500, 730, 86_400, true)
        );
        let kept = settlement(&record("chat", 500, None, 200), &catalog, 0).unwrap();
        assert_eq!((kept.used, kept.reported), (500, false));
        let failed = settlement(&record("chat", 500, None, 502), &catalog, 0).unwrap();
        assert_eq!(failed.used, 0);
    }

    #[test]
    fn only_reserving_allowed_calls_under_a_token_quota_settle() {
        let catalog = parse(&Source::from_text("c.yaml", CATALOG.to_owned())).unwrap();
        assert_eq!(
            settlement(&record("chat", 0, Some(10), 200), &catalog, 0),
            None
        );
        let mut denied = record("chat", 500, Some(10), 200);
        denied.decision = "deny".into();
        assert_eq!(settlement(&denied, &catalog, 0), None);
        // The operation's own quota counts calls: nothing to settle even if a reserve were claimed.
        assert_eq!(
            settlement(&record("embed", 500, Some(10), 200), &catalog, 0),
            None
        );
        assert_eq!(
            settlement(&record("gone", 500, Some(10), 200), &catalog, 0),
            None
        );
    }
}
