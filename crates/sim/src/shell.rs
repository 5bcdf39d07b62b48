//! The simulator's shell around each `keel_core::Node`: what `server/member.rs` does
//! with threads, sockets and files, done here on the simulated clock, network and disk.
//!
//! It follows the core's Ready protocol exactly (see `keel_core::node`): carry out a
//! log compaction behind a durable own snapshot, send `messages`, make `persist`
//! durable with `DurableState` (the same code the server runs), send
//! `messages_after_persist`, deliver replies, hand a snapshot capture to the simulated
//! snapshot thread, then `advance` and do the same with its output. A persist error
//! stops the member, as the server stops, and the world restarts it later from its disk.
//!
//! The snapshot thread is modelled as the server runs it, off the member loop: a
//! capture is written (with the server's `SnapshotWriter`) at a later simulated time,
//! while the member goes on handling events, and the node is told with
//! `Event::SnapshotDurable` only after the write succeeded. A crash before then loses
//! the capture; the nemesis also aims faults at that write (`SnapshotFault`).
//!
//! The transport's duties are modelled too: a message that cannot reach a stopped member
//! or crosses a cut link is reported to its sender as `Unreachable`, a lost `MsgSnapshot`
//! (for whatever reason) as `SnapshotFailed`, and a delivered one is reported too (see
//! `on_report`), without which raft-rs would wait for that snapshot forever.
//!
//! The shell is also where the step invariants look: entries and snapshots as they enter
//! a member's log, and the member's status after every event it handles.

use keel_core::eraftpb::{Message, MessageType};
use keel_core::{DurableError, DurableState, Event, Node, NodeConfig, Output, Reply};
use keel_storage::Crash;
use keel_types::etcdserverpb::RangeRequest;
use keel_types::keelpb::MemberRecord;

use crate::config::ShellBug;
use crate::invariants::applied_state::StateFingerprint;
use crate::invariants::monotonic::Counters;
use crate::network::SendPlan;
use crate::trace::{Digest, MessageSummary, TraceEvent, TransportReport};
use crate::violation::Violation;
use crate::world::{Action, DeferredWrite, Running, SnapshotFault, World, CLUSTER_ID};

/// The most Ready rounds one event may cause. A few are normal (a Ready, its advance,
/// the reads it made servable); thousands mean the node never runs out of work.
pub const READY_ROUNDS_MAX: usize = 1_000;

/// How a member stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// The process dies (kill -9, or exit after an fsync error); the operating system
    /// keeps what it was given, fsynced or not.
    ProcessExit,
    /// The machine loses power: whatever was not fsynced is lost; with `torn`, a random
    /// prefix of each file's unsynced tail survives, its last bytes possibly garbled.
    PowerLoss {
        /// Whether tails are torn rather than cleanly cut.
        torn: bool,
    },
}

impl StopKind {
    fn describe(self) -> &'static str {
        match self {
            StopKind::ProcessExit => "process exits",
            StopKind::PowerLoss { torn: false } => "power loss",
            StopKind::PowerLoss { torn: true } => "power loss, torn writes",
        }
    }
}

impl World {
    /// The founding members, as every member's bootstrap snapshot records them.
    fn founding_members(&self) -> Vec<MemberRecord> {
        self.members
            .iter()
            .map(|member| MemberRecord {
                id: member.id,
                name: format!("member-{}", member.id),
                peer_urls: vec![format!("sim://member-{}", member.id)],
                ..Default::default()
            })
            .collect()
    }

