//! The member loop: one thread that owns the core `Node`, the write-ahead log
//! and the snapshot store, and carries out the node's outputs.
//!
//! It is a plain thread, not a tokio task, because its disk writes block: every
//! Ready batch ends in one fsync. While that fsync runs, client requests and
//! peer messages pile up in the bounded input queue, and the next Ready takes
//! them all at once: that is group commit, with no timer and no tuning knob.
//! The queue's bound (`input_queue_max`) is the back-pressure: when it is full,
//! clients get "too many requests" and peer messages are dropped (Raft resends).
//!
//! Nothing whose cost grows with the key space runs on this thread. The key
//! space is a persistent structure whose clone is O(1) (`keel_core::mvcc`), so
//! the loop takes a capture and hands the O(key space) work to a helper thread:
//! - own snapshots: encoded, written and fsynced by the snapshot thread, which
//!   reports back through the input queue (`Input::SnapshotWritten`); the node
//!   hears of a snapshot only once it is durable;
//! - HashKV (the corruption check), backups (Maintenance.Snapshot) and
//!   serializable range reads of more than one key: answered by the capture
//!   thread from a capture taken between two batches, so each is one
//!   consistent revision.
//!
//! What still runs here, and why, is listed in ARCHITECTURE.md.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::Instant;

use keel_core::eraftpb::{Message, Snapshot};
use keel_core::{
    DurableError, DurableState, Event, Node, NodeStatus, Output, Reply, RequestError, Response,
    SnapshotCapture, WriteRequest,
};
use keel_storage::ReleasedSegments;
use keel_types::etcdserverpb::{RangeRequest, RangeResponse};
use keel_types::keelpb::MemberRecord;
use tokio::sync::oneshot;

use crate::fault_injection::TickClock;
use crate::loop_timing::{LoopTimer, Phase};
use crate::member_observer::MemberObserver;
use crate::metrics::disk::MeteredDisk;
use crate::metrics::MemberMetrics;
use crate::read_view::{range_with_header, ReadView};
use crate::transport::PeerSenders;

/// Inputs processed between two Ready batches, so a flood of requests cannot
/// starve ticks and disk writes.
const INPUTS_PER_BATCH_MAX: usize = 4_096;

/// Jobs waiting for the capture thread (hashes, backups, range reads). When it
/// is full, a range read is answered on the loop instead and a hash or backup
/// fails with "too many requests", so the loop never waits for it.
const CAPTURE_JOBS_MAX: usize = 256;

/// Work for the capture thread: it owns a capture and answers a client.
type CaptureJob = Box<dyn FnOnce() + Send>;

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
    /// The snapshot thread finished writing an own snapshot: durable, or failed
    /// (which stops the member, as any storage failure does).
    SnapshotWritten(Result<Box<Snapshot>, DurableError>),
    /// The snapshot thread could not delete released log segments: a storage
    /// failure, which stops the member.
    StorageFailed(DurableError),
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
    tick_clock: TickClock,
    revision: tokio::sync::watch::Sender<i64>,
    view: MembershipView,
    read_view: Arc<ReadView>,
    metrics: Arc<MemberMetrics>,
) -> Result<StopReason, DurableError> {
    let snapshot_sender = spawn_snapshot_thread(&durable, input_sender.clone());
    let (capture_sender, capture_jobs) = std::sync::mpsc::sync_channel(CAPTURE_JOBS_MAX);
    std::thread::Builder::new()
        .name("keel-capture".to_owned())
        .spawn(move || {
            lower_current_thread_priority();
            while let Ok(job) = capture_jobs.recv() {
                let job: CaptureJob = job;
                job();
            }
        })
        .expect("the capture thread starts");
    revision.send_replace(node.status().revision);
    let mut known_members = node.members().to_vec();
    peers.follow_membership(&known_members);
    view.update(node.status().cluster_id, &known_members);
    let mut observer = MemberObserver::new(metrics.clone(), &node);
    let mut removed = false;
    let mut waiting = Waiting::new(metrics);
    let mut next_token: u64 = 0;
    let mut next_tick = Instant::now() + tick_clock.interval();
    let mut timer = LoopTimer::new();
    loop {
        let timeout = next_tick.saturating_duration_since(Instant::now());
        let first = match inputs.recv_timeout(timeout) {
            Ok(input) => Some(input),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return Ok(StopReason::Shutdown),
        };
        timer.begin_batch();
        let mut handled = 0;
        let mut next_input = first;
        while let Some(input) = next_input.take() {
            match input {
                Input::Shutdown => return Ok(StopReason::Shutdown),
                Input::SnapshotWritten(result) => {
                    // A write error is a storage failure like a log error:
                    // the member stops, and the node never hears of it.
                    node.step(Event::SnapshotDurable(result?));
                }
                Input::StorageFailed(error) => return Err(error),
                input => handle_input(
                    &mut node,
                    input,
                    &mut waiting,
                    &mut next_token,
                    &mut removed,
                    &capture_sender,
                ),
            }
            handled += 1;
            if handled < INPUTS_PER_BATCH_MAX {
                next_input = inputs.try_recv().ok();
            }
        }
        if handled > 0 {
            observer.batch_taken(handled);
        }
        timer.end_phase(Phase::Inputs);
        let now = Instant::now();
        if now >= next_tick {
            node.step(Event::Tick);
            let tick_interval = tick_clock.interval();
            next_tick += tick_interval;
            if next_tick < now {
                // We fell behind (a long fsync or snapshot): do not fire a burst
                // of ticks that would start a needless election.
                next_tick = now + tick_interval;
            }
        }
        timer.end_phase(Phase::Other);
        let mut readies = 0;
        while node.has_ready() {
            readies += 1;
            // Committed entries are applied inside `ready` and `advance`.
            let started = Instant::now();
            let output = node.ready();
            let mut apply = started.elapsed();
            // Before the replies go out: a client answered a write reads it back.
            read_view.publish(&node);
            timer.end_phase(Phase::Node);
            carry_out(
                output,
                &mut durable,
                &peers,
                &input_sender,
                &mut waiting,
                &snapshot_sender,
                &mut timer,
            )?;
            let advancing = Instant::now();
            let output = node.advance();
            apply += advancing.elapsed();
            read_view.publish(&node);
            timer.end_phase(Phase::Node);
            carry_out(
                output,
                &mut durable,
                &peers,
                &input_sender,
                &mut waiting,
                &snapshot_sender,
                &mut timer,
            )?;
            observer.ready_carried_out(apply, started.elapsed());
        }
        timer.count(handled, readies);
        read_view.publish(&node);
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
        timer.end_batch();
        if removed || node.is_removed_and_done() {
            tracing::warn!("this member has been removed from the cluster; stopping");
            return Ok(StopReason::Removed);
        }
    }
}

