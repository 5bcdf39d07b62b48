//! Randomized histories from a correct sequential store: both models must accept them, and
//! must both reject them after one corruption that no order can explain.
//!
//! Each history comes from running a sequential key-value store with etcd's revisions: the
//! operation number `i` takes effect at time `100 + 10 i`, and its call and return are drawn
//! around that point, so intervals overlap and the checker has orders to search. Some requests
//! lose their answer (unknown outcome) and then took effect or not at random; some reads are
//! serializable and see an older state. Some histories also grant leases, put keys with them,
//! keep them alive, revoke them and let them expire (the expiry recorded as the unknown-outcome
//! operation the checker inserts). The seed is fixed, so a failure reproduces.

use std::collections::BTreeMap;
use std::time::Duration;

use keel_check::{
    check_model, check_revisions, check_serializable_reads, Bytes, CheckOptions, CheckResult,
    Input, KeyValueModel, Model, Operation, Output,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SEED: u64 = 0x6b65_656c;
const HISTORY_COUNT: usize = 200;
const KEYS: [&str; 3] = ["a", "b", "c"];
const TIMEOUT: Duration = Duration::from_secs(10);
/// A lease id no generated grant uses.
const NEVER_GRANTED_LEASE_ID: i64 = -1;

/// The sequential store: key → (value, mod_revision), the store revision, the leases in
/// force (id → TTL) and the lease each key is attached to.
#[derive(Clone, Default)]
struct Store {
    keys: BTreeMap<Bytes, (Bytes, u64)>,
    revision: u64,
    leases: BTreeMap<i64, i64>,
    attached: BTreeMap<Bytes, i64>,
}

impl Store {
    fn new() -> Store {
        Store {
            revision: 1,
            ..Store::default()
        }
    }

    fn read(&self, key: &Bytes) -> Output {
        match self.keys.get(key) {
            Some((value, mod_revision)) => Output::Get {
                value: Some(value.clone()),
                mod_revision: *mod_revision,
                revision: self.revision,
            },
            None => Output::Get {
                value: None,
                mod_revision: 0,
                revision: self.revision,
            },
        }
    }

    /// Ends a lease: its keys go at one revision.
    fn end_lease(&mut self, lease_id: i64) {
        self.leases.remove(&lease_id);
        let keys: Vec<Bytes> = self
            .attached
            .iter()
            .filter(|(_, lease)| **lease == lease_id)
            .map(|(key, _)| key.clone())
            .collect();
        if !keys.is_empty() {
            self.revision += 1;
        }
        for key in keys {
            self.keys.remove(&key);
            self.attached.remove(&key);
        }
    }

    fn apply(&mut self, input: &Input) -> Output {
        match input {
            Input::Put { key, value } => {
                self.revision += 1;
                self.keys
                    .insert(key.clone(), (value.clone(), self.revision));
                self.attached.remove(key);
                Output::Put {
                    revision: self.revision,
                }
            }
            Input::PutWithLease {
                key,
                value,
                lease_id,
            } => {
                if !self.leases.contains_key(lease_id) {
                    return Output::LeaseNotFound;
                }
                self.revision += 1;
                self.keys
                    .insert(key.clone(), (value.clone(), self.revision));
                self.attached.insert(key.clone(), *lease_id);
                Output::Put {
                    revision: self.revision,
                }
            }
            Input::LeaseGrant {
                lease_id,
                ttl_seconds,
            } => {
                self.leases.insert(*lease_id, *ttl_seconds);
                Output::LeaseGrant {
                    revision: self.revision,
                }
            }
            Input::LeaseKeepAlive { lease_id } => Output::LeaseKeepAlive {
                ttl_seconds: self.leases.get(lease_id).copied().unwrap_or(0),
            },
            Input::LeaseRevoke { lease_id } | Input::LeaseExpire { lease_id } => {
                if !self.leases.contains_key(lease_id) {
                    return Output::LeaseNotFound;
                }
                self.end_lease(*lease_id);
                Output::LeaseRevoke {
                    revision: self.revision,
                }
            }
            Input::Get { key, .. } => self.read(key),
            Input::Delete { key } => {
                self.attached.remove(key);
                let deleted = u64::from(self.keys.remove(key).is_some());
                self.revision += deleted;
                Output::Delete {
                    deleted,
                    revision: self.revision,
                }
            }
            Input::CompareAndSwap {
                key,
                expected,
                new_value,
            } => {
                let current = self.keys.get(key).map(|(value, _)| value);
                let succeeded = current == expected.as_ref();
                if succeeded {
                    self.attached.remove(key);
                    self.revision += 1;
                    self.keys
                        .insert(key.clone(), (new_value.clone(), self.revision));
                }
                Output::CompareAndSwap {
                    succeeded,
                    revision: self.revision,
                }
            }
        }
    }
}

/// Generates a history of up to `operation_count_max` operations; values are unique unless a
/// `value_pool` size is given, in which case they repeat. With `leases`, about a third of the
/// requests are about leases.
fn generate(
    random: &mut StdRng,
    operation_count_max: usize,
    value_pool: Option<u64>,
    leases: bool,
) -> Vec<Operation> {
    let operation_count = random.gen_range(operation_count_max / 4..=operation_count_max);
    let mut store = Store::new();
    // Every state the store went through, for serializable reads to observe.
    let mut past_states = vec![store.clone()];
    let mut history = Vec::with_capacity(operation_count);
    let mut granted: Vec<i64> = Vec::new();
    for number in 0..operation_count as u64 {
        let point = 100 + 10 * number;
        let call_time = point - random.gen_range(0..=35);
        let return_time = point + random.gen_range(0..=35);
        let key = Bytes::from(KEYS[random.gen_range(0..KEYS.len())]);
        let value = match value_pool {
            Some(pool) => Bytes::from(format!("v{}", random.gen_range(0..pool))),
            None => Bytes::from(format!("v{number}")),
        };
        // A lease granted so far (its grant may not have taken effect), or one never granted.
        let lease_id = match random.gen_range(0..=granted.len()) {
            chosen if chosen < granted.len() => granted[chosen],
            _ => NEVER_GRANTED_LEASE_ID,
        };
        let lease_roll = if leases { random.gen_range(0..15) } else { 0 };
        let input = match random.gen_range(0..10) {
            _ if lease_roll >= 10 => match lease_roll {
                10 => {
                    // etcd's lease id 0 means "no lease".
                    granted.push(number as i64 + 1);
                    Input::LeaseGrant {
                        lease_id: number as i64 + 1,
                        ttl_seconds: 5,
                    }
                }
                11 | 12 => Input::PutWithLease {
                    key,
                    value,
                    lease_id,
                },
                13 => Input::LeaseKeepAlive { lease_id },
                _ if random.gen_bool(0.5) => Input::LeaseRevoke { lease_id },
                _ => Input::LeaseExpire { lease_id },
            },
            0..=2 => Input::Put { key, value },
            3..=5 => Input::Get {
                key,
                serializable: random.gen_bool(0.2),
            },
            6 => Input::Delete { key },
            _ => {
                let expected = if random.gen_bool(0.7) {
                    store.keys.get(&key).map(|(value, _)| value.clone())
                } else {
                    Some(Bytes::from("never"))
                };
                Input::CompareAndSwap {
                    key,
                    expected,
                    new_value: value,
                }
            }
        };
        // An expiry has no answer: the checker inserts it with an unknown outcome.
        let unknown = random.gen_bool(0.08) || matches!(input, Input::LeaseExpire { .. });
        let took_effect = !unknown || random.gen_bool(0.5);
        let output = if input.is_serializable_read() {
            let past = &past_states[random.gen_range(0..past_states.len())];
            past.read(input.key().expect("a read names a key"))
        } else if took_effect {
            store.apply(&input)
        } else {
            Output::Unknown
        };
        past_states.push(store.clone());
        let (return_time, output) = if unknown {
            (None, Output::Unknown)
        } else {
            (Some(return_time), output)
        };
        history.push(Operation {
            client_id: number % 5,
            call_time,
            return_time,
            input,
            output,
        });
    }
    history
}

/// The corruptions applied, each guaranteed to make the history illegal for both models.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Corruption {
    /// A linearizable read returns a value no request wrote.
    MadeUpValue,
    /// A read returns the value of a write that an answered put of the same key overwrote
    /// before the read was called.
    StaleRead,
    /// A read returns the right value with a mod_revision its write did not create.
    WrongModRevision,
}

