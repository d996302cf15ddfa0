//! A log line at most once a second for events that can come once per request (a dead store, forged webhooks):
//! the metric counts each, the log says it is happening without flooding stderr.

use std::sync::atomic::{AtomicI64, Ordering};

/// Lets one caller through per Unix second.
#[derive(Debug)]
pub struct OncePerSecond {
    last: AtomicI64,
}

impl Default for OncePerSecond {
    fn default() -> Self {
        OncePerSecond {
            last: AtomicI64::new(i64::MIN),
        }
    }
}

impl OncePerSecond {
    /// Whether the caller at `now` (Unix seconds) is the first of its second.
    pub fn allow(&self, now: i64) -> bool {
        let last = self.last.load(Ordering::Relaxed);
        now > last
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::OncePerSecond;

    #[test]
    fn one_per_second() {
        let gate = OncePerSecond::default();
        assert!(gate.allow(10));
        assert!(!gate.allow(10));
        assert!(!gate.allow(9), "time going back lets nobody through");
        assert!(gate.allow(11));
    }
}
