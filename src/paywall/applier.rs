//! Applies recorded webhook events: reads the subscription from Stripe (at least as new as the event) and
//! folds it into the store; when Stripe cannot be read, the event's own payload stands.

use std::time::Duration;

use tokio::sync::watch;

use crate::billing::{Read, backoff};
use crate::paywall::Paywall;
use crate::paywall::event;
use crate::paywall::model::{Observation, StripeEvent, SubscriptionState};
use crate::state::model::{Write, Written};
use crate::state::store::Actor;
use crate::util::clock::{now_ms, unix_now};

/// Reads of one subscription before the event's payload is used instead.
const FETCH_ATTEMPTS: u32 = 3;
/// How often pending events are looked for (events a replica recorded and did not apply before dying).
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Events younger than this are left to the replica that received them.
const LEFT_TO_RECEIVER_SECS: i64 = 30;

/// What a read of one subscription found.
pub(crate) enum Fetched {
    /// The subscription as it is now, and when the read that returned it was sent (Unix milliseconds).
    Now(SubscriptionState, i64),
    /// Stripe could not be read (or refused): the caller decides what stands.
    Failed(String),
}

impl Paywall {
    /// Applies one recorded event.
    pub async fn apply(&self, event: StripeEvent) {
        let inner = &self.inner;
        let (observation, source) = match self.fetch(event.observation.subscription()).await {
            Fetched::Now(state, as_of) => (Observation::State { state, as_of }, "fetch".to_owned()),
            Fetched::Failed(why) => {
                tracing::warn!(event = %event.id, reason = %why,
                    "subscription not read from Stripe; the event's payload stands until the next read");
                (event.observation.clone(), event.id.clone())
            }
        };
        let write = Write::Observe {
            customer: event.customer.clone(),
            observation,
            source,
            event: Some(event.id.clone()),
        };
        let actor = Actor(format!("stripe:{}", event.id));
        match inner.store.write(&write, &actor, unix_now()).await {
            Ok(written) => {
                inner.metrics.webhooks.with_label_values(&["applied"]).inc();
                if let Written::Paid(Some(now)) = &written {
                    tracing::info!(event = %event.id, subscription = %now.state.id,
                        status = now.state.status.as_str(), "Stripe subscription updated");
                    inner.sync.notify_one();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, event = %event.id, "Stripe event not applied; retried later");
            }
        }
    }

    /// Reads a subscription, retrying transient failures a few times.
    pub(crate) async fn fetch(&self, id: &str) -> Fetched {
        let inner = &self.inner;
        let mut attempt = 0;
        loop {
            attempt += 1;
            // The state read is at least as new as the moment the request left.
            let sent_at = now_ms();
            let read = inner.client.subscription(id).await;
            let result = match &read {
                Read::Ok(_) => "ok",
                Read::NotFound => "not_found",
                Read::Retry { .. } => "retry",
                Read::Refused { .. } => "refused",
            };
            inner.metrics.reads.with_label_values(&[result]).inc();
            match read {
                Read::Ok(body) => {
                    return match event::subscription(&body) {
                        Ok(state) => Fetched::Now(state, sent_at),
                        Err(e) => Fetched::Failed(e.to_string()),
                    };
                }
                Read::NotFound => {
                    return Fetched::Failed(format!("no subscription {id} in Stripe"));
                }
                Read::Refused { status, message } => {
                    return Fetched::Failed(format!("Stripe answered {status}: {message}"));
                }
                Read::Retry {
                    reason,
                    retry_after,
                } => {
                    if attempt >= FETCH_ATTEMPTS {
                        return Fetched::Failed(reason);
                    }
                    let wait = backoff(
                        inner.initial_backoff,
                        inner.max_backoff,
                        attempt,
                        retry_after,
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Applies events left pending (a crash between the answer and the apply), at start and every
    /// [`SWEEP_EVERY`], until `shutdown`.
    pub async fn run_applier(self, mut shutdown: watch::Receiver<bool>) {
        let mut first = true;
        loop {
            let now = unix_now();
            // At start everything pending is ours to apply; later only what its receiver left behind.
            let before = if first {
                now + 1
            } else {
                now - LEFT_TO_RECEIVER_SECS
            };
            first = false;
            match self.inner.store.claim_events(now, before, 100).await {
                Ok(events) => {
                    for event in events {
                        self.apply(event).await;
                        tokio::time::sleep(self.inner.pace).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "pending Stripe events not read"),
            }
            tokio::select! {
                () = tokio::time::sleep(SWEEP_EVERY) => {}
                changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { return },
            }
        }
    }
}