fn is_answered_read(operation: &Operation) -> bool {
    matches!(
        operation.input,
        Input::Get {
            serializable: false,
            ..
        }
    ) && operation.return_time.is_some()
}

fn precedes(earlier: &Operation, later: &Operation) -> bool {
    earlier
        .return_time
        .is_some_and(|return_time| return_time < later.call_time)
}

fn written_value(operation: &Operation) -> Option<(&Bytes, &Bytes)> {
    match (&operation.input, &operation.output) {
        (Input::Put { key, value }, Output::Put { .. })
        | (Input::PutWithLease { key, value, .. }, Output::Put { .. }) => Some((key, value)),
        (
            Input::CompareAndSwap { key, new_value, .. },
            Output::CompareAndSwap {
                succeeded: true, ..
            },
        ) => Some((key, new_value)),
        _ => None,
    }
}

/// Applies one corruption chosen at random among those possible, or none if the history has
/// no answered linearizable read.
fn corrupt(history: &mut [Operation], random: &mut StdRng) -> Option<Corruption> {
    let reads: Vec<usize> = (0..history.len())
        .filter(|index| is_answered_read(&history[*index]))
        .collect();
    if reads.is_empty() {
        return None;
    }
    let read = reads[random.gen_range(0..reads.len())];
    let key = history[read]
        .input
        .key()
        .expect("a read names a key")
        .clone();

    // A stale read needs an answered write of the key overwritten, before the read was called,
    // by an answered put that returned after the write returned.
    let mut stale_candidates = Vec::new();
    for (old_index, old) in history.iter().enumerate() {
        let Some((old_key, old_value)) = written_value(old) else {
            continue;
        };
        if *old_key != key {
            continue;
        }
        let overwritten = history.iter().any(|new| {
            let is_answered_put = matches!(
                (&new.input, &new.output),
                (Input::Put { key: new_key, .. }, Output::Put { .. }) if *new_key == key
            );
            is_answered_put && precedes(old, new) && precedes(new, &history[read])
        });
        if overwritten {
            stale_candidates.push((old_index, old_value.clone()));
        }
    }
    let read_written = match &history[read].output {
        Output::Get {
            value: Some(_),
            mod_revision,
            ..
        } => Some(*mod_revision),
        _ => None,
    };

    let mut possible = vec![Corruption::MadeUpValue];
    // The mod_revision is pinned only if the value's (unique) write was answered.
    let read_value_written_by_answered = match &history[read].output {
        Output::Get {
            value: Some(value), ..
        } => history
            .iter()
            .any(|operation| written_value(operation).is_some_and(|(_, written)| written == value)),
        _ => false,
    };
    if read_written.is_some() && read_value_written_by_answered {
        possible.push(Corruption::WrongModRevision);
    }
    // Stale reads are the realistic bug but need a particular shape, so take them when possible.
    let corruption = if stale_candidates.is_empty() {
        possible[random.gen_range(0..possible.len())]
    } else {
        Corruption::StaleRead
    };
    let Output::Get {
        value,
        mod_revision,
        revision,
    } = &mut history[read].output
    else {
        unreachable!("an answered read has a get output");
    };
    match corruption {
        Corruption::MadeUpValue => *value = Some(Bytes::from("made up")),
        Corruption::StaleRead => {
            let (old_index, old_value) =
                stale_candidates[random.gen_range(0..stale_candidates.len())].clone();
            *value = Some(old_value);
            // Keep the read self-consistent so that only its staleness is wrong.
            if let Output::Put { revision: written }
            | Output::CompareAndSwap {
                revision: written, ..
            } = history[old_index].output
            {
                let Output::Get { mod_revision, .. } = &mut history[read].output else {
                    unreachable!();
                };
                *mod_revision = written;
            }
            return Some(corruption);
        }
        Corruption::WrongModRevision => {
            *mod_revision += 1;
            *revision = (*revision).max(*mod_revision);
        }
    }
    Some(corruption)
}

