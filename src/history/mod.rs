//! Usage history (CONTRACT §10): what every replica metered, rolled up by UTC hour in the state store, so a
//! partner's month to date, by day and by product, outlives the few minutes of windows a replica keeps.
//!
//! # One closed window, followed
//! `metering::seal` closes a window for good (`lateness + retention` after its end: no record joins it any
//! more) → its per (customer, app, product, meter) counts become one [`store::Batch`] named
//! `<producer>:<window start>:<length>` → [`store::HistoryStore::add`] adds the rows into their hour in one
//! transaction, with a mark of the batch → the spool may then drop the window's records. A crash before the
//! add replays the spool, closes the window again and adds the same batch, which the mark refuses: every
//! window is added once. Replicas add into the same rows, so with PostgreSQL the history is the fleet's.
//!
//! What Stripe was sent for a customer and meter is the sum of the sealed revisions of the same windows'
//! billable values, so a month's `value` here equals Stripe's total once the month's windows are closed.
//!
//! # Layout
//! `store` is the interface; `sql` implements it on the state store's database.

pub mod sql;
pub mod store;

pub use store::{Batch, Counts, Dims, HistoryStore, Rollup, Subject};
