//! Applied state agreement: members that applied the same prefix of the log have the
//! same key space.
//!
//! `state_machine_safety` proves the prefixes are the same; this checks that applying
//! them (entry by entry, or by restoring a snapshot made elsewhere) gave the same result,
//! which catches a non-deterministic state machine or a snapshot that does not round-trip.
//! Each time a member's applied index changes, its whole key space (every live key with
//! value, versions and revisions, plus the current and compacted revisions) is reduced to
//! a fingerprint and compared with the first fingerprint recorded at that applied index.
//! The key space is small in the simulator (a handful of keys), so this is cheap.

use std::collections::BTreeMap;

use crate::violation::Violation;

/// A key space reduced to a comparable value, with a little that explains a mismatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateFingerprint {
    /// The digest of the whole key space.
    pub digest: u64,
    /// The current revision.
    pub revision: i64,
    /// The compacted revision.
    pub compact_revision: i64,
    /// How many keys are live.
    pub key_count: usize,
}

impl StateFingerprint {
    fn describe(&self) -> String {
        format!(
            "revision {}, compacted {}, {} keys, digest {:016x}",
            self.revision, self.compact_revision, self.key_count, self.digest
        )
    }
}

/// The first fingerprint seen at each applied index.
#[derive(Debug, Default)]
pub struct AppliedState {
    states: BTreeMap<u64, (StateFingerprint, u64)>,
}

impl AppliedState {
    /// Records that `member` has applied up to `applied_index` and has `fingerprint`.
    pub fn observe(
        &mut self,
        member: u64,
        applied_index: u64,
        fingerprint: StateFingerprint,
    ) -> Result<(), Violation> {
        match self.states.get(&applied_index) {
            None => {
                self.states.insert(applied_index, (fingerprint, member));
                Ok(())
            }
            Some((known, _)) if *known == fingerprint => Ok(()),
            Some((known, first)) => Err(Violation::AppliedStateDiverged {
                applied_index,
                first: *first,
                second: member,
                first_description: known.describe(),
                second_description: fingerprint.describe(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint(digest: u64) -> StateFingerprint {
        StateFingerprint {
            digest,
            revision: 2,
            compact_revision: 0,
            key_count: 1,
        }
    }

    #[test]
    fn different_states_at_one_applied_index_are_a_violation() {
        let mut applied = AppliedState::default();
        applied.observe(1, 5, fingerprint(1)).unwrap();
        applied.observe(2, 5, fingerprint(1)).unwrap();
        applied.observe(2, 6, fingerprint(2)).unwrap();
        assert!(matches!(
            applied.observe(3, 5, fingerprint(3)),
            Err(Violation::AppliedStateDiverged {
                applied_index: 5,
                first: 1,
                second: 3,
                ..
            })
        ));
    }
}
