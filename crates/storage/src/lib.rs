//! keel's durable storage: the write-ahead log (entries, hard state, snapshot markers) and the
//! snapshot store.
//!
//! Everything here goes through the small [`Disk`] trait so that the same code runs over real
//! files ([`FileDisk`]) and over an in-memory, fault-injecting disk ([`SimDisk`]) that the
//! deterministic simulator drives: lost un-fsynced writes, torn writes, fsync errors and
//! un-synced directory entries are all modelled there.
//!
//! The crate knows nothing about Raft or any other keel crate. A log entry is an opaque payload
//! with its index and term visible, which is all the log needs to apply Raft's rule that an
//! entry appended at index `i` replaces every entry at `i` and after.
//!
//! Durability protocol for callers:
//! - [`Wal::append`] returns only after its records are fsynced; acknowledge nothing before.
//! - To compact: [`SnapshotStore::save`], then [`Wal::save_snapshot_marker`], then
//!   [`Wal::release_before`]. Each step is durable before the next begins, so a crash between
//!   any two of them leaves a state that replays correctly.
//! - Any I/O error from the log poisons it ([`StorageError::Poisoned`]): the member must stop.

#![deny(missing_docs)]

mod disk;
mod error;
mod record;
mod sim_disk;
mod snapshot;
mod wal;

pub use disk::{
    Disk, DiskFaults, DiskFile, FileDisk, FileDiskFile, ATOMIC_WRITE_SYNC_BYTES, TEMPORARY_SUFFIX,
};
pub use error::StorageError;
pub use sim_disk::{Crash, SimDisk, SimDiskFile, SimDiskStats};
pub use snapshot::{Snapshot, SnapshotOptions, SnapshotStore};
pub use wal::{
    HardState, LogEntry, Recovered, ReleasedSegments, SnapshotMarker, TruncatedTail, Wal,
    WalOptions, WalStats,
};
