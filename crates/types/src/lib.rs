//! The vocabulary every keel crate shares: identifiers, and the messages that
//! cross the wire or enter the Raft log.
//!
//! The etcd v3 messages are generated from the `.proto` files in `proto/`, written
//! in this project from etcd's published API reference so that etcd clients work
//! against keel unchanged. `keelpb` holds keel's own records: what a proposal
//! looks like inside a Raft log entry, and the state machine snapshot format.
//! etcd's messages also carry generated serde impls in protobuf's JSON mapping
//! (pbjson), which the JSON gateway speaks.

#![allow(missing_docs, clippy::all)]

/// etcd's MVCC key-value and event messages (`mvccpb`).
pub mod mvccpb {
    include!(concat!(env!("OUT_DIR"), "/mvccpb.rs"));
    include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
}

/// etcd's authentication messages (`authpb`).
pub mod authpb {
    include!(concat!(env!("OUT_DIR"), "/authpb.rs"));
    include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
}

/// etcd's v3 request and response messages (`etcdserverpb`).
pub mod etcdserverpb {
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
}

/// etcd's lock service messages (`v3lockpb`).
pub mod v3lockpb {
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.rs"));
}

/// etcd's election service messages (`v3electionpb`).
pub mod v3electionpb {
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.rs"));
}

/// keel's own durable records: log entry payloads and snapshots.
pub mod keelpb {
    include!(concat!(env!("OUT_DIR"), "/keelpb.rs"));
}

/// A member's identity in the cluster, as etcd's 64-bit member ID.
pub type MemberId = u64;

/// The MVCC store's logical clock: it increases by one with every write.
pub type Revision = i64;
