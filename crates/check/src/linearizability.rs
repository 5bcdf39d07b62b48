//! The linearizability search: Wing and Gong's algorithm with Lowe's memoisation, after
//! Porcupine's `checkSingle`.
//!
//! The history becomes a doubly linked list of call and return events in time order. The
//! search walks it from the front: a call may be linearized (tried against the model) as long
//! as no return comes before it in the list; linearizing an operation lifts its call and
//! return out of the list and pushes it on an undo stack. Reaching a return means the
//! operation returning there cannot be placed in the current order, so the search pops the
//! last choice, puts it back (unlift) and tries the next candidate. Lowe's memoisation
//! (Testing for linearizability, 2017, §4) records every (set of linearized operations, model
//! state) pair reached, so that two orders that reach the same pair are explored once.
//!
//! Operations with an unknown outcome have no return event: nothing forces them to take effect,
//! so the search succeeds as soon as every operation with a known return is linearized, and an
//! unknown operation is linearized only when some later answer needs its effect. This is the
//! "may have happened, at any time after its call, or never" of a timed-out request.
//!
//! Unknown operations stay candidates for the rest of the history, and with Porcupine's plain
//! search every subset of them is a new cache key: a few dozen timeouts on one key make an
//! illegal verdict unreachable. Three additions keep them cheap, each sound on its own:
//!
//! - the model may [`prepare`](Model::prepare) a part, giving an unknown operation a return
//!   time when an answer proves it took effect, or erasing what no step can observe;
//! - identical unknown operations (equal input and output) are interchangeable twins, and
//!   only the last-called pending twin is ever tried (see `Search::last_pending_twin`);
//! - the cache keeps, per (known operations linearized, state), the sets of unknown
//!   operations linearized, and skips a configuration whose set includes one already
//!   explored, which can do no more (see `MemoisationCache`).
//!
//! The search tries every known candidate before any unknown one, so an unknown operation is
//! linearized only when the known ones cannot go on without it. Searching stays exponential in
//! the worst case (deciding linearizability is NP-complete, Gibbons and Korach 1997), hence the
//! time and memory limits.
//!
//! At equal times a call sorts before a return, so an operation returning at `t` and another
//! called at `t` count as concurrent: clocks have finite resolution and a checker must not
//! invent a real-time order the clock could not observe.
//!
//! The search is deterministic: events are ordered by (time, kind, position), the cache is
//! only queried (never iterated), and the clock is read only to stop at the deadline.

use std::collections::hash_map::DefaultHasher;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hash};
use std::time::{Duration, Instant};

use crate::bitset::{Bitset, CompactBitset};
use crate::history::{validate_times, HistoryError, Operation, OPERATIONS_MAX_DEFAULT};
use crate::model::Model;

/// The default bound on the memoisation cache of one part, in (estimated) bytes: the most a
/// test machine should give one check.
pub const CACHE_BYTES_MAX_DEFAULT: usize = 1 << 30;

/// The default time limit of a check.
pub const TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);

/// How many search steps run between two reads of the clock: reading it is cheap but not free,
/// and the deadline need not be precise to a step.
const STEPS_PER_DEADLINE_CHECK: u64 = 256;

/// The most operations an [`Explanation`] prints, so that a failing part of a huge history
/// still gives a readable report; the counts of what was left out are printed.
pub const EXPLANATION_OPERATIONS_MAX: usize = 200;

/// Limits of one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckOptions {
    /// When the search gives up and answers [`CheckResult::Unknown`].
    pub timeout: Duration,
    /// Histories with more operations are refused with [`HistoryError::TooManyOperations`].
    pub operations_max: usize,
    /// A part whose memoisation cache would grow past this many bytes (as estimated with
    /// [`Model::state_bytes`]) is left undecided ([`UnknownReason::CacheFull`]).
    pub cache_bytes_max: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            timeout: TIMEOUT_DEFAULT,
            operations_max: OPERATIONS_MAX_DEFAULT,
            cache_bytes_max: CACHE_BYTES_MAX_DEFAULT,
        }
    }
}

impl CheckOptions {
    /// The default limits with the given time limit.
    pub fn with_timeout(timeout: Duration) -> CheckOptions {
        CheckOptions {
            timeout,
            ..CheckOptions::default()
        }
    }
}

