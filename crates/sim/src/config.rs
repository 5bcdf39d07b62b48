//! What a run is: the options the caller picks ([`SimOptions`]) and everything the seed
//! picks ([`RunConfig`]): cluster size, workload, timing and which faults are on.
//!
//! Faults are chosen per seed in the manner of "swarm testing" (Groce et al., 2012): each
//! kind is switched on or off by the seed, and its intensity drawn, so that some runs
//! hammer one fault hard while others mix many gently. A fixed mix of every fault at once
//! tends to hide the bugs that need a long quiet stretch of one kind.

use keel_core::DeliberateBug;

use crate::random::SimRandom;

/// One simulated millisecond, in the simulator's time unit (nanoseconds, the unit the
/// check crate's histories use).
pub const MILLISECOND_NS: u64 = 1_000_000;

/// One simulated second.
pub const SECOND_NS: u64 = 1_000 * MILLISECOND_NS;

/// The nominal time between two ticks of a member, as etcd's default heartbeat interval.
pub const TICK_INTERVAL_NS: u64 = 100 * MILLISECOND_NS;

/// The shortest time between two ticks a drifting clock gives: 25% fast.
///
/// The server ticks from a monotonic clock (`Instant`) and skips ticks it fell behind on
/// rather than firing them in a burst (`server/src/member.rs`), so a member never ticks
/// more often than its clock's rate allows; it may tick far less often (stalls, pauses).
/// Real monotonic clocks drift by parts per million; 25% is a stress far beyond that, kept
/// small enough that the lease check stays sharp: how early a lease may expire is derived
/// from this bound (see `invariants::history::lease_expiry_bound`).
pub const TICK_INTERVAL_NS_MIN: u64 = 80 * MILLISECOND_NS;

/// The longest time between two ticks a drifting clock gives: half speed.
pub const TICK_INTERVAL_NS_MAX: u64 = 200 * MILLISECOND_NS;

/// The shortest TTL the workload grants: the core's minimum with its default election
/// timeout (1.5 election timeouts, rounded up to whole seconds), so that every grant keeps
/// the TTL asked for.
pub const LEASE_TTL_SECONDS_MIN: u64 = 2;

/// A deliberately wrong behaviour of the simulator's own shell, to prove the invariants
/// catch what a buggy server would do. Always `None` outside those tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShellBug {
    /// Correct behaviour.
    #[default]
    None,
    /// Send `messages_after_persist` (votes, append acknowledgements) and advance the node
    /// at once, but write what was to be persisted only at the next periodic flush, as a
    /// server that acknowledges before fsync would. A crash loses what was not flushed.
    AcknowledgeBeforeFsync,
}

/// What the caller chooses about a run; everything else comes from the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimOptions {
    /// A deliberate bug in the core, passed to every member's `NodeConfig`.
    pub core_bug: DeliberateBug,
    /// A deliberate bug in the simulator's shell.
    pub shell_bug: ShellBug,
    /// Run without any fault (for measuring and for debugging the simulator itself).
    pub faults_off: bool,
    /// After an fsync error the member's process exits but the machine keeps running, so
    /// its restart reads back, from the page cache, the bytes whose write-back failed
    /// (Linux's behaviour, PostgreSQL's "fsyncgate"). Off by default because today's
    /// storage does not survive it (see the simulator's findings in the crate report);
    /// by default the member's machine also loses power, which discards those bytes.
    pub fsync_error_keeps_page_cache: bool,
    /// Let the network duplicate forwarded proposals (`MsgPropose`) like any other
    /// message. Off by default: keel's TCP transport never duplicates a message, and the
    /// core does not deduplicate proposals, so a duplicate is applied twice (see the
    /// simulator's findings in the crate report).
    pub duplicate_proposals: bool,
    /// Report nothing to the leader when a snapshot reaches its follower, as the server's
    /// transport does today. A follower that then fails to install it (a crash) stays
    /// stuck until the next election (see the simulator's findings in the crate report).
    pub snapshot_sent_unreported: bool,
}

impl SimOptions {
    /// The extra command-line flags that select these options, for replay commands.
    pub fn command_line_flags(&self) -> String {
        let mut flags = String::new();
        match self.core_bug {
            DeliberateBug::None => {}
            DeliberateBug::ReadsWithoutReadIndex => {
                flags.push_str(" --bug reads-without-read-index")
            }
            DeliberateBug::LeaseExpiresAtHalfTtl => {
                flags.push_str(" --bug lease-expires-at-half-ttl")
            }
        }
        match self.shell_bug {
            ShellBug::None => {}
            ShellBug::AcknowledgeBeforeFsync => flags.push_str(" --bug acknowledge-before-fsync"),
        }
        if self.faults_off {
            flags.push_str(" --faults-off");
        }
        if self.fsync_error_keeps_page_cache {
            flags.push_str(" --fsync-error-keeps-page-cache");
        }
        if self.duplicate_proposals {
            flags.push_str(" --duplicate-proposals");
        }
        if self.snapshot_sent_unreported {
            flags.push_str(" --snapshot-sent-unreported");
        }
        flags
    }
}

