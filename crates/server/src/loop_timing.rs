//! Where the member loop's time goes, batch by batch. A batch (the inputs
//! taken from the queue, a tick, and the Ready cycles that follow) that takes
//! longer than [`SLOW_BATCH_THRESHOLD`] is logged with its phases, so that a
//! write stall can be traced to its cause: work on the loop (applying entries,
//! handling inputs), the disk (the log's fsync, releasing segments), sending,
//! or no CPU at all. The last comes from the kernel's scheduler statistics for
//! the loop's thread (`/proc/thread-self/schedstat`: time spent waiting on a
//! run queue), read once per batch with one `pread`.
//!
//! The cost is a few clock readings per batch and that one read; nothing is
//! recorded for a batch under the threshold.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// A batch of the member loop slower than this is logged with its phases.
/// etcd warns about an apply slower than 100 ms (`warnApplyDuration`); a batch
/// holds the apply and the fsync, and 100 ms is half the heartbeat-to-election
/// margin a stall must stay under.
pub const SLOW_BATCH_THRESHOLD: Duration = Duration::from_millis(100);

/// What the loop was doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Handling the inputs taken from the queue (stepping the node, reads
    /// answered on the loop, captures handed to helper threads).
    Inputs,
    /// Taking a Ready and advancing it, inside the node: applying committed
    /// entries, and raft-rs's own work.
    Node,
    /// Making entries and hard state durable (the log's append and fsync), and
    /// writing received snapshots.
    Persist,
    /// Recording an own snapshot's marker and releasing log segments behind it.
    CompactLog,
    /// Handing messages to the peer connections.
    Send,
    /// Answering clients.
    Deliver,
    /// Everything else: ticks, publishing the revision, membership, metrics.
    Other,
}

const PHASES: [Phase; 7] = [
    Phase::Inputs,
    Phase::Node,
    Phase::Persist,
    Phase::CompactLog,
    Phase::Send,
    Phase::Deliver,
    Phase::Other,
];

/// The member loop's timer; owned by the loop thread.
pub struct LoopTimer {
    batch_started: Instant,
    phase_started: Instant,
    phases: [Duration; PHASES.len()],
    readies: usize,
    inputs: usize,
    /// This thread's `/proc/thread-self/schedstat`, when the kernel has it.
    schedstat: Option<File>,
    run_queue_wait_at_start_nanoseconds: u64,
}

impl LoopTimer {
    /// A timer for the calling thread, which must be the member loop's.
    pub fn new() -> LoopTimer {
        let now = Instant::now();
        LoopTimer {
            batch_started: now,
            phase_started: now,
            phases: [Duration::ZERO; PHASES.len()],
            readies: 0,
            inputs: 0,
            schedstat: File::open("/proc/thread-self/schedstat").ok(),
            run_queue_wait_at_start_nanoseconds: 0,
        }
    }

    /// A batch starts (the loop got its first input, or its tick is due).
    pub fn begin_batch(&mut self) {
        self.batch_started = Instant::now();
        self.phase_started = self.batch_started;
        self.phases = [Duration::ZERO; PHASES.len()];
        self.readies = 0;
        self.inputs = 0;
        self.run_queue_wait_at_start_nanoseconds = self.run_queue_wait_nanoseconds();
    }

    /// The time since the previous call (or the batch's start) was spent in
    /// `phase`.
    pub fn end_phase(&mut self, phase: Phase) {
        let now = Instant::now();
        let index = PHASES
            .iter()
            .position(|candidate| *candidate == phase)
            .expect("every phase is listed");
        self.phases[index] += now - self.phase_started;
        self.phase_started = now;
    }

    /// Counts the batch's inputs and Ready cycles, for the log line.
    pub fn count(&mut self, inputs: usize, readies: usize) {
        self.inputs += inputs;
        self.readies += readies;
    }

    /// The batch is over: logs it when it was slow.
    pub fn end_batch(&mut self) {
        self.end_phase(Phase::Other);
        let total = self.batch_started.elapsed();
        if total <= SLOW_BATCH_THRESHOLD {
            return;
        }
        let run_queue_wait_milliseconds = self
            .run_queue_wait_nanoseconds()
            .saturating_sub(self.run_queue_wait_at_start_nanoseconds)
            / 1_000_000;
        let milliseconds = |phase: Phase| {
            let index = PHASES.iter().position(|candidate| *candidate == phase);
            index.map_or(0, |index| self.phases[index].as_millis() as u64)
        };
        tracing::warn!(
            took_milliseconds = total.as_millis() as u64,
            inputs = self.inputs,
            readies = self.readies,
            inputs_milliseconds = milliseconds(Phase::Inputs),
            node_milliseconds = milliseconds(Phase::Node),
            persist_milliseconds = milliseconds(Phase::Persist),
            compact_log_milliseconds = milliseconds(Phase::CompactLog),
            send_milliseconds = milliseconds(Phase::Send),
            deliver_milliseconds = milliseconds(Phase::Deliver),
            other_milliseconds = milliseconds(Phase::Other),
            run_queue_wait_milliseconds,
            "member loop batch took too long"
        );
    }

    /// Nanoseconds this thread has waited for a CPU since it started (the
    /// second field of schedstat), or 0 when unknown.
    fn run_queue_wait_nanoseconds(&self) -> u64 {
        let Some(file) = &self.schedstat else {
            return 0;
        };
        let mut buffer = [0u8; 96];
        let Ok(length) = file.read_at(&mut buffer, 0) else {
            return 0;
        };
        std::str::from_utf8(&buffer[..length])
            .ok()
            .and_then(|text| text.split_whitespace().nth(1))
            .and_then(|field| field.parse().ok())
            .unwrap_or(0)
    }
}

impl Default for LoopTimer {
    fn default() -> LoopTimer {
        LoopTimer::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_add_up_and_the_run_queue_wait_is_read() {
        let mut timer = LoopTimer::new();
        timer.begin_batch();
        std::thread::sleep(Duration::from_millis(2));
        timer.end_phase(Phase::Persist);
        timer.end_phase(Phase::Send);
        let persist = timer.phases[2];
        assert!(persist >= Duration::from_millis(2), "{persist:?}");
        assert!(timer.phases[4] < persist);
        if std::path::Path::new("/proc/thread-self/schedstat").exists() {
            // A thread that has run has waited for a CPU at least once.
            let first = timer.run_queue_wait_nanoseconds();
            std::thread::yield_now();
            assert!(timer.run_queue_wait_nanoseconds() >= first);
        }
        timer.end_batch();
    }
}
