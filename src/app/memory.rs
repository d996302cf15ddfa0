//! Gives the memory a replaced catalog freed back to the system soon after a reload.
//!
//! tollgate runs on jemalloc (src/main.rs), whose background threads return freed pages to the system only
//! after `dirty_decay_ms` (10 s) and gradually. A reload frees a whole catalog at once (its parse tree, its
//! indexes: ~100 MB at 100,000 keys), and with a reload every few seconds RSS settled 10-15 % above what the
//! process holds (issue 20: 155 MB after 11 reloads of a 100k-key catalog, goal 150 MB). So once a second,
//! if the catalog was replaced since the last pass, every arena's unused dirty pages are purged at once
//! (`arena.<MALLCTL_ARENAS_ALL>.purge`). The purge runs on a blocking thread: it is `madvise` calls, some
//! milliseconds, never on a request's path. The steady state (no reloads) keeps jemalloc's decay, which
//! keeps recently freed pages for reuse.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::catalog::CatalogHandle;

/// How often the releaser looks at the catalog's replacement count.
const TICK: Duration = Duration::from_secs(1);

/// Purges every jemalloc arena's unused dirty pages; false if jemalloc refused (then decay still returns
/// them, later).
pub fn purge() -> bool {
    // MALLCTL_ARENAS_ALL (4096): every arena.
    let name = c"arena.4096.purge";
    // SAFETY: `arena.<i>.purge` is a void mallctl (jemalloc's manual, MALLCTL NAMESPACE): it reads and writes
    // no value, so null old/new pointers with zero length are its documented call.
    let code = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    code == 0
}

/// Purges after each catalog replacement (at most once a [`TICK`]) until `shutdown` changes.
pub async fn release_after_reloads(
    handle: Arc<CatalogHandle>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut purged_at = handle.replacements();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = handle.replacements();
        if now == purged_at {
            continue;
        }
        purged_at = now;
        match tokio::task::spawn_blocking(purge).await {
            Ok(true) => tracing::debug!(replacements = now, "freed catalog memory returned"),
            Ok(false) => tracing::debug!("jemalloc refused arena purge"),
            Err(e) => tracing::warn!(error = %e, "memory purge task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jemalloc_accepts_the_purge() {
        assert!(purge());
    }
}
