//! `Node`: one keel member's consensus and state machine, as a pure function of
//! the events it is given.
//!
//! The shell feeds a `Node` events ([`Event`]: a tick, a peer message, a client
//! request) and then drains its work with [`Node::ready`] and
//! [`Node::advance`]. Each returns an [`Output`] the shell must carry out in
//! this order, which is raft-rs's Ready protocol:
//!
//! 1. send `messages` (a leader may send before its own disk write, §10.2.1 of
//!    Ongaro's thesis);
//! 2. make `persist` durable: snapshot first, then entries and hard state, with
//!    one fsync for the whole batch (this is where group commit happens: every
//!    proposal that arrived since the last ready shares it);
//! 3. send `messages_after_persist` (votes and append responses must not be sent
//!    before what they promise is on disk, §5.2 and §5.3);
//! 4. deliver `replies` and save `snapshot_to_save`;
//! 5. call [`Node::advance`] and carry out its output the same way.
//!
//! The node reads no clock and no unseeded randomness: time arrives as ticks, and
//! the election-timeout jitter comes from a seed in [`NodeConfig`]. That makes a
//! run reproducible from its inputs, which is what the simulator relies on.

use std::collections::{BTreeMap, VecDeque};

use keel_types::etcdserverpb::{
    LeaseCheckpoint, LeaseCheckpointRequest, LeaseKeepAliveResponse, LeaseRevokeRequest,
    LeaseTimeToLiveResponse, RangeRequest, RangeResponse, ResponseHeader,
};
use keel_types::keelpb::{log_request, LogRequest, MemberRecord};
use prost::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeV2, Entry, EntryType, HardState, Message, MessageType, Snapshot,
    SnapshotMetadata,
};
use raft::{RawNode, ReadOnlyOption, StateRole};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::lease::{Lessor, LEASE_TTL_SECONDS_MAX};
use crate::log_store::LogStore;
use crate::mvcc::{self, KeySpaceError};
use crate::state_machine::{ApplyError, SnapshotDecodeError, StateMachine, WriteResponse};

/// Settings of one member's consensus and request handling.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This member's id.
    pub member_id: u64,
    /// Ticks without hearing from a leader before a follower starts an election.
    /// The effective timeout is drawn from `[election_ticks, 2 * election_ticks)`.
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Largest append message raft-rs sends, in bytes.
    pub append_message_bytes_max: u64,
    /// Append messages in flight to one follower before the leader waits.
    pub inflight_messages_max: usize,
    /// Applied entries between two snapshots of the state machine.
    pub snapshot_entries_interval: u64,
    /// Entries kept in memory behind a snapshot, so a briefly slow follower can
    /// catch up from the log instead of needing the whole snapshot.
    pub snapshot_catch_up_entries: u64,
    /// Largest client request accepted, in encoded bytes.
    pub request_bytes_max: usize,
    /// Operations allowed in one transaction, counting nested ones.
    pub txn_operations_max: usize,
    /// Client requests waiting for commit or for a read index at once.
    pub pending_requests_max: usize,
    /// Ticks after which a request that got no answer fails with a timeout (its
    /// outcome is then unknown to the client, as with etcd).
    pub request_timeout_ticks: u64,
    /// Ticks after which an unanswered ReadIndex request is issued again: raft-rs
    /// drops such requests silently when a leader has not yet committed in its term.
    pub read_index_retry_ticks: u64,
    /// Seed for the election timeout jitter; the shell draws it from real
    /// randomness, the simulator from its run seed.
    pub random_seed: u64,
    /// A per-boot value placed in the high bits of proposal ids, so that ids
    /// never repeat across restarts of this member.
    pub boot_epoch: u32,
    /// A deliberately wrong behaviour, for proving that the simulator catches
    /// bugs. Always `None` outside those tests.
    pub deliberate_bug: DeliberateBug,
    /// Length of one tick in milliseconds: converts lease TTLs to ticks.
    pub tick_milliseconds: u64,
    /// Ticks between the leader's checkpoints of remaining lease TTLs.
    pub lease_checkpoint_interval_ticks: u64,
    /// Ticks after which an unapplied lease revocation is proposed again.
    pub lease_revoke_retry_ticks: u64,
    /// Expired leases revoked per tick, so a mass expiry does not flood the log
    /// (etcd limits revocations per second the same way).
    pub lease_revokes_per_tick_max: usize,
    /// Leases per checkpoint entry.
    pub lease_checkpoints_per_entry_max: usize,
    /// Automatic compaction, decided by the leader.
    pub auto_compaction: AutoCompactionPolicy,
    /// Fault injection for tests of the corruption check: this member stores
    /// a wrong value whenever it applies a put of this key, as silent data
    /// corruption would. `None` outside those tests.
    pub corrupt_values_of_key: Option<Vec<u8>>,
    /// Space quota of the key space in bytes (etcd's `--quota-backend-bytes`):
    /// past it the NOSPACE alarm is raised and writes that add data are refused.
    pub quota_bytes: u64,
}

/// How the leader compacts old revisions by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoCompactionPolicy {
    /// Never.
    #[default]
    Off,
    /// Keep this many ticks of history (etcd's periodic mode).
    KeepTicks(u64),
    /// Keep this many revisions (etcd's revision mode).
    KeepRevisions(u64),
}

/// Revisions remembered for periodic compaction: one every tenth of the
/// retention, so compaction lags the retention by at most a tenth.
const AUTO_COMPACTION_SAMPLES_MAX: usize = 11;

/// Deliberately wrong behaviours the simulator must detect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeliberateBug {
    /// Correct behaviour.
    #[default]
    None,
    /// Answer linearizable reads from local state without a ReadIndex round,
    /// so a deposed leader or a lagging follower can return stale data.
    ReadsWithoutReadIndex,
    /// Count lease time twice as fast: the leader expires a lease at half its
    /// TTL after its last keep-alive, so its keys vanish early.
    LeaseExpiresAtHalfTtl,
}

impl NodeConfig {
    /// Ticks in one second of lease time.
    pub fn ticks_per_second(&self) -> u64 {
        (1000 / self.tick_milliseconds.max(1)).max(1)
    }

    /// The shortest TTL a lease is granted, in seconds: one and a half election
    /// timeouts, rounded up, as etcd's `minLeaseTTL`, so that a lease can
    /// survive a leader election.
    pub fn lease_ttl_seconds_min(&self) -> i64 {
        let milliseconds = (3 * self.election_ticks as u64 / 2) * self.tick_milliseconds;
        milliseconds.div_ceil(1000) as i64
    }

    /// Defaults equivalent to etcd's: 100 ms ticks, heartbeat every tick,
    /// election after 10 ticks (1 s).
    pub fn with_member_id(member_id: u64) -> Self {
        NodeConfig {
            member_id,
            election_ticks: 10,
            heartbeat_ticks: 1,
            append_message_bytes_max: 1024 * 1024,
            inflight_messages_max: 256,
            snapshot_entries_interval: 100_000,
            snapshot_catch_up_entries: 5_000,
            request_bytes_max: 1536 * 1024,
            txn_operations_max: 128,
            pending_requests_max: 10_000,
            request_timeout_ticks: 70,
            read_index_retry_ticks: 5,
            random_seed: member_id,
            boot_epoch: 0,
            deliberate_bug: DeliberateBug::None,
            tick_milliseconds: 100,
            lease_checkpoint_interval_ticks: 50,
            lease_revoke_retry_ticks: 30,
            lease_revokes_per_tick_max: 100,
            lease_checkpoints_per_entry_max: 1_000,
            quota_bytes: 2 * 1024 * 1024 * 1024,
            auto_compaction: AutoCompactionPolicy::Off,
            corrupt_values_of_key: None,
        }
    }
}

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

/// A learner is promoted only once its log is within this fraction of the
/// leader's (etcd's `readyPercent`), so promotion cannot stall the quorum.
const LEARNER_READY_FRACTION: f64 = 0.9;

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

