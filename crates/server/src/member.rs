//! The member loop: one thread that owns the core `Node`, the write-ahead log
//! and the snapshot store, and carries out the node's outputs.
//!
//! It is a plain thread, not a tokio task, because its disk writes block: every
//! Ready batch ends in one fsync. While that fsync runs, client requests and
//! peer messages pile up in the bounded input queue, and the next Ready takes
//! them all at once: that is group commit, with no timer and no tuning knob.
//! The queue's bound (`input_queue_max`) is the back-pressure: when it is full,
//! clients get "too many requests" and peer messages are dropped (Raft resends).

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_core::eraftpb::Message;
use keel_core::{
    DurableError, DurableState, Event, Node, NodeStatus, Output, Reply, RequestError, Response,
    WriteRequest,
};
use keel_types::etcdserverpb::{RangeRequest, RangeResponse};
use keel_types::keelpb::MemberRecord;
use tokio::sync::oneshot;

use crate::member_observer::MemberObserver;
use crate::metrics::disk::MeteredDisk;
use crate::metrics::MemberMetrics;
use crate::transport::PeerSenders;

/// Inputs processed between two Ready batches, so a flood of requests cannot
/// starve ticks and disk writes.
const INPUTS_PER_BATCH_MAX: usize = 4_096;

/// What a waiting client gets back.
pub type ReplySender = oneshot::Sender<Result<Response, RequestError>>;

/// Everything the member loop can be asked.
pub enum Input {
    /// A Raft message from a peer.
    Peer(Box<Message>),
    /// A client write.
    Write {
        /// What to write.
        request: WriteRequest,
        /// Where the answer goes.
        reply: ReplySender,
    },
    /// A linearizable read.
    Read {
        /// What to read.
        request: RangeRequest,
        /// Where the answer goes.
        reply: ReplySender,
    },
    /// A serializable read, answered from local state at once.
    LocalRead {
        /// What to read.
        request: RangeRequest,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<RangeResponse, keel_core::mvcc::KeySpaceError>>,
    },
    /// The member's status and membership.
    Status {
        /// Where the answer goes.
        reply: oneshot::Sender<(NodeStatus, Vec<MemberRecord>)>,
    },
    /// A hash of the key space up to a revision, to compare members.
    HashKv {
        /// The revision to hash up to (0: the newest).
        revision: i64,
        /// Where the answer goes.
        reply: oneshot::Sender<
            Result<keel_types::etcdserverpb::HashKvResponse, keel_core::mvcc::KeySpaceError>,
        >,
    },
    /// Changes at `start_revision` and later to keys in `[key, range_end)`
    /// (etcd's range conventions), for watchers catching up from history.
    Events {
        /// The first revision wanted.
        start_revision: i64,
        /// Scan at most about this many changes (of any key) per request, so a
        /// catching-up watcher cannot hold the member loop for long.
        events_max: usize,
        /// The first key of interest.
        key: Vec<u8>,
        /// The end of the key range, as in a RangeRequest.
        range_end: Vec<u8>,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<keel_core::mvcc::EventBatch, keel_core::mvcc::KeySpaceError>>,
    },
    /// A lease keep-alive (answered by the leader only).
    LeaseKeepAlive {
        /// The lease.
        id: i64,
        /// Where the answer goes.
        reply: ReplySender,
    },
    /// A lease's remaining time (answered by the leader only).
    LeaseTimeToLive {
        /// The lease.
        id: i64,
        /// Whether to list attached keys.
        keys: bool,
        /// Where the answer goes.
        reply: ReplySender,
    },
    /// Every lease id, from local state.
    LeaseList {
        /// Where the answer goes.
        reply: oneshot::Sender<(keel_types::etcdserverpb::ResponseHeader, Vec<i64>)>,
    },
    /// A membership change (MemberAdd, MemberRemove, MemberPromote, MemberUpdate).
    ChangeMembership {
        /// What to change.
        change: keel_core::MembershipChange,
        /// Where the answer goes.
        reply: ReplySender,
    },
    /// Transfer leadership (etcd's MoveLeader).
    MoveLeader {
        /// The member that should lead.
        target: u64,
        /// Where the answer goes.
        reply: ReplySender,
    },
    /// A backup of the state machine as it is now (Maintenance.Snapshot).
    Backup {
        /// Where the answer goes: the header and the backup file's bytes.
        reply: oneshot::Sender<(keel_types::etcdserverpb::ResponseHeader, Vec<u8>)>,
    },
    /// A peer told us this member was removed from the cluster.
    RemovedFromCluster,
    /// The transport could not reach a peer.
    Unreachable(u64),
    /// A snapshot to a peer was lost.
    SnapshotFailed(u64),
    /// A snapshot was written in full to a peer's connection.
    SnapshotSent(u64),
    /// Stop the loop.
    Shutdown,
}

/// Durable state the member loop writes to, on a disk timed into the metrics.
pub type Durable = DurableState<MeteredDisk>;

