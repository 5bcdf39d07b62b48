//! Monotonic counters: within one boot, a member's term, commit index, applied index and
//! key-space revision never decrease.
//!
//! Across a restart some may legitimately restart lower (the applied index restarts at the
//! snapshot and the log above it is applied again; a commit index learned but not yet
//! written is forgotten), so each boot is checked on its own. Revisions as clients see
//! them across members and restarts are checked on the history (`history`).

use std::collections::BTreeMap;

use crate::violation::Violation;

/// A member's counters as last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// The member's boot.
    pub incarnation: u64,
    /// Its current term.
    pub term: u64,
    /// Its commit index.
    pub commit: u64,
    /// Its applied index.
    pub applied: u64,
    /// Its key space's revision.
    pub revision: u64,
}

/// The last counters of every member.
#[derive(Debug, Default)]
pub struct Monotonic {
    last: BTreeMap<u64, Counters>,
}

impl Monotonic {
    /// Records `member`'s counters, failing if one went back within a boot.
    pub fn observe(&mut self, member: u64, counters: Counters) -> Result<(), Violation> {
        if let Some(last) = self.last.get(&member) {
            if last.incarnation == counters.incarnation {
                let pairs = [
                    ("term", last.term, counters.term),
                    ("commit index", last.commit, counters.commit),
                    ("applied index", last.applied, counters.applied),
                    ("revision", last.revision, counters.revision),
                ];
                for (what, before, after) in pairs {
                    if after < before {
                        return Err(Violation::WentBackwards {
                            member,
                            what,
                            before,
                            after,
                        });
                    }
                }
            }
        }
        self.last.insert(member, counters);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(incarnation: u64, revision: u64) -> Counters {
        Counters {
            incarnation,
            term: 1,
            commit: 1,
            applied: 1,
            revision,
        }
    }

    #[test]
    fn going_back_is_allowed_only_across_a_restart() {
        let mut monotonic = Monotonic::default();
        monotonic.observe(1, counters(1, 5)).unwrap();
        monotonic.observe(1, counters(2, 3)).unwrap();
        assert!(matches!(
            monotonic.observe(1, counters(2, 2)),
            Err(Violation::WentBackwards {
                what: "revision",
                before: 3,
                after: 2,
                ..
            })
        ));
    }
}
