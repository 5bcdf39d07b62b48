//! The MVCC key space: etcd v3.5's multi-version key-value semantics as a pure,
//! deterministic, in-memory data structure.
//!
//! [`KeySpace`] answers etcd's KV requests (`Range`, `Put`, `DeleteRange`, `Txn`,
//! `Compact`) and the maintenance `HashKV`, taking and returning the prost messages
//! of `keel_types::etcdserverpb` so that the server layer can pass them through.
//! It does no I/O and reads no clock: the same requests applied in the same order
//! produce the same key space and the same responses on every member, which is what
//! Raft state machine replication needs.
//!
//! # The model, as in etcd
//!
//! The store has one logical clock, the *revision*. An empty store reports revision 1.
//! Every put, every delete that removes at least one key and every txn that changes at
//! least one key advances it by exactly one; the changes of one txn share that revision
//! and are told apart by their *sub-revision* (their order inside the txn). Every key
//! keeps its full history of versions and tombstones, so a range can read the store as
//! it was at any revision that has not been compacted away. Per key, `create_revision`
//! is the revision that created the current incarnation of the key, `mod_revision` the
//! one that last wrote it, and `version` counts the puts since it was created (a delete
//! ends the incarnation; re-creating the key starts again at version 1).
//!
//! # What the caller does
//!
//! - Requests are checked twice in etcd: statelessly by the gRPC layer before they are
//!   proposed ([`validate_range`], [`validate_put`], [`validate_delete_range`],
//!   [`validate_txn`]) and statefully when applied. The write methods here repeat the
//!   stateless checks (except the operation-count limit, which is configuration and must
//!   not make members disagree), so a request that slipped past the server is still
//!   rejected identically on every member.
//! - Leases live outside this module. The caller checks that a put's lease exists before
//!   calling [`KeySpace::put`] (as etcd's applier does), passes a lease lookup to
//!   [`KeySpace::txn_with_lease_check`], and keeps its lease → keys index up to date
//!   from the [`Event`](keel_types::mvccpb::Event)s of each new revision
//!   ([`KeySpace::events`]), whose `kv.lease` and `prev_kv.lease` say what was attached
//!   and detached. [`KeySpace::delete_keys`] removes the keys of a revoked lease at one
//!   revision.
//! - Response headers carry only `revision` (the value etcd puts there); the caller fills
//!   `cluster_id`, `member_id` and `raft_term`.
//! - Errors carry etcd's messages ([`KeySpaceError`]); the server maps them to gRPC codes.
//!
//! # Limits
//!
//! The whole key space is in memory. What one request can make grow is bounded as
//! follows: a txn's operation count by the caller's `txn_operations_max`
//! ([`TXN_OPERATIONS_MAX_DEFAULT`] is etcd's default of 128) and each request's size by
//! the caller's request-size limit (etcd's `--max-request-bytes`), so a write adds at
//! most that many bytes of history. A range's result is bounded only by the size of the
//! key space, as in etcd; a caller that needs a tighter bound sets `limit`. Event
//! catch-up reads are bounded by their `events_max` argument. History is bounded by
//! compaction, which the caller schedules.

mod error;
mod hash;
mod history;
mod key_space;
mod snapshot;
mod txn;
mod validate;

#[cfg(test)]
mod tests;

pub use error::KeySpaceError;
pub use key_space::{EventBatch, KeySpace, VERSION_OVERHEAD_BYTES};
pub use validate::{
    is_txn_read_only, validate_delete_range, validate_put, validate_range, validate_txn,
    TXN_OPERATIONS_MAX_DEFAULT,
};
