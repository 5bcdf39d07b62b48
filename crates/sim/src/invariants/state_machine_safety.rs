//! State machine safety (Raft §5.4.3): if a member has applied a log entry at a given
//! index, no other member ever applies a different entry for that index.
//!
//! The simulator keeps a shadow of each member's log (term and digest per index, from
//! the entries of every Ready, the snapshots it installs and what it recovers after a
//! restart) and watches its commit index. Each time a member's commit index moves past an
//! index, the entry its shadow log holds there is compared with the first entry any member
//! committed at that index. Checking at commit time rather than at append time is what
//! makes this sound: a member may legitimately hold an uncommitted entry from a deposed
//! leader at an index that is already committed elsewhere, but it must never commit it.
//!
//! Applying follows committing in order, so comparing committed entries covers applied
//! ones; `applied_state` then checks that applying them gave the same key space.
//! Snapshots are checked too: a snapshot at index `s` with term `t` must agree with the
//! term committed at `s`. Recovered logs are re-checked from the snapshot up, so an entry
//! that a crash changed under a commit index is caught when the member commits again.

use std::collections::BTreeMap;

use keel_core::eraftpb::Entry;

use super::entry_digest;
use crate::violation::Violation;

/// What was first committed at an index.
#[derive(Debug, Clone, Copy)]
struct Committed {
    term: u64,
    /// Unknown when the index was first seen committed as a snapshot's last index.
    digest: Option<u64>,
    member: u64,
}

/// A member's log as the simulator last saw it.
#[derive(Debug, Default)]
struct ShadowLog {
    snapshot_index: u64,
    snapshot_term: u64,
    /// `entries[i]` is the (term, digest) at index `snapshot_index + 1 + i`.
    entries: Vec<(u64, u64)>,
    /// The commit index up to which this member's entries were compared.
    checked_commit: u64,
}

impl ShadowLog {
    fn last_index(&self) -> u64 {
        self.snapshot_index + self.entries.len() as u64
    }

    fn get(&self, index: u64) -> Option<(u64, Option<u64>)> {
        if index == self.snapshot_index {
            return Some((self.snapshot_term, None));
        }
        let position = index.checked_sub(self.snapshot_index + 1)?;
        self.entries
            .get(position as usize)
            .map(|&(term, digest)| (term, Some(digest)))
    }
}

/// The shadow logs and everything committed so far.
#[derive(Debug, Default)]
pub struct StateMachineSafety {
    logs: BTreeMap<u64, ShadowLog>,
    committed: BTreeMap<u64, Committed>,
}

impl StateMachineSafety {
    /// A member (re)started with this snapshot and these recovered entries.
    pub fn on_start(
        &mut self,
        member: u64,
        snapshot_index: u64,
        snapshot_term: u64,
        entries: &[Entry],
    ) -> Result<(), Violation> {
        self.logs.insert(
            member,
            ShadowLog {
                snapshot_index,
                snapshot_term,
                entries: Vec::new(),
                checked_commit: snapshot_index,
            },
        );
        self.check_snapshot(member, snapshot_index, snapshot_term)?;
        self.on_entries(member, entries)
    }

    /// A member installed a snapshot sent by the leader: its log now starts after it.
    pub fn on_snapshot(&mut self, member: u64, index: u64, term: u64) -> Result<(), Violation> {
        let log = self.logs.entry(member).or_default();
        log.snapshot_index = index;
        log.snapshot_term = term;
        log.entries.clear();
        log.checked_commit = log.checked_commit.max(index);
        self.check_snapshot(member, index, term)
    }

    fn check_snapshot(&mut self, member: u64, index: u64, term: u64) -> Result<(), Violation> {
        if index == 0 {
            return Ok(());
        }
        match self.committed.get(&index) {
            Some(committed) if committed.term != term => Err(Violation::SnapshotDisagrees {
                member,
                index,
                term,
                committed_term: committed.term,
            }),
            Some(_) => Ok(()),
            None => {
                self.committed.insert(
                    index,
                    Committed {
                        term,
                        digest: None,
                        member,
                    },
                );
                Ok(())
            }
        }
    }