/// A snapshot this member made of its own state machine. The shell saves it and
/// may then drop log records before `compact_index`.
#[derive(Debug)]
pub struct OwnSnapshot {
    /// The snapshot (metadata and state machine bytes).
    pub snapshot: Snapshot,
    /// Log entries before this index are no longer needed after the snapshot is durable.
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
    /// A snapshot of the state machine to save.
    pub snapshot_to_save: Option<OwnSnapshot>,
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

/// The index (and term) of the snapshot a founding member starts from.
pub const BOOTSTRAP_INDEX: u64 = 1;

/// Builds the snapshot at index 1 that a founding member starts from: no data,
/// only the initial voters and their records.
pub fn bootstrap_snapshot(members: Vec<MemberRecord>, cluster_id: u64) -> Snapshot {
    let voters = members
        .iter()
        .filter(|member| !member.is_learner)
        .map(|member| member.id)
        .collect::<Vec<_>>();
    let learners = members
        .iter()
        .filter(|member| member.is_learner)
        .map(|member| member.id)
        .collect::<Vec<_>>();
    let mut state_machine = StateMachine::new(members, cluster_id);
    state_machine.set_applied_index(BOOTSTRAP_INDEX);
    let mut snapshot = Snapshot::default();
    let metadata = snapshot.mut_metadata();
    // At index 1, term 1, not 0: a member added later starts with an empty log
    // (last index 0), so the leader cannot find index 1 in its log and must
    // send it a snapshot, which carries the membership. Entries start at 2.
    metadata.index = BOOTSTRAP_INDEX;
    metadata.term = BOOTSTRAP_INDEX;
    metadata.mut_conf_state().voters = voters;
    metadata.mut_conf_state().learners = learners;
    snapshot.data = state_machine.encode().into();
    snapshot
}

/// Answers every pending request that `should_fail` picks with `error`, in
/// request-id order, and forgets it.
fn fail_pending(
    pending: &mut BTreeMap<u64, PendingWrite>,
    replies: &mut Vec<Reply>,
    should_fail: impl Fn(&PendingWrite) -> bool,
    error: RequestError,
) {
    pending.retain(|_, write| {
        if should_fail(write) {
            replies.push(Reply {
                token: write.token,
                result: Err(error.clone()),
            });
            false
        } else {
            true
        }
    });
}

/// A batch of linearizable reads waiting for one ReadIndex answer.
#[derive(Debug)]
struct ReadBatch {
    reads: Vec<PendingRead>,
    issued_tick: u64,
}

/// A client write numbered and encoded, to be proposed at the next Ready.
#[derive(Debug)]
struct WaitingProposal {
    token: u64,
    request_id: u64,
    data: Vec<u8>,
    /// For a keep-alive's checkpoint reset: the lease and the TTL to answer with.
    keep_alive: Option<(i64, i64)>,
}

#[derive(Debug)]
struct PendingRead {
    token: u64,
    purpose: ReadPurpose,
    received_tick: u64,
}

/// What a request waits for a read index to do.
#[derive(Debug)]
enum ReadPurpose {
    /// A linearizable range read.
    Range(RangeRequest),
    /// A lease keep-alive. The leader renews a lease only after a ReadIndex
    /// round (etcd's `ensureLeadership` and `waitAppliedIndex`): the round
    /// proves it is still the leader, so no newer leader's clock has taken
    /// over, and once the read index is applied its lease table holds every
    /// revocation and checkpoint committed before, including a previous
    /// leader's. Without it, a new leader that had not yet applied its
    /// predecessor's revocation acknowledged a keep-alive for a lease that was
    /// about to vanish, and a deposed leader could acknowledge one that a newer
    /// leader would expire first (found by the simulator; see
    /// `crates/sim/tests/regression_lease_keep_alive_on_stale_state.rs`).
    KeepAlive(i64),
}

/// A keep-alive waiting for its lease's revocation to apply.
#[derive(Debug)]
struct PendingKeepAlive {
    token: u64,
    id: i64,
    received_tick: u64,
}

#[derive(Debug)]
struct PendingWrite {
    token: u64,
    proposed_tick: u64,
    /// The term in which this member proposed it.
    proposed_term: u64,
    /// For a keep-alive that had to clear a checkpoint first: the lease and
    /// TTL to answer with once the checkpoint applies.
    keep_alive: Option<(i64, i64)>,
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

/// One keel member: raft-rs's `RawNode` plus the state machine and the
/// bookkeeping of waiting clients.
pub struct Node {
    config: NodeConfig,
    raw_node: RawNode<LogStore>,
    state_machine: StateMachine,
    /// Logical time, in ticks since start.
    tick_count: u64,
    random: StdRng,
    /// The (term, role, leader) last seen, to notice when raft-rs reset its
    /// election timer and draw a new seeded timeout.
    election_timer_marker: (u64, StateRole, u64),
    next_request_sequence: u32,
    /// Writes this member proposed, by log request id, until applied or timed out.
    pending_writes: BTreeMap<u64, PendingWrite>,
    /// Client writes not yet proposed: they go to raft-rs together at the next Ready.
    proposals_waiting: Vec<WaitingProposal>,
    /// Linearizable reads not yet sent out as a ReadIndex request.
    reads_waiting: Vec<PendingRead>,
    /// ReadIndex requests in flight, by context.
    reads_in_flight: BTreeMap<u64, ReadBatch>,
    /// Reads whose read index is known, waiting for the state machine to apply it.
    reads_ready: VecDeque<(u64, Vec<PendingRead>)>,
    next_read_context: u64,
    /// Replies produced while handling events, delivered with the next output.
    replies: Vec<Reply>,
    /// raft-rs's Ready between `ready` and `advance`.
    in_progress: Option<raft::Ready>,
    /// The index of the newest snapshot of our own state machine.
    last_snapshot_index: u64,
    /// The leader's lease expiry clock.
    lessor: Lessor,
    next_lease_sequence: u32,
    /// The tick of the leader's last lease checkpoint.
    last_lease_checkpoint_tick: u64,
    /// Keep-alives of leases whose revocation was already proposed when they
    /// arrived: answered "not found" once the lease is gone, never renewed.
    keep_alives_waiting_for_revocation: Vec<PendingKeepAlive>,
    /// Membership changes this member proposed, by request id.
    pending_membership: BTreeMap<u64, PendingWrite>,
    /// The tick at which this member applied its own removal.
    removed_at_tick: Option<u64>,
    /// A MoveLeader waiting for the target to lead: (token, target, tick asked).
    pending_move_leader: Option<(u64, u64, u64)>,
    /// (tick, revision) samples for periodic auto-compaction, oldest first.
    revision_samples: VecDeque<(u64, i64)>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Node")
            .field("member_id", &self.config.member_id)
            .field("tick_count", &self.tick_count)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Starts a member from what the shell recovered from disk.
    pub fn new(
        config: NodeConfig,
        recovered: Recovered,
        logger: &slog::Logger,
    ) -> Result<Node, StartError> {
        let snapshot_index = recovered.snapshot.get_metadata().index;
        if let Some(first) = recovered.entries.first() {
            if first.index != snapshot_index + 1 {
                return Err(StartError::LogGap {
                    first_entry_index: first.index,
                    snapshot_index,
                });
            }
        }
        let state_machine = StateMachine::decode(&recovered.snapshot.data)?;
        let mut log_store = LogStore::from_snapshot(
            recovered.snapshot.get_metadata().clone(),
            recovered.snapshot.data.clone(),
        );
        log_store.append(&recovered.entries);
        if let Some(mut hard_state) = recovered.hard_state {
            // A snapshot may have been made durable just before a crash that lost
            // the hard state written after it; the snapshot proves its index committed.
            hard_state.commit = hard_state.commit.max(snapshot_index);
            hard_state.term = hard_state.term.max(recovered.snapshot.get_metadata().term);
            hard_state.commit = hard_state.commit.min(log_store.last_index());
            log_store.set_hard_state(hard_state);
        }
        let raft_config = raft::Config {
            id: config.member_id,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied: snapshot_index,
            max_size_per_msg: config.append_message_bytes_max,
            max_inflight_msgs: config.inflight_messages_max,
            check_quorum: true,
            pre_vote: true,
            // raft-rs draws the timeout from this range with an unseeded
            // generator whenever it resets its election timer; the node replaces
            // that draw with one from its seeded generator before the next tick
            // (see `jitter_election_timeout_if_reset`), so runs stay reproducible.
            min_election_tick: config.election_ticks,
            max_election_tick: 2 * config.election_ticks,
            read_only_option: ReadOnlyOption::Safe,
            ..Default::default()
        };
        raft_config.validate()?;
        let raw_node = RawNode::new(&raft_config, log_store, logger)?;
        let random = StdRng::seed_from_u64(config.random_seed);
        let mut node = Node {
            raw_node,
            state_machine,
            tick_count: 0,
            random,
            election_timer_marker: (u64::MAX, StateRole::Follower, u64::MAX),
            next_request_sequence: 0,
            pending_writes: BTreeMap::new(),
            proposals_waiting: Vec::new(),
            reads_waiting: Vec::new(),
            reads_in_flight: BTreeMap::new(),
            reads_ready: VecDeque::new(),
            next_read_context: 1,
            replies: Vec::new(),
            in_progress: None,
            last_snapshot_index: snapshot_index,
            lessor: Lessor::default(),
            next_lease_sequence: 0,
            last_lease_checkpoint_tick: 0,
            keep_alives_waiting_for_revocation: Vec::new(),
            pending_membership: BTreeMap::new(),
            removed_at_tick: None,
            pending_move_leader: None,
            revision_samples: VecDeque::new(),
            config,
        };
        node.jitter_election_timeout_if_reset();
        Ok(node)
    }

