//! A member's settings: [`NodeConfig`] and the policies and deliberate bugs it names.

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