    /// Boots member `id` from its disk (bootstrapping it on first boot).
    pub(crate) fn start_member(&mut self, id: u64) {
        assert!(
            !self.member(id).is_running(),
            "member {id} is already running"
        );
        let founding_members = self.founding_members();
        let member = self.member_mut(id);
        member.incarnation += 1;
        let incarnation = member.incarnation;
        let disk = member.disk.clone();
        let fsyncs_failed_before = disk.stats().syncs_failed;
        let opened = DurableState::open(disk.clone()).and_then(|(mut durable, recovered)| {
            let recovered = match recovered {
                Some(recovered) => Some(recovered),
                None if member.bootstrapped => None,
                None => Some(durable.bootstrap(founding_members, CLUSTER_ID)?),
            };
            Ok((durable, recovered))
        });
        let (durable, recovered) = match opened {
            Ok((durable, Some(recovered))) => (durable, recovered),
            Ok((_, None)) => return self.fail(Violation::DiskForgotMember { member: id }),
            Err(_) if disk.stats().syncs_failed > fsyncs_failed_before => {
                // Recovery itself hit an injected fsync error: the start fails, as it
                // would for the server, and is tried again later.
                self.record(TraceEvent::PersistFailed { member: id });
                self.stats.persist_failures += 1;
                return self.schedule_restart(id);
            }
            Err(error) => {
                return self.fail(Violation::RecoveryFailed {
                    member: id,
                    error: error.to_string(),
                })
            }
        };
        self.member_mut(id).bootstrapped = true;
        let snapshot_index = recovered.snapshot.get_metadata().index;
        let snapshot_term = recovered.snapshot.get_metadata().term;
        let last_index = recovered
            .entries
            .last()
            .map_or(snapshot_index, |entry| entry.index);
        // The node checks that the log follows the snapshot; the invariants then take the
        // recovered log as this boot's starting point.
        let recovered_entries = recovered.entries.clone();
        let mut config = NodeConfig::with_member_id(id);
        config.random_seed = self.random.fork();
        config.boot_epoch = self.boot_epoch_base.wrapping_add(incarnation as u32);
        config.snapshot_entries_interval = self.config.snapshot_entries_interval;
        config.snapshot_catch_up_entries = self.config.snapshot_catch_up_entries;
        config.request_timeout_ticks = self.config.request_timeout_ticks;
        config.lease_checkpoint_interval_ticks = self.config.lease_checkpoint_interval_ticks;
        config.deliberate_bug = self.config.options.core_bug;
        let node = match Node::new(config, recovered, &self.logger) {
            Ok(node) => node,
            Err(error) => {
                return self.fail(Violation::RecoveryFailed {
                    member: id,
                    error: error.to_string(),
                })
            }
        };
        let result = self.invariants.log_matching.observe(id, &recovered_entries);
        self.check(result);
        let result = self.invariants.state_machine_safety.on_start(
            id,
            snapshot_index,
            snapshot_term,
            &recovered_entries,
        );
        self.check(result);
        self.member_mut(id).running = Some(Box::new(Running {
            node,
            durable,
            deferred: Vec::new(),
            snapshot_writes: std::collections::VecDeque::new(),
            ticks_since_flush: 0,
            fingerprinted_applied: None,
        }));
        if incarnation > 1 {
            self.stats.member_restarts += 1;
        }
        self.record(TraceEvent::Restart {
            member: id,
            incarnation,
            snapshot_index,
            last_index,
        });
        // Members do not tick in lockstep: each boot starts its clock at a random phase.
        let first_tick = 1 + self.random.below(self.member(id).tick_interval_ns);
        self.agenda.schedule_after(
            first_tick,
            Action::Tick {
                member: id,
                incarnation,
            },
        );
        self.observe(id);
    }

    /// Schedules a restart of a stopped member, unless one is on the agenda.
    pub(crate) fn schedule_restart(&mut self, id: u64) {
        if self.member(id).restart_pending {
            return;
        }
        self.member_mut(id).restart_pending = true;
        let delay = self.random.between(100, 5_000) * crate::config::MILLISECOND_NS;
        self.agenda
            .schedule_after(delay, Action::Restart { member: id });
    }

    /// Stops member `id`. Clients waiting on it see their connection reset: the outcome
    /// of what they asked is unknown.
    pub(crate) fn stop_member(&mut self, id: u64, how: StopKind) {
        let torn_seed = self.random.fork();
        let member = self.member_mut(id);
        let Some(running) = member.running.take() else {
            return;
        };
        // Dropping the process loses its memory: unflushed deferred writes included.
        drop(running);
        match how {
            StopKind::ProcessExit => {}
            StopKind::PowerLoss { torn: false } => member.disk.crash(Crash::Clean),
            StopKind::PowerLoss { torn: true } => {
                member.disk.crash(Crash::Torn { seed: torn_seed })
            }
        }
        member.clock_stalled_until_ns = 0;
        member.paused_until_ns = 0;
        self.stats.member_stops += 1;
        self.record(TraceEvent::Stop {
            member: id,
            how: how.describe(),
        });
        self.reset_clients_of(id);
    }