    /// Ticks in one second of lease time, as the leader's lease clock counts them.
    fn lease_ticks_per_second(&self) -> u64 {
        let ticks_per_second = self.config.ticks_per_second();
        if self.config.deliberate_bug == DeliberateBug::LeaseExpiresAtHalfTtl {
            (ticks_per_second / 2).max(1)
        } else {
            ticks_per_second
        }
    }

    /// This member's id.
    pub fn member_id(&self) -> u64 {
        self.config.member_id
    }

    /// The configuration this node runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// Handles one event. Its effects come out of the next [`Node::ready`].
    pub fn step(&mut self, event: Event) {
        match event {
            Event::Tick => self.tick(),
            Event::Message(message) => {
                // Messages from a stale or unknown peer are refused by raft-rs
                // with an error; that is the peer's problem, not ours.
                if let Err(error) = self.raw_node.step(*message) {
                    tracing::debug!(%error, "peer message refused");
                }
            }
            Event::Write { token, request } => self.propose_write(token, request),
            Event::LinearizableRead { token, request } => self.queue_read(token, request),
            Event::ChangeMembership { token, change } => self.change_membership(token, change),
            Event::MoveLeader { token, target } => self.move_leader(token, target),
            Event::LeaseKeepAlive { token, id } => self.lease_keep_alive(token, id),
            Event::LeaseTimeToLive { token, id, keys } => self.lease_time_to_live(token, id, keys),
            Event::Unreachable(peer) => self.raw_node.report_unreachable(peer),
            Event::SnapshotFailed(peer) => self
                .raw_node
                .report_snapshot(peer, raft::SnapshotStatus::Failure),
            Event::SnapshotSent(peer) => self
                .raw_node
                .report_snapshot(peer, raft::SnapshotStatus::Finish),
        }
        self.jitter_election_timeout_if_reset();
        self.follow_leadership();
    }

    fn tick(&mut self) {
        self.tick_count += 1;
        self.raw_node.tick();
        self.expire_requests();
        self.follow_leadership();
        // A member whose data the corruption check found different from the
        // majority's must not go on leading: it refuses clients, and a leader
        // serving linearizable reads from a state machine it cannot trust would
        // be worse. Hand over on every tick until some healthy voter leads
        // (raft-rs abandons a transfer that takes an election timeout).
        if self.raw_node.raft.state == StateRole::Leader
            && self.raw_node.raft.lead_transferee.is_none()
            && self.is_corrupt()
        {
            tracing::warn!("this member's data is CORRUPT: handing leadership over");
            self.hand_over_leadership();
        }
        if self.lessor.is_active() {
            self.revoke_expired_leases();
            self.checkpoint_leases();
            self.auto_compact();
        }
    }

    /// Starts the lease clock when this member becomes leader and stops it
    /// when it stops being one.
    fn follow_leadership(&mut self) {
        self.follow_move_leader();
        let is_leader = self.raw_node.raft.state == StateRole::Leader;
        if is_leader && !self.lessor.is_active() {
            let ticks_per_second = self.lease_ticks_per_second();
            self.lessor.promote(
                self.tick_count,
                self.state_machine.leases(),
                ticks_per_second,
                self.config.election_ticks as u64,
            );
            self.last_lease_checkpoint_tick = self.tick_count;
        } else if !is_leader && self.lessor.is_active() {
            self.lessor.demote();
            // Whether the revocations they wait for will commit is unknown now.
            for waiting in std::mem::take(&mut self.keep_alives_waiting_for_revocation) {
                self.refuse(waiting.token, RequestError::LeaderChanged);
            }
        }
    }

    /// Answers the keep-alives waiting for revocations that have applied: their
    /// leases are gone, which etcd answers with TTL 0.
    fn answer_keep_alives_of_revoked_leases(&mut self) {
        if self.keep_alives_waiting_for_revocation.is_empty() {
            return;
        }
        let waiting = std::mem::take(&mut self.keep_alives_waiting_for_revocation);
        for keep_alive in waiting {
            if self.state_machine.leases().contains(keep_alive.id) {
                self.keep_alives_waiting_for_revocation.push(keep_alive);
                continue;
            }
            let response = LeaseKeepAliveResponse {
                header: Some(self.header(0)),
                id: keep_alive.id,
                ttl: 0,
            };
            self.replies.push(Reply {
                token: keep_alive.token,
                result: Ok(Response::LeaseKeepAlive(response)),
            });
        }
    }

    fn revoke_expired_leases(&mut self) {
        let expired = self.lessor.take_expired(
            self.tick_count,
            self.config.lease_revoke_retry_ticks,
            self.config.lease_revokes_per_tick_max,
        );
        for id in expired {
            self.propose_internal(log_request::Request::LeaseRevoke(LeaseRevokeRequest { id }));
        }
    }

    /// Records remaining TTLs in the log every checkpoint interval, so a new
    /// leader continues from them instead of restarting every lease at its full TTL.
    fn checkpoint_leases(&mut self) {
        if self.tick_count - self.last_lease_checkpoint_tick
            < self.config.lease_checkpoint_interval_ticks
        {
            return;
        }
        self.last_lease_checkpoint_tick = self.tick_count;
        let remaining = self.lessor.remaining_seconds(
            self.tick_count,
            self.lease_ticks_per_second(),
            usize::MAX,
        );
        let leases = self.state_machine.leases();
        let changed: Vec<LeaseCheckpoint> = remaining
            .into_iter()
            .filter(|(id, seconds)| {
                leases
                    .get(*id)
                    .is_some_and(|lease| lease.remaining_ttl_seconds != *seconds)
            })
            .map(|(id, remaining_ttl)| LeaseCheckpoint { id, remaining_ttl })
            .collect();
        for chunk in changed.chunks(self.config.lease_checkpoints_per_entry_max.max(1)) {
            self.propose_internal(log_request::Request::LeaseCheckpoint(
                LeaseCheckpointRequest {
                    checkpoints: chunk.to_vec(),
                },
            ));
        }
    }

    /// Compacts history older than the retention, on the leader only, through
    /// the log like any compaction (so every member compacts at one index).
    fn auto_compact(&mut self) {
        let key_space = self.state_machine.key_space();
        let current = key_space.current_revision();
        let compacted = key_space.compact_revision();
        let target = match self.config.auto_compaction {
            AutoCompactionPolicy::Off => return,
            AutoCompactionPolicy::KeepRevisions(keep) => {
                // Checked once per election timeout: compaction is cheap but
                // need not run on every tick.
                if !self
                    .tick_count
                    .is_multiple_of(self.config.election_ticks.max(1) as u64)
                {
                    return;
                }
                current - keep as i64
            }
            AutoCompactionPolicy::KeepTicks(keep) => {
                let interval = (keep / 10).max(1);
                if !self.tick_count.is_multiple_of(interval) {
                    return;
                }
                self.revision_samples.push_back((self.tick_count, current));
                while self.revision_samples.len() > AUTO_COMPACTION_SAMPLES_MAX {
                    self.revision_samples.pop_front();
                }
                let horizon = self.tick_count.saturating_sub(keep);
                match self
                    .revision_samples
                    .iter()
                    .rev()
                    .find(|(tick, _)| *tick <= horizon)
                {
                    Some(&(_, revision)) if self.tick_count >= keep => revision,
                    _ => return,
                }
            }
        };
        if target > compacted && target > 1 {
            self.propose_internal(log_request::Request::Compaction(
                keel_types::etcdserverpb::CompactionRequest {
                    revision: target,
                    physical: false,
                },
            ));
        }
    }

