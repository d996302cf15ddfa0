//! Micro-benchmarks of the Check path's pure parts at catalog scale: key lookup among 100k keys, product
//! selection over 1k products of 10 operations, the whole `check::plan`, and quota window arithmetic.
//!
//! The catalog has the shape `bench/gen_catalog.py` writes (so these numbers line up with `bench/run`'s scale
//! figures): 1,000 products of 10 operations, 10,000 apps of 10 keys subscribed to 5 products each, plus one
//! app subscribed to every product, the worst case for matching.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::catalog::{Catalog, parse};
use tollgate::check::{self, Plan, Request, Settings};
use tollgate::identity::Caller;
use tollgate::identity::api_key::KeyHash;
use tollgate::matching::{self, Match, Target, path};
use tollgate::quota::{Unit, window_at};
use tollgate::source::Source;

const KEYS: usize = 100_000;
const PRODUCTS: usize = 1_000;
const OPS: usize = 10;
const KEYS_PER_APP: usize = 10;
const SUBS: usize = 5;
const APIS: usize = 50;
const WIDE_KEY: &str = "tg_test_bench_wide_app_key";

fn key_of(i: usize) -> String {
    format!("tg_test_bench_{i:044}")
}

fn subscriptions(app: usize) -> Vec<usize> {
    let mut chosen = Vec::with_capacity(SUBS);
    for j in 0..SUBS {
        let mut p = (app * 7 + j * 131) % PRODUCTS;
        while chosen.contains(&p) {
            p = (p + 1) % PRODUCTS;
        }
        chosen.push(p);
    }
    chosen
}

/// The catalog YAML (about 15 MB) and, per app, the request its last subscribed product covers.
fn catalog_yaml() -> String {
    let mut y = String::with_capacity(16 << 20);
    y.push_str("products:\n");
    for p in 0..PRODUCTS {
        let _ = writeln!(y, "  - name: p{p:05}\n    approval: auto");
        y.push_str("    quota: {limit: 1000000000000, unit: day}\n    operations:\n");
        for o in 0..OPS {
            let methods = if o % 2 == 0 { "[GET]" } else { "[GET, POST]" };
            let _ = writeln!(
                y,
                "      - {{api: api{}, paths: [/v1/p{p}/r{o}/**], methods: {methods}}}",
                p % APIS
            );
        }
    }
    y.push_str("developers:\n  - email: dev@bench.example\n    apps:\n");
    for app in 0..KEYS / KEYS_PER_APP {
        let _ = writeln!(
            y,
            "      - name: app{app:06}\n        status: approved\n        products:"
        );
        for p in subscriptions(app) {
            let _ = writeln!(y, "          - {{name: p{p:05}, status: approved}}");
        }
        y.push_str("        keys:\n");
        for k in 0..KEYS_PER_APP {
            let key = key_of(app * KEYS_PER_APP + k);
            let _ = writeln!(y, "          - {{hash: '{}'}}", KeyHash::of(&key));
        }
    }
    y.push_str("      - name: wide\n        products:\n");
    for p in 0..PRODUCTS {
        let _ = writeln!(y, "          - {{name: p{p:05}, status: approved}}");
    }
    let _ = writeln!(
        y,
        "        keys:\n          - {{hash: '{}'}}",
        KeyHash::of(WIDE_KEY)
    );
    y
}

fn build_catalog() -> Catalog {
    parse(&Source::from_text("bench.yaml", catalog_yaml())).expect("the generated catalog is valid") // invariant: built above
}

fn bench_keys(c: &mut Criterion, catalog: &Catalog) {
    assert_eq!(catalog.key_count(), KEYS + 1);
    let hashes: Vec<KeyHash> = (0..KEYS)
        .step_by(97)
        .map(|i| KeyHash::of(&key_of(i)))
        .collect();
    let raw: Vec<String> = (0..KEYS).step_by(97).map(key_of).collect();
    let mut g = c.benchmark_group("key_lookup_100k");
    let mut i = 0;
    g.bench_function("hashed_hit", |b| {
        b.iter(|| {
            i = (i + 1) % hashes.len();
            black_box(catalog.key(black_box(&hashes[i])).is_some())
        })
    });
    let mut i = 0;
    g.bench_function("sha256_and_hit", |b| {
        b.iter(|| {
            i = (i + 1) % raw.len();
            black_box(catalog.key(&KeyHash::of(black_box(&raw[i]))).is_some())
        })
    });
    g.bench_function("sha256_and_miss", |b| {
        b.iter(|| {
            black_box(
                catalog
                    .key(&KeyHash::of(black_box("tg_test_not_a_key")))
                    .is_none(),
            )
        })
    });
    g.finish();
}