/// The verdict of a linearizability check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckResult {
    /// Some order of the operations, consistent with real time, explains every output.
    Ok,
    /// No such order exists; the explanation shows the smallest failing part.
    Illegal(Explanation),
    /// The search stopped before deciding.
    Unknown(UnknownReason),
}

impl CheckResult {
    /// Whether the history was found linearizable.
    pub fn is_ok(&self) -> bool {
        matches!(self, CheckResult::Ok)
    }

    /// Whether the history was found not linearizable.
    pub fn is_illegal(&self) -> bool {
        matches!(self, CheckResult::Illegal(_))
    }
}

impl fmt::Display for CheckResult {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckResult::Ok => formatter.write_str("linearizable"),
            CheckResult::Illegal(explanation) => explanation.fmt(formatter),
            CheckResult::Unknown(reason) => write!(formatter, "undecided: {reason}"),
        }
    }
}

/// Why a check stopped without a verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownReason {
    /// The time limit expired.
    Timeout,
    /// A part's memoisation cache reached `cache_bytes_max`.
    CacheFull {
        /// The limit that was reached.
        cache_bytes_max: usize,
    },
}

impl fmt::Display for UnknownReason {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnknownReason::Timeout => formatter.write_str("the time limit expired"),
            UnknownReason::CacheFull { cache_bytes_max } => write!(
                formatter,
                "the memoisation cache reached cache_bytes_max ({cache_bytes_max} bytes)"
            ),
        }
    }
}

/// One operation as shown in an explanation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExplainedOperation {
    /// Position of the operation in the history.
    pub index: usize,
    /// The client that issued it.
    pub client_id: u64,
    /// When it was called.
    pub call_time: u64,
    /// When it returned; `None` when its outcome is unknown.
    pub return_time: Option<u64>,
    /// The model's description of its input and output.
    pub description: String,
}

impl fmt::Display for ExplainedOperation {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let return_time = match self.return_time {
            Some(time) => time.to_string(),
            None => "unknown".to_string(),
        };
        write!(
            formatter,
            "#{} client {} [{}, {}] {}",
            self.index, self.client_id, self.call_time, return_time, self.description
        )
    }
}

/// Why a history is not linearizable: the smallest failing part and how far the search got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// How many parts the model split the history into.
    pub partition_count: usize,
    /// Every operation of the failing part, by call time.
    pub operations: Vec<ExplainedOperation>,
    /// The longest order of operations (history positions) the search could linearize.
    pub longest_prefix: Vec<usize>,
    /// The model state after that order.
    pub state_after_prefix: String,
    /// The operation (history position) whose return ended the longest order: it had to take
    /// effect next, and no candidate order explained it.
    pub blocking_operation: Option<usize>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.partition_count == 1 {
            writeln!(
                formatter,
                "not linearizable: no valid order of its {} searched operations",
                self.operations.len()
            )?;
        } else {
            writeln!(
                formatter,
                "not linearizable: no valid order of a part of {} operations, the smallest \
                 failing of {} parts",
                self.operations.len(),
                self.partition_count
            )?;
        }
        writeln!(formatter, "operations, by call time:")?;
        for operation in self.operations.iter().take(EXPLANATION_OPERATIONS_MAX) {
            writeln!(formatter, "  {operation}")?;
        }
        if self.operations.len() > EXPLANATION_OPERATIONS_MAX {
            writeln!(
                formatter,
                "  … and {} more",
                self.operations.len() - EXPLANATION_OPERATIONS_MAX
            )?;
        }
        writeln!(
            formatter,
            "longest linearizable prefix ({} of {} operations):",
            self.longest_prefix.len(),
            self.operations.len()
        )?;
        let shown = self.longest_prefix.len().min(EXPLANATION_OPERATIONS_MAX);
        let skipped = self.longest_prefix.len() - shown;
        if skipped > 0 {
            writeln!(formatter, "  … {skipped} earlier operations")?;
        }
        for index in &self.longest_prefix[skipped..] {
            match self.find(*index) {
                Some(operation) => writeln!(formatter, "  {operation}")?,
                None => writeln!(formatter, "  #{index}")?,
            }
        }
        writeln!(formatter, "state after it: {}", self.state_after_prefix)?;
        if let Some(index) = self.blocking_operation {
            let operation = self
                .find(index)
                .map_or_else(|| format!("#{index}"), |operation| operation.to_string());
            write!(
                formatter,
                "then {operation} had to take effect before it returned, but neither it nor any \
                 other candidate could be linearized next"
            )?;
        }
        Ok(())
    }
}

