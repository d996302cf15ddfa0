//! Self-service: routing, the answer built from plain values, and whole Checks through the [`Authorizer`] with
//! two partners' data side by side (a memory quota store, the history and credits on an SQLite state store).
//!
//! Test-only: the parent declares this file under `#[cfg(test)]`, so a failed unwrap here fails a test.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::usage::{Counter, Facts, ProductFacts, Read, SubscriptionFacts, Who, build};
use super::*;
use crate::catalog::{CatalogHandle, parse};
use crate::check::decision::Identity;
use crate::check::entitle::entitle;
use crate::check::{Authorizer, CheckMetrics, Reason, Request, Verdict, app_quotas};
use crate::credits::CreditLedger;
use crate::credits::ledger::GrantInput;
use crate::credits::{CreditMetrics, CreditOptions};
use crate::history::{Batch, Counts, Dims, Rollup};
use crate::identity::jwt::VerifiedToken;
use crate::identity::{ApiKeyConfig, Caller};
use crate::paywall::model::{PaidStatus, PaidSubscription, PriceItem, SubscriptionState};
use crate::quota::memory::MemoryStore;
use crate::quota::{Limit, LimitUsage, Window};
use crate::source::Source;
use crate::state::sql::SqlStore;
use crate::util::clock::unix_now;

const ALPHA_KEY: &str = "tg_test_alpha_self_service_key_000000000001";
const BRAVO_KEY: &str = "tg_test_bravo_self_service_key_000000000001";
const BRAVO_REVOKED: &str = "tg_test_bravo_self_service_key_revoked_0001";

