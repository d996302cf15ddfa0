//! tollgate: an Envoy ext_authz sidecar that sells and protects APIs.
//!
//! Two data paths run through this crate, and they meet only in the ext_authz dynamic metadata
//! ([`envoy::metadata`]), which Envoy carries from the Check to the access log.
//!
//! ```text
//! Check:  Envoy ext_authz ─> envoy::authz (CheckRequest -> check::Request)
//!           ─> check::Authorizer::check: identity (API key | JWT) ─> entitle (catalog snapshot)
//!              ─> matching (product, operation) ─> credits (lease) ─> quota (QuotaStore: memory | Redis)
//!              ─> decide
//!           ─> check::Verdict ─> envoy::authz (Verdict -> CheckResponse + envoy::metadata)
//!
//! Usage:  Envoy access log ─> envoy::access_log (entry -> metering::UsageRecord)
//!           ─> metering: spool (durable, deduplicated) ─> windows (sealed) ─> outbox
//!           ─> billing (through metering's UsageOutbox: Stripe meter events, once) ─> outbox ack
//! ```
//!
//! | module | its one job |
//! |---|---|
//! | [`app`] | the binary's wiring: config, `serve`, the admin HTTP API, logging, the metrics registry |
//! | [`envoy`] | the only place Envoy's protobuf lives: the ext_authz and access-log adapters, metadata keys |
//! | [`check`] | the Check path, protocol-free: `Authorizer::check(&Request) -> Verdict` |
//! | [`identity`] | who is calling: API-key lookup, JWT verification (providers, JWKS) |
//! | [`import`] | `tollgate import apigee`: Apigee exports to a catalog, and a report of what could not be mapped |
//! | [`matching`] | Apigee-style path patterns; the first product and operation that cover a request |
//! | [`catalog`] | the catalog file: load, validate, the immutable snapshot, the watcher |
//! | [`quota`] | quota windows, the `QuotaStore` trait, the memory and Redis stores |
//! | [`credits`] | prepaid balances: the ledger on the state store, the per-replica lease engine, top-ups, `/v1/credits` |
//! | [`metering`] | usage records from the access log: spool, dedup, windows, outbox, the usage report |
//! | [`billing`] | sealed windows to Stripe meter events exactly once: delivery, dead letters, reconcile |
//! | [`selfservice`] | partner self-service through Envoy: `GET /.tollgate/usage` answered by tollgate itself, with the caller's own data |
//! | [`paywall`] | Stripe drives access: signed webhooks, subscription state, the grant rules of products sold through Stripe, the resync |
//! | [`state`] | the state store (SQLite or PostgreSQL) of run-time developers, apps and keys; the management API; the merge into the snapshot and its sync across replicas |
//! | [`source`] | reading YAML/JSON with `${VAR}` expansion so every error names `file:line:column` |
//! | [`util`] | the clock, poison-tolerant locks, constant-time bearer comparison, returning freed memory |

#![warn(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod app;
pub mod billing;
pub mod catalog;
pub mod check;
pub mod credits;
pub mod envoy;
pub mod genai;
pub mod history;
pub mod identity;
pub mod import;
pub mod matching;
pub mod metering;
pub mod paywall;
pub mod quota;
pub mod selfservice;
pub mod source;
pub mod state;
pub mod util;
