//! keel's deterministic simulator: a whole cluster of `keel_core::Node`s, with their
//! write-ahead logs on simulated disks, a simulated network, simulated clocks and
//! simulated clients, in one thread, driven by one `u64` seed.
//!
//! # Using it
//!
//! - [`run_seed`] runs one seed and returns a [`RunReport`]: the violation found (if
//!   any), a digest of every event (two runs of one seed have equal digests), the last
//!   events, counters, and the command that replays the seed.
//! - [`run_campaign`] runs many seeds on several threads and reports seeds per minute and
//!   simulated operations per second.
//! - The `keel-sim` binary wraps both: `keel-sim replay --seed N`, `keel-sim campaign
//!   --seeds N --threads 2`.
//! - [`SimOptions`] switches on deliberate bugs, to prove the invariants catch them.
//!
//! # What a run is
//!
//! The seed chooses the cluster size (3 or 5), the workload, the timing and which faults
//! the nemesis injects (see [`config`] and [`nemesis`]). Clients send puts, linearizable
//! and serializable gets, deletes and compare-and-swaps while faults happen, and (in about
//! three runs in four) grant leases with TTLs of a few seconds, put keys with them, keep
//! some alive, revoke some and let others expire (see [`client`]); then everything heals
//! and the cluster must make progress within a bound; then the final state is read. The
//! invariants in [`invariants`] are checked after every event and on the history at the
//! end; the history check inserts each lease's expiry at the earliest instant the lease may
//! legally expire, derived from how fast a member's clock may run (see
//! [`invariants::history`]), so a key that vanishes earlier is a violation.
//!
//! # Why it can be trusted to replay
//!
//! The simulator has one clock (the [`scheduler`]'s agenda, ordered by time and then by
//! scheduling order), one random generator (SplitMix64, fixed forever, see [`random`]),
//! and only ordered maps. The core takes its randomness from seeds the simulator gives
//! it. So a seed and a commit determine a run.
//!
//! Clock faults are what a monotonic tick source can suffer: drift (ticks every 80 to
//! 200 ms instead of 100) and stalls (missed ticks skipped, never fired in a burst, as the
//! server's member loop does). Raft's safety does not depend on clocks; lease expiry does,
//! and the lease check's bound is derived from the fastest drift.
//!
//! Not simulated yet: membership changes, watches, lease time-to-live queries and lease
//! listings, and time-based lease reads (the core uses ReadIndex only).

#![deny(missing_docs)]

pub mod campaign;
pub mod client;
pub mod config;
pub mod invariants;
pub mod nemesis;
pub mod network;
pub mod panics;
pub mod random;
pub mod report;
pub mod scheduler;
pub mod shell;
pub mod trace;
pub mod violation;
pub mod workload;
pub mod world;

pub use campaign::{run_campaign, CampaignOptions, CampaignSummary};
pub use config::{RunConfig, ShellBug, SimOptions};
pub use keel_core::DeliberateBug;
pub use panics::install_quiet_panic_hook;
pub use report::{replay_command, RunReport, RunStats};
pub use violation::Violation;
pub use world::{run_seed, run_seed_with_history, run_world, World};