    /// Proposes a write nobody waits for (lease revocations and checkpoints).
    /// If it is lost, the leader proposes it again later.
    fn propose_internal(&mut self, request: WriteRequest) {
        let log_request = LogRequest {
            request_id: 0,
            origin_member_id: self.config.member_id,
            request: Some(request),
        };
        if let Err(error) = self
            .raw_node
            .propose(Vec::new(), log_request.encode_to_vec())
        {
            tracing::debug!(%error, "internal proposal dropped");
        }
    }

    fn move_leader(&mut self, token: u64, target: u64) {
        if !self.lessor.is_active() {
            let leader_id = self.raw_node.raft.leader_id;
            return self.refuse(token, RequestError::NotLeader { leader_id });
        }
        if !self.raw_node.raft.prs().conf().voters().contains(target) {
            return self.refuse(token, RequestError::BadLeaderTransferee);
        }
        if target == self.config.member_id {
            self.replies.push(Reply {
                token,
                result: Ok(Response::LeaderMoved),
            });
            return;
        }
        if let Some((previous, _, _)) = self.pending_move_leader.take() {
            self.refuse(previous, RequestError::LeaderChanged);
        }
        self.raw_node.transfer_leader(target);
        self.pending_move_leader = Some((token, target, self.tick_count));
    }

    /// Answers a pending MoveLeader once the target leads, or after raft-rs
    /// gave up the transfer (it aborts after an election timeout).
    fn follow_move_leader(&mut self) {
        let Some((token, target, asked)) = self.pending_move_leader else {
            return;
        };
        if self.raw_node.raft.leader_id == target {
            self.pending_move_leader = None;
            self.replies.push(Reply {
                token,
                result: Ok(Response::LeaderMoved),
            });
        } else if self.tick_count - asked > 2 * self.config.election_ticks as u64 {
            self.pending_move_leader = None;
            self.refuse(token, RequestError::Timeout);
        }
    }

    /// The record of a request this member proposed and now waits for.
    fn pending(&self, token: u64, keep_alive: Option<(i64, i64)>) -> PendingWrite {
        PendingWrite {
            token,
            proposed_tick: self.tick_count,
            proposed_term: self.raw_node.raft.term,
            keep_alive,
        }
    }

    fn next_request_id(&mut self) -> u64 {
        self.next_request_sequence = self.next_request_sequence.wrapping_add(1);
        (u64::from(self.config.boot_epoch) << 32) | u64::from(self.next_request_sequence)
    }

    fn change_membership(&mut self, token: u64, change: MembershipChange) {
        use raft::eraftpb::{ConfChangeSingle, ConfChangeType};
        if self.raw_node.raft.leader_id == raft::INVALID_ID {
            return self.refuse(token, RequestError::NoLeader);
        }
        let members = self.state_machine.members().to_vec();
        let find = |id: u64| members.iter().find(|member| member.id == id).cloned();
        let (change_type, member) = match change {
            MembershipChange::Add {
                peer_urls,
                is_learner,
            } => {
                if members
                    .iter()
                    .any(|member| member.peer_urls.iter().any(|url| peer_urls.contains(url)))
                {
                    return self.refuse(token, RequestError::PeerUrlExists);
                }
                let id = self.next_member_id(&peer_urls, &members);
                let member = MemberRecord {
                    id,
                    name: String::new(),
                    peer_urls,
                    client_urls: Vec::new(),
                    is_learner,
                };
                let change_type = if is_learner {
                    ConfChangeType::AddLearnerNode
                } else {
                    ConfChangeType::AddNode
                };
                (change_type, member)
            }
            MembershipChange::Remove { member_id } => {
                let Some(member) = find(member_id) else {
                    return self.refuse(token, RequestError::MemberNotFound);
                };
                (ConfChangeType::RemoveNode, member)
            }
            MembershipChange::Promote { member_id } => {
                let Some(mut member) = find(member_id) else {
                    return self.refuse(token, RequestError::MemberNotFound);
                };
                if !member.is_learner {
                    return self.refuse(token, RequestError::MemberNotLearner);
                }
                if !self.lessor.is_active() {
                    let leader_id = self.raw_node.raft.leader_id;
                    return self.refuse(token, RequestError::NotLeader { leader_id });
                }
                let raft = &self.raw_node.raft;
                let leader_match = raft
                    .prs()
                    .get(self.config.member_id)
                    .map_or(0, |progress| progress.matched);
                let learner_match = raft
                    .prs()
                    .get(member_id)
                    .map_or(0, |progress| progress.matched);
                if (learner_match as f64) < (leader_match as f64) * LEARNER_READY_FRACTION {
                    return self.refuse(token, RequestError::LearnerNotReady);
                }
                member.is_learner = false;
                (ConfChangeType::AddNode, member)
            }
            MembershipChange::Update {
                member_id,
                peer_urls,
            } => {
                let Some(mut member) = find(member_id) else {
                    return self.refuse(token, RequestError::MemberNotFound);
                };
                if members.iter().any(|other| {
                    other.id != member_id
                        && other.peer_urls.iter().any(|url| peer_urls.contains(url))
                }) {
                    return self.refuse(token, RequestError::PeerUrlExists);
                }
                member.peer_urls = peer_urls;
                // Peer URLs are metadata, not configuration: a normal entry.
                return self.propose_write(token, log_request::Request::MemberPeerUrls(member));
            }
        };
        let request_id = self.next_request_id();
        let context = keel_types::keelpb::ConfChangeContext {
            request_id,
            origin_member_id: self.config.member_id,
            member: Some(member.clone()),
        };
        let mut single = ConfChangeSingle::default();
        single.set_change_type(change_type);
        single.node_id = member.id;
        let mut conf_change = ConfChangeV2::default();
        conf_change.set_changes(vec![single].into());
        conf_change.context = context.encode_to_vec().into();
        match self.raw_node.propose_conf_change(Vec::new(), conf_change) {
            Ok(()) => {
                self.pending_membership
                    .insert(request_id, self.pending(token, None));
            }
            // raft-rs allows one configuration change in flight at a time.
            Err(_) => self.refuse(token, RequestError::MembershipChangeInProgress),
        }
    }

    /// A member id for a new member: a hash of its peer URLs, the cluster and
    /// this member's request counter, so adding the same URLs again after a
    /// removal gives a new id (a removed id must never come back).
    fn next_member_id(&mut self, peer_urls: &[String], members: &[MemberRecord]) -> u64 {
        loop {
            let salt = self.next_request_id();
            let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ self.state_machine.cluster_id();
            for byte in peer_urls
                .iter()
                .flat_map(|url| url.bytes())
                .chain(salt.to_le_bytes())
                .chain(self.config.member_id.to_le_bytes())
            {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            }
            if hash != 0 && !members.iter().any(|member| member.id == hash) {
                return hash;
            }
        }
    }

    /// True once this member has applied its own removal and, if it was the
    /// leader, has handed leadership over (or waited an election timeout):
    /// the shell then stops it.
    pub fn is_removed_and_done(&self) -> bool {
        match self.removed_at_tick {
            None => false,
            Some(removed_at) => {
                self.raw_node.raft.state != StateRole::Leader
                    || self.tick_count - removed_at >= self.config.election_ticks as u64
            }
        }
    }

    /// A keep-alive reaching the leader waits for a ReadIndex round (see
    /// [`ReadPurpose::KeepAlive`]), then [`Node::renew_lease`] answers it.
    fn lease_keep_alive(&mut self, token: u64, id: i64) {
        if !self.lessor.is_active() {
            let leader_id = self.raw_node.raft.leader_id;
            return self.refuse(token, RequestError::NotLeader { leader_id });
        }
        if self.pending_request_count() >= self.config.pending_requests_max {
            return self.refuse(token, RequestError::TooManyRequests);
        }
        self.reads_waiting.push(PendingRead {
            token,
            purpose: ReadPurpose::KeepAlive(id),
            received_tick: self.tick_count,
        });
    }

