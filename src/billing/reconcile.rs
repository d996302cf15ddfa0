//! `tollgate billing reconcile`: Stripe's meter event summaries per (customer, meter) against what this
//! tollgate's sent ledger says Stripe confirmed, over minute-aligned `[since, until)`.
//!
//! It reads only `<metering dir>/billing/sent.jsonl`, so it runs beside a serving tollgate. The customers
//! compared are the ones the ledger knows (Stripe cannot list a meter's customers); with several replicas,
//! each with its own metering folder, Stripe holds their sum and each folder alone reads as a mismatch.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::client::StripeClient;
use super::config::StripeConfig;
use super::{BillingError, ledger, state_dir};

/// One (customer, meter) line of the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReconcileRow {
    /// Stripe customer.
    pub stripe_customer: String,
    /// Meter event name.
    pub event_name: String,
    /// Stripe's meter id, if Stripe has a meter for the event name.
    pub meter_id: Option<String>,
    /// What tollgate's ledger says Stripe confirmed.
    pub local: u64,
    /// Stripe's aggregated value (0 without a meter).
    pub stripe: f64,
}

impl ReconcileRow {
    /// Whether Stripe and tollgate agree.
    pub fn agrees(&self) -> bool {
        self.meter_id.is_some() && (self.stripe - self.local as f64).abs() < 1e-6
    }
}

/// The result of a reconciliation; `Display` prints the table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReconcileReport {
    /// Start (inclusive), Unix seconds, minute-aligned.
    pub start: i64,
    /// End (exclusive), Unix seconds, minute-aligned.
    pub end: i64,
    /// One line per (customer, meter), sorted.
    pub rows: Vec<ReconcileRow>,
}

impl ReconcileReport {
    /// The lines where Stripe and tollgate disagree (non-empty: exit non-zero).
    pub fn mismatches(&self) -> Vec<&ReconcileRow> {
        self.rows.iter().filter(|r| !r.agrees()).collect()
    }
}

impl fmt::Display for ReconcileReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let when = |s: i64| {
            DateTime::from_timestamp(s, 0)
                .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_else(|| s.to_string())
        };
        writeln!(
            f,
            "Stripe vs tollgate, {} .. {}",
            when(self.start),
            when(self.end)
        )?;
        if self.rows.is_empty() {
            return writeln!(f, "no meter events were confirmed by Stripe in this period");
        }
        let cw = self
            .rows
            .iter()
            .map(|r| r.stripe_customer.len())
            .max()
            .unwrap_or(0)
            .max(8);
        let mw = self
            .rows
            .iter()
            .map(|r| r.event_name.len())
            .max()
            .unwrap_or(0)
            .max(5);
        writeln!(
            f,
            "{:<cw$}  {:<mw$}  {:>14}  {:>14}  {:>14}  status",
            "customer", "meter", "tollgate", "stripe", "difference"
        )?;
        for r in &self.rows {
            let status = match (&r.meter_id, r.agrees()) {
                (None, _) => "MISMATCH (no Stripe meter for this event name)",
                (Some(_), true) => "ok",
                (Some(_), false) => "MISMATCH",
            };
            writeln!(
                f,
                "{:<cw$}  {:<mw$}  {:>14}  {:>14}  {:>14}  {status}",
                r.stripe_customer,
                r.event_name,
                r.local,
                number(r.stripe),
                number(r.stripe - r.local as f64),
            )?;
        }
        let bad = self.mismatches().len();
        if bad == 0 {
            writeln!(f, "all {} agree", self.rows.len())
        } else {
            writeln!(f, "{bad} of {} disagree", self.rows.len())
        }
    }
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 9e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.3}")
    }
}

/// Compares Stripe's event summaries with the sent ledger of `metering_dir` over `[since, until)`, widened to
/// whole minutes (Stripe's summaries are minute-aligned).
pub async fn reconcile(
    config: &StripeConfig,
    metering_dir: &Path,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<ReconcileReport, BillingError> {
    config.validate().map_err(BillingError::Config)?;
    let start = since.timestamp().div_euclid(60) * 60;
    let end = (until.timestamp() + 59).div_euclid(60) * 60;
    if end <= start {
        return Err(BillingError::Config(
            "reconcile: --until must be after --since".into(),
        ));
    }
    let mut local: BTreeMap<(String, String), u64> = BTreeMap::new();
    for row in ledger::read(&state_dir(metering_dir))? {
        let ts = row.window_start_ms.div_euclid(1_000);
        if (start..end).contains(&ts) {
            *local
                .entry((row.stripe_customer, row.event_name))
                .or_default() += row.value;
        }
    }
    let client = StripeClient::new(config)?;
    let meters: BTreeMap<String, String> = if local.is_empty() {
        BTreeMap::new()
    } else {
        client
            .list_meters()
            .await?
            .into_iter()
            .map(|m| (m.event_name, m.id))
            .collect()
    };
    let mut rows = Vec::with_capacity(local.len());
    for ((customer, event_name), sent) in local {
        let meter_id = meters.get(&event_name).cloned();
        let stripe = match &meter_id {
            Some(id) => client.summary_total(id, &customer, start, end).await?,
            None => 0.0,
        };
        rows.push(ReconcileRow {
            stripe_customer: customer,
            event_name,
            meter_id,
            local: sent,
            stripe,
        });
    }
    Ok(ReconcileReport { start, end, rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_mismatches() {
        let report = ReconcileReport {
            start: 1_767_225_600,
            end: 1_767_229_200,
            rows: vec![
                ReconcileRow {
                    stripe_customer: "cus_A".into(),
                    event_name: "calls".into(),
                    meter_id: Some("mtr_1".into()),
                    local: 10,
                    stripe: 10.0,
                },
                ReconcileRow {
                    stripe_customer: "cus_B".into(),
                    event_name: "calls".into(),
                    meter_id: Some("mtr_1".into()),
                    local: 4,
                    stripe: 7.0,
                },
                ReconcileRow {
                    stripe_customer: "cus_B".into(),
                    event_name: "tokens".into(),
                    meter_id: None,
                    local: 0,
                    stripe: 0.0,
                },
            ],
        };
        let bad: Vec<_> = report
            .mismatches()
            .iter()
            .map(|r| r.event_name.clone())
            .collect();
        assert_eq!(bad, ["calls", "tokens"]);
        let text = report.to_string();
        assert!(text.contains("2026-01-01T00:00:00Z"), "{text}");
        assert!(text.contains("cus_B     calls"), "{text}");
        assert!(text.contains("2 of 3 disagree"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("cus_A") && l.ends_with("ok")),
            "{text}"
        );
    }
}