impl Explanation {
    fn find(&self, index: usize) -> Option<&ExplainedOperation> {
        self.operations
            .iter()
            .find(|operation| operation.index == index)
    }
}

/// Checks whether `history` is linearizable with respect to `model`.
///
/// Parts are searched from the smallest, so that the first failing part found is the smallest
/// one, and the search stops there. A part left undecided (time or cache limit) does not stop
/// the others: a later illegal part still makes the verdict [`CheckResult::Illegal`].
pub fn check_model<M: Model>(
    model: &M,
    history: &[Operation<M::Input, M::Output>],
    options: &CheckOptions,
) -> Result<CheckResult, HistoryError> {
    validate_times(history, options.operations_max)?;
    let deadline = Instant::now().checked_add(options.timeout);
    let mut partitions = model.partition(history);
    assert_partitions_valid(&partitions, history.len());
    // Sorting by (size, first operation) keeps the order, and so the explanation, deterministic.
    partitions.sort_by_key(|partition| (partition.len(), partition.first().copied()));
    let partition_count = partitions.len();
    let mut unknown_reason = None;
    for partition in &partitions {
        let search = Search::new(model, history, partition, options, deadline);
        match search.run() {
            SearchOutcome::Linearizable => {}
            SearchOutcome::Illegal(mut explanation) => {
                explanation.partition_count = partition_count;
                return Ok(CheckResult::Illegal(explanation));
            }
            SearchOutcome::Unknown(UnknownReason::Timeout) => {
                return Ok(CheckResult::Unknown(UnknownReason::Timeout));
            }
            SearchOutcome::Unknown(reason) => {
                unknown_reason.get_or_insert(reason);
            }
        }
    }
    Ok(match unknown_reason {
        Some(reason) => CheckResult::Unknown(reason),
        None => CheckResult::Ok,
    })
}

/// A model handing back out-of-range or repeated indices is a bug in the model, not in the
/// history, so it is asserted.
fn assert_partitions_valid(partitions: &[Vec<usize>], operation_count: usize) {
    let mut seen = Bitset::new(operation_count);
    for index in partitions.iter().flatten() {
        assert!(
            *index < operation_count,
            "partition index {index} is outside a history of {operation_count} operations"
        );
        assert!(
            !seen.contains(*index),
            "operation #{index} is in two partitions"
        );
        seen.insert(*index);
    }
}

/// The result of searching one part.
enum SearchOutcome {
    Linearizable,
    Illegal(Explanation),
    Unknown(UnknownReason),
}

/// Marks the absence of a linked-list neighbour or of a return event.
const NONE: usize = usize::MAX;

/// The sentinel at the front of the event list.
const HEAD: usize = 0;

/// One call or return event. Events are numbered in time order, so comparing numbers compares
/// times. Only operations with a known return are linked into the list: an unknown-outcome
/// operation stays enabled from its call on, so the search finds it through its class of
/// twins instead, and the common pass never walks over the many that stay pending for the
/// rest of the history.
struct Event {
    /// Which operation, as a position within the part.
    operation: usize,
    /// For a call: the index of its return event, or [`NONE`] when the outcome is unknown.
    /// For a return (and the head): [`NONE`].
    return_event: usize,
    is_call: bool,
    previous: usize,
    next: usize,
}

/// Lowe's memoisation cache, keyed by (the linearized operations with a known return, the
/// model state) and holding the sets of linearized unknown-outcome operations reached with
/// that key, as an antichain (no set a subset of another).
type Cache<State> = HashMap<(CompactBitset, State), Vec<Bitset>, FixedHasher>;

/// std's hasher with its fixed keys: reproducible from run to run, unlike `RandomState`. The
/// cache is only queried, never iterated, so its order never reaches a result either way.
type FixedHasher = BuildHasherDefault<DefaultHasher>;

