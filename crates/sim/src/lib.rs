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
//! and serializable gets, deletes and compare-and-swaps while faults happen; then
//! everything heals and the cluster must make progress within a bound; then the final
//! state is read. The invariants in [`invariants`] are checked after every event and on
//! the history at the end.
//!
//! # Why it can be trusted to replay
//!
//! The simulator has one clock (the [`scheduler`]'s agenda, ordered by time and then by
//! scheduling order), one random generator (SplitMix64, fixed forever, see [`random`]),
//! and only ordered maps. The core takes its randomness from seeds the simulator gives
//! it. So a seed and a commit determine a run.
//!
//! Not simulated yet: leases (they reached the core after this simulator was written;
//! the workload does not grant or attach any), membership changes, watches, and time-based
//! lease reads (the core uses ReadIndex only, so clock faults are expected to be harmless
//! to safety; they are injected to check exactly that).

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