/// Which faults a run injects and how hard. Probabilities are in parts per million.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultConfig {
    /// Mean time between two fault decisions of the nemesis.
    pub nemesis_interval_ns: u64,
    /// Kill one member's process (un-fsynced data stays in the page cache).
    pub process_kill: bool,
    /// Power loss of one member: un-fsynced data is lost, the tail may be torn.
    pub power_loss: bool,
    /// Power loss of a majority or of the whole cluster at once.
    pub correlated_power_loss: bool,
    /// Symmetric partitions: the members split into two sides that cannot talk.
    pub partition: bool,
    /// One-way partitions: some directed links drop everything.
    pub one_way_partition: bool,
    /// Links that lose, duplicate and delay messages for a while.
    pub lossy_links: bool,
    /// The highest loss probability a degraded link gets.
    pub loss_ppm_max: u32,
    /// The highest duplication probability a degraded link gets.
    pub duplicate_ppm_max: u32,
    /// The highest extra delay (and so reordering window) a degraded link gets.
    pub delay_jitter_ns_max: u64,
    /// Fsync errors: the member stops, as the server does.
    pub fsync_failure: bool,
    /// Members whose clock runs fast or slow for a while.
    pub clock_drift: bool,
    /// Clock stalls: a member's ticks stop for a while and the missed ones are skipped, as
    /// the server's member loop does when it falls behind. (A wall-clock jump does not
    /// reach the server's ticks at all: they come from a monotonic clock.)
    pub clock_stall: bool,
    /// Process pauses (a long GC or SIGSTOP): the member does nothing for a while.
    pub pause: bool,
    /// Faults aimed at a member's next own snapshot, which is written off its member
    /// loop: the process dies while it is written, an fsync of it fails, or the power
    /// goes mid-write or just after it (before the loop heard it was durable).
    pub snapshot_write: bool,
}

impl FaultConfig {
    fn none() -> FaultConfig {
        FaultConfig {
            nemesis_interval_ns: 60 * SECOND_NS,
            process_kill: false,
            power_loss: false,
            correlated_power_loss: false,
            partition: false,
            one_way_partition: false,
            lossy_links: false,
            loss_ppm_max: 0,
            duplicate_ppm_max: 0,
            delay_jitter_ns_max: 0,
            fsync_failure: false,
            clock_drift: false,
            clock_stall: false,
            pause: false,
            snapshot_write: false,
        }
    }

    fn from_seed(random: &mut SimRandom) -> FaultConfig {
        // Each kind is on with probability 3/4, so that about one run in four lacks it.
        let on = |random: &mut SimRandom| random.below(4) != 0;
        FaultConfig {
            nemesis_interval_ns: random.between(300, 3_000) * MILLISECOND_NS,
            process_kill: on(random),
            power_loss: on(random),
            correlated_power_loss: on(random),
            partition: on(random),
            one_way_partition: on(random),
            lossy_links: on(random),
            loss_ppm_max: random.between(10_000, 400_000) as u32,
            duplicate_ppm_max: random.between(0, 200_000) as u32,
            delay_jitter_ns_max: random.between(1, 200) * MILLISECOND_NS,
            fsync_failure: on(random),
            clock_drift: on(random),
            clock_stall: on(random),
            pause: on(random),
            snapshot_write: on(random),
        }
    }

    /// Whether any fault kind is on.
    pub fn any(&self) -> bool {
        self.process_kill
            || self.power_loss
            || self.correlated_power_loss
            || self.partition
            || self.one_way_partition
            || self.lossy_links
            || self.fsync_failure
            || self.clock_drift
            || self.clock_stall
            || self.pause
            || self.snapshot_write
    }
}

