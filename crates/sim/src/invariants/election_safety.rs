//! Election safety (Raft §5.2): at most one leader can be elected in a given term.
//!
//! Checked by observing every member's role and term after each event it handles and
//! remembering, for every term, the first member seen leading it. Observing after every
//! event is enough: a member's role changes only while it handles an event, and each event
//! is handled by one member. A member that leads a term, crashes and leads the same term
//! again after a restart would be caught too (it must not: its vote is durable).

use std::collections::BTreeMap;

use crate::violation::Violation;

/// The leader seen for each term.
#[derive(Debug, Default)]
pub struct ElectionSafety {
    leaders: BTreeMap<u64, u64>,
}

impl ElectionSafety {
    /// Records that `member` is (or is not) leader in `term`. Returns true when this is
    /// the first time `member` is seen leading `term`.
    pub fn observe(&mut self, member: u64, term: u64, is_leader: bool) -> Result<bool, Violation> {
        if !is_leader {
            return Ok(false);
        }
        match self.leaders.get(&term) {
            None => {
                self.leaders.insert(term, member);
                Ok(true)
            }
            Some(&first) if first == member => Ok(false),
            Some(&first) => Err(Violation::TwoLeadersInOneTerm {
                term,
                first,
                second: member,
            }),
        }
    }

    /// How many terms had a leader.
    pub fn terms_with_leader(&self) -> usize {
        self.leaders.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_leader_in_a_term_is_a_violation() {
        let mut safety = ElectionSafety::default();
        assert_eq!(safety.observe(1, 2, true), Ok(true));
        assert_eq!(safety.observe(1, 2, true), Ok(false));
        assert_eq!(safety.observe(2, 2, false), Ok(false));
        assert_eq!(safety.observe(2, 3, true), Ok(true));
        assert!(matches!(
            safety.observe(3, 2, true),
            Err(Violation::TwoLeadersInOneTerm {
                term: 2,
                first: 1,
                second: 3
            })
        ));
    }
}
