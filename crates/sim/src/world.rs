//! The simulated world: members, network, clients and nemesis on one simulated clock,
//! driven by one seed, and the phases of a run.
//!
//! A run has these phases, each with a bound on its simulated duration:
//! 1. **faults**: clients send their workload while the nemesis injects faults;
//! 2. **liveness**: everything is healed (links restored, stopped members restarted,
//!    clocks and disks made healthy) and a probe client writes until one write is
//!    acknowledged: the cluster must elect a leader and commit within
//!    [`LIVENESS_BOUND_NS`];
//! 3. **quiesce**: clients stop sending and their last requests finish or time out;
//! 4. **convergence**: every member must catch up with the leader's log
//!    ([`CONVERGENCE_BOUND_NS`]); their key spaces are then compared by `HashKV`;
//! 5. **final reads**: one linearizable read of every key, which the history checks
//!    (linearizability, no acknowledged write lost) rely on.
//!
//! Everything happens in one thread, in the order of the agenda, and every random choice
//! comes from one generator seeded by the run seed. The same seed therefore replays the
//! same run, which the trace digest proves.

use std::collections::BTreeMap;
use std::time::Instant;

use keel_check::{Bytes, Operation, Output};
use keel_core::eraftpb::Message;
use keel_core::{DurableState, Node};
use keel_storage::SimDisk;

use crate::client::{Client, ClientRole};
use crate::config::{RunConfig, SimOptions, MILLISECOND_NS, SECOND_NS, TICK_INTERVAL_NS};
use crate::invariants::{
    acknowledged_writes, applied_state::AppliedState, election_safety::ElectionSafety, history,
    log_matching::LogMatching, monotonic::Monotonic, state_machine_safety::StateMachineSafety,
};
use crate::network::Network;
use crate::panics::catch_simulation_panic;
use crate::random::SimRandom;
use crate::report::{RunReport, RunStats};
use crate::scheduler::Agenda;
use crate::trace::{Trace, TraceEvent, TransportReport};
use crate::violation::Violation;

/// After healing, the longest the cluster may take to acknowledge a write: enough for a
/// few election rounds (an election timeout is 1–2 s) and for restarted members to
/// replay their logs.
pub const LIVENESS_BOUND_NS: u64 = 30 * SECOND_NS;

/// After quiescing, the longest members may take to catch up with the leader.
pub const CONVERGENCE_BOUND_NS: u64 = 30 * SECOND_NS;

/// The longest the final reads may take, retries included.
pub const FINAL_READS_BOUND_NS: u64 = 30 * SECOND_NS;

/// The most events one run may handle; a run that needs more is stuck in a loop.
pub const EVENTS_PER_RUN_MAX: u64 = 20_000_000;

/// The most operations a history may hold; clients stop sending at this size so that the
/// check stays fast.
pub const HISTORY_OPERATIONS_MAX: usize = 20_000;

/// How often the world checks the bounds of the healing phases.
pub const PHASE_CHECK_INTERVAL_NS: u64 = 100 * MILLISECOND_NS;

/// The cluster id the members are bootstrapped with.
pub const CLUSTER_ID: u64 = 0x6B65_656C;