    /// A member's clock ticks.
    pub(crate) fn on_tick(&mut self, id: u64, incarnation: u64) {
        let now = self.now_ns();
        let member = self.member(id);
        if !member.is_boot(incarnation) {
            return;
        }
        let action = Action::Tick {
            member: id,
            incarnation,
        };
        if now < member.paused_until_ns {
            return self.agenda.schedule_at(member.paused_until_ns, action);
        }
        if now < member.clock_stalled_until_ns {
            return self
                .agenda
                .schedule_at(member.clock_stalled_until_ns, action);
        }
        let tick_interval_ns = member.tick_interval_ns;
        let member = self.member_mut(id);
        let running = member.running.as_mut().expect("checked above");
        // One tick, however late: ticks missed in a stall or a pause are skipped, as the
        // server's member loop skips them.
        running.node.step(Event::Tick);
        running.ticks_since_flush += 1;
        self.record(TraceEvent::Tick { member: id });
        self.agenda.schedule_after(tick_interval_ns, action);
        if self.config.options.shell_bug == ShellBug::AcknowledgeBeforeFsync {
            let flush_ticks = self.config.deferred_flush_ticks;
            let running = self.member_mut(id).running.as_mut().expect("checked above");
            if running.ticks_since_flush >= flush_ticks {
                running.ticks_since_flush = 0;
                if !self.flush_deferred(id) {
                    return;
                }
            }
        }
        self.drive(id);
    }

    /// A message arrives.
    pub(crate) fn on_deliver(
        &mut self,
        sender: u64,
        sender_incarnation: u64,
        message: Box<Message>,
    ) {
        let to = message.to;
        let recipient = self.member(to);
        let recipient_running = recipient.is_running();
        if recipient_running && self.now_ns() < recipient.paused_until_ns {
            // A paused process reads its socket when it resumes.
            let resume_ns = recipient.paused_until_ns;
            return self.agenda.schedule_at(
                resume_ns,
                Action::Deliver {
                    sender,
                    sender_incarnation,
                    message,
                },
            );
        }
        self.network.message_left_wire();
        let summary = MessageSummary::of(&message);
        let reason = if self.network.is_cut(sender, to) {
            Some("link cut")
        } else if !recipient_running {
            Some("recipient down")
        } else {
            None
        };
        if let Some(reason) = reason {
            self.stats.messages_dropped += 1;
            self.record(TraceEvent::Drop(summary, reason));
            return self.report_lost(sender, sender_incarnation, &summary, true);
        }
        self.stats.messages_delivered += 1;
        self.record(TraceEvent::Deliver(summary));
        if summary.message_type == MessageType::MsgSnapshot
            && !self.config.options.snapshot_sent_unreported
        {
            let delay = self.network.link(to, sender).delay_ns;
            self.agenda.schedule_after(
                delay,
                Action::Report {
                    member: sender,
                    incarnation: sender_incarnation,
                    peer: to,
                    report: TransportReport::SnapshotSent,
                },
            );
        }
        let running = self.member_mut(to).running.as_mut().expect("checked above");
        running.node.step(Event::Message(message));
        self.drive(to);
    }

    /// Tells a message's sender, as the transport would, that it did not arrive: always
    /// for a snapshot; for other messages only when the connection failed
    /// (`connection_failed`), since a datagram-like loss goes unnoticed.
    fn report_lost(
        &mut self,
        sender: u64,
        incarnation: u64,
        summary: &MessageSummary,
        connection_failed: bool,
    ) {
        let report = if summary.message_type == MessageType::MsgSnapshot {
            TransportReport::SnapshotLost
        } else if connection_failed {
            TransportReport::Unreachable
        } else {
            return;
        };
        self.agenda.schedule_after(
            0,
            Action::Report {
                member: sender,
                incarnation,
                peer: summary.to,
                report,
            },
        );
    }

