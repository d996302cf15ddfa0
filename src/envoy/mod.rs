//! The only place Envoy's protobuf types live: adapters between Envoy's services and tollgate's core.

pub mod access_log;
pub mod authz;
pub mod metadata;
