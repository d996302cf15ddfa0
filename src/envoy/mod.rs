//! The only place Envoy's protobuf types live: adapters between Envoy's services and tollgate's core.

pub mod access_log;
pub mod answers;
pub mod authz;
pub mod ext_proc;
pub mod metadata;
pub mod slim;
pub mod stream_token;

/// Largest gRPC message accepted from Envoy: a CheckRequest (with a buffered request body when Envoy is set to
/// send one) or an access-log batch; Envoy's batches are 16 KiB by default, so this bound only stops abuse.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
