//! Small helpers every path shares: the wall clock, poison-tolerant locks, bearer-token comparison.

pub mod bearer;
pub mod clock;
pub mod durable;
pub mod sync;