    /// Renews a lease for a keep-alive whose read index has applied.
    fn renew_lease(&mut self, token: u64, id: i64) {
        if !self.lessor.is_active() {
            let leader_id = self.raw_node.raft.leader_id;
            return self.refuse(token, RequestError::NotLeader { leader_id });
        }
        let Some(lease) = self.state_machine.leases().get(id) else {
            // etcd answers a keep-alive for an unknown lease with TTL 0.
            let response = LeaseKeepAliveResponse {
                header: Some(self.header(0)),
                id,
                ttl: 0,
            };
            self.replies.push(Reply {
                token,
                result: Ok(Response::LeaseKeepAlive(response)),
            });
            return;
        };
        if self.lessor.is_revoking(id) {
            // The lease expired on this clock and its revocation is in the log:
            // renewing it now would acknowledge a lease that is about to vanish.
            // As etcd's lessor does, wait for the revocation and answer "not found".
            if self.pending_request_count() >= self.config.pending_requests_max {
                return self.refuse(token, RequestError::TooManyRequests);
            }
            self.keep_alives_waiting_for_revocation
                .push(PendingKeepAlive {
                    token,
                    id,
                    received_tick: self.tick_count,
                });
            return;
        }
        let ttl_seconds = lease.ttl_seconds;
        let checkpointed = lease.remaining_ttl_seconds != 0;
        self.lessor.refresh(
            id,
            self.tick_count,
            ttl_seconds,
            self.lease_ticks_per_second(),
        );
        if !checkpointed {
            let response = LeaseKeepAliveResponse {
                header: Some(self.header(0)),
                id,
                ttl: ttl_seconds,
            };
            self.replies.push(Reply {
                token,
                result: Ok(Response::LeaseKeepAlive(response)),
            });
            return;
        }
        // A checkpoint says less than the full TTL remains: a new leader would
        // start from it. Clear it through the log before acknowledging, so an
        // acknowledged keep-alive always buys the full TTL.
        if self.pending_request_count() >= self.config.pending_requests_max {
            return self.refuse(token, RequestError::TooManyRequests);
        }
        let request_id = self.next_request_id();
        let log_request = LogRequest {
            request_id,
            origin_member_id: self.config.member_id,
            request: Some(log_request::Request::LeaseCheckpoint(
                LeaseCheckpointRequest {
                    checkpoints: vec![LeaseCheckpoint {
                        id,
                        remaining_ttl: 0,
                    }],
                },
            )),
        };
        // Queued, not proposed: this runs while reads are served, which can be
        // between taking a Ready and advancing it, when raft-rs must not be
        // given new entries (it panicked at advance under `compare.sh`'s lease
        // workload).
        self.proposals_waiting.push(WaitingProposal {
            token,
            request_id,
            data: log_request.encode_to_vec(),
            keep_alive: Some((id, ttl_seconds)),
        });
    }

    fn lease_time_to_live(&mut self, token: u64, id: i64, keys: bool) {
        if !self.lessor.is_active() {
            let leader_id = self.raw_node.raft.leader_id;
            return self.refuse(token, RequestError::NotLeader { leader_id });
        }
        let header = Some(self.header(0));
        let response = match self.state_machine.leases().get(id) {
            // etcd reports an unknown (expired or revoked) lease with TTL -1.
            None => LeaseTimeToLiveResponse {
                header,
                id,
                ttl: -1,
                ..Default::default()
            },
            Some(lease) => {
                let remaining_ticks = self
                    .lessor
                    .remaining_ticks(id, self.tick_count)
                    .unwrap_or(0);
                LeaseTimeToLiveResponse {
                    header,
                    id,
                    ttl: (remaining_ticks / self.lease_ticks_per_second()) as i64,
                    granted_ttl: lease.ttl_seconds,
                    keys: if keys {
                        lease.keys.iter().cloned().collect()
                    } else {
                        Vec::new()
                    },
                }
            }
        };
        self.replies.push(Reply {
            token,
            result: Ok(Response::LeaseTimeToLive(response)),
        });
    }

    /// Each time raft-rs resets its election timer (on every change of term,
    /// role or leader) draw a new timeout in `[election, 2 * election)` from our
    /// seeded generator: randomized timeouts are what make split votes rare (§5.2).
    fn jitter_election_timeout_if_reset(&mut self) {
        let raft = &self.raw_node.raft;
        let marker = (raft.term, raft.state, raft.leader_id);
        if marker != self.election_timer_marker {
            if marker.0 != self.election_timer_marker.0 {
                self.fail_writes_of_older_terms();
            }
            self.election_timer_marker = marker;
            let base = self.config.election_ticks;
            let timeout = base + self.random.gen_range(0..base);
            self.raw_node.raft.set_randomized_election_timeout(timeout);
        }
    }

    /// When the term changes, a write proposed in an older term may have been
    /// lost with the old leader, or may still commit under the new one: its
    /// outcome is unknown. Answering "leader changed" at once, as etcd does,
    /// lets the client retry in about an election timeout instead of waiting
    /// for the request timeout.
    fn fail_writes_of_older_terms(&mut self) {
        let term = self.raw_node.raft.term;
        let is_stale = |pending: &PendingWrite| pending.proposed_term < term;
        fail_pending(
            &mut self.pending_membership,
            &mut self.replies,
            is_stale,
            RequestError::LeaderChanged,
        );
        fail_pending(
            &mut self.pending_writes,
            &mut self.replies,
            is_stale,
            RequestError::LeaderChanged,
        );
    }

    fn expire_requests(&mut self) {
        let now = self.tick_count;
        let timeout = self.config.request_timeout_ticks;
        let is_expired = |pending: &PendingWrite| now - pending.proposed_tick >= timeout;
        fail_pending(
            &mut self.pending_writes,
            &mut self.replies,
            is_expired,
            RequestError::Timeout,
        );
        fail_pending(
            &mut self.pending_membership,
            &mut self.replies,
            is_expired,
            RequestError::Timeout,
        );
        let (expired, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.keep_alives_waiting_for_revocation)
                .into_iter()
                .partition(|keep_alive| now - keep_alive.received_tick >= timeout);
        self.keep_alives_waiting_for_revocation = waiting;
        for keep_alive in expired {
            self.replies.push(Reply {
                token: keep_alive.token,
                result: Err(RequestError::Timeout),
            });
        }
        // ReadIndex requests that got no answer are issued again; reads waiting
        // too long in total fail.
        let retry = self.config.read_index_retry_ticks;
        let stale_contexts: Vec<u64> = self
            .reads_in_flight
            .iter()
            .filter(|(_, batch)| now - batch.issued_tick >= retry)
            .map(|(&context, _)| context)
            .collect();
        for context in stale_contexts {
            let batch = self.reads_in_flight.remove(&context).expect("listed above");
            self.reads_waiting.extend(batch.reads);
        }
        let mut kept = Vec::with_capacity(self.reads_waiting.len());
        for read in self.reads_waiting.drain(..) {
            if now - read.received_tick >= timeout {
                self.replies.push(Reply {
                    token: read.token,
                    result: Err(RequestError::Timeout),
                });
            } else {
                kept.push(read);
            }
        }
        self.reads_waiting = kept;
    }

    fn pending_request_count(&self) -> usize {
        self.pending_writes.len()
            + self.proposals_waiting.len()
            + self.keep_alives_waiting_for_revocation.len()
            + self.reads_waiting.len()
            + self
                .reads_in_flight
                .values()
                .map(|batch| batch.reads.len())
                .sum::<usize>()
            + self
                .reads_ready
                .iter()
                .map(|(_, reads)| reads.len())
                .sum::<usize>()
    }

    fn refuse(&mut self, token: u64, error: RequestError) {
        self.replies.push(Reply {
            token,
            result: Err(error),
        });
    }

