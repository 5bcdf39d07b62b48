//! The sequential specification of keel's key-value store, with etcd's revisions.
//!
//! etcd's revision is one counter for the whole store, raised by one by every write that
//! changes it (a put, a delete that deleted a key, a compare-and-swap that succeeded). That
//! makes a choice necessary, offered as two variants of [`KeyValueModel`]:
//!
//! - [`KeyValueModel::per_key`] splits the history by key and checks each key alone: values,
//!   that a read's `mod_revision` is the revision of the write it read, and that revisions
//!   never decrease along the order (a write's strictly increases). It cannot see revisions of
//!   other keys, so it only bounds them from below. Parts are small, so the search stays fast
//!   on histories of tens of thousands of operations. **The simulator should use it for every
//!   big history** (and multi-process tests always, since their stores may see writes that are
//!   not in the history, such as lock keys).
//! - [`KeyValueModel::global`] checks the whole history as one part and tracks the exact store
//!   revision: a write must create exactly the next revision and a read must see exactly the
//!   current one. It catches revisions skipped, reused or mixed up across keys, but its search
//!   grows with the concurrency of the whole history, and it requires that **every** write to
//!   the store is in the history. **The simulator should use it for small histories** (up to a
//!   few hundred operations with a handful of clients), as a second pass after the per-key one.
//!
//! Measured on this project's 2-core machine (release build, 2% of requests timing out, see
//! `models_scale_to_big_histories` in `tests/randomized.rs`): per key, 100,000 operations over
//! 50 keys check in about 0.2 s, and a made-up read at the end is proven illegal in 0.05 s;
//! global, 1,000 operations over 50 keys check in 0.05 s, but proving a made-up read illegal
//! takes about 1 s, and it grows quickly from there.
//!
//! [`check_revisions`](crate::check_revisions) checks the revision invariants that need no
//! search (uniqueness, real-time monotonicity) on histories of any size, and should run with
//! either model.
//!
//! Both variants leave serializable reads (checked by
//! [`check_serializable_reads`](crate::check_serializable_reads)) and reads whose answer never
//! came (they constrain nothing) out of the search.
//!
//! # Leases
//!
//! Both variants model etcd's leases: a grant creates a lease; a put with a lease attaches
//! its key (a later put without one, or with another, detaches it); a revocation or an expiry
//! deletes every key still attached, at **one** new revision (none when no key is attached),
//! and ends the lease; a put naming a lease that does not exist fails with "requested lease
//! not found" and changes nothing; a keep-alive finds the lease (TTL above 0) or does not
//! (TTL 0). When a lease may expire is not the model's business: the history carries one
//! expiry per lease, with an unknown outcome, called at the earliest instant the lease may
//! expire (see [`leases`](crate::leases)).
//!
//! A revocation touches several keys, so splitting the history by key is no longer sound
//! once leases are in it: a key vanishing with its lease must be checked against its
//! siblings. The per-key variant therefore splits the history into **connected components**
//! of keys and leases: a put with a lease joins its key and its lease, every other request
//! belongs to its key's or its lease's component. A history without leases is split by key
//! exactly as before; each lease joins only the keys ever attached to it, so components
//! stay small when clients keep their leased keys apart. The global variant is one part, as
//! ever.
//!
//! Both variants are deterministic even for unknown outcomes: the effect of a request on a
//! known state is determined by its input (a compare-and-swap succeeds exactly when the value
//! matches), and an unknown write's revision is either determined (global) or bounded from
//! below until a read reveals it (per key). The "never took effect" branch is the search's: an
//! operation with an unknown outcome need not be linearized at all.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::sync::Arc;

use crate::bytes::Bytes;
use crate::history::{Input, Operation, Output};
use crate::model::Model;

/// The most keys a state description lists, so explanations of big states stay readable.
const DESCRIBED_KEYS_MAX: usize = 20;

/// etcd's revision of a new, empty store: the first write creates revision 2.
pub const INITIAL_REVISION_DEFAULT: u64 = 1;