    /// The transport's report reaches a member.
    pub(crate) fn on_report(
        &mut self,
        id: u64,
        incarnation: u64,
        peer: u64,
        report: TransportReport,
    ) {
        let member = self.member(id);
        if !member.is_boot(incarnation) {
            return;
        }
        if self.now_ns() < member.paused_until_ns {
            let resume_ns = member.paused_until_ns;
            return self.agenda.schedule_at(
                resume_ns,
                Action::Report {
                    member: id,
                    incarnation,
                    peer,
                    report,
                },
            );
        }
        self.record(TraceEvent::Report {
            member: id,
            peer,
            report,
        });
        let running = self.member_mut(id).running.as_mut().expect("checked above");
        match report {
            TransportReport::Unreachable => running.node.step(Event::Unreachable(peer)),
            TransportReport::SnapshotLost => {
                running.node.step(Event::Unreachable(peer));
                running.node.step(Event::SnapshotFailed(peer));
            }
            // raft-rs sends a follower nothing while its snapshot is in flight, until
            // the transport reports the snapshot written (etcd's ReportSnapshot(Finish)).
            TransportReport::SnapshotSent => running.node.step(Event::SnapshotSent(peer)),
        }
        self.drive(id);
    }

    /// Carries out the node's work until it has none, then checks the step invariants.
    pub(crate) fn drive(&mut self, id: u64) {
        let mut rounds = 0;
        loop {
            let Some(running) = self.member_mut(id).running.as_mut() else {
                return;
            };
            if !running.node.has_ready() {
                break;
            }
            rounds += 1;
            if rounds > READY_ROUNDS_MAX {
                return self.fail(Violation::ReadyLoopRunaway {
                    member: id,
                    rounds: READY_ROUNDS_MAX,
                });
            }
            let output = running.node.ready();
            if !self.carry_out(id, output) {
                return;
            }
            let running = self.member_mut(id).running.as_mut().expect("still running");
            let output = running.node.advance();
            if !self.carry_out(id, output) {
                return;
            }
        }
        self.observe(id);
    }

    /// Carries out one output in the Ready order. Returns false if the member stopped.
    fn carry_out(&mut self, id: u64, output: Output) -> bool {
        let Output {
            messages,
            persist,
            messages_after_persist,
            replies,
            snapshot_capture,
            log_compaction,
        } = output;
        let acknowledge_before_fsync =
            self.config.options.shell_bug == ShellBug::AcknowledgeBeforeFsync;
        if let Some(compaction) = log_compaction {
            let running = self.member_mut(id).running.as_mut().expect("running");
            if acknowledge_before_fsync {
                running
                    .deferred
                    .push(DeferredWrite::LogCompaction(compaction));
            } else if let Err(error) = running.durable.compact_log(&compaction) {
                self.persist_failed(id, &error);
                return false;
            }
        }
        if let Some(snapshot) = &persist.snapshot {
            self.stats.snapshots_installed += 1;
            let metadata = snapshot.get_metadata();
            let result =
                self.invariants
                    .state_machine_safety
                    .on_snapshot(id, metadata.index, metadata.term);
            self.check(result);
        }
        if !persist.entries.is_empty() {
            let result = self.invariants.log_matching.observe(id, &persist.entries);
            self.check(result);
            let result = self
                .invariants
                .state_machine_safety
                .on_entries(id, &persist.entries);
            self.check(result);
        }
        for message in messages {
            self.send(id, message);
        }
        let running = self.member_mut(id).running.as_mut().expect("running");
        if acknowledge_before_fsync {
            if !persist.is_empty() {
                running.deferred.push(DeferredWrite::Persist(persist));
            }
        } else if let Err(error) = running.durable.persist(&persist) {
            self.persist_failed(id, &error);
            return false;
        }
        for message in messages_after_persist {
            self.send(id, message);
        }
        for reply in replies {
            self.deliver_reply(reply);
        }
        if let Some(capture) = snapshot_capture {
            let running = self.member_mut(id).running.as_mut().expect("running");
            running.snapshot_writes.push_back(capture);
            // Encoding and writing a large state machine takes a while; the member
            // goes on meanwhile.
            let delay = self.random.between(1, 400) * crate::config::MILLISECOND_NS;
            let incarnation = self.member(id).incarnation;
            self.agenda.schedule_after(
                delay,
                Action::SnapshotWritten {
                    member: id,
                    incarnation,
                },
            );
        }
        true
    }

