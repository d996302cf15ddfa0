//! v1 delivery: outbox rows in seal order, at most one request in flight per (customer, meter) (Stripe's
//! rule), each row its own meter event with an Idempotency-Key, retried per the rules in [`super::shared`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::client::Answer;
use super::dead_letter::DeadLetterKind;
use super::shared::{Flow, Shared, sleep_or_shutdown};
use crate::metering::OutboxRow;

type Pair = (String, String);

/// The v1 loop: every poll, one worker per (customer, meter) with pending rows and none running.
pub(crate) async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
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

/// The Idempotency-Key of an attempt: deterministic per generation, so after a crash the same key replays a
/// cached success, while a cached 5xx moves on to the next generation. A re-queued row starts a new series:
/// the answer cached for the old one is what dead-lettered it.
pub(crate) fn idempotency_key(id: &str, requeued_at_ms: Option<i64>, generation: u32) -> String {
    match requeued_at_ms {
        Some(at) => format!("{id}-q{at}-k{generation}"),
        None => format!("{id}-k{generation}"),
    }
}
