//! Quotas shared on Redis, end to end: two tollgate replicas behind one real Envoy 1.40 and a real
//! `redis-server` never allow more than a quota between them, account for every leased unit, and fail as the
//! operator chose (deny: 503, allow: 200) while Redis is away, recovering without a restart.

mod support;

use std::sync::Arc;

use support::{
    EchoUpstream, Envoy, RedisServer, Tollgate, envoy_config_replicas, http_client, key_hash,
    poll_until,
};

const KEY: &str = "tg_test_RedisQuotaKeyk7Kp4aggzLahAQ5tvTRefxE";

fn catalog(limit: u64) -> String {
    format!(
        r#"
products:
  - name: shared
    quota: {{limit: {limit}, unit: day}}
    operations:
      - {{api: weatherapi, paths: [/**]}}
      - {{api: geo.example.test, paths: [/**]}}
developers:
  - email: dev@example.test
    apps:
      - name: app
        products: [{{name: shared}}]
        keys: [{{hash: "{hash}"}}]
"#,
        hash = key_hash(KEY)
    )
}

fn config(redis_url: &str, extra: &str) -> String {
    format!(
        "environment: test
catalog:
  path: catalog.yaml
identity:
  api_key: {{headers: [x-api-key]}}
api_context_extension: tollgate_api
# The geo.example.test route sets no extension: its API is its host.
api_host_fallback: true
quota:
  store: redis
  redis_url: {redis_url}
{extra}"
    )
}

struct Replicas {
    envoy: Envoy,
    replicas: Vec<Tollgate>,
    _upstream: EchoUpstream,
    client: reqwest::Client,
}

async fn start(config: &str, catalog: &str) -> Replicas {
    let upstream = EchoUpstream::start();
    let a = Tollgate::start(config, catalog).await;
    let b = Tollgate::start(config, catalog).await;
    let envoy = Envoy::start(&envoy_config_replicas(
        &[a.grpc_port, b.grpc_port],
        upstream.port,
    ))
    .await;
    Replicas {
        envoy,
        replicas: vec![a, b],
        _upstream: upstream,
        client: http_client(),
    }
}

async fn call(r: &Replicas, host: Option<&str>) -> u16 {
    let mut request = r
        .client
        .get(r.envoy.url("/forecast"))
        .header("x-api-key", KEY);
    if let Some(host) = host {
        request = request.header("host", host);
    }
    request
        .send()
        .await
        .expect("request through envoy")
        .status()
        .as_u16()
}

/// Sum of Redis `used` and `reserved` over every quota key.
fn redis_used_reserved(redis: &RedisServer) -> (u64, u64) {
    let keys = redis.cli(&["--scan", "--pattern", "tollgate:quota:*"]);
    let (mut used, mut reserved) = (0, 0);
    for key in keys.lines().filter(|k| !k.is_empty()) {
        let fields = redis.cli(&["HMGET", key, "used", "reserved"]);
        let mut values = fields.lines().map(|v| v.trim().parse::<u64>().unwrap_or(0));
        used += values.next().unwrap_or(0);
        reserved += values.next().unwrap_or(0);
    }
    (used, reserved)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_exceed_a_quota_and_account_for_every_lease() {
    const LIMIT: u64 = 1_000;
    const SENT: usize = 1_300;
    let redis = RedisServer::start();
    // What this test checks is exactness, not the store's deadline: a deadline below Envoy's 0.5 s
    // ext_authz timeout but far above the default 50 ms keeps a loaded CI machine from turning slow Redis
    // answers into 503s.
    let r = Arc::new(start(&config(&redis.url(), "  timeout: 400ms\n"), &catalog(LIMIT)).await);

    // Eight concurrent callers, round-robined by Envoy over both replicas.
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut limited) = (0u64, 0u64);
            for _ in (worker..SENT).step_by(8) {
                match call(&r, None).await {
                    200 => ok += 1,
                    429 => limited += 1,
                    other => panic!("unexpected status {other}"),
                }
            }
            (ok, limited)
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        let (o, l) = t.await.expect("caller task");
        ok += o;
        limited += l;
    }
    assert_eq!(ok, LIMIT, "allowed across both replicas");
    assert_eq!(limited, SENT as u64 - LIMIT);

    // Each replica took part, and what they allowed adds up to the quota.
    let mut per_replica = Vec::new();
    for t in &r.replicas {
        let allowed = t
            .metric(
                "tollgate_decisions_total",
                &[("decision", "allow"), ("reason", "allowed")],
            )
            .await
            .unwrap_or(0.0);
        per_replica.push(allowed as u64);
    }
    assert!(
        per_replica.iter().all(|&n| n > 0),
        "both replicas served: {per_replica:?}"
    );
    assert_eq!(per_replica.iter().sum::<u64>(), LIMIT);

    // Lease accounting: once idle leases are handed back, Redis recorded exactly what the replicas allowed.
    let (used, reserved) = poll_until(
        "idle leases to be returned",
        support::CHANGE_TIMEOUT,
        || async {
            let (used, reserved) = redis_used_reserved(&redis);
            (reserved == 0).then_some((used, reserved))
        },
    )
    .await;
    assert_eq!((used, reserved), (LIMIT, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_away_fails_as_configured_per_api_and_recovers_without_a_restart() {
    let mut redis = RedisServer::start();
    // No leases, so every request asks Redis; the geo API fails open, everything else closed.
    let extra = "  max_lease: 0\n  on_store_error: deny\n  on_store_error_by_api: {geo.example.test: allow}\n";
    let r = start(&config(&redis.url(), extra), &catalog(1_000_000)).await;
    assert_eq!(call(&r, None).await, 200);
    assert_eq!(call(&r, Some("geo.example.test")).await, 200);

    redis.stop();
    // Every call returns (bounded by the store timeout, well within Envoy's 0.5 s ext_authz timeout).
    for _ in 0..4 {
        assert_eq!(call(&r, None).await, 503, "deny: fail closed");
        assert_eq!(
            call(&r, Some("geo.example.test")).await,
            200,
            "allow: fail open"
        );
    }
    // Envoy spreads the calls over the replicas in an order of its own (round robin can put every geo call on
    // one replica), so the fallbacks are counted over the fleet.
    let mut fallbacks = 0.0;
    for t in &r.replicas {
        let ready = http_client()
            .get(t.admin_url("/readyz"))
            .send()
            .await
            .expect("readyz");
        assert_eq!(ready.status().as_u16(), 503, "/readyz reflects the store");
        fallbacks += t
            .metric("tollgate_quota_fallbacks_total", &[])
            .await
            .unwrap_or(0.0);
    }
    assert!(fallbacks >= 4.0, "every geo call fell back: {fallbacks}");

    redis.restart();
    poll_until(
        "tollgate to use Redis again",
        support::CHANGE_TIMEOUT,
        || async { (call(&r, None).await == 200).then_some(()) },
    )
    .await;
    for t in &r.replicas {
        poll_until("/readyz to recover", support::CHANGE_TIMEOUT, || async {
            let ready = http_client()
                .get(t.admin_url("/readyz"))
                .send()
                .await
                .ok()?;
            ready.status().is_success().then_some(())
        })
        .await;
    }
}