    /// The simulated snapshot thread finishes writing member `id`'s oldest capture,
    /// unless a fault the nemesis aimed at it gets there first.
    pub(crate) fn on_snapshot_written(&mut self, id: u64, incarnation: u64) {
        if !self.member(id).is_boot(incarnation) {
            return;
        }
        let fault = self.member_mut(id).snapshot_fault.take();
        let running = self.member_mut(id).running.as_mut().expect("running");
        let capture = running
            .snapshot_writes
            .pop_front()
            .expect("one capture per scheduled write");
        let disk = self.member(id).disk.clone();
        if fault.is_some() {
            self.stats.snapshot_write_faults += 1;
        }
        match fault {
            Some(SnapshotFault::ProcessKilledDuringWrite) => {
                self.record(TraceEvent::Fault(format!(
                    "member {id}: killed while writing its snapshot at {}",
                    capture.metadata.index
                )));
                self.stop_member(id, StopKind::ProcessExit);
                return self.schedule_restart(id);
            }
            Some(SnapshotFault::FsyncError { successes_before })
            | Some(SnapshotFault::PowerLossMidWrite { successes_before }) => {
                disk.fail_fsync_after(successes_before, 1);
            }
            Some(SnapshotFault::PowerLossAfterWrite) | None => {}
        }
        let running = self.member_mut(id).running.as_mut().expect("running");
        let result = running.durable.snapshot_writer().write(&capture);
        let snapshot = match (result, fault) {
            (Err(_), Some(SnapshotFault::PowerLossMidWrite { .. })) => {
                self.record(TraceEvent::Fault(format!(
                    "member {id}: power lost while writing its snapshot at {}",
                    capture.metadata.index
                )));
                self.stop_member(id, StopKind::PowerLoss { torn: true });
                return self.schedule_restart(id);
            }
            (Err(error), _) => {
                self.persist_failed(id, &error);
                return;
            }
            (Ok(snapshot), Some(SnapshotFault::PowerLossAfterWrite)) => {
                self.record(TraceEvent::Fault(format!(
                    "member {id}: power lost after writing its snapshot at {}, before the \
                     member heard of it",
                    snapshot.get_metadata().index
                )));
                self.stop_member(id, StopKind::PowerLoss { torn: true });
                return self.schedule_restart(id);
            }
            (Ok(snapshot), _) => snapshot,
        };
        self.stats.snapshots_made += 1;
        let running = self.member_mut(id).running.as_mut().expect("running");
        running
            .node
            .step(Event::SnapshotDurable(Box::new(snapshot)));
        self.drive(id);
    }

    /// Writes what the buggy shell deferred. Returns false if the member stopped.
    fn flush_deferred(&mut self, id: u64) -> bool {
        let running = self.member_mut(id).running.as_mut().expect("running");
        let deferred = std::mem::take(&mut running.deferred);
        for write in deferred {
            let running = self.member_mut(id).running.as_mut().expect("running");
            let result = match &write {
                DeferredWrite::Persist(persist) => running.durable.persist(persist),
                DeferredWrite::LogCompaction(compaction) => running.durable.compact_log(compaction),
            };
            if let Err(error) = result {
                self.persist_failed(id, &error);
                return false;
            }
        }
        true
    }

    /// A write failed: the member stops, as the server does, and restarts later. By
    /// default its machine is power-cycled too, which discards the bytes whose write-back
    /// failed; with `fsync_error_keeps_page_cache` only the process exits, and the restart
    /// reads those bytes back from the page cache.
    fn persist_failed(&mut self, id: u64, error: &DurableError) {
        self.stats.persist_failures += 1;
        self.record(TraceEvent::PersistFailed { member: id });
        if self.echo_events {
            eprintln!("member {id}: {error}");
        }
        let how = if self.config.options.fsync_error_keeps_page_cache {
            StopKind::ProcessExit
        } else {
            StopKind::PowerLoss {
                torn: self.random.below(2) == 0,
            }
        };
        self.stop_member(id, how);
        self.schedule_restart(id);
    }

