//! The Redis quota store against real `redis-server` processes started by the tests on free loopback ports.

#[path = "support/redis.rs"]
mod redis_support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use redis_support::{RedisCluster, RedisConfig, RedisServer, TlsFiles};
use tollgate::quota::redis::{RedisOptions, RedisStore};
use tollgate::quota::{
    Charge, Hold, Limit, LimitState, Outcome, QuotaStore, Settled, StoreError, Unit,
};

/// 2026-11-18T...Z, an arbitrary instant: the store takes time from the charge, never from the clock.
const T0: i64 = 1_795_000_000;

/// Far above what any call here needs, so an overloaded CI machine does not fail a correct store; the
/// tests that stop Redis only assert that calls return.
const TEST_TIMEOUT: Duration = Duration::from_millis(1_000);

fn limit(limit: u64, unit: Unit) -> Limit {
    Limit {
        limit,
        interval: 1,
        unit,
    }
}

fn options(url: String, max_lease: u64) -> RedisOptions {
    RedisOptions {
        url,
        cluster: false,
        timeout: TEST_TIMEOUT,
        max_lease,
        replica: None,
    }
}

async fn store(url: String, max_lease: u64) -> RedisStore {
    RedisStore::connect(options(url, max_lease), &Registry::new())
        .await
        .expect("connect the Redis store")
}

async fn charge(
    store: &RedisStore,
    bucket: &str,
    limits: &[Limit],
    cost: u64,
    now: i64,
) -> Outcome {
    store
        .charge(&Charge {
            bucket,
            limits,
            cost,
            now,
        })
        .await
        .expect("charge")
}

fn allowed(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Allowed(_))
}

/// `HGET key field` as a count (0 when absent); a negative or garbled value fails the test.
fn hget(server: &RedisServer, key: &str, field: &str) -> u64 {
    let out = server.cli(&["HGET", key, field]);
    let out = out.trim();
    if out.is_empty() {
        return 0;
    }
    out.parse()
        .unwrap_or_else(|_| panic!("{key} {field} is {out:?}, not a count"))
}

