//! Quota store benchmarks: charge latency and throughput of the memory store and the Redis store (leasing
//! on and off) against a `redis-server` this bench starts itself on a free loopback port, plus p50/p99 of
//! single charges and Redis commands per allowed request (from `INFO commandstats`). `charge_hot_16` puts
//! every charge of 16 tasks on one bucket; `charge_hot_16_paced` does the same with 10 µs of CPU per charge.
//!
//! Run: `cargo bench --bench quota` (needs `redis-server` and `redis-cli` on the PATH).

#[path = "../tests/support/redis.rs"]
mod redis_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use prometheus::Registry;
use redis_support::{RedisServer, command_calls, total_commands};
use tokio::runtime::Runtime;
use tollgate::quota::memory::MemoryStore;
use tollgate::quota::redis::{RedisOptions, RedisStore};
use tollgate::quota::{Charge, Limit, Outcome, QuotaStore, Unit};

const NOW: i64 = 1_795_000_000;
/// Concurrent callers in the throughput benches (one bucket each pair, like busy apps; or all on one hot bucket).
const TASKS: usize = 16;
/// CPU each caller spends per charge in the paced hot-bucket bench, like handling a Check around it.
const WORK: Duration = Duration::from_micros(10);
/// Single charges timed one by one for the percentiles.
const SAMPLES: usize = 20_000;

/// Charges that failed (a 50 ms timeout on a loaded machine): counted and reported, not fatal.
static ERRORS: AtomicU64 = AtomicU64::new(0);