/// Something due at a point of simulated time.
#[derive(Debug)]
pub(crate) enum Action {
    /// A member's clock ticks (only for the boot that scheduled it).
    Tick { member: u64, incarnation: u64 },
    /// A message arrives at `message.to`.
    Deliver {
        sender: u64,
        sender_incarnation: u64,
        message: Box<Message>,
    },
    /// The transport tells a member about a peer it could not reach.
    Report {
        member: u64,
        incarnation: u64,
        peer: u64,
        report: TransportReport,
    },
    /// A client sends its next request.
    ClientSend { client: usize },
    /// A client's request reaches its member.
    ClientArrive { client: usize, request_number: u64 },
    /// A client gives up waiting.
    ClientTimeout { client: usize, request_number: u64 },
    /// The nemesis decides on its next fault.
    Nemesis,
    /// A stopped member starts again.
    Restart { member: u64 },
    /// Cut links are restored.
    Reconnect,
    /// Degraded links get their healthy behaviour back (cuts stay).
    RestoreLinks,
    /// A member's clock runs at its nominal rate again.
    RestoreClock { member: u64 },
    /// A member's snapshot thread finishes writing its oldest capture (only for the
    /// boot that took it: a crash loses the capture and the write with it).
    SnapshotWritten { member: u64, incarnation: u64 },
    /// An administrator compacts the key space's history.
    Compact,
    /// The fault phase ends: heal everything.
    EndFaultPhase,
    /// Check the bounds of the healing phases.
    PhaseCheck,
}

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Faults,
    Liveness { healed_ns: u64 },
    Quiesce { since_ns: u64 },
    Convergence { since_ns: u64 },
    FinalReads { since_ns: u64 },
    Done,
}

/// A write the shell owes the disk, under `ShellBug::AcknowledgeBeforeFsync`.
#[derive(Debug)]
pub(crate) enum DeferredWrite {
    Persist(keel_core::Persist),
    LogCompaction(keel_core::LogCompaction),
}

/// A running member process.
pub(crate) struct Running {
    pub(crate) node: Node,
    pub(crate) durable: DurableState<SimDisk>,
    /// Writes not yet made durable (only under the acknowledge-before-fsync bug).
    pub(crate) deferred: Vec<DeferredWrite>,
    /// Captures handed to the simulated snapshot thread, oldest first; each has a
    /// `SnapshotWritten` on the agenda.
    pub(crate) snapshot_writes: std::collections::VecDeque<keel_core::SnapshotCapture>,
    pub(crate) ticks_since_flush: u64,
    /// The applied index whose state was last fingerprinted.
    pub(crate) fingerprinted_applied: Option<u64>,
}

/// One member: its disk survives it; its process comes and goes.
pub(crate) struct SimMember {
    pub(crate) id: u64,
    pub(crate) disk: SimDisk,
    pub(crate) running: Option<Box<Running>>,
    /// Boots so far; events scheduled by an older boot are ignored.
    pub(crate) incarnation: u64,
    /// Whether the disk holds a bootstrapped member.
    pub(crate) bootstrapped: bool,
    /// Time between two ticks now (drift changes it).
    pub(crate) tick_interval_ns: u64,
    /// The clock does not tick before this time (a clock that stalled).
    pub(crate) clock_stalled_until_ns: u64,
    /// The process does nothing before this time (a pause).
    pub(crate) paused_until_ns: u64,
    /// A restart is on the agenda.
    pub(crate) restart_pending: bool,
    /// A fault the nemesis aimed at this member's next own snapshot write.
    pub(crate) snapshot_fault: Option<SnapshotFault>,
}

/// What goes wrong with a member's next own snapshot write (see the nemesis).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SnapshotFault {
    /// The process dies while the snapshot thread writes: the capture is lost.
    ProcessKilledDuringWrite,
    /// One of the write's fsyncs (the file's, or its directory's after the rename)
    /// fails; the member stops as for any fsync error.
    FsyncError { successes_before: u64 },
    /// The machine loses power at one of the write's fsyncs: what was not yet
    /// durable is lost or torn (a partial temporary file, a rename not yet durable).
    PowerLossMidWrite { successes_before: u64 },
    /// The write completes, then the power goes before the member loop hears of it:
    /// a durable snapshot file newer than the log's snapshot marker.
    PowerLossAfterWrite,
}

impl SimMember {
    pub(crate) fn is_running(&self) -> bool {
        self.running.is_some()
    }

    pub(crate) fn is_boot(&self, incarnation: u64) -> bool {
        self.running.is_some() && self.incarnation == incarnation
    }
}

