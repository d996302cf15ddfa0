//! The state store at scale, driven by `bench/state` (not a Criterion bench: `harness = false`, a tool with
//! subcommands; plain `cargo bench` runs it without one and it does nothing).
//!
//! * `fill`: creates the schema with the real migrator (`SqlStore::migrate`), then writes N keys with their
//!   developers, apps and subscriptions into the same tables a run of `SqlStore::write` calls would leave:
//!   one sequence number per write, one `changes` row per touched entity, one `audit` row per write. All but
//!   the last `--via-store` keys go in bulk (`INSERT … SELECT FROM UNNEST`, 10k rows a statement); the last
//!   ones through `SqlStore::write(&Write::CreateKey{..})` itself, which also proves the bulk rows left the
//!   sequence where the store expects it. Keys are deterministic (`tg_live_` + base58 of 32 bytes, the shape
//!   `tollgate` hands out), so the other subcommands and the load files can name them.
//! * `load`: times `SqlStore::load()` alone (the database read a replica does at start, without the
//!   snapshot build) and prints the process's RSS with the image in memory.
//! * `memory`: where a replica's memory goes: heap bytes (a counting allocator over jemalloc, the binary's
//!   allocator) of the image `SqlStore::load()` returns, of the snapshot `Snapshot::load` builds from it on the
//!   bench catalog file, and of the keys alone in an `imbl::HashMap` (what the snapshot uses), a
//!   `std::collections::HashMap`, with the time of a key lookup in each.
//! * `revoke`: revokes keys through replica A's management API (`POST /v1/apps/{app}/keys/{id}/revoke`) and
//!   probes replica B with real ext_authz `Check` calls over gRPC until B answers 401: latency per revoke.
//! * `cpu`: revokes keys through A without probing B, and reads B's CPU time (`/proc/PID/stat`, and the
//!   sum of `/proc/PID/task/*/schedstat`) and B's `tollgate_state_*` metrics over the revokes and over an
//!   idle window of the same length: the CPU one revoke costs B.
//!
//! Every subcommand prints one JSON line on stdout.

