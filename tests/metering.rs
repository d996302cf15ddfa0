//! Metering through the real access-log gRPC service over loopback: records, dedup across streams, billable
//! rules, `response_header` sums, sealing, a full spool, and crash safety at the library level.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::data::accesslog::v3::{HttpAccessLogEntry, TcpAccessLogEntry};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    LogEntries, TcpAccessLogEntries,
};
use envoy_types::pb::google::protobuf::Timestamp;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;

use tollgate::catalog::{CatalogHandle, parse};
use tollgate::envoy::access_log::AccessLogService;
use tollgate::metering::{Metering, MeteringError, MeteringOptions, UsageQuery, UsageRecord};
use tollgate::source::Source;

/// How long a poll may take before the test fails.
const TIMEOUT: Duration = Duration::from_secs(20);

const CATALOG: &str = r#"
products:
  - name: calls
    operations: [{api: a, paths: [/]}]
    meter: {event_name: api_calls, value: calls, success: [2xx]}
  - name: genai
    operations: [{api: a, paths: [/]}]
    meter: {event_name: tokens, value: "response_header:x-tokens", success: [2xx]}
developers:
  - email: ada@example.com
    stripe_customer: cus_Ada
    apps:
      - name: adaapp
        products: [{name: calls, status: approved}, {name: genai, status: approved}]
"#;

fn catalog() -> Arc<CatalogHandle> {
    Arc::new(CatalogHandle::new(
        parse(&Source::from_text("catalog.yaml", CATALOG.to_owned())).expect("test catalog"),
    ))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// An HTTP entry as Envoy logs it after ext_authz decided.
fn entry(
    id: &str,
    decision: &str,
    product: &str,
    status: u32,
    tokens: Option<&str>,
) -> HttpAccessLogEntry {
    let authz = [
        ("decision", decision),
        ("app", "adaapp"),
        ("developer", "ada@example.com"),
        ("stripe_customer", "cus_Ada"),
        ("product", product),
    ];
    let mut entry = support::authz_entry(id, start_of(id), status, &authz);
    if let Some(response) = entry.response.as_mut() {
        response.response_body_bytes = 100;
        if let Some(t) = tokens {
            response.response_headers = [("x-tokens".to_owned(), t.to_owned())]
                .into_iter()
                .collect();
        }
    }
    entry
}

/// When request `id` started: now at its first entry, the same for every later copy (as Envoy re-sends it).
fn start_of(id: &str) -> i64 {
    static STARTS: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, i64>>> =
        std::sync::LazyLock::new(Default::default);
    let mut starts = STARTS.lock().unwrap();
    *starts.entry(id.to_owned()).or_insert_with(now_ms)
}

fn http(entries: Vec<HttpAccessLogEntry>, log_name: Option<&str>) -> StreamAccessLogsMessage {
    support::http_message(entries, log_name)
}

fn tcp() -> StreamAccessLogsMessage {
    StreamAccessLogsMessage {
        identifier: None,
        log_entries: Some(LogEntries::TcpLogs(TcpAccessLogEntries {
            log_entry: vec![TcpAccessLogEntry::default()],
        })),
    }
}

/// The access-log service served in-process on a free loopback port.
struct Server {
    addr: std::net::SocketAddr,
    stop: watch::Sender<bool>,
}

impl Server {
    async fn start(metering: Metering, registry: &prometheus::Registry) -> Server {
        Self::start_with_token(metering, registry, None).await
    }

    /// [`Server::start`] with `access_log_token` set.
    async fn start_with_token(
        metering: Metering,
        registry: &prometheus::Registry,
        token: Option<&str>,
    ) -> Server {
        let service = AccessLogService::new(metering, registry).expect("register metrics");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (stop, mut stopped) = watch::channel(false);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service.into_server(token.map(Into::into)))
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async move {
                    let _ = stopped.wait_for(|s| *s).await;
                }),
        );
        Server { addr, stop }
    }

    /// Sends `messages` on one stream; Ok once the server answered (every record durable).
    async fn stream(&self, messages: Vec<StreamAccessLogsMessage>) -> Result<(), tonic::Status> {
        self.stream_with(messages, None).await
    }

    /// [`Server::stream`] with an `authorization` header on the stream.
    async fn stream_with(
        &self,
        messages: Vec<StreamAccessLogsMessage>,
        authorization: Option<&str>,
    ) -> Result<(), tonic::Status> {
        let mut client = AccessLogServiceClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect to the access-log service");
        let mut request = tonic::Request::new(tokio_stream::iter(messages));
        if let Some(value) = authorization {
            request
                .metadata_mut()
                .insert("authorization", value.parse().expect("ascii header"));
        }
        client.stream_access_logs(request).await.map(|_| ())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn metric(registry: &prometheus::Registry, name: &str, label: Option<&str>) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| label.is_none_or(|l| m.get_label().iter().any(|p| p.value() == l)))
        // A metric is either a counter or a gauge; the other part reads 0.
        .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
        .sum()
}

