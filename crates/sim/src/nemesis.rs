//! The nemesis: during the fault phase it wakes up at random intervals and injects one
//! fault, of a kind the seed switched on, and schedules its end.
//!
//! Faults and how each is modelled:
//! - **process kill**: the member's process dies; its disk keeps everything it was given,
//!   fsynced or not (the page cache survives a kill -9). It restarts later.
//! - **power loss**: the member's machine loses power; what was not fsynced is lost, and
//!   half the time the unsynced tails are torn (a random prefix kept, its last bytes
//!   garbled), as `SimDisk::crash` models.
//! - **correlated power loss**: a majority, or the whole cluster, loses power at once,
//!   which is what makes durability bugs (an acknowledgement before fsync) visible.
//! - **symmetric partition**: the members split in two sides (often the leader alone)
//!   that cannot reach each other, until the partitions heal.
//! - **one-way partition**: a few directed links drop everything.
//! - **lossy links**: some links lose, duplicate and delay (so reorder) messages.
//! - **fsync failure**: one of the member's next fsyncs fails; the member stops, as the
//!   server does, and restarts later.
//! - **clock drift**: a member's ticks come faster (down to every 80 ms) or slower (up to
//!   every 200 ms) than every 100 ms, for a while. How fast a clock may run bounds how early
//!   a lease may expire, which the history check relies on.
//! - **clock stall**: a member's ticks stop for a while and the missed ones are skipped, as
//!   the server's member loop does when a long fsync holds it up. There is no "jump
//!   ahead": the server ticks from a monotonic clock and never fires missed ticks in a
//!   burst, so a wall-clock step (NTP, an operator) changes nothing it counts, and no lease
//!   can expire early because of one.
//! - **pause**: the member's process is frozen (a long GC, SIGSTOP): no ticks, no
//!   messages handled; what arrives waits until it resumes.
//! - **snapshot write fault**: aimed at a member's next own snapshot, which its
//!   snapshot thread writes off the member loop: the process is killed while it is
//!   written (the capture is lost), one of its fsyncs fails (the member stops), the
//!   power goes at one of its fsyncs (a torn temporary file, a rename not durable), or
//!   the power goes right after it is durable but before the member loop heard of it.
//!   (Process kills and power losses at random times also hit writes in flight.)

use crate::config::{MILLISECOND_NS, SECOND_NS, TICK_INTERVAL_NS_MAX, TICK_INTERVAL_NS_MIN};
use crate::shell::StopKind;
use crate::trace::TraceEvent;
use crate::world::{Action, Phase, SnapshotFault, World};

/// The kinds of fault the nemesis chooses from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FaultKind {
    ProcessKill,
    PowerLoss,
    CorrelatedPowerLoss,
    Partition,
    OneWayPartition,
    LossyLinks,
    FsyncFailure,
    ClockDrift,
    ClockStall,
    Pause,
    SnapshotWrite,
}