/// Where the search looks for the next candidate.
#[derive(Clone, Copy)]
enum Cursor {
    /// At an event of the list (first pass).
    Event(usize),
    /// At a class of unknown-outcome operations (second pass).
    Class(usize),
}

/// One linearized operation on the undo stack.
struct Undo<State> {
    call_event: usize,
    /// The state before the operation.
    state: State,
    /// The pass end when the operation was linearized, to resume its pass after undoing it.
    pass_end: usize,
}

/// The state of the search over one part.
struct Search<'a, M: Model> {
    model: &'a M,
    history: &'a [Operation<M::Input, M::Output>],
    /// History positions of the part's operations, numbered `0..len` by the search: the
    /// operations with a known return first, then those with an unknown outcome, each group
    /// by call time.
    indices: Vec<usize>,
    /// The part's operations as [`Model::prepare`] rewrote them, numbered like `indices`.
    prepared: Vec<Operation<M::Input, M::Output>>,
    /// How many operations have a known return; the others are numbered from here.
    known_count: usize,
    events: Vec<Event>,
    /// Index of each operation's call event.
    call_events: Vec<usize>,
    /// For each unknown-outcome operation (numbered from 0), its class of identical
    /// operations (equal input and output).
    class_of_unknown: Vec<usize>,
    /// The members of each class, by call time.
    classes: Vec<Vec<usize>>,
    cache_bytes_max: usize,
    deadline: Option<Instant>,
}

impl<'a, M: Model> Search<'a, M> {
    fn new(
        model: &'a M,
        history: &'a [Operation<M::Input, M::Output>],
        partition: &[usize],
        options: &CheckOptions,
        deadline: Option<Instant>,
    ) -> Self {
        let part: Vec<Operation<M::Input, M::Output>> = partition
            .iter()
            .map(|index| history[*index].clone())
            .collect();
        let prepared_part = model.prepare(part);
        assert_eq!(
            prepared_part.len(),
            partition.len(),
            "Model::prepare keeps every operation"
        );
        let (mut known, mut unknown): (Vec<_>, Vec<_>) = partition
            .iter()
            .copied()
            .zip(prepared_part)
            .partition(|(_, operation)| operation.return_time.is_some());
        // Numbering by call time makes the linearized set a prefix plus a short tail, which
        // the cache stores compactly.
        known.sort_by_key(|(index, operation)| (operation.call_time, *index));
        unknown.sort_by_key(|(index, operation)| (operation.call_time, *index));
        let known_count = known.len();
        let (indices, prepared): (Vec<usize>, Vec<_>) = known.into_iter().chain(unknown).unzip();

        // (time, is return, operation): calls sort before returns at equal times (see the
        // module documentation), and the operation breaks remaining ties deterministically.
        let mut timeline: Vec<(u64, bool, usize)> = Vec::with_capacity(prepared.len() * 2);
        for (operation, recorded) in prepared.iter().enumerate() {
            timeline.push((recorded.call_time, false, operation));
            if let Some(return_time) = recorded.return_time {
                assert!(
                    return_time >= recorded.call_time,
                    "Model::prepare keeps returns after calls"
                );
                timeline.push((return_time, true, operation));
            }
        }
        timeline.sort_unstable();

        let mut events = Vec::with_capacity(timeline.len() + 1);
        events.push(Event {
            operation: NONE,
            return_event: NONE,
            is_call: false,
            previous: NONE,
            next: NONE,
        });
        let mut tail = HEAD;
        let mut call_events = vec![NONE; prepared.len()];
        for (_, is_return, operation) in timeline {
            let event = events.len();
            let linked = operation < known_count;
            events.push(Event {
                operation,
                return_event: NONE,
                is_call: !is_return,
                previous: if linked { tail } else { NONE },
                next: NONE,
            });
            if linked {
                events[tail].next = event;
                tail = event;
            }
            if is_return {
                let call_event = call_events[operation];
                assert_ne!(call_event, NONE, "a call sorts before its return");
                events[call_event].return_event = event;
            } else {
                call_events[operation] = event;
            }
        }

        // Classes of identical unknown-outcome operations, each listed in call order.
        let mut class_by_operation: HashMap<(&M::Input, &M::Output), usize, FixedHasher> =
            HashMap::default();
        let mut classes: Vec<Vec<usize>> = Vec::new();
        let mut unknown_by_call: Vec<usize> = (known_count..prepared.len()).collect();
        unknown_by_call.sort_unstable_by_key(|operation| call_events[*operation]);
        let mut class_of_unknown = vec![NONE; prepared.len() - known_count];
        for operation in unknown_by_call {
            let recorded = &prepared[operation];
            let class = *class_by_operation
                .entry((&recorded.input, &recorded.output))
                .or_insert_with(|| {
                    classes.push(Vec::new());
                    classes.len() - 1
                });
            class_of_unknown[operation - known_count] = class;
            classes[class].push(operation);
        }

        Search {
            model,
            history,
            indices,
            prepared,
            known_count,
            events,
            call_events,
            class_of_unknown,
            classes,
            cache_bytes_max: options.cache_bytes_max,
            deadline,
        }
    }

