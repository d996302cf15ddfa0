//! Whether metering can take usage right now: what `/readyz` asks before sending Envoy's traffic here.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// How long a failed spool commit keeps a replica unready when no commit has succeeded since: long enough
/// to take it out of rotation, short enough that it comes back without traffic to prove it.
const COMMIT_FAILURE_MS: i64 = 10_000;

/// Why metering cannot take usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unhealthy {
    /// A spool write failed and could not be undone: every record is refused until restart.
    #[error(
        "metering spool is poisoned by a failed write: usage records are refused until restart"
    )]
    SpoolPoisoned,
    /// An outbox write or compaction failed and could not be undone: sealing and billing stop until restart.
    #[error("billing outbox is poisoned by a failed write: sealing and billing stop until restart")]
    OutboxPoisoned,
    /// The last spool commit failed, recently, and none succeeded since.
    #[error("metering spool commits are failing: usage records are refused")]
    CommitsFailing,
}

/// What the writer thread reports of the spool, read by `/readyz`.
#[derive(Debug, Default)]
pub(crate) struct Health {
    spool_poisoned: AtomicBool,
    last_failure_ms: AtomicI64,
    last_success_ms: AtomicI64,
}

impl Health {
    /// Records one commit's outcome at `now_ms`.
    pub(crate) fn commit(&self, ok: bool, spool_poisoned: bool, now_ms: i64) {
        let at = if ok {
            &self.last_success_ms
        } else {
            &self.last_failure_ms
        };
        at.store(now_ms, Ordering::Relaxed);
        self.spool_poisoned.store(spool_poisoned, Ordering::Relaxed);
    }

    /// The spool's state at `now_ms`; the outbox is asked by the caller, which holds it.
    pub(crate) fn spool(&self, now_ms: i64) -> Result<(), Unhealthy> {
        if self.spool_poisoned.load(Ordering::Relaxed) {
            return Err(Unhealthy::SpoolPoisoned);
        }
        let failed = self.last_failure_ms.load(Ordering::Relaxed);
        let succeeded = self.last_success_ms.load(Ordering::Relaxed);
        if failed > succeeded && now_ms.saturating_sub(failed) < COMMIT_FAILURE_MS {
            return Err(Unhealthy::CommitsFailing);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_counts_until_a_success_or_for_a_while() {
        let h = Health::default();
        assert_eq!(h.spool(1_000), Ok(()));
        h.commit(false, false, 1_000);
        assert_eq!(h.spool(1_500), Err(Unhealthy::CommitsFailing));
        assert_eq!(h.spool(1_000 + COMMIT_FAILURE_MS), Ok(()));
        h.commit(true, false, 2_000);
        assert_eq!(h.spool(2_001), Ok(()));
        h.commit(false, true, 3_000);
        assert_eq!(
            h.spool(3_000 + COMMIT_FAILURE_MS * 9),
            Err(Unhealthy::SpoolPoisoned)
        );
    }
}
