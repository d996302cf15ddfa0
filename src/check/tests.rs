//! The decision table, row by row, against a small catalog: no server, no store.
//!
//! Test-only: the parent declares this file under `#[cfg(test)]`, so a failed unwrap here fails a test.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::catalog::{Catalog, parse};
use crate::check::buckets::app_quotas;
use crate::check::decision::{Decision, Identity, QuotaAnswer};
use crate::check::plan::{Plan, host_of, plan};
use crate::check::{MetadataMode, OnStoreError, RateLimitHeaders, Reason, Request, Settings};
use crate::identity::jwt::{JwtRejection, VerifiedToken};
use crate::identity::{ApiKeyConfig, Caller};
use crate::quota::{LimitState, Outcome};
use crate::source::Source;

const NOW: i64 = 1_795_000_000;

const CATALOG: &str = "\
products:
  - name: free
    quota: {limit: 2, unit: minute}
    attributes: {tier: free}
    operations:
      - {api: weather, paths: [/forecast], methods: [GET]}
      - {api: weather, name: bulk, paths: [/bulk/**], quota: {limit: 100, unit: day}, cost: 10, attributes: {deprecated: 'true'}}
  - name: open
    operations: [{api: status.example.com, paths: [/]}]
  - name: prodonly
    environments: [prod]
    operations: [{api: weather, paths: [/prod]}]
  - name: pending
    approval: manual
    operations: [{api: weather, paths: [/pending]}]
  - name: revoked
    operations: [{api: weather, paths: [/revoked]}]
  - name: scoped
    scopes: [admin]
    operations: [{api: weather, paths: [/scoped]}]
  - name: prepaid
    prepaid: {cost: 2, refill: {amount: 50, every: month}}
    stripe_credit_prices: {price_topup: 1000}
    operations:
      - {api: weather, name: dear, paths: [/credits/dear], prepaid: {cost: 5}}
      - {api: weather, name: gratis, paths: [/credits/free], prepaid: {cost: 0}}
      - {api: weather, name: plain, paths: [/credits/**]}
  - name: grouped
    operations:
      - {api: weather, name: read, paths: [/pets], methods: [GET], quota: {limit: 7, unit: day}, quota_group: pets}
      - {api: weather, name: write, paths: [/pets], methods: [POST], quota: {limit: 7, unit: day}, quota_group: pets}
  - name: prepaid_quota
    prepaid: {cost: 1}
    quota: {limit: 3, unit: minute}
    operations: [{api: weather, paths: [/both]}]
developers:
  - email: ntesla@theremin.com
    company: theremin
    stripe_customer: cus_1
    apps:
      - name: weatherapp
        client_id: weatherapp-client
        products: [{name: free}, {name: open}, {name: prodonly}, {name: pending}, {name: revoked, status: revoked}, {name: scoped}, {name: grouped}]
        keys:
          - {hash: 'sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'}
          - {hash: 'sha256:3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d', status: revoked}
          - {hash: 'sha256:2e7d2c03a9507ae265ecf5b5356885a53393a2029d241394997265a1a25aefc6', expires_at: 2020-01-01T00:00:00Z}
      - name: banned
        client_id: banned-client
        status: revoked
        products: [{name: free}]
        keys: [{hash: 'sha256:18ac3e7343f016890c510e93f935261169d9e3f565436429830faf0934f4f8e4'}]
  - email: solo@example.com
    apps:
      - name: prepaidapp
        products: [{name: prepaid}, {name: prepaid_quota}]
        keys: [{hash: 'sha256:3f79bb7b435b05321651daefd374cdc681dc06faa65e374e38337b88ca046dea'}]
";
// Keys: "abc" (good), "b" (revoked), "c" (expired), "d" (app revoked), "e" (prepaid, no company).

struct World {
    catalog: Catalog,
    settings: Settings,
}

fn world() -> World {
    World {
        catalog: parse(&Source::from_text("c.yaml", CATALOG.to_owned())).unwrap(), // invariant: test-only module, fixed catalog
        settings: Settings {
            environment: Some("test".into()),
            api_context_extension: Some("tollgate_api".into()),
            api_host_fallback: false,
            api_key: ApiKeyConfig::default(),
            on_store_error: OnStoreError::Deny,
            on_store_error_by_api: HashMap::new(),
            bearer: false,
            upstream_identity_headers: true,
            stripe_grace: 100,
            self_service: None,
            metadata_attributes: Vec::new(),
            hold_timeout: 600,
            ratelimit_headers: RateLimitHeaders::Always,
            metadata: MetadataMode::Full,
        },
    }
}

static NO_HEADERS: std::sync::LazyLock<HashMap<String, String>> =
    std::sync::LazyLock::new(HashMap::new);

/// The caller presenting API key `key` in the x-api-key header (or nothing).
fn headers(key: Option<&str>) -> Caller<'static> {
    match key {
        Some(k) => Caller::ApiKey {
            key: Cow::Owned(k.to_owned()),
        },
        None => Caller::Nothing,
    }
}

fn token(app: Option<&str>, products: &[&str], scopes: &[&str]) -> Caller<'static> {
    Caller::Token(Ok(std::sync::Arc::new(VerifiedToken {
        provider: "portal".into(),
        subject: Some("dev@portal".into()),
        developer: Some("dev@portal".into()),
        app: app.map(str::to_owned),
        company: Some("acme".into()),
        products: products.iter().map(|p| (*p).to_owned()).collect(),
        scopes: scopes.iter().map(|p| (*p).to_owned()).collect(),
        stripe_customer: None,
        portal: true,
        expires_at: NOW + 60,
    })))
}

fn ext(api: &str) -> HashMap<String, String> {
    [("tollgate_api".to_owned(), api.to_owned())]
        .into_iter()
        .collect()
}

fn decide_now<'a>(
    w: &'a World,
    method: &'a str,
    path: &'a str,
    caller: &'a Caller<'a>,
    e: &'a HashMap<String, String>,
) -> Plan<'a> {
    let request = Request {
        method,
        path,
        authority: "status.example.com:8443",
        headers: &*NO_HEADERS,
        context_extensions: e,
    };
    plan(&request, caller, &w.catalog, &w.settings, NOW)
}

fn decided(p: Plan<'_>) -> Decision<'_> {
    match p {
        Plan::Decided(d) => d,
        Plan::Charge(c) => panic!(
            "expected a decision, got a charge for {}",
            c.charge(NOW).bucket
        ),
    }
}

#[test]
fn credential_rows_of_the_decision_table() {
    let w = world();
    let e = ext("weather");
    let cases = [
        (
            None,
            Reason::MissingCredential,
            "no credential: send an API key in the x-api-key header or an API key in the apikey query parameter",
        ),
        (Some("nope"), Reason::UnknownKey, "API key is not valid"),
        (Some("b"), Reason::RevokedKey, "API key is revoked"),
        (Some("c"), Reason::ExpiredKey, "API key has expired"),
        (Some("d"), Reason::AppRevoked, "app banned is revoked"),
    ];
    for (key, reason, message) in cases {
        let h = headers(key);
        let d = decided(decide_now(&w, "GET", "/forecast", &h, &e));
        assert_eq!(
            (d.reason, d.message.as_str()),
            (reason, message),
            "key {key:?}"
        );
        assert!(!d.message.contains("nope"));
    }
    assert_eq!(Reason::MissingCredential.http_status(), 401);
    assert_eq!(Reason::AppRevoked.http_status(), 403);
}

#[test]
fn entitlement_rows_of_the_decision_table() {
    let w = world();
    let h = headers(Some("abc"));
    let e = ext("weather");
    let cases = [
        (
            "GET",
            "/admin",
            Reason::NoProduct,
            "app weatherapp has no product for GET /admin on API weather",
        ),
        (
            "POST",
            "/forecast",
            Reason::NoProduct,
            "app weatherapp has no product for POST /forecast on API weather",
        ),
        (
            "GET",
            "/prod",
            Reason::ProductNotOffered,
            "product prodonly is not offered in environment test",
        ),
        (
            "GET",
            "/pending",
            Reason::ProductPending,
            "app weatherapp's subscription to product pending is pending approval",
        ),
        (
            "GET",
            "/revoked",
            Reason::ProductRevoked,
            "app weatherapp's subscription to product revoked is revoked",
        ),
        ("GET", "/a/../forecast", Reason::BadPath, ""),
    ];
    for (method, path, reason, message) in cases {
        let d = decided(decide_now(&w, method, path, &h, &e));
        assert_eq!(d.reason, reason, "{method} {path}");
        assert!(
            d.message.starts_with(message),
            "{method} {path}: {}",
            d.message
        );
        assert_eq!(d.reason.http_status() / 100, 4);
    }
}

#[test]
fn an_allowed_request_carries_identity_and_a_charge() {
    let w = world();
    let h = headers(Some("abc"));
    let e = ext("weather");
    let Plan::Charge(pending) = decide_now(&w, "GET", "/forecast?apikey=zzz&x=1", &h, &e) else {
        panic!("expected a charge");
    };
    let charge = pending.charge(NOW);
    assert_eq!(charge.bucket, "weatherapp\u{1f}free");
    assert_eq!(charge.cost, 1);
    let d = pending.finish(QuotaAnswer::Store(Outcome::Allowed(LimitState {
        limit: 2,
        remaining: 1,
        reset_secs: 20,
    })));
    assert!(d.allowed());
    assert_eq!(
        d.identity,
        Identity {
            app: Some("weatherapp"),
            developer: Some("ntesla@theremin.com"),
            company: Some("theremin"),
            stripe_customer: Some("cus_1"),
            product: Some("free"),
            operation: Some("weather GET /forecast"),
            attributes: w.catalog.products()[0].operations[0]
                .attributes
                .as_ref()
                .into(),
        }
    );
    let tier = d.identity.attributes.and_then(|a| a.get("tier"));
    assert_eq!(tier.map(String::as_str), Some("free"));
    assert_eq!(d.environment, Some("test"));
}

#[test]
fn app_quotas_name_exactly_the_buckets_that_calls_charge() {
    let w = world();
    let app = w.catalog.app_by_name("weatherapp").expect("weatherapp"); // invariant: test-only module
    let quotas = app_quotas(&w.catalog, app);
    let listed: Vec<(&str, Option<&str>, &str, u64)> = quotas
        .iter()
        .map(|q| (q.product, q.operation, q.bucket.as_str(), q.limits[0].limit))
        .collect();
    assert_eq!(
        listed,
        [
            ("free", None, "weatherapp\u{1f}free", 2),
            ("free", Some("bulk"), "weatherapp\u{1f}free\u{1f}bulk", 100),
            (
                "grouped",
                Some("pets"),
                "weatherapp\u{1f}grouped\u{1f}pets",
                7
            ),
        ]
    );
    let h = headers(Some("abc"));
    let e = ext("weather");
    for (method, path) in [
        ("GET", "/forecast"),
        ("POST", "/bulk/x"),
        ("GET", "/pets"),
        ("POST", "/pets"),
    ] {
        let Plan::Charge(pending) = decide_now(&w, method, path, &h, &e) else {
            panic!("expected a charge for {method} {path}");
        };
        let charge = pending.charge(NOW);
        assert!(
            quotas
                .iter()
                .any(|q| q.bucket == charge.bucket && q.limits == charge.limits),
            "{method} {path} charges {:?}, which app_quotas does not list",
            charge.bucket
        );
    }
}

#[test]
fn operation_quota_replaces_the_product_quota_and_has_its_own_bucket() {
    let w = world();
    let h = headers(Some("abc"));
    let e = ext("weather");
    let Plan::Charge(pending) = decide_now(&w, "POST", "/bulk/x/y", &h, &e) else {
        panic!("expected a charge");
    };
    let charge = pending.charge(NOW);
    assert_eq!(charge.bucket, "weatherapp\u{1f}free\u{1f}bulk");
    assert_eq!(charge.cost, 10);
    assert_eq!(charge.limits[0].limit, 100);
}

#[test]
fn exhausted_quota_and_store_failures() {
    let w = world();
    let h = headers(Some("abc"));
    let e = ext("weather");
    let take = || match decide_now(&w, "GET", "/forecast", &h, &e) {
        Plan::Charge(p) => p,
        Plan::Decided(d) => panic!("expected a charge, got {d:?}"),
    };
    let state = LimitState {
        limit: 2,
        remaining: 0,
        reset_secs: 42,
    };
    let d = take().finish(QuotaAnswer::Store(Outcome::Exceeded(state)));
    assert_eq!(d.reason, Reason::QuotaExceeded);
    assert_eq!(d.retry_after, Some(42));
    assert_eq!(
        d.message,
        "quota of 2 per minute for product free is exhausted, retry in 42 s"
    );
    assert_eq!(d.reason.http_status(), 429);

    let d = take().finish(QuotaAnswer::Unavailable);
    assert_eq!(
        (d.reason, d.reason.http_status()),
        (Reason::StoreUnavailable, 503)
    );
    let local = LimitState {
        limit: 2,
        remaining: 1,
        reset_secs: 42,
    };
    let d = take().finish(QuotaAnswer::Fallback(Outcome::Allowed(local)));
    assert_eq!(d.reason, Reason::AllowedStoreError);
    assert!(d.allowed());
    assert_eq!(d.ratelimit, Some(local));
    let d = take().finish(QuotaAnswer::Fallback(Outcome::Exceeded(state)));
    assert_eq!(d.reason, Reason::QuotaExceeded);
}

#[test]
fn store_failure_policy_can_be_overridden_per_api() {
    let mut w = world();
    w.settings
        .on_store_error_by_api
        .insert("public".into(), OnStoreError::Allow);
    assert_eq!(w.settings.on_store_error_for("weather"), OnStoreError::Deny);
    assert_eq!(w.settings.on_store_error_for("public"), OnStoreError::Allow);
    let h = headers(Some("abc"));
    let e = ext("weather");
    let Plan::Charge(pending) = decide_now(&w, "GET", "/forecast", &h, &e) else {
        panic!("expected a charge");
    };
    assert_eq!(pending.on_store_error(&w.settings), OnStoreError::Deny);
}

#[test]
fn api_comes_from_the_context_extension_else_the_host_only_when_allowed() {
    let mut w = world();
    let h = headers(Some("abc"));
    let none = HashMap::new();
    // A route without the configured context extension names no API: the client's :authority does not
    // choose one for it.
    let d = decided(decide_now(&w, "GET", "/anything", &h, &none));
    assert_eq!((d.reason, d.api), (Reason::NoApi, ""));
    assert_eq!(d.reason.http_status(), 403);
    assert!(d.message.contains("tollgate_api"), "{}", d.message);
    assert_eq!(
        d.identity.app,
        Some("weatherapp"),
        "the caller is still named"
    );
    // api_host_fallback: the :authority host without its port is the API.
    w.settings.api_host_fallback = true;
    let d = decided(decide_now(&w, "GET", "/anything", &h, &none));
    assert_eq!((d.reason, d.api), (Reason::Allowed, "status.example.com"));
    // Without a configured extension the host is always the API.
    w.settings.api_host_fallback = false;
    w.settings.api_context_extension = None;
    let d = decided(decide_now(&w, "GET", "/anything", &h, &none));
    assert_eq!((d.reason, d.api), (Reason::Allowed, "status.example.com"));
    assert_eq!(host_of("[::1]:8080"), "[::1]");
    assert_eq!(host_of("example.com"), "example.com");
}

#[test]
fn dangerous_paths_are_refused_before_identity() {
    let w = world();
    let h = headers(None);
    let e = ext("weather");
    for path in ["/a/%2e%2e/b", "/a%2fb", "/a\\b", "/a%00"] {
        let d = decided(decide_now(&w, "GET", path, &h, &e));
        assert_eq!(d.reason, Reason::BadPath, "{path}");
        assert_eq!(d.reason.error_code(), "bad_request");
    }
}

#[test]
fn token_callers_resolve_to_catalog_apps_by_client_id() {
    let w = world();
    let e = ext("weather");
    let t = token(Some("weatherapp-client"), &[], &["read"]);
    let Plan::Charge(pending) = decide_now(&w, "GET", "/forecast", &t, &e) else {
        panic!("expected a charge");
    };
    assert_eq!(pending.charge(NOW).bucket, "weatherapp\u{1f}free");
    let d = pending.finish(QuotaAnswer::Store(Outcome::Allowed(LimitState {
        limit: 2,
        remaining: 1,
        reset_secs: 1,
    })));
    // The catalog, not the token, names the developer of a catalog app.
    assert_eq!(d.identity.app, Some("weatherapp"));
    assert_eq!(d.identity.developer, Some("ntesla@theremin.com"));
    // A product with scopes refuses a token without one of them.
    let d = decided(decide_now(&w, "GET", "/scoped", &t, &e));
    assert_eq!(d.reason, Reason::MissingScope);
    assert_eq!(
        d.message,
        "token has no scope that product scoped requires (one of: admin)"
    );
    let admin = token(Some("weatherapp-client"), &[], &["admin"]);
    assert_eq!(
        decided(decide_now(&w, "GET", "/scoped", &admin, &e)).reason,
        Reason::Allowed
    );
    // An unknown app is refused; a revoked one too.
    let unknown = token(Some("nobody"), &[], &[]);
    assert_eq!(
        decided(decide_now(&w, "GET", "/forecast", &unknown, &e)).reason,
        Reason::UnknownApp
    );
    let banned = token(Some("banned-client"), &[], &[]);
    assert_eq!(
        decided(decide_now(&w, "GET", "/forecast", &banned, &e)).reason,
        Reason::AppRevoked
    );
}

#[test]
fn portal_tokens_are_entitled_by_their_products_claim() {
    let w = world();
    let e = ext("weather");
    let t = token(None, &["free", "no-such-product"], &[]);
    let Plan::Charge(pending) = decide_now(&w, "GET", "/forecast", &t, &e) else {
        panic!("expected a charge");
    };
    // The company owns the bucket, apart from every app's buckets.
    assert_eq!(pending.charge(NOW).bucket, "\u{1e}acme\u{1f}free");
    let d = pending.finish(QuotaAnswer::Store(Outcome::Allowed(LimitState {
        limit: 2,
        remaining: 1,
        reset_secs: 1,
    })));
    assert_eq!(
        (d.identity.app, d.identity.developer, d.identity.company),
        (None, Some("dev@portal"), Some("acme"))
    );
    let d = decided(decide_now(&w, "GET", "/prod", &t, &e));
    assert_eq!(d.reason, Reason::NoProduct);
    assert_eq!(
        d.message,
        "account acme has no product for GET /prod on API weather"
    );
    let nothing = token(None, &[], &[]);
    assert_eq!(
        decided(decide_now(&w, "GET", "/forecast", &nothing, &e)).reason,
        Reason::NoProduct
    );
}

#[test]
fn tokens_without_a_catalog_app_need_a_portal_provider() {
    let w = world();
    let e = ext("weather");
    for app in [None, Some("unknown-client")] {
        let Caller::Token(Ok(verified)) = token(app, &["free"], &[]) else {
            unreachable!("token() makes a verified token");
        };
        let mut not_portal = (*verified).clone();
        not_portal.portal = false;
        let caller = Caller::Token(Ok(std::sync::Arc::new(not_portal)));
        let d = decided(decide_now(&w, "GET", "/forecast", &caller, &e));
        assert_eq!(d.reason, Reason::UnknownApp, "{app:?}");
        assert_eq!(d.identity.stripe_customer, None);
    }
}

#[test]
fn refused_tokens_say_why_without_echoing_them() {
    let w = world();
    let e = ext("weather");
    let expired = Caller::Token(Err(JwtRejection::Expired));
    let d = decided(decide_now(&w, "GET", "/forecast", &expired, &e));
    assert_eq!(
        (d.reason, d.message.as_str()),
        (Reason::InvalidToken, "token has expired")
    );
    assert_eq!(d.reason.http_status(), 401);
    let keys = Caller::Token(Err(JwtRejection::KeysUnavailable));
    assert_eq!(
        decided(decide_now(&w, "GET", "/forecast", &keys, &e))
            .reason
            .http_status(),
        503
    );
}

const SOLD: &str = "\
products:
  - name: starter
    quota: {limit: 3, unit: day}
    stripe_prices: [price_starter]
    operations: [{api: weather, paths: [/forecast, /regional]}]
  - name: pro
    quota: {limit: 100, unit: day}
    stripe_prices: ['lookup_key:pro_monthly']
    operations: [{api: weather, paths: [/forecast, /pro]}]
  - name: free
    operations: [{api: weather, paths: [/free]}]
  - name: prodonly
    environments: [prod]
    operations: [{api: weather, paths: [/regional]}]
developers:
  - email: payer@x
    stripe_customer: cus_1
    apps:
      - {name: payer, products: [{name: free}, {name: prodonly}], keys: [{hash: 'sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'}]}
      - {name: held, products: [{name: pro, status: revoked}], keys: [{hash: 'sha256:3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d'}]}
  - email: nobody@x
    apps:
      - {name: stranger, keys: [{hash: 'sha256:2e7d2c03a9507ae265ecf5b5356885a53393a2029d241394997265a1a25aefc6'}]}
";

fn paid(
    status: crate::paywall::model::PaidStatus,
    price: &str,
    since: Option<i64>,
) -> crate::paywall::model::PaidSubscription {
    use crate::paywall::model::{PaidSubscription, PriceItem, SubscriptionState};
    let lookup_key = (price == "price_pro").then(|| "pro_monthly".to_owned());
    PaidSubscription {
        state: SubscriptionState {
            id: "sub_1".into(),
            customer: "cus_1".into(),
            status,
            items: vec![PriceItem {
                price: price.into(),
                lookup_key,
            }],
            period_start: since,
        },
        past_due_since: since,
        as_of: 0,
        source: "evt_1".into(),
    }
}

fn sold(subscriptions: Vec<crate::paywall::model::PaidSubscription>) -> World {
    let mut w = world();
    w.catalog = parse(&Source::from_text("c.yaml", SOLD.to_owned())).unwrap(); // invariant: test-only module, fixed catalog
    w.catalog.put_customer("cus_1", subscriptions);
    w
}

/// The product a request would be charged on, or the denial's reason and message.
fn outcome(w: &World, key: &str, path: &str) -> Result<String, (Reason, String)> {
    let caller = headers(Some(key));
    let e = ext("weather");
    match decide_now(w, "GET", path, &caller, &e) {
        Plan::Charge(c) => Ok(c.charge(NOW).bucket.to_owned()),
        Plan::Decided(d) if d.allowed() => Ok(d.identity.product.unwrap_or("").to_owned()),
        Plan::Decided(d) => Err((d.reason, d.message)),
    }
}

#[test]
fn stripe_subscriptions_grant_products_sold_through_stripe() {
    use crate::paywall::model::PaidStatus as S;
    let none = sold(Vec::new());
    assert_eq!(
        outcome(&none, "abc", "/forecast"),
        Err((
            Reason::NoSubscription,
            "no active subscription for product starter".into()
        ))
    );
    assert_eq!(
        outcome(&none, "abc", "/free"),
        Ok("free".into()),
        "products not sold through Stripe stay"
    );
    assert_eq!(
        outcome(&none, "abc", "/regional").unwrap_err().0,
        Reason::ProductNotOffered,
        "the app's own refusal says more than no subscription to a product every app is offered"
    );

    let starter = sold(vec![paid(S::Active, "price_starter", None)]);
    assert_eq!(
        outcome(&starter, "abc", "/forecast"),
        Ok("payer\u{1f}starter".into())
    );
    // A plan change: the item moves to pro's price, and pro's quota is charged from the next Check.
    let pro = sold(vec![paid(S::Active, "price_pro", None)]);
    assert_eq!(
        outcome(&pro, "abc", "/forecast"),
        Ok("payer\u{1f}pro".into())
    );
    assert_eq!(
        outcome(&pro, "b", "/pro"),
        Err((
            Reason::ProductRevoked,
            "app held's subscription to product pro is revoked".into()
        )),
        "an explicit revocation still revokes"
    );
    assert_eq!(
        outcome(&pro, "c", "/pro"),
        Err((
            Reason::NoSubscription,
            "no active subscription for product pro".into()
        )),
        "a developer without a Stripe customer has no subscription"
    );

    let trial = sold(vec![paid(S::Trialing, "price_starter", None)]);
    assert!(outcome(&trial, "abc", "/forecast").is_ok());
    let grace = sold(vec![paid(S::PastDue, "price_starter", Some(NOW - 99))]);
    assert!(
        outcome(&grace, "abc", "/forecast").is_ok(),
        "past due within the grace period"
    );
    let late = sold(vec![paid(S::PastDue, "price_starter", Some(NOW - 100))]);
    let (reason, message) = outcome(&late, "abc", "/forecast").unwrap_err();
    assert_eq!(
        (reason, reason.http_status(), reason.error_code()),
        (Reason::PaymentRequired, 402, "payment_required")
    );
    assert!(
        message.starts_with("subscription sub_1 for product starter is past_due since ")
            && message.contains("access ended"),
        "{message}"
    );
    for (status, reason) in [
        (S::Unpaid, Reason::PaymentRequired),
        (S::Incomplete, Reason::PaymentRequired),
        (S::Canceled, Reason::NoSubscription),
        (S::IncompleteExpired, Reason::NoSubscription),
        (S::Paused, Reason::NoSubscription),
    ] {
        let w = sold(vec![paid(status, "price_starter", None)]);
        let (got, message) = outcome(&w, "abc", "/forecast").unwrap_err();
        assert_eq!(got, reason, "{status:?}: {message}");
        assert!(
            message.contains("sub_1") && message.contains(status.as_str()),
            "{message}"
        );
    }
}

#[test]
fn portal_tokens_are_held_to_their_customers_subscriptions() {
    use crate::paywall::model::PaidStatus as S;
    let token_of = |customer: Option<&str>| {
        Caller::Token(Ok(std::sync::Arc::new(VerifiedToken {
            provider: "portal".into(),
            subject: Some("payer@x".into()),
            developer: Some("payer@x".into()),
            app: None,
            company: None,
            products: vec!["starter".into()],
            scopes: Vec::new(),
            stripe_customer: customer.map(str::to_owned),
            portal: true,
            expires_at: NOW + 60,
        })))
    };
    let e = ext("weather");
    let canceled = sold(vec![paid(S::Canceled, "price_starter", None)]);
    let caller = token_of(None);
    let d = decided(decide_now(&canceled, "GET", "/forecast", &caller, &e));
    assert_eq!(d.reason, Reason::NoSubscription, "{}", d.message);
    let active = sold(vec![paid(S::Active, "price_starter", None)]);
    assert!(matches!(
        decide_now(&active, "GET", "/forecast", &caller, &e),
        Plan::Charge(_)
    ));
    // A token naming only starter is not granted pro by a pro subscription.
    let pro = sold(vec![paid(S::Active, "price_pro", None)]);
    let d = decided(decide_now(&pro, "GET", "/pro", &caller, &e));
    assert_eq!(d.reason, Reason::NoProduct, "{}", d.message);
    let elsewhere = token_of(Some("cus_other"));
    let d = decided(decide_now(&active, "GET", "/forecast", &elsewhere, &e));
    assert_eq!(
        d.reason,
        Reason::NoSubscription,
        "the token's own customer decides"
    );
}

#[test]
fn prepaid_products_spend_the_owners_credits_at_the_operations_cost() {
    let w = world();
    let e = ext("weather");
    let caller = headers(Some("e"));
    let charge = |path: &'static str| match decide_now(&w, "GET", path, &caller, &e) {
        Plan::Charge(p) => p.credits(),
        Plan::Decided(d) => panic!("expected a charge for {path}, got {d:?}"),
    };
    let plain = charge("/credits/x").expect("prepaid");
    // No company: the developer owns the balance.
    assert_eq!(plain.owner, "solo@example.com");
    assert_eq!(plain.cost, 2);
    let refill = plain.refill.expect("the product refills");
    assert_eq!((refill.product, refill.amount), ("prepaid", 50));
    assert_eq!(
        refill.period_start,
        crate::quota::window_at(NOW, crate::quota::Unit::Month, 1).start
    );
    assert_eq!(charge("/credits/dear").map(|c| c.cost), Some(5));
    // An operation of cost 0 spends nothing, and without a quota nothing is charged at all.
    assert!(matches!(
        decide_now(&w, "GET", "/credits/free", &caller, &e),
        Plan::Decided(d) if d.reason == Reason::Allowed
    ));
    // The company owns the balance when there is one.
    let portal = token(None, &["prepaid"], &[]);
    let Plan::Charge(p) = decide_now(&w, "GET", "/credits/x", &portal, &e) else {
        panic!("expected a charge");
    };
    assert_eq!(p.credits().map(|c| c.owner), Some("acme"));
}

#[test]
fn an_exhausted_balance_is_a_402_that_says_how_to_top_up() {
    let w = world();
    let e = ext("weather");
    let caller = headers(Some("e"));
    let Plan::Charge(p) = decide_now(&w, "GET", "/credits/x", &caller, &e) else {
        panic!("expected a charge");
    };
    assert!(!p.has_quota());
    let d = p.credits_exhausted(1);
    assert_eq!(d.reason, Reason::CreditsExhausted);
    assert_eq!(d.reason.http_status(), 402);
    assert_eq!(d.reason.error_code(), "credits_exhausted");
    assert_eq!(
        d.message,
        "the prepaid credits of app prepaidapp's owner are exhausted (balance 1, this call costs 2): buy a \
         top-up (Stripe price price_topup) or ask the API provider to grant credits"
    );
    let Plan::Charge(p) = decide_now(&w, "GET", "/credits/x", &caller, &e) else {
        panic!("expected a charge");
    };
    let d = p.credits_unavailable();
    assert_eq!(
        (d.reason.http_status(), d.reason.error_code()),
        (503, "unavailable")
    );
}

#[test]
fn a_prepaid_product_with_a_quota_is_charged_both_ways() {
    let w = world();
    let e = ext("weather");
    let caller = headers(Some("e"));
    let Plan::Charge(p) = decide_now(&w, "GET", "/both", &caller, &e) else {
        panic!("expected a charge");
    };
    assert!(p.has_quota());
    assert_eq!(p.credits().map(|c| c.cost), Some(1));
    let Plan::Charge(p) = decide_now(&w, "GET", "/credits/x", &caller, &e) else {
        panic!("expected a charge");
    };
    // Without a quota the decision completes with no ratelimit headers.
    let d = p.finish(QuotaAnswer::NoQuota);
    assert_eq!(d.reason, Reason::Allowed);
    assert_eq!(d.ratelimit, None);
}
