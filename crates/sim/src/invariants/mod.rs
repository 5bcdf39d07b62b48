//! The properties checked on every run, one per file.
//!
//! Step invariants (checked after every event a member handles, so that the first
//! violation stops the run with the events that caused it still in the trace):
//! - [`election_safety`]: at most one leader per term;
//! - [`log_matching`]: one (index, term) names one entry on every member;
//! - [`state_machine_safety`]: every member commits the same entry at an index, and
//!   snapshots agree with what was committed;
//! - [`applied_state`]: members that applied the same prefix have the same key space;
//! - [`monotonic`]: a member's term, commit, applied index and revision never move back
//!   within one boot.
//!
//! History invariants (checked once the run is over):
//! - [`history`]: linearizability (keel-check), revision invariants, serializable reads;
//! - [`acknowledged_writes`]: every acknowledged write survives into the final state.
//!
//! The liveness bound is enforced by the world, which owns the clock.

pub mod acknowledged_writes;
pub mod applied_state;
pub mod election_safety;
pub mod history;
pub mod log_matching;
pub mod monotonic;
pub mod state_machine_safety;

use crate::trace::Digest;
use keel_core::eraftpb::Entry;

/// A digest of what an entry says (type, data, context), to compare entries between
/// members without keeping their bytes.
pub fn entry_digest(entry: &Entry) -> u64 {
    let mut digest = Digest::default();
    digest.write(entry.get_entry_type() as u64);
    digest.write_bytes(entry.data.as_ref());
    digest.write_bytes(entry.context.as_ref());
    digest.value()
}
