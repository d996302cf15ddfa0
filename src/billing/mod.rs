//! Billing: sealed metering windows become Stripe meter events, delivered exactly once.
//!
//! ```text
//! metering outbox (durable rows) ──> delivery (v1: one in flight per (customer, meter), or the v2 stream)
//!        ^                              │ rate limit · backoff + jitter · Stripe-Should-Retry · Retry-After
//!        └── outbox_ack <── sent ledger ┘ dead letters (4xx, too old, unconfirmed ~20 h) · pause on 401/403
//! ```
//!
//! Exactly once rests on Stripe's identifier dedup: every row is sent with its deterministic outbox id as
//! `identifier`, and "An event already exists with identifier" counts as delivered; a row is acknowledged in
//! the outbox only after Stripe confirmed it, so a crash at any point resends at most what Stripe then refuses
//! as a duplicate. Rows unconfirmed for `give_up_after` (20 h) stop, since Stripe remembers identifiers for 24 h.
//!
//! State of its own lives in `<metering dir>/billing/` ([`state_dir`]): `sent.jsonl` (the [`ledger`] that
//! reconciliation reads), `dead_letters.jsonl` ([`dead_letter`]) and `attempts.jsonl` (first attempt times).
//!
//! Billing holds no `Metering`: it reads and acknowledges rows through [`UsageOutbox`], which metering
//! implements. Layout: `shared` (delivery state and the rules v1 and v2 share: delivered, dead letter, pause,
//! rate limit, backoff), `v1` (meter events, one in flight per pair), `v2` (the stream), [`client`]
//! (Stripe HTTP), [`ledger`], [`dead_letter`], `attempts` and `jsonl` (state files), [`reconcile`](mod@reconcile),
//! [`config`], `metrics`.
//!
//! Wiring API:
//! - config: `billing:` deserializes into [`BillingConfig`] (`billing.stripe` = [`StripeConfig`]); call
//!   [`StripeConfig::validate`] after `${VAR}` expansion.
//! - serve: `let billing = Billing::open(&cfg.stripe, metering.clone(), &registry)?;` then spawn
//!   `billing.run(shutdown_rx)` (returns when the watch turns true; stopping mid-request is safe).
//! - admin `GET /v1/billing/dead-letters`: [`Billing::dead_letters`] (or [`dead_letters`] with the metering dir).
//! - `tollgate billing requeue [ID…|--all]`: [`requeue`]`(metering_dir, &Requeue::Ids(..) | &Requeue::All)`;
//!   safe while the server runs (it notices within one poll interval).
//! - `tollgate billing reconcile --since … --until …`: [`reconcile()`]`(&stripe_config, metering_dir, since,
//!   until).await` -> [`ReconcileReport`]: `Display` is the table; exit non-zero when
//!   `!report.mismatches().is_empty()`.

mod attempts;
pub mod client;
pub mod config;
pub mod dead_letter;
mod jsonl;
pub mod ledger;
mod metrics;
pub mod reconcile;
mod shared;
mod v1;
mod v2;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

use crate::metering::UsageOutbox;

pub(crate) use shared::backoff;

pub use client::{Answer, Read, StripeClient};
pub use config::{BillingConfig, StripeConfig, StripeMode};
pub use dead_letter::{DeadLetter, DeadLetterKind, DeadLetters, Requeue, RequeueOutcome};
pub use reconcile::{ReconcileReport, ReconcileRow, reconcile};

/// Why billing failed.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// A billing state file could not be read or written.
    #[error("billing state {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A billing state line could not be encoded.
    #[error("billing state {path}: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        message: String,
    },
    /// The HTTP client failed (no secret is part of the message).
    #[error("Stripe request failed: {0}")]
    Http(String),
    /// Stripe answered with an error.
    #[error("Stripe answered {status}: {message}")]
    Stripe {
        /// HTTP status.
        status: u16,
        /// Stripe's message.
        message: String,
    },
    /// The config is not usable.
    #[error("{0}")]
    Config(String),
    /// Metrics could not be registered.
    #[error("billing metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Billing's own folder inside the metering folder.
pub fn state_dir(metering_dir: &Path) -> PathBuf {
    metering_dir.join("billing")
}

/// Current dead letters of the metering folder `metering_dir` (for the admin endpoint or a command).
pub fn dead_letters(metering_dir: &Path) -> Result<Vec<DeadLetter>, BillingError> {
    DeadLetters::open(&state_dir(metering_dir))?.list()
}

/// Re-queues dead letters of `metering_dir`; a running server sends them again on its next pass.
pub fn requeue(metering_dir: &Path, which: &Requeue) -> Result<RequeueOutcome, BillingError> {
    DeadLetters::open(&state_dir(metering_dir))?.requeue(which)
}

/// Delivery of the metering outbox to Stripe; cheap to clone.
#[derive(Clone)]
pub struct Billing {
    shared: Arc<shared::Shared>,
}

impl Billing {
    /// Validates `config`, opens the state in `<metering dir>/billing/` and registers the metrics; sends
    /// nothing until [`Billing::run`]. `outbox` is usually the [`Metering`](crate::metering::Metering).
    pub fn open(
        config: &StripeConfig,
        outbox: impl UsageOutbox + 'static,
        registry: &prometheus::Registry,
    ) -> Result<Billing, BillingError> {
        config.validate().map_err(BillingError::Config)?;
        let dir = state_dir(outbox.dir());
        std::fs::create_dir_all(&dir).map_err(|source| BillingError::Io {
            path: dir.clone(),
            source,
        })?;
        ledger::compact(&dir, crate::util::clock::now_ms())?;
        let shared = shared::Shared::new(config.clone(), Arc::new(outbox), dir, registry)?;
        Ok(Billing {
            shared: Arc::new(shared),
        })
    }

    /// Delivers outbox rows until `shutdown` turns true (v1 or the v2 stream, per `mode`).
    pub async fn run(&self, shutdown: watch::Receiver<bool>) {
        tracing::info!(
            mode = ?self.shared.config.mode,
            api_base = %self.shared.config.api_base,
            rate_limit = self.shared.config.rate_limit.get(),
            "billing delivery to Stripe started"
        );
        match self.shared.config.mode {
            StripeMode::V1 => v1::run(self.shared.clone(), shutdown).await,
            StripeMode::V2Stream => v2::run(self.shared.clone(), shutdown).await,
        }
    }

    /// Current dead letters.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, BillingError> {
        self.shared.dead.list()
    }

    /// Re-queues dead letters; their rows are sent again on the next pass.
    pub fn requeue(&self, which: &Requeue) -> Result<RequeueOutcome, BillingError> {
        self.shared.dead.requeue(which)
    }

    /// Whether delivery is paused because Stripe refused the API key.
    pub fn is_paused(&self) -> bool {
        self.shared.is_paused()
    }
}