/// Everything about a run that the seed decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunConfig {
    /// The run's seed.
    pub seed: u64,
    /// The caller's options.
    pub options: SimOptions,
    /// Members in the cluster: 3 or 5.
    pub member_count: usize,
    /// Concurrent clients, each with one request outstanding at a time.
    pub client_count: usize,
    /// Keys the clients use; few, so that requests conflict.
    pub key_count: usize,
    /// How long faults are injected.
    pub fault_phase_ns: u64,
    /// The longest a client waits between two requests.
    pub client_think_ns_max: u64,
    /// How long a client waits for an answer before recording an unknown outcome.
    pub client_timeout_ns: u64,
    /// Per-mille of client requests that are serializable reads, linearizable reads,
    /// deletes and compare-and-swaps; the rest are puts.
    pub serializable_read_per_mille: u64,
    /// See `serializable_read_per_mille`.
    pub linearizable_read_per_mille: u64,
    /// See `serializable_read_per_mille`.
    pub delete_per_mille: u64,
    /// See `serializable_read_per_mille`.
    pub compare_and_swap_per_mille: u64,
    /// Per-mille of workload requests that are lease steps (a grant, a put with the lease,
    /// a read of a lease key, a revocation); keep-alives come on top, when due. 0 in about
    /// one run in four.
    pub lease_per_mille: u64,
    /// The shortest TTL granted, in seconds.
    pub lease_ttl_seconds_min: u64,
    /// The longest TTL granted, in seconds: short, so that leases expire within a run.
    pub lease_ttl_seconds_max: u64,
    /// Per-mille of leases that end with a revocation.
    pub lease_revoke_per_mille: u64,
    /// Per-mille of the other leases that are kept alive for a while before they expire;
    /// the rest expire without a keep-alive.
    pub lease_keep_alive_per_mille: u64,
    /// The time between two keep-alives of a lease, in per-mille of its TTL, at most (each
    /// gap is drawn from half this to this): a third of the TTL is etcd's clients' habit;
    /// longer gaps make keep-alives race the lease's expiry, and some come too late.
    pub lease_keep_alive_interval_per_mille: u64,
    /// Lease keys per workload client.
    pub lease_keys_per_client: usize,
    /// `NodeConfig::lease_checkpoint_interval_ticks`: often, so that checkpoints and
    /// keep-alives race.
    pub lease_checkpoint_interval_ticks: u64,
    /// Base one-way network delay of a healthy link.
    pub link_delay_ns: u64,
    /// Extra random delay of a healthy link (messages of one link may be reordered).
    pub link_jitter_ns: u64,
    /// `NodeConfig::snapshot_entries_interval`: small, so snapshots, log compaction
    /// and snapshot transfer happen in every run.
    pub snapshot_entries_interval: u64,
    /// `NodeConfig::snapshot_catch_up_entries`.
    pub snapshot_catch_up_entries: u64,
    /// `NodeConfig::request_timeout_ticks`.
    pub request_timeout_ticks: u64,
    /// Ticks between two flushes of deferred writes under
    /// [`ShellBug::AcknowledgeBeforeFsync`].
    pub deferred_flush_ticks: u64,
    /// The faults.
    pub faults: FaultConfig,
}

impl RunConfig {
    /// Derives a run's configuration from its seed. The first draws of the seed's
    /// generator are spent here; the world continues with the same generator.
    pub fn from_seed(seed: u64, options: SimOptions, random: &mut SimRandom) -> RunConfig {
        let member_count = if random.below(3) == 0 { 5 } else { 3 };
        let faults = FaultConfig::from_seed(random);
        let faults = if options.faults_off {
            FaultConfig::none()
        } else {
            faults
        };
        RunConfig {
            seed,
            options,
            member_count,
            client_count: random.between(2, 6) as usize,
            key_count: random.between(3, 8) as usize,
            fault_phase_ns: random.between(15, 30) * SECOND_NS,
            client_think_ns_max: random.between(5, 150) * MILLISECOND_NS,
            client_timeout_ns: random.between(3, 6) * SECOND_NS,
            serializable_read_per_mille: random.between(0, 150),
            linearizable_read_per_mille: random.between(100, 300),
            delete_per_mille: random.between(0, 100),
            compare_and_swap_per_mille: random.between(50, 300),
            lease_per_mille: if random.below(4) == 0 {
                0
            } else {
                random.between(50, 300)
            },
            lease_ttl_seconds_min: LEASE_TTL_SECONDS_MIN,
            lease_ttl_seconds_max: random.between(LEASE_TTL_SECONDS_MIN, 6),
            lease_revoke_per_mille: random.between(0, 1_000),
            lease_keep_alive_per_mille: random.between(0, 1_000),
            lease_keep_alive_interval_per_mille: if random.below(2) == 0 {
                333
            } else {
                random.between(333, 1_200)
            },
            lease_keys_per_client: random.between(1, 3) as usize,
            lease_checkpoint_interval_ticks: random.between(5, 50),
            link_delay_ns: random.between(100, 5_000) * 1_000,
            link_jitter_ns: random.between(0, 5_000) * 1_000,
            snapshot_entries_interval: random.between(50, 200),
            snapshot_catch_up_entries: random.between(10, 50),
            request_timeout_ticks: random.between(20, 40),
            deferred_flush_ticks: 10,
            faults,
        }
    }
}
