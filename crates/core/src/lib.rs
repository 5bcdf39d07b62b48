//! keel's sans-IO core: one member's Raft consensus (raft-rs's `RawNode`) and
//! replicated state machine (the MVCC key space), driven by events and
//! returning actions.
//!
//! Architecture invariant: nothing in this crate touches a socket, a file, a
//! thread, a wall clock or unseeded randomness; the disk is reached only
//! through `keel_storage::Disk`, which the shell or the simulator provides. Time comes in as ticks and
//! randomness as seeds, so that the same inputs always produce the same outputs;
//! the deterministic simulator (`sim`) and the tokio shell (`server`) drive the
//! very same `Node`.

pub mod backup;
pub mod durable;
pub mod lease;
pub mod log_store;
pub mod mvcc;
pub mod node;
pub mod raft_logger;
pub mod state_machine;

pub use durable::{DurableError, DurableState, OpeningState};
pub use node::{
    bootstrap_snapshot, AutoCompactionPolicy, DeliberateBug, Event, LogCompaction,
    MembershipChange, Node, NodeConfig, NodeStatus, Output, Persist, Recovered, Reply,
    RequestError, Response, SnapshotCapture, StartError, WriteRequest,
};
pub use state_machine::{ApplyError, StateMachine, StateMachineCapture, WriteResponse};

/// raft-rs's message and entry types, re-exported so the shell and simulator
/// need not depend on raft-rs directly.
pub use raft::eraftpb;