impl World {
    fn enabled_faults(&self) -> Vec<FaultKind> {
        let faults = &self.config.faults;
        [
            (faults.process_kill, FaultKind::ProcessKill),
            (faults.power_loss, FaultKind::PowerLoss),
            (faults.correlated_power_loss, FaultKind::CorrelatedPowerLoss),
            (faults.partition, FaultKind::Partition),
            (faults.one_way_partition, FaultKind::OneWayPartition),
            (faults.lossy_links, FaultKind::LossyLinks),
            (faults.fsync_failure, FaultKind::FsyncFailure),
            (faults.clock_drift, FaultKind::ClockDrift),
            (faults.clock_stall, FaultKind::ClockStall),
            (faults.pause, FaultKind::Pause),
            (faults.snapshot_write, FaultKind::SnapshotWrite),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, kind)| kind)
        .collect()
    }

    /// The nemesis wakes up.
    pub(crate) fn on_nemesis(&mut self) {
        if self.phase != Phase::Faults {
            return;
        }
        let interval_ns = self.config.faults.nemesis_interval_ns;
        let delay = self.random.between(interval_ns / 2, interval_ns * 3 / 2);
        self.agenda.schedule_after(delay, Action::Nemesis);
        let kinds = self.enabled_faults();
        if kinds.is_empty() {
            return;
        }
        let kind = kinds[self.random.index(kinds.len())];
        self.stats.faults += 1;
        match kind {
            FaultKind::ProcessKill => {
                if let Some(id) = self.random_running_member() {
                    self.stop_member(id, StopKind::ProcessExit);
                    self.schedule_restart(id);
                }
            }
            FaultKind::PowerLoss => {
                if let Some(id) = self.random_running_member() {
                    let torn = self.random.below(2) == 0;
                    self.stop_member(id, StopKind::PowerLoss { torn });
                    self.schedule_restart(id);
                }
            }
            FaultKind::CorrelatedPowerLoss => self.correlated_power_loss(),
            FaultKind::Partition => self.partition(),
            FaultKind::OneWayPartition => self.one_way_partition(),
            FaultKind::LossyLinks => self.degrade_links(),
            FaultKind::FsyncFailure => {
                if let Some(id) = self.random_running_member() {
                    let successes = self.random.below(30);
                    let failures = self.random.between(1, 2);
                    self.member(id).disk.fail_fsync_after(successes, failures);
                    self.record(TraceEvent::Fault(format!(
                        "member {id}: {failures} fsync(s) fail after {successes} more succeed"
                    )));
                }
            }
            FaultKind::ClockDrift => {
                let id = self.random_member();
                let interval_ns = self
                    .random
                    .between(TICK_INTERVAL_NS_MIN, TICK_INTERVAL_NS_MAX);
                self.member_mut(id).tick_interval_ns = interval_ns;
                let duration = self.random.between(2, 10) * SECOND_NS;
                self.agenda
                    .schedule_after(duration, Action::RestoreClock { member: id });
                self.record(TraceEvent::Fault(format!(
                    "member {id}: ticks every {:.1} ms",
                    interval_ns as f64 / MILLISECOND_NS as f64
                )));
            }
            FaultKind::ClockStall => {
                let id = self.random_member();
                let stall_ns = self.random.between(300, 4_000) * MILLISECOND_NS;
                let now = self.now_ns();
                self.member_mut(id).clock_stalled_until_ns = now + stall_ns;
                self.record(TraceEvent::Fault(format!(
                    "member {id}: clock stalls for {} ms, missed ticks skipped",
                    stall_ns / MILLISECOND_NS
                )));
            }
            FaultKind::SnapshotWrite => {
                if let Some(id) = self.random_running_member() {
                    let successes_before = self.random.below(2);
                    let fault = match self.random.below(4) {
                        0 => SnapshotFault::ProcessKilledDuringWrite,
                        1 => SnapshotFault::FsyncError { successes_before },
                        2 => SnapshotFault::PowerLossMidWrite { successes_before },
                        _ => SnapshotFault::PowerLossAfterWrite,
                    };
                    self.member_mut(id).snapshot_fault = Some(fault);
                    self.record(TraceEvent::Fault(format!(
                        "member {id}: its next snapshot write meets {fault:?}"
                    )));
                }
            }
            FaultKind::Pause => {
                if let Some(id) = self.random_running_member() {
                    let pause_ns = self.random.between(200, 6_000) * MILLISECOND_NS;
                    let now = self.now_ns();
                    self.member_mut(id).paused_until_ns = now + pause_ns;
                    self.record(TraceEvent::Fault(format!(
                        "member {id}: paused for {} ms",
                        pause_ns / MILLISECOND_NS
                    )));
                }
            }
        }
    }

    fn random_member(&mut self) -> u64 {
        1 + self.random.below(self.members.len() as u64)
    }

    fn random_running_member(&mut self) -> Option<u64> {
        let running: Vec<u64> = self
            .members
            .iter()
            .filter(|member| member.is_running())
            .map(|member| member.id)
            .collect();
        if running.is_empty() {
            None
        } else {
            Some(running[self.random.index(running.len())])
        }
    }

    fn shuffled_members(&mut self) -> Vec<u64> {
        let mut ids = self.member_ids();
        for position in (1..ids.len()).rev() {
            let other = self.random.index(position + 1);
            ids.swap(position, other);
        }
        ids
    }

    fn correlated_power_loss(&mut self) {
        let count = self.members.len();
        let victims = if self.random.below(3) == 0 {
            count
        } else {
            count / 2 + 1
        };
        self.record(TraceEvent::Fault(format!(
            "correlated power loss of {victims} members"
        )));
        for id in self.shuffled_members().into_iter().take(victims) {
            let torn = self.random.below(2) == 0;
            self.stop_member(id, StopKind::PowerLoss { torn });
            self.schedule_restart(id);
        }
    }

    fn leader(&self) -> Option<u64> {
        self.members
            .iter()
            .filter_map(|member| member.running.as_ref().map(|running| (member.id, running)))
            .find(|(_, running)| running.node.status().is_leader)
            .map(|(id, _)| id)
    }

    fn partition(&mut self) {
        let shuffled = self.shuffled_members();
        let side: Vec<u64> = match self.leader() {
            Some(leader) if self.random.below(3) == 0 => vec![leader],
            _ => {
                let size = self.random.between(1, shuffled.len() as u64 - 1) as usize;
                shuffled[..size].to_vec()
            }
        };
        for a in self.member_ids() {
            for b in self.member_ids() {
                if side.contains(&a) != side.contains(&b) {
                    self.network.link_mut(a, b).cut = true;
                }
            }
        }
        let duration = self.random.between(500, 8_000) * MILLISECOND_NS;
        self.agenda.schedule_after(duration, Action::Reconnect);
        self.record(TraceEvent::Fault(format!(
            "partition {side:?} from the rest for {} ms",
            duration / MILLISECOND_NS
        )));
    }

    fn one_way_partition(&mut self) {
        let count = self.random.between(1, self.members.len() as u64);
        let mut cut = Vec::new();
        for _ in 0..count {
            let from = self.random_member();
            let to = self.random_member();
            if from != to {
                self.network.link_mut(from, to).cut = true;
                cut.push((from, to));
            }
        }
        let duration = self.random.between(500, 8_000) * MILLISECOND_NS;
        self.agenda.schedule_after(duration, Action::Reconnect);
        self.record(TraceEvent::Fault(format!(
            "one-way cuts {cut:?} for {} ms",
            duration / MILLISECOND_NS
        )));
    }

    fn degrade_links(&mut self) {
        let faults = self.config.faults.clone();
        let mut degraded = 0;
        for from in self.member_ids() {
            for to in self.member_ids() {
                if from == to || self.random.below(2) == 0 {
                    continue;
                }
                let loss_ppm = self.random.below(u64::from(faults.loss_ppm_max) + 1) as u32;
                let duplicate_ppm =
                    self.random.below(u64::from(faults.duplicate_ppm_max) + 1) as u32;
                let extra_jitter_ns = self.random.below(faults.delay_jitter_ns_max + 1);
                let link = self.network.link_mut(from, to);
                link.loss_ppm = loss_ppm;
                link.duplicate_ppm = duplicate_ppm;
                link.jitter_ns += extra_jitter_ns;
                degraded += 1;
            }
        }
        let duration = self.random.between(1, 10) * SECOND_NS;
        self.agenda.schedule_after(duration, Action::RestoreLinks);
        self.record(TraceEvent::Fault(format!(
            "{degraded} links lossy for {} ms",
            duration / MILLISECOND_NS
        )));
    }

    /// Degraded links get their healthy behaviour back.
    pub(crate) fn restore_links(&mut self) {
        self.network.restore_quality();
    }
}