/// Every store runs `tasks_per_store` concurrent tasks of `per_task` calls on one bucket; returns the
/// calls allowed per store and the total refused.
async fn hammer(
    stores: &[Arc<RedisStore>],
    tasks_per_store: usize,
    per_task: usize,
    limits: &'static [Limit],
    now: i64,
) -> (Vec<u64>, u64) {
    let mut handles = Vec::new();
    for (i, s) in stores.iter().enumerate() {
        for _ in 0..tasks_per_store {
            let s = Arc::clone(s);
            handles.push(tokio::spawn(async move {
                let mut allowed_here = 0u64;
                let mut denied_here = 0u64;
                for _ in 0..per_task {
                    match charge(&s, "app/product/op", limits, 1, now).await {
                        Outcome::Allowed(_) => allowed_here += 1,
                        Outcome::Exceeded(_) => denied_here += 1,
                    }
                }
                (i, allowed_here, denied_here)
            }));
        }
    }
    let mut per_store = vec![0u64; stores.len()];
    let mut denied = 0;
    for h in handles {
        let (i, a, d) = h.await.expect("task");
        per_store[i] += a;
        denied += d;
    }
    (per_store, denied)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_allow_exactly_the_limit_and_redis_records_what_they_allowed() {
    static LIMITS: [Limit; 1] = [Limit {
        limit: 1_000,
        interval: 1,
        unit: Unit::Day,
    }];
    let server = RedisServer::start();
    for max_lease in [0, 64] {
        server.cli(&["FLUSHALL"]);
        let stores: Vec<Arc<RedisStore>> = vec![
            Arc::new(store(server.url(), max_lease).await),
            Arc::new(store(server.url(), max_lease).await),
            Arc::new(store(server.url(), max_lease).await),
        ];
        // 3 replicas x 4 tasks x 300 calls = 3,600 calls for 1,000 units. Each replica alone makes more
        // calls than the limit, so none can end holding an unspent lease: the count must be exact.
        let (per_store, denied) = hammer(&stores, 4, 300, &LIMITS, T0).await;
        let total: u64 = per_store.iter().sum();
        assert_eq!(total, 1_000, "max_lease {max_lease}: allowed {per_store:?}");
        assert_eq!(denied, 2_600, "max_lease {max_lease}");
        for s in &stores {
            s.flush().await.expect("flush");
        }
        let key = RedisStore::key_for("app/product/op", &LIMITS[0], T0);
        assert_eq!(hget(&server, &key, "used"), total, "max_lease {max_lease}");
        assert_eq!(hget(&server, &key, "reserved"), 0, "max_lease {max_lease}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_serve_locally_and_come_back_when_returned() {
    let server = RedisServer::start();
    let registry = Registry::new();
    let a = RedisStore::connect(options(server.url(), 50), &registry)
        .await
        .expect("connect a");
    let b = store(server.url(), 50).await;
    let limits = [limit(100, Unit::Hour)];
    // The first call takes a lease: 1 charged + min(50, (100 - 1) / 8) = 12 reserved.
    assert!(allowed(&charge(&a, "bkt", &limits, 1, T0).await));
    let key = RedisStore::key_for("bkt", &limits[0], T0);
    assert_eq!(hget(&server, &key, "used"), 1);
    assert_eq!(hget(&server, &key, "reserved"), 12);
    for _ in 0..4 {
        assert!(allowed(&charge(&a, "bkt", &limits, 1, T0).await));
    }
    assert_eq!(counter(&registry, "quota_local_charges_total"), 4);
    // Replica b spends everything that is not leased to a, then is refused while a still holds 8 units
    // (unless a's idle lease was already returned in the background, which only gives b more).
    let mut b_allowed = 0;
    loop {
        match charge(&b, "bkt", &limits, 1, T0).await {
            Outcome::Allowed(_) => b_allowed += 1,
            Outcome::Exceeded(s) => {
                assert_eq!(s.limit, 100);
                break;
            }
        }
        assert!(b_allowed <= 100, "b was never refused");
    }
    assert!(b_allowed == 87 || b_allowed == 95, "b allowed {b_allowed}");
    a.flush().await.expect("flush a");
    assert_eq!(hget(&server, &key, "reserved"), 0);
    let mut b_after = 0;
    while allowed(&charge(&b, "bkt", &limits, 1, T0).await) {
        b_after += 1;
        assert!(b_after <= 100, "b was never refused");
    }
    // a returned exactly what it did not serve.
    assert_eq!(5 + b_allowed + b_after, 100);
    b.flush().await.expect("flush b");
    assert_eq!(hget(&server, &key, "used"), 100);
    assert_eq!(hget(&server, &key, "reserved"), 0);
    assert_eq!(counter(&registry, "quota_lease_units_returned_total"), 8);
}

fn counter(registry: &Registry, name: &str) -> u64 {
    registry
        .gather()
        .into_iter()
        .find(|f| f.name() == name)
        .and_then(|f| f.get_metric().first().map(|m| m.get_counter().get_value()))
        .unwrap_or(0.0) as u64
}

#[tokio::test]
async fn a_new_window_starts_from_zero_and_old_leases_are_settled() {
    let server = RedisServer::start();
    let s = store(server.url(), 100).await;
    let limits = [limit(40, Unit::Minute)];
    let minute = T0 - T0.rem_euclid(60);
    let mut first = 0;
    while allowed(&charge(&s, "roll", &limits, 1, minute + 5).await) {
        first += 1;
        assert!(first <= 40);
    }
    assert_eq!(first, 40);
    // Same window, later second: still refused, and the reset counts down to the window's end.
    match charge(&s, "roll", &limits, 1, minute + 59).await {
        Outcome::Exceeded(LimitState {
            limit: 40,
            remaining: 0,
            reset_secs: 1,
        }) => {}
        other => panic!("expected exhaustion, got {other:?}"),
    }
    // The next minute: a fresh window.
    let mut second = 0;
    for _ in 0..10 {
        if allowed(&charge(&s, "roll", &limits, 1, minute + 60).await) {
            second += 1;
        }
    }
    assert_eq!(second, 10);
    let old = RedisStore::key_for("roll", &limits[0], minute);
    let new = RedisStore::key_for("roll", &limits[0], minute + 60);
    assert_ne!(old, new);
    assert_eq!(hget(&server, &old, "used"), 40);
    assert_eq!(hget(&server, &old, "reserved"), 0);
    // The old key expires after its window (plus grace); the TTL is relative to the charge's time.
    let ttl: i64 = server.cli(&["TTL", &old]).trim().parse().expect("ttl");
    assert!(ttl > 0 && ttl <= 55 + 120, "ttl {ttl}");
    s.flush().await.expect("flush");
    assert_eq!(hget(&server, &new, "used"), 10);
    assert_eq!(hget(&server, &new, "reserved"), 0);
    // Sweeping past the new window forgets it locally; nothing is left reserved.
    s.sweep(minute + 121).await;
    assert_eq!(hget(&server, &new, "reserved"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_limit_must_fit_and_a_refused_call_spends_nothing() {
    let server = RedisServer::start();
    for max_lease in [0, 100] {
        server.cli(&["FLUSHALL"]);
        let a = store(server.url(), max_lease).await;
        let b = store(server.url(), max_lease).await;
        let limits = [limit(500, Unit::Month), limit(2, Unit::Second)];
        // Two replicas, two calls each in the same second: exactly 2 pass.
        let mut passed = 0;
        for s in [&a, &b, &a, &b] {
            if allowed(&charge(s, "multi", &limits, 1, T0).await) {
                passed += 1;
            }
        }
        assert_eq!(passed, 2, "max_lease {max_lease}");
        match charge(&a, "multi", &limits, 1, T0).await {
            Outcome::Exceeded(s) => assert_eq!(s.limit, 2),
            other => panic!("expected the spike limit, got {other:?}"),
        }
        // Over 300 seconds at 2 per second, the month sees exactly 500 and then refuses.
        let mut month = 2;
        for t in 1..=300 {
            for s in [&a, &b, &a] {
                if allowed(&charge(s, "multi", &limits, 1, T0 + t).await) {
                    month += 1;
                }
            }
        }
        assert_eq!(month, 500, "max_lease {max_lease}");
        a.flush().await.expect("flush");
        b.flush().await.expect("flush");
        let key = RedisStore::key_for("multi", &limits[0], T0);
        assert_eq!(hget(&server, &key, "used"), 500);
        assert_eq!(hget(&server, &key, "reserved"), 0);
        // A cost that does not fit the month spends nothing anywhere.
        let roomy = [limit(500, Unit::Month), limit(1_000, Unit::Second)];
        match charge(&a, "multi", &roomy, 3, T0 + 400).await {
            Outcome::Exceeded(s) => assert_eq!((s.limit, s.remaining), (500, 0)),
            other => panic!("expected the month, got {other:?}"),
        }
        let second = RedisStore::key_for("multi", &roomy[1], T0 + 400);
        assert_eq!(hget(&server, &second, "used"), 0);
    }
}

#[tokio::test]
async fn leases_span_every_limit_and_stay_exact() {
    let server = RedisServer::start();
    let s = store(server.url(), 100).await;
    // Leasing is safe here: 1000/hour and 200/minute both have room.
    let limits = [limit(1_000, Unit::Hour), limit(200, Unit::Minute)];
    let minute = T0 - T0.rem_euclid(3_600);
    let mut in_minute = 0;
    while allowed(&charge(&s, "span", &limits, 1, minute).await) {
        in_minute += 1;
        assert!(in_minute <= 200);
    }
    assert_eq!(in_minute, 200);
    s.flush().await.expect("flush");
    let hour = RedisStore::key_for("span", &limits[0], minute);
    let min = RedisStore::key_for("span", &limits[1], minute);
    assert_eq!(hget(&server, &hour, "used"), 200);
    assert_eq!(hget(&server, &min, "used"), 200);
    assert_eq!(hget(&server, &hour, "reserved"), 0);
}

#[tokio::test]
async fn usage_reads_what_redis_counted_and_what_is_leased() {
    let server = RedisServer::start();
    let exact = store(server.url(), 0).await;
    let leasing = store(server.url(), 100).await;
    let limits = [limit(1_000, Unit::Hour), limit(500, Unit::Day)];
    let now = T0;
    for _ in 0..7 {
        assert!(allowed(&charge(&exact, "read", &limits, 1, now).await));
    }
    let usage = exact.usage("read", &limits, now).await.expect("usage");
    assert_eq!(
        usage
            .iter()
            .map(|u| (u.used, u.reserved))
            .collect::<Vec<_>>(),
        [(7, 0), (7, 0)]
    );
    assert_eq!(usage[1].window, limits[1].window(now));
    assert_eq!(
        exact
            .usage("read", &limits, now)
            .await
            .expect("usage again"),
        usage,
        "reading charges nothing"
    );
    // Units served from a lease are reported to Redis later: meanwhile they are reserved, so the true count
    // lies between used and used + reserved, and the other replica sees it.
    for _ in 0..5 {
        assert!(allowed(&charge(&leasing, "read", &limits, 1, now).await));
    }
    for u in exact
        .usage("read", &limits, now)
        .await
        .expect("usage with a lease")
    {
        assert!(u.used >= 7 && u.used <= 12, "{u:?}");
        assert!(u.used + u.reserved >= 12, "{u:?}");
    }
    leasing.flush().await.expect("flush");
    let settled = exact
        .usage("read", &limits, now)
        .await
        .expect("usage settled");
    assert!(
        settled.iter().all(|u| (u.used, u.reserved) == (12, 0)),
        "{settled:?}"
    );
    let nothing = exact
        .usage("never-charged", &limits, now)
        .await
        .expect("usage");
    assert!(nothing.iter().all(|u| u.used == 0 && u.reserved == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_redis_fails_fast_and_a_restarted_one_is_used_again() {
    let mut server = RedisServer::start();
    let s = RedisStore::connect(
        RedisOptions {
            url: server.url(),
            cluster: false,
            timeout: Duration::from_millis(200),
            max_lease: 0,
            replica: None,
        },
        &Registry::new(),
    )
    .await
    .expect("connect");
    let limits = [limit(1_000, Unit::Day)];
    assert!(allowed(&charge(&s, "k", &limits, 1, T0).await));
    s.ping().await.expect("ping while up");
    server.stop();
    // Every call returns (an error), none hangs; the outer bound only catches a hang.
    for _ in 0..3 {
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            s.charge(&Charge {
                bucket: "k",
                limits: &limits,
                cost: 1,
                now: T0,
            }),
        )
        .await
        .expect("a charge against a dead Redis must return");
        assert!(
            matches!(result, Err(StoreError::Timeout | StoreError::Backend(_))),
            "{result:?}"
        );
        let ping = tokio::time::timeout(Duration::from_secs(10), s.ping())
            .await
            .expect("ping must return");
        assert!(ping.is_err());
    }
    server.restart();
    // Same store, no reconnect by hand: the client reconnects in the background.
    let mut recovered = false;
    for _ in 0..100 {
        if let Ok(Outcome::Allowed(_)) = s
            .charge(&Charge {
                bucket: "k",
                limits: &limits,
                cost: 1,
                now: T0,
            })
            .await
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the store never recovered after the restart");
    s.ping().await.expect("ping after restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_lost_to_a_timeout_is_undone_by_the_next_one() {
    // Redis is paused while a lease renewal is in flight: the caller times out, but Redis may still run
    // the call afterwards (a phantom charge and lease). The next call reports absolute totals, which
    // undoes both, so the count stays exact; the part of the lease the lost call kept is served as usual.
    let server = RedisServer::start();
    let s = RedisStore::connect(
        RedisOptions {
            url: server.url(),
            cluster: false,
            timeout: Duration::from_millis(100),
            max_lease: 50,
            replica: None,
        },
        &Registry::new(),
    )
    .await
    .expect("connect");
    let limits = [limit(100, Unit::Day)];
    let key = RedisStore::key_for("lost", &limits[0], T0);
    let mut allowed_total = 0;
    // 1 charged + 12 leased; serve 8 from the lease, which stays above the prefetch threshold (12 / 4).
    for _ in 0..9 {
        assert!(allowed(&charge(&s, "lost", &limits, 1, T0).await));
        allowed_total += 1;
    }
    assert_eq!(hget(&server, &key, "reserved"), 12);
    server.cli(&["CLIENT", "PAUSE", "1500", "ALL"]);
    // 5 units do not fit the 4 left: a renewal that keeps those 4 and charges 5.
    let lost = s
        .charge(&Charge {
            bucket: "lost",
            limits: &limits,
            cost: 5,
            now: T0,
        })
        .await;
    assert!(lost.is_err(), "{lost:?}");
    // Blocks until the pause ends.
    server.cli(&["PING"]);
    // Either Redis ran the lost call after the pause (1 + 8 served + its phantom charge of 5; the 4 kept
    // plus a phantom lease of min(50 - 4, (100 - 9 - 4 - 5) / 8) = 10) or it never ran (1 charged, 12
    // leased, 8 of them served but not yet reported).
    let after_pause = (hget(&server, &key, "used"), hget(&server, &key, "reserved"));
    assert!(
        after_pause == (14, 14) || after_pause == (1, 12),
        "{after_pause:?}"
    );
    let mut recovered = false;
    for _ in 0..100 {
        match s
            .charge(&Charge {
                bucket: "lost",
                limits: &limits,
                cost: 1,
                now: T0,
            })
            .await
        {
            Ok(Outcome::Allowed(_)) => {
                allowed_total += 1;
                recovered = true;
                break;
            }
            Ok(other) => panic!("refused with room left: {other:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(recovered, "the store never answered after the pause");
    while allowed(&charge(&s, "lost", &limits, 1, T0).await) {
        allowed_total += 1;
        assert!(allowed_total <= 100);
    }
    s.flush().await.expect("flush");
    assert_eq!(allowed_total, 100);
    assert_eq!(hget(&server, &key, "used"), 100);
    assert_eq!(hget(&server, &key, "reserved"), 0);
}

#[tokio::test]
async fn password_urls_work_and_a_wrong_password_is_an_error_without_it() {
    let server = RedisServer::start_with(RedisConfig {
        password: Some("Sup3r-s3cret".into()),
        ..RedisConfig::default()
    });
    let s = store(server.url(), 10).await;
    assert!(allowed(
        &charge(&s, "pw", &[limit(5, Unit::Day)], 1, T0).await
    ));
    s.ping().await.expect("ping");

    let wrong = format!("redis://:Wr0ng-pa55word@127.0.0.1:{}", server.port);
    let err = RedisStore::connect(options(wrong, 10), &Registry::new())
        .await
        .expect_err("a wrong password must be refused");
    let text = format!("{err} {err:?}");
    assert!(!text.contains("Wr0ng-pa55word"), "{text}");
    assert!(!text.contains("Sup3r-s3cret"), "{text}");

    let missing = format!("redis://127.0.0.1:{}", server.port);
    let err = RedisStore::connect(options(missing, 10), &Registry::new())
        .await
        .expect_err("no password must be refused");
    assert!(!format!("{err:?}").contains("Sup3r-s3cret"));
}

#[tokio::test]
async fn metrics_are_registered_on_the_given_registry() {
    let server = RedisServer::start();
    let registry = Registry::new_custom(Some("tollgate".into()), None).expect("registry");
    let s = RedisStore::connect(options(server.url(), 10), &registry)
        .await
        .expect("connect");
    for _ in 0..5 {
        charge(&s, "m", &[limit(1_000, Unit::Day)], 1, T0).await;
    }
    let names: Vec<String> = registry
        .gather()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    for wanted in [
        "tollgate_quota_store_duration_seconds",
        "tollgate_quota_redis_errors_total",
        "tollgate_quota_redis_calls_total",
        "tollgate_quota_leases_total",
        "tollgate_quota_lease_units_total",
        "tollgate_quota_lease_units_returned_total",
        "tollgate_quota_local_charges_total",
    ] {
        assert!(names.iter().any(|n| n == wanted), "{wanted} in {names:?}");
    }
    assert_eq!(counter(&registry, "tollgate_quota_local_charges_total"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_keeps_a_buckets_keys_on_one_slot() {
    let cluster = RedisCluster::start();
    let connect = || async {
        RedisStore::connect(
            RedisOptions {
                url: cluster.urls(),
                cluster: true,
                timeout: TEST_TIMEOUT,
                max_lease: 20,
                replica: None,
            },
            &Registry::new(),
        )
        .await
        .expect("connect to the cluster")
    };
    let a = Arc::new(connect().await);
    let b = Arc::new(connect().await);
    let limits = [limit(300, Unit::Day), limit(100, Unit::Minute)];
    // Buckets spread over the three masters; each is counted exactly.
    for bucket in ["alpha", "bravo", "charlie", "delta", "echo"] {
        let mut passed = 0;
        for i in 0..150 {
            let s = if i % 2 == 0 { &a } else { &b };
            if allowed(&charge(s, bucket, &limits, 1, T0).await) {
                passed += 1;
            }
        }
        assert_eq!(passed, 100, "bucket {bucket}");
    }
    a.flush().await.expect("flush a");
    b.flush().await.expect("flush b");
    for bucket in ["alpha", "bravo", "charlie", "delta", "echo"] {
        let key = RedisStore::key_for(bucket, &limits[0], T0);
        let used = cluster.cli(&["HGET", &key, "used"]);
        assert_eq!(used.trim(), "100", "{bucket}");
    }
    let slots: std::collections::HashSet<String> = ["alpha", "bravo", "charlie", "delta", "echo"]
        .iter()
        .map(|b| {
            cluster.cli(&[
                "CLUSTER",
                "KEYSLOT",
                &RedisStore::key_for(b, &limits[0], T0),
            ])
        })
        .collect();
    assert!(
        slots.len() > 1,
        "the buckets should land on different slots"
    );
}

#[test]
fn tls_with_a_private_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = TlsFiles::generate(dir.path());
    let server = RedisServer::start_with(RedisConfig {
        password: Some("tls-pw".into()),
        tls: Some((tls.cert.clone(), tls.key.clone(), tls.ca_cert.clone())),
        cluster: false,
    });
    // The CA is trusted through SSL_CERT_FILE, which is process-wide: the check runs in a child process
    // (this test binary, filtered to the ignored probe below).
    let exe = std::env::current_exe().expect("current_exe");
    let run = |ca: Option<&std::path::Path>, expect: &str| {
        let mut cmd = Command::new(&exe);
        cmd.args(["--ignored", "--exact", "tls_probe", "--nocapture"])
            .env("TOLLGATE_TLS_PROBE_URL", server.url())
            .env("TOLLGATE_TLS_PROBE_EXPECT", expect);
        match ca {
            Some(ca) => cmd.env("SSL_CERT_FILE", ca),
            None => cmd.env("SSL_CERT_FILE", dir.path().join("missing-bundle.pem")),
        };
        let out = cmd.output().expect("run the TLS probe");
        assert!(
            out.status.success(),
            "probe ({expect}) failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("1 passed"), "probe did not run:\n{stdout}");
    };
    run(Some(&tls.ca_cert), "ok");
    run(None, "error");
}

#[tokio::test]
#[ignore = "run by tls_with_a_private_ca in a child process with SSL_CERT_FILE set"]
async fn tls_probe() {
    let url = std::env::var("TOLLGATE_TLS_PROBE_URL").expect("TOLLGATE_TLS_PROBE_URL");
    let expect = std::env::var("TOLLGATE_TLS_PROBE_EXPECT").expect("TOLLGATE_TLS_PROBE_EXPECT");
    assert!(url.starts_with("rediss://"));
    let connected = RedisStore::connect(options(url, 10), &Registry::new()).await;
    let limits = [limit(3, Unit::Day)];
    let call = Charge {
        bucket: "tls",
        limits: &limits,
        cost: 1,
        now: T0,
    };
    if expect == "ok" {
        let s = connected.expect("connect over TLS");
        s.ping().await.expect("ping over TLS");
        assert!(allowed(&s.charge(&call).await.expect("charge over TLS")));
    } else {
        // An untrusted certificate: either the connect or the first call fails.
        if let Ok(s) = connected {
            assert!(s.charge(&call).await.is_err());
            assert!(s.ping().await.is_err());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_bucket_stays_exact_while_leases_renew_under_concurrent_tasks() {
    static ROOMY: [Limit; 1] = [Limit {
        limit: 1_000_000,
        interval: 1,
        unit: Unit::Day,
    }];
    static TIGHT: [Limit; 1] = [Limit {
        limit: 2_000,
        interval: 1,
        unit: Unit::Day,
    }];
    let server = RedisServer::start();
    let stores: Vec<Arc<RedisStore>> = vec![
        Arc::new(store(server.url(), 100).await),
        Arc::new(store(server.url(), 100).await),
    ];
    // Far from the limit: 2 replicas x 8 tasks x 1,500 calls on one bucket, leases of 100 renewed in the
    // background while the other tasks keep spending the rest of the lease.
    let (per_store, denied) = hammer(&stores, 8, 1_500, &ROOMY, T0).await;
    assert_eq!(per_store, vec![12_000, 12_000]);
    assert_eq!(denied, 0);
    let key = RedisStore::key_for("app/product/op", &ROOMY[0], T0);
    // No replica ever holds more than max_lease, renewals ahead of time included.
    for s in &stores {
        let held = hget(&server, &key, &format!("r:{}", s.replica_id()));
        assert!(held <= 100, "replica holds {held}");
    }
    assert!(hget(&server, &key, "reserved") <= 200);
    for s in &stores {
        s.flush().await.expect("flush");
    }
    assert_eq!(hget(&server, &key, "used"), 24_000);
    assert_eq!(hget(&server, &key, "reserved"), 0);
    // Up to the limit, the next day: each replica alone makes more calls than the limit, so none ends
    // holding an unspent lease and the count must be exact.
    let next_day = T0 + 86_400;
    let (per_store, denied) = hammer(&stores, 8, 300, &TIGHT, next_day).await;
    let total: u64 = per_store.iter().sum();
    assert_eq!(total, 2_000, "allowed {per_store:?}");
    assert_eq!(denied, 2 * 8 * 300 - 2_000);
    for s in &stores {
        s.flush().await.expect("flush");
    }
    let key = RedisStore::key_for("app/product/op", &TIGHT[0], next_day);
    assert_eq!(hget(&server, &key, "used"), 2_000);
    assert_eq!(hget(&server, &key, "reserved"), 0);
}

#[tokio::test]
async fn leases_are_renewed_before_they_run_out() {
    let server = RedisServer::start();
    let registry = Registry::new();
    let s = RedisStore::connect(options(server.url(), 100), &registry)
        .await
        .expect("connect");
    let limits = [limit(1_000_000, Unit::Day)];
    for _ in 0..1_000 {
        assert!(allowed(&charge(&s, "ahead", &limits, 1, T0).await));
    }
    // Only the first call charged Redis itself: every later lease was taken while units were left, so
    // every other call was served locally (at worst after waiting for the renewal already in flight).
    assert_eq!(counter(&registry, "quota_local_charges_total"), 999);
    // The first lease is 100; each renewal keeps what is left (at most 100 / 4) and tops it up to at most
    // 100, so 999 units served locally took at least 10 leases.
    assert!(counter(&registry, "quota_leases_total") >= 10);
    let key = RedisStore::key_for("ahead", &limits[0], T0);
    let held = hget(&server, &key, &format!("r:{}", s.replica_id()));
    assert!(held <= 100, "holds {held}");
    assert_eq!(hget(&server, &key, "reserved"), held);
    // Redis counts what was reported; the rest of the 1,000 is in the lease.
    let used = hget(&server, &key, "used");
    assert!(
        used <= 1_000 && used + held >= 1_000,
        "used {used}, held {held}"
    );
    s.flush().await.expect("flush");
    assert_eq!(hget(&server, &key, "used"), 1_000);
    assert_eq!(hget(&server, &key, "reserved"), 0);
    assert_eq!(
        counter(&registry, "quota_lease_units_total") + 1 - 1_000,
        counter(&registry, "quota_lease_units_returned_total")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_reclaims_the_leases_it_died_holding() {
    let server = RedisServer::start();
    let limits = [limit(100, Unit::Hour)];
    let key = RedisStore::key_for("bkt", &limits[0], T0);
    let replica = |boot| tollgate::quota::redis::ReplicaId {
        id: "feedc0de".into(),
        boot,
    };
    let connect = |replica| {
        let options = RedisOptions {
            replica: Some(replica),
            ..options(server.url(), 50)
        };
        async move {
            RedisStore::connect(options, &Registry::new())
                .await
                .expect("connect")
        }
    };
    let first = connect(replica(1)).await;
    for _ in 0..3 {
        assert!(allowed(&charge(&first, "bkt", &limits, 1, T0).await));
    }
    assert_eq!(hget(&server, &key, "reserved"), 12);
    // Dies holding its lease: nothing is flushed.
    drop(first);

    let second = connect(replica(2)).await;
    assert!(allowed(&charge(&second, "bkt", &limits, 1, T0).await));
    // The old lease was released by the first call under the same id; only the new one is reserved. Under
    // a fresh id the old 12 units would stay reserved until the window ends. The two units the first
    // process served from its lease were never reported: they are the documented cost of a kill -9.
    assert_eq!(hget(&server, &key, "used"), 2);
    assert_eq!(
        hget(&server, &key, "r:feedc0de"),
        hget(&server, &key, "reserved")
    );
    assert_eq!(hget(&server, &key, "reserved"), (100 - 2) / 8);
    second.flush().await.expect("flush");
    assert_eq!(hget(&server, &key, "reserved"), 0);
    assert_eq!(
        hget(&server, &key, "used"),
        2,
        "reported units stay counted"
    );
}

/// Token quota holds (CONTRACT §11), the same steps on every store: a reserve settled down gives room back,
/// settled up passes the limit (the overrun a reservation allows) and then admits nothing; a hold past its
/// timeout is released once, and its late settlement counts afresh; a refund never goes below zero; a window
/// that is over is left alone.
async fn holds_settle_and_release_the_charged_window(store: &dyn QuotaStore) {
    let limits = [limit(1000, Unit::Day)];
    let bucket = "tokens/llm";
    let hold = |id: &'static str, at: i64| Hold {
        id,
        bucket,
        limits: &limits,
        reserve: 500,
        at,
        until: at + 60,
    };
    let spend = |cost: u64, now: i64| async move {
        store
            .reserve(&Charge {
                bucket,
                limits: &limits,
                cost,
                now,
            })
            .await
            .expect("reserve")
    };
    let used = |now: i64| async move {
        let usage = store.usage(bucket, &limits, now).await.expect("usage");
        usage[0].used + usage[0].reserved
    };
    for id in ["a", "b"] {
        assert!(allowed(&spend(500, T0).await));
        store.hold(&hold(id, T0)).await.expect("hold");
    }
    assert!(
        !allowed(&spend(500, T0).await),
        "a third reserve does not fit"
    );
    assert_eq!(
        store.settle(&hold("a", T0), 100).await.expect("settle"),
        Settled::Held
    );
    assert_eq!(used(T0).await, 600);
    assert!(allowed(&spend(300, T0 + 1).await), "the refund made room");
    assert_eq!(
        store
            .settle(&hold("never-held", T0), 800)
            .await
            .expect("settle"),
        Settled::Held
    );
    assert_eq!(used(T0).await, 1200, "settled past the limit");
    assert!(
        !allowed(&spend(1, T0 + 2).await),
        "a window past its limit admits nothing"
    );

    // "b" times out: released once, whoever asks; its late settlement adds its count afresh.
    assert_eq!(
        store.release_expired(T0 + 30).await.expect("release"),
        0,
        "not due yet"
    );
    assert_eq!(store.release_expired(T0 + 61).await.expect("release"), 1);
    assert_eq!(
        store.release_expired(T0 + 62).await.expect("release"),
        0,
        "released once"
    );
    assert_eq!(used(T0).await, 700);
    assert_eq!(
        store.settle(&hold("b", T0), 250).await.expect("settle"),
        Settled::Released
    );
    assert_eq!(used(T0).await, 950);

    // Never below zero; yesterday's window is left alone.
    assert!(allowed(&spend(0, T0).await));
    store.hold(&hold("c", T0)).await.expect("hold");
    assert_eq!(
        store.settle(&hold("c", T0), 0).await.expect("settle"),
        Settled::Held
    );
    assert_eq!(used(T0).await, 450);
    store.hold(&hold("d", T0 - 86_400)).await.expect("hold");
    store
        .settle(&hold("d", T0 - 86_400), 0)
        .await
        .expect("settle");
    assert_eq!(used(T0).await, 450);
    store.hold(&hold("e", T0)).await.expect("hold");
    store.settle(&hold("e", T0), 0).await.expect("settle");
    assert_eq!(
        used(T0).await,
        0,
        "a refund larger than the count stops at zero"
    );
}

/// Small reserves below `max_lease` are never served from a lease: a settlement must not be undone by a lease
/// reported later, and a bucket name with any character (a portal account `auth0|…`) releases cleanly.
async fn small_reserves_settle_exactly(store: &RedisStore) {
    let limits = [limit(1000, Unit::Day)];
    let bucket = "\u{1e}auth0|5f7c8ec7\u{1f}llm";
    for id in ["s1", "s2", "s3"] {
        let charged = store
            .reserve(&Charge {
                bucket,
                limits: &limits,
                cost: 50,
                now: T0,
            })
            .await
            .expect("reserve");
        assert!(allowed(&charged));
        let hold = Hold {
            id,
            bucket,
            limits: &limits,
            reserve: 50,
            at: T0,
            until: T0 + 10,
        };
        store.hold(&hold).await.expect("hold");
        if id != "s3" {
            store.settle(&hold, 0).await.expect("settle");
        }
    }
    store.flush().await.expect("flush");
    let used = |now: i64| async move {
        let usage = store.usage(bucket, &limits, now).await.expect("usage");
        usage[0].used + usage[0].reserved
    };
    assert_eq!(used(T0).await, 50, "two settled to 0, one still held");
    assert_eq!(store.release_expired(T0 + 11).await.expect("release"), 1);
    assert_eq!(used(T0).await, 0);
    let late = Hold {
        id: "s3",
        bucket,
        limits: &limits,
        reserve: 50,
        at: T0,
        until: T0 + 10,
    };
    assert_eq!(
        store.settle(&late, 20).await.expect("late"),
        Settled::Released
    );
    assert_eq!(used(T0).await, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_are_the_same_on_every_store() {
    holds_settle_and_release_the_charged_window(&tollgate::quota::memory::MemoryStore::new()).await;
    let server = RedisServer::start();
    for max_lease in [0, 100] {
        server.cli(&["FLUSHALL"]);
        let redis = store(server.url(), max_lease).await;
        holds_settle_and_release_the_charged_window(&redis).await;
        small_reserves_settle_exactly(&redis).await;
    }
}
