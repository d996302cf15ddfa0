//! `tollgate serve`: binds the gRPC and admin listeners, loads the catalog, and runs until SIGINT/SIGTERM.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::transport::server::TcpIncoming;

use crate::app::admin::{self, AdminState};
use crate::app::batched::Batched;
use crate::app::config::{Config, StoreKind};
use crate::app::http::{self, Acceptor, HttpLimits};
use crate::app::memory;
use crate::app::metrics::{Metrics, MetricsError};
use crate::app::tls::{self, Alpn, TlsError, TlsServer};
use crate::billing::{Billing, BillingError};
use crate::catalog::remote::{Remote, RemoteError, Validators};
use crate::catalog::{Catalog, CatalogHandle, watch as catalog_watch};
use crate::check::Authorizer;
use crate::credits::journal::Journal;
use crate::credits::{CreditMetrics, Credits};
use crate::envoy::MAX_MESSAGE_BYTES;
use crate::envoy::access_log::AccessLogService;
use crate::envoy::authz::AuthzService;
use crate::envoy::ext_proc::ExtProcService;
use crate::envoy::slim::authorization_server::AuthorizationServer;
use crate::history;
use crate::identity::jwt::{JwtConfigError, JwtMetrics, JwtVerifier};
use crate::metering::{Metering, MeteringError};
use crate::paywall::Paywall;
use crate::paywall::metrics::PaywallMetrics;
use crate::quota::QuotaStore;
use crate::quota::memory::MemoryStore;
use crate::quota::persist;
use crate::quota::redis::replica::{self, ReplicaError};
use crate::quota::redis::{RedisOptions, RedisStore, RedisStoreError};
use crate::source::SourceError;
use crate::state::api::ManagementState;
use crate::state::metrics::StateMetrics;
use crate::state::sql::{Backend, SqlStore};
use crate::state::sync::Syncer;
use crate::state::{self, Snapshot, StoreError};
use crate::util::clock::unix_now;