/// How a [`KeyValueModel`] checks revisions; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevisionChecking {
    /// Per key: revisions only bounded from below; the history is partitioned by key.
    PerKey,
    /// The exact store revision, over the whole history as one part.
    Global {
        /// The store revision before the first operation.
        initial_revision: u64,
    },
}

/// The key-value model; see the module documentation for its two variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyValueModel {
    revision_checking: RevisionChecking,
}

impl KeyValueModel {
    /// The per-key variant, for histories of any size.
    pub const fn per_key() -> KeyValueModel {
        KeyValueModel {
            revision_checking: RevisionChecking::PerKey,
        }
    }

    /// The global variant for a store that starts empty at etcd's initial revision.
    pub const fn global() -> KeyValueModel {
        KeyValueModel::global_from(INITIAL_REVISION_DEFAULT)
    }

    /// The global variant for a store that starts empty at `initial_revision`.
    pub const fn global_from(initial_revision: u64) -> KeyValueModel {
        KeyValueModel {
            revision_checking: RevisionChecking::Global { initial_revision },
        }
    }

    /// How this model checks revisions.
    pub fn revision_checking(&self) -> RevisionChecking {
        self.revision_checking
    }

    fn is_global(&self) -> bool {
        matches!(self.revision_checking, RevisionChecking::Global { .. })
    }

    /// Whether a read-only answer (a read, a delete of an absent key, a failed
    /// compare-and-swap) may carry `revision` in `state`.
    fn admits_read_revision(&self, state: &KeyValueState, revision: u64) -> bool {
        if self.is_global() {
            revision == state.revision
        } else {
            revision >= state.revision
        }
    }

    fn after_read(&self, state: &KeyValueState, revision: u64) -> KeyValueState {
        let mut next = state.clone();
        next.revision = revision;
        next
    }

    /// The store revision after a write from `state`, and the mod_revision of the keys it
    /// writes, given the revision in its answer when the answer is known; `None` when that
    /// answer is impossible.
    fn next_revision(
        &self,
        state: &KeyValueState,
        revision: Option<u64>,
    ) -> Option<(u64, ModRevision)> {
        Some(match (self.revision_checking, revision) {
            (RevisionChecking::Global { .. }, revision) => {
                let created = state.revision + 1;
                if revision.is_some_and(|revision| revision != created) {
                    return None;
                }
                (created, ModRevision::Known(created))
            }
            (RevisionChecking::PerKey, Some(revision)) => {
                if revision <= state.revision {
                    return None;
                }
                (revision, ModRevision::Known(revision))
            }
            // The write created some revision above everything seen so far on this key, until
            // a read reveals which. The lower bound for later answers is left where it is (it
            // could rise by one): that loses almost nothing, and keeps states reached through
            // different numbers of such writes equal, which the search's cache relies on to
            // stay small when many requests time out.
            (RevisionChecking::PerKey, None) => (
                state.revision,
                ModRevision::Above {
                    revision: state.revision,
                },
            ),
        })
    }

    /// Applies a write that changes `key` to `value` (`None` deletes it), attached to
    /// `lease_id` (0: none), created at `revision` when the answer is known.
    fn write(
        &self,
        state: &KeyValueState,
        key: &Bytes,
        value: Option<&Bytes>,
        lease_id: i64,
        revision: Option<u64>,
    ) -> Option<KeyValueState> {
        let (store_revision, mod_revision) = self.next_revision(state, revision)?;
        let mut next = state.clone();
        next.revision = store_revision;
        match value {
            Some(value) => next.keys.insert(
                key,
                Record {
                    value: Arc::from(value.as_slice()),
                    mod_revision,
                    lease_id,
                },
            ),
            None => next.keys.remove(key),
        }
        Some(next)
    }

