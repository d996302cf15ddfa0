//! tollgate: an Envoy ext_authz sidecar that sells and protects APIs.
//!
//! Two data paths run through this crate. The Check path:
//! [`envoy::authz`] (protobuf -> [`decision::Request`]) -> [`identity`] -> [`matching`] -> [`quota`] ->
//! [`decision`] -> [`envoy::authz`] (decision -> CheckResponse), driven by [`authorizer`]. The catalog it
//! reads is an immutable snapshot from [`catalog`]; [`config`] and [`source`] read the files.

pub mod admin;
pub mod bearer;
pub mod billing;
pub mod catalog;
pub mod check;
pub mod config;
pub mod envoy;
pub mod identity;
pub mod matching;
pub mod metering;
pub mod quota;
pub mod server;
pub mod source;
pub mod telemetry;
pub mod util;