    fn is_unknown(&self, operation: usize) -> bool {
        operation >= self.known_count
    }

    /// The unknown-outcome operation of `class` to try: the last one called before
    /// `pass_end` (the first return in the list) that is not linearized yet. Only that one is
    /// tried: linearizing an earlier-called twin instead leads to the same state and leaves a
    /// later-called twin for the future, which can do no more than the earlier one (it is
    /// enabled no sooner), so the search loses nothing.
    fn last_pending_twin(
        &self,
        class: usize,
        pass_end: usize,
        linearized: &Linearized,
    ) -> Option<usize> {
        let members = &self.classes[class];
        let enabled = members.partition_point(|member| self.call_events[*member] < pass_end);
        members[..enabled]
            .iter()
            .rev()
            .copied()
            .find(|member| !linearized.unknown.contains(*member - self.known_count))
    }

    /// Takes a call event and its return event out of the list (unknown-outcome operations
    /// are not in it).
    fn lift(&mut self, call_event: usize) {
        if self.events[call_event].return_event == NONE {
            return;
        }
        self.unlink(call_event);
        self.unlink(self.events[call_event].return_event);
    }

    /// Puts back what [`Search::lift`] took out, in reverse order.
    fn unlift(&mut self, call_event: usize) {
        let return_event = self.events[call_event].return_event;
        if return_event != NONE {
            self.relink(return_event);
            self.relink(call_event);
        }
    }

    fn unlink(&mut self, event: usize) {
        let Event { previous, next, .. } = self.events[event];
        self.events[previous].next = next;
        if next != NONE {
            self.events[next].previous = previous;
        }
    }

    /// Relinking works because an unlinked event keeps its own neighbour links, and events are
    /// relinked in the reverse order of unlinking (the undo stack guarantees it).
    fn relink(&mut self, event: usize) {
        let Event { previous, next, .. } = self.events[event];
        self.events[previous].next = event;
        if next != NONE {
            self.events[next].previous = event;
        }
    }

