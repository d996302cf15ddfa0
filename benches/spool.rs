//! Records per second into the metering spool with group commit, and the p99 time from ingest to durable.
//!
//! `cargo bench --bench spool`. Each iteration ingests `RECORDS` records as Envoy-sized batches from
//! `STREAMS` concurrent callers (like concurrent access-log streams) into a fresh spool on the target dir's
//! file system; criterion reports the throughput, and a final pass prints the per-call latency percentiles.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tollgate::catalog::{CatalogHandle, parse};
use tollgate::metering::{Metering, MeteringOptions, UsageRecord};
use tollgate::source::Source;

const RECORDS: usize = 100_000;
const BATCH: usize = 64;
const STREAMS: usize = 16;

const CATALOG: &str = r#"
products:
  - name: calls
    operations: [{api: a, paths: [/]}]
    meter: {event_name: api_calls, value: calls, success: [2xx]}
"#;

fn batches(run: usize) -> Vec<Vec<UsageRecord>> {
    let start_ms = chrono::Utc::now().timestamp_millis();
    (0..RECORDS / BATCH)
        .map(|b| {
            (0..BATCH)
                .map(|i| UsageRecord {
                    request_id: format!(
                        "{run:04}-{b:06}-{i:03}-5f0e4c1a-8d7b-4e2f-9a61-3c5b7d9e1f20"
                    ),
                    start_ms,
                    duration_us: 1_200,
                    decision: "allow".into(),
                    reason: "allowed".into(),
                    app: "weatherapp".into(),
                    developer: "ntesla@theremin.com".into(),
                    stripe_customer: format!("cus_{:04}", i % 50),
                    product: "calls".into(),
                    operation: "forecast".into(),
                    api: "weatherapi".into(),
                    response_code: 200,
                    request_bytes: 0,
                    response_bytes: 512,
                    ..Default::default()
                })
                .collect()
        })
        .collect()
}

async fn open(dir: &std::path::Path) -> Metering {
    let catalog = parse(&Source::from_text("c.yaml", CATALOG.to_owned())).expect("bench catalog");
    let mut options = MeteringOptions::new(
        dir,
        Duration::from_secs(60),
        Duration::from_secs(10),
        "bench",
    );
    options.max_disk_bytes = 8 << 30;
    Metering::open(
        options,
        Arc::new(CatalogHandle::new(catalog)),
        &prometheus::Registry::new(),
    )
    .await
    .expect("open spool")
}

/// Ingests every batch from STREAMS callers; returns each call's time to durable.
async fn ingest_all(metering: &Metering, batches: Vec<Vec<UsageRecord>>) -> Vec<Duration> {
    let mut queues: Vec<Vec<Vec<UsageRecord>>> = (0..STREAMS).map(|_| Vec::new()).collect();
    for (i, b) in batches.into_iter().enumerate() {
        queues[i % STREAMS].push(b);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for queue in queues {
        let m = metering.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(queue.len());
            for batch in queue {
                let t = Instant::now();
                m.ingest(batch).await.expect("ingest");
                latencies.push(t.elapsed());
            }
            latencies
        });
    }
    let mut all = Vec::new();
    while let Some(l) = tasks.join_next().await {
        all.extend(l.expect("task"));
    }
    all
}

fn spool(c: &mut Criterion) {
    // One runtime thread: the callers and the async side share one core with the spool writer thread when
    // the bench runs under `taskset -c 0`.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("spool");
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.warm_up_time(Duration::from_secs(1));
    let mut run = 0;
    group.bench_function("ingest_group_commit", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                run += 1;
                let input = batches(run);
                let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
                total += rt.block_on(async {
                    let metering = open(dir.path()).await;
                    let t = Instant::now();
                    ingest_all(&metering, input).await;
                    t.elapsed()
                });
            }
            total
        })
    });
    group.finish();

    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let (elapsed, mut latencies) = rt.block_on(async {
        let metering = open(dir.path()).await;
        let input = batches(0);
        let t = Instant::now();
        let l = ingest_all(&metering, input).await;
        (t.elapsed(), l)
    });
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "spool latency to durable per ingest call ({BATCH} records, {STREAMS} concurrent callers): \
         p50 {:?} p99 {:?} max {:?}; {:.0} records/s",
        pct(0.50),
        pct(0.99),
        pct(1.0),
        RECORDS as f64 / elapsed.as_secs_f64()
    );
}

criterion_group!(benches, spool);
criterion_main!(benches);
