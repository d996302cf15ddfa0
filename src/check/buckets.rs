//! Whose quota counters a call spends, and the bucket names they live under in the quota store.

use crate::catalog::{App, Catalog, Subscription, SubscriptionStatus};
use crate::quota::Limit;

/// Whose quota a call spends.
#[derive(Clone, Copy)]
pub(crate) enum Owner<'a> {
    /// A catalog app.
    App(&'a str),
    /// A portal token's company or developer, with no catalog app.
    Account(&'a str),
}

impl Owner<'_> {
    /// How messages name the owner: `app NAME` or `account NAME`.
    pub(crate) fn label(&self) -> String {
        match self {
            Owner::App(name) => format!("app {name}"),
            Owner::Account(name) => format!("account {name}"),
        }
    }

    /// The bucket prefix, as a mark and the name. Accounts start with a record separator, which no app name
    /// written in YAML carries, so an account can never share an app's counters.
    fn bucket(&self) -> (&'static str, &str) {
        match self {
            Owner::App(name) => ("", name),
            Owner::Account(name) => ("\u{1e}", name),
        }
    }
}

/// The quota store's bucket of `owner`'s counters for a product, or for one of its operations that has a
/// quota of its own.
pub(crate) fn bucket_key(owner: Owner<'_>, product: &str, operation: Option<&str>) -> String {
    // Every charged Check builds one: written at its final size, not formatted (which grew it twice).
    const UNIT: char = '\u{1f}';
    let (mark, name) = owner.bucket();
    let len = mark.len() + name.len() + 1 + product.len() + operation.map_or(0, |o| 1 + o.len());
    let mut key = String::with_capacity(len);
    key.push_str(mark);
    key.push_str(name);
    key.push(UNIT);
    key.push_str(product);
    if let Some(operation) = operation {
        key.push(UNIT);
        key.push_str(operation);
    }
    key
}

/// One quota counter an app spends: a product's quota, or an operation's own.
#[derive(Debug, Clone)]
pub struct AppQuota<'a> {
    /// The product.
    pub product: &'a str,
    /// The operation (or its `quota_group`), when the counter is its own quota.
    pub operation: Option<&'a str>,
    /// The quota store's bucket.
    pub bucket: String,
    /// The limits charged on it.
    pub limits: &'a [Limit],
}

/// Every quota counter `app` spends, product by product in catalog order: for each approved subscription, the
/// product's quota (when some operation falls back to it) and each operation's own quota.
pub fn app_quotas<'a>(catalog: &'a Catalog, app: &'a App) -> Vec<AppQuota<'a>> {
    owner_quotas(catalog, Owner::App(&app.name), &app.products)
}

/// Every quota counter `owner` spends through `subscriptions` (the approved ones), product by product in
/// their order: as [`app_quotas`], for an app or a portal account, with subscriptions as the Check sees them.
pub(crate) fn owner_quotas<'a>(
    catalog: &'a Catalog,
    owner: Owner<'_>,
    subscriptions: &[Subscription],
) -> Vec<AppQuota<'a>> {
    let mut quotas = Vec::new();
    for subscription in subscriptions {
        if subscription.status != SubscriptionStatus::Approved {
            continue;
        }
        let Some(product) = catalog.product(subscription.product) else {
            continue;
        };
        if !product.quota.is_empty() && product.operations.iter().any(|o| o.quota.is_none()) {
            quotas.push(AppQuota {
                product: &product.name,
                operation: None,
                bucket: bucket_key(owner, &product.name, None),
                limits: &product.quota,
            });
        }
        for (i, operation) in product.operations.iter().enumerate() {
            let grouped_before = product.operations[..i]
                .iter()
                .any(|o| o.quota_group.is_some() && o.quota_group == operation.quota_group);
            if let Some(limits) = operation.quota.as_deref().filter(|l| !l.is_empty())
                && !grouped_before
            {
                quotas.push(AppQuota {
                    product: &product.name,
                    operation: Some(operation.counter()),
                    bucket: bucket_key(owner, &product.name, Some(operation.counter())),
                    limits,
                });
            }
        }
    }
    quotas
}
