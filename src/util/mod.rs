//! Small helpers every path shares: the wall clock, poison-tolerant locks, bearer-token comparison, log
//! throttling, returning freed memory.

pub mod bearer;
pub mod clock;
pub mod durable;
pub mod memory;
pub mod sync;
pub mod throttle;
