//! v1 delivery: outbox rows in seal order, at most one request in flight per (customer, meter) (Stripe's
//! rule), a global rate limit, exponential backoff with jitter, and the rules shared with the v2 stream:
//! what counts as delivered, what is dead-lettered, and the pause on 401/403.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::BillingError;
use super::attempts::Attempts;
use super::client::{Answer, StripeClient};
use super::config::StripeConfig;
use super::dead_letter::{DeadLetter, DeadLetterKind, DeadLetters};
use super::ledger::{self, SentRow};
use super::metrics::BillingMetrics;
use crate::metering::{Metering, OutboxRow};
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
    pub metering: Metering,
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
        metering: Metering,
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
            metering,
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
        let rows = self.metering.outbox_pending().await;
        self.metrics.pending.set(rows.len() as i64);
        rows.into_iter()
            .filter(|r| !self.dead.contains(&r.id))
            .collect()
    }

    /// Forgets first-attempt times of rows no longer pending.
    pub(crate) async fn tidy_attempts(self: &Arc<Self>) {
        let rows = self.metering.outbox_pending().await;
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
            match self.metering.outbox_ack(&row.id).await {
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

/// The Idempotency-Key of an attempt: deterministic per generation, so after a crash the same key replays a
/// cached success, while a cached 5xx moves on to the next generation. A re-queued row starts a new series:
/// the answer cached for the old one is what dead-lettered it.
pub(crate) fn idempotency_key(id: &str, requeued_at_ms: Option<i64>, generation: u32) -> String {
    match requeued_at_ms {
        Some(at) => format!("{id}-q{at}-k{generation}"),
        None => format!("{id}-k{generation}"),
    }
}

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

type Pair = (String, String);

/// The v1 loop: every poll, one worker per (customer, meter) with pending rows and none running.
pub(crate) async fn run_v1(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    shared.tidy_attempts().await;
    let mut workers: JoinSet<()> = JoinSet::new();
    let mut busy: HashMap<tokio::task::Id, Pair> = HashMap::new();
    loop {
        while let Some(done) = workers.try_join_next_with_id() {
            let id = match done {
                Ok((id, ())) => id,
                Err(e) => {
                    tracing::error!(error = %e, "a billing delivery worker failed");
                    e.id()
                }
            };
            busy.remove(&id);
        }
        if *shutdown.borrow() {
            break;
        }
        let mut groups: Vec<(Pair, Vec<OutboxRow>)> = Vec::new();
        let mut index: HashMap<Pair, usize> = HashMap::new();
        for row in shared.pending().await {
            let pair = (row.stripe_customer.clone(), row.event_name.clone());
            let i = *index.entry(pair.clone()).or_insert_with(|| {
                groups.push((pair, Vec::new()));
                groups.len() - 1
            });
            groups[i].1.push(row); // invariant: i indexes groups
        }
        let running: HashSet<&Pair> = busy.values().collect();
        let start: Vec<(Pair, Vec<OutboxRow>)> = groups
            .into_iter()
            .filter(|(pair, _)| !running.contains(pair))
            .collect();
        for (pair, rows) in start {
            let handle = workers.spawn(deliver_pair(shared.clone(), rows, shutdown.clone()));
            busy.insert(handle.id(), pair);
        }
        tokio::select! {
            _ = tokio::time::sleep(shared.config.poll_interval) => {}
            changed = shutdown.changed() => if changed.is_err() { break },
            Some(done) = workers.join_next_with_id(), if !workers.is_empty() => {
                let id = match done { Ok((id, ())) => id, Err(e) => e.id() };
                busy.remove(&id);
            }
        }
    }
    // Stopping mid-request is safe: the row stays pending and its identifier makes the resend harmless.
    workers.shutdown().await;
}

/// Sends one (customer, meter)'s rows in order, one at a time.
async fn deliver_pair(
    shared: Arc<Shared>,
    rows: Vec<OutboxRow>,
    mut shutdown: watch::Receiver<bool>,
) {
    for row in rows {
        if deliver_row(&shared, &row, &mut shutdown).await == Flow::Stop {
            return;
        }
    }
}

/// Sends `row` until Stripe confirms or refuses it, or delivery stops.
async fn deliver_row(
    shared: &Arc<Shared>,
    row: &OutboxRow,
    shutdown: &mut watch::Receiver<bool>,
) -> Flow {
    let mut attempt = 0u32;
    let mut key_generation = 0u32;
    loop {
        if *shutdown.borrow() {
            return Flow::Stop;
        }
        if shared.refuse(std::slice::from_ref(row)).await[0] {
            return Flow::Go;
        }
        if shared.wait_unpaused(shutdown).await == Flow::Stop {
            return Flow::Stop;
        }
        shared.rate_limit().await;
        shared.mark_started(std::slice::from_ref(row)).await;
        let key = idempotency_key(&row.id, shared.dead.requeued_at(&row.id), key_generation);
        let started = Instant::now();
        let answer = shared.client.send_meter_event(row, &key).await;
        shared.count(&answer, started.elapsed());
        match answer {
            Answer::Accepted | Answer::Duplicate => {
                shared.unpause();
                shared
                    .delivered(std::slice::from_ref(row), answer == Answer::Duplicate)
                    .await;
                return Flow::Go;
            }
            Answer::Rejected { status, message } => {
                shared.unpause();
                shared
                    .dead_letter(row, DeadLetterKind::Rejected, Some(status), message)
                    .await;
                return Flow::Go;
            }
            Answer::Unauthorized { status } => shared.pause(status),
            Answer::Retry {
                reason,
                retry_after,
                new_key,
            } => {
                if new_key {
                    key_generation += 1;
                }
                attempt += 1;
                shared.metrics.retries.inc();
                let wait = shared.backoff(attempt, retry_after);
                tracing::debug!(id = %row.id, %reason, attempt, ?wait, "retrying a meter event");
                if sleep_or_shutdown(wait, shutdown).await == Flow::Stop {
                    return Flow::Stop;
                }
            }
            Answer::SessionExpired => {
                attempt += 1;
                if sleep_or_shutdown(shared.backoff(attempt, None), shutdown).await == Flow::Stop {
                    return Flow::Stop;
                }
            }
        }
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

    #[test]
    fn rows_past_stripes_horizon_or_unconfirmed_too_long_are_refused() {
        const DAY: i64 = 86_400_000;
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
    use super::*;

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
}