    /// Ends a lease that exists in `state` (a revocation, or an expiry): it goes, and every
    /// key attached to it is deleted at one new revision; with no key attached the revision
    /// stays, and an answer's revision is checked as a read's. `revision` is the answer's,
    /// when it is known.
    fn end_lease(
        &self,
        state: &KeyValueState,
        lease_id: i64,
        revision: Option<u64>,
    ) -> Option<KeyValueState> {
        let mut next = state.clone();
        next.leases.remove(lease_id);
        let attached = state
            .keys
            .0
            .iter()
            .any(|(_, record)| record.lease_id == lease_id);
        if !attached {
            return match revision {
                Some(revision) if !self.admits_read_revision(state, revision) => None,
                Some(revision) => {
                    next.revision = revision;
                    Some(next)
                }
                None => Some(next),
            };
        }
        let (store_revision, _) = self.next_revision(state, revision)?;
        next.revision = store_revision;
        next.keys
            .0
            .retain(|(_, record)| record.lease_id != lease_id);
        Some(next)
    }

    /// A request that creates lease `lease_id` with `ttl_seconds`, answered at `revision`
    /// when the answer is known; an id that exists is refused by the store (no effect).
    fn grant(
        &self,
        state: &KeyValueState,
        lease_id: i64,
        ttl_seconds: i64,
        revision: Option<u64>,
    ) -> Option<KeyValueState> {
        let exists = state.leases.contains(lease_id);
        let mut next = match revision {
            // A grant answered with success created the lease; one that exists is refused.
            Some(_) if exists => return None,
            Some(revision) if !self.admits_read_revision(state, revision) => return None,
            Some(revision) => self.after_read(state, revision),
            None if exists => return Some(state.clone()),
            None => state.clone(),
        };
        next.leases.insert(lease_id, ttl_seconds);
        Some(next)
    }

    fn step_get(
        &self,
        state: &KeyValueState,
        key: &Bytes,
        value: Option<&Bytes>,
        mod_revision: u64,
        revision: u64,
    ) -> Option<KeyValueState> {
        if mod_revision > revision || !self.admits_read_revision(state, revision) {
            return None;
        }
        match (state.keys.get(key), value) {
            (None, None) => (mod_revision == 0).then(|| self.after_read(state, revision)),
            (Some(record), Some(value)) if *record.value == **value => match record.mod_revision {
                ModRevision::Known(known) if known == mod_revision => {
                    Some(self.after_read(state, revision))
                }
                ModRevision::Above { revision: bound } if mod_revision > bound => {
                    let mut next = self.after_read(state, revision);
                    let record = next.keys.get_mut(key).expect("the key was just read");
                    record.mod_revision = ModRevision::Known(mod_revision);
                    Some(next)
                }
                _ => None,
            },
            _ => None,
        }
    }
}

impl Default for KeyValueModel {
    fn default() -> Self {
        KeyValueModel::per_key()
    }
}

/// The state of the sequential store (or of one component of keys and leases, for the
/// per-key variant).
///
/// The search clones a state for every step and keeps one per cache entry, so states are
/// small: keys and values are shared, reference-counted byte strings, and the keys sit in a
/// sorted vector, exactly as long as needed, rather than in a map.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyValueState {
    /// The store revision (global variant), or the highest revision the order has reached so
    /// far, a lower bound for every later answer (per-key variant).
    revision: u64,
    keys: Keys,
    leases: Leases,
}

/// The leases in force, by id, with their TTL in seconds, sorted by id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct Leases(Vec<(i64, i64)>);

impl Leases {
    fn position(&self, lease_id: i64) -> Result<usize, usize> {
        self.0.binary_search_by_key(&lease_id, |(id, _)| *id)
    }

    fn contains(&self, lease_id: i64) -> bool {
        self.position(lease_id).is_ok()
    }

    fn insert(&mut self, lease_id: i64, ttl_seconds: i64) {
        match self.position(lease_id) {
            Ok(position) => self.0[position].1 = ttl_seconds,
            Err(position) => self.0.insert(position, (lease_id, ttl_seconds)),
        }
    }

