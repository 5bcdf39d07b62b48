//! The pluggable sequential specification the checker searches against, as in Porcupine.
//!
//! A [`Model`] says what a single-copy, sequential system would answer: from a state, an
//! operation with a given input and output either leads to a new state or is impossible. The
//! checker looks for an order of the history's operations, consistent with real time, in which
//! every step is possible. A model may also split a history into independent sub-histories
//! ([`Model::partition`]); a history is linearizable exactly when each part is (the locality
//! property of Herlihy and Wing, 1990, for parts that touch disjoint objects), and small parts
//! are exponentially cheaper to search.
//!
//! A [`NondeterministicModel`] may allow several next states; [`PowersetModel`] turns it into a
//! deterministic model over sets of states, as Porcupine's `NondeterministicModel` and etcd's
//! `robustness/model/non_deterministic.go` do.

use std::collections::BTreeSet;
use std::hash::Hash;

use crate::history::Operation;

/// A deterministic sequential specification.
pub trait Model {
    /// What an operation asks; operations with equal inputs and outputs are interchangeable
    /// to the model, which the search exploits for unknown outcomes.
    type Input: Clone + Eq + Hash;
    /// What an operation answered.
    type Output: Clone + Eq + Hash;
    /// The state of the sequential system; hashed and compared by the memoisation cache.
    type State: Clone + Eq + Hash;

    /// The state before any operation.
    fn init(&self) -> Self::State;

    /// The state after applying an operation that answered `output`, or `None` when a
    /// sequential system in `state` could not have answered that.
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: &Self::Output,
    ) -> Option<Self::State>;

    /// Splits the history into independent parts, each a list of indices into `history`.
    /// Every index appears at most once; an operation left out of every part is not checked,
    /// which is right only for operations that constrain nothing (such as a read whose answer
    /// never came). By default the whole history is one part.
    fn partition(&self, history: &[Operation<Self::Input, Self::Output>]) -> Vec<Vec<usize>> {
        vec![(0..history.len()).collect()]
    }

    /// Rewrites one part before it is searched, keeping its operations in order, in a way
    /// that cannot change whether it is linearizable. A model may give an unknown-outcome
    /// operation a return time when the rest of the part proves it took effect by then, or
    /// erase details no step can observe so that unknown operations become identical (and so
    /// interchangeable). Explanations still show the operations as recorded. By default the
    /// part is searched as it is.
    fn prepare(
        &self,
        part: Vec<Operation<Self::Input, Self::Output>>,
    ) -> Vec<Operation<Self::Input, Self::Output>> {
        part
    }

    /// A one-line description of an operation, for explanations.
    fn describe_operation(&self, input: &Self::Input, output: &Self::Output) -> String;

    /// A one-line description of a state, for explanations.
    fn describe_state(&self, state: &Self::State) -> String;

    /// An estimate of the bytes one copy of `state` takes, inline and on the heap but not
    /// counting what copies share, for the memoisation cache's memory limit. The default
    /// counts only the inline size, which is right for states without heap data.
    fn state_bytes(&self, state: &Self::State) -> usize {
        let _ = state;
        std::mem::size_of::<Self::State>()
    }
}

/// A sequential specification in which an operation may lead to several states, for example
/// when its output does not reveal which of two effects it had.
pub trait NondeterministicModel {
    /// What an operation asks.
    type Input: Clone + Eq + Hash;
    /// What an operation answered.
    type Output: Clone + Eq + Hash;
    /// One possible state; ordered so that sets of states have one canonical form for the
    /// memoisation cache.
    type State: Clone + Ord + Hash;

    /// The possible states before any operation.
    fn init(&self) -> Vec<Self::State>;

    /// Every state the operation may lead to from `state`; empty when it is impossible.
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: &Self::Output,
    ) -> Vec<Self::State>;

    /// See [`Model::partition`].
    fn partition(&self, history: &[Operation<Self::Input, Self::Output>]) -> Vec<Vec<usize>> {
        vec![(0..history.len()).collect()]
    }

    /// See [`Model::prepare`].
    fn prepare(
        &self,
        part: Vec<Operation<Self::Input, Self::Output>>,
    ) -> Vec<Operation<Self::Input, Self::Output>> {
        part
    }

    /// See [`Model::describe_operation`].
    fn describe_operation(&self, input: &Self::Input, output: &Self::Output) -> String;

    /// See [`Model::describe_state`].
    fn describe_state(&self, state: &Self::State) -> String;

    /// See [`Model::state_bytes`].
    fn state_bytes(&self, state: &Self::State) -> usize {
        let _ = state;
        std::mem::size_of::<Self::State>()
    }
}

/// A [`NondeterministicModel`] seen as a deterministic [`Model`] whose state is the set of
/// states the system may be in.
///
/// The set holds at most one copy of each state, so its size is bounded by the number of
/// distinct states the wrapped model can fork into; a model whose forks never merge should
/// bound itself (for example by resolving a fork as soon as an output reveals it).
#[derive(Clone, Debug, Default)]
pub struct PowersetModel<N>(pub N);

impl<N: NondeterministicModel> Model for PowersetModel<N> {
    type Input = N::Input;
    type Output = N::Output;
    type State = BTreeSet<N::State>;

    fn init(&self) -> Self::State {
        self.0.init().into_iter().collect()
    }

    fn step(
        &self,
        states: &Self::State,
        input: &Self::Input,
        output: &Self::Output,
    ) -> Option<Self::State> {
        let next_states: BTreeSet<N::State> = states
            .iter()
            .flat_map(|state| self.0.step(state, input, output))
            .collect();
        if next_states.is_empty() {
            None
        } else {
            Some(next_states)
        }
    }

    fn partition(&self, history: &[Operation<Self::Input, Self::Output>]) -> Vec<Vec<usize>> {
        self.0.partition(history)
    }

    fn prepare(
        &self,
        part: Vec<Operation<Self::Input, Self::Output>>,
    ) -> Vec<Operation<Self::Input, Self::Output>> {
        self.0.prepare(part)
    }

    fn describe_operation(&self, input: &Self::Input, output: &Self::Output) -> String {
        self.0.describe_operation(input, output)
    }

    fn describe_state(&self, states: &Self::State) -> String {
        let descriptions: Vec<String> = states
            .iter()
            .map(|state| self.0.describe_state(state))
            .collect();
        format!("one of {{{}}}", descriptions.join(" | "))
    }

    /// Each state, plus about three words of B-tree node per state.
    fn state_bytes(&self, states: &Self::State) -> usize {
        std::mem::size_of::<Self::State>()
            + states
                .iter()
                .map(|state| self.0.state_bytes(state) + 3 * std::mem::size_of::<usize>())
                .sum::<usize>()
    }
}
