//! PostgreSQL `LISTEN`: wakes the sync loop as soon as any replica commits a change.
//!
//! Only a shortcut: the sync loop polls every `sync_interval` anyway and reads from its cursor, so a
//! notification lost while the connection was down costs latency, never a change.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::{Notify, watch};

use crate::state::sql::CHANNEL;

/// First pause after a lost listener.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest pause between two attempts to reconnect the listener.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Listens on the state channel of the database at `url`, waking `wake` on every notification and after
/// every reconnect, until `shutdown` turns true.
pub async fn run(url: String, wake: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        tokio::select! {
            Err(error) = session(&url, &wake, &mut backoff) => {
                tracing::debug!(%error, "state listener lost; polling until it is back");
            }
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One listening connection: wakes `wake` at start (changes may have come while it was down) and on every
/// notification, and resets `backoff` once it listens; returns only with the error that ended it.
async fn session(
    url: &str,
    wake: &Notify,
    backoff: &mut Duration,
) -> Result<std::convert::Infallible, sqlx::Error> {
    let mut listener = PgListener::connect(url).await?;
    listener.listen(CHANNEL).await?;
    tracing::debug!("listening for state changes");
    *backoff = FIRST_BACKOFF;
    wake.notify_one();
    loop {
        // `None`: the connection dropped and was re-established; changes may have been missed.
        if listener.try_recv().await?.is_none() {
            tracing::debug!("state listener reconnected");
        }
        wake.notify_one();
    }
}