/// The invariant checkers that run after every step.
#[derive(Default)]
pub(crate) struct StepInvariants {
    pub(crate) election_safety: ElectionSafety,
    pub(crate) log_matching: LogMatching,
    pub(crate) state_machine_safety: StateMachineSafety,
    pub(crate) applied_state: AppliedState,
    pub(crate) monotonic: Monotonic,
}

/// Which client a member's reply token belongs to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenOwner {
    pub(crate) client: usize,
    pub(crate) request_number: u64,
}

/// The whole simulated world of one run.
pub struct World {
    pub(crate) config: RunConfig,
    pub(crate) random: SimRandom,
    pub(crate) agenda: Agenda<Action>,
    pub(crate) network: Network,
    pub(crate) members: Vec<SimMember>,
    pub(crate) clients: Vec<Client>,
    pub(crate) tokens: BTreeMap<u64, TokenOwner>,
    pub(crate) next_token: u64,
    pub(crate) history: Vec<Operation>,
    pub(crate) final_reads: Vec<(Bytes, Output)>,
    pub(crate) final_reads_sent_ns: u64,
    pub(crate) phase: Phase,
    pub(crate) trace: Trace,
    pub(crate) invariants: StepInvariants,
    pub(crate) violation: Option<Violation>,
    pub(crate) stats: RunStats,
    /// The high bits of proposal ids for each boot, from the seed.
    pub(crate) boot_epoch_base: u32,
    pub(crate) logger: slog::Logger,
    /// Print every event (ticks and heartbeats aside) to stderr as it happens.
    pub echo_events: bool,
}

impl World {
    /// A world for `seed`, with nothing started yet.
    pub fn new(seed: u64, options: SimOptions) -> World {
        let mut random = SimRandom::new(seed);
        let config = RunConfig::from_seed(seed, options, &mut random);
        let members = (1..=config.member_count as u64)
            .map(|id| SimMember {
                id,
                disk: SimDisk::new(),
                running: None,
                incarnation: 0,
                bootstrapped: false,
                tick_interval_ns: TICK_INTERVAL_NS,
                clock_stalled_until_ns: 0,
                paused_until_ns: 0,
                restart_pending: false,
                snapshot_fault: None,
            })
            .collect();
        let mut clients: Vec<Client> = (1..=config.client_count as u64)
            .map(|id| Client::new(id, ClientRole::Workload))
            .collect();
        let probe_id = clients.len() as u64 + 1;
        clients.push(Client::new(probe_id, ClientRole::LivenessProbe));
        clients.push(Client::new(probe_id + 1, ClientRole::FinalReader));
        let boot_epoch_base = random.next_u64() as u32;
        World {
            network: Network::new(&config),
            config,
            random,
            agenda: Agenda::default(),
            members,
            clients,
            tokens: BTreeMap::new(),
            next_token: 0,
            history: Vec::new(),
            final_reads: Vec::new(),
            final_reads_sent_ns: u64::MAX,
            phase: Phase::Faults,
            trace: Trace::default(),
            invariants: StepInvariants::default(),
            violation: None,
            stats: RunStats::default(),
            boot_epoch_base,
            logger: slog::Logger::root(slog::Discard, slog::o!()),
            echo_events: false,
        }
    }

    /// The configuration the seed chose.
    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    pub(crate) fn now_ns(&self) -> u64 {
        self.agenda.now_ns()
    }

    pub(crate) fn record(&mut self, event: TraceEvent) {
        if self.echo_events && !event.is_noise() {
            let now = self.agenda.now_ns();
            eprintln!(
                "{:>6}.{:03} ms  {event}",
                now / MILLISECOND_NS,
                now % MILLISECOND_NS / 1_000
            );
        }
        self.trace.record(self.agenda.now_ns(), event);
    }

    /// Records the first violation; the run stops after the current event.
    pub(crate) fn fail(&mut self, violation: Violation) {
        if self.violation.is_none() {
            self.violation = Some(violation);
        }
    }

    /// Runs a `Result` of an invariant, recording its violation.
    pub(crate) fn check(&mut self, result: Result<(), Violation>) {
        if let Err(violation) = result {
            self.fail(violation);
        }
    }