    /// A member appended `entries` to its log, replacing any suffix from the first one.
    pub fn on_entries(&mut self, member: u64, entries: &[Entry]) -> Result<(), Violation> {
        let log = self.logs.entry(member).or_default();
        for entry in entries {
            if entry.index <= log.snapshot_index {
                continue;
            }
            assert!(
                entry.index <= log.last_index() + 1,
                "member {member} appended index {} after a log ending at {}: the simulator \
                 missed an append",
                entry.index,
                log.last_index()
            );
            let digest = entry_digest(entry);
            if entry.index <= log.checked_commit {
                // Raft never rewrites a member's own committed entries (§5.3).
                let (term, known) = log.get(entry.index).expect("within the log");
                if term != entry.term || known != Some(digest) {
                    return Err(Violation::CommittedEntryDiffers {
                        index: entry.index,
                        member,
                        term: entry.term,
                        other: member,
                        other_term: term,
                        data_note: " (it overwrote its own committed entry)",
                    });
                }
            }
            let position = (entry.index - log.snapshot_index - 1) as usize;
            log.entries.truncate(position);
            log.entries.push((entry.term, digest));
        }
        Ok(())
    }

    /// A member's commit index is now `commit`.
    pub fn on_commit(&mut self, member: u64, commit: u64) -> Result<(), Violation> {
        let log = self.logs.entry(member).or_default();
        if commit <= log.checked_commit {
            return Ok(());
        }
        if commit > log.last_index() {
            return Err(Violation::CommitBeyondLog {
                member,
                commit,
                last_index: log.last_index(),
            });
        }
        for index in log.checked_commit + 1..=commit {
            let (term, digest) = log.get(index).expect("commit is within the log");
            match self.committed.get_mut(&index) {
                None => {
                    self.committed.insert(
                        index,
                        Committed {
                            term,
                            digest,
                            member,
                        },
                    );
                }
                Some(committed) => {
                    let data_differs = matches!(
                        (committed.digest, digest),
                        (Some(first), Some(second)) if first != second
                    );
                    if committed.term != term || data_differs {
                        return Err(Violation::CommittedEntryDiffers {
                            index,
                            member,
                            term,
                            other: committed.member,
                            other_term: committed.term,
                            data_note: if committed.term == term {
                                " (same term, different data)"
                            } else {
                                ""
                            },
                        });
                    }
                    if committed.digest.is_none() {
                        committed.digest = digest;
                    }
                }
            }
        }
        log.checked_commit = commit;
        Ok(())
    }

    /// The highest index any member committed.
    pub fn highest_committed(&self) -> u64 {
        self.committed.keys().next_back().copied().unwrap_or(0)
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
    fn uncommitted_divergence_is_allowed_but_committed_divergence_is_not() {
        let mut safety = StateMachineSafety::default();
        safety.on_start(1, 0, 0, &[]).unwrap();
        safety.on_start(2, 0, 0, &[]).unwrap();
        safety
            .on_entries(1, &[entry(1, 1, b"a"), entry(2, 1, b"b")])
            .unwrap();
        safety
            .on_entries(2, &[entry(1, 1, b"a"), entry(2, 2, b"c")])
            .unwrap();
        safety.on_commit(1, 1).unwrap();
        safety.on_commit(2, 1).unwrap();
        safety.on_commit(1, 2).unwrap();
        assert!(matches!(
            safety.on_commit(2, 2),
            Err(Violation::CommittedEntryDiffers { index: 2, .. })
        ));
    }

    #[test]
    fn commit_beyond_the_log_and_disagreeing_snapshots_are_violations() {
        let mut safety = StateMachineSafety::default();
        safety.on_start(1, 0, 0, &[entry(1, 1, b"a")]).unwrap();
        assert!(matches!(
            safety.on_commit(1, 2),
            Err(Violation::CommitBeyondLog { .. })
        ));
        safety.on_commit(1, 1).unwrap();
        assert!(matches!(
            safety.on_snapshot(2, 1, 3),
            Err(Violation::SnapshotDisagrees { .. })
        ));
        safety.on_snapshot(3, 1, 1).unwrap();
        safety.on_entries(3, &[entry(2, 1, b"b")]).unwrap();
        safety.on_commit(3, 2).unwrap();
        assert_eq!(safety.highest_committed(), 2);
    }
}