async fn open(options: MeteringOptions, registry: &prometheus::Registry) -> Metering {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match Metering::open(options.clone(), catalog(), registry).await {
            Ok(m) => return m,
            // The previous instance's writer thread releases the folder lock once it has drained its queue.
            Err(MeteringError::Locked(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("open metering: {e}"),
        }
    }
}

/// A metering instance on a folder of its own, with its metrics in a `tollgate_`-prefixed registry.
struct Rig {
    _dir: tempfile::TempDir,
    registry: prometheus::Registry,
    metering: Metering,
}

impl Rig {
    /// Opens metering with `window` and `lateness`; `tune` adjusts the options first.
    async fn open(
        window: Duration,
        lateness: Duration,
        tune: impl FnOnce(&mut MeteringOptions),
    ) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = prometheus::Registry::new_custom(Some("tollgate".into()), None)
            .expect("a valid registry prefix");
        let mut options = MeteringOptions::new(dir.path(), window, lateness, "test-producer");
        tune(&mut options);
        let metering = open(options, &registry).await;
        Rig {
            _dir: dir,
            registry,
            metering,
        }
    }
}

/// Sum of the outbox rows per meter.
async fn outbox_sums(metering: &Metering) -> (u64, u64, usize) {
    let rows = metering.outbox_pending().await;
    let sum = |meter: &str| {
        rows.iter()
            .filter(|r| r.event_name == meter)
            .map(|r| r.value)
            .sum::<u64>()
    };
    (sum("api_calls"), sum("tokens"), rows.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_dedup_billable_rules_header_sums_and_sealing() {
    let Rig {
        _dir,
        registry,
        metering,
    } = Rig::open(Duration::from_secs(1), Duration::from_secs(1), |_| {}).await;
    let (stop, stopped) = watch::channel(false);
    let runner = tokio::spawn({
        let m = metering.clone();
        async move { m.run(stopped).await }
    });
    let server = Server::start(metering.clone(), &registry).await;

    // Stream 1: log name only in the first message, then a TCP entry that is ignored.
    server
        .stream(vec![
            http(
                vec![
                    entry("r1", "allow", "calls", 200, None),
                    entry("r2", "allow", "calls", 204, None),
                    entry("r3", "allow", "calls", 503, None),
                ],
                Some("gateway_als"),
            ),
            tcp(),
            http(
                vec![
                    entry("r4", "deny", "calls", 429, None),
                    entry("r5", "deny", "calls", 200, None),
                    entry("t1", "allow", "genai", 200, Some("5")),
                ],
                None,
            ),
        ])
        .await
        .expect("stream 1 accepted");
    // Stream 2 repeats r1 and t1 (counted once), adds more header sums and a non-integer header.
    server
        .stream(vec![http(
            vec![
                entry("r1", "allow", "calls", 200, None),
                entry("t1", "allow", "genai", 200, Some("5")),
                entry("t2", "allow", "genai", 200, Some("7")),
                entry("t3", "allow", "genai", 200, Some("lots")),
                entry("t4", "allow", "genai", 500, Some("1000")),
                entry("r6", "allow", "calls", 201, None),
            ],
            Some("gateway_als"),
        )])
        .await
        .expect("stream 2 accepted");

    assert_eq!(
        metric(&registry, "tollgate_metering_records_received_total", None),
        12.0
    );
    assert_eq!(
        metric(
            &registry,
            "tollgate_metering_records_deduplicated_total",
            None
        ),
        2.0
    );
    assert_eq!(
        metric(&registry, "tollgate_metering_records_spooled_total", None),
        10.0
    );
    assert_eq!(
        metric(
            &registry,
            "tollgate_metering_tcp_entries_ignored_total",
            None
        ),
        1.0
    );
    assert_eq!(
        metric(
            &registry,
            "tollgate_metering_invalid_header_values_total",
            None
        ),
        1.0
    );
    assert!(metric(&registry, "tollgate_metering_spool_bytes", None) > 0.0);

    // Denied records are usage too: the app report holds all 10 records.
    let report = metering
        .usage(UsageQuery {
            app: Some("adaapp".into()),
            customer: None,
        })
        .await
        .expect("usage report");
    let json = serde_json::to_value(&report).unwrap();
    let total = |field: &str| -> u64 {
        json["meters"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|m| m["windows"].as_array().unwrap().iter())
            .map(|w| w[field].as_u64().unwrap())
            .sum()
    };
    assert_eq!(total("records"), 10);
    assert_eq!(total("denied"), 2);
    assert_eq!(total("billable"), 6, "r1 r2 r6 t1 t2 t3");

    // Poll until every window is sealed, then the outbox must hold exactly the billable totals:
    // calls: r1, r2, r6 (r3 is a 5xx, r4/r5 denied); tokens: 5 + 7 (+0 for "lots"; t4 is a 5xx).
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let customer = metering
            .usage(UsageQuery {
                app: None,
                customer: Some("cus_Ada".into()),
            })
            .await
            .expect("usage report");
        let all_sealed = customer
            .meters
            .iter()
            .flat_map(|m| m.windows.iter())
            .all(|w| {
                w.state == tollgate::metering::WindowState::Sealed
                    && w.sealed_value == Some(w.value)
            });
        if all_sealed && outbox_sums(&metering).await.0 > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "windows were not sealed in time: {customer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (calls, tokens, rows) = outbox_sums(&metering).await;
    assert_eq!((calls, tokens), (3, 12));
    assert_eq!(
        metric(&registry, "tollgate_metering_windows_sealed_total", None),
        rows as f64
    );
    let pending = metering.outbox_pending().await;
    for row in &pending {
        assert_eq!(row.stripe_customer, "cus_Ada");
        assert_eq!(row.producer, "test-producer");
        assert!(row.id.len() <= 100);
        assert_eq!(row.window_end_ms - row.window_start_ms, 1_000);
    }

    // A late copy of an already sealed request is still a duplicate; acks are durable and idempotent.
    server
        .stream(vec![http(
            vec![entry("r2", "allow", "calls", 204, None)],
            None,
        )])
        .await
        .expect("late duplicate accepted");
    assert_eq!(
        metric(
            &registry,
            "tollgate_metering_records_deduplicated_total",
            None
        ),
        3.0
    );
    let first = pending[0].id.clone();
    assert_eq!(
        metering.outbox_ack(&first).await.unwrap(),
        tollgate::metering::AckOutcome::Acked
    );
    assert_eq!(
        metering.outbox_ack(&first).await.unwrap(),
        tollgate::metering::AckOutcome::AlreadyAcked
    );
    assert!(
        metering
            .outbox_pending()
            .await
            .iter()
            .all(|r| r.id != first)
    );

    let _ = stop.send(true);
    runner.await.expect("run ends on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_refuses_records_loudly() {
    let Rig {
        _dir,
        registry,
        metering,
    } = Rig::open(Duration::from_secs(60), Duration::from_secs(10), |o| {
        o.max_disk_bytes = 4_096;
    })
    .await;
    let server = Server::start(metering.clone(), &registry).await;
    let mut refused = None;
    for batch in 0..100 {
        let entries = (0..10)
            .map(|i| entry(&format!("full-{batch}-{i}"), "allow", "calls", 200, None))
            .collect();
        if let Err(status) = server.stream(vec![http(entries, Some("als"))]).await {
            refused = Some(status);
            break;
        }
    }
    let status = refused.expect("the spool must refuse once max_disk_bytes is reached");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(metering.is_full());
    assert_eq!(metric(&registry, "tollgate_metering_spool_full", None), 1.0);
    let rejected = metric(
        &registry,
        "tollgate_metering_records_rejected_total",
        Some("full"),
    );
    let spooled = metric(&registry, "tollgate_metering_records_spooled_total", None);
    let received = metric(&registry, "tollgate_metering_records_received_total", None);
    assert!(rejected >= 10.0);
    assert_eq!(
        spooled + rejected,
        received,
        "every received record is spooled or counted as refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_ingest_loses_nothing_acknowledged_and_counts_nothing_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = MeteringOptions::new(
        dir.path(),
        Duration::from_secs(3_600),
        Duration::from_secs(60),
        "p",
    );
    let record = |id: String| UsageRecord {
        request_id: id,
        start_ms: now_ms(),
        decision: "allow".into(),
        app: "adaapp".into(),
        stripe_customer: "cus_Ada".into(),
        product: "calls".into(),
        response_code: 200,
        ..Default::default()
    };
    let batches: Vec<Vec<UsageRecord>> = (0..200)
        .map(|b| (0..25).map(|i| record(format!("crash-{b}-{i}"))).collect())
        .collect();
    let total: u64 = batches.iter().map(|b| b.len() as u64).sum();

    let first = open(options.clone(), &prometheus::Registry::new()).await;
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    for batch in batches.clone() {
        let m = first.clone();
        let acked = acked_tx.clone();
        tasks.spawn(async move {
            let n = batch.len() as u64;
            if m.ingest(batch).await.is_ok() {
                let _ = acked.send(n);
            }
        });
    }
    drop(acked_tx);
    // "Crash" once some batches are acknowledged: abort every ingest still waiting and drop every handle.
    let mut acked = acked_rx
        .recv()
        .await
        .expect("at least one batch acknowledged");
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    drop(first);
    while let Ok(n) = acked_rx.try_recv() {
        acked += n;
    }

    // Wait for the folder lock (the writer drained), then add a torn, half-written frame to the newest segment.
    drop(open(options.clone(), &prometheus::Registry::new()).await);
    let newest = std::fs::read_dir(dir.path().join("spool"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .expect("a spool segment");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&newest)
        .unwrap();
    std::io::Write::write_all(&mut file, &[0x31, 0x46, 0x47, 0x54, 0xff, 0x00, 0x00]).unwrap();
    drop(file);

    let registry = prometheus::Registry::new();
    let second = open(options.clone(), &registry).await;
    assert_eq!(
        metric(&registry, "metering_replay_dropped_bytes_total", None),
        7.0
    );
    let app = || UsageQuery {
        app: Some("adaapp".into()),
        customer: None,
    };
    let records = |r: tollgate::metering::UsageReport| -> u64 {
        r.meters
            .iter()
            .flat_map(|m| m.windows.iter())
            .map(|w| w.records)
            .sum()
    };
    let replayed = records(second.usage(app()).await.unwrap());
    assert!(
        replayed >= acked,
        "replayed {replayed} < acknowledged {acked}"
    );
    assert!(replayed <= total);

    // Envoy-like resend of everything: what was durable is a duplicate, the rest is new.
    for batch in batches {
        second.ingest(batch).await.expect("ingest after restart");
    }
    assert_eq!(
        records(second.usage(app()).await.unwrap()),
        total,
        "every id exactly once"
    );
    assert_eq!(
        metric(&registry, "metering_records_deduplicated_total", None),
        replayed as f64
    );
}

/// Seals until the outbox holds a row, then returns the pending rows.
async fn sealed_rows(metering: &Metering) -> Vec<tollgate::metering::OutboxRow> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        metering.seal_once().await.expect("seal pass");
        let rows = metering.outbox_pending().await;
        if !rows.is_empty() {
            return rows;
        }
        assert!(Instant::now() < deadline, "no window sealed in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spools_without_a_producer_never_share_row_ids_and_keep_theirs_across_restarts() {
    // A config without `metering.producer` leaves the choice to the spool folder, whatever HOSTNAME says.
    let source = Source::from_text(
        "/etc/tollgate/tollgate.yaml",
        "catalog: {path: catalog.yaml}\nmetering: {dir: /var/lib/tollgate}\n".to_owned(),
    );
    let config = tollgate::app::config::Config::from_source(&source).expect("config");
    assert_eq!(config.metering_options().producer, None);

    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let options = |dir: &std::path::Path| {
        let mut o = MeteringOptions::with_spool_producer(
            dir,
            Duration::from_millis(200),
            Duration::from_millis(200),
        );
        // The second replica sees the request after the first sealed it: its window must still be open.
        o.retention = Duration::from_secs(600);
        o
    };
    // The same request seen by two replicas (each with its own spool) seals the same window and customer.
    let start_ms = now_ms();
    let record = UsageRecord {
        request_id: "same-request".into(),
        start_ms,
        decision: "allow".into(),
        app: "adaapp".into(),
        stripe_customer: "cus_Ada".into(),
        product: "calls".into(),
        response_code: 200,
        ..Default::default()
    };
    let mut rows = Vec::new();
    let mut producers = Vec::new();
    for dir in [a.path(), b.path()] {
        let metering = open(options(dir), &prometheus::Registry::new()).await;
        metering.ingest(vec![record.clone()]).await.expect("ingest");
        let sealed = sealed_rows(&metering).await;
        assert_eq!(sealed.len(), 1);
        assert_eq!(sealed[0].producer, metering.producer());
        producers.push(metering.producer().to_owned());
        rows.push(sealed[0].clone());
    }
    assert_eq!(rows[0].window_start_ms, rows[1].window_start_ms);
    assert_ne!(producers[0], producers[1]);
    assert_ne!(rows[0].id, rows[1].id, "two spools, two Stripe identifiers");

    // After a restart the folder keeps its producer, and the replayed row keeps its id.
    let reopened = open(options(a.path()), &prometheus::Registry::new()).await;
    assert_eq!(reopened.producer(), producers[0]);
    let pending = reopened.outbox_pending().await;
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id, rows[0].id);
    assert_eq!(
        std::fs::read_to_string(a.path().join("PRODUCER"))
            .unwrap()
            .trim_end(),
        producers[0]
    );

    // A configured producer still wins over the folder's.
    let mut named = options(a.path());
    named.producer = Some("replica-7".into());
    drop(reopened);
    let named = open(named, &prometheus::Registry::new()).await;
    assert_eq!(named.producer(), "replica-7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_start_times_count_at_arrival_and_seal() {
    let Rig {
        _dir,
        registry,
        metering,
    } = Rig::open(
        Duration::from_millis(200),
        Duration::from_millis(200),
        |_| {},
    )
    .await;
    let server = Server::start(metering.clone(), &registry).await;
    let forged = [
        (i64::MIN, i32::MIN),
        (i64::MAX, i32::MAX),
        (-62_135_596_800, 0),
        (253_402_300_799, 0),
        (0, 0),
    ];
    let entries = forged
        .iter()
        .enumerate()
        .map(|(i, &(seconds, nanos))| {
            let mut e = entry(&format!("forged-{i}"), "allow", "calls", 200, None);
            if let Some(common) = e.common_properties.as_mut() {
                common.start_time = Some(Timestamp { seconds, nanos });
            }
            e
        })
        .collect();
    let before = now_ms();
    server
        .stream(vec![http(entries, Some("als"))])
        .await
        .expect("forged times are accepted, not fatal");
    let after = now_ms();
    let rows = sealed_rows(&metering).await;
    let calls: u64 = rows.iter().map(|r| r.value).sum();
    assert_eq!(calls, forged.len() as u64, "{rows:?}");
    for row in &rows {
        assert!(
            row.window_end_ms > before && row.window_start_ms <= after,
            "counted in its arrival window: {row:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_access_log_token_only_streams_bearing_it_are_metered() {
    let Rig {
        _dir,
        registry,
        metering,
    } = Rig::open(Duration::from_secs(60), Duration::from_secs(1), |_| {}).await;
    let server = Server::start_with_token(metering.clone(), &registry, Some("s3cret")).await;
    let batch = |id: &str| {
        vec![http(
            vec![entry(id, "allow", "calls", 200, None)],
            Some("gw"),
        )]
    };

    for presented in [
        None,
        Some("Bearer wrong"),
        Some("s3cret"),
        Some("Basic s3cret"),
    ] {
        let refused = server
            .stream_with(batch("forged"), presented)
            .await
            .expect_err("a stream without the token is refused");
        assert_eq!(
            refused.code(),
            tonic::Code::Unauthenticated,
            "{presented:?}"
        );
        assert!(
            !refused.message().contains("s3cret"),
            "{}",
            refused.message()
        );
    }
    assert_eq!(
        metric(
            &registry,
            "tollgate_metering_streams_unauthenticated_total",
            None
        ),
        4.0
    );
    assert_eq!(
        metric(&registry, "tollgate_metering_records_received_total", None),
        0.0
    );

    server
        .stream_with(batch("real"), Some("Bearer s3cret"))
        .await
        .expect("a stream with the token is metered");
    assert_eq!(
        metric(&registry, "tollgate_metering_records_received_total", None),
        1.0
    );
    assert_eq!(
        metric(&registry, "tollgate_metering_records_spooled_total", None),
        1.0
    );
}

#[tokio::test]
async fn calls_sharing_a_request_id_are_each_counted_and_resends_once() {
    let Rig {
        _dir,
        registry,
        metering,
    } = Rig::open(Duration::from_secs(60), Duration::from_secs(1), |_| {}).await;
    let server = Server::start(metering.clone(), &registry).await;
    let authz = [
        ("decision", "allow"),
        ("app", "meshapp"),
        ("stripe_customer", "cus_Mesh"),
        ("product", "calls"),
    ];
    let now = now_ms();
    // A mesh caller propagates one x-request-id across three distinct calls.
    let calls: Vec<HttpAccessLogEntry> = (0..3)
        .map(|i| support::authz_entry("shared-id", now + i, 200, &authz))
        .collect();
    server
        .stream(vec![http(calls.clone(), Some("gateway_als"))])
        .await
        .expect("accepted");
    // Envoy re-sends the same three entries (a retried stream): nothing more is counted.
    server
        .stream(vec![http(calls, Some("gateway_als"))])
        .await
        .expect("accepted");
    assert_eq!(
        metric(&registry, "tollgate_metering_records_spooled_total", None),
        3.0
    );
    assert_eq!(
        metric(
            &registry,
            "tollgate_metering_records_deduplicated_by_app_total",
            Some("meshapp")
        ),
        3.0
    );
}
