//! Returns memory a large drop freed to the system at once, instead of over jemalloc's decay.
//!
//! tollgate runs on jemalloc (src/main.rs), whose background threads return freed pages to the system only
//! after `dirty_decay_ms` (10 s) and gradually. Where tollgate frees a whole data set at once (a replaced
//! catalog, the state store's decoded rows after a full read: 170 MB at a million keys), it purges every
//! arena's unused dirty pages (`arena.<MALLCTL_ARENAS_ALL>.purge`) so RSS shows what the process holds.
//! The steady state keeps jemalloc's decay, which keeps recently freed pages for reuse.

/// Purges every jemalloc arena's unused dirty pages; false if jemalloc refused (then decay still returns
/// them, later). Some milliseconds of `madvise` calls: call it off the async workers ([`release`]).
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

/// [`purge`] on a blocking thread; `what` names the freed data in the debug line.
pub async fn release(what: &'static str) {
    match tokio::task::spawn_blocking(purge).await {
        Ok(true) => tracing::debug!(what, "freed memory returned"),
        Ok(false) => tracing::debug!(what, "jemalloc refused arena purge"),
        Err(e) => tracing::warn!(error = %e, what, "memory purge task failed"),
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
