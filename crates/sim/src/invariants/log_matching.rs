//! Log matching (Raft §5.3), in the form that can be checked entry by entry: a leader
//! creates at most one entry with a given index in a given term, so every member that
//! holds an entry at (index, term) holds the same one.
//!
//! Every entry a member appends to its log (the `entries` of each Ready, and the entries
//! it recovers from disk after a restart) is reduced to a digest and compared with the
//! first digest seen for its (index, term) anywhere in the cluster. Recovered entries are
//! included on purpose: an entry that comes back from disk different from what was
//! written would show up here as a mismatch.
//!
//! The other half of the property (equal entries at an index imply equal logs before it)
//! is covered for committed prefixes by `state_machine_safety`, which compares every
//! committed index.

use std::collections::BTreeMap;

use keel_core::eraftpb::Entry;

use super::entry_digest;
use crate::violation::Violation;

/// The digest and first holder of every (index, term) seen.
#[derive(Debug, Default)]
pub struct LogMatching {
    entries: BTreeMap<(u64, u64), (u64, u64)>,
}

impl LogMatching {
    /// Checks entries `member` now holds in its log.
    pub fn observe(&mut self, member: u64, entries: &[Entry]) -> Result<(), Violation> {
        for entry in entries {
            let digest = entry_digest(entry);
            let key = (entry.index, entry.term);
            match self.entries.get(&key) {
                None => {
                    self.entries.insert(key, (digest, member));
                }
                Some(&(known, _)) if known == digest => {}
                Some(&(_, first)) => {
                    return Err(Violation::LogMatching {
                        index: entry.index,
                        term: entry.term,
                        first,
                        second: member,
                    })
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    #[test]
    fn different_entries_at_one_index_and_term_are_a_violation() {
        let mut matching = LogMatching::default();
        matching
            .observe(1, &[entry(1, 1, b"a"), entry(2, 1, b"b")])
            .unwrap();
        matching.observe(2, &[entry(1, 1, b"a")]).unwrap();
        // Another term at the same index is a different entry, legitimately.
        matching.observe(3, &[entry(2, 2, b"c")]).unwrap();
        assert!(matches!(
            matching.observe(2, &[entry(2, 1, b"x")]),
            Err(Violation::LogMatching {
                index: 2,
                term: 1,
                first: 1,
                second: 2
            })
        ));
    }
}
