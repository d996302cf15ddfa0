//! Small helpers every path shares: the wall clock and poison-tolerant locks.

pub mod clock;
pub mod sync;