fn verdicts(history: &[Operation]) -> (CheckResult, CheckResult) {
    let options = CheckOptions::with_timeout(TIMEOUT);
    (
        check_model(&KeyValueModel::per_key(), history, &options).unwrap(),
        check_model(&KeyValueModel::global(), history, &options).unwrap(),
    )
}

#[test]
fn histories_of_a_sequential_store_are_linearizable_and_corruptions_are_caught() {
    let mut random = StdRng::seed_from_u64(SEED);
    let mut corruptions: BTreeMap<Corruption, usize> = BTreeMap::new();
    let mut unknown_outcomes = 0;
    let mut lease_operations = 0;
    for number in 0..HISTORY_COUNT {
        let mut history = generate(&mut random, 32, None, number % 2 == 1);
        unknown_outcomes += history
            .iter()
            .filter(|operation| operation.return_time.is_none())
            .count();
        lease_operations += history
            .iter()
            .filter(|operation| operation.input.lease_id().is_some())
            .count();
        let (per_key, global) = verdicts(&history);
        let json = keel_check::History {
            operations: history.clone(),
        }
        .to_json();
        assert_eq!(per_key, CheckResult::Ok, "history {number}: {json}");
        assert_eq!(global, CheckResult::Ok, "history {number}: {json}");
        assert_eq!(check_revisions(&history), Ok(()), "history {number}");
        assert_eq!(
            check_serializable_reads(&history),
            Ok(()),
            "history {number}"
        );

        let Some(corruption) = corrupt(&mut history, &mut random) else {
            continue;
        };
        *corruptions.entry(corruption).or_default() += 1;
        let (per_key, global) = verdicts(&history);
        let json = keel_check::History {
            operations: history.clone(),
        }
        .to_json();
        assert!(
            per_key.is_illegal(),
            "history {number}, {corruption:?}: per-key {per_key}\n{json}"
        );
        assert!(
            global.is_illegal(),
            "history {number}, {corruption:?}: global {global}\n{json}"
        );
    }
    // The generator must exercise what the test claims to cover.
    assert!(unknown_outcomes > 50, "{unknown_outcomes} unknown outcomes");
    assert!(
        lease_operations > 500,
        "{lease_operations} lease operations"
    );
    for corruption in [
        Corruption::MadeUpValue,
        Corruption::StaleRead,
        Corruption::WrongModRevision,
    ] {
        assert!(
            corruptions.get(&corruption).copied().unwrap_or(0) >= 10,
            "{corruptions:?}"
        );
    }
}

