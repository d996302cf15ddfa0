//! Entitlement: what the identified caller is, in the catalog, and which products it may use.

use std::borrow::Cow;

use crate::catalog::{App, Catalog, ProductId, Status, Subscription, SubscriptionStatus};
use crate::check::buckets::Owner;
use crate::check::decision::Identity;
use crate::check::message::missing_credential_message;
use crate::check::{Reason, Settings};
use crate::identity::Caller;
use crate::identity::api_key::KeyHash;
use crate::identity::jwt::{JwtRejection, VerifiedToken};
use crate::paywall::access::{Access, access};

/// Who a request's credential resolved to in the catalog, and what it may use.
pub(crate) struct Entitled<'a> {
    pub(crate) identity: Identity<'a>,
    /// Names the caller in messages and starts its quota buckets.
    pub(crate) owner: Owner<'a>,
    pub(crate) subscriptions: Cow<'a, [Subscription]>,
    /// Scopes of a token caller; `None` for API keys, which products do not scope-check.
    pub(crate) scopes: Option<&'a [String]>,
    /// The Stripe customer whose subscriptions decide the products sold through Stripe.
    pub(crate) customer: Option<&'a str>,
}

/// Resolves the caller to its identity and subscriptions, or says why it is refused. `known` receives the
/// identity as far as it is known before a refusal, for metadata.
pub(crate) fn entitle<'a>(
    caller: &'a Caller<'a>,
    catalog: &'a Catalog,
    settings: &Settings,
    now: i64,
    known: &mut Identity<'a>,
) -> Result<Entitled<'a>, (Reason, String)> {
    let app_identity = |app: &'a App| {
        let developer = catalog.developer(app.developer);
        Identity {
            app: Some(&app.name),
            developer: developer.map(|d| d.email.as_str()),
            company: developer.and_then(|d| d.company.as_deref()),
            stripe_customer: developer.and_then(|d| d.stripe_customer.as_deref()),
            product: None,
            operation: None,
            attributes: None,
        }
    };
    let (app, scopes) = match caller {
        Caller::Nothing => {
            return Err((
                Reason::MissingCredential,
                missing_credential_message(settings),
            ));
        }
        Caller::ApiKey { key, .. } => {
            let not_valid = || (Reason::UnknownKey, "API key is not valid".to_owned());
            let key = catalog.key(&KeyHash::of(key)).ok_or_else(not_valid)?;
            let app = catalog.app(key.app).ok_or_else(not_valid)?;
            *known = app_identity(app);
            if key.status == Status::Revoked {
                return Err((Reason::RevokedKey, "API key is revoked".into()));
            }
            if key.expires_at.is_some_and(|t| t <= now) {
                return Err((Reason::ExpiredKey, "API key has expired".into()));
            }
            (app, None)
        }
        Caller::Token(Err(rejection)) => {
            let reason = match rejection {
                JwtRejection::KeysUnavailable => Reason::KeysUnavailable,
                _ => Reason::InvalidToken,
            };
            return Err((reason, rejection.to_string()));
        }
        Caller::Token(Ok(token)) => {
            let registered = token
                .app
                .as_deref()
                .and_then(|client_id| catalog.app_by_client_id(client_id))
                .and_then(|id| catalog.app(id));
            match (registered, token.app.is_some()) {
                (Some(app), _) => {
                    *known = app_identity(app);
                    (app, Some(token.scopes.as_slice()))
                }
                // Only a provider that issues portal tokens may entitle a caller the catalog does not know.
                (None, named_app) if !token.portal => {
                    let message = if named_app {
                        "token's app is not registered"
                    } else {
                        "token names no registered app and its issuer does not issue portal tokens"
                    };
                    return Err((Reason::UnknownApp, message.to_owned()));
                }
                // A token naming an app the catalog does not know is refused, unless its products claim
                // entitles it as a portal token.
                (None, true) if token.products.is_empty() => {
                    return Err((
                        Reason::UnknownApp,
                        "token's app is not registered".to_owned(),
                    ));
                }
                (None, _) => return account(token, catalog, settings, now, known),
            }
        }
    };
    if app.status == Status::Revoked {
        return Err((Reason::AppRevoked, format!("app {} is revoked", app.name)));
    }
    let customer = known.stripe_customer;
    Ok(Entitled {
        identity: known.clone(),
        owner: Owner::App(&app.name),
        subscriptions: with_stripe(
            catalog,
            Cow::Borrowed(&app.products),
            customer,
            true,
            now,
            settings.stripe_grace,
        ),
        scopes,
        customer,
    })
}

