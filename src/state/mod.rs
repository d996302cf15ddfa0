//! The state store: developers, apps, keys and subscriptions created at run time (CONTRACT §7).
//!
//! # Two sources, one snapshot
//! The catalog file stays the declarative source (products, and whatever a GitOps repository pins); the
//! state store holds what a portal or an operator provisions through the management API ([`api`]). The Check
//! path reads neither: it reads one in-memory [`Catalog`](crate::catalog::Catalog) that [`snapshot`] merges
//! from both. A name lives in exactly one source: the API refuses names the file defines (409
//! `defined_in_catalog`), and a catalog reload that introduces a name the store holds is rejected like any
//! bad edit.
//!
//! # Changes, in order, never missed
//! Every write is one transaction ([`sql`]) that takes the next number of a single sequence row, changes the
//! entity tables, appends one `changes` row per touched entity (a developer's e-mail, an app's name, a key's
//! hash) and one `audit` row. The sequence row is locked until commit, so writes commit in sequence order:
//! once a reader sees sequence `S`, every change up to `S` is readable. A replica keeps a cursor and reads
//! the changes after it ([`StateStore::changes`]), then re-reads each named entity as it is now and applies
//! that to its snapshot ([`sync`]). Applying current state is idempotent, so reading a change twice or late
//! is harmless; a replica whose cursor fell behind the retained changes reloads everything.
//!
//! Replicas learn of changes by polling every `sync_interval`, and sooner on PostgreSQL, whose writes also
//! `NOTIFY` a channel that every replica `LISTEN`s on ([`listen`]). A lost notification only costs latency:
//! the poll reads the same cursor.
//!
//! # Incremental snapshots
//! The merged catalog keeps developers and apps in persistent maps and keys in a
//! [`KeyTable`](crate::catalog::keys::KeyTable) (a flat table shared by copies plus a persistent delta):
//! applying one change copies the current snapshot in O(1), edits the copy in O(log n) and swaps it in.
//! Revoking one key among a million touches a handful of nodes, never the million. A catalog file reload re-merges the file's entities
//! (O(file)) and re-resolves the store's apps against the new products (O(store apps)); the store's keys are
//! reused as they are.
//!
//! # When the store is down
//! Checks keep the last snapshot; the management API answers 503 `unavailable`;
//! `tollgate_state_sync_age_seconds` grows; the sync loop retries and catches up from its cursor when the
//! store is back.

pub mod api;
pub mod listen;
pub mod metrics;
pub mod model;
pub mod snapshot;
pub mod sql;
pub mod store;
pub mod sync;

pub use snapshot::Snapshot;
pub use store::{StateStore, StoreError};