#[test]
fn big_history_is_checked_quickly_per_key() {
    let mut random = StdRng::seed_from_u64(SEED + 1);
    let mut history = Vec::new();
    // Concatenate generated histories on distinct keys and disjoint times, like a long run.
    for segment in 0..100u64 {
        for mut operation in generate(&mut random, 32, None, false) {
            let offset = segment * 1_000;
            operation.call_time += offset;
            operation.return_time = operation.return_time.map(|time| time + offset);
            let key = format!(
                "{}/{segment}",
                operation
                    .input
                    .key()
                    .expect("generated requests name a key")
            );
            match &mut operation.input {
                Input::Put { key: slot, .. }
                | Input::Get { key: slot, .. }
                | Input::Delete { key: slot }
                | Input::CompareAndSwap { key: slot, .. } => *slot = Bytes::from(key),
                _ => unreachable!("generated without leases"),
            }
            history.push(operation);
        }
    }
    assert!(history.len() > 1_000);
    let options = CheckOptions::with_timeout(TIMEOUT);
    assert_eq!(
        check_model(&KeyValueModel::per_key(), &history, &options).unwrap(),
        CheckResult::Ok
    );
}

/// Decides linearizability by trying every order (and every choice of which unknown-outcome
/// operations took effect): exponential, but obviously right, for cross-checking the search.
fn brute_force<M: Model<Input = Input, Output = Output>>(
    model: &M,
    history: &[Operation],
    state: &M::State,
    placed: &mut Vec<bool>,
) -> bool {
    let remaining_known =
        (0..history.len()).any(|index| !placed[index] && history[index].return_time.is_some());
    if !remaining_known {
        return true;
    }
    for candidate in 0..history.len() {
        if placed[candidate] {
            continue;
        }
        // A candidate may go next unless a remaining operation returned before it was called.
        let blocked = (0..history.len()).any(|other| {
            !placed[other] && other != candidate && precedes(&history[other], &history[candidate])
        });
        if blocked {
            continue;
        }
        let operation = &history[candidate];
        let Some(next_state) = model.step(state, &operation.input, &operation.output) else {
            continue;
        };
        placed[candidate] = true;
        let found = brute_force(model, history, &next_state, placed);
        placed[candidate] = false;
        if found {
            return true;
        }
    }
    false
}