    pub(crate) fn member(&self, id: u64) -> &SimMember {
        &self.members[id as usize - 1]
    }

    pub(crate) fn member_mut(&mut self, id: u64) -> &mut SimMember {
        &mut self.members[id as usize - 1]
    }

    pub(crate) fn member_ids(&self) -> Vec<u64> {
        self.members.iter().map(|member| member.id).collect()
    }

    /// Runs the simulation to its end or to the first violation.
    pub fn run(&mut self) {
        self.record(TraceEvent::Phase("faults"));
        for id in self.member_ids() {
            self.start_member(id);
        }
        for client in 0..self.clients.len() {
            if self.clients[client].role == ClientRole::Workload {
                let delay = self.random.below(self.config.client_think_ns_max + 1);
                self.agenda
                    .schedule_after(delay, Action::ClientSend { client });
            }
        }
        if self.config.faults.any() {
            let delay = self
                .random
                .below(self.config.faults.nemesis_interval_ns + 1);
            self.agenda.schedule_after(delay, Action::Nemesis);
        }
        let compaction_delay = self.random.between(1, 5) * SECOND_NS;
        self.agenda
            .schedule_after(compaction_delay, Action::Compact);
        self.agenda
            .schedule_at(self.config.fault_phase_ns, Action::EndFaultPhase);
        while self.violation.is_none() && self.phase != Phase::Done {
            let Some(action) = self.agenda.pop() else {
                panic!("the agenda ran dry: members always have a tick scheduled");
            };
            self.stats.events += 1;
            if self.stats.events > EVENTS_PER_RUN_MAX {
                self.fail(Violation::RunTooLong {
                    events: EVENTS_PER_RUN_MAX,
                });
                break;
            }
            self.handle(action);
        }
        self.stats.simulated_ns = self.now_ns();
    }

    fn handle(&mut self, action: Action) {
        match action {
            Action::Tick {
                member,
                incarnation,
            } => self.on_tick(member, incarnation),
            Action::Deliver {
                sender,
                sender_incarnation,
                message,
            } => self.on_deliver(sender, sender_incarnation, message),
            Action::Report {
                member,
                incarnation,
                peer,
                report,
            } => self.on_report(member, incarnation, peer, report),
            Action::ClientSend { client } => self.on_client_send(client),
            Action::ClientArrive {
                client,
                request_number,
            } => self.on_client_arrive(client, request_number),
            Action::ClientTimeout {
                client,
                request_number,
            } => self.on_client_timeout(client, request_number),
            Action::Nemesis => self.on_nemesis(),
            Action::Restart { member } => {
                self.member_mut(member).restart_pending = false;
                if !self.member(member).is_running() {
                    self.start_member(member);
                }
            }
            Action::Reconnect => {
                self.network.reconnect();
                self.record(TraceEvent::Fault("partitions healed".to_owned()));
            }
            Action::RestoreLinks => {
                self.restore_links();
                self.record(TraceEvent::Fault("links healthy again".to_owned()));
            }
            Action::RestoreClock { member } => {
                self.member_mut(member).tick_interval_ns = TICK_INTERVAL_NS;
            }
            Action::SnapshotWritten {
                member,
                incarnation,
            } => self.on_snapshot_written(member, incarnation),
            Action::Compact => self.on_compact(),
            Action::EndFaultPhase => self.end_fault_phase(),
            Action::PhaseCheck => self.on_phase_check(),
        }
    }

