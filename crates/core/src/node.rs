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
//! 4. deliver `replies`, hand `snapshot_capture` to a thread that encodes,
//!    writes and fsyncs it, and carry out `log_compaction` (its marker in the
//!    log, then releasing the log behind it: it may go first, see [`Output`]);
//! 5. call [`Node::advance`] and carry out its output the same way.
//!
//! The node reads no clock and no unseeded randomness: time arrives as ticks, and
//! the election-timeout jitter comes from a seed in [`NodeConfig`]. That makes a
//! run reproducible from its inputs, which is what the simulator relies on.
//!
//! The node is one type, [`Node`]; its concerns live in one file each:
//! `config.rs` (settings), `protocol.rs` (events, outputs, replies, errors),
//! `writes.rs` (proposing and applying writes), `reads.rs` (linearizable and
//! serializable reads), `leases.rs` (the leader's lease clock), `membership.rs`
//! (configuration changes and leader transfer), `snapshots.rs` and
//! `compaction.rs`. This file holds the `Node` itself and the Ready protocol.

mod compaction;
mod config;
mod leases;
mod membership;
mod protocol;
mod reads;
mod snapshots;
mod writes;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};

use keel_types::etcdserverpb::ResponseHeader;
use keel_types::keelpb::MemberRecord;
use raft::{RawNode, ReadOnlyOption, StateRole};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::lease::Lessor;
use crate::log_store::LogStore;
use crate::state_machine::StateMachine;

pub use config::{AutoCompactionPolicy, DeliberateBug, NodeConfig};
pub use protocol::{
    Event, LogCompaction, MembershipChange, NodeStatus, Output, Persist, Recovered, Reply,
    RequestError, Response, SnapshotCapture, StartError, WriteRequest,
};
pub use snapshots::{bootstrap_snapshot, BOOTSTRAP_INDEX};

use leases::PendingKeepAlive;
use reads::{PendingRead, ReadBatch, ReadPurpose};
use writes::{PendingWrite, WaitingProposal};

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
    /// The index of the newest capture of our own state machine (or of the
    /// snapshot this member started from or received).
    last_snapshot_index: u64,
    /// A capture was handed to the shell and is not yet reported durable.
    snapshot_in_flight: bool,
    /// A durable own snapshot whose log compaction the shell has yet to carry out.
    log_compaction: Option<LogCompaction>,
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
        let state_machine = StateMachine::decode(&recovered.snapshot.data)?;
        Node::with_state_machine(config, recovered, state_machine, logger)
    }

    /// As [`Node::new`], with the state machine already restored from
    /// `recovered.snapshot` by the caller: a restart restores it on another thread
    /// while it replays the log (at a million keys, the two are most of a restart).
    pub fn with_state_machine(
        config: NodeConfig,
        recovered: Recovered,
        state_machine: StateMachine,
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
            snapshot_in_flight: false,
            log_compaction: None,
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
            Event::SnapshotDurable(snapshot) => self.record_durable_snapshot(*snapshot),
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

    /// True when [`Node::ready`] has work.
    pub fn has_ready(&self) -> bool {
        !self.replies.is_empty()
            || self.log_compaction.is_some()
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
        let mut output = Output {
            log_compaction: self.log_compaction.take(),
            ..Output::default()
        };
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
        output.snapshot_capture = self.maybe_snapshot();
        output.replies = std::mem::take(&mut self.replies);
        self.jitter_election_timeout_if_reset();
        self.follow_leadership();
        output
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