    fn remove(&mut self, lease_id: i64) {
        if let Ok(position) = self.position(lease_id) {
            self.0.remove(position);
        }
    }
}

/// The present keys, sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct Keys(Vec<(Arc<[u8]>, Record)>);

impl Keys {
    fn position(&self, key: &[u8]) -> Result<usize, usize> {
        self.0.binary_search_by(|(present, _)| (**present).cmp(key))
    }

    fn get(&self, key: &[u8]) -> Option<&Record> {
        let position = self.position(key).ok()?;
        Some(&self.0[position].1)
    }

    fn get_mut(&mut self, key: &[u8]) -> Option<&mut Record> {
        let position = self.position(key).ok()?;
        Some(&mut self.0[position].1)
    }

    fn contains_key(&self, key: &[u8]) -> bool {
        self.position(key).is_ok()
    }

    fn insert(&mut self, key: &[u8], record: Record) {
        match self.position(key) {
            Ok(position) => self.0[position].1 = record,
            Err(position) => self.0.insert(position, (Arc::from(key), record)),
        }
    }

    fn remove(&mut self, key: &[u8]) {
        if let Ok(position) = self.position(key) {
            self.0.remove(position);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// A present key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Record {
    value: Arc<[u8]>,
    mod_revision: ModRevision,
    /// The lease the key is attached to; 0 for none.
    lease_id: i64,
}

/// The revision of a key's last write, as far as the per-key variant knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ModRevision {
    Known(u64),
    /// Written by a request whose answer never came: created some revision above this one.
    Above {
        revision: u64,
    },
}

impl Model for KeyValueModel {
    type Input = Input;
    type Output = Output;
    type State = KeyValueState;

    fn init(&self) -> KeyValueState {
        let revision = match self.revision_checking {
            RevisionChecking::PerKey => 0,
            RevisionChecking::Global { initial_revision } => initial_revision,
        };
        KeyValueState {
            revision,
            keys: Keys::default(),
            leases: Leases::default(),
        }
    }

    fn step(&self, state: &KeyValueState, input: &Input, output: &Output) -> Option<KeyValueState> {
        match (input, output) {
            (_, Output::Unknown) => self.step_unknown(state, input),
            (Input::Put { key, value }, Output::Put { revision }) => {
                self.write(state, key, Some(value), 0, Some(*revision))
            }
            (
                Input::Get { key, .. },
                Output::Get {
                    value,
                    mod_revision,
                    revision,
                },
            ) => self.step_get(state, key, value.as_ref(), *mod_revision, *revision),
            (Input::Delete { key }, Output::Delete { deleted, revision }) => {
                let present = state.keys.contains_key(key);
                match (present, deleted) {
                    (true, 1) => self.write(state, key, None, 0, Some(*revision)),
                    (false, 0) if self.admits_read_revision(state, *revision) => {
                        Some(self.after_read(state, *revision))
                    }
                    _ => None,
                }
            }
            (
                Input::CompareAndSwap {
                    key,
                    expected,
                    new_value,
                },
                Output::CompareAndSwap {
                    succeeded,
                    revision,
                },
            ) => {
                let matches = state.value(key) == expected.as_deref();
                match (matches, succeeded) {
                    (true, true) => self.write(state, key, Some(new_value), 0, Some(*revision)),
                    (false, false) if self.admits_read_revision(state, *revision) => {
                        Some(self.after_read(state, *revision))
                    }
                    _ => None,
                }
            }
            (
                Input::PutWithLease {
                    key,
                    value,
                    lease_id,
                },
                Output::Put { revision },
            ) if state.leases.contains(*lease_id) => {
                self.write(state, key, Some(value), *lease_id, Some(*revision))
            }
            (
                Input::PutWithLease { lease_id, .. } | Input::LeaseRevoke { lease_id },
                Output::LeaseNotFound,
            ) if !state.leases.contains(*lease_id) => Some(state.clone()),
            (
                Input::LeaseGrant {
                    lease_id,
                    ttl_seconds,
                },
                Output::LeaseGrant { revision },
            ) => self.grant(state, *lease_id, *ttl_seconds, Some(*revision)),
            // A keep-alive is a read of the lease table: found exactly when it exists.
            (Input::LeaseKeepAlive { lease_id }, Output::LeaseKeepAlive { ttl_seconds }) => {
                (state.leases.contains(*lease_id) == (*ttl_seconds > 0)).then(|| state.clone())
            }
            (Input::LeaseRevoke { lease_id }, Output::LeaseRevoke { revision })
                if state.leases.contains(*lease_id) =>
            {
                self.end_lease(state, *lease_id, Some(*revision))
            }
            _ => None,
        }
    }