/// Work for the snapshot thread.
enum SnapshotJob {
    /// Encode, write and fsync a capture, and report it.
    Write(SnapshotCapture),
    /// Delete log segments behind a durable snapshot.
    ReleaseSegments(ReleasedSegments<MeteredDisk>),
}

/// Jobs waiting for the snapshot thread. The node has at most one capture
/// outstanding, and log segments are released once per durable snapshot, after
/// the thread reported it: at most one of each is ever queued, so the loop
/// never waits to hand one over.
const SNAPSHOT_JOBS_MAX: usize = 2;

/// The scheduling niceness of the snapshot and capture threads (0 is the
/// default, 19 the lowest priority). Encoding a snapshot or hashing the key
/// space takes a core for a second or more at a few hundred thousand keys;
/// at the default priority the member loop then waited tens to a hundred
/// milliseconds for a CPU each time it woke (measured on two cores, see
/// docs/BENCHMARKS.md). At 10 such a thread gets about a tenth of a core's
/// share against the loop, yet still all of an otherwise idle one.
const HELPER_THREAD_NICENESS: i32 = 10;

/// Lowers the calling thread's scheduling priority to
/// [`HELPER_THREAD_NICENESS`]; on Linux the niceness of a thread id is that
/// thread's alone. Failing only costs latency, so it is logged, not fatal.
fn lower_current_thread_priority() {
    let thread = rustix::thread::gettid();
    if let Err(error) = rustix::process::setpriority_process(Some(thread), HELPER_THREAD_NICENESS) {
        tracing::warn!(%error, "could not lower a helper thread's scheduling priority");
    }
}

/// Starts the thread that encodes, writes and fsyncs the node's snapshot
/// captures and deletes released log segments, and returns where to send them.
fn spawn_snapshot_thread(
    durable: &Durable,
    input_sender: SyncSender<Input>,
) -> SyncSender<SnapshotJob> {
    let writer = durable.snapshot_writer();
    let (sender, jobs) = std::sync::mpsc::sync_channel::<SnapshotJob>(SNAPSHOT_JOBS_MAX);
    std::thread::Builder::new()
        .name("keel-snapshot".to_owned())
        .spawn(move || {
            lower_current_thread_priority();
            while let Ok(job) = jobs.recv() {
                let report = match job {
                    SnapshotJob::Write(capture) => write_snapshot(&writer, &capture),
                    SnapshotJob::ReleaseSegments(released) => {
                        let started = Instant::now();
                        let count = released.len();
                        match released.remove() {
                            Ok(()) => {
                                tracing::debug!(
                                    segments = count,
                                    milliseconds = started.elapsed().as_millis() as u64,
                                    "log segments released off the member loop"
                                );
                                continue;
                            }
                            Err(error) => {
                                tracing::error!(%error, "deleting released log segments failed");
                                Input::StorageFailed(error.into())
                            }
                        }
                    }
                };
                // A blocking send: the report must not be lost, and the loop
                // drains the queue continually.
                if input_sender.send(report).is_err() {
                    return;
                }
            }
        })
        .expect("the snapshot thread starts");
    sender
}