    /// Heals every fault and starts the liveness phase.
    fn end_fault_phase(&mut self) {
        let now = self.now_ns();
        self.phase = Phase::Liveness { healed_ns: now };
        self.record(TraceEvent::Phase("liveness: everything healed"));
        self.network.heal();
        for id in self.member_ids() {
            let member = self.member_mut(id);
            member.tick_interval_ns = TICK_INTERVAL_NS;
            member.clock_stalled_until_ns = 0;
            member.paused_until_ns = 0;
            // No more fsync failures: a healthy disk from now on.
            member.disk.fail_fsync_after(0, 0);
            member.snapshot_fault = None;
            if !member.is_running() {
                self.start_member(id);
            }
        }
        let probe = self.client_index(ClientRole::LivenessProbe);
        self.agenda
            .schedule_after(0, Action::ClientSend { client: probe });
        self.agenda
            .schedule_after(PHASE_CHECK_INTERVAL_NS, Action::PhaseCheck);
    }

    pub(crate) fn client_index(&self, role: ClientRole) -> usize {
        self.clients
            .iter()
            .position(|client| client.role == role)
            .expect("every role has a client")
    }

    /// Moves from liveness to quiesce once the probe's write is acknowledged.
    pub(crate) fn liveness_proven(&mut self) {
        if let Phase::Liveness { .. } = self.phase {
            self.phase = Phase::Quiesce {
                since_ns: self.now_ns(),
            };
            self.record(TraceEvent::Phase(
                "quiesce: a write committed after healing",
            ));
        }
    }

    /// The final reader read every key.
    pub(crate) fn final_reads_done(&mut self) {
        self.phase = Phase::Done;
        self.record(TraceEvent::Phase("done"));
    }

    fn on_phase_check(&mut self) {
        let now = self.now_ns();
        match self.phase {
            Phase::Faults | Phase::Done => return,
            Phase::Liveness { healed_ns } => {
                if now - healed_ns > LIVENESS_BOUND_NS {
                    let statuses = self.describe_members();
                    self.fail(Violation::Liveness(format!(
                        "no write was acknowledged within {} s of healing; members: {statuses}",
                        LIVENESS_BOUND_NS / SECOND_NS
                    )));
                }
            }
            Phase::Quiesce { since_ns } => {
                let busy = self.clients.iter().any(|client| {
                    client.role == ClientRole::Workload && client.outstanding.is_some()
                });
                if !busy {
                    self.phase = Phase::Convergence { since_ns: now };
                    self.record(TraceEvent::Phase("convergence: clients stopped"));
                } else {
                    assert!(
                        now - since_ns <= self.config.client_timeout_ns + SECOND_NS,
                        "a client outlived its own timeout"
                    );
                }
            }
            Phase::Convergence { since_ns } => {
                if self.members_converged() {
                    self.compare_replicas();
                    self.phase = Phase::FinalReads { since_ns: now };
                    self.final_reads_sent_ns = now;
                    self.record(TraceEvent::Phase("final reads: members converged"));
                    let reader = self.client_index(ClientRole::FinalReader);
                    self.agenda
                        .schedule_after(0, Action::ClientSend { client: reader });
                } else if now - since_ns > CONVERGENCE_BOUND_NS {
                    let statuses = self.describe_members();
                    self.fail(Violation::Liveness(format!(
                        "members did not catch up with the leader within {} s of quiescing; \
                         members: {statuses}",
                        CONVERGENCE_BOUND_NS / SECOND_NS
                    )));
                }
            }
            Phase::FinalReads { since_ns } => {
                if now - since_ns > FINAL_READS_BOUND_NS {
                    let statuses = self.describe_members();
                    self.fail(Violation::Liveness(format!(
                        "the final reads did not finish within {} s; members: {statuses}",
                        FINAL_READS_BOUND_NS / SECOND_NS
                    )));
                }
            }
        }
        self.agenda
            .schedule_after(PHASE_CHECK_INTERVAL_NS, Action::PhaseCheck);
    }

    /// Whether every member runs and has applied the leader's whole log.
    fn members_converged(&self) -> bool {
        let statuses: Vec<_> = self
            .members
            .iter()
            .filter_map(|member| member.running.as_ref())
            .map(|running| running.node.status())
            .collect();
        if statuses.len() != self.members.len() {
            return false;
        }
        let Some(leader) = statuses.iter().find(|status| status.is_leader) else {
            return false;
        };
        leader.commit_index == leader.last_index
            && statuses.iter().all(|status| {
                status.applied_index == leader.commit_index
                    && status.last_index == leader.last_index
                    && status.leader_id == leader.member_id
            })
    }