fn hash(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

fn catalog_text() -> String {
    format!(
        r#"
products:
  - name: weather_free
    quota: {{limit: 100, unit: day}}
    meter: {{event_name: weather_calls, value: calls, success: [2xx]}}
    operations:
      - {{api: weather, paths: [/forecast], methods: [GET]}}
      - {{api: weather, name: bulk, paths: [/bulk/**], quota: {{limit: 10, unit: hour}}}}
  - name: weather_pro
    quota: {{limit: 1000, unit: day}}
    stripe_prices: [price_pro]
    operations: [{{api: weather, paths: [/pro/**]}}]
  - name: prepaid
    prepaid: {{cost: 1}}
    operations: [{{api: weather, paths: [/credits/**]}}]
  - name: beta
    approval: manual
    operations: [{{api: weather, paths: [/beta]}}]
developers:
  - email: dev@alpha.test
    company: alpha
    stripe_customer: cus_Alpha
    apps:
      - name: alphaapp
        client_id: alpha-client
        products: [{{name: weather_free}}, {{name: prepaid}}, {{name: beta}}]
        keys: [{{hash: '{alpha}'}}]
  - email: dev@bravo.test
    company: bravo
    stripe_customer: cus_Bravo
    apps:
      - name: bravoapp
        products: [{{name: weather_free}}]
        keys: [{{hash: '{bravo}'}}, {{hash: '{revoked}', status: revoked}}]
"#,
        alpha = hash(ALPHA_KEY),
        bravo = hash(BRAVO_KEY),
        revoked = hash(BRAVO_REVOKED),
    )
}

fn paid(id: &str, customer: &str, status: PaidStatus) -> PaidSubscription {
    PaidSubscription {
        state: SubscriptionState {
            id: id.into(),
            customer: customer.into(),
            status,
            items: vec![PriceItem {
                price: "price_pro".into(),
                lookup_key: None,
            }],
            period_start: None,
        },
        past_due_since: (status == PaidStatus::PastDue).then_some(1),
        as_of: 0,
        source: "evt_1".into(),
    }
}

fn catalog() -> Catalog {
    let mut catalog = parse(&Source::from_text("c.yaml", catalog_text())).unwrap();
    catalog.put_customer(
        "cus_Alpha",
        vec![paid("sub_alpha", "cus_Alpha", PaidStatus::Active)],
    );
    catalog.put_customer(
        "cus_Bravo",
        vec![paid("sub_bravo", "cus_Bravo", PaidStatus::PastDue)],
    );
    catalog
}

fn settings() -> Settings {
    Settings {
        environment: Some("test".into()),
        api_context_extension: Some("tollgate_api".into()),
        api_key: ApiKeyConfig::default(),
        upstream_identity_headers: true,
        stripe_grace: 60,
        self_service: Some(Prefix::default()),
        ..Default::default()
    }
}

fn row(hour: i64, customer: &str, app: &str, product: &str, meter: &str, n: u64) -> Rollup {
    Rollup {
        hour,
        dims: Dims {
            customer: customer.into(),
            app: app.into(),
            product: product.into(),
            meter: meter.into(),
        },
        counts: Counts {
            allowed: n,
            denied: 1,
            billable: n,
            value: n * 10,
        },
    }
}

/// An authorizer over [`catalog`], with A's and B's usage history and credits in an SQLite state store.
struct Rig {
    authorizer: Authorizer,
    quota: Arc<MemoryStore>,
    history: Arc<dyn HistoryStore>,
    catalog: Arc<CatalogHandle>,
    _credits: Arc<Credits>,
    _dir: tempfile::TempDir,
}

async fn rig(settings: Settings) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let store = SqlStore::open(&format!(
        "sqlite://{}",
        dir.path().join("state.db").display()
    ))
    .unwrap();
    store.migrate().await.unwrap();
    let now = unix_now();
    let hour = now - now.rem_euclid(3_600);
    let last_month = window_at(now, Unit::Month, 1).start - 3_600;
    let rows = vec![
        row(
            hour,
            "cus_Alpha",
            "alphaapp",
            "weather_free",
            "weather_calls",
            7,
        ),
        row(hour, "cus_Alpha", "alphaapp", "prepaid", "", 3),
        row(
            last_month,
            "cus_Alpha",
            "alphaapp",
            "weather_free",
            "weather_calls",
            1000,
        ),
        row(
            hour,
            "cus_Bravo",
            "bravoapp",
            "weather_free",
            "weather_calls",
            555,
        ),
        // A portal account's calls (no app) billed to its own customer, another app of that customer, and
        // calls of accounts without a customer: only the first is the account's.
        row(hour, "cus_Portal", "", "weather_free", "weather_calls", 4),
        row(
            hour,
            "cus_Portal",
            "otherapp",
            "weather_free",
            "weather_calls",
            666,
        ),
        row(hour, "", "", "weather_free", "weather_calls", 777),
    ];
    let added = store
        .add(
            &Batch {
                id: "test:1".into(),
                rows,
            },
            now,
        )
        .await
        .unwrap();
    assert!(added);
    for (owner, amount) in [("alpha", 500), ("bravo", 300)] {
        store
            .grant(&GrantInput {
                owner,
                amount,
                reason: "test",
                source: &format!("test:{owner}"),
                low_balance: 0,
                now,
            })
            .await
            .unwrap();
    }
    let credits = Arc::new(Credits::start(
        Arc::new(store.clone()),
        "r1".into(),
        CreditOptions::default(),
        CreditMetrics::new(&prometheus::Registry::new()).unwrap(),
        None,
    ));
    let quota = Arc::new(MemoryStore::new());
    let history: Arc<dyn HistoryStore> = Arc::new(store);
    let catalog = Arc::new(CatalogHandle::new(catalog()));
    let authorizer = Authorizer::new(
        Arc::clone(&catalog),
        quota.clone(),
        None,
        settings,
        CheckMetrics::register(&prometheus::Registry::new()).unwrap(),
    )
    .with_credits(Arc::clone(&credits))
    .with_history(Arc::clone(&history));
    Rig {
        authorizer,
        quota,
        history,
        catalog,
        _credits: credits,
        _dir: dir,
    }
}

static ROUTE: std::sync::LazyLock<HashMap<String, String>> =
    std::sync::LazyLock::new(|| HashMap::from([("tollgate_api".to_owned(), "weather".to_owned())]));

impl Rig {
    async fn check(&self, method: &str, path: &str, key: Option<&str>) -> Verdict {
        let headers: HashMap<String, String> = key
            .map(|k| ("x-api-key".to_owned(), k.to_owned()))
            .into_iter()
            .collect();
        let request = Request {
            method,
            path,
            authority: "api.example.test",
            headers: &headers,
            context_extensions: &*ROUTE,
        };
        self.authorizer.check(&request).await
    }

    /// The answer to `GET /.tollgate/usage` with `key`, asserted to be a 200 self-service answer.
    async fn usage(&self, key: &str) -> (String, Value) {
        let verdict = self.check("GET", "/.tollgate/usage", Some(key)).await;
        assert_eq!(verdict.reason, Reason::SelfService, "{verdict:?}");
        assert!(!verdict.allowed());
        let answer = verdict.answer.expect("a self-service answer");
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert!(
            answer
                .headers
                .contains(&("cache-control", "no-store".to_owned()))
        );
        let json = serde_json::from_str(&answer.body).unwrap();
        (answer.body, json)
    }
}

fn quota_of<'v>(answer: &'v Value, product: &str) -> &'v Vec<Value> {
    answer["products"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == product)
        .unwrap_or_else(|| panic!("no product {product} in {answer}"))["quotas"]
        .as_array()
        .unwrap()
}

#[test]
fn prefixes_parse_and_refuse_what_could_take_every_path() {
    assert_eq!(Prefix::parse("/.tollgate/").unwrap(), Prefix::default());
    assert_eq!(
        Prefix::parse("/partner/self-service/").unwrap().segments,
        vec!["partner", "self-service"]
    );
    for bad in [
        "",
        "/",
        "//",
        ".tollgate/",
        "/.tollgate",
        "/../",
        "/a/./",
        "/a//b/",
        "/a b/",
        "/%2e/",
        "/a?/",
    ] {
        assert!(Prefix::parse(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn requests_under_the_prefix_are_routed_whatever_their_spelling() {
    let prefix = Prefix::default();
    for path in [
        "/.tollgate/usage",
        "/.tollgate/usage/",
        "/.tollgate/usage?apikey=K",
        "//.tollgate//usage",
        "/%2Etollgate/usage",
        "/.tollgate/%75sage",
    ] {
        assert_eq!(route(path, &prefix), Some(Route::Usage), "{path}");
    }
    for path in [
        "/.tollgate",
        "/.tollgate/",
        "/.tollgate/usage/more",
        "/.tollgate/Usage",
        "/.tollgate/keys",
    ] {
        assert_eq!(route(path, &prefix), Some(Route::Unknown), "{path}");
    }
    for path in [
        "/forecast",
        "/api/.tollgate/usage",
        "/.tollgatex/usage",
        "/x?next=/.tollgate/usage",
        "/.tollgate/../usage",
        "/%zz/.tollgate/usage",
    ] {
        assert_eq!(route(path, &prefix), None, "{path}");
    }
    let nested = Prefix::parse("/partner/self/").unwrap();
    assert_eq!(route("/partner/self/usage", &nested), Some(Route::Usage));
    assert_eq!(route("/partner/usage", &nested), None);
    assert_eq!(route("/.tollgate/usage", &nested), None);
}

#[test]
fn the_answer_is_built_from_what_was_read() {
    let limit = Limit {
        limit: 100,
        interval: 1,
        unit: Unit::Day,
    };
    let facts = Facts {
        who: Who {
            app: Some("alphaapp"),
            account: None,
            developer: Some("dev@alpha.test"),
            company: Some("alpha"),
        },
        environment: Some("test"),
        now: 1_796_000_000,
        month_start: 1_793_491_200,
        products: vec![
            ProductFacts {
                name: "weather_free",
                status: "approved",
                meter: Some("weather_calls"),
            },
            ProductFacts {
                name: "beta",
                status: "pending",
                meter: None,
            },
        ],
        counters: Read::Got(vec![Counter {
            product: "weather_free",
            operation: None,
            usage: LimitUsage {
                limit,
                window: Window {
                    start: 1_795_996_800,
                    end: 1_796_083_200,
                },
                used: 7,
                reserved: 3,
            },
        }]),
        history: Read::Got(vec![
            row(
                1_795_996_800,
                "cus_Alpha",
                "alphaapp",
                "weather_free",
                "weather_calls",
                2,
            ),
            row(
                1_796_000_400,
                "cus_Alpha",
                "alphaapp",
                "weather_free",
                "weather_calls",
                3,
            ),
            row(
                1_796_000_400,
                "cus_Alpha",
                "alphaapp",
                "weather_gold",
                "weather_calls",
                1,
            ),
            row(1_796_000_400, "cus_Alpha", "alphaapp", "beta", "", 4),
            // Self-service requests of the hour: neither allowed nor denied, so they add nothing.
            Rollup {
                counts: Counts::default(),
                ..row(1_796_000_400, "cus_Alpha", "alphaapp", "", "", 0)
            },
        ]),
        balance: Read::Got(480),
        subscriptions: vec![SubscriptionFacts {
            product: "weather_pro",
            access: "granted",
            subscription: Some("sub_1".into()),
            status: Some("active"),
            access_ends_at: None,
        }],
    };
    let json = serde_json::to_value(build(&facts)).unwrap();
    let want = serde_json::json!({
        "app": "alphaapp", "account": null, "developer": "dev@alpha.test", "company": "alpha",
        "environment": "test", "as_of": "2026-11-30T00:53:20Z",
        "products": [
            {"name": "weather_free", "status": "approved", "meter": "weather_calls", "quotas": [
                {"operation": null, "limit": 100, "interval": 1, "unit": "day", "used": 7, "reserved": 3,
                 "remaining": 90, "window_start": "2026-11-30T00:00:00Z", "window_end": "2026-12-01T00:00:00Z"}]},
            {"name": "beta", "status": "pending", "meter": null, "quotas": []}
        ],
        "month_to_date": {"from": "2026-11-01T00:00:00Z", "to": "2026-11-30T00:53:20Z", "meters": [
            {"meter": null, "allowed": 4, "denied": 1, "billable": 4, "value": 40, "products": [
                {"product": "beta", "allowed": 4, "denied": 1, "billable": 4, "value": 40}]},
            {"meter": "weather_calls", "allowed": 6, "denied": 3, "billable": 6, "value": 60, "products": [
                {"product": "weather_free", "allowed": 5, "denied": 2, "billable": 5, "value": 50},
                {"product": "weather_gold", "allowed": 1, "denied": 1, "billable": 1, "value": 10}]}
        ]},
        "credits": {"balance": 480},
        "subscriptions": [{"product": "weather_pro", "access": "granted", "subscription": "sub_1",
                           "status": "active", "access_ends_at": null}],
        "unavailable": []
    });
    assert_eq!(json, want);

    let mut failed = facts.clone();
    failed.counters = Read::Unavailable;
    failed.history = Read::Unavailable;
    failed.balance = Read::Unavailable;
    let json = serde_json::to_value(build(&failed)).unwrap();
    assert_eq!(
        json["unavailable"],
        serde_json::json!(["quota", "month_to_date", "credits"])
    );
    assert_eq!(json["month_to_date"], Value::Null);
    assert_eq!(json["credits"], Value::Null);
    assert_eq!(quota_of(&json, "weather_free").len(), 0);

    let mut absent = facts;
    absent.history = Read::Absent;
    absent.balance = Read::Absent;
    let json = serde_json::to_value(build(&absent)).unwrap();
    assert_eq!(json["unavailable"], serde_json::json!([]));
    assert_eq!(json["month_to_date"], Value::Null);
    assert_eq!(json["credits"], Value::Null);
}

#[tokio::test]
async fn each_key_reads_its_own_partner_and_never_the_other() {
    let rig = rig(settings()).await;
    // One call of A's spends one unit of A's daily quota.
    let call = rig.check("GET", "/forecast", Some(ALPHA_KEY)).await;
    assert_eq!(call.reason, Reason::Allowed);

    let (body, a) = rig.usage(ALPHA_KEY).await;
    assert_eq!(a["app"], "alphaapp");
    assert_eq!(a["account"], Value::Null);
    assert_eq!(a["developer"], "dev@alpha.test");
    assert_eq!(a["company"], "alpha");
    assert_eq!(a["environment"], "test");
    let names: Vec<&str> = a["products"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["weather_free", "prepaid", "beta", "weather_pro"]);
    let statuses: Vec<&str> = a["products"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["approved", "approved", "pending", "approved"]);
    let free = quota_of(&a, "weather_free");
    assert_eq!(
        free.len(),
        2,
        "the product's quota and bulk's own: {free:?}"
    );
    assert_eq!(free[0]["operation"], Value::Null);
    assert_eq!(
        (free[0]["limit"].as_u64(), free[0]["used"].as_u64()),
        (Some(100), Some(1))
    );
    assert_eq!(free[0]["remaining"], 99);
    assert_eq!(free[0]["unit"], "day");
    assert_eq!(free[1]["operation"], "bulk");
    assert_eq!(
        (free[1]["limit"].as_u64(), free[1]["used"].as_u64()),
        (Some(10), Some(0))
    );
    assert_eq!(quota_of(&a, "weather_pro")[0]["limit"], 1000);
    assert_eq!(
        quota_of(&a, "beta").len(),
        0,
        "a pending product spends nothing"
    );

    let mtd = &a["month_to_date"];
    let meters = mtd["meters"].as_array().unwrap();
    assert_eq!(meters.len(), 2, "{mtd}");
    assert_eq!(meters[0]["meter"], Value::Null);
    assert_eq!(meters[0]["allowed"], 3);
    assert_eq!(meters[1]["meter"], "weather_calls");
    assert_eq!(meters[1]["allowed"], 7, "this month only: {mtd}");
    assert_eq!(meters[1]["value"], 70);
    assert_eq!(a["credits"], serde_json::json!({"balance": 500}));
    assert_eq!(
        a["subscriptions"],
        serde_json::json!([{"product": "weather_pro", "access": "granted", "subscription": "sub_alpha",
                            "status": "active", "access_ends_at": null}])
    );
    assert_eq!(a["unavailable"], serde_json::json!([]));
    for theirs in [
        "bravo", "Bravo", "555", "300", "666", "777", ALPHA_KEY, "sha256:",
    ] {
        assert!(
            !body.contains(theirs),
            "A's answer holds {theirs:?}: {body}"
        );
    }

    let (body, b) = rig.usage(BRAVO_KEY).await;
    assert_eq!(b["app"], "bravoapp");
    assert_eq!(b["company"], "bravo");
    assert_eq!(
        quota_of(&b, "weather_free")[0]["used"],
        0,
        "A's call is not B's"
    );
    assert_eq!(b["month_to_date"]["meters"][0]["allowed"], 555);
    assert_eq!(b["credits"], serde_json::json!({"balance": 300}));
    assert_eq!(b["subscriptions"][0]["access"], "payment_required");
    assert_eq!(b["subscriptions"][0]["subscription"], "sub_bravo");
    let names: Vec<&str> = b["products"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["weather_free", "weather_pro"]);
    assert_eq!(b["products"][1]["status"], "payment_required");
    for theirs in ["alpha", "Alpha", "500", BRAVO_KEY] {
        assert!(
            !body.contains(theirs),
            "B's answer holds {theirs:?}: {body}"
        );
    }
}

#[tokio::test]
async fn self_service_spends_no_quota_and_is_never_allowed_upstream() {
    let rig = rig(settings()).await;
    for _ in 0..5 {
        let verdict = rig.check("GET", "/.tollgate/usage", Some(ALPHA_KEY)).await;
        assert_eq!(verdict.reason, Reason::SelfService);
        assert!(!verdict.allowed());
        assert_eq!(verdict.upstream, Default::default());
        assert_eq!(verdict.identity.app.as_deref(), Some("alphaapp"));
        assert_eq!(
            verdict.identity.product, None,
            "no product: nothing is metered"
        );
        assert_eq!(verdict.ratelimit, None);
        assert_eq!(verdict.credits_remaining, None);
    }
    let catalog = rig.catalog.snapshot();
    let app = catalog.app_by_name("alphaapp").unwrap();
    for quota in app_quotas(&catalog, app) {
        for usage in rig
            .quota
            .usage(&quota.bucket, quota.limits, unix_now())
            .await
            .unwrap()
        {
            assert_eq!(usage.used, 0, "{} spent by self-service", quota.bucket);
        }
    }
    let (_, a) = rig.usage(ALPHA_KEY).await;
    assert_eq!(quota_of(&a, "weather_free")[0]["used"], 0);
    // Self-service leaves the prepaid balance alone too.
    assert_eq!(a["credits"]["balance"], 500);
}

#[tokio::test]
async fn bad_credentials_get_the_same_refusal_as_any_call() {
    let rig = rig(settings()).await;
    for key in [None, Some("tg_test_nobody"), Some(BRAVO_REVOKED)] {
        let own = rig.check("GET", "/.tollgate/usage", key).await;
        let any = rig.check("GET", "/forecast", key).await;
        assert_eq!(own.reason.http_status(), 401, "{key:?}: {own:?}");
        assert_eq!(own.answer, None, "{key:?}");
        assert_eq!(
            (own.reason, &own.message, &own.challenge),
            (any.reason, &any.message, &any.challenge),
            "{key:?}"
        );
        assert!(own.challenge.is_some());
        assert_eq!(own.upstream, Default::default());
    }
}

#[tokio::test]
async fn only_get_usage_is_served_and_a_disabled_prefix_is_an_ordinary_path() {
    let rig = rig(settings()).await;
    let post = rig.check("POST", "/.tollgate/usage", Some(ALPHA_KEY)).await;
    assert_eq!(post.reason, Reason::SelfService);
    let answer = post.answer.unwrap();
    assert_eq!(answer.status, 405);
    assert!(answer.headers.contains(&("allow", "GET".to_owned())));
    let body: Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(body["error"], "method_not_allowed");

    for path in [
        "/.tollgate/",
        "/.tollgate/keys",
        "/.tollgate/usage/bravoapp",
    ] {
        let other = rig.check("GET", path, Some(ALPHA_KEY)).await;
        assert_eq!(other.reason, Reason::SelfService, "{path}");
        let answer = other.answer.unwrap();
        assert_eq!(answer.status, 404, "{path}");
        assert!(!answer.body.contains("bravo"));
    }

    let off = self::rig(Settings {
        self_service: None,
        ..settings()
    })
    .await;
    let ordinary = off.check("GET", "/.tollgate/usage", Some(ALPHA_KEY)).await;
    assert_eq!(ordinary.reason, Reason::NoProduct);
    assert_eq!(ordinary.answer, None);
}

/// A portal token without a catalog app: its account's view (its company's counters, its customer's calls
/// without an app), through [`respond`] with the entitlement the Check makes.
#[tokio::test]
async fn a_portal_token_reads_its_account() {
    let rig = rig(settings()).await;
    let token = Caller::Token(Ok(Arc::new(VerifiedToken {
        provider: "portal".into(),
        subject: Some("dev@portal.test".into()),
        developer: Some("dev@portal.test".into()),
        app: None,
        company: Some("portalco".into()),
        products: vec!["weather_free".into()],
        scopes: Vec::new(),
        stripe_customer: Some("cus_Portal".into()),
        portal: true,
        expires_at: unix_now() + 60,
    })));
    let catalog = rig.catalog.snapshot();
    let settings = settings();
    let now = unix_now();
    let mut known = Identity::default();
    let entitled = entitle(&token, &catalog, &settings, now, &mut known)
        .map_err(|(r, m)| format!("{r:?} {m}"))
        .unwrap();
    let sources = Sources {
        quota: rig.quota.clone(),
        history: Some(Arc::clone(&rig.history)),
        credits: None,
    };
    let answer = respond(
        &sources,
        "GET",
        Route::Usage,
        &entitled,
        &catalog,
        &settings,
        now,
    )
    .await;
    assert_eq!(answer.status, 200);
    let json: Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(json["app"], Value::Null);
    assert_eq!(json["account"], "portalco");
    assert_eq!(quota_of(&json, "weather_free")[0]["limit"], 100);
    let meters = json["month_to_date"]["meters"].as_array().unwrap();
    assert_eq!(meters.len(), 1);
    assert_eq!(
        meters[0]["allowed"], 4,
        "only the account's own calls: {json}"
    );
    for theirs in ["alpha", "bravo", "666", "777", "otherapp"] {
        assert!(!answer.body.contains(theirs), "{theirs}: {}", answer.body);
    }

    // Without a Stripe customer there is no month to date of its own to show.
    let anonymous = Caller::Token(Ok(Arc::new(VerifiedToken {
        provider: "portal".into(),
        subject: Some("x@portal.test".into()),
        developer: Some("x@portal.test".into()),
        app: None,
        company: None,
        products: vec!["weather_free".into()],
        scopes: Vec::new(),
        stripe_customer: None,
        portal: true,
        expires_at: unix_now() + 60,
    })));
    let mut known = Identity::default();
    let entitled = entitle(&anonymous, &catalog, &settings, now, &mut known)
        .map_err(|(r, m)| format!("{r:?} {m}"))
        .unwrap();
    let answer = respond(
        &sources,
        "GET",
        Route::Usage,
        &entitled,
        &catalog,
        &settings,
        now,
    )
    .await;
    let json: Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(json["account"], "x@portal.test");
    assert_eq!(json["month_to_date"], Value::Null);
    assert!(!answer.body.contains("777"));
}