    /// The search loop. Candidates are tried in two passes: first the calls in the list, up
    /// to its first return (`pass_end`); then, only when those are exhausted, one
    /// unknown-outcome operation of each class called before `pass_end`. Exhausting the
    /// classes is a dead end. The order is complete (every enabled operation is tried, up to
    /// interchangeable twins) and explores orders that leave unknown operations out before
    /// those that include them, which is what lets the cache prune the latter.
    fn run(mut self) -> SearchOutcome {
        let mut known_remaining = self.known_count;
        let mut state = self.model.init();
        let mut linearized = Linearized {
            known: Bitset::new(self.known_count),
            unknown: Bitset::new(self.prepared.len() - self.known_count),
        };
        let mut cache = MemoisationCache::<M::State>::new(self.cache_bytes_max);
        let mut undo: Vec<Undo<M::State>> = Vec::new();
        let mut longest = LongestPrefix::new(state.clone());
        let mut steps: u64 = 0;
        let mut cursor = Cursor::Event(self.events[HEAD].next);
        let mut pass_end = NONE;

        while known_remaining > 0 {
            steps += 1;
            if steps.is_multiple_of(STEPS_PER_DEADLINE_CHECK) && self.deadline_passed() {
                return SearchOutcome::Unknown(UnknownReason::Timeout);
            }
            let candidate = match cursor {
                Cursor::Event(event) => {
                    assert_ne!(
                        event, NONE,
                        "a known return is always reached before the end of the list"
                    );
                    if self.events[event].is_call {
                        Some(event)
                    } else {
                        // The listed candidates are exhausted: try the unknown ones.
                        pass_end = event;
                        cursor = Cursor::Class(0);
                        continue;
                    }
                }
                Cursor::Class(class) if class < self.classes.len() => {
                    match self.last_pending_twin(class, pass_end, &linearized) {
                        Some(operation) => Some(self.call_events[operation]),
                        None => {
                            cursor = Cursor::Class(class + 1);
                            continue;
                        }
                    }
                }
                Cursor::Class(_) => None,
            };

            if let Some(call_event) = candidate {
                let operation = self.events[call_event].operation;
                let recorded = &self.prepared[operation];
                let Some(next_state) = self.model.step(&state, &recorded.input, &recorded.output)
                else {
                    cursor = self.cursor_after(operation);
                    continue;
                };
                linearized.insert(operation, self.known_count);
                let state_bytes = self.model.state_bytes(&next_state);
                match cache.visit(&linearized, &next_state, state_bytes) {
                    Visit::New => {}
                    Visit::Dominated => {
                        linearized.remove(operation, self.known_count);
                        cursor = self.cursor_after(operation);
                        continue;
                    }
                    Visit::Full => {
                        return SearchOutcome::Unknown(UnknownReason::CacheFull {
                            cache_bytes_max: self.cache_bytes_max,
                        })
                    }
                }
                undo.push(Undo {
                    call_event,
                    state: std::mem::replace(&mut state, next_state),
                    pass_end,
                });
                if !self.is_unknown(operation) {
                    known_remaining -= 1;
                }
                self.lift(call_event);
                longest.linearized(&undo, &self.events, &state);
                cursor = Cursor::Event(self.events[HEAD].next);
                continue;
            }

            // A dead end: no candidate leads anywhere from here.
            longest.dead_end(self.events[pass_end].operation);
            let Some(last) = undo.pop() else {
                return SearchOutcome::Illegal(self.explain(&longest));
            };
            longest.undone(undo.len());
            let undone = self.events[last.call_event].operation;
            state = last.state;
            linearized.remove(undone, self.known_count);
            if !self.is_unknown(undone) {
                known_remaining += 1;
            }
            self.unlift(last.call_event);
            // Candidates before the undone one, in its pass, were tried already.
            cursor = self.cursor_after(undone);
            pass_end = last.pass_end;
        }
        SearchOutcome::Linearizable
    }

    /// Where the search continues after trying `operation`: the next event in the list, or
    /// the next class of unknown-outcome operations.
    fn cursor_after(&self, operation: usize) -> Cursor {
        if self.is_unknown(operation) {
            Cursor::Class(self.class_of_unknown[operation - self.known_count] + 1)
        } else {
            Cursor::Event(self.events[self.call_events[operation]].next)
        }
    }

    fn deadline_passed(&self) -> bool {
        self.deadline
            .is_some_and(|deadline| Instant::now() >= deadline)
    }

    fn explain(&self, longest: &LongestPrefix<M::State>) -> Explanation {
        let mut operations: Vec<ExplainedOperation> = self
            .indices
            .iter()
            .map(|index| {
                let operation = &self.history[*index];
                ExplainedOperation {
                    index: *index,
                    client_id: operation.client_id,
                    call_time: operation.call_time,
                    return_time: operation.return_time,
                    description: self
                        .model
                        .describe_operation(&operation.input, &operation.output),
                }
            })
            .collect();
        operations.sort_by_key(|operation| (operation.call_time, operation.index));
        Explanation {
            partition_count: 1,
            operations,
            longest_prefix: longest
                .operations
                .iter()
                .map(|operation| self.indices[*operation])
                .collect(),
            state_after_prefix: self.model.describe_state(&longest.state),
            blocking_operation: longest
                .blocking_operation
                .map(|operation| self.indices[operation]),
        }
    }
}