fn bench_select(c: &mut Criterion, catalog: &Catalog) {
    let products = catalog.products();
    assert_eq!(products.len(), PRODUCTS);
    let app_of = |key: &str| {
        let k = catalog
            .key(&KeyHash::of(key))
            .expect("key is in the catalog"); // invariant: generated
        catalog.app(k.app).expect("key's app is in the catalog") // invariant: generated
    };
    let typical = app_of(&key_of(4_200));
    let typical_last = subscriptions(420)[SUBS - 1];
    let wide = app_of(WIDE_KEY);

    let mut g = c.benchmark_group("select_1k_products_x10_ops");
    let typical_path = format!("/v1/p{typical_last}/r{}/item/42", OPS - 1);
    let typical_api = format!("api{}", typical_last % APIS);
    let wide_path = format!("/v1/p{}/r{}/item/42", PRODUCTS - 1, OPS - 1);
    let wide_api = format!("api{}", (PRODUCTS - 1) % APIS);
    let cases = [
        (
            "app_with_5_products_last_matches",
            typical,
            &typical_api,
            &typical_path,
        ),
        (
            "app_with_1000_products_last_matches",
            wide,
            &wide_api,
            &wide_path,
        ),
        (
            "app_with_1000_products_none_matches",
            wide,
            &wide_api,
            &"/v2/nothing/here".to_owned(),
        ),
    ];
    for (name, app, api, raw_path) in cases {
        let safe = path::sanitize(raw_path).expect("bench paths are safe"); // invariant: fixed paths
        let target = Target {
            api,
            method: "GET",
            path: &safe,
        };
        let expect_covered = !raw_path.starts_with("/v2");
        assert_eq!(
            matches!(
                matching::select(products, &app.products, None, None, &target),
                Match::Covered { .. }
            ),
            expect_covered,
            "{name}"
        );
        g.bench_function(name, |b| {
            b.iter(|| {
                let subs = &app.products;
                black_box(matching::select(
                    products,
                    subs,
                    None,
                    None,
                    black_box(&target),
                ))
            })
        });
    }
    g.bench_function("sanitize_path", |b| {
        b.iter(|| black_box(path::sanitize(black_box("/v1/p523/r9/item/42?q=1")).is_ok()))
    });
    g.finish();
}

