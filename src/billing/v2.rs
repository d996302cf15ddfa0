//! v2 delivery (`mode: v2_stream`): the high-throughput meter event stream. A session token (15 minutes at
//! Stripe) is refreshed before it expires, batches hold at most 100 events, one batch is in flight at a time,
//! and a 401 `billing_meter_event_session_expired` gets a new session and the same batch again.
//!
//! What a 2xx means here differs from v1: the stream *accepts events for asynchronous processing*. Stripe
//! validates each event later (unknown meter, missing customer, invalid value, duplicate identifier) and
//! reports failures afterwards as v2 events, never in the response. The rows of an accepted batch are
//! therefore acknowledged in the outbox, and recorded in `sent.jsonl`, on acceptance, not on confirmed
//! billing; an event Stripe drops later is not retried by tollgate. `tollgate billing reconcile` (Stripe's
//! `event_summaries` against `sent.jsonl`) is the check that v2 usage was billed.
//!
//! A 4xx other than 401/403/409/429 refuses the whole request, and Stripe's v2 error body (`code`, `message`)
//! does not say which event it objects to, so every row of that batch is dead-lettered with the same reason;
//! `tollgate billing requeue` sends them again once the cause is fixed (identifiers keep resends idempotent).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::client::{Answer, Session};
use super::dead_letter::DeadLetterKind;
use super::shared::{Flow, Shared, sleep_or_shutdown};
use crate::metering::OutboxRow;

/// Stripe's limit of events per stream request.
pub(crate) const MAX_BATCH: usize = 100;

/// Refresh a session when less than this share of its life is left (capped at one minute).
const REFRESH_MARGIN_MAX: Duration = Duration::from_secs(60);

/// Whether `session` should be replaced before use at `now`.
pub(crate) fn needs_refresh(session: &Session, now: chrono::DateTime<chrono::Utc>) -> bool {
    let life = (session.expires_at - session.created)
        .to_std()
        .unwrap_or_default();
    let margin = (life / 4).min(REFRESH_MARGIN_MAX);
    let margin = chrono::Duration::from_std(margin).unwrap_or_default();
    now >= session.expires_at - margin
}

/// The v2 loop: every poll, the pending rows in batches of at most [`MAX_BATCH`].
pub(crate) async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    shared.tidy_attempts().await;
    let mut session: Option<Session> = None;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let rows = shared.pending().await;
        for batch in rows.chunks(MAX_BATCH) {
            if send_batch(&shared, batch, &mut session, &mut shutdown).await == Flow::Stop {
                return;
            }
        }
        if sleep_or_shutdown(shared.config.poll_interval, &mut shutdown).await == Flow::Stop {
            return;
        }
    }
}

/// Sends `batch` until Stripe takes or refuses it, or delivery stops.
async fn send_batch(
    shared: &Arc<Shared>,
    batch: &[OutboxRow],
    session: &mut Option<Session>,
    shutdown: &mut watch::Receiver<bool>,
) -> Flow {
    let mut attempt = 0u32;
    loop {
        if *shutdown.borrow() {
            return Flow::Stop;
        }
        let refused = shared.refuse(batch).await;
        let rows: Vec<OutboxRow> = batch
            .iter()
            .zip(&refused)
            .filter(|(_, r)| !**r)
            .map(|(row, _)| row.clone())
            .collect();
        if rows.is_empty() {
            return Flow::Go;
        }
        if shared.wait_unpaused(shutdown).await == Flow::Stop {
            return Flow::Stop;
        }
        let answer = match session_token(shared, session).await {
            Ok(token) => {
                shared.rate_limit().await;
                shared.mark_started(&rows).await;
                let started = Instant::now();
                let answer = shared.client.stream(&token, &rows).await;
                shared.count(&answer, started.elapsed());
                answer
            }
            Err(answer) => answer,
        };
        match answer {
            Answer::Accepted | Answer::Duplicate => {
                shared.unpause();
                // The stream dedups identifiers silently: a resent row is as delivered as a first one.
                shared.delivered(&rows, false).await;
                return Flow::Go;
            }
            Answer::SessionExpired => {
                tracing::info!("meter event session expired; creating a new one");
                *session = None;
            }
            Answer::Unauthorized { status } => {
                *session = None;
                shared.pause(status);
            }
            Answer::Rejected { status, message } => {
                shared.unpause();
                for row in &rows {
                    shared
                        .dead_letter(row, DeadLetterKind::Rejected, Some(status), message.clone())
                        .await;
                }
                return Flow::Go;
            }
            Answer::Retry {
                reason,
                retry_after,
                ..
            } => {
                attempt += 1;
                shared.metrics.retries.inc();
                let wait = shared.backoff(attempt, retry_after);
                tracing::debug!(%reason, attempt, ?wait, events = rows.len(), "retrying a meter event batch");
                if sleep_or_shutdown(wait, shutdown).await == Flow::Stop {
                    return Flow::Stop;
                }
            }
        }
    }
}

/// A usable session token, creating a session when there is none or it is about to expire.
async fn session_token(
    shared: &Arc<Shared>,
    session: &mut Option<Session>,
) -> Result<String, Answer> {
    if let Some(s) = session
        .as_ref()
        .filter(|s| !needs_refresh(s, chrono::Utc::now()))
    {
        return Ok(s.authentication_token.clone());
    }
    shared.rate_limit().await;
    let started = Instant::now();
    let created = shared.client.create_session().await;
    shared
        .metrics
        .request_seconds
        .observe(started.elapsed().as_secs_f64());
    let fresh = created?;
    shared.metrics.sessions.inc();
    tracing::debug!(expires_at = %fresh.expires_at, "created a meter event session");
    let token = fresh.authentication_token.clone();
    *session = Some(fresh);
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_refresh_before_expiry() {
        let created = chrono::Utc::now();
        let s = Session {
            authentication_token: "t".into(),
            created,
            expires_at: created + chrono::Duration::minutes(15),
        };
        assert!(!needs_refresh(&s, created + chrono::Duration::minutes(13)));
        assert!(needs_refresh(
            &s,
            created + chrono::Duration::seconds(14 * 60 + 1)
        ));
        let short = Session {
            expires_at: created + chrono::Duration::seconds(4),
            ..s
        };
        assert!(!needs_refresh(
            &short,
            created + chrono::Duration::seconds(2)
        ));
        assert!(needs_refresh(
            &short,
            created + chrono::Duration::seconds(3)
        ));
    }
}