    fn partition(&self, history: &[Operation]) -> Vec<Vec<usize>> {
        let constrains = |operation: &Operation| {
            let unanswered_read =
                matches!(operation.input, Input::Get { .. }) && operation.output == Output::Unknown;
            !unanswered_read && !operation.input.is_serializable_read()
        };
        let searched = history
            .iter()
            .enumerate()
            .filter(|(_, operation)| constrains(operation));
        if self.is_global() {
            return vec![searched.map(|(index, _)| index).collect()];
        }
        connected_components(searched)
    }

    /// Two rewrites of unknown-outcome writes (puts and compare-and-swaps), both sound:
    ///
    /// - A write whose value no other request of the part writes, and which an answered read
    ///   (or successful compare-and-swap) observed, did take effect, before that observer
    ///   returned: it gets the observer's return time as its own, so the search must place it
    ///   by then and never tries orders that leave it out.
    /// - A value no step ever compares (no read returned it, no compare-and-swap expects it)
    ///   is replaced by one placeholder that differs from every value of the part. No step
    ///   can tell the difference, and unknown writes of the same key then become identical,
    ///   which the search treats as interchangeable instead of trying every subset of them.
    ///
    /// And one for leases, as sound: a grant whose answer never came, of a lease that an
    /// answered request found (a put with it succeeded, a keep-alive found it, a revocation
    /// ended it), took effect before the first such request returned, provided it is the
    /// only grant of that id in the part.
    fn prepare(&self, mut part: Vec<Operation>) -> Vec<Operation> {
        bound_unknown_grants(&mut part);
        let placeholder = unread_value_placeholder(&part);
        let mut writers: BTreeMap<(&Bytes, &Bytes), usize> = BTreeMap::new();
        let mut compared: BTreeSet<(&Bytes, &Bytes)> = BTreeSet::new();
        let mut observed_by: BTreeMap<(&Bytes, &Bytes), u64> = BTreeMap::new();
        for operation in &part {
            if let Some(written) = written_value(&operation.input) {
                *writers.entry(written).or_default() += 1;
            }
            let observed = match (&operation.input, &operation.output) {
                (
                    Input::Get { key, .. },
                    Output::Get {
                        value: Some(value), ..
                    },
                ) => Some((key, value)),
                (
                    Input::CompareAndSwap {
                        key,
                        expected: Some(expected),
                        ..
                    },
                    output,
                ) => {
                    compared.insert((key, expected));
                    let succeeded = matches!(
                        output,
                        Output::CompareAndSwap {
                            succeeded: true,
                            ..
                        }
                    );
                    succeeded.then_some((key, expected))
                }
                _ => None,
            };
            if let Some(observed) = observed {
                compared.insert(observed);
                if let Some(return_time) = operation.return_time {
                    let first = observed_by.entry(observed).or_insert(return_time);
                    *first = (*first).min(return_time);
                }
            }
        }

        enum Rewrite {
            Deadline(u64),
            Placeholder,
        }
        let rewrites: Vec<(usize, Rewrite)> = part
            .iter()
            .enumerate()
            .filter(|(_, operation)| operation.return_time.is_none())
            .filter_map(|(index, operation)| {
                let written = written_value(&operation.input)?;
                if writers[&written] == 1 {
                    if let Some(observed) = observed_by.get(&written) {
                        // An observer that returned before this call makes the part illegal
                        // anyway; the clamp only keeps the return after the call.
                        let deadline = (*observed).max(operation.call_time);
                        return Some((index, Rewrite::Deadline(deadline)));
                    }
                }
                (!compared.contains(&written)).then_some((index, Rewrite::Placeholder))
            })
            .collect();
        for (index, rewrite) in rewrites {
            let operation = &mut part[index];
            match rewrite {
                Rewrite::Deadline(deadline) => operation.return_time = Some(deadline),
                Rewrite::Placeholder => match &mut operation.input {
                    Input::Put { value, .. } => *value = placeholder.clone(),
                    Input::CompareAndSwap { new_value, .. } => *new_value = placeholder.clone(),
                    Input::PutWithLease { value, .. } => *value = placeholder.clone(),
                    _ => unreachable!("only writes of a value are rewritten"),
                },
            }
        }
        part
    }