/// The longest order the search has linearized, for the explanation.
struct LongestPrefix<State> {
    /// The operations, in order.
    operations: Vec<usize>,
    /// How many leading entries of the undo stack are known to equal `operations`, so that
    /// extending it copies only what changed (copying it whole would be quadratic).
    shared: usize,
    /// The state after it.
    state: State,
    /// Whether the search is still at the end of that order, not having backtracked since: a
    /// dead end reached then names the operation that blocked it.
    at_end: bool,
    blocking_operation: Option<usize>,
}

impl<State: Clone> LongestPrefix<State> {
    fn new(state: State) -> Self {
        LongestPrefix {
            operations: Vec::new(),
            shared: 0,
            state,
            at_end: true,
            blocking_operation: None,
        }
    }

    /// Called after each operation is linearized.
    fn linearized(&mut self, undo: &[Undo<State>], events: &[Event], state: &State) {
        if undo.len() <= self.operations.len() {
            return;
        }
        self.operations.truncate(self.shared);
        self.operations.extend(
            undo[self.shared..]
                .iter()
                .map(|linearized| events[linearized.call_event].operation),
        );
        self.shared = undo.len();
        self.state = state.clone();
        self.at_end = true;
        self.blocking_operation = None;
    }

    /// Called at each dead end, with the operation whose return ended the candidates.
    fn dead_end(&mut self, blocking_operation: usize) {
        if self.at_end {
            self.blocking_operation.get_or_insert(blocking_operation);
        }
    }

    /// Called after an operation is undone, with the depth left.
    fn undone(&mut self, depth: usize) {
        self.at_end = false;
        self.shared = self.shared.min(depth);
    }
}

/// The operations linearized so far, split as the cache key needs them.
struct Linearized {
    /// Operations with a known return, numbered `0..known_count`.
    known: Bitset,
    /// Unknown-outcome operations, numbered from `known_count`.
    unknown: Bitset,
}

impl Linearized {
    fn insert(&mut self, operation: usize, known_count: usize) {
        match operation.checked_sub(known_count) {
            None => self.known.insert(operation),
            Some(unknown) => self.unknown.insert(unknown),
        }
    }

    fn remove(&mut self, operation: usize, known_count: usize) {
        match operation.checked_sub(known_count) {
            None => self.known.remove(operation),
            Some(unknown) => self.unknown.remove(unknown),
        }
    }
}

/// What the cache says about a configuration just reached.
enum Visit {
    /// Not seen before: explore it.
    New,
    /// A configuration at least as promising was explored (or is being explored): skip it.
    Dominated,
    /// The cache is at `cache_bytes_max`.
    Full,
}

/// Lowe's memoisation, extended for unknown-outcome operations by dominance.
///
/// A configuration is (known-return operations linearized, unknown ones linearized, state).
/// Two configurations with the same known set and state, whose unknown sets are `S1 ⊆ S2`:
/// the first can do everything the second can, because unknown operations impose no return
/// deadline and need never take effect, so it can follow the second's continuation and simply
/// leave `S2 \ S1` out. Having explored the first, or while still exploring it (an ancestor
/// reaches the second only through unknown operations, and finds any continuation of the
/// second without them), the search skips the second. With no unknown operations the sets are
/// all empty and this is exactly Lowe's cache.
struct MemoisationCache<State> {
    map: Cache<State>,
    /// Estimated bytes held, bounded by `bytes_max`.
    bytes: usize,
    bytes_max: usize,
}

impl<State: Clone + Eq + Hash> MemoisationCache<State> {
    fn new(bytes_max: usize) -> Self {
        MemoisationCache {
            map: Cache::default(),
            bytes: 0,
            bytes_max,
        }
    }

