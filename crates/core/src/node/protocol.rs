//! The protocol between the node and its shell: the [`Event`]s it takes, the
//! [`Output`]s it returns, the answers to clients and the errors they carry.

use keel_types::etcdserverpb::{
    LeaseKeepAliveResponse, LeaseTimeToLiveResponse, RangeRequest, RangeResponse,
};
use keel_types::keelpb::{log_request, MemberRecord};
use raft::eraftpb::{Entry, HardState, Message, Snapshot, SnapshotMetadata};

use crate::mvcc::KeySpaceError;
use crate::state_machine::{ApplyError, SnapshotDecodeError, StateMachineCapture, WriteResponse};

/// A write a client asks for.
pub type WriteRequest = log_request::Request;

/// Something that happened to the node.
#[derive(Debug)]
pub enum Event {
    /// One unit of logical time passed (the shell ticks every heartbeat interval).
    Tick,
    /// A Raft message from a peer.
    Message(Box<Message>),
    /// A client write, answered later by a [`Reply`] carrying `token`.
    Write {
        /// The shell's handle for the waiting client.
        token: u64,
        /// What to write.
        request: WriteRequest,
    },
    /// A linearizable read, served after a ReadIndex round (§6.4 of Ongaro's thesis).
    LinearizableRead {
        /// The shell's handle for the waiting client.
        token: u64,
        /// What to read.
        request: RangeRequest,
    },
    /// A lease keep-alive; only the leader can answer it.
    LeaseKeepAlive {
        /// The shell's handle for the waiting client.
        token: u64,
        /// The lease.
        id: i64,
    },
    /// A lease's remaining time; only the leader can answer it.
    LeaseTimeToLive {
        /// The shell's handle for the waiting client.
        token: u64,
        /// The lease.
        id: i64,
        /// Whether to list the attached keys.
        keys: bool,
    },
    /// A change of membership (etcd's Cluster service), answered once applied.
    ChangeMembership {
        /// The shell's handle for the waiting client.
        token: u64,
        /// What to change.
        change: MembershipChange,
    },
    /// Transfer leadership to another voter (etcd's MoveLeader); only the
    /// leader can do it. Answered once the target leads, or with a timeout.
    MoveLeader {
        /// The shell's handle for the waiting client.
        token: u64,
        /// The member that should lead.
        target: u64,
    },
    /// The transport could not reach this peer.
    Unreachable(u64),
    /// A snapshot sent to this peer was lost; raft-rs must be told or the peer
    /// stays stuck waiting for it.
    SnapshotFailed(u64),
    /// A snapshot was written in full to this peer's connection. raft-rs sends a
    /// follower nothing while its snapshot is in flight; this report (etcd's
    /// `ReportSnapshot(Finish)`) resumes probing it, which is what recovers a
    /// follower that received the snapshot but stopped before installing it.
    SnapshotSent(u64),
    /// The snapshot of a [`SnapshotCapture`] is durable (written and fsynced
    /// with its directory): the node may now hand it to raft-rs, for followers
    /// that need it, and compact its log behind it. raft-rs's rule: a snapshot
    /// is announced only once durable, and the log is compacted only behind a
    /// durable snapshot.
    SnapshotDurable(Box<Snapshot>),
}

/// A change of membership, as etcd's Cluster service asks for it.
#[derive(Debug, Clone, PartialEq)]
pub enum MembershipChange {
    /// Add a member (a voter, or a learner when `is_learner`); its id is
    /// chosen by this member before proposing.
    Add {
        /// Peer URLs of the new member.
        peer_urls: Vec<String>,
        /// Whether it joins as a non-voting learner.
        is_learner: bool,
    },
    /// Remove a member.
    Remove {
        /// The member.
        member_id: u64,
    },
    /// Make a caught-up learner a voter (only the leader can judge "caught up").
    Promote {
        /// The learner.
        member_id: u64,
    },
    /// Change a member's peer URLs.
    Update {
        /// The member.
        member_id: u64,
        /// Its new peer URLs.
        peer_urls: Vec<String>,
    },
}