    fn describe_operation(&self, input: &Input, output: &Output) -> String {
        describe_operation(input, output)
    }

    /// Keys and values are shared between states, so a copy costs its vectors of entries.
    fn state_bytes(&self, state: &KeyValueState) -> usize {
        std::mem::size_of::<KeyValueState>()
            + state.keys.0.capacity() * std::mem::size_of::<(Arc<[u8]>, Record)>()
            + state.leases.0.capacity() * std::mem::size_of::<(i64, i64)>()
    }

    fn describe_state(&self, state: &KeyValueState) -> String {
        let mut description = if self.is_global() {
            format!("revision {}", state.revision)
        } else {
            format!("revision at least {}", state.revision)
        };
        if state.keys.is_empty() {
            description.push_str("; no keys");
        }
        for (key, record) in state.keys.0.iter().take(DESCRIBED_KEYS_MAX) {
            let _ = write!(
                description,
                "; {} = {}",
                Bytes::from(&key[..]),
                Bytes::from(&record.value[..])
            );
            let _ = match record.mod_revision {
                ModRevision::Known(revision) => write!(description, " (mod_revision {revision}"),
                ModRevision::Above { revision } => {
                    write!(description, " (mod_revision above {revision}")
                }
            };
            let _ = if record.lease_id != 0 {
                write!(description, ", lease {:#x})", record.lease_id)
            } else {
                write!(description, ")")
            };
        }
        if state.keys.len() > DESCRIBED_KEYS_MAX {
            let _ = write!(
                description,
                "; … {} more keys",
                state.keys.len() - DESCRIBED_KEYS_MAX
            );
        }
        for (lease_id, ttl_seconds) in &state.leases.0 {
            let _ = write!(description, "; lease {lease_id:#x} (ttl {ttl_seconds} s)");
        }
        description
    }
}

impl KeyValueModel {
    /// A request whose answer never came takes the effect its input has on `state`.
    fn step_unknown(&self, state: &KeyValueState, input: &Input) -> Option<KeyValueState> {
        match input {
            Input::Put { key, value } => self.write(state, key, Some(value), 0, None),
            Input::Get { .. } | Input::LeaseKeepAlive { .. } => Some(state.clone()),
            Input::Delete { key } => {
                if state.keys.contains_key(key) {
                    self.write(state, key, None, 0, None)
                } else {
                    Some(state.clone())
                }
            }
            Input::PutWithLease {
                key,
                value,
                lease_id,
            } => {
                if state.leases.contains(*lease_id) {
                    self.write(state, key, Some(value), *lease_id, None)
                } else {
                    Some(state.clone())
                }
            }
            Input::LeaseGrant {
                lease_id,
                ttl_seconds,
            } => self.grant(state, *lease_id, *ttl_seconds, None),
            Input::LeaseRevoke { lease_id } | Input::LeaseExpire { lease_id } => {
                if state.leases.contains(*lease_id) {
                    self.end_lease(state, *lease_id, None)
                } else {
                    Some(state.clone())
                }
            }
            Input::CompareAndSwap {
                key,
                expected,
                new_value,
            } => {
                if state.value(key) == expected.as_deref() {
                    self.write(state, key, Some(new_value), 0, None)
                } else {
                    Some(state.clone())
                }
            }
        }
    }
}

/// The key and value a request may write.
fn written_value(input: &Input) -> Option<(&Bytes, &Bytes)> {
    match input {
        Input::Put { key, value } | Input::PutWithLease { key, value, .. } => Some((key, value)),
        Input::CompareAndSwap { key, new_value, .. } => Some((key, new_value)),
        _ => None,
    }
}

/// A key or a lease: what connects the operations of one component.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Node<'a> {
    Key(&'a Bytes),
    Lease(i64),
}

/// Splits operations into connected components of keys and leases (see the module
/// documentation), each a list of history positions in history order; components come in
/// the order of their smallest key (then lease), so that parts are deterministic.
fn connected_components<'a>(
    operations: impl Iterator<Item = (usize, &'a Operation)> + Clone,
) -> Vec<Vec<usize>> {
    let nodes_of = |operation: &'a Operation| {
        let key = operation.input.key().map(Node::Key);
        let lease = operation.input.lease_id().map(Node::Lease);
        (key, lease)
    };
    // Number the nodes in sorted order, so that the smallest node of a component is its root.
    let mut numbers: BTreeMap<Node<'a>, usize> = BTreeMap::new();
    for (_, operation) in operations.clone() {
        let (key, lease) = nodes_of(operation);
        numbers.extend(key.into_iter().chain(lease).map(|node| (node, 0)));
    }
    for (number, slot) in numbers.values_mut().enumerate() {
        *slot = number;
    }
    let mut parents: Vec<usize> = (0..numbers.len()).collect();
    fn root(parents: &mut [usize], mut node: usize) -> usize {
        while parents[node] != node {
            parents[node] = parents[parents[node]];
            node = parents[node];
        }
        node
    }
    for (_, operation) in operations.clone() {
        if let (Some(key), Some(lease)) = nodes_of(operation) {
            let key_root = root(&mut parents, numbers[&key]);
            let lease_root = root(&mut parents, numbers[&lease]);
            let (smaller, larger) = (key_root.min(lease_root), key_root.max(lease_root));
            parents[larger] = smaller;
        }
    }
    let mut components: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (index, operation) in operations {
        let (key, lease) = nodes_of(operation);
        let Some(node) = key.or(lease) else {
            continue;
        };
        let component = root(&mut parents, numbers[&node]);
        components.entry(component).or_default().push(index);
    }
    components.into_values().collect()
}