/// How long shutdown spends returning credit leases (a crash would keep them as spent, or settle them from
/// the journal): the orchestrator's grace period is longer.
const CREDIT_FLUSH: Duration = Duration::from_secs(5);
/// HTTP/2 streams one gRPC connection may hold open at once (Envoy multiplexes every Check on few
/// connections, so this is far above what it needs and far below what would exhaust memory).
const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// How often an idle gRPC connection is pinged, and how long the answer may take before the connection is
/// dropped: a peer that vanished without a FIN must not hold its streams forever.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often ended quota windows are freed.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Why `serve` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The catalog could not be loaded at start.
    #[error(transparent)]
    Catalog(#[from] SourceError),
    /// The remote catalog could not be set up, fetched nor read from its cached copy at start.
    #[error(transparent)]
    RemoteCatalog(#[from] RemoteError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The Redis replica id in `metering.dir` could not be read or kept.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The catalog watcher could not start.
    #[error(transparent)]
    Watch(#[from] catalog_watch::WatchError),
    /// A JWT provider could not be set up.
    #[error(transparent)]
    Jwt(#[from] JwtConfigError),
    /// The Redis quota store refused the connection settings.
    #[error("quota store: {0}")]
    Redis(#[from] RedisStoreError),
    /// Billing could not start.
    #[error("billing: {0}")]
    Billing(#[from] BillingError),
    /// The metering spool could not be opened.
    #[error("metering: {0}")]
    Metering(#[from] MeteringError),
    /// A listener's TLS files could not make a server config.
    #[error("{listener}.{source}")]
    Tls {
        /// `grpc_tls` or `admin_tls`.
        listener: &'static str,
        /// What is wrong with the files.
        source: TlsError,
    },
    /// The state store's folder could not be created.
    #[error("cannot create the state store's folder {dir}: {source}")]
    StateDir {
        /// The folder.
        dir: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The state store's settings are unusable.
    #[error(transparent)]
    State(#[from] StoreError),
    /// Metrics could not be registered.
    #[error("metrics setup failed: {0}")]
    Metrics(#[from] MetricsError),
}

/// Runs the sidecar until a shutdown signal.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    let metrics = Metrics::new()?;
    let (loaded, follow) = match &config.catalog.path {
        Some(path) => (
            catalog_watch::read(path, None).await?,
            Follow::File(path.clone()),
        ),
        None => {
            let remote = Remote::new(
                &config.catalog,
                &config.metering.dir,
                metrics.catalog.clone(),
            )?;
            let (loaded, validators) = remote.start().await?;
            (Some(loaded), Follow::Remote(Box::new(remote), validators))
        }
    };
    let handle = Arc::new(CatalogHandle::new(Catalog::default()));
    let snapshot = Arc::new(Snapshot::new(handle.clone(), Some(metrics.catalog.clone())));
    let installer: catalog_watch::Installer = {
        let snapshot = Arc::clone(&snapshot);
        Arc::new(move |catalog| snapshot.install_file(catalog).map_err(|c| c.to_string()))
    };
    let digest = match loaded {
        Some(loaded) => {
            catalog_watch::install(&installer, loaded, &metrics.catalog).map_err(|message| {
                SourceError {
                    file: config
                        .catalog
                        .path
                        .clone()
                        .unwrap_or_else(|| follow.name().into()),
                    position: None,
                    message,
                }
            })?
        }
        None => [0; 32],
    };
    let state_url = config.state_url().to_owned();
    if Backend::of(&state_url) == Some(Backend::Sqlite)
        && let Some(dir) = Path::new(state_url.trim_start_matches("sqlite://"))
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir).map_err(|source| ServeError::StateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
    }
    let store = SqlStore::open(&state_url)?;
    let state_metrics = StateMetrics::register(&metrics.registry)?;
    let syncer = Arc::new(Syncer::new(
        Arc::new(store.clone()),
        Arc::clone(&snapshot),
        state_metrics.clone(),
    ));

    let metering =
        Metering::open(config.metering_options(), handle.clone(), &metrics.registry).await?;
    metering.roll_up_into(Arc::new(store.clone()));
    let access_log = AccessLogService::new(metering.clone(), &metrics.registry)?;
    let billing = match &config.billing {
        Some(billing) => Some(Billing::open(
            &billing.stripe,
            metering.clone(),
            &metrics.registry,
        )?),
        None => {
            tracing::info!("no billing configured: usage is metered and kept, nothing is sent");
            None
        }
    };

    let paywall = match &config.billing {
        Some(billing) => Some(Paywall::new(
            &billing.stripe,
            Arc::new(store.clone()),
            handle.clone(),
            syncer.waker(),
            PaywallMetrics::register(&metrics.registry)?,
        )?),
        None => {
            if !handle.snapshot().sold_through_stripe().is_empty() {
                tracing::warn!(
                    "products have stripe_prices but billing.stripe is not configured: every call to them is refused"
                );
            }
            None
        }
    };
    if let Some(paywall) = &paywall {
        tracing::info!(
            webhook = paywall.takes_webhooks(),
            "Stripe drives access to products with stripe_prices"
        );
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let replica = replica::load_or_create(&config.metering.dir)?;
    let journal = match Journal::open(&config.metering.dir, &replica.id) {
        Ok(opened) => Some(opened),
        Err(error) => {
            tracing::warn!(%error, dir = %config.metering.dir.display(),
                "credit spend journal not opened: a crash costs up to a lease per owner");
            None
        }
    };
    let credits = Arc::new(Credits::start(
        Arc::new(store.clone()),
        replica.id.clone(),
        config.credits.options(),
        CreditMetrics::new(&metrics.registry)?,
        journal,
    ));
    let mut persister = None;
    let quota: Arc<dyn QuotaStore> = match config.quota.store {
        StoreKind::Memory => {
            let store = Arc::new(MemoryStore::new());
            let dir = config.metering.dir.clone();
            match persist::load(&dir, &store) {
                Ok(restored) => tracing::info!(windows = restored, "quota counters restored"),
                Err(error) => {
                    tracing::warn!(%error, "quota counters not restored; counting from zero")
                }
            }
            let task = tokio::spawn(persist::run(
                dir.clone(),
                Arc::clone(&store),
                config.quota.persist_interval,
                shutdown_rx.clone(),
            ));
            persister = Some((task, Arc::clone(&store), dir));
            store
        }
        StoreKind::Redis => {
            let options = RedisOptions {
                url: config.quota.redis_url.clone().unwrap_or_default(),
                cluster: config.quota.redis_cluster,
                timeout: config.quota.timeout,
                max_lease: config.quota.max_lease,
                replica: Some(replica),
            };
            Arc::new(RedisStore::connect(options, &metrics.registry).await?)
        }
    };
    metering.settle_into(Arc::clone(&quota));
    let jwt = match &config.identity.jwt {
        Some(jwt) => {
            let jwt_metrics = JwtMetrics::register(&metrics.registry)?;
            Some(JwtVerifier::new(jwt, &config.base_dir, &jwt_metrics).await?)
        }
        None => None,
    };
    if let Some(paywall) = &paywall {
        paywall.grant_top_ups(Arc::clone(&credits));
    }
    let authorizer = Arc::new(
        Authorizer::new(
            handle.clone(),
            quota.clone(),
            jwt,
            config.settings(),
            metrics.check.clone(),
        )
        .with_credits(Arc::clone(&credits))
        .with_history(Arc::new(store.clone())),
    );

    let grpc_tls = load_tls("grpc_tls", config.grpc_tls.as_ref(), Alpn::H2)?;
    let admin_tls = load_tls("admin_tls", config.admin_tls.as_ref(), Alpn::Http11)?;
    let handshake_failures = prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "tls_handshake_failures_total",
            "TLS handshakes refused or timed out, by listener (grpc_tls, admin_tls)",
        ),
        &["listener"],
    )?;
    if grpc_tls.is_some() || admin_tls.is_some() {
        metrics
            .registry
            .register(Box::new(handshake_failures.clone()))?;
    }
    for server in grpc_tls.iter().chain(admin_tls.iter()) {
        server.count_failures_in(handshake_failures.with_label_values(&[server.name()]));
        tokio::spawn(
            server
                .clone()
                .watch(tls::RELOAD_EVERY, signalled(shutdown_rx.clone())),
        );
    }

    let grpc_listener = bind(config.grpc_listen).await?;
    let admin_listener = bind(config.admin_listen).await?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<AuthorizationServer<AuthzService>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;

    let stream_token: Option<Arc<str>> = config.access_log_token.as_deref().map(Arc::from);
    let grpc = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(health_service)
        .add_service(
            AuthorizationServer::new(AuthzService::new(authorizer.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(access_log.into_server(stream_token.clone()))
        .add_service(
            ExtProcService::new(
                handle.clone(),
                config.genai.max_buffer_bytes,
                &metrics.registry,
            )?
            .into_server(stream_token),
        );
    let grpc: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
        match &grpc_tls {
            None => Box::pin(
                grpc.serve_with_incoming_shutdown(
                    TcpIncoming::from(grpc_listener)
                        .with_nodelay(Some(true))
                        .map(|io| io.map(Batched::new)),
                    signalled(shutdown_rx.clone()),
                ),
            ),
            Some(server) => Box::pin(
                grpc.serve_with_incoming_shutdown(
                    tls::incoming(
                        grpc_listener,
                        server.clone(),
                        signalled(shutdown_rx.clone()),
                    )
                    .map(|io| io.map(Batched::new)),
                    signalled(shutdown_rx.clone()),
                ),
            ),
        };
    let management = state::api::router(ManagementState {
        store: Arc::new(store.clone()),
        snapshot: Arc::clone(&snapshot),
        syncer: Arc::clone(&syncer),
        metrics: state_metrics,
        actor: state::api::actor(config.admin_token.as_deref()),
        paywall: paywall.clone(),
        credits: Some(Arc::clone(&credits)),
    });
    let admin_router = admin::router(
        AdminState {
            metrics: metrics.clone(),
            quota: quota.clone(),
            catalog: handle.clone(),
            metering: metering.clone(),
            billing: billing.clone(),
            admin_token: config.admin_token.as_deref().map(Arc::from),
            syncer: Some(Arc::clone(&syncer)),
            history: Some(Arc::new(store.clone())),
        },
        Some(management),
    );
    // The webhook needs no admin token: the Stripe-Signature authenticates it.
    let admin_router = match paywall.as_ref().and_then(Paywall::webhook_routes) {
        Some(webhook) => admin_router.merge(webhook),
        None => admin_router,
    };
    let admin = http::serve(
        admin_listener,
        admin_tls.map_or(Acceptor::Plain, Acceptor::Tls),
        admin_router,
        HttpLimits::default(),
        signalled(shutdown_rx.clone()),
    );

    let state_sync = tokio::spawn(follow_state(
        store.clone(),
        Arc::clone(&syncer),
        Arc::clone(&credits),
        config.state.sync_interval,
        paywall,
        shutdown_rx.clone(),
    ));
    let watcher = match follow {
        Follow::File(path) => tokio::spawn(catalog_watch::run(
            path,
            installer,
            digest,
            metrics.catalog.clone(),
            shutdown_rx.clone(),
        )),
        Follow::Remote(remote, validators) => {
            let poll = remote.run(installer, validators, digest, shutdown_rx.clone());
            tokio::spawn(async move {
                poll.await;
                Ok(())
            })
        }
    };
    let deliverer = billing.clone().map(|billing| {
        let shutdown = shutdown_rx.clone();
        tokio::spawn(async move { billing.run(shutdown).await })
    });
    let sealer = tokio::spawn({
        let metering = metering.clone();
        let shutdown = shutdown_rx.clone();
        async move { metering.run(shutdown).await }
    });
    tokio::spawn(history::prune(Arc::new(store.clone()), shutdown_rx.clone()));
    let releaser = tokio::spawn(release_holds(
        Arc::clone(&quota),
        config.quota.hold_timeout,
        shutdown_rx.clone(),
    ));
    tokio::spawn(memory::release_after_reloads(
        handle.clone(),
        shutdown_rx.clone(),
    ));
    let sweeper = tokio::spawn(sweep(authorizer.clone(), shutdown_rx));
    tracing::info!(
        grpc = %config.grpc_listen,
        admin = %config.admin_listen,
        grpc_tls = grpc_tls.is_some(),
        grpc_mtls = config.grpc_tls.as_ref().is_some_and(|t| t.client_ca_path.is_some()),
        admin_tls = config.admin_tls.is_some(),
        "tollgate serving"
    );

    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        let _ = shutdown_tx.send(true);
    });

    let (grpc, ()) = tokio::join!(grpc, admin);
    sweeper.abort();
    releaser.abort();
    if let Some((task, store, dir)) = persister {
        let _ = task.await;
        // The listeners are closed: this save holds every charge, and comes before the sweep below empties
        // the store.
        match tokio::task::spawn_blocking(move || persist::save(&dir, &store)).await {
            Ok(Ok(())) => tracing::info!("quota counters saved"),
            Ok(Err(error)) => {
                tracing::warn!(%error, "quota counters could not be saved at shutdown")
            }
            Err(error) => tracing::warn!(%error, "quota counter save task failed"),
        }
    }
    // Hands leased quota units back to a shared store so other replicas can use them at once, and reports
    // every served credit (a lease kept at exit would count as spent at the next start).
    authorizer.sweep(i64::MAX).await;
    if let Err(error) = credits.flush(unix_now(), CREDIT_FLUSH).await {
        tracing::warn!(%error, "credit leases not returned at shutdown: they stay spent");
    }
    if let Err(e) = sealer.await {
        tracing::warn!(error = %e, "metering task ended abnormally");
    }
    if let Some(Err(e)) = match deliverer {
        Some(task) => Some(task.await),
        None => None,
    } {
        tracing::warn!(error = %e, "billing task ended abnormally");
    }
    if let Err(e) = state_sync.await {
        tracing::warn!(error = %e, "state sync task ended abnormally");
    }
    store.close().await;
    grpc?;
    match watcher.await {
        Ok(result) => result?,
        Err(e) => tracing::warn!(error = %e, "catalog watcher ended abnormally"),
    }
    Ok(())
}

/// Where catalog changes come from after the first load.
enum Follow {
    /// A file, watched.
    File(std::path::PathBuf),
    /// `catalog.url`, polled from the validators the first catalog came with.
    Remote(Box<Remote>, Validators),
}

impl Follow {
    /// The catalog's name in errors.
    fn name(&self) -> String {
        match self {
            Follow::File(path) => path.display().to_string(),
            Follow::Remote(remote, _) => remote.shown().to_owned(),
        }
    }
}

/// Migrates the state store and reads it in full (retrying while it is down: Checks serve the catalog file
/// meanwhile and `/readyz` says why), starts the paywall's applier and resync on it, then follows its
/// changes until shutdown.
async fn follow_state(
    store: SqlStore,
    syncer: Arc<Syncer>,
    credits: Arc<Credits>,
    interval: Duration,
    paywall: Option<Paywall>,
    shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let ready = match store.migrate().await {
            Ok(()) => match credits.recover().await {
                Ok(()) => syncer.catch_up().await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match ready {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(%error, retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                    "state store not ready");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = signalled(shutdown.clone()) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
    if let Some(paywall) = paywall {
        tokio::spawn(paywall.clone().run_applier(shutdown.clone()));
        tokio::spawn(paywall.run_resync(shutdown.clone()));
    }
    if store.backend() == Backend::Postgres {
        tokio::spawn(state::listen::run(
            store.url().to_owned(),
            syncer.waker(),
            shutdown.clone(),
        ));
    }
    syncer.run(interval, shutdown).await;
}

fn load_tls(
    listener: &'static str,
    files: Option<&tls::TlsFiles>,
    alpn: Alpn,
) -> Result<Option<TlsServer>, ServeError> {
    files
        .map(|files| TlsServer::load(listener, files, alpn))
        .transpose()
        .map_err(|source| ServeError::Tls { listener, source })
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

async fn signalled(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Gives back the token quota reserves whose access-log entry did not come within `quota.hold_timeout`, checked
/// four times per timeout (at least every second, at most every minute).
async fn release_holds(
    quota: Arc<dyn QuotaStore>,
    hold_timeout: Duration,
    shutdown: watch::Receiver<bool>,
) {
    let mut every =
        tokio::time::interval((hold_timeout / 4).clamp(Duration::from_secs(1), SWEEP_EVERY));
    let mut last_warning = 0;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = signalled(shutdown.clone()) => return,
        }
        let now = unix_now();
        match quota.release_expired(now).await {
            Ok(0) => {}
            Ok(released) => tracing::info!(
                released,
                "token quota reserves released: their calls were not settled in time"
            ),
            Err(e) if now - last_warning >= 60 => {
                last_warning = now;
                tracing::warn!(error = %e, "token quota reserves could not be released; retrying");
            }
            Err(_) => {}
        }
    }
}

async fn sweep(authorizer: Arc<Authorizer>, shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => authorizer.sweep(unix_now()).await,
            _ = signalled(shutdown.clone()) => return,
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops tollgate");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
