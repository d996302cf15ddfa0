//! The request a Check decides, as plain values: the adapter fills it from Envoy's CheckRequest.

use std::collections::HashMap;

/// A request as Envoy describes it, with no protobuf in sight. No `Debug`: its headers carry credentials.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// HTTP method, uppercase.
    pub method: &'a str,
    /// `:path`, including the query string.
    pub path: &'a str,
    /// `:authority` (host, maybe with a port).
    pub authority: &'a str,
    /// Request headers, lowercase names.
    pub headers: &'a HashMap<String, String>,
    /// The route's ext_authz context extensions.
    pub context_extensions: &'a HashMap<String, String>,
}
