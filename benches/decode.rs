//! What decoding Envoy's messages costs: envoy-types' full messages against tollgate's slim ones
//! (proto/tollgate/slim/v1/), on real Envoy 1.40 messages recorded in tests/fixtures/envoy/.
//! Run: `cargo bench --bench decode`.
//!
//! Each message is timed twice: the decode alone, and the decode plus the adapter's reading of it (the core's
//! `Request` for a Check, the `UsageRecord`s for an access-log batch), which is what tollgate pays per message
//! before its own work starts; dropping the message is included, as in the service.
//!
//! Criterion times one case after another, so on a shared machine a load change between the full and the slim
//! case moves their ratio. After Criterion, an interleaved pass alternates short blocks of the two and prints
//! the median of the paired ratios, which both blocks of a pair see under the same load.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries;
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use prost::Message;
use tollgate::envoy::access_log::usage_record;
use tollgate::envoy::authz::CheckMessage;
use tollgate::envoy::slim;

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/envoy")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn check_full_decode(bytes: &[u8]) {
    black_box(CheckRequest::decode(bytes).expect("decodes"));
}

fn check_slim_decode(bytes: &[u8]) {
    black_box(slim::CheckRequest::decode(bytes).expect("decodes"));
}

fn check_full_read(bytes: &[u8]) {
    let check = CheckRequest::decode(bytes).expect("decodes");
    let parts = check.parts().expect("an HTTP request");
    black_box(parts.request().headers.get("x-api-key").map(str::len));
}

fn check_slim_read(bytes: &[u8]) {
    let check = slim::CheckRequest::decode(bytes).expect("decodes");
    let parts = check.parts().expect("an HTTP request");
    black_box(parts.request().headers.get("x-api-key").map(str::len));
}

fn log_full_decode(bytes: &[u8]) {
    black_box(StreamAccessLogsMessage::decode(bytes).expect("decodes"));
}

fn log_slim_decode(bytes: &[u8]) {
    black_box(slim::StreamAccessLogsMessage::decode(bytes).expect("decodes"));
}

fn log_full_read(bytes: &[u8]) {
    let message = StreamAccessLogsMessage::decode(bytes).expect("decodes");
    let Some(LogEntries::HttpLogs(http)) = message.log_entries else {
        panic!("the fixture holds HTTP entries");
    };
    black_box(http.log_entry.iter().map(usage_record).collect::<Vec<_>>());
}

fn log_slim_read(bytes: &[u8]) {
    use slim::stream_access_logs_message::LogEntries;
    let message = slim::StreamAccessLogsMessage::decode(bytes).expect("decodes");
    let Some(LogEntries::HttpLogs(http)) = message.log_entries else {
        panic!("the fixture holds HTTP entries");
    };
    black_box(http.log_entry.iter().map(usage_record).collect::<Vec<_>>());
}

/// One way of decoding (and reading) a message.
type Run = fn(&[u8]);

/// One message, decoded (and read) both ways.
struct Case {
    name: String,
    bytes: Vec<u8>,
    full: Run,
    slim: Run,
}

fn cases() -> Vec<Case> {
    let messages = [
        // A GET with the plain header map.
        ("check-get", fixture("check-headers-0.bin"), true),
        // A POST with its body, headers in the raw header map.
        ("check-post-raw", fixture("check-raw-headers-2.bin"), true),
        // A stream's first message: Envoy's node description and one entry.
        ("log-first", fixture("access-log-headers-0.bin"), false),
        // 16 entries: the recorded 4-entry batch 4 times over (protobuf merges the repeated field's
        // occurrences, so the concatenation is one message). Envoy's default 16 KiB buffer sends about this
        // many per message under load.
        (
            "log-batch16",
            fixture("access-log-headers-1.bin").repeat(4),
            false,
        ),
    ];
    let mut cases = Vec::new();
    for (name, bytes, check) in messages {
        let runs: [(&str, Run, Run); 2] = if check {
            [
                ("decode", check_full_decode, check_slim_decode),
                ("decode+read", check_full_read, check_slim_read),
            ]
        } else {
            [
                ("decode", log_full_decode, log_slim_decode),
                ("decode+read", log_full_read, log_slim_read),
            ]
        };
        for (what, full, slim) in runs {
            cases.push(Case {
                name: format!("{name}/{what}"),
                bytes: bytes.clone(),
                full,
                slim,
            });
        }
    }
    cases
}

fn criterion_cases(c: &mut Criterion) {
    for case in cases() {
        let mut group = c.benchmark_group(&case.name);
        group.throughput(Throughput::Bytes(case.bytes.len() as u64));
        group.bench_function("full", |b| b.iter(|| (case.full)(&case.bytes)));
        group.bench_function("slim", |b| b.iter(|| (case.slim)(&case.bytes)));
        group.finish();
    }
}

/// Pairs of blocks timed by the interleaved pass.
const ROUNDS: usize = 401;

/// Nanoseconds per run of `run` over `count` runs.
fn block(run: Run, bytes: &[u8], count: u32) -> f64 {
    let start = Instant::now();
    for _ in 0..count {
        run(black_box(bytes));
    }
    start.elapsed().as_nanos() as f64 / f64::from(count)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Alternates blocks of the full and the slim decode of `case` (each block about 0.2 ms, the pair's order
/// swapped every round); returns the median ns per run of each and the median of the paired ratios.
fn interleaved(case: &Case) -> (f64, f64, f64) {
    let mut count = 0u32;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2) {
        (case.full)(&case.bytes);
        count += 1;
    }
    let count = (count / 10).max(1);
    let (mut full, mut slim, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let (f, s) = if round % 2 == 0 {
            let f = block(case.full, &case.bytes, count);
            (f, block(case.slim, &case.bytes, count))
        } else {
            let s = block(case.slim, &case.bytes, count);
            (block(case.full, &case.bytes, count), s)
        };
        full.push(f);
        slim.push(s);
        ratios.push(f / s);
    }
    (median(full), median(slim), median(ratios))
}

fn interleaved_summary() {
    println!("\ninterleaved full vs slim ({ROUNDS} paired blocks each; medians)");
    println!(
        "{:<26} {:>8} {:>12} {:>12} {:>10}",
        "case", "bytes", "full ns", "slim ns", "full/slim"
    );
    for case in cases() {
        let (full, slim, ratio) = interleaved(&case);
        println!(
            "{:<26} {:>8} {:>12.0} {:>12.0} {:>10.2}",
            case.name,
            case.bytes.len(),
            full,
            slim,
            ratio
        );
    }
}

criterion_group!(benches, criterion_cases);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // `cargo bench` passes --bench; `cargo test --benches` does not, and only checks the cases run.
    if std::env::args().any(|a| a == "--bench") {
        interleaved_summary();
    }
}