/// The answer to one client request.
#[derive(Debug)]
pub struct Reply {
    /// The shell's handle for the waiting client.
    pub token: u64,
    /// The result.
    pub result: Result<Response, RequestError>,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// A write's result.
    Write(WriteResponse),
    /// A read's result.
    Range(RangeResponse),
    /// A keep-alive's result.
    LeaseKeepAlive(LeaseKeepAliveResponse),
    /// A time-to-live query's result.
    LeaseTimeToLive(LeaseTimeToLiveResponse),
    /// Leadership moved to the requested member.
    LeaderMoved,
    /// A membership change applied: the member it concerned and everyone after it.
    Membership {
        /// The member added, removed, promoted or updated.
        member: MemberRecord,
        /// The membership after the change.
        members: Vec<MemberRecord>,
    },
}

/// Why a client request failed. Messages are etcd's, so clients react the same way.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The state machine refused the request (same on every member).
    #[error(transparent)]
    KeySpace(#[from] KeySpaceError),
    /// No leader is known right now; the client should retry.
    #[error("etcdserver: no leader")]
    NoLeader,
    /// The request did not commit or get a read index in time; it may still take effect.
    #[error("etcdserver: request timed out")]
    Timeout,
    /// The request must be answered by the leader, which is this member.
    #[error("etcdserver: not leader")]
    NotLeader {
        /// The leader this member knows of, 0 if none.
        leader_id: u64,
    },
    /// A lease with this id exists already.
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    /// No member has this id.
    #[error("etcdserver: member not found")]
    MemberNotFound,
    /// Another member already uses one of these peer URLs.
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExists,
    /// Only learners can be promoted.
    #[error("etcdserver: can only promote a learner member")]
    MemberNotLearner,
    /// The learner's log is too far behind the leader's to promote it.
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    /// Another membership change is still being applied.
    #[error("etcdserver: unhealthy cluster")]
    MembershipChangeInProgress,
    /// The space quota is exhausted (the NOSPACE alarm is raised).
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    /// MoveLeader named a member that is not a voter.
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    /// The requested lease TTL is above the maximum.
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    /// The term changed while the write waited; it may or may not take effect.
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    /// Too many requests are already waiting.
    #[error("etcdserver: too many requests")]
    TooManyRequests,
    /// The encoded request is larger than `request_bytes_max`.
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    /// The proposal was dropped by Raft (for example during a leader transfer).
    #[error("etcdserver: request cancelled")]
    Dropped,
}

/// What the shell must make durable, in this order, with one fsync.
#[derive(Debug, Default)]
pub struct Persist {
    /// A snapshot received from the leader: write it (and mark it in the log)
    /// before the entries that follow it.
    pub snapshot: Option<Snapshot>,
    /// New log entries; they may overwrite a suffix of the log.
    pub entries: Vec<Entry>,
    /// The new hard state (term, vote, commit), if it changed.
    pub hard_state: Option<HardState>,
    /// False when only the commit index changed (no entries, term, vote or
    /// snapshot): then the hard state may be written without an fsync.
    pub must_sync: bool,
}

impl Persist {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none() && self.entries.is_empty() && self.hard_state.is_none()
    }
}

/// A capture of this member's own state machine, taken on the member loop in
/// O(1). The shell encodes, writes and fsyncs it away from the loop and then
/// reports [`Event::SnapshotDurable`]; until then raft-rs does not know of it
/// and no log entry it covers is dropped.
#[derive(Debug)]
pub struct SnapshotCapture {
    /// Index, term and configuration of the snapshot to be.
    pub metadata: SnapshotMetadata,
    /// The state machine as of `metadata.index`.
    pub state: StateMachineCapture,
}