/// The lease rewrite of [`KeyValueModel::prepare`]: unknown grants of a lease that an
/// answered request found get that request's return time as a deadline.
fn bound_unknown_grants(part: &mut [Operation]) {
    let mut grants: BTreeMap<i64, usize> = BTreeMap::new();
    let mut found_by: BTreeMap<i64, u64> = BTreeMap::new();
    for operation in part.iter() {
        let found = match (&operation.input, &operation.output) {
            (Input::LeaseGrant { lease_id, .. }, _) => {
                *grants.entry(*lease_id).or_default() += 1;
                None
            }
            (Input::PutWithLease { lease_id, .. }, Output::Put { .. })
            | (Input::LeaseRevoke { lease_id }, Output::LeaseRevoke { .. }) => Some(*lease_id),
            (Input::LeaseKeepAlive { lease_id }, Output::LeaseKeepAlive { ttl_seconds })
                if *ttl_seconds > 0 =>
            {
                Some(*lease_id)
            }
            _ => None,
        };
        if let (Some(lease_id), Some(return_time)) = (found, operation.return_time) {
            let first = found_by.entry(lease_id).or_insert(return_time);
            *first = (*first).min(return_time);
        }
    }
    for operation in part.iter_mut() {
        let Input::LeaseGrant { lease_id, .. } = operation.input else {
            continue;
        };
        if operation.return_time.is_some() || grants[&lease_id] != 1 {
            continue;
        }
        if let Some(found) = found_by.get(&lease_id) {
            // A finder that returned before this call makes the part illegal anyway; the
            // clamp only keeps the return after the call.
            operation.return_time = Some((*found).max(operation.call_time));
        }
    }
}

