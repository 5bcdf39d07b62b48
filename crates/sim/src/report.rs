//! The outcome of one run: its verdict, its trace digest, its counters, and for a failing
//! run the text a developer needs: the seed, one command that replays it, what broke and
//! the last events before it broke.

use std::fmt::Write as _;
use std::time::Duration;

use crate::config::{RunConfig, SimOptions, MILLISECOND_NS};
use crate::violation::Violation;

/// Counters of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Simulated time the run covered.
    pub simulated_ns: u64,
    /// Events the world handled.
    pub events: u64,
    /// Client operations in the history (answered or with unknown outcome).
    pub operations: u64,
    /// Operations answered.
    pub operations_answered: u64,
    /// Writes recorded with an unknown outcome.
    pub operations_unknown: u64,
    /// Requests that certainly had no effect (refused), left out of the history.
    pub operations_refused: u64,
    /// Answered lease requests (grants, puts with a lease, keep-alives, revocations).
    pub lease_operations_answered: u64,
    /// Raft messages sent.
    pub messages_sent: u64,
    /// Raft messages delivered.
    pub messages_delivered: u64,
    /// Raft messages lost, cut off or refused.
    pub messages_dropped: u64,
    /// Members stopped (killed, powered off, stopped after an fsync error).
    pub member_stops: u64,
    /// Members started again from their disks.
    pub member_restarts: u64,
    /// Snapshots received from a leader and installed.
    pub snapshots_installed: u64,
    /// Snapshots members made of their own state (log compactions).
    pub snapshots_made: u64,
    /// Persist calls that failed (fsync errors).
    pub persist_failures: u64,
    /// Faults the nemesis aimed at an own snapshot written off the member loop that
    /// hit one (a kill during the write, an fsync error or power loss during or after it).
    pub snapshot_write_faults: u64,
    /// Terms that had a leader.
    pub leader_terms: u64,
    /// Faults the nemesis injected.
    pub faults: u64,
}

impl RunStats {
    /// Adds another run's counters to these.
    pub fn add(&mut self, other: &RunStats) {
        self.simulated_ns += other.simulated_ns;
        self.events += other.events;
        self.operations += other.operations;
        self.operations_answered += other.operations_answered;
        self.operations_unknown += other.operations_unknown;
        self.operations_refused += other.operations_refused;
        self.lease_operations_answered += other.lease_operations_answered;
        self.messages_sent += other.messages_sent;
        self.messages_delivered += other.messages_delivered;
        self.messages_dropped += other.messages_dropped;
        self.member_stops += other.member_stops;
        self.member_restarts += other.member_restarts;
        self.snapshots_installed += other.snapshots_installed;
        self.snapshots_made += other.snapshots_made;
        self.persist_failures += other.persist_failures;
        self.snapshot_write_faults += other.snapshot_write_faults;
        self.leader_terms += other.leader_terms;
        self.faults += other.faults;
    }
}

/// The outcome of one seed.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// What the seed chose.
    pub config: RunConfig,
    /// The first violation found, if any.
    pub violation: Option<Violation>,
    /// Why the linearizability search stopped without a verdict, if it did.
    pub undecided: Option<String>,
    /// The digest of every event: equal for two runs of one seed.
    pub trace_digest: u64,
    /// The last events, formatted, oldest first.
    pub recent_events: Vec<String>,
    /// Counters.
    pub stats: RunStats,
    /// Wall-clock time of the run, including the history check.
    pub wall_time: Duration,
}

impl RunReport {
    /// The run's seed.
    pub fn seed(&self) -> u64 {
        self.config.seed
    }

    /// Whether the run found nothing wrong.
    pub fn passed(&self) -> bool {
        self.violation.is_none()
    }

    /// The command that replays this run exactly.
    pub fn replay_command(&self) -> String {
        replay_command(self.config.seed, &self.config.options)
    }

    /// A one-line summary.
    pub fn summary(&self) -> String {
        let verdict = match &self.violation {
            None => "ok".to_owned(),
            Some(violation) => {
                let text = violation.to_string();
                let first_line = text.lines().next().unwrap_or_default().to_owned();
                format!("VIOLATION: {first_line}")
            }
        };
        format!(
            "seed {}: {verdict} ({} members, {} ops, {} unknown, {} stops, {} snapshots \
             installed, {:.1} s simulated, {:.2} s wall, digest {:016x})",
            self.config.seed,
            self.config.member_count,
            self.stats.operations,
            self.stats.operations_unknown,
            self.stats.member_stops,
            self.stats.snapshots_installed,
            self.stats.simulated_ns as f64 / 1e9,
            self.wall_time.as_secs_f64(),
            self.trace_digest
        )
    }

    /// Everything a developer needs about a failing run.
    pub fn failure_text(&self) -> String {
        let mut text = String::new();
        let _ = writeln!(text, "=== keel-sim: seed {} FAILED ===", self.config.seed);
        if let Some(violation) = &self.violation {
            let _ = writeln!(text, "{violation}");
        }
        let _ = writeln!(text, "replay: {}", self.replay_command());
        let _ = writeln!(
            text,
            "at {:.3} s simulated; config: {} members, {} clients, {} keys, faults {:?}",
            self.stats.simulated_ns as f64 / 1e9,
            self.config.member_count,
            self.config.client_count,
            self.config.key_count,
            self.config.faults
        );
        let _ = writeln!(text, "last {} events:", self.recent_events.len());
        for line in &self.recent_events {
            let _ = writeln!(text, "  {line}");
        }
        text
    }
}

/// The command that replays `seed` with `options`.
pub fn replay_command(seed: u64, options: &SimOptions) -> String {
    format!(
        "cargo run -p keel-sim --release -- replay --seed {seed}{}",
        options.command_line_flags()
    )
}

/// Formats simulated nanoseconds as milliseconds for messages.
pub fn milliseconds(time_ns: u64) -> String {
    format!("{} ms", time_ns / MILLISECOND_NS)
}
