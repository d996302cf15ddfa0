//! Top-ups through Stripe: an `invoice.paid` whose lines carry a price some product lists in
//! `stripe_credit_prices` adds that many credits per unit to the owner of the invoice's customer.
//!
//! Each line is granted once whatever Stripe retries: the grant's source is `stripe:<invoice>:<line>`. The
//! webhook grants before it answers and before it de-duplicates the event, so a delivery whose grant failed
//! (ledger down: 503) is granted when Stripe delivers it again, and a delivery seen before changes nothing.

use serde::Deserialize;

use crate::catalog::Catalog;
use crate::credits::Credits;
use crate::credits::catalog::owner as credit_owner;
use crate::credits::ledger::{GrantInput, Granted};
use crate::paywall::event::Expandable;
use crate::state::StoreError;

/// Largest top-up one invoice line may add (a quantity typo must not mint unbounded credits).
const MAX_LINE_CREDITS: u64 = 1_000_000_000_000;

/// A paid invoice, as far as top-ups read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaidInvoice {
    /// `in_…`.
    pub id: String,
    /// `cus_…`.
    pub customer: String,
    /// Its lines (the first page Stripe put in the event).
    pub lines: Vec<PaidLine>,
    /// Stripe left lines out of the event (more than fit on the first page).
    pub more_lines: bool,
}

/// One line of a paid invoice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaidLine {
    /// `il_…`.
    pub id: String,
    /// `price_…`.
    pub price: String,
    /// Units bought.
    pub quantity: u64,
}

/// Why a top-up could not be granted; the webhook answers non-2xx so that Stripe delivers it again.
#[derive(Debug, thiserror::Error)]
pub enum TopUpError {
    /// No developer has the invoice's customer: nobody to credit yet.
    #[error(
        "no developer has Stripe customer {0}: credits bought on its invoices wait until one does"
    )]
    NoOwner(String),
    /// The ledger failed.
    #[error("credit ledger unavailable: {0}")]
    Ledger(#[from] StoreError),
}

#[derive(Deserialize)]
struct RawEvent {
    #[serde(rename = "type")]
    kind: String,
    data: RawData,
}

#[derive(Deserialize)]
struct RawData {
    object: RawInvoice,
}

#[derive(Deserialize)]
struct RawInvoice {
    id: String,
    customer: Option<Expandable>,
    lines: Option<RawLines>,
}

#[derive(Deserialize)]
struct RawLines {
    data: Vec<RawLine>,
    #[serde(default)]
    has_more: bool,
}

#[derive(Deserialize)]
struct RawLine {
    id: String,
    quantity: Option<u64>,
    /// Where API versions since 2025-03-31 name the price.
    pricing: Option<RawPricing>,
    /// Where older versions named it.
    price: Option<Expandable>,
}

#[derive(Deserialize)]
struct RawPricing {
    price_details: Option<RawPriceDetails>,
}

#[derive(Deserialize)]
struct RawPriceDetails {
    price: Expandable,
}

/// The paid invoice of a verified `invoice.paid` body (`None` for other events and unreadable bodies, which
/// the paywall's own reading reports).
pub fn paid_invoice(body: &[u8]) -> Option<PaidInvoice> {
    let event: RawEvent = serde_json::from_slice(body).ok()?;
    if event.kind != "invoice.paid" {
        return None;
    }
    let invoice = event.data.object;
    let lines = invoice.lines?;
    Some(PaidInvoice {
        id: invoice.id,
        customer: invoice.customer?.id(),
        lines: lines
            .data
            .into_iter()
            .filter_map(|line| {
                let price = line
                    .pricing
                    .and_then(|p| p.price_details)
                    .map(|d| d.price)
                    .or(line.price)?;
                Some(PaidLine {
                    id: line.id,
                    price: price.id(),
                    quantity: line.quantity.unwrap_or(1),
                })
            })
            .collect(),
        more_lines: lines.has_more,
    })
}

