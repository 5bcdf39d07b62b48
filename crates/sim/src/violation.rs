//! What a run can find wrong. Each variant names the property it breaks and carries what
//! is needed to see why; the report prints it with the seed, the replay command and the
//! last events.

/// A broken property of the system under simulation (or a failure of the run itself).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// Election safety (§5.2): at most one leader per term.
    #[error(
        "election safety (§5.2): members {first} and {second} were both leader of term {term}"
    )]
    TwoLeadersInOneTerm {
        /// The term.
        term: u64,
        /// The member first seen leading it.
        first: u64,
        /// The second member seen leading it.
        second: u64,
    },
    /// Log matching (§5.3): one (index, term) names one entry.
    #[error(
        "log matching (§5.3): members {first} and {second} hold different entries at \
         index {index} term {term}"
    )]
    LogMatching {
        /// The index.
        index: u64,
        /// The term.
        term: u64,
        /// The member whose entry was seen first.
        first: u64,
        /// The member whose entry differs.
        second: u64,
    },
    /// State machine safety (§5.4.3): every member commits the same entry at an index.
    #[error(
        "state machine safety (§5.4.3): member {member} committed index {index} with an entry of \
         term {term}, but member {other} committed term {other_term} there{data_note}"
    )]
    CommittedEntryDiffers {
        /// The index.
        index: u64,
        /// The member that disagrees.
        member: u64,
        /// Its entry's term.
        term: u64,
        /// The member that committed the index first.
        other: u64,
        /// That entry's term.
        other_term: u64,
        /// Whether only the data differ.
        data_note: &'static str,
    },
    /// A member's commit index points past its log.
    #[error("member {member} has commit index {commit} but its log ends at {last_index}")]
    CommitBeyondLog {
        /// The member.
        member: u64,
        /// Its commit index.
        commit: u64,
        /// Its last index.
        last_index: u64,
    },
    /// A snapshot disagrees with what was committed at its index.
    #[error(
        "member {member} installed a snapshot at index {index} term {term}, but index {index} \
         was committed with term {committed_term}"
    )]
    SnapshotDisagrees {
        /// The member.
        member: u64,
        /// The snapshot's index.
        index: u64,
        /// The snapshot's term.
        term: u64,
        /// The committed entry's term.
        committed_term: u64,
    },
    /// Two members that applied the same prefix of the log have different key spaces.
    #[error(
        "applied state diverged: members {first} and {second} both applied up to index \
         {applied_index} but their key spaces differ ({first_description} vs {second_description})"
    )]
    AppliedStateDiverged {
        /// The applied index.
        applied_index: u64,
        /// The first member.
        first: u64,
        /// The other member.
        second: u64,
        /// The first member's revision and key count.
        first_description: String,
        /// The other member's.
        second_description: String,
    },
    /// A member's counter moved backwards within one boot.
    #[error("member {member}'s {what} went backwards from {before} to {after} without a restart")]
    WentBackwards {
        /// The member.
        member: u64,
        /// Which counter.
        what: &'static str,
        /// The value before.
        before: u64,
        /// The value after.
        after: u64,
    },
    /// A member could not start from its disk.
    #[error("member {member} failed to recover from its disk: {error}")]
    RecoveryFailed {
        /// The member.
        member: u64,
        /// What went wrong.
        error: String,
    },
    /// A member that was bootstrapped found a disk without even its bootstrap snapshot.
    #[error("member {member} found an empty disk after it had been bootstrapped and had run")]
    DiskForgotMember {
        /// The member.
        member: u64,
    },
    /// The client history is not linearizable.
    #[error("the client history is not linearizable:\n{0}")]
    NotLinearizable(String),
    /// The revisions in the history break their own invariants.
    #[error("revision invariant broken: {0}")]
    Revisions(String),
    /// A serializable read returned something nobody wrote.
    #[error("serializable read invariant broken: {0}")]
    SerializableRead(String),
    /// An acknowledged write is missing from the final state.
    #[error("acknowledged write lost: {0}")]
    LostAcknowledgedWrite(String),
    /// After healing, the cluster did not make progress in time.
    #[error("liveness: {0}")]
    Liveness(String),
    /// After convergence, members' key spaces differ.
    #[error("replicas differ after convergence: {0}")]
    ReplicasDiffer(String),
    /// A member answered a request with a response of the wrong kind or shape.
    #[error("malformed response: {0}")]
    MalformedResponse(String),
    /// The recorded history could not be checked (a recording bug).
    #[error("the history could not be checked: {0}")]
    InvalidHistory(String),
    /// Code under simulation panicked (an assertion in core or storage, or in the sim).
    #[error("panic: {0}")]
    Panic(String),
    /// A member's Ready loop never ran out of work.
    #[error("member {member}'s Ready loop still had work after {rounds} rounds")]
    ReadyLoopRunaway {
        /// The member.
        member: u64,
        /// Rounds run.
        rounds: usize,
    },
    /// The run did not finish in its event budget.
    #[error("the run did not finish within {events} events")]
    RunTooLong {
        /// The budget.
        events: u64,
    },
}
