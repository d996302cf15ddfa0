//! Replay of the metering spool and the billing outbox from hostile files, through `Metering::open` only.
//!
//! Each input lays out a fresh `metering.dir` as tollgate writes it (`spool/<20-digit id>.seg` segments,
//! `outbox.log`, optionally `PRODUCER`) and opens it. A file is raw bytes, or payloads framed the way
//! src/metering/frame.rs frames them (`"TGF1" magic | len | crc32 | payload`, little-endian) so the fuzzer gets
//! past the CRC to the protobuf decoders, or structured records encoded with mirrors of the on-disk messages
//! (so extreme window and time values reach the replay arithmetic). The mirrors only make inputs: if the
//! format changes under the refactor, the target still builds and still checks the same invariant.
//!
//! Oracle: `Metering::open` returns Ok or Err, never panics or hangs (run with `-timeout`); the instance is
//! dropped at once, which stops its writer thread and releases the folder lock.
#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tollgate::catalog::CatalogHandle;
use tollgate::metering::{Metering, MeteringOptions, UsageRecord};
use tollgate::source::Source;

/// Mirrors src/metering/frame.rs: "TGF1" as a little-endian u32.
const MAGIC: u32 = 0x5447_4631;

/// Mirror of the spool's `SpooledRecord` (src/metering/record.rs), tags as there.
#[derive(Clone, PartialEq, Message)]
struct SpooledRecord {
    #[prost(message, optional, tag = "1")]
    record: Option<UsageRecord>,
    #[prost(int64, tag = "2")]
    received_ms: i64,
    #[prost(int64, tag = "3")]
    window_start_ms: i64,
    #[prost(int64, tag = "4")]
    window_len_ms: i64,
    #[prost(string, tag = "5")]
    meter: String,
    #[prost(uint64, tag = "6")]
    value: u64,
    #[prost(bool, tag = "7")]
    billable: bool,
}

/// Mirror of `SpoolBatch`: one frame of a segment.
#[derive(Clone, PartialEq, Message)]
struct SpoolBatch {
    #[prost(message, repeated, tag = "1")]
    records: Vec<SpooledRecord>,
}

/// Mirror of the outbox's `OutboxRow` (src/metering/outbox.rs).
#[derive(Clone, PartialEq, Message)]
struct OutboxRow {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    producer: String,
    #[prost(int64, tag = "3")]
    window_start_ms: i64,
    #[prost(int64, tag = "4")]
    window_end_ms: i64,
    #[prost(uint32, tag = "5")]
    revision: u32,
    #[prost(string, tag = "6")]
    stripe_customer: String,
    #[prost(string, tag = "7")]
    event_name: String,
    #[prost(uint64, tag = "8")]
    value: u64,
    #[prost(int64, tag = "9")]
    sealed_at_ms: i64,
}

/// Mirror of the outbox's `Entry`: a sealed row or an acknowledgement, one per frame.
#[derive(Clone, PartialEq, Message)]
struct Entry {
    #[prost(message, optional, tag = "1")]
    row: Option<OutboxRow>,
    #[prost(string, tag = "2")]
    ack: String,
}

#[derive(Arbitrary, Debug)]
struct Record {
    request_id: String,
    start_ms: i64,
    received_ms: i64,
    window_start_ms: i64,
    window_len_ms: i64,
    meter: String,
    value: u64,
    billable: bool,
    customer: String,
    product: String,
}

#[derive(Arbitrary, Debug)]
struct Row {
    id: String,
    window_start_ms: i64,
    window_end_ms: i64,
    revision: u32,
    customer: String,
    event_name: String,
    value: u64,
    sealed_at_ms: i64,
    ack: Option<String>,
}

#[derive(Arbitrary, Debug)]
enum File<T> {
    /// The bytes as they are (torn tails, garbage, wrong magic).
    Raw(Vec<u8>),
    /// Arbitrary payloads in valid frames: reaches the protobuf decoding.
    Framed(Vec<Vec<u8>>),
    /// Well-formed messages with arbitrary values, one frame per batch.
    Messages(Vec<Vec<T>>),
}