/// Grants the credits `invoice` bought, once per line; returns the credits newly granted.
pub async fn grant(
    credits: &Credits,
    catalog: &Catalog,
    invoice: &PaidInvoice,
    now: i64,
) -> Result<u64, TopUpError> {
    let bought: Vec<(&PaidLine, u64)> = invoice
        .lines
        .iter()
        .filter_map(|line| {
            let per_unit = catalog.credit_price(&line.price)?;
            let bought = per_unit.saturating_mul(line.quantity);
            if bought > MAX_LINE_CREDITS {
                tracing::error!(invoice = %invoice.id, line = %line.id, bought, granted = MAX_LINE_CREDITS,
                    "an invoice line buys more credits than one grant adds: the rest must be granted through \
                     POST /v1/credits");
            }
            Some((line, bought.min(MAX_LINE_CREDITS)))
        })
        .filter(|(_, amount)| *amount > 0)
        .collect();
    if invoice.more_lines {
        tracing::warn!(invoice = %invoice.id,
            "invoice has more lines than its event carries: credit prices beyond the first page are not granted");
    }
    if bought.is_empty() {
        return Ok(0);
    }
    let mut owners: Vec<&str> = catalog
        .developers()
        .filter(|d| d.stripe_customer.as_deref() == Some(invoice.customer.as_str()))
        .filter_map(|d| credit_owner(d.company.as_deref(), Some(&d.email)))
        .collect();
    owners.sort_unstable();
    owners.dedup();
    let Some(owner) = owners.first().copied() else {
        return Err(TopUpError::NoOwner(invoice.customer.clone()));
    };
    if owners.len() > 1 {
        tracing::warn!(customer = %invoice.customer, owner, others = owners.len() - 1,
            "several owners share this Stripe customer: top-ups go to the first by name");
    }
    let mut added = 0u64;
    for (line, amount) in bought {
        let source = format!("stripe:{}:{}", invoice.id, line.id);
        let reason = format!(
            "Stripe invoice {}: {} × {}",
            invoice.id, line.quantity, line.price
        );
        let input = GrantInput {
            owner,
            amount: i64::try_from(amount).unwrap_or(i64::MAX),
            reason: &reason,
            source: &source,
            low_balance: credits.options().low_balance,
            now,
        };
        if let Granted::New(balance) = credits.ledger().grant(&input).await? {
            added = added.saturating_add(amount);
            tracing::info!(owner, invoice = %invoice.id, line = %line.id, credits = amount,
                balance = balance.balance, "credits bought through Stripe");
        }
    }
    if added > 0 {
        credits.granted(owner);
        credits
            .metrics()
            .granted
            .with_label_values(&["stripe"])
            .inc_by(added);
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paid_invoices_name_each_lines_price_and_quantity() {
        let body = serde_json::json!({"id": "evt_1", "type": "invoice.paid", "data": {"object": {
        "id": "in_1", "object": "invoice", "customer": "cus_1",
        "lines": {"object": "list", "has_more": false, "data": [
            {"id": "il_1", "quantity": 3,
             "pricing": {"type": "price_details", "price_details": {"price": "price_topup", "product": "prod_1"}}},
            {"id": "il_2", "price": {"id": "price_legacy"}},
            {"id": "il_3", "quantity": 1, "pricing": {"type": "price_details", "price_details": null}},
        ]}}}});
        let invoice = paid_invoice(body.to_string().as_bytes()).expect("an invoice.paid");
        assert_eq!(invoice.id, "in_1");
        assert_eq!(invoice.customer, "cus_1");
        assert_eq!(
            invoice.lines,
            vec![
                PaidLine {
                    id: "il_1".into(),
                    price: "price_topup".into(),
                    quantity: 3
                },
                PaidLine {
                    id: "il_2".into(),
                    price: "price_legacy".into(),
                    quantity: 1
                },
            ]
        );
        let failed = body
            .to_string()
            .replace("invoice.paid", "invoice.payment_failed");
        assert_eq!(paid_invoice(failed.as_bytes()), None);
        assert_eq!(paid_invoice(b"not json"), None);
    }
}