/// A value that appears nowhere in `part`, readable in state descriptions.
fn unread_value_placeholder(part: &[Operation]) -> Bytes {
    let mut values: BTreeSet<&Bytes> = BTreeSet::new();
    for operation in part {
        match &operation.input {
            Input::Put { value, .. } | Input::PutWithLease { value, .. } => {
                values.insert(value);
            }
            Input::CompareAndSwap {
                expected,
                new_value,
                ..
            } => {
                values.insert(new_value);
                values.extend(expected);
            }
            _ => {}
        }
        if let Output::Get {
            value: Some(value), ..
        } = &operation.output
        {
            values.insert(value);
        }
    }
    let mut placeholder = String::from("<a value nobody reads>");
    while values.contains(&Bytes::from(placeholder.as_str())) {
        placeholder.push('\'');
    }
    Bytes::from(placeholder)
}

impl KeyValueState {
    fn value(&self, key: &Bytes) -> Option<&[u8]> {
        self.keys.get(key).map(|record| &record.value[..])
    }
}

/// A one-line description of a key-value operation, such as
/// `put "k" = "v" -> revision 5`.
pub fn describe_operation(input: &Input, output: &Output) -> String {
    let request = match input {
        Input::Put { key, value } => format!("put {key} = {value}"),
        Input::Get { key, serializable } => {
            if *serializable {
                format!("get {key} (serializable)")
            } else {
                format!("get {key}")
            }
        }
        Input::Delete { key } => format!("delete {key}"),
        Input::CompareAndSwap {
            key,
            expected,
            new_value,
        } => match expected {
            Some(expected) => format!("compare_and_swap {key} if {expected} then {new_value}"),
            None => format!("compare_and_swap {key} if absent then {new_value}"),
        },
        Input::PutWithLease {
            key,
            value,
            lease_id,
        } => format!("put {key} = {value} with lease {lease_id:#x}"),
        Input::LeaseGrant {
            lease_id,
            ttl_seconds,
        } => format!("grant lease {lease_id:#x} (ttl {ttl_seconds} s)"),
        Input::LeaseKeepAlive { lease_id } => format!("keep lease {lease_id:#x} alive"),
        Input::LeaseRevoke { lease_id } => format!("revoke lease {lease_id:#x}"),
        Input::LeaseExpire { lease_id } => {
            format!("lease {lease_id:#x} expires (at the earliest at its call time)")
        }
    };
    let answer = match output {
        Output::Put { revision } => format!("revision {revision}"),
        Output::Get {
            value: Some(value),
            mod_revision,
            revision,
        } => format!("{value} (mod_revision {mod_revision}, revision {revision})"),
        Output::Get {
            value: None,
            mod_revision,
            revision,
        } => format!("absent (mod_revision {mod_revision}, revision {revision})"),
        Output::Delete { deleted, revision } => format!("deleted {deleted}, revision {revision}"),
        Output::CompareAndSwap {
            succeeded,
            revision,
        } => {
            let outcome = if *succeeded { "succeeded" } else { "failed" };
            format!("{outcome}, revision {revision}")
        }
        Output::LeaseGrant { revision } | Output::LeaseRevoke { revision } => {
            format!("revision {revision}")
        }
        Output::LeaseKeepAlive { ttl_seconds } if *ttl_seconds > 0 => {
            format!("ttl {ttl_seconds} s")
        }
        Output::LeaseKeepAlive { ttl_seconds } => format!("lease not found (ttl {ttl_seconds})"),
        Output::LeaseNotFound => "requested lease not found".to_string(),
        Output::Unknown => "unknown".to_string(),
    };
    format!("{request} -> {answer}")
}

#[cfg(test)]
mod key_value_test;