impl SnapshotCapture {
    /// Encodes the capture into a Raft snapshot: O(key space), so the server
    /// calls it on its snapshot thread, never on the member loop.
    pub fn encode(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(self.metadata.clone());
        snapshot.data = self.state.encode().into();
        snapshot
    }
}

/// The log behind a durable snapshot of this member's own state machine may go:
/// the shell records the snapshot in its write-ahead log (its marker) and then
/// releases log records before `compact_index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogCompaction {
    /// The durable snapshot's index.
    pub snapshot_index: u64,
    /// The term of the entry at that index.
    pub snapshot_term: u64,
    /// Log records before this index are covered by the snapshot.
    pub compact_index: u64,
}

/// Work for the shell, to be carried out in field order (see the module docs).
#[derive(Debug, Default)]
pub struct Output {
    /// Messages that may be sent at once.
    pub messages: Vec<Message>,
    /// What to make durable before anything below.
    pub persist: Persist,
    /// Messages that may be sent only after `persist` is durable.
    pub messages_after_persist: Vec<Message>,
    /// Answers to clients.
    pub replies: Vec<Reply>,
    /// A capture of the state machine to encode, write and fsync off the
    /// member loop, then report with [`Event::SnapshotDurable`]. At most one is
    /// outstanding at a time.
    pub snapshot_capture: Option<SnapshotCapture>,
    /// A durable own snapshot to mark in the write-ahead log, and the log to
    /// release behind it. The shell may carry it out at any point of the
    /// output (it depends on nothing else in it); carrying it out first keeps
    /// the log's snapshot markers in increasing order when the same output also
    /// persists a newer snapshot received from the leader.
    pub log_compaction: Option<LogCompaction>,
}

/// What a member was when it stopped, as recovered from disk by the shell.
#[derive(Debug)]
pub struct Recovered {
    /// The newest snapshot. For a member that never made one, the bootstrap
    /// snapshot at index 1 that holds the initial configuration.
    pub snapshot: Snapshot,
    /// The last hard state written, if any.
    pub hard_state: Option<HardState>,
    /// Log entries after the snapshot, contiguous.
    pub entries: Vec<Entry>,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The snapshot's state machine bytes are unreadable.
    #[error(transparent)]
    Snapshot(#[from] SnapshotDecodeError),
    /// raft-rs refused the recovered state.
    #[error("raft refused the recovered state: {0}")]
    Raft(#[from] raft::Error),
    /// The recovered log does not start right after the snapshot.
    #[error("log starts at index {first_entry_index} but the snapshot ends at {snapshot_index}")]
    LogGap {
        /// The first recovered entry's index.
        first_entry_index: u64,
        /// The snapshot's index.
        snapshot_index: u64,
    },
}

/// A point-in-time view of a member, for Status and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStatus {
    /// This member.
    pub member_id: u64,
    /// The cluster.
    pub cluster_id: u64,
    /// The leader this member knows of, 0 if none.
    pub leader_id: u64,
    /// The current term.
    pub term: u64,
    /// The highest index known committed.
    pub commit_index: u64,
    /// The highest index applied to the state machine.
    pub applied_index: u64,
    /// The last index in this member's log.
    pub last_index: u64,
    /// The key space's current revision.
    pub revision: i64,
    /// The key space's compacted revision.
    pub compact_revision: i64,
    /// Approximate size of the key space, in bytes.
    pub key_space_bytes: u64,
    /// True when this member is the leader.
    pub is_leader: bool,
    /// True when this member is a learner (non-voting).
    pub is_learner: bool,
    /// Raised alarms (replicated: every member lists the same ones).
    pub alarms: Vec<keel_types::etcdserverpb::AlarmMember>,
}

impl From<ApplyError> for RequestError {
    fn from(error: ApplyError) -> Self {
        match error {
            ApplyError::KeySpace(error) => RequestError::KeySpace(error),
            ApplyError::LeaseExists => RequestError::LeaseExists,
            ApplyError::NoSpace => RequestError::NoSpace,
        }
    }
}