    fn propose_write(&mut self, token: u64, mut request: WriteRequest) {
        if let log_request::Request::LeaseGrant(grant) = &mut request {
            if grant.ttl > LEASE_TTL_SECONDS_MAX {
                return self.refuse(token, RequestError::LeaseTtlTooLarge);
            }
            // Decided here, before the log, so that members with different
            // election settings still apply the same grant identically.
            grant.ttl = grant.ttl.max(self.config.lease_ttl_seconds_min());
            if grant.id == 0 {
                grant.id = self.next_lease_id();
            }
        }
        if self.pending_request_count() >= self.config.pending_requests_max {
            return self.refuse(token, RequestError::TooManyRequests);
        }
        // Stateless checks before the request enters the log, as etcd's gRPC
        // layer does: a bad request costs no consensus round.
        let validation = match &request {
            log_request::Request::Put(put) => mvcc::validate_put(put),
            log_request::Request::DeleteRange(delete) => mvcc::validate_delete_range(delete),
            log_request::Request::Txn(txn) => {
                mvcc::validate_txn(txn, self.config.txn_operations_max)
            }
            log_request::Request::Compaction(_)
            | log_request::Request::MemberAttributes(_)
            | log_request::Request::LeaseGrant(_)
            | log_request::Request::LeaseRevoke(_)
            | log_request::Request::LeaseCheckpoint(_)
            | log_request::Request::MemberPeerUrls(_)
            | log_request::Request::Alarm(_) => Ok(()),
        };
        if let Err(error) = validation {
            return self.refuse(token, RequestError::KeySpace(error));
        }
        if crate::state_machine::adds_data(&request) {
            if self.state_machine.has_no_space_alarm() {
                return self.refuse(token, RequestError::NoSpace);
            }
            // As etcd's quota check: a write that would take the key space
            // past the quota raises NOSPACE (through the log, so every member
            // learns it) and is refused.
            let request_bytes = request.encoded_len() as u64;
            if self.state_machine.approximate_bytes() + request_bytes > self.config.quota_bytes {
                self.propose_internal(log_request::Request::Alarm(
                    keel_types::etcdserverpb::AlarmRequest {
                        action: keel_types::etcdserverpb::alarm_request::AlarmAction::Activate
                            as i32,
                        member_id: self.config.member_id,
                        alarm: keel_types::etcdserverpb::AlarmType::Nospace as i32,
                    },
                ));
                return self.refuse(token, RequestError::NoSpace);
            }
        }
        if self.raw_node.raft.leader_id == raft::INVALID_ID {
            return self.refuse(token, RequestError::NoLeader);
        }
        let request_id = self.next_request_id();
        let log_request = LogRequest {
            request_id,
            origin_member_id: self.config.member_id,
            request: Some(request),
        };
        let data = log_request.encode_to_vec();
        if data.len() > self.config.request_bytes_max {
            return self.refuse(token, RequestError::RequestTooLarge);
        }
        self.proposals_waiting.push(WaitingProposal {
            token,
            request_id,
            data,
            keep_alive: None,
        });
    }

    /// Proposes every write that arrived since the last Ready as one MsgPropose:
    /// raft-rs appends them together and broadcasts one MsgAppend per follower,
    /// where proposing them one by one costs one MsgAppend (and one response)
    /// per write per follower. A follower's raft-rs forwards the batch to the
    /// leader; whichever member applies a write, only this one answers it, by
    /// matching the request id.
    fn propose_waiting_writes(&mut self) {
        if self.proposals_waiting.is_empty() {
            return;
        }
        let mut proposals = std::mem::take(&mut self.proposals_waiting);
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgPropose);
        message.from = self.config.member_id;
        message.set_entries(
            proposals
                .iter_mut()
                .map(|proposal| Entry {
                    data: std::mem::take(&mut proposal.data).into(),
                    ..Default::default()
                })
                .collect::<Vec<_>>()
                .into(),
        );
        match self.raw_node.step(message) {
            Ok(()) => {
                for proposal in proposals {
                    let pending = self.pending(proposal.token, proposal.keep_alive);
                    self.pending_writes.insert(proposal.request_id, pending);
                }
            }
            Err(raft::Error::ProposalDropped) => {
                for proposal in proposals {
                    self.refuse(proposal.token, RequestError::Dropped);
                }
            }
            Err(error) => panic!("raft-rs failed a proposal in an unexpected way: {error}"),
        }
    }

    /// A lease id no other member or boot of this member generates: the low
    /// bits of the member id, the boot epoch and a counter, kept positive.
    fn next_lease_id(&mut self) -> i64 {
        self.next_lease_sequence = self.next_lease_sequence.wrapping_add(1) & 0x7fff_ffff;
        let member = self.config.member_id & 0xffff;
        let epoch = u64::from(self.config.boot_epoch) & 0xffff;
        let id = (member << 47) | (epoch << 31) | u64::from(self.next_lease_sequence);
        (id as i64).max(1)
    }

    fn queue_read(&mut self, token: u64, request: RangeRequest) {
        if self.pending_request_count() >= self.config.pending_requests_max {
            return self.refuse(token, RequestError::TooManyRequests);
        }
        if let Err(error) = mvcc::validate_range(&request) {
            return self.refuse(token, RequestError::KeySpace(error));
        }
        if self.config.deliberate_bug == DeliberateBug::ReadsWithoutReadIndex {
            let result = self
                .range_local(&request)
                .map(Response::Range)
                .map_err(RequestError::KeySpace);
            self.replies.push(Reply { token, result });
            return;
        }
        if self.raw_node.raft.leader_id == raft::INVALID_ID {
            return self.refuse(token, RequestError::NoLeader);
        }
        self.reads_waiting.push(PendingRead {
            token,
            purpose: ReadPurpose::Range(request),
            received_tick: self.tick_count,
        });
    }

    /// Sends all waiting reads as one ReadIndex request: one heartbeat round
    /// confirms leadership for the whole batch.
    fn issue_read_index(&mut self) {
        if self.reads_waiting.is_empty() || self.raw_node.raft.leader_id == raft::INVALID_ID {
            return;
        }
        let context = self.next_read_context;
        self.next_read_context += 1;
        let reads = std::mem::take(&mut self.reads_waiting);
        self.reads_in_flight.insert(
            context,
            ReadBatch {
                reads,
                issued_tick: self.tick_count,
            },
        );
        self.raw_node.read_index(context.to_be_bytes().to_vec());
    }

    /// True when [`Node::ready`] has work.
    pub fn has_ready(&self) -> bool {
        !self.replies.is_empty()
            || !self.proposals_waiting.is_empty()
            || (!self.reads_waiting.is_empty() && self.raw_node.raft.leader_id != raft::INVALID_ID)
            || self.raw_node.has_ready()
    }

    /// Takes the work accumulated since the last call. Call [`Node::advance`]
    /// after carrying it out, before the next `ready`.
    pub fn ready(&mut self) -> Output {
        assert!(
            self.in_progress.is_none(),
            "ready called again before advance"
        );
        self.propose_waiting_writes();
        self.issue_read_index();
        let mut output = Output::default();
        if !self.raw_node.has_ready() {
            output.replies = std::mem::take(&mut self.replies);
            return output;
        }
        let mut ready = self.raw_node.ready();
        let last_index_in_ready = self.raw_node.raft.raft_log.last_index();
        output.messages = ready.take_messages();
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.install_snapshot(&snapshot);
            output.persist.snapshot = Some(snapshot);
        }
        self.apply_committed(ready.take_committed_entries());
        self.record_read_states(ready.take_read_states());
        let entries = ready.take_entries();
        self.raw_node.mut_store().append(&entries);
        output.persist.entries = entries;
        if let Some(hard_state) = ready.hs() {
            self.raw_node.mut_store().set_hard_state(hard_state.clone());
            output.persist.hard_state = Some(hard_state.clone());
        }
        output.persist.must_sync = ready.must_sync();
        output.messages_after_persist = ready.take_persisted_messages();
        self.in_progress = Some(ready);
        self.serve_ready_reads();
        assert_eq!(
            self.raw_node.raft.raft_log.last_index(),
            last_index_in_ready,
            "nothing may be appended between taking a Ready and advancing it"
        );
        output.replies = std::mem::take(&mut self.replies);
        output
    }

    /// Tells the node that the last [`Node::ready`]'s output was carried out
    /// (its `persist` is durable), and returns the follow-up work.
    pub fn advance(&mut self) -> Output {
        let mut output = Output::default();
        if let Some(ready) = self.in_progress.take() {
            let mut light_ready = self.raw_node.advance(ready);
            if let Some(commit) = light_ready.commit_index() {
                self.raw_node.mut_store().set_commit(commit);
            }
            output.messages = light_ready.take_messages();
            self.apply_committed(light_ready.take_committed_entries());
            self.raw_node.advance_apply();
        }
        self.serve_ready_reads();
        output.snapshot_to_save = self.maybe_snapshot();
        output.replies = std::mem::take(&mut self.replies);
        self.jitter_election_timeout_if_reset();
        self.follow_leadership();
        output
    }

    fn install_snapshot(&mut self, snapshot: &Snapshot) {
        let state_machine = match StateMachine::decode(&snapshot.data) {
            Ok(state_machine) => state_machine,
            // The leader's snapshot bytes passed its own checksums; if they do
            // not decode here the member cannot continue safely.
            Err(error) => panic!("snapshot from leader does not decode: {error}"),
        };
        self.state_machine = state_machine;
        self.state_machine
            .set_applied_index(snapshot.get_metadata().index);
        self.raw_node.mut_store().apply_snapshot(snapshot);
        self.last_snapshot_index = snapshot.get_metadata().index;
    }

