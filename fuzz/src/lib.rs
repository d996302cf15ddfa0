//! Shared code of the fuzz targets: the oracles and the JWT rig (both also compiled into
//! tests/properties.rs with `#[path]`).

pub mod invariants;
pub mod jwt;