#[derive(Arbitrary, Debug)]
struct Layout {
    /// Segment ids (small, so they collide and sort in interesting ways) and contents.
    segments: Vec<(u8, File<Record>)>,
    outbox: Option<File<Row>>,
    /// Contents of `<dir>/PRODUCER`; with it, the producer id comes from the folder.
    producer_file: Option<Vec<u8>>,
    window_ms: u32,
    lateness_ms: u32,
    max_disk_bytes: u64,
}

fn frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

fn bytes<T>(file: &File<T>, encode: impl Fn(&[T]) -> Vec<Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    match file {
        File::Raw(raw) => out.extend_from_slice(raw),
        File::Framed(payloads) => payloads.iter().for_each(|p| frame(p, &mut out)),
        File::Messages(batches) => {
            for batch in batches {
                encode(batch).iter().for_each(|p| frame(p, &mut out));
            }
        }
    }
    out
}

fn spooled(records: &[Record]) -> Vec<Vec<u8>> {
    let batch = SpoolBatch {
        records: records
            .iter()
            .map(|r| SpooledRecord {
                record: Some(UsageRecord {
                    request_id: r.request_id.clone(),
                    start_ms: r.start_ms,
                    decision: "allow".into(),
                    stripe_customer: r.customer.clone(),
                    product: r.product.clone(),
                    response_code: 200,
                    ..UsageRecord::default()
                }),
                received_ms: r.received_ms,
                window_start_ms: r.window_start_ms,
                window_len_ms: r.window_len_ms,
                meter: r.meter.clone(),
                value: r.value,
                billable: r.billable,
            })
            .collect(),
    };
    vec![batch.encode_to_vec()]
}

fn entries(rows: &[Row]) -> Vec<Vec<u8>> {
    rows.iter()
        .flat_map(|r| {
            let row = Entry {
                row: Some(OutboxRow {
                    id: r.id.clone(),
                    producer: "fuzz".into(),
                    window_start_ms: r.window_start_ms,
                    window_end_ms: r.window_end_ms,
                    revision: r.revision,
                    stripe_customer: r.customer.clone(),
                    event_name: r.event_name.clone(),
                    value: r.value,
                    sealed_at_ms: r.sealed_at_ms,
                }),
                ack: String::new(),
            };
            let ack = r.ack.as_ref().map(|id| Entry {
                row: None,
                ack: id.clone(),
            });
            std::iter::once(row).chain(ack).map(|e| e.encode_to_vec())
        })
        .collect()
}

fn write(dir: &Path, layout: &Layout) -> std::io::Result<()> {
    let spool = dir.join("spool");
    std::fs::create_dir_all(&spool)?;
    for (id, file) in layout.segments.iter().take(4) {
        std::fs::write(spool.join(format!("{id:020}.seg")), bytes(file, spooled))?;
    }
    if let Some(file) = &layout.outbox {
        std::fs::write(dir.join("outbox.log"), bytes(file, entries))?;
    }
    if let Some(producer) = &layout.producer_file {
        std::fs::write(dir.join("PRODUCER"), producer)?;
    }
    Ok(())
}

struct Rig {
    runtime: tokio::runtime::Runtime,
    catalog: Arc<CatalogHandle>,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let text = "products:\n  - name: calls\n    operations: [{api: a, paths: [/]}]\n    meter: {event_name: api_calls}\n";
        let catalog = tollgate::catalog::parse(&Source::from_text("catalog.yaml", text.to_owned()))
            .expect("the rig's catalog parses");
        Rig {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime"),
            catalog: Arc::new(CatalogHandle::new(catalog)),
        }
    })
}

fuzz_target!(|layout: Layout| {
    let rig = rig();
    let dir = tempfile::tempdir().expect("a temp dir");
    write(dir.path(), &layout).expect("writing the layout");
    let window = Duration::from_millis(u64::from(layout.window_ms));
    let lateness = Duration::from_millis(u64::from(layout.lateness_ms));
    let mut options = if layout.producer_file.is_some() {
        MeteringOptions::with_spool_producer(dir.path(), window, lateness)
    } else {
        MeteringOptions::new(dir.path(), window, lateness, "fuzz")
    };
    options.max_disk_bytes = layout.max_disk_bytes;
    let registry = prometheus::Registry::new();
    let opened = rig
        .runtime
        .block_on(Metering::open(options, rig.catalog.clone(), &registry));
    // Ok or Err are both fine; dropping closes the writer's queue, so its thread ends and unlocks.
    drop(opened);
});