    /// Puts a message from member `sender` on the wire.
    fn send(&mut self, sender: u64, message: Message) {
        // `message.from` is the original proposer for a forwarded proposal, not the
        // member sending it now; links and reports follow the sender.
        let to = message.to;
        assert_ne!(
            sender,
            to,
            "raft-rs does not send messages to itself: {:?}",
            MessageSummary::of(&message)
        );
        self.stats.messages_sent += 1;
        let sender_incarnation = self.member(sender).incarnation;
        match self.network.plan_send(sender, to, &mut self.random) {
            SendPlan::Lost => {
                let summary = MessageSummary::of(&message);
                self.stats.messages_dropped += 1;
                self.record(TraceEvent::Drop(summary, "lost"));
                self.report_lost(sender, sender_incarnation, &summary, false);
            }
            SendPlan::QueueFull => {
                let summary = MessageSummary::of(&message);
                self.stats.messages_dropped += 1;
                self.record(TraceEvent::Drop(summary, "send queue full"));
                self.report_lost(sender, sender_incarnation, &summary, true);
            }
            SendPlan::Deliver(mut delays) => {
                // A TCP transport never duplicates; only raft's own messages are known to
                // tolerate it, so forwarded proposals are kept single unless asked.
                if message.get_msg_type() == MessageType::MsgPropose
                    && !self.config.options.duplicate_proposals
                {
                    delays.truncate(1);
                }
                let message = Box::new(message);
                for delay in delays {
                    self.agenda.schedule_after(
                        delay,
                        Action::Deliver {
                            sender,
                            sender_incarnation,
                            message: message.clone(),
                        },
                    );
                }
            }
        }
    }

    /// Hands a reply to the client waiting for it, if any still is.
    fn deliver_reply(&mut self, reply: Reply) {
        let Some(owner) = self.tokens.remove(&reply.token) else {
            // The client gave up, or this answers the administrator's compaction.
            return;
        };
        self.on_client_reply(owner, reply.result);
    }

    /// Checks the step invariants against member `id`'s state.
    pub(crate) fn observe(&mut self, id: u64) {
        let member = &self.members[id as usize - 1];
        let incarnation = member.incarnation;
        let Some(running) = member.running.as_ref() else {
            return;
        };
        let status = running.node.status();
        let fingerprint = if running.fingerprinted_applied != Some(status.applied_index) {
            Some(fingerprint(&running.node))
        } else {
            None
        };
        match self
            .invariants
            .election_safety
            .observe(id, status.term, status.is_leader)
        {
            Ok(true) => self.record(TraceEvent::Leader {
                member: id,
                term: status.term,
            }),
            Ok(false) => {}
            Err(violation) => self.fail(violation),
        }
        let result = self.invariants.monotonic.observe(
            id,
            Counters {
                incarnation,
                term: status.term,
                commit: status.commit_index,
                applied: status.applied_index,
                revision: status.revision.max(0) as u64,
            },
        );
        self.check(result);
        let result = self
            .invariants
            .state_machine_safety
            .on_commit(id, status.commit_index);
        self.check(result);
        if let Some(fingerprint) = fingerprint {
            let result =
                self.invariants
                    .applied_state
                    .observe(id, status.applied_index, fingerprint);
            self.check(result);
            let running = self.member_mut(id).running.as_mut().expect("running");
            running.fingerprinted_applied = Some(status.applied_index);
        }
    }
}

/// The whole key space of a node reduced to a fingerprint: every live key with its
/// value, revisions, version and lease, and the current and compacted revisions.
fn fingerprint(node: &Node) -> StateFingerprint {
    let key_space = node.state_machine().key_space();
    let everything = RangeRequest {
        key: vec![0],
        range_end: vec![0],
        ..Default::default()
    };
    let response = key_space
        .range(&everything)
        .expect("a range of every key at the current revision cannot fail");
    let mut digest = Digest::default();
    for kv in &response.kvs {
        digest.write_bytes(&kv.key);
        digest.write_bytes(&kv.value);
        digest.write(kv.create_revision as u64);
        digest.write(kv.mod_revision as u64);
        digest.write(kv.version as u64);
        digest.write(kv.lease as u64);
    }
    StateFingerprint {
        digest: digest.value(),
        revision: key_space.current_revision(),
        compact_revision: key_space.compact_revision(),
        key_count: response.kvs.len(),
    }
}
