//! What v1 and the v2 stream share: delivery's state ([`Shared`]), what counts as delivered (ledger first,
//! then the outbox acknowledgement), what is dead-lettered (too old for Stripe, unconfirmed too long,
//! refused), the pause on 401/403, the global rate limit, backoff with jitter, and stopping on shutdown.
//!
//! Delivery reads and acknowledges rows through [`UsageOutbox`] only, so these rules are tested here with a
//! double of it instead of a spool.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use tokio::sync::watch;

use super::BillingError;
use super::attempts::Attempts;
use super::client::{Answer, StripeClient};
use super::config::StripeConfig;
use super::dead_letter::{DeadLetter, DeadLetterKind, DeadLetters};
use super::ledger::{self, SentRow};
use super::metrics::BillingMetrics;
use crate::metering::{OutboxRow, UsageOutbox};
use crate::util::clock::now_ms;
use crate::util::sync::lock;

/// Stripe takes timestamps up to 35 days back; an hour of margin keeps a row from ageing out mid-retry.
pub(crate) const MAX_AGE_MS: i64 = 35 * 24 * 3_600_000 - 3_600_000;

/// Whether delivery should go on or stop (shutdown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    Go,
    Stop,
}

/// Delivery's state, shared by the v1 workers and the v2 loop.
pub(crate) struct Shared {
    pub config: StripeConfig,
    pub client: StripeClient,
    /// Where the rows come from and are acknowledged.
    pub outbox: Arc<dyn UsageOutbox>,
    pub dir: PathBuf,
    pub dead: DeadLetters,
    attempts: Mutex<Attempts>,
    limiter: DefaultDirectRateLimiter,
    pub metrics: BillingMetrics,
    /// `Some(until)` while paused after a 401/403; once `until` passes, one caller probes and re-arms it.
    paused: Mutex<Option<Instant>>,
}

impl Shared {
    pub(crate) fn new(
        config: StripeConfig,
        outbox: Arc<dyn UsageOutbox>,
        dir: PathBuf,
        registry: &prometheus::Registry,
    ) -> Result<Shared, BillingError> {
        let client = StripeClient::new(&config)?;
        let dead = DeadLetters::open(&dir)?;
        let attempts = Attempts::open(&dir)?;
        let metrics = BillingMetrics::register(registry)?;
        metrics.dead_letters.set(dead.count() as i64);
        // Burst of 1: writes are spread evenly, never bunched at the start of a second.
        let quota = Quota::per_second(config.rate_limit).allow_burst(NonZeroU32::MIN);
        Ok(Shared {
            client,
            outbox,
            dir,
            dead,
            attempts: Mutex::new(attempts),
            limiter: RateLimiter::direct(quota),
            metrics,
            paused: Mutex::new(None),
            config,
        })
    }

    /// Waits for a slot of the global rate limit.
    pub(crate) async fn rate_limit(&self) {
        self.limiter.until_ready().await;
    }

    /// Re-reads dead letters re-queued by another process and the rows waiting, minus dead letters.
    pub(crate) async fn pending(&self) -> Vec<OutboxRow> {
        if let Err(e) = self.dead.refresh() {
            tracing::error!(error = %e, "cannot read billing dead letters; retrying next pass");
        }
        self.metrics.dead_letters.set(self.dead.count() as i64);
        let rows = self.outbox.pending().await;
        self.metrics.pending.set(rows.len() as i64);
        rows.into_iter()
            .filter(|r| !self.dead.contains(&r.id))
            .collect()
    }