    fn apply_committed(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            if entry.index <= self.state_machine.applied_index() {
                // Already reflected in the snapshot we started from.
                continue;
            }
            assert_eq!(
                entry.index,
                self.state_machine.applied_index() + 1,
                "committed entries must be applied in order without gaps (§5.3)"
            );
            match entry.get_entry_type() {
                EntryType::EntryNormal => self.apply_normal(&entry),
                EntryType::EntryConfChange => {
                    let change = <ConfChange as protobuf::Message>::parse_from_bytes(&entry.data)
                        .expect("committed configuration change decodes");
                    let conf_state = self
                        .raw_node
                        .apply_conf_change(&change)
                        .expect("a committed configuration change applies");
                    self.record_conf_change(entry.index, conf_state, &change.context);
                }
                EntryType::EntryConfChangeV2 => {
                    let change = <ConfChangeV2 as protobuf::Message>::parse_from_bytes(&entry.data)
                        .expect("committed configuration change decodes");
                    let conf_state = self
                        .raw_node
                        .apply_conf_change(&change)
                        .expect("a committed configuration change applies");
                    self.record_conf_change(entry.index, conf_state, &change.context);
                }
            }
        }
        self.answer_keep_alives_of_revoked_leases();
    }

    fn apply_normal(&mut self, entry: &Entry) {
        if entry.data.is_empty() {
            // A new leader's empty entry (§8): it commits the leader's term, nothing to apply.
            self.state_machine.set_applied_index(entry.index);
            return;
        }
        let log_request = LogRequest::decode(entry.data.as_ref())
            .expect("committed log request decodes: it was encoded by a keel member");
        let Some(request) = log_request.request else {
            self.state_machine.set_applied_index(entry.index);
            return;
        };
        if !self
            .state_machine
            .first_application(log_request.origin_member_id, log_request.request_id)
        {
            // The same proposal appended twice: the first copy was applied (and
            // answered); applying it again could undo a later write.
            self.state_machine.set_applied_index(entry.index);
            return;
        }
        let request = self.inject_corruption(request);
        let result = self.state_machine.apply_write(entry.index, &request);
        if result.is_ok() && self.lessor.is_active() {
            self.follow_lease_changes(&request);
        }
        if log_request.origin_member_id == self.config.member_id && log_request.request_id != 0 {
            if let Some(write) = self.pending_writes.remove(&log_request.request_id) {
                let result = match write.keep_alive {
                    Some((id, ttl)) => result.map(|_| {
                        Response::LeaseKeepAlive(LeaseKeepAliveResponse {
                            header: Some(self.header(0)),
                            id,
                            ttl,
                        })
                    }),
                    None => {
                        result.map(|response| Response::Write(self.with_header_write(response)))
                    }
                }
                .map_err(RequestError::from);
                self.replies.push(Reply {
                    token: write.token,
                    result,
                });
            }
        }
    }

    /// Applies the configured fault: a wrong value for one key on this member only.
    fn inject_corruption(&self, request: WriteRequest) -> WriteRequest {
        match (&self.config.corrupt_values_of_key, request) {
            (Some(key), log_request::Request::Put(mut put)) if &put.key == key => {
                put.value = b"corrupted by fault injection".to_vec();
                log_request::Request::Put(put)
            }
            (_, request) => request,
        }
    }

    /// True when some member raised the CORRUPT alarm naming this member: it
    /// then refuses to serve clients, its data is not to be trusted.
    pub fn is_corrupt(&self) -> bool {
        self.is_named_corrupt(self.config.member_id)
    }

    /// True when a CORRUPT alarm names `member_id`.
    fn is_named_corrupt(&self, member_id: u64) -> bool {
        self.state_machine.alarms().iter().any(|alarm| {
            alarm.member_id == member_id
                && alarm.alarm == keel_types::etcdserverpb::AlarmType::Corrupt as i32
        })
    }

    /// Keeps the leader's lease clock in step with applied lease changes.
    fn follow_lease_changes(&mut self, request: &WriteRequest) {
        let ticks_per_second = self.lease_ticks_per_second();
        match request {
            log_request::Request::LeaseGrant(grant) => {
                self.lessor
                    .refresh(grant.id, self.tick_count, grant.ttl, ticks_per_second);
            }
            log_request::Request::LeaseRevoke(revoke) => self.lessor.forget(revoke.id),
            log_request::Request::LeaseCheckpoint(checkpoint) => {
                for entry in &checkpoint.checkpoints {
                    // A cleared checkpoint is a keep-alive: the full TTL from now.
                    if entry.remaining_ttl == 0 {
                        if let Some(lease) = self.state_machine.leases().get(entry.id) {
                            let ttl = lease.ttl_seconds;
                            self.lessor
                                .refresh(entry.id, self.tick_count, ttl, ticks_per_second);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Records the configuration in force after a configuration change and the
    /// member record carried in its context, and answers the proposing client.
    fn record_conf_change(
        &mut self,
        index: u64,
        conf_state: raft::eraftpb::ConfState,
        context: &[u8],
    ) {
        self.raw_node.mut_store().set_conf_state(conf_state.clone());
        let context = keel_types::keelpb::ConfChangeContext::decode(context).unwrap_or_default();
        let is_member =
            |id: u64| conf_state.voters.contains(&id) || conf_state.learners.contains(&id);
        if let Some(mut member) = context.member.clone() {
            if is_member(member.id) {
                // Keep what the member announced about itself (name, client URLs).
                if let Some(known) = self
                    .state_machine
                    .members()
                    .iter()
                    .find(|known| known.id == member.id)
                {
                    member.name = known.name.clone();
                    member.client_urls = known.client_urls.clone();
                }
                member.is_learner = conf_state.learners.contains(&member.id);
                self.state_machine.upsert_member(member);
            }
        }
        let removed: Vec<u64> = self
            .state_machine
            .members()
            .iter()
            .map(|member| member.id)
            .filter(|&id| !is_member(id))
            .collect();
        for id in removed {
            self.state_machine.remove_member(id);
        }
        self.state_machine.set_applied_index(index);
        if !is_member(self.config.member_id) && self.removed_at_tick.is_none() {
            self.removed_at_tick = Some(self.tick_count);
            self.hand_over_leadership();
        }
        if context.origin_member_id == self.config.member_id {
            if let Some(pending) = self.pending_membership.remove(&context.request_id) {
                let member = context.member.unwrap_or_default();
                let member = self
                    .state_machine
                    .members()
                    .iter()
                    .find(|known| known.id == member.id)
                    .cloned()
                    .unwrap_or(member);
                self.replies.push(Reply {
                    token: pending.token,
                    result: Ok(Response::Membership {
                        member,
                        members: self.state_machine.members().to_vec(),
                    }),
                });
            }
        }
    }

    /// A removed (or corrupt) leader transfers leadership to the most
    /// up-to-date voter whose data is not known to be corrupt, so the cluster
    /// does not wait an election timeout for a new leader.
    fn hand_over_leadership(&mut self) {
        if self.raw_node.raft.state != StateRole::Leader {
            return;
        }
        let own_id = self.config.member_id;
        let transferee = self
            .raw_node
            .raft
            .prs()
            .iter()
            .filter(|(&id, _)| id != own_id && !self.is_named_corrupt(id))
            .filter(|(&id, _)| self.raw_node.raft.prs().conf().voters().contains(id))
            .max_by_key(|(_, progress)| progress.matched)
            .map(|(&id, _)| id);
        if let Some(transferee) = transferee {
            self.raw_node.transfer_leader(transferee);
        }
    }

    fn record_read_states(&mut self, read_states: Vec<raft::ReadState>) {
        for read_state in read_states {
            let Ok(context_bytes) = <[u8; 8]>::try_from(read_state.request_ctx.as_slice()) else {
                continue;
            };
            let context = u64::from_be_bytes(context_bytes);
            if let Some(batch) = self.reads_in_flight.remove(&context) {
                self.reads_ready.push_back((read_state.index, batch.reads));
            }
        }
    }

    /// Serves every read whose read index has been applied (§6.4: the state
    /// machine has then caught up with everything committed before the read).
    fn serve_ready_reads(&mut self) {
        let applied = self.state_machine.applied_index();
        let mut still_waiting = VecDeque::new();
        while let Some((read_index, reads)) = self.reads_ready.pop_front() {
            if read_index > applied {
                still_waiting.push_back((read_index, reads));
                continue;
            }
            for read in reads {
                let request = match read.purpose {
                    ReadPurpose::Range(request) => request,
                    ReadPurpose::KeepAlive(id) => {
                        self.renew_lease(read.token, id);
                        continue;
                    }
                };
                let result = self
                    .range_local(&request)
                    .map(Response::Range)
                    .map_err(RequestError::KeySpace);
                self.replies.push(Reply {
                    token: read.token,
                    result,
                });
            }
        }
        self.reads_ready = still_waiting;
    }

    /// Answers a read from this member's state machine as it is now: a
    /// serializable read, possibly stale, never reordered.
    pub fn range_local(&self, request: &RangeRequest) -> Result<RangeResponse, KeySpaceError> {
        let mut response = self.state_machine.range(request)?;
        response.header = Some(self.header(response.header.as_ref().map_or(0, |h| h.revision)));
        Ok(response)
    }

    /// The response header etcd clients expect.
    pub fn header(&self, revision: i64) -> ResponseHeader {
        let revision = if revision == 0 {
            self.state_machine.key_space().current_revision()
        } else {
            revision
        };
        ResponseHeader {
            cluster_id: self.state_machine.cluster_id(),
            member_id: self.config.member_id,
            revision,
            raft_term: self.raw_node.raft.term,
        }
    }

    fn with_header_write(&self, response: WriteResponse) -> WriteResponse {
        fn fill(header: &mut Option<ResponseHeader>, node: &Node) {
            let revision = header.as_ref().map_or(0, |h| h.revision);
            *header = Some(node.header(revision));
        }
        let mut response = response;
        match &mut response {
            WriteResponse::Put(put) => fill(&mut put.header, self),
            WriteResponse::DeleteRange(delete) => fill(&mut delete.header, self),
            WriteResponse::Txn(txn) => fill(&mut txn.header, self),
            WriteResponse::Compaction(compaction) => fill(&mut compaction.header, self),
            WriteResponse::MemberAttributes => {}
            WriteResponse::LeaseGrant(grant) => fill(&mut grant.header, self),
            WriteResponse::LeaseRevoke(revoke) => fill(&mut revoke.header, self),
            WriteResponse::LeaseCheckpoint(checkpoint) => fill(&mut checkpoint.header, self),
            WriteResponse::Alarm(alarm) => fill(&mut alarm.header, self),
        }
        response
    }

    /// Makes a snapshot of the state machine every `snapshot_entries_interval`
    /// applied entries, and compacts the in-memory log behind it.
    fn maybe_snapshot(&mut self) -> Option<OwnSnapshot> {
        let applied = self.state_machine.applied_index();
        let wanted =
            self.raw_node.store().take_snapshot_wanted() && applied > self.last_snapshot_index;
        if !wanted && applied < self.last_snapshot_index + self.config.snapshot_entries_interval {
            return None;
        }
        let term = raft::Storage::term(self.raw_node.store(), applied)
            .expect("the applied entry is still in the log");
        let mut metadata = SnapshotMetadata {
            index: applied,
            term,
            ..Default::default()
        };
        metadata.set_conf_state(self.raw_node.raft.prs().conf().to_conf_state());
        // The previous image is replaced below; letting go of it first means a member
        // never holds two images of a large state machine at once (a transfer still
        // in flight keeps its own reference until it ends).
        self.raw_node.mut_store().release_snapshot_image();
        let data = bytes::Bytes::from(self.state_machine.encode());
        let compact_index = applied
            .saturating_sub(self.config.snapshot_catch_up_entries)
            .max(self.raw_node.store().first_index());
        self.raw_node.mut_store().install_own_snapshot(
            metadata.clone(),
            data.clone(),
            compact_index,
        );
        self.last_snapshot_index = applied;
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(metadata);
        snapshot.data = data;
        Some(OwnSnapshot {
            snapshot,
            compact_index,
        })
    }

    /// The member's status.
    pub fn status(&self) -> NodeStatus {
        let raft = &self.raw_node.raft;
        let key_space = self.state_machine.key_space();
        NodeStatus {
            member_id: self.config.member_id,
            cluster_id: self.state_machine.cluster_id(),
            leader_id: raft.leader_id,
            term: raft.term,
            commit_index: raft.raft_log.committed,
            applied_index: self.state_machine.applied_index(),
            last_index: raft.raft_log.last_index(),
            revision: key_space.current_revision(),
            compact_revision: key_space.compact_revision(),
            key_space_bytes: key_space.approximate_bytes(),
            is_leader: raft.state == StateRole::Leader,
            is_learner: raft
                .prs()
                .conf()
                .learners()
                .contains(&self.config.member_id),
            alarms: self.state_machine.alarms().to_vec(),
        }
    }

    /// The cluster's members as this member knows them.
    pub fn members(&self) -> &[MemberRecord] {
        self.state_machine.members()
    }

    /// The state machine, for hashes and tests.
    pub fn state_machine(&self) -> &StateMachine {
        &self.state_machine
    }

    /// Starts an election now (tests and leader transfer use this).
    pub fn campaign(&mut self) {
        if let Err(error) = self.raw_node.campaign() {
            tracing::debug!(%error, "campaign refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use keel_types::etcdserverpb::PutRequest;

    use super::*;

    /// A one-member cluster that has elected itself.
    fn single_member_leader() -> Node {
        let member = MemberRecord {
            id: 1,
            name: "one".into(),
            peer_urls: vec!["test://one".into()],
            ..Default::default()
        };
        let recovered = Recovered {
            snapshot: bootstrap_snapshot(vec![member], 7),
            hard_state: None,
            entries: Vec::new(),
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut node = Node::new(NodeConfig::with_member_id(1), recovered, &logger).unwrap();
        node.campaign();
        drain(&mut node);
        assert!(node.status().is_leader);
        node
    }

    /// Takes Readies as a shell would (a single member persists and sends nothing).
    fn drain(node: &mut Node) -> Vec<Reply> {
        let mut replies = Vec::new();
        while node.has_ready() {
            replies.extend(node.ready().replies);
            replies.extend(node.advance().replies);
        }
        replies
    }

    /// A write waits in the node until the next Ready, so `has_ready` must say
    /// so at once: the shell asks for a Ready only when it does, and a write
    /// missed here would wait for the next tick (once 100 ms per put).
    #[test]
    fn a_waiting_write_makes_the_node_ready_at_once() {
        let mut node = single_member_leader();
        assert!(!node.has_ready());
        node.step(Event::Write {
            token: 42,
            request: log_request::Request::Put(PutRequest {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                ..Default::default()
            }),
        });
        assert!(node.has_ready(), "a proposal is waiting");
        let replies = drain(&mut node);
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].token, 42);
        assert!(matches!(replies[0].result, Ok(Response::Write(_))));
    }

    /// A keep-alive for a lease with a checkpoint is answered once a reset of
    /// the checkpoint commits. Its read index can apply while a Ready is being
    /// taken; proposing the reset right there gave raft-rs entries between
    /// `ready` and `advance`, and it panicked (found by bench/compare.sh).
    #[test]
    fn a_keep_alive_of_a_checkpointed_lease_proposes_nothing_inside_a_ready() {
        let mut node = single_member_leader();
        node.step(Event::Write {
            token: 1,
            request: log_request::Request::LeaseGrant(
                keel_types::etcdserverpb::LeaseGrantRequest { ttl: 60, id: 5 },
            ),
        });
        assert_eq!(drain(&mut node).len(), 1);
        // Past the checkpoint interval: the remaining TTL goes into the log.
        for _ in 0..=node.config.lease_checkpoint_interval_ticks {
            node.step(Event::Tick);
            drain(&mut node);
        }
        let lease = node.state_machine().leases().get(5).expect("granted");
        assert_ne!(lease.remaining_ttl_seconds, 0, "a checkpoint was applied");

        node.step(Event::LeaseKeepAlive { token: 2, id: 5 });
        let replies = drain(&mut node);
        assert_eq!(replies.len(), 1);
        match &replies[0].result {
            Ok(Response::LeaseKeepAlive(response)) => assert_eq!(response.ttl, 60),
            other => panic!("unexpected answer {other:?}"),
        }
        let lease = node.state_machine().leases().get(5).expect("still granted");
        assert_eq!(lease.remaining_ttl_seconds, 0, "the checkpoint was reset");
    }
}