/// Changes one field of one answered output at random; the result may or may not be
/// linearizable.
fn mutate(history: &mut [Operation], random: &mut StdRng) {
    let answered: Vec<usize> = (0..history.len())
        .filter(|index| history[*index].return_time.is_some())
        .collect();
    if answered.is_empty() {
        return;
    }
    let index = answered[random.gen_range(0..answered.len())];
    let nudge = |number: &mut u64, random: &mut StdRng| {
        *number = number.saturating_add_signed(random.gen_range(-2..=2));
    };
    match &mut history[index].output {
        Output::Put { revision } => nudge(revision, random),
        Output::Get {
            value,
            mod_revision,
            revision,
        } => match random.gen_range(0..3) {
            0 => {
                *value = value
                    .is_none()
                    .then(|| Bytes::from(format!("v{}", random.gen_range(0..8))))
            }
            1 => nudge(mod_revision, random),
            _ => nudge(revision, random),
        },
        Output::Delete { deleted, revision } => {
            if random.gen_bool(0.5) {
                *deleted = 1 - (*deleted).min(1);
            } else {
                nudge(revision, random);
            }
        }
        Output::CompareAndSwap {
            succeeded,
            revision,
        } => {
            if random.gen_bool(0.5) {
                *succeeded = !*succeeded;
            } else {
                nudge(revision, random);
            }
        }
        Output::LeaseGrant { revision } | Output::LeaseRevoke { revision } => {
            nudge(revision, random)
        }
        Output::LeaseKeepAlive { ttl_seconds } => *ttl_seconds = 5 - (*ttl_seconds).min(5),
        Output::LeaseNotFound => {
            history[index].output = match history[index].input {
                Input::LeaseRevoke { .. } => Output::LeaseRevoke { revision: 2 },
                _ => Output::Put { revision: 2 },
            }
        }
        Output::Unknown => {}
    }
}