    /// Forgets first-attempt times of rows no longer pending.
    pub(crate) async fn tidy_attempts(self: &Arc<Self>) {
        let rows = self.outbox.pending().await;
        let me = self.clone();
        let done = tokio::task::spawn_blocking(move || {
            let ids: HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
            lock(&me.attempts).retain(&ids)
        })
        .await;
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "cannot compact billing attempts");
        }
    }

    /// Dead-letters the rows that must not be sent (too old for Stripe, or unconfirmed for too long); the
    /// answer says, per row, whether it was refused.
    pub(crate) async fn refuse(self: &Arc<Self>, rows: &[OutboxRow]) -> Vec<bool> {
        let now = now_ms();
        let give_up = i64::try_from(self.config.give_up_after.as_millis()).unwrap_or(i64::MAX);
        let mut refused = Vec::with_capacity(rows.len());
        for row in rows {
            let started = lock(&self.attempts)
                .first(&row.id)
                .map(|first| first.max(self.dead.requeued_at(&row.id).unwrap_or(0)));
            let verdict = match refusal(row.window_start_ms, started, now, give_up) {
                Some(DeadLetterKind::TooOld) => Some((
                    DeadLetterKind::TooOld,
                    "the window started more than 35 days ago; Stripe refuses such timestamps, so it was never sent"
                        .to_owned(),
                )),
                Some(kind) => Some((
                    kind,
                    format!(
                        "no confirmation from Stripe within {} of the first attempt; blind retries stop because \
                         Stripe's identifier dedup lasts 24h: check `tollgate billing reconcile` before re-queueing",
                        humantime::format_duration(self.config.give_up_after)
                    ),
                )),
                None => None,
            };
            match verdict {
                Some((kind, reason)) => {
                    self.dead_letter(row, kind, None, reason).await;
                    refused.push(true);
                }
                None => refused.push(false),
            }
        }
        refused
    }

    /// Records now as the first attempt of the rows that have none (durably, before they are sent).
    pub(crate) async fn mark_started(self: &Arc<Self>, rows: &[OutboxRow]) {
        let ids: Vec<String> = rows.iter().map(|row| row.id.clone()).collect();
        let me = self.clone();
        let recorded = tokio::task::spawn_blocking(move || {
            lock(&me.attempts).record(ids.iter().map(String::as_str), now_ms())
        })
        .await;
        if let Ok(Err(e)) = recorded {
            tracing::error!(error = %e, "cannot record billing first attempts; the 20h rule may restart");
        }
    }

    /// Stripe confirmed `rows`: the ledger first, then the outbox acknowledgement.
    pub(crate) async fn delivered(self: &Arc<Self>, rows: &[OutboxRow], duplicate: bool) {
        let now = now_ms();
        let lines: Vec<SentRow> = rows
            .iter()
            .map(|r| SentRow::new(r, now, duplicate))
            .collect();
        let dir = self.dir.clone();
        match tokio::task::spawn_blocking(move || ledger::record(&dir, &lines)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot write the billing ledger; the rows will be confirmed again");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "billing ledger task failed");
                return;
            }
        }
        let outcome = if duplicate { "duplicate" } else { "delivered" };
        for row in rows {
            match self.outbox.ack(&row.id).await {
                Ok(_) => {
                    self.metrics.events.with_label_values(&[outcome]).inc();
                    tracing::debug!(id = %row.id, customer = %row.stripe_customer, meter = %row.event_name,
                        value = row.value, duplicate, "meter event confirmed by Stripe");
                }
                Err(e) => tracing::error!(id = %row.id, error = %e,
                    "cannot acknowledge a delivered outbox row; it will be sent again and refused as a duplicate"),
            }
        }
    }

    /// Gives up on `row` durably and says why.
    pub(crate) async fn dead_letter(
        self: &Arc<Self>,
        row: &OutboxRow,
        kind: DeadLetterKind,
        status: Option<u16>,
        reason: String,
    ) {
        tracing::error!(id = %row.id, customer = %row.stripe_customer, meter = %row.event_name, value = row.value,
            ?kind, status, reason = %reason,
            "billing dead-lettered a meter event; see GET /v1/billing/dead-letters, re-queue with `tollgate billing requeue`");
        let label = match kind {
            DeadLetterKind::Rejected => "rejected",
            DeadLetterKind::TooOld => "too_old",
            DeadLetterKind::Unconfirmed => "unconfirmed",
        };
        self.metrics.events.with_label_values(&[label]).inc();
        let letter = DeadLetter::new(row, kind, status, reason);
        let me = self.clone();
        match tokio::task::spawn_blocking(move || me.dead.add(letter)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot write the dead letter; the row stays pending")
            }
            Err(e) => tracing::error!(error = %e, "dead letter task failed"),
        }
        self.metrics.dead_letters.set(self.dead.count() as i64);
    }

    /// Counts an answer in the metrics.
    pub(crate) fn count(&self, answer: &Answer, elapsed: Duration) {
        self.metrics.request_seconds.observe(elapsed.as_secs_f64());
        let label = match answer {
            Answer::Accepted => "accepted",
            Answer::Duplicate => "duplicate",
            Answer::Retry { reason, .. } => match reason.as_str() {
                "rate_limited" | "server_error" | "timeout" | "transport_error" => reason.as_str(),
                _ => "retry_other",
            },
            Answer::Unauthorized { .. } => "unauthorized",
            Answer::SessionExpired => "session_expired",
            Answer::Rejected { .. } => "rejected",
        };
        self.metrics.answers.with_label_values(&[label]).inc();
    }

    /// Pauses every request for `max_backoff` after a 401/403, loudly.
    pub(crate) fn pause(&self, status: u16) {
        *lock(&self.paused) = Some(Instant::now() + self.config.max_backoff);
        self.metrics.paused.set(1);
        tracing::error!(
            status,
            retry_in = ?self.config.max_backoff,
            "BILLING PAUSED: Stripe refused the API key ({status}); usage keeps being metered and spooled, \
             nothing is sent until billing.stripe.api_key is fixed (probing again periodically)"
        );
    }

    /// Lifts a pause after Stripe accepted a request.
    pub(crate) fn unpause(&self) {
        let mut paused = lock(&self.paused);
        if paused.take().is_some() {
            self.metrics.paused.set(0);
            tracing::warn!("billing resumed: Stripe accepts the API key again");
        }
    }

    /// Whether a 401/403 pause is in force.
    pub(crate) fn is_paused(&self) -> bool {
        lock(&self.paused).is_some()
    }

    /// Waits out a pause; when it ends, this caller becomes the one probe (the pause is re-armed for others).
    pub(crate) async fn wait_unpaused(&self, shutdown: &mut watch::Receiver<bool>) -> Flow {
        loop {
            let until = {
                let mut paused = lock(&self.paused);
                match *paused {
                    None => return Flow::Go,
                    Some(until) if until <= Instant::now() => {
                        *paused = Some(Instant::now() + self.config.max_backoff);
                        return Flow::Go;
                    }
                    Some(until) => until,
                }
            };
            if sleep_or_shutdown(until.saturating_duration_since(Instant::now()), shutdown).await
                == Flow::Stop
            {
                return Flow::Stop;
            }
        }
    }

    /// The wait before retry number `attempt` (1-based): exponential, capped, with jitter, at least what
    /// `Retry-After` asked for.
    pub(crate) fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        backoff(
            self.config.initial_backoff,
            self.config.max_backoff,
            attempt,
            retry_after,
        )
    }
}