/// The subscriptions as Stripe leaves them (CONTRACT §8): an approved (or, for an app, absent) subscription to
/// a product sold through Stripe holds only while the customer's Stripe subscription to it is in force; an
/// explicit `pending` or `revoked` one still holds or revokes. Without products sold through Stripe the list is
/// borrowed as it is.
fn with_stripe<'a>(
    catalog: &'a Catalog,
    listed: Cow<'a, [Subscription]>,
    customer: Option<&str>,
    add_unlisted: bool,
    now: i64,
    grace: i64,
) -> Cow<'a, [Subscription]> {
    let sold = catalog.sold_through_stripe();
    if sold.is_empty() {
        return listed;
    }
    let paid = customer.map_or(&[][..], |c| catalog.paid_subscriptions(c));
    let status_of = |product: ProductId| {
        let prices = catalog
            .product(product)
            .map_or(&[][..], |p| &p.stripe_prices);
        match access(paid, prices, now, grace) {
            Access::Granted(_) => SubscriptionStatus::Approved,
            Access::PaymentRequired(_) => SubscriptionStatus::PaymentRequired,
            Access::NotSubscribed(_) => SubscriptionStatus::Unsubscribed,
        }
    };
    let mut out: Vec<Subscription> = listed
        .iter()
        .map(|s| match s.status {
            SubscriptionStatus::Approved if sold.contains(&s.product) => Subscription {
                product: s.product,
                status: status_of(s.product),
            },
            _ => *s,
        })
        .collect();
    if add_unlisted {
        for &product in sold {
            if !listed.iter().any(|s| s.product == product) {
                out.push(Subscription {
                    product,
                    status: status_of(product),
                });
            }
        }
    }
    Cow::Owned(out)
}

/// A portal token with no catalog app: its `products` claim entitles it, and its company (else developer) owns
/// the quota and the usage. The Stripe customer comes from the token when its provider is trusted with it
/// (`stripe_customer_from_token`), else from the catalog developer whose e-mail is the token's developer.
fn account<'a>(
    token: &'a VerifiedToken,
    catalog: &'a Catalog,
    settings: &Settings,
    now: i64,
    known: &mut Identity<'a>,
) -> Result<Entitled<'a>, (Reason, String)> {
    let developer = token.developer.as_deref();
    let listed = developer.and_then(|d| catalog.developer_by_email(d));
    *known = Identity {
        app: None,
        developer,
        company: token
            .company
            .as_deref()
            .or(listed.and_then(|d| d.company.as_deref())),
        stripe_customer: token
            .stripe_customer
            .as_deref()
            .or(listed.and_then(|d| d.stripe_customer.as_deref())),
        product: None,
        operation: None,
        attributes: None,
    };
    let Some(owner) = known.company.or(developer) else {
        return Err((
            Reason::InvalidToken,
            "token names no app, developer or company".into(),
        ));
    };
    if token.products.is_empty() {
        return Err((Reason::NoProduct, "token grants no products".into()));
    }
    let subscriptions = token
        .products
        .iter()
        .filter_map(|name| catalog.product_id(name))
        .map(|product| Subscription {
            product,
            status: SubscriptionStatus::Approved,
        })
        .collect();
    let customer = known.stripe_customer;
    Ok(Entitled {
        identity: known.clone(),
        owner: Owner::Account(owner),
        subscriptions: with_stripe(
            catalog,
            Cow::Owned(subscriptions),
            customer,
            false,
            now,
            settings.stripe_grace,
        ),
        scopes: Some(&token.scopes),
        customer,
    })
}