fn bench_plan(c: &mut Criterion, catalog: &Catalog) {
    let settings = Settings {
        api_context_extension: Some("tollgate_api".to_owned()),
        ..Default::default()
    };
    let last = subscriptions(420)[SUBS - 1];
    let path = format!("/v1/p{last}/r{}/item/42?q=1", OPS - 1);
    let headers: HashMap<String, String> = [
        (":authority", "bench.example.test"),
        (":method", "GET"),
        (":path", path.as_str()),
        (":scheme", "http"),
        ("user-agent", "wrk"),
        ("accept", "*/*"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "4f6c1f0e-0000-4000-8000-000000000000"),
        ("x-api-key", key_of(4_200).as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let extensions = HashMap::from([("tollgate_api".to_owned(), format!("api{}", last % APIS))]);
    let request = Request {
        method: "GET",
        path: &path,
        authority: "bench.example.test",
        headers: &headers,
        context_extensions: &extensions,
    };
    let key = key_of(4_200);
    let caller = Caller::ApiKey {
        key: key.as_str().into(),
    };
    let now = 1_790_000_000;
    assert!(matches!(
        check::plan(&request, &caller, catalog, &settings, now),
        Plan::Charge(_)
    ));
    c.bench_function("decision_plan_100k_keys_1k_products", |b| {
        b.iter(|| {
            black_box(check::plan(
                black_box(&request),
                &caller,
                catalog,
                &settings,
                now,
            ))
        })
    });
}

/// The price of selling through Stripe on the Check: the same small catalog (an app whose developer's customer
/// holds an active subscription; the request covered by the second product) with and without `stripe_prices`.
fn bench_plan_sold(c: &mut Criterion) {
    use tollgate::paywall::model::{PaidStatus, PaidSubscription, PriceItem, SubscriptionState};
    let key = "tg_test_bench_paid_key";
    let yaml = |sold: bool| {
        let prices = |p: &str| {
            if sold {
                format!("    stripe_prices: [price_{p}]\n")
            } else {
                String::new()
            }
        };
        let subscriptions = if sold {
            String::new()
        } else {
            "        products: [{name: starter}, {name: pro}]\n".to_owned()
        };
        format!(
            "products:\n  - name: free\n    operations: [{{api: a, paths: [/free]}}]\n\
             \x20 - name: starter\n{}    quota: {{limit: 1000000000, unit: day}}\n    operations: [{{api: a, paths: [/s/**]}}]\n\
             \x20 - name: pro\n{}    quota: {{limit: 1000000000, unit: day}}\n    operations: [{{api: a, paths: [/v1/**]}}]\n\
             developers:\n  - email: d@bench.example\n    stripe_customer: cus_bench\n    apps:\n\
             \x20     - name: paid\n{subscriptions}        keys: [{{hash: '{}'}}]\n",
            prices("starter"),
            prices("pro"),
            KeyHash::of(key)
        )
    };
    let settings = Settings {
        api_context_extension: Some("tollgate_api".to_owned()),
        stripe_grace: 3600,
        ..Default::default()
    };
    let headers: HashMap<String, String> =
        HashMap::from([("x-api-key".to_owned(), key.to_owned())]);
    let extensions = HashMap::from([("tollgate_api".to_owned(), "a".to_owned())]);
    let request = Request {
        method: "GET",
        path: "/v1/items/42",
        authority: "bench.example.test",
        headers: &headers,
        context_extensions: &extensions,
    };
    let caller = Caller::ApiKey { key: key.into() };
    let now = 1_790_000_000;
    let mut g = c.benchmark_group("decision_plan_stripe");
    for sold in [false, true] {
        let mut catalog =
            parse(&Source::from_text("sold.yaml", yaml(sold))).expect("the bench catalog is valid"); // invariant: built above
        catalog.put_customer(
            "cus_bench",
            vec![PaidSubscription {
                state: SubscriptionState {
                    id: "sub_bench".into(),
                    customer: "cus_bench".into(),
                    status: PaidStatus::Active,
                    items: vec![PriceItem {
                        price: "price_pro".into(),
                        lookup_key: None,
                    }],
                    period_start: Some(now),
                },
                past_due_since: None,
                as_of: now,
                source: "bench".into(),
            }],
        );
        assert!(matches!(
            check::plan(&request, &caller, &catalog, &settings, now),
            Plan::Charge(_)
        ));
        let name = if sold {
            "sold_through_stripe"
        } else {
            "subscribed_in_catalog"
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                black_box(check::plan(
                    black_box(&request),
                    &caller,
                    &catalog,
                    &settings,
                    now,
                ))
            })
        });
    }
    g.finish();
}

fn bench_windows(c: &mut Criterion) {
    let mut g = c.benchmark_group("window_at");
    let now = 1_790_000_000i64;
    for (name, unit, interval) in [
        ("minute", Unit::Minute, 1),
        ("hour_x2", Unit::Hour, 2),
        ("day", Unit::Day, 1),
        ("week", Unit::Week, 1),
        ("month", Unit::Month, 1),
        ("month_x3", Unit::Month, 3),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| black_box(window_at(black_box(now), unit, interval)))
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    let catalog = build_catalog();
    bench_keys(c, &catalog);
    bench_select(c, &catalog);
    bench_plan(c, &catalog);
    bench_plan_sold(c);
    bench_windows(c);
}

criterion_group! {
    name = catalog;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = benches
}
criterion_main!(catalog);