    fn visit(&mut self, linearized: &Linearized, state: &State, state_bytes: usize) -> Visit {
        if self.bytes >= self.bytes_max {
            return Visit::Full;
        }
        let known = linearized.known.compact();
        let unknown_sets = match self.map.entry((known, state.clone())) {
            Entry::Vacant(vacant) => {
                // The entry itself (key, state and list) plus what its parts hold on the heap.
                self.bytes += std::mem::size_of::<((CompactBitset, State), Vec<Bitset>)>()
                    + vacant.key().0.heap_bytes()
                    + state_bytes.saturating_sub(std::mem::size_of::<State>())
                    + linearized.unknown.bytes();
                vacant.insert(vec![linearized.unknown.clone()]);
                return Visit::New;
            }
            Entry::Occupied(occupied) => occupied.into_mut(),
        };
        if unknown_sets
            .iter()
            .any(|explored| explored.is_subset(&linearized.unknown))
        {
            return Visit::Dominated;
        }
        // The new set dominates any stored superset of it; dropping those keeps the list an
        // antichain and short.
        let before = unknown_sets.len();
        unknown_sets.retain(|explored| !linearized.unknown.is_subset(explored));
        let removed = before - unknown_sets.len();
        unknown_sets.push(linearized.unknown.clone());
        self.bytes = (self.bytes + linearized.unknown.bytes())
            .saturating_sub(removed * linearized.unknown.bytes());
        Visit::New
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A register of one integer: `Some(v)` writes v, `None` reads and expects the output.
    struct Register;

    impl Model for Register {
        type Input = Option<u8>;
        type Output = u8;
        type State = u8;

        fn init(&self) -> u8 {
            0
        }

        fn step(&self, state: &u8, input: &Option<u8>, output: &u8) -> Option<u8> {
            match input {
                Some(value) => Some(*value),
                None => (state == output).then_some(*state),
            }
        }

        fn describe_operation(&self, input: &Option<u8>, output: &u8) -> String {
            match input {
                Some(value) => format!("write {value}"),
                None => format!("read -> {output}"),
            }
        }

        fn describe_state(&self, state: &u8) -> String {
            state.to_string()
        }
    }

    fn operation(
        call_time: u64,
        return_time: Option<u64>,
        input: Option<u8>,
        output: u8,
    ) -> Operation<Option<u8>, u8> {
        Operation {
            client_id: 0,
            call_time,
            return_time,
            input,
            output,
        }
    }

    fn check(history: &[Operation<Option<u8>, u8>]) -> CheckResult {
        check_model(&Register, history, &CheckOptions::default()).unwrap()
    }

    #[test]
    fn an_empty_history_is_linearizable() {
        assert_eq!(check(&[]), CheckResult::Ok);
    }

    #[test]
    fn touching_intervals_count_as_concurrent() {
        // The read returns at 10, when the write is called: either order is allowed.
        let history = [
            operation(10, Some(20), Some(1), 0),
            operation(0, Some(10), None, 1),
        ];
        assert_eq!(check(&history), CheckResult::Ok);
    }

    #[test]
    fn explanation_names_the_prefix_and_the_blocking_operation() {
        let history = [
            operation(0, Some(10), Some(1), 0),
            operation(20, Some(30), None, 2),
        ];
        let CheckResult::Illegal(explanation) = check(&history) else {
            panic!("a read of a value never written is illegal");
        };
        assert_eq!(explanation.longest_prefix, vec![0]);
        assert_eq!(explanation.state_after_prefix, "1");
        assert_eq!(explanation.blocking_operation, Some(1));
        let text = explanation.to_string();
        assert!(text.contains("#1 client 0 [20, 30] read -> 2"), "{text}");
        assert!(text.contains("then #1"), "{text}");
    }

    #[test]
    fn full_cache_leaves_the_history_undecided() {
        let history = [
            operation(0, Some(10), Some(1), 0),
            operation(20, Some(30), None, 1),
        ];
        let options = CheckOptions {
            cache_bytes_max: 1,
            ..CheckOptions::default()
        };
        assert_eq!(
            check_model(&Register, &history, &options).unwrap(),
            CheckResult::Unknown(UnknownReason::CacheFull { cache_bytes_max: 1 })
        );
    }

    #[test]
    fn too_many_operations_are_refused() {
        let history = vec![operation(0, Some(1), Some(1), 0); 3];
        let options = CheckOptions {
            operations_max: 2,
            ..CheckOptions::default()
        };
        assert!(matches!(
            check_model(&Register, &history, &options),
            Err(HistoryError::TooManyOperations { count: 3, .. })
        ));
    }

    #[test]
    #[should_panic(expected = "is in two partitions")]
    fn overlapping_partitions_are_a_model_bug() {
        assert_partitions_valid(&[vec![0], vec![0]], 1);
    }
}