    /// After convergence every member must hold the same key space, history included:
    /// compared with etcd's `HashKV` at the current revision.
    fn compare_replicas(&mut self) {
        let mut hashes = Vec::new();
        for member in &self.members {
            let running = member.running.as_ref().expect("converged members run");
            let key_space = running.node.state_machine().key_space();
            match key_space.hash_kv(0) {
                Ok(response) => hashes.push((
                    member.id,
                    response.hash,
                    key_space.current_revision(),
                    key_space.compact_revision(),
                )),
                Err(error) => {
                    return self.fail(Violation::ReplicasDiffer(format!(
                        "member {} cannot hash its key space: {error}",
                        member.id
                    )))
                }
            }
        }
        let first = hashes[0];
        if let Some(different) = hashes
            .iter()
            .find(|hash| (hash.1, hash.2, hash.3) != (first.1, first.2, first.3))
        {
            self.fail(Violation::ReplicasDiffer(format!(
                "member {} has hash {:08x} at revision {} (compacted {}), member {} has hash \
                 {:08x} at revision {} (compacted {})",
                first.0,
                first.1,
                first.2,
                first.3,
                different.0,
                different.1,
                different.2,
                different.3
            )));
        }
    }

    /// One line per member for liveness reports.
    pub(crate) fn describe_members(&self) -> String {
        self.members
            .iter()
            .map(|member| match &member.running {
                None => format!("[{} down]", member.id),
                Some(running) => {
                    let status = running.node.status();
                    format!(
                        "[{} term {} leader {} commit {} applied {} last {}]",
                        member.id,
                        status.term,
                        status.leader_id,
                        status.commit_index,
                        status.applied_index,
                        status.last_index
                    )
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The history checks, run once the simulation is over.
    fn check_history(&mut self) -> Option<String> {
        let verdict = history::check(&self.history);
        if let Some(violation) = verdict.violation {
            self.fail(violation);
            return verdict.undecided;
        }
        if self.phase == Phase::Done {
            let result = acknowledged_writes::check(
                &self.history,
                &self.final_reads,
                self.final_reads_sent_ns,
            );
            self.check(result);
        }
        verdict.undecided
    }

    /// The history recorded so far.
    pub fn history(&self) -> &[Operation] {
        &self.history
    }
}

/// Runs one seed to completion and checks everything. A panic in the code under
/// simulation (an assertion in core, storage or raft-rs) is a violation like any other.
pub fn run_seed(seed: u64, options: SimOptions) -> RunReport {
    run_seed_with_history(seed, options).0
}

/// [`run_seed`], also returning the client history (to dump it for `keel-check`).
pub fn run_seed_with_history(seed: u64, options: SimOptions) -> (RunReport, Vec<Operation>) {
    run_world(World::new(seed, options))
}

/// Runs a world made with [`World::new`] (perhaps with `echo_events` set) and checks it.
pub fn run_world(mut world: World) -> (RunReport, Vec<Operation>) {
    let started = Instant::now();
    if let Err(message) = catch_simulation_panic(|| world.run()) {
        world.stats.simulated_ns = world.now_ns();
        world.fail(Violation::Panic(message));
    }
    let undecided = if world.violation.is_none() {
        world.check_history()
    } else {
        None
    };
    world.stats.operations = world.history.len() as u64;
    world.stats.leader_terms = world.invariants.election_safety.terms_with_leader() as u64;
    let report = RunReport {
        trace_digest: world.trace.digest(),
        recent_events: world.trace.recent_lines(),
        violation: world.violation.take(),
        undecided,
        stats: world.stats,
        config: world.config.clone(),
        wall_time: started.elapsed(),
    };
    (report, std::mem::take(&mut world.history))
}