/// True when `key` is in `[start, range_end)` with etcd's conventions: an
/// empty `range_end` means the single key `start`; `[0]` means every key from
/// `start` on.
pub fn key_in_range(key: &[u8], start: &[u8], range_end: &[u8]) -> bool {
    if range_end.is_empty() {
        return key == start;
    }
    if range_end == [0] {
        return key >= start;
    }
    key >= start && key < range_end
}

/// Why the member loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Asked to stop (SIGTERM, Ctrl-C).
    Shutdown,
    /// The member was removed from the cluster.
    Removed,
    /// The write-ahead log or snapshot store failed.
    StorageFailed,
}

/// What the member loop shares with the peer listeners about membership.
pub struct MembershipView {
    /// Members allowed to send us messages.
    pub allowed: crate::transport::AllowedPeers,
    /// The cluster id and members, answered to joining members.
    pub membership: std::sync::Arc<std::sync::RwLock<keel_types::keelpb::StateMachineSnapshot>>,
    /// Set when a CORRUPT alarm names this member: the client services then
    /// refuse every request.
    pub corrupt: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl MembershipView {
    fn update(&self, cluster_id: u64, members: &[MemberRecord]) {
        *self.allowed.write().expect("not poisoned") =
            members.iter().map(|member| member.id).collect();
        *self.membership.write().expect("not poisoned") =
            keel_types::keelpb::StateMachineSnapshot {
                cluster_id,
                members: members.to_vec(),
                ..Default::default()
            };
    }
}

/// Runs the member loop until shutdown, removal or a storage failure. After
/// every batch it publishes the key space's revision on `revision`, which is
/// how watchers learn that there is something new to read, and follows
/// membership changes in the transport.
#[allow(clippy::too_many_arguments)]
pub fn run(
    mut node: Node,
    mut durable: Durable,
    inputs: Receiver<Input>,
    input_sender: SyncSender<Input>,
    mut peers: PeerSenders,
    tick_interval: Duration,
    revision: tokio::sync::watch::Sender<i64>,
    view: MembershipView,
    metrics: Arc<MemberMetrics>,
) -> Result<StopReason, DurableError> {
    revision.send_replace(node.status().revision);
    let mut known_members = node.members().to_vec();
    peers.follow_membership(&known_members);
    view.update(node.status().cluster_id, &known_members);
    let mut observer = MemberObserver::new(metrics.clone(), &node);
    let mut removed = false;
    let mut waiting = Waiting::new(metrics);
    let mut next_token: u64 = 0;
    let mut next_tick = Instant::now() + tick_interval;
    loop {
        let timeout = next_tick.saturating_duration_since(Instant::now());
        let first = match inputs.recv_timeout(timeout) {
            Ok(input) => Some(input),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return Ok(StopReason::Shutdown),
        };
        let mut handled = 0;
        let mut next_input = first;
        while let Some(input) = next_input.take() {
            if let Input::Shutdown = input {
                return Ok(StopReason::Shutdown);
            }
            handle_input(
                &mut node,
                input,
                &mut waiting,
                &mut next_token,
                &mut removed,
            );
            handled += 1;
            if handled < INPUTS_PER_BATCH_MAX {
                next_input = inputs.try_recv().ok();
            }
        }
        if handled > 0 {
            observer.batch_taken(handled);
        }
        let now = Instant::now();
        if now >= next_tick {
            node.step(Event::Tick);
            next_tick += tick_interval;
            if next_tick < now {
                // We fell behind (a long fsync or snapshot): do not fire a burst
                // of ticks that would start a needless election.
                next_tick = now + tick_interval;
            }
        }
        while node.has_ready() {
            // Committed entries are applied inside `ready` and `advance`.
            let started = Instant::now();
            let output = node.ready();
            let mut apply = started.elapsed();
            carry_out(output, &mut durable, &peers, &input_sender, &mut waiting)?;
            let advancing = Instant::now();
            let output = node.advance();
            apply += advancing.elapsed();
            carry_out(output, &mut durable, &peers, &input_sender, &mut waiting)?;
            observer.ready_carried_out(apply, started.elapsed());
        }
        let current = node.state_machine().key_space().current_revision();
        revision.send_if_modified(|published| {
            let changed = *published != current;
            *published = current;
            changed
        });
        if node.members() != known_members.as_slice() {
            observer.membership_changed(node.status().term, &known_members, node.members());
            known_members = node.members().to_vec();
            peers.follow_membership(&known_members);
            view.update(node.status().cluster_id, &known_members);
        }
        let corrupt = node.is_corrupt();
        if corrupt != view.corrupt.load(std::sync::atomic::Ordering::Relaxed) {
            if corrupt {
                tracing::error!("a CORRUPT alarm names this member: refusing to serve clients");
            }
            view.corrupt
                .store(corrupt, std::sync::atomic::Ordering::Relaxed);
        }
        observer.batch_done(&node, waiting.proposals);
        if removed || node.is_removed_and_done() {
            tracing::warn!("this member has been removed from the cluster; stopping");
            return Ok(StopReason::Removed);
        }
    }
}

fn handle_input(
    node: &mut Node,
    input: Input,
    waiting: &mut Waiting,
    next_token: &mut u64,
    removed: &mut bool,
) {
    match input {
        Input::Peer(message) => node.step(Event::Message(message)),
        Input::Write { request, reply } => {
            *next_token += 1;
            waiting.insert_proposal(*next_token, reply);
            node.step(Event::Write {
                token: *next_token,
                request,
            });
        }
        Input::Read { request, reply } => {
            *next_token += 1;
            waiting.insert(*next_token, reply);
            node.step(Event::LinearizableRead {
                token: *next_token,
                request,
            });
        }
        Input::LocalRead { request, reply } => {
            let _ = reply.send(node.range_local(&request));
        }
        Input::Status { reply } => {
            let _ = reply.send((node.status(), node.members().to_vec()));
        }
        Input::HashKv { revision, reply } => {
            let result = node
                .state_machine()
                .key_space()
                .hash_kv(revision)
                .map(|mut response| {
                    response.header = Some(node.header(0));
                    response
                });
            let _ = reply.send(result);
        }
        Input::Events {
            start_revision,
            events_max,
            key,
            range_end,
            reply,
        } => {
            let result = node.state_machine().key_space().events_matching(
                start_revision,
                events_max,
                |changed| key_in_range(changed, &key, &range_end),
            );
            let _ = reply.send(result);
        }
        Input::LeaseKeepAlive { id, reply } => {
            *next_token += 1;
            waiting.insert(*next_token, reply);
            node.step(Event::LeaseKeepAlive {
                token: *next_token,
                id,
            });
        }
        Input::LeaseTimeToLive { id, keys, reply } => {
            *next_token += 1;
            waiting.insert(*next_token, reply);
            node.step(Event::LeaseTimeToLive {
                token: *next_token,
                id,
                keys,
            });
        }
        Input::LeaseList { reply } => {
            let ids = node.state_machine().leases().ids().collect();
            let _ = reply.send((node.header(0), ids));
        }
        Input::ChangeMembership { change, reply } => {
            *next_token += 1;
            waiting.insert_proposal(*next_token, reply);
            node.step(Event::ChangeMembership {
                token: *next_token,
                change,
            });
        }
        Input::MoveLeader { target, reply } => {
            *next_token += 1;
            waiting.insert(*next_token, reply);
            node.step(Event::MoveLeader {
                token: *next_token,
                target,
            });
        }
        Input::Backup { reply } => {
            let bytes = keel_core::backup::encode(&node.state_machine().encode());
            let _ = reply.send((node.header(0), bytes));
        }
        Input::RemovedFromCluster => *removed = true,
        Input::Unreachable(peer) => node.step(Event::Unreachable(peer)),
        Input::SnapshotFailed(peer) => node.step(Event::SnapshotFailed(peer)),
        Input::SnapshotSent(peer) => node.step(Event::SnapshotSent(peer)),
        Input::Shutdown => unreachable!("handled by the loop"),
    }
}

fn carry_out(
    output: Output,
    durable: &mut Durable,
    peers: &PeerSenders,
    input_sender: &SyncSender<Input>,
    waiting: &mut Waiting,
) -> Result<(), DurableError> {
    for message in output.messages {
        peers.send(message, input_sender);
    }
    durable.persist(&output.persist)?;
    for message in output.messages_after_persist {
        peers.send(message, input_sender);
    }
    waiting.deliver(output.replies);
    if let Some(own) = output.snapshot_to_save {
        durable.save_own_snapshot(&own)?;
    }
    Ok(())
}

/// Clients waiting for an answer from the node, by token, and how many of
/// them wait for a proposal (etcd's `proposals_pending`).
struct Waiting {
    replies: BTreeMap<u64, (ReplySender, bool)>,
    proposals: usize,
    metrics: Arc<MemberMetrics>,
}

impl Waiting {
    fn new(metrics: Arc<MemberMetrics>) -> Waiting {
        Waiting {
            replies: BTreeMap::new(),
            proposals: 0,
            metrics,
        }
    }

    fn insert(&mut self, token: u64, reply: ReplySender) {
        self.replies.insert(token, (reply, false));
    }

    fn insert_proposal(&mut self, token: u64, reply: ReplySender) {
        self.proposals += 1;
        self.replies.insert(token, (reply, true));
    }

    fn deliver(&mut self, replies: Vec<Reply>) {
        for reply in replies {
            if let Some((sender, proposal)) = self.replies.remove(&reply.token) {
                if proposal {
                    self.proposals -= 1;
                    // As etcd counts them: proposals that did not get through
                    // consensus, not requests the state machine refused.
                    if matches!(
                        reply.result,
                        Err(RequestError::NoLeader
                            | RequestError::Timeout
                            | RequestError::LeaderChanged
                            | RequestError::Dropped)
                    ) {
                        self.metrics.proposals_failed.inc();
                    }
                }
                // The client may have gone away; its answer is simply dropped.
                let _ = sender.send(reply.result);
            }
        }
    }
}
