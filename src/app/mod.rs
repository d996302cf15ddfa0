//! The binary's wiring: the config it reads, the listeners it serves, the admin HTTP API, logs and metrics.
//!
//! Nothing here decides a request or counts usage: [`serve`] opens the paths (`check`, `metering`,
//! `billing`) and hands them to the gRPC and admin listeners; [`admin`] only translates HTTP to their calls.

pub mod admin;
pub mod batched;
pub mod config;
pub mod http;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod serve;
pub mod tls;