/// Charges once; an error is counted, an exhausted quota is a bug in the bench.
async fn charge_once(store: &Arc<dyn QuotaStore>, bucket: &str) {
    match store.charge(&charge_of(bucket)).await {
        Ok(Outcome::Allowed(_)) => {}
        Ok(other) => panic!("the bench quota ran out: {other:?}"),
        Err(_) => {
            ERRORS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Never exhausted during a run, so every charge is an allowed one.
static LIMITS: [Limit; 1] = [Limit {
    limit: 1_000_000_000_000,
    interval: 1,
    unit: Unit::Day,
}];

fn charge_of(bucket: &str) -> Charge<'_> {
    Charge {
        bucket,
        limits: &LIMITS,
        cost: 1,
        now: NOW,
    }
}

async fn redis_store(server: &RedisServer, max_lease: u64) -> Arc<dyn QuotaStore> {
    let store = RedisStore::connect(
        RedisOptions {
            url: server.url(),
            cluster: false,
            timeout: Duration::from_millis(50),
            max_lease,
            replica: None,
        },
        &Registry::new(),
    )
    .await
    .expect("connect to the bench redis-server");
    Arc::new(store)
}

/// `iters` charges one after another on one bucket.
async fn sequential(store: &Arc<dyn QuotaStore>, iters: u64) -> Duration {
    let started = Instant::now();
    for _ in 0..iters {
        charge_once(store, "seq").await;
    }
    started.elapsed()
}

/// `iters` charges spread over `TASKS` concurrent tasks and `TASKS / 2` buckets.
async fn concurrent(store: &Arc<dyn QuotaStore>, iters: u64) -> Duration {
    let per_task = iters.div_ceil(TASKS as u64);
    let started = Instant::now();
    let mut handles = Vec::with_capacity(TASKS);
    for t in 0..TASKS {
        let store = Arc::clone(store);
        handles.push(tokio::spawn(async move {
            let bucket = format!("conc-{}", t / 2);
            for _ in 0..per_task {
                charge_once(&store, &bucket).await;
            }
        }));
    }
    for h in handles {
        h.await.expect("bench task");
    }
    started.elapsed()
}

/// `iters` charges spread over `TASKS` concurrent tasks, all on one hot bucket (one busy caller); with
/// `work`, each charge is followed by that much busy CPU, so the store sees a realistic request rate
/// rather than charges back to back.
async fn hot(store: &Arc<dyn QuotaStore>, iters: u64, work: Duration) -> Duration {
    let per_task = iters.div_ceil(TASKS as u64);
    let started = Instant::now();
    let mut handles = Vec::with_capacity(TASKS);
    for _ in 0..TASKS {
        let store = Arc::clone(store);
        handles.push(tokio::spawn(async move {
            for _ in 0..per_task {
                charge_once(&store, "hot").await;
                let until = Instant::now() + work;
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
        }));
    }
    for h in handles {
        h.await.expect("bench task");
    }
    started.elapsed()
}

fn percentiles(rt: &Runtime, name: &str, store: &Arc<dyn QuotaStore>) {
    let mut samples: Vec<Duration> = rt.block_on(async {
        let mut out = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            let started = Instant::now();
            charge_once(store, "pct").await;
            out.push(started.elapsed());
        }
        out
    });
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{name}: single charge p50 {:?}, p99 {:?}, max {:?} over {SAMPLES} calls",
        at(0.50),
        at(0.99),
        samples[samples.len() - 1]
    );
}

fn commands_per_request(rt: &Runtime, server: &RedisServer, name: &str, max_lease: u64) {
    let n: u64 = 10_000;
    let (before, after, evalsha) = rt.block_on(async {
        let store = redis_store(server, max_lease).await;
        // Load the script first, so the figure is the steady state.
        charge_once(&store, "warm").await;
        let evalsha_before = command_calls(server, "evalsha");
        let before = total_commands(server);
        for _ in 0..n {
            charge_once(&store, "cmds").await;
        }
        let after = total_commands(server);
        (
            before,
            after,
            command_calls(server, "evalsha") - evalsha_before,
        )
    });
    // The second INFO counts the first one.
    let commands = after.saturating_sub(before).saturating_sub(1);
    println!(
        "{name}: {n} allowed requests: {evalsha} round trips (EVALSHA) = {:.4} per request; \
         {commands} Redis commands incl. those the script runs = {:.4} per request",
        evalsha as f64 / n as f64,
        commands as f64 / n as f64
    );
}

/// Prints and resets the count of failed charges, so each phase's errors show up next to its figures.
fn report_errors(phase: &str) {
    let errors = ERRORS.swap(0, Ordering::Relaxed);
    println!("charges that failed (50 ms timeout) {phase}: {errors}");
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let server = RedisServer::start();
    let memory: Arc<dyn QuotaStore> = Arc::new(MemoryStore::new());
    let leased = rt.block_on(redis_store(&server, 100));
    let unleased = rt.block_on(redis_store(&server, 0));
    let stores = [
        ("memory", &memory),
        ("redis_lease_100", &leased),
        ("redis_no_lease", &unleased),
    ];

    let mut group = c.benchmark_group("charge_sequential");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    for (name, store) in stores {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| rt.block_on(sequential(store, iters)))
        });
    }
    group.finish();
    report_errors("after the group");

    let mut group = c.benchmark_group("charge_concurrent_16");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    for (name, store) in stores {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| rt.block_on(concurrent(store, iters)))
        });
    }
    group.finish();
    report_errors("after the group");

    let mut group = c.benchmark_group("charge_hot_16");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    for (name, store) in stores {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| rt.block_on(hot(store, iters, Duration::ZERO)))
        });
    }
    group.finish();
    report_errors("after the group");

    let mut group = c.benchmark_group("charge_hot_16_paced");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    for (name, store) in stores {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| rt.block_on(hot(store, iters, WORK)))
        });
    }
    group.finish();
    report_errors("after the group");

    for (name, store) in stores {
        percentiles(&rt, name, store);
        report_errors(name);
    }
    commands_per_request(&rt, &server, "redis_lease_100", 100);
    commands_per_request(&rt, &server, "redis_no_lease", 0);
    report_errors("while counting commands");
}

criterion_group!(benches, bench);
criterion_main!(benches);