use std::alloc::{GlobalAlloc, Layout};
use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use envoy_types::ext_authz::v3::pb::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use sha2::{Digest, Sha256};
use sqlx::postgres::PgPoolOptions;
use tollgate::catalog::{Catalog, CatalogHandle, Key};
use tollgate::identity::api_key::KeyHash;
use tollgate::source::Source;
use tollgate::state::Snapshot;
use tollgate::state::StateStore;
use tollgate::state::model::{NewKey, Write};
use tollgate::state::sql::SqlStore;
use tollgate::state::store::Actor;
use tonic::transport::{Channel, Endpoint};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// jemalloc (tollgate's allocator), counting the bytes live on the heap.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call is forwarded to jemalloc unchanged; the counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's layout contract is passed on.
        unsafe { tikv_jemallocator::Jemalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: ptr came from this allocator with this layout.
        unsafe { tikv_jemallocator::Jemalloc.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: as alloc.
        unsafe { tikv_jemallocator::Jemalloc.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: as dealloc and alloc.
        unsafe { tikv_jemallocator::Jemalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

/// Rows per bulk statement.
const BATCH: usize = 10_000;
/// Characters of a key kept as its prefix (what the management API keeps: `tg_live_` and four more).
const PREFIX_CHARS: usize = 12;
/// Who the bulk writes are recorded as in the audit table.
const BULK_ACTOR: &str = "bench:fill";

#[derive(Parser)]
#[command(
    about = "state store at scale: fill, load, revoke latency, revoke CPU (driven by bench/state)"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

/// The shape of the generated data (the same in every subcommand that names keys).
#[derive(clap::Args, Clone)]
struct Shape {
    /// Keys in the store.
    #[arg(long)]
    keys: usize,
    /// Keys per app.
    #[arg(long, default_value_t = 10)]
    keys_per_app: usize,
    /// Apps per developer.
    #[arg(long, default_value_t = 10)]
    apps_per_developer: usize,
    /// Products in the catalog file (named p00000…, as bench/gen_catalog.py writes them).
    #[arg(long, default_value_t = 1000)]
    products: usize,
    /// Operations per product.
    #[arg(long, default_value_t = 10)]
    ops: usize,
    /// Products each app subscribes to.
    #[arg(long, default_value_t = 5)]
    subs_per_app: usize,
    /// Distinct API ids the products spread over.
    #[arg(long, default_value_t = 50)]
    apis: usize,
}

#[derive(Subcommand)]
enum Command {
    /// Creates the schema and writes the keys, apps and developers.
    Fill {
        /// postgres://… of an empty database.
        #[arg(long)]
        url: String,
        #[command(flatten)]
        shape: Shape,
        /// The last this many keys go through SqlStore::write(CreateKey), one transaction each.
        #[arg(long, default_value_t = 1000)]
        via_store: usize,
        /// Writes `key<TAB>api<TAB>path` lines for check_load: this many keys spread over the store.
        #[arg(long, default_value_t = 10_000)]
        sample: usize,
        /// Where the sample goes.
        #[arg(long)]
        requests: PathBuf,
        /// Writes `app<TAB>key id<TAB>key<TAB>api<TAB>path` lines of keys to revoke (none in the sample).
        #[arg(long)]
        revocable: PathBuf,
        /// How many revocable keys.
        #[arg(long, default_value_t = 1000)]
        revocable_count: usize,
    },
    /// Times SqlStore::load() alone.
    Load {
        /// postgres://…
        #[arg(long)]
        url: String,
    },
    /// Heap bytes of the image, the snapshot, and the keys in three maps; lookup time in each.
    Memory {
        /// postgres://…
        #[arg(long)]
        url: String,
        /// The catalog file the replicas serve (its products resolve the store's apps).
        #[arg(long)]
        catalog: PathBuf,
        /// Lookups timed per map (keys of the store, in a shuffled order).
        #[arg(long, default_value_t = 1_000_000)]
        lookups: usize,
    },
    /// Revoke on A, probe B with gRPC Checks until 401.
    Revoke {
        #[command(flatten)]
        common: RevokeArgs,
        /// host:port of replica B's gRPC listener.
        #[arg(long)]
        b_grpc: String,
        /// Pause between two probes of B, microseconds.
        #[arg(long, default_value_t = 500)]
        poll_us: u64,
        /// Give up on one revoke after this many milliseconds.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Revoke on A without probing B; B's CPU and metrics over the revokes and over an idle window.
    Cpu {
        #[command(flatten)]
        common: RevokeArgs,
        /// Replica B's PID.
        #[arg(long)]
        b_pid: u32,
        /// host:port of replica B's admin listener.
        #[arg(long)]
        b_admin: String,
        /// Seconds after the last revoke before B's counters are read (B applies it meanwhile).
        #[arg(long, default_value_t = 2.0)]
        settle: f64,
    },
}

#[derive(clap::Args)]
struct RevokeArgs {
    /// host:port of replica A's admin listener (the management API).
    #[arg(long)]
    a_admin: String,
    /// The admin token of A.
    #[arg(long, default_value = "")]
    token: String,
    /// The revocable keys file `fill` wrote.
    #[arg(long)]
    revocable: PathBuf,
    /// Skip this many lines of it (keys an earlier run revoked).
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Revokes.
    #[arg(long, default_value_t = 200)]
    count: usize,
    /// Milliseconds from one revoke's start to the next one's.
    #[arg(long, default_value_t = 250)]
    gap_ms: u64,
    /// Writes one line per revoke here (milliseconds).
    #[arg(long)]
    raw: Option<PathBuf>,
}

fn main() -> ExitCode {
    // `cargo bench` without a filter runs every bench with `--bench`: nothing to do without a subcommand.
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.iter().all(|a| a == "--bench") {
        println!(
            "state_store: a tool for bench/state (see bench/README.md); nothing to do under `cargo bench`"
        );
        return ExitCode::SUCCESS;
    }
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("state_store: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match args.command {
            Command::Fill {
                url,
                shape,
                via_store,
                sample,
                requests,
                revocable,
                revocable_count,
            } => {
                fill(
                    &url,
                    &shape,
                    via_store,
                    sample,
                    &requests,
                    &revocable,
                    revocable_count,
                )
                .await
            }
            Command::Load { url } => load(&url).await,
            Command::Memory {
                url,
                catalog,
                lookups,
            } => memory(&url, &catalog, lookups).await,
            Command::Revoke {
                common,
                b_grpc,
                poll_us,
                timeout_ms,
            } => revoke(&common, &b_grpc, poll_us, timeout_ms).await,
            Command::Cpu {
                common,
                b_pid,
                b_admin,
                settle,
            } => cpu(&common, b_pid, &b_admin, settle).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("state_store: {e}");
            ExitCode::FAILURE
        }
    }
}

// ------------------------------------------------------------------------------------------ the data

fn sha(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// Key `i`'s secret: `tg_live_` + base58 of 32 bytes, like `api_key::generate`, but reproducible.
fn key_secret(i: usize) -> String {
    format!(
        "tg_live_{}",
        bs58::encode(sha(&format!("tollgate-bench-key:{i}"))).into_string()
    )
}

/// Key `i`'s public id: `key_` + base58 of 12 bytes, like the management API's.
fn key_id(i: usize) -> String {
    format!(
        "key_{}",
        bs58::encode(&sha(&format!("tollgate-bench-id:{i}"))[..12]).into_string()
    )
}

fn app_name(a: usize) -> String {
    format!("sapp{a:07}")
}

fn developer_email(d: usize) -> String {
    format!("sdev{d:06}@bench.example")
}

impl Shape {
    fn apps(&self) -> usize {
        self.keys.div_ceil(self.keys_per_app.max(1))
    }

    fn developers(&self) -> usize {
        self.apps().div_ceil(self.apps_per_developer.max(1))
    }

    /// The products app `a` subscribes to, in order (bench/gen_catalog.py's choice).
    fn subscriptions(&self, a: usize) -> Vec<usize> {
        let subs = self.subs_per_app.min(self.products);
        let mut chosen = Vec::with_capacity(subs);
        for j in 0..subs {
            let mut p = (a * 7 + j * 131) % self.products;
            while chosen.contains(&p) {
                p = (p + 1) % self.products;
            }
            chosen.push(p);
        }
        chosen
    }

    /// The api id and path that app `a`'s last product's last operation covers (matching walks them all).
    fn request(&self, a: usize) -> (String, String) {
        let last = *self.subscriptions(a).last().unwrap_or(&0);
        (
            format!("api{}", last % self.apis),
            format!("/v1/p{last}/r{}/item/42?q=1", self.ops.saturating_sub(1)),
        )
    }

    fn app_of(&self, key: usize) -> usize {
        key / self.keys_per_app.max(1)
    }

    fn developer_of(&self, app: usize) -> usize {
        app / self.apps_per_developer.max(1)
    }

    // Sequence numbers: developers first, then apps, then keys, one write each.
    fn developer_seq(&self, d: usize) -> i64 {
        seq(d + 1)
    }
    fn app_seq(&self, a: usize) -> i64 {
        seq(self.developers() + a + 1)
    }
    fn key_seq(&self, i: usize) -> i64 {
        seq(self.developers() + self.apps() + i + 1)
    }
}

fn seq(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// One bulk statement's worth of change and audit rows.
#[derive(Default)]
struct Log {
    seq: Vec<i64>,
    kind: Vec<&'static str>,
    name: Vec<String>,
    action: Vec<&'static str>,
    target: Vec<String>,
}

impl Log {
    fn push(
        &mut self,
        seq: i64,
        kind: &'static str,
        name: String,
        action: &'static str,
        target: String,
    ) {
        self.seq.push(seq);
        self.kind.push(kind);
        self.name.push(name);
        self.action.push(action);
        self.target.push(target);
    }

    async fn insert(self, tx: &mut sqlx::PgConnection, now: i64) -> Result<(), Error> {
        let n = self.seq.len();
        sqlx::query(
            "INSERT INTO changes (seq, kind, name, at) \
             SELECT s, k, n, $4 FROM UNNEST($1::bigint[], $2::text[], $3::text[]) AS t(s, k, n)",
        )
        .bind(&self.seq)
        .bind(&self.kind)
        .bind(&self.name)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO audit (seq, at, actor, action, target) \
             SELECT s, $1, $2, a, t FROM UNNEST($3::bigint[], $4::text[], $5::text[]) AS x(s, a, t)",
        )
        .bind(now)
        .bind(BULK_ACTOR)
        .bind(&self.seq)
        .bind(&self.action)
        .bind(&self.target)
        .execute(&mut *tx)
        .await?;
        let _ = n;
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
async fn fill(
    url: &str,
    shape: &Shape,
    via_store: usize,
    sample: usize,
    requests: &std::path::Path,
    revocable: &std::path::Path,
    revocable_count: usize,
) -> Result<(), Error> {
    let started = Instant::now();
    let store = SqlStore::open(url)?;
    store.migrate().await?;
    let pool = PgPoolOptions::new().max_connections(2).connect(url).await?;
    let (seq_now,): (i64,) = sqlx::query_as("SELECT seq FROM state_sequence WHERE singleton = 1")
        .fetch_one(&pool)
        .await?;
    if seq_now != 0 {
        return Err(format!(
            "the store is not empty (sequence at {seq_now}): fill a fresh database"
        )
        .into());
    }
    let now = unix_now();
    let (developers, apps) = (shape.developers(), shape.apps());
    let via_store = via_store.min(shape.keys);
    let bulk_keys = shape.keys - via_store;

    // Developers.
    for chunk in (0..developers).collect::<Vec<_>>().chunks(BATCH) {
        let mut tx = pool.begin().await?;
        let ids: Vec<i64> = chunk.iter().map(|&d| shape.developer_seq(d)).collect();
        let emails: Vec<String> = chunk.iter().map(|&d| developer_email(d)).collect();
        let companies: Vec<String> = chunk
            .iter()
            .map(|&d| format!("company{}", d % 100))
            .collect();
        sqlx::query(
            "INSERT INTO developers (id, email, company, stripe_customer, attributes, created_at, updated_at) \
             SELECT i, e, c, NULL, '{}', $4, $4 FROM UNNEST($1::bigint[], $2::text[], $3::text[]) AS t(i, e, c)",
        )
        .bind(&ids)
        .bind(&emails)
        .bind(&companies)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let mut log = Log::default();
        for (&d, email) in chunk.iter().zip(&emails) {
            log.push(
                shape.developer_seq(d),
                "developer",
                email.clone(),
                "developer.put",
                format!("developer:{email}"),
            );
        }
        log.insert(&mut tx, now).await?;
        tx.commit().await?;
    }
    let developers_done = started.elapsed();

    // Apps and their subscriptions.
    for chunk in (0..apps).collect::<Vec<_>>().chunks(BATCH) {
        let mut tx = pool.begin().await?;
        let ids: Vec<i64> = chunk.iter().map(|&a| shape.app_seq(a)).collect();
        let names: Vec<String> = chunk.iter().map(|&a| app_name(a)).collect();
        let owners: Vec<i64> = chunk
            .iter()
            .map(|&a| shape.developer_seq(shape.developer_of(a)))
            .collect();
        sqlx::query(
            "INSERT INTO apps (id, name, developer_id, client_id, status, attributes, created_at, updated_at) \
             SELECT i, n, d, n, 'approved', '{}', $4, $4 FROM UNNEST($1::bigint[], $2::text[], $3::bigint[]) \
             AS t(i, n, d)",
        )
        .bind(&ids)
        .bind(&names)
        .bind(&owners)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let (mut sub_app, mut sub_pos, mut sub_product) = (Vec::new(), Vec::new(), Vec::new());
        for (&a, &id) in chunk.iter().zip(&ids) {
            for (position, p) in shape.subscriptions(a).into_iter().enumerate() {
                sub_app.push(id);
                sub_pos.push(seq(position));
                sub_product.push(format!("p{p:05}"));
            }
        }
        sqlx::query(
            "INSERT INTO app_products (app_id, position, product, status) \
             SELECT a, p, n, 'approved' FROM UNNEST($1::bigint[], $2::bigint[], $3::text[]) AS t(a, p, n)",
        )
        .bind(&sub_app)
        .bind(&sub_pos)
        .bind(&sub_product)
        .execute(&mut *tx)
        .await?;
        let mut log = Log::default();
        for (&a, name) in chunk.iter().zip(&names) {
            log.push(
                shape.app_seq(a),
                "app",
                name.clone(),
                "app.put",
                format!("app:{name}"),
            );
        }
        log.insert(&mut tx, now).await?;
        tx.commit().await?;
    }
    let apps_done = started.elapsed();

    // Keys, in bulk.
    for chunk in (0..bulk_keys).collect::<Vec<_>>().chunks(BATCH) {
        let mut tx = pool.begin().await?;
        let mut ids = Vec::with_capacity(chunk.len());
        let mut app_ids = Vec::with_capacity(chunk.len());
        let mut hashes = Vec::with_capacity(chunk.len());
        let mut prefixes = Vec::with_capacity(chunk.len());
        let mut log = Log::default();
        for &i in chunk {
            let secret = key_secret(i);
            let hash = KeyHash::of(&secret).to_string();
            let id = key_id(i);
            let app = shape.app_of(i);
            log.push(
                shape.key_seq(i),
                "key",
                hash.clone(),
                "key.create",
                format!("app:{}/key:{id}", app_name(app)),
            );
            ids.push(id);
            app_ids.push(shape.app_seq(app));
            hashes.push(hash);
            prefixes.push(secret.chars().take(PREFIX_CHARS).collect::<String>());
        }
        sqlx::query(
            "INSERT INTO api_keys (id, app_id, hash, prefix, name, status, created_at, expires_at) \
             SELECT i, a, h, p, NULL, 'approved', $5, NULL \
             FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[]) AS t(i, a, h, p)",
        )
        .bind(&ids)
        .bind(&app_ids)
        .bind(&hashes)
        .bind(&prefixes)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        log.insert(&mut tx, now).await?;
        tx.commit().await?;
    }
    // Where the last bulk write left the sequence: the store's own writes continue from there.
    let last_bulk = shape.key_seq(bulk_keys) - 1;
    sqlx::query("UPDATE state_sequence SET seq = $1 WHERE singleton = 1")
        .bind(last_bulk)
        .execute(&pool)
        .await?;
    let bulk_done = started.elapsed();

    // The rest through the store itself.
    let actor = Actor(BULK_ACTOR.to_owned());
    let store_started = Instant::now();
    for i in bulk_keys..shape.keys {
        let secret = key_secret(i);
        let write = Write::CreateKey {
            app: app_name(shape.app_of(i)),
            key: NewKey {
                id: key_id(i),
                hash: KeyHash::of(&secret),
                prefix: secret.chars().take(PREFIX_CHARS).collect(),
                name: None,
                expires_at: None,
            },
        };
        store.write(&write, &actor, unix_now()).await?;
    }
    let store_took = store_started.elapsed();
    let (final_seq,): (i64,) = sqlx::query_as("SELECT seq FROM state_sequence WHERE singleton = 1")
        .fetch_one(&pool)
        .await?;
    if final_seq != shape.key_seq(shape.keys) - 1 {
        return Err(format!(
            "sequence at {final_seq}, expected {}",
            shape.key_seq(shape.keys) - 1
        )
        .into());
    }
    sqlx::query("ANALYZE").execute(&pool).await?;
    let (bytes,): (i64,) = sqlx::query_as("SELECT pg_database_size(current_database())")
        .fetch_one(&pool)
        .await?;

    // The load files: a sample spread over the store, and keys to revoke outside it.
    let mut sampled = HashSet::new();
    let mut out = std::io::BufWriter::new(std::fs::File::create(requests)?);
    let stride = (shape.keys / sample.max(1)).max(1);
    for j in 0..sample.min(shape.keys) {
        let i = (j * stride + usize::from(stride > 1)).min(shape.keys - 1);
        if !sampled.insert(i) {
            continue;
        }
        let (api, path) = shape.request(shape.app_of(i));
        writeln!(out, "{}\t{api}\t{path}", key_secret(i))?;
    }
    out.flush()?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(revocable)?);
    let stride = (shape.keys / revocable_count.max(1)).max(1);
    let mut written = 0;
    for j in 0..shape.keys {
        if written == revocable_count {
            break;
        }
        let i = (j * stride + 3) % shape.keys;
        if sampled.contains(&i) {
            continue;
        }
        let app = shape.app_of(i);
        let (api, path) = shape.request(app);
        writeln!(
            out,
            "{}\t{}\t{}\t{api}\t{path}",
            app_name(app),
            key_id(i),
            key_secret(i)
        )?;
        written += 1;
    }
    out.flush()?;
    println!(
        "{{\"keys\":{},\"apps\":{apps},\"developers\":{developers},\"subscriptions\":{},\"bulk_keys\":{bulk_keys},\
         \"store_keys\":{via_store},\"seq\":{final_seq},\"database_bytes\":{bytes},\
         \"developers_s\":{:.2},\"apps_s\":{:.2},\"bulk_keys_s\":{:.2},\"store_writes_s\":{:.2},\
         \"store_writes_per_s\":{:.1},\"total_s\":{:.2}}}",
        shape.keys,
        apps * shape.subs_per_app.min(shape.products),
        developers_done.as_secs_f64(),
        (apps_done - developers_done).as_secs_f64(),
        (bulk_done - apps_done).as_secs_f64(),
        store_took.as_secs_f64(),
        via_store as f64 / store_took.as_secs_f64().max(1e-9),
        started.elapsed().as_secs_f64(),
    );
    store.close().await;
    Ok(())
}

// ------------------------------------------------------------------------------------------ load

async fn load(url: &str) -> Result<(), Error> {
    let store = SqlStore::open(url)?;
    store.ping().await?;
    let rss0 = rss_kb(std::process::id());
    let started = Instant::now();
    let image = store.load().await?;
    let took = started.elapsed();
    let rss1 = rss_kb(std::process::id());
    println!(
        "{{\"seq\":{},\"developers\":{},\"apps\":{},\"keys\":{},\"load_s\":{:.3},\"rss_before_kb\":{rss0},\
         \"rss_with_image_kb\":{rss1},\"hwm_kb\":{}}}",
        image.seq,
        image.developers.len(),
        image.apps.len(),
        image.keys.len(),
        took.as_secs_f64(),
        hwm_kb(std::process::id()),
    );
    drop(image);
    store.close().await;
    Ok(())
}

// ------------------------------------------------------------------------------------------ memory

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Nanoseconds per lookup of `order`'s keys with `get`.
fn time_lookups<F: Fn(&KeyHash) -> bool>(order: &[KeyHash], get: F) -> f64 {
    // One pass to warm, one timed.
    let mut found = 0usize;
    for h in order.iter().take(order.len() / 10) {
        found += usize::from(get(h));
    }
    let started = Instant::now();
    for h in order {
        found += usize::from(get(std::hint::black_box(h)));
    }
    let ns = started.elapsed().as_nanos() as f64 / order.len().max(1) as f64;
    assert!(found > 0, "no key found");
    ns
}

async fn memory(url: &str, catalog: &std::path::Path, lookups: usize) -> Result<(), Error> {
    let store = SqlStore::open(url)?;
    store.ping().await?;
    let text = std::fs::read_to_string(catalog)?;
    let file = tollgate::catalog::parse(&Source::from_text(catalog, text))
        .map_err(|e| format!("{}: {e}", catalog.display()))?;
    let pid = std::process::id();

    let base = live();
    let image = store.load().await?;
    let image_bytes = live() - base;
    let rss_image = rss_kb(pid);

    let handle = Arc::new(CatalogHandle::new(Catalog::default()));
    let snapshot = Snapshot::new(Arc::clone(&handle), None);
    snapshot
        .install_file(file)
        .map_err(|e| format!("install the catalog file: {e}"))?;
    let before = live();
    let started = Instant::now();
    // The snapshot takes its image whole; the keys are read again below, so it gets a copy (what the
    // snapshot holds is then what this measure grows by: the copy's rows move in or are freed).
    snapshot.load(image.clone());
    let snapshot_build_s = started.elapsed().as_secs_f64();
    let snapshot_bytes = live() - before;
    let rss_both = rss_kb(pid);
    let served = handle.snapshot();
    let keys_served = served.key_count();

    // The keys alone, three ways. A shuffled order of hashes to look up (a multiplicative stride).
    let n = image.keys.len();
    let stride = (2_654_435_761usize % n.max(1)) | 1;
    let order: Vec<KeyHash> = (0..lookups.min(n.max(1)))
        .map(|j| image.keys[(j.wrapping_mul(stride)) % n.max(1)].hash)
        .collect();
    let key = |k: &tollgate::state::model::StoredKey| Key {
        hash: k.hash,
        app: k.app_id as usize,
        status: k.status,
        expires_at: k.expires_at,
    };
    let served_ns = time_lookups(&order, |h| served.key(h).is_some());

    let before = live();
    let mut hamt: imbl::HashMap<KeyHash, Key> = imbl::HashMap::new();
    for k in &image.keys {
        hamt.insert(k.hash, key(k));
    }
    let hamt_bytes = live() - before;
    let hamt_ns = time_lookups(&order, |h| hamt.get(h).is_some());
    drop(hamt);

    let before = live();
    let mut std_map: HashMap<KeyHash, Key> = HashMap::with_capacity(n);
    for k in &image.keys {
        std_map.insert(k.hash, key(k));
    }
    let std_bytes = live() - before;
    let std_ns = time_lookups(&order, |h| std_map.contains_key(h));
    drop(std_map);

    drop(served);
    drop(image);
    let after_drop = live() - base;
    println!(
        "{{\"keys\":{n},\"keys_served\":{keys_served},\"image_mib\":{:.1},\"snapshot_mib\":{:.1},\
         \"snapshot_after_image_dropped_mib\":{:.1},\"snapshot_build_s\":{snapshot_build_s:.3},\
         \"rss_with_image_kb\":{rss_image},\"rss_with_both_kb\":{rss_both},\"key_size_bytes\":{},\
         \"keys_imbl_mib\":{:.1},\"keys_std_hashmap_mib\":{:.1},\
         \"lookup_ns_served_catalog\":{served_ns:.1},\"lookup_ns_imbl\":{hamt_ns:.1},\
         \"lookup_ns_std_hashmap\":{std_ns:.1},\"lookups\":{}}}",
        mib(image_bytes),
        mib(snapshot_bytes),
        mib(after_drop),
        std::mem::size_of::<Key>(),
        mib(hamt_bytes),
        mib(std_bytes),
        order.len(),
    );
    drop(snapshot);
    store.close().await;
    Ok(())
}

// ------------------------------------------------------------------------------------------ revokes

struct Revocable {
    app: String,
    id: String,
    key: String,
    api: String,
    path: String,
}

fn revocables(args: &RevokeArgs) -> Result<Vec<Revocable>, Error> {
    let text = std::fs::read_to_string(&args.revocable)
        .map_err(|e| format!("cannot read {}: {e}", args.revocable.display()))?;
    let all: Vec<Revocable> = text
        .lines()
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            (c.len() == 5).then(|| Revocable {
                app: c[0].to_owned(),
                id: c[1].to_owned(),
                key: c[2].to_owned(),
                api: c[3].to_owned(),
                path: c[4].to_owned(),
            })
        })
        .skip(args.skip)
        .take(args.count)
        .collect();
    if all.len() < args.count {
        return Err(format!(
            "{} holds {} revocable keys after skipping {}, {} wanted",
            args.revocable.display(),
            all.len(),
            args.skip,
            args.count
        )
        .into());
    }
    Ok(all)
}

fn http_client() -> Result<reqwest::Client, Error> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(4)
        .build()?)
}

/// POSTs the revoke of key `id` of `app` to A's management API; the HTTP status.
async fn post_revoke(
    client: reqwest::Client,
    admin: String,
    token: String,
    app: String,
    id: String,
) -> Result<u16, Error> {
    let mut request = client
        .post(format!("http://{admin}/v1/apps/{app}/keys/{id}/revoke"))
        .header("content-type", "application/json")
        .body("{}");
    if !token.is_empty() {
        request = request.bearer_auth(&token);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let _ = response.bytes().await?;
    Ok(status)
}

fn post_of(
    client: &reqwest::Client,
    args: &RevokeArgs,
    r: &Revocable,
) -> impl std::future::Future<Output = Result<u16, Error>> + use<> {
    post_revoke(
        client.clone(),
        args.a_admin.clone(),
        args.token.clone(),
        r.app.clone(),
        r.id.clone(),
    )
}

/// The HTTP status B's Check answers for `r` (200 when allowed) and the error name of a denial.
async fn probe(
    client: &mut AuthorizationClient<Channel>,
    r: &Revocable,
) -> Result<(u32, String), Error> {
    let answer = client
        .check(check_request(&r.key, &r.api, &r.path))
        .await?
        .into_inner();
    match answer.http_response {
        Some(HttpResponse::DeniedResponse(denied)) => {
            let code = denied
                .status
                .map_or(0, |s| u32::try_from(s.code).unwrap_or(0));
            let error = serde_json::from_str::<serde_json::Value>(&denied.body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_default();
            Ok((code, error))
        }
        _ if answer.status.as_ref().is_none_or(|s| s.code == 0) => Ok((200, String::new())),
        _ => Ok((0, "denied without an HTTP answer".to_owned())),
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn summary(name: &str, values: &mut [f64]) -> String {
    values.sort_by(f64::total_cmp);
    format!(
        "\"{name}\":{{\"n\":{},\"p50\":{:.2},\"p90\":{:.2},\"p99\":{:.2},\"max\":{:.2},\"mean\":{:.2}}}",
        values.len(),
        percentile(values, 0.50),
        percentile(values, 0.90),
        percentile(values, 0.99),
        values.last().copied().unwrap_or(f64::NAN),
        values.iter().sum::<f64>() / values.len().max(1) as f64,
    )
}

async fn revoke(
    args: &RevokeArgs,
    b_grpc: &str,
    poll_us: u64,
    timeout_ms: u64,
) -> Result<(), Error> {
    let keys = revocables(args)?;
    let http = http_client()?;
    let channel = Endpoint::from_shared(format!("http://{b_grpc}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?;
    let mut b = AuthorizationClient::new(channel);
    let mut raw = match &args.raw {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p)?)),
        None => None,
    };
    if let Some(out) = raw.as_mut() {
        writeln!(out, "i\tto_401_ms\tpost_ms\tprobes\terror")?;
    }
    let (mut to_401, mut post_ms, mut after_answer) = (Vec::new(), Vec::new(), Vec::new());
    let (mut not_allowed_before, mut timed_out, mut post_failed) = (0, 0, 0);
    let mut probes_total = 0u64;
    let mut errors: HashMap<String, u64> = HashMap::new();
    for (n, r) in keys.iter().enumerate() {
        let round = Instant::now();
        if probe(&mut b, r).await?.0 != 200 {
            not_allowed_before += 1;
            continue;
        }
        let started = Instant::now();
        let post = {
            let request = post_of(&http, args, r);
            tokio::spawn(async move { (request.await, started.elapsed()) })
        };
        let deadline = started + Duration::from_millis(timeout_ms);
        let mut seen = None;
        let mut probes = 0u64;
        while Instant::now() < deadline {
            let (code, error) = probe(&mut b, r).await?;
            probes += 1;
            if code == 401 {
                seen = Some((started.elapsed(), error));
                break;
            }
            if poll_us > 0 {
                tokio::time::sleep(Duration::from_micros(poll_us)).await;
            }
        }
        probes_total += probes;
        let (status, post_took) = post.await?;
        let ok = matches!(status, Ok(200));
        if !ok {
            post_failed += 1;
            eprintln!(
                "state_store: revoke of {} {} answered {status:?}",
                r.app, r.id
            );
        }
        post_ms.push(post_took.as_secs_f64() * 1e3);
        match seen {
            Some((took, error)) => {
                let ms = took.as_secs_f64() * 1e3;
                to_401.push(ms);
                after_answer.push(ms - post_took.as_secs_f64() * 1e3);
                if let Some(out) = raw.as_mut() {
                    writeln!(
                        out,
                        "{n}\t{ms:.3}\t{:.3}\t{probes}\t{error}",
                        post_took.as_secs_f64() * 1e3
                    )?;
                }
                *errors.entry(error).or_default() += 1;
            }
            None => timed_out += 1,
        }
        let elapsed = round.elapsed();
        let gap = Duration::from_millis(args.gap_ms);
        if elapsed < gap {
            tokio::time::sleep(gap - elapsed).await;
        }
    }
    if let Some(out) = raw.as_mut() {
        out.flush()?;
    }
    let mut to_401_sorted = to_401.clone();
    println!(
        "{{\"revokes\":{},\"seen_401\":{},\"timed_out\":{timed_out},\"not_allowed_before\":{not_allowed_before},\
         \"post_failed\":{post_failed},\"poll_us\":{poll_us},\"probes\":{probes_total},\"errors\":{},{},{},{}}}",
        keys.len(),
        to_401.len(),
        serde_json::to_string(&errors)?,
        summary("revoke_to_401_ms", &mut to_401_sorted),
        summary("post_ms", &mut post_ms),
        summary("b_401_minus_a_answer_ms", &mut after_answer),
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------ CPU

/// utime + stime of the whole process (clock ticks; exited threads included).
fn cpu_ticks(pid: u32) -> Result<u64, Error> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat[stat.rfind(')').ok_or("bad stat")? + 1..]
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of stat, the 12th and 13th after COMM.
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// Nanoseconds on CPU per live thread (`/proc/PID/task/TID/schedstat`'s first field).
fn thread_ns(pid: u32) -> Result<HashMap<u32, u64>, Error> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat"))
            && let Some(ns) = text.split_whitespace().next().and_then(|n| n.parse().ok())
        {
            out.insert(tid, ns);
        }
    }
    Ok(out)
}

/// CPU nanoseconds spent between two readings by the threads alive at both, and threads that came or went.
fn ns_between(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> (u64, usize) {
    let mut ns = 0;
    let mut changed = 0;
    for (tid, a) in after {
        match before.get(tid) {
            Some(b) => ns += a.saturating_sub(*b),
            None => {
                ns += a;
                changed += 1;
            }
        }
    }
    changed += before.keys().filter(|t| !after.contains_key(t)).count();
    (ns, changed)
}

fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS:")
}

fn hwm_kb(pid: u32) -> u64 {
    status_kb(pid, "VmHWM:")
}

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// The state metrics of a replica's /metrics: (apply sum s, apply count, changes applied, ok syncs).
async fn state_metrics(
    client: &reqwest::Client,
    admin: &str,
    token: &str,
) -> Result<[f64; 4], Error> {
    let mut request = client.get(format!("http://{admin}/metrics"));
    if !token.is_empty() {
        request = request.bearer_auth(token);
    }
    let text = request.send().await?.text().await?;
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    Ok([
        value("tollgate_state_apply_duration_seconds_sum"),
        value("tollgate_state_apply_duration_seconds_count"),
        value("tollgate_state_changes_applied_total"),
        value("tollgate_state_syncs_total{result=\"ok\"}"),
    ])
}

/// What B had spent and counted at one moment.
struct Reading {
    ticks: u64,
    threads: HashMap<u32, u64>,
    metrics: [f64; 4],
    at: Instant,
}

async fn reading(
    pid: u32,
    http: &reqwest::Client,
    admin: &str,
    token: &str,
) -> Result<Reading, Error> {
    let metrics = state_metrics(http, admin, token).await?;
    Ok(Reading {
        ticks: cpu_ticks(pid)?,
        threads: thread_ns(pid)?,
        metrics,
        at: Instant::now(),
    })
}

/// What B spent and counted between two readings.
struct Window {
    ticks: u64,
    ns: u64,
    threads_changed: usize,
    metrics: [f64; 4],
    seconds: f64,
}

fn window(a: &Reading, b: &Reading) -> Window {
    let (ns, threads_changed) = ns_between(&a.threads, &b.threads);
    Window {
        ticks: b.ticks - a.ticks,
        ns,
        threads_changed,
        metrics: [
            b.metrics[0] - a.metrics[0],
            b.metrics[1] - a.metrics[1],
            b.metrics[2] - a.metrics[2],
            b.metrics[3] - a.metrics[3],
        ],
        seconds: b.at.duration_since(a.at).as_secs_f64(),
    }
}

async fn cpu(args: &RevokeArgs, b_pid: u32, b_admin: &str, settle: f64) -> Result<(), Error> {
    let keys = revocables(args)?;
    let http = http_client()?;
    let length =
        Duration::from_millis(args.gap_ms * keys.len() as u64) + Duration::from_secs_f64(settle);
    let tick_hz = 100.0; // USER_HZ on Linux
    // Idle first: the same length of time with nothing to apply (B still polls every sync_interval).
    let r0 = reading(b_pid, &http, b_admin, &args.token).await?;
    tokio::time::sleep(length).await;
    let r1 = reading(b_pid, &http, b_admin, &args.token).await?;
    let mut failed = 0;
    let start = Instant::now();
    for (n, r) in keys.iter().enumerate() {
        let at = start + Duration::from_millis(args.gap_ms * n as u64);
        tokio::time::sleep_until(at.into()).await;
        if post_of(&http, args, r).await? != 200 {
            failed += 1;
        }
    }
    tokio::time::sleep_until((start + length).into()).await;
    let r2 = reading(b_pid, &http, b_admin, &args.token).await?;
    let (idle, busy) = (window(&r0, &r1), window(&r1, &r2));
    let n = keys.len() as f64;
    let per = |busy: f64, idle: f64| (busy - idle) / n;
    println!(
        "{{\"revokes\":{},\"failed\":{failed},\"gap_ms\":{},\"idle_s\":{:.2},\"busy_s\":{:.2},\
         \"idle\":{{\"ticks\":{},\"ns\":{},\"threads_changed\":{},\"apply_sum_s\":{:.6},\"apply_count\":{},\"syncs_ok\":{}}},\
         \"busy\":{{\"ticks\":{},\"ns\":{},\"threads_changed\":{},\"apply_sum_s\":{:.6},\"apply_count\":{},\"changes_applied\":{},\"syncs_ok\":{}}},\
         \"cpu_ms_per_revoke_ticks\":{:.3},\"cpu_ms_per_revoke_schedstat\":{:.3},\
         \"apply_us_per_batch\":{:.1},\"apply_batches_per_revoke\":{:.3},\"extra_syncs_per_revoke\":{:.3}}}",
        keys.len(),
        args.gap_ms,
        idle.seconds,
        busy.seconds,
        idle.ticks,
        idle.ns,
        idle.threads_changed,
        idle.metrics[0],
        idle.metrics[1],
        idle.metrics[3],
        busy.ticks,
        busy.ns,
        busy.threads_changed,
        busy.metrics[0],
        busy.metrics[1],
        busy.metrics[2],
        busy.metrics[3],
        per(
            busy.ticks as f64,
            idle.ticks as f64 * busy.seconds / idle.seconds
        ) * 1e3
            / tick_hz,
        per(busy.ns as f64, idle.ns as f64 * busy.seconds / idle.seconds) / 1e6,
        busy.metrics[0] / busy.metrics[1].max(1.0) * 1e6,
        busy.metrics[1] / n,
        per(
            busy.metrics[3],
            idle.metrics[3] * busy.seconds / idle.seconds
        ),
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------ Checks

/// A CheckRequest shaped like Envoy 1.40's for a plain HTTP/1.1 GET (as examples/check_load.rs builds).
fn check_request(key: &str, api: &str, path: &str) -> CheckRequest {
    let authority = "bench.example.test";
    let headers: HashMap<String, String> = [
        (":authority", authority),
        (":method", "GET"),
        (":path", path),
        (":scheme", "http"),
        ("user-agent", "wrk"),
        ("accept", "*/*"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "4f6c1f0e-0000-4000-8000-000000000001"),
        ("x-api-key", key),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    id: "1".to_owned(),
                    method: "GET".to_owned(),
                    headers,
                    path: path.to_owned(),
                    host: authority.to_owned(),
                    scheme: "http".to_owned(),
                    protocol: "HTTP/1.1".to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: HashMap::from([("tollgate_api".to_owned(), api.to_owned())]),
            ..Default::default()
        }),
    }
}