#[test]
fn search_agrees_with_brute_force_on_small_mutated_histories() {
    let mut random = StdRng::seed_from_u64(SEED + 2);
    let options = CheckOptions::with_timeout(TIMEOUT);
    let mut illegal_count = 0;
    for number in 0..300 {
        let value_pool = random.gen_bool(0.5).then_some(3);
        let leases = random.gen_bool(0.5);
        let mut history: Vec<Operation> = generate(&mut random, 7, value_pool, leases)
            .into_iter()
            .filter(|operation| !operation.input.is_serializable_read())
            .collect();
        if random.gen_bool(0.7) {
            mutate(&mut history, &mut random);
        }
        for model in [KeyValueModel::per_key(), KeyValueModel::global()] {
            let verdict = check_model(&model, &history, &options).unwrap();
            // The per-key model searches each key alone, so brute force must too.
            let expected = model.partition(&history).iter().all(|part| {
                let part: Vec<Operation> =
                    part.iter().map(|index| history[*index].clone()).collect();
                brute_force(&model, &part, &model.init(), &mut vec![false; part.len()])
            });
            assert_eq!(
                verdict.is_ok(),
                expected,
                "history {number}, {model:?}: {verdict}\n{}",
                keel_check::History {
                    operations: history.clone()
                }
                .to_json()
            );
            illegal_count += usize::from(!expected);
        }
    }
    assert!(illegal_count > 100, "{illegal_count} illegal verdicts");
}

/// Measures how the two models scale; run with `RUN_SLOW_TESTS=1` (and `--release`, and
/// `--nocapture` to see the timings).
#[test]
fn models_scale_to_big_histories() {
    if std::env::var_os("RUN_SLOW_TESTS").is_none() {
        return;
    }
    let mut random = StdRng::seed_from_u64(SEED + 3);
    for (operation_count, model) in [
        (100_000, KeyValueModel::per_key()),
        (200, KeyValueModel::global()),
        (1_000, KeyValueModel::global()),
    ] {
        let history = long_history(&mut random, operation_count, 50);
        let started = std::time::Instant::now();
        let verdict = check_model(&model, &history, &CheckOptions::with_timeout(TIMEOUT)).unwrap();
        eprintln!(
            "{operation_count} operations, {model:?}: {verdict} in {:?}",
            started.elapsed()
        );
        assert_eq!(verdict, CheckResult::Ok);

        // An illegal history makes the search exhaust every order before the bad read.
        let mut corrupted = history;
        let read = (0..corrupted.len())
            .rev()
            .find(|index| is_answered_read(&corrupted[*index]))
            .expect("long histories have reads");
        if let Output::Get { value, .. } = &mut corrupted[read].output {
            *value = Some(Bytes::from("made up"));
        }
        let started = std::time::Instant::now();
        let verdict =
            check_model(&model, &corrupted, &CheckOptions::with_timeout(TIMEOUT)).unwrap();
        eprintln!(
            "{operation_count} operations, made-up read #{read}, {model:?}: illegal {} in {:?}",
            verdict.is_illegal(),
            started.elapsed()
        );
        assert!(verdict.is_illegal());
    }
}

/// A long history of a sequential store over `key_count` keys, with the same overlap as
/// [`generate`].
fn long_history(random: &mut StdRng, operation_count: usize, key_count: usize) -> Vec<Operation> {
    let mut store = Store::new();
    (0..operation_count as u64)
        .map(|number| {
            let point = 100 + 10 * number;
            let key = Bytes::from(format!("key{}", random.gen_range(0..key_count)));
            let input = match random.gen_range(0..4) {
                0 | 1 => Input::Put {
                    key,
                    value: Bytes::from(format!("v{number}")),
                },
                2 => Input::Get {
                    key,
                    serializable: false,
                },
                _ => Input::Delete { key },
            };
            let unknown = random.gen_bool(0.02);
            let output = store.apply(&input);
            Operation {
                client_id: number % 8,
                call_time: point - random.gen_range(0..=35),
                return_time: (!unknown).then(|| point + random.gen_range(0..=35)),
                input,
                output: if unknown { Output::Unknown } else { output },
            }
        })
        .collect()
}