/// Exponential backoff with "equal jitter": a random point in the upper half of the capped step.
pub(crate) fn backoff(
    initial: Duration,
    max: Duration,
    attempt: u32,
    retry_after: Option<Duration>,
) -> Duration {
    let step = initial
        .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(30)))
        .min(max);
    let half = step / 2;
    let jitter = rand::rng().random_range(0.0..=1.0);
    let wait = half + half.mul_f64(jitter);
    wait.max(retry_after.unwrap_or_default())
}

/// Sleeps `d` unless delivery is told to stop first.
pub(crate) async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> Flow {
    if *shutdown.borrow() {
        return Flow::Stop;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => Flow::Go,
        changed = shutdown.changed() => match changed {
            Ok(()) if !*shutdown.borrow() => Flow::Go,
            _ => Flow::Stop,
        },
    }
}

/// Why a row must not be sent (again): its window is too old for Stripe's timestamp horizon, or it has gone
/// unconfirmed for `give_up_ms` since its first attempt (`started`, Unix ms); `None` means send it.
fn refusal(
    window_start_ms: i64,
    started: Option<i64>,
    now: i64,
    give_up_ms: i64,
) -> Option<DeadLetterKind> {
    if window_start_ms < now.saturating_sub(MAX_AGE_MS) {
        Some(DeadLetterKind::TooOld)
    } else if started.is_some_and(|s| now.saturating_sub(s) >= give_up_ms) {
        Some(DeadLetterKind::Unconfirmed)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::metering::{AckOutcome, MeteringError};

    const DAY: i64 = 86_400_000;

    #[test]
    fn rows_past_stripes_horizon_or_unconfirmed_too_long_are_refused() {
        let now = 100 * DAY;
        let give_up = 20 * 3_600_000;
        // Stripe accepts timestamps up to 35 days back; the hour of margin refuses just before that.
        assert_eq!(
            refusal(now - 36 * DAY, None, now, give_up),
            Some(DeadLetterKind::TooOld)
        );
        assert_eq!(
            refusal(now - 35 * DAY + 1, None, now, give_up),
            Some(DeadLetterKind::TooOld)
        );
        assert_eq!(refusal(now - 34 * DAY, None, now, give_up), None);
        assert_eq!(
            refusal(now - DAY, Some(now - give_up), now, give_up),
            Some(DeadLetterKind::Unconfirmed)
        );
        assert_eq!(
            refusal(now - DAY, Some(now - give_up + 1), now, give_up),
            None
        );
        assert_eq!(refusal(now - DAY, None, now, give_up), None);
    }
    #[test]
    fn backoff_grows_caps_jitters_and_honours_retry_after() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..50 {
            let first = backoff(i, m, 1, None);
            assert!(
                first >= Duration::from_millis(50) && first <= i,
                "{first:?}"
            );
            let fourth = backoff(i, m, 4, None);
            assert!(fourth >= Duration::from_millis(400) && fourth <= Duration::from_millis(800));
            let late = backoff(i, m, 40, None);
            assert!(late >= Duration::from_secs(1) && late <= m, "{late:?}");
            let asked = backoff(i, m, 1, Some(Duration::from_secs(7)));
            assert_eq!(asked, Duration::from_secs(7));
        }
    }

    /// Metering's outbox as delivery sees it, in memory: the delivery rules without a spool.
    struct MemoryOutbox {
        dir: PathBuf,
        rows: Vec<OutboxRow>,
        acked: Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl UsageOutbox for MemoryOutbox {
        async fn pending(&self) -> Vec<OutboxRow> {
            let acked = lock(&self.acked);
            self.rows
                .iter()
                .filter(|r| !acked.contains(&r.id))
                .cloned()
                .collect()
        }

        async fn ack(&self, id: &str) -> Result<AckOutcome, MeteringError> {
            let mut acked = lock(&self.acked);
            Ok(if acked.iter().any(|a| a == id) {
                AckOutcome::AlreadyAcked
            } else {
                acked.push(id.to_owned());
                AckOutcome::Acked
            })
        }

        fn dir(&self) -> &Path {
            &self.dir
        }
    }

    fn row(id: &str, window_start_ms: i64) -> OutboxRow {
        OutboxRow {
            id: id.into(),
            producer: "test".into(),
            window_start_ms,
            window_end_ms: window_start_ms + 60_000,
            revision: 0,
            stripe_customer: "cus_A".into(),
            event_name: "api_calls".into(),
            value: 3,
            sealed_at_ms: window_start_ms + 61_000,
        }
    }

    fn shared(rows: Vec<OutboxRow>) -> (tempfile::TempDir, Arc<MemoryOutbox>, Arc<Shared>) {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Arc::new(MemoryOutbox {
            dir: dir.path().to_owned(),
            rows,
            acked: Mutex::new(Vec::new()),
        });
        let config = StripeConfig::new("http://127.0.0.1:9", "sk_test_x");
        let registry = prometheus::Registry::new();
        let shared = Shared::new(
            config,
            outbox.clone(),
            dir.path().join("billing"),
            &registry,
        );
        (dir, outbox, Arc::new(shared.unwrap()))
    }

    #[tokio::test]
    async fn confirmed_rows_are_in_the_ledger_before_they_are_acknowledged() {
        let now = now_ms();
        let (_dir, outbox, shared) = shared(vec![row("r1", now - DAY), row("r2", now - DAY)]);
        let rows = shared.pending().await;
        assert_eq!(rows.len(), 2);
        shared.delivered(&rows, true).await;
        assert_eq!(*lock(&outbox.acked), ["r1", "r2"]);
        let ledger = ledger::read(&shared.dir).unwrap();
        assert_eq!(
            ledger.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["r1", "r2"]
        );
        assert!(ledger.iter().all(|r| r.duplicate && r.value == 3));
        assert!(shared.pending().await.is_empty());
    }

    #[tokio::test]
    async fn rows_too_old_for_stripe_are_dead_lettered_and_no_longer_pending() {
        let now = now_ms();
        let (_dir, outbox, shared) =
            shared(vec![row("fresh", now - DAY), row("old", now - 36 * DAY)]);
        let rows = shared.pending().await;
        assert_eq!(shared.refuse(&rows).await, [false, true]);
        let letters = shared.dead.list().unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(
            (letters[0].id.as_str(), letters[0].kind),
            ("old", DeadLetterKind::TooOld)
        );
        let pending: Vec<String> = shared.pending().await.into_iter().map(|r| r.id).collect();
        assert_eq!(pending, ["fresh"]);
        assert!(
            lock(&outbox.acked).is_empty(),
            "a dead letter is not acknowledged"
        );
    }
}
