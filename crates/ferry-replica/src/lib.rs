//! ferry's replication: the provider's catalog and capture triggers, the subscriber's catalog
//! and table states, the initial copy, and the replay daemon that applies each batch exactly
//! once.
//!
//! A table travels `in-copy` → `catching-up` → `ok` on each subscriber: replay copies it under
//! a provider snapshot it records, then skips the events of transactions that snapshot saw,
//! and applies all events once a batch starts at a tick that saw everything the copy saw.

mod apply;
pub mod catalog;
pub mod columns;
pub mod compare;
mod copies;
mod copy;
mod copy_indexes;
mod error;
pub mod event;
pub mod execute;
pub mod failover;
pub mod names;
pub mod prepared;
pub mod progress;
pub mod provider;
mod reduce;
pub mod replay;
mod replay_lock;
pub mod session;
pub mod snapshot;
pub mod status;
pub mod store;
pub mod subscriber;
pub mod switchover;
pub mod sync;

pub use apply::{Applier, BatchOutcome};
pub use copy::{copy_table, CopyDone};
pub use error::{ErrorKind, ReplicaError};
pub use names::RelName;
pub use replay::{run, ReplayError, ReplaySettings};
pub use session::open_session;
