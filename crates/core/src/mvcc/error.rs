//! The errors the key space returns.
//!
//! Each variant's message is exactly the one etcd v3.5 shows clients, so the server can
//! pass it on unchanged. On the wire etcd sends the two `mvcc:` errors with an
//! `etcdserver: ` prefix and gRPC code `OutOfRange`, `LeaseNotFound` with `NotFound`,
//! and every other variant here with `InvalidArgument`; that mapping is the server's.

use thiserror::Error;

/// Why the key space refused a request. A refused request changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum KeySpaceError {
    /// The request reads (or compacts to) a revision older than the compacted revision.
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    /// The request reads (or compacts to) a revision newer than the current revision.
    #[error("mvcc: required revision is a future revision")]
    FutureRevision,
    /// A put with `ignore_value` or `ignore_lease` names a key that does not exist, or a
    /// txn holds an operation with no request in it (etcd's answer to both).
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// A request or compare has an empty key.
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// A put sets `ignore_value` and also carries a value.
    #[error("etcdserver: value is provided")]
    ValueProvided,
    /// A put sets `ignore_lease` and also carries a lease.
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    /// A txn (or a txn nested in it) has more operations than the limit allows.
    #[error("etcdserver: too many operations in txn request")]
    TooManyOperations,
    /// A txn writes the same key twice, or both puts and deletes it.
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    /// A range's `sort_order` or `sort_target` is not a known enum value.
    #[error("etcdserver: invalid sort option")]
    InvalidSortOption,
    /// A put in a txn names a lease that the caller's lease lookup does not know.
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    /// [`KeySpace::read_only_txn`](super::KeySpace::read_only_txn) was given a txn that
    /// may write; such a txn must be applied through the log instead.
    #[error("keel: txn request is not read-only")]
    NotReadOnly,
    /// A snapshot does not describe a consistent key space.
    #[error("keel: corrupt key space snapshot: {0}")]
    CorruptSnapshot(String),
}