/// Encodes, writes and fsyncs one capture; the report for the loop.
fn write_snapshot(
    writer: &keel_core::durable::SnapshotWriter<MeteredDisk>,
    capture: &SnapshotCapture,
) -> Input {
    let started = Instant::now();
    let snapshot = capture.encode();
    let encoded = started.elapsed();
    let result = writer.save(&snapshot).map(|()| Box::new(snapshot));
    match &result {
        Ok(snapshot) => tracing::info!(
            index = capture.metadata.index,
            bytes = snapshot.data.len(),
            milliseconds = started.elapsed().as_millis() as u64,
            encode_milliseconds = encoded.as_millis() as u64,
            "snapshot written off the member loop"
        ),
        Err(error) => tracing::error!(%error, "writing a snapshot failed"),
    }
    Input::SnapshotWritten(result)
}

/// Runs `job` on the capture thread, or gives it back when that thread's queue
/// is full (or gone).
fn submit_capture_job(
    capture_sender: &SyncSender<CaptureJob>,
    job: CaptureJob,
) -> Result<(), CaptureJob> {
    match capture_sender.try_send(job) {
        Ok(()) => Ok(()),
        Err(std::sync::mpsc::TrySendError::Full(job))
        | Err(std::sync::mpsc::TrySendError::Disconnected(job)) => Err(job),
    }
}

fn handle_input(
    node: &mut Node,
    input: Input,
    waiting: &mut Waiting,
    next_token: &mut u64,
    removed: &mut bool,
    capture_sender: &SyncSender<CaptureJob>,
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
            // A single key costs O(log n): answered here, without a hop. A
            // range costs O(keys in it) (etcd counts them all even with a
            // limit): answered from a capture on the capture thread.
            if request.range_end.is_empty() {
                let _ = reply.send(node.range_local(&request));
                return;
            }
            let key_space = node.state_machine().key_space().clone();
            let header = node.header(0);
            let job: CaptureJob = Box::new(move || {
                let _ = reply.send(range_with_header(&key_space, &request, header));
            });
            if let Err(job) = submit_capture_job(capture_sender, job) {
                job();
            }
        }
        Input::Status { reply } => {
            let _ = reply.send((node.status(), node.members().to_vec()));
        }
        Input::HashKv { revision, reply } => {
            // The hash walks the whole key space: it runs on the capture thread
            // over the key space as of this moment, one consistent revision.
            let key_space = node.state_machine().key_space().clone();
            let header = node.header(0);
            let job: CaptureJob = Box::new(move || {
                let started = Instant::now();
                let result = key_space.hash_kv(revision).map(|mut response| {
                    response.header = Some(header);
                    response
                });
                tracing::debug!(
                    milliseconds = started.elapsed().as_millis() as u64,
                    "key space hashed off the member loop"
                );
                let _ = reply.send(result);
            });
            if submit_capture_job(capture_sender, job).is_err() {
                tracing::warn!("capture thread busy: HashKV refused");
            }
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
            let capture = node.state_machine().capture();
            let header = node.header(0);
            let job: CaptureJob = Box::new(move || {
                let bytes = keel_core::backup::encode(&capture.encode());
                let _ = reply.send((header, bytes));
            });
            if submit_capture_job(capture_sender, job).is_err() {
                tracing::warn!("capture thread busy: backup refused");
            }
        }
        Input::RemovedFromCluster => *removed = true,
        Input::Unreachable(peer) => node.step(Event::Unreachable(peer)),
        Input::SnapshotFailed(peer) => node.step(Event::SnapshotFailed(peer)),
        Input::SnapshotSent(peer) => node.step(Event::SnapshotSent(peer)),
        Input::Shutdown | Input::SnapshotWritten(_) | Input::StorageFailed(_) => {
            unreachable!("handled by the loop")
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn carry_out(
    output: Output,
    durable: &mut Durable,
    peers: &PeerSenders,
    input_sender: &SyncSender<Input>,
    waiting: &mut Waiting,
    snapshot_sender: &SyncSender<SnapshotJob>,
    timer: &mut LoopTimer,
) -> Result<(), DurableError> {
    // First: a received snapshot in this output's `persist` may be newer, and
    // the log's snapshot markers only move forward.
    if let Some(compaction) = &output.log_compaction {
        if let Some(released) = durable.compact_log_detached(compaction)? {
            snapshot_sender
                .send(SnapshotJob::ReleaseSegments(released))
                .expect("the snapshot thread runs as long as the loop");
        }
        timer.end_phase(Phase::CompactLog);
    }
    for message in output.messages {
        peers.send(message, input_sender);
    }
    timer.end_phase(Phase::Send);
    durable.persist(&output.persist)?;
    timer.end_phase(Phase::Persist);
    for message in output.messages_after_persist {
        peers.send(message, input_sender);
    }
    timer.end_phase(Phase::Send);
    waiting.deliver(output.replies);
    timer.end_phase(Phase::Deliver);
    if let Some(capture) = output.snapshot_capture {
        // Never blocks: the node keeps at most one capture outstanding, and the
        // thread takes it before reporting the previous one.
        snapshot_sender
            .send(SnapshotJob::Write(capture))
            .expect("the snapshot thread runs as long as the loop");
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
