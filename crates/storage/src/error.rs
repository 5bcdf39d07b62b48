//! The error type of the storage boundary.
//!
//! Storage errors fall into two families that callers must treat differently. I/O failures
//! (`Io`, `FsyncFailed`, `Poisoned`) mean this member can no longer promise durability and must
//! stop. `Corrupt` means bytes on disk are not what keel wrote: the member must be taken out of
//! service and rebuilt from its peers, never trusted (DESIGN.md: corruption is detected, not
//! repaired). Every message names the file and, where there is one, the byte offset, because the
//! operator reading it has nothing else to go on.

use std::io;

/// An error from the write-ahead log or the snapshot store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// An operating-system call failed; `context` says which operation on which file.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the file or directory.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// Bytes on disk fail their checksum or do not follow the format.
    #[error("corrupt data in {file} at byte offset {offset}: {reason}")]
    Corrupt {
        /// The file, relative to the disk root.
        file: String,
        /// Byte offset in `file` of the record or field that is wrong.
        offset: u64,
        /// What is wrong, in words.
        reason: String,
    },

    /// A record to append is larger than `WalOptions::record_bytes_max`; nothing was written.
    #[error("record of {bytes} bytes exceeds the limit of {limit} bytes (record_bytes_max)")]
    RecordTooLarge {
        /// Encoded size of the refused record, header included.
        bytes: u64,
        /// The configured limit.
        limit: u64,
    },

    /// A snapshot to save is larger than `SnapshotOptions::snapshot_bytes_max`.
    #[error("snapshot of {bytes} bytes exceeds the limit of {limit} bytes (snapshot_bytes_max)")]
    SnapshotTooLarge {
        /// Encoded size of the refused snapshot file.
        bytes: u64,
        /// The configured limit.
        limit: u64,
    },

    /// An fsync failed. The data written since the last successful fsync may be lost even though
    /// a later fsync might report success, so the log is now poisoned (PostgreSQL's "fsyncgate").
    #[error("fsync of {file} failed, the write-ahead log is poisoned: {source}")]
    FsyncFailed {
        /// The file or directory whose fsync failed.
        file: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// An earlier I/O failure poisoned the write-ahead log; it refuses every further write.
    #[error(
        "the write-ahead log refuses writes after an earlier failure ({reason}); \
         restart the member"
    )]
    Poisoned {
        /// The earlier failure.
        reason: String,
    },

    /// Options that cannot work, such as a zero segment size.
    #[error("invalid storage options: {reason}")]
    InvalidOptions {
        /// Which option and why.
        reason: String,
    },
}

impl StorageError {
    /// Builds an [`StorageError::Io`] with a context naming the operation and file.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> StorageError {
        StorageError::Io {
            context: context.into(),
            source,
        }
    }
}
