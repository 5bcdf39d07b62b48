//! A seeded random workload checked against a naive model that keeps a full copy of the
//! store at every revision: every historical read, every write's response, compaction
//! and the snapshot round trip must agree with it.

use std::collections::BTreeMap;

use keel_types::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_types::etcdserverpb::response_op;
use keel_types::keelpb::StateMachineSnapshot;

use super::*;
use crate::mvcc::KeySpaceError;

const KEYS: [&str; 6] = ["a", "b", "ba", "c", "d", "e"];

/// A small deterministic generator (xorshift64*), so the workload needs no dependency.
struct Generator(u64);

impl Generator {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(bound).unwrap()).unwrap()
    }

    fn key(&mut self) -> &'static str {
        KEYS[self.below(KEYS.len())]
    }
}

type State = BTreeMap<Vec<u8>, KeyValue>;

/// The store at every revision: `states[r]` is the store after revision `r`.
struct Model {
    states: Vec<State>,
    compact_revision: i64,
}

/// The keys of `state` in a request's range, with etcd's conventions.
fn in_range<'a>(state: &'a State, key: &str, range_end: &str) -> Vec<&'a KeyValue> {
    state
        .values()
        .filter(|kv| {
            let k = kv.key.as_slice();
            match range_end.as_bytes() {
                [] => k == key.as_bytes(),
                [0] => k >= key.as_bytes(),
                end => k >= key.as_bytes() && k < end,
            }
        })
        .collect()
}

impl Model {
    fn new() -> Self {
        Model {
            states: vec![State::new(), State::new()],
            compact_revision: -1,
        }
    }

    fn current_revision(&self) -> i64 {
        i64::try_from(self.states.len()).unwrap() - 1
    }

    fn current(&self) -> &State {
        self.states.last().unwrap()
    }

    fn put(
        working: &mut State,
        revision: i64,
        key: &str,
        value: &str,
        lease: i64,
    ) -> Option<KeyValue> {
        let previous = working.get(key.as_bytes()).cloned();
        let kv = KeyValue {
            key: key.as_bytes().to_vec(),
            create_revision: previous.as_ref().map_or(revision, |p| p.create_revision),
            mod_revision: revision,
            version: previous.as_ref().map_or(1, |p| p.version + 1),
            value: value.as_bytes().to_vec(),
            lease,
        };
        working.insert(kv.key.clone(), kv);
        previous
    }

    fn delete(working: &mut State, key: &str, range_end: &str) -> Vec<KeyValue> {
        let deleted: Vec<KeyValue> = in_range(working, key, range_end)
            .into_iter()
            .cloned()
            .collect();
        for kv in &deleted {
            working.remove(&kv.key);
        }
        deleted
    }

    fn commit(&mut self, working: State, changed: bool) {
        if changed {
            self.states.push(working);
        }
    }
}

/// Checks every revision's full contents, and a few ranges at the current revision.
fn check_reads(key_space: &KeySpace, model: &Model) {
    key_space.check_invariants();
    assert_eq!(key_space.current_revision(), model.current_revision());
    assert_eq!(key_space.compact_revision(), model.compact_revision);
    assert_eq!(key_space.key_count(), model.current().len());
    for revision in 1..=model.current_revision() {
        let result = all_at(key_space, revision);
        if revision < model.compact_revision {
            assert_eq!(result, Err(KeySpaceError::Compacted));
        } else {
            let expected: Vec<KeyValue> = model.states[usize::try_from(revision).unwrap()]
                .values()
                .cloned()
                .collect();
            assert_eq!(result, Ok(expected), "at revision {revision}");
        }
    }
    for (key, range_end) in [("b", "c"), ("b", "\0"), ("c", ""), ("ba", "bb"), ("e", "a")] {
        let response = range(key_space, &range_request(key, range_end));
        let expected: Vec<KeyValue> = in_range(model.current(), key, range_end)
            .into_iter()
            .cloned()
            .collect();
        assert_eq!(response.count, i64::try_from(expected.len()).unwrap());
        assert_eq!(response.kvs, expected, "range {key:?}..{range_end:?}");
    }
}

fn run_workload(seed: u64, steps: usize) {
    let mut generator = Generator(seed);
    let mut key_space = KeySpace::new();
    let mut model = Model::new();
    for step in 0..steps {
        let revision = model.current_revision() + 1;
        let mut working = model.current().clone();
        match generator.below(10) {
            0..=3 => {
                let key = generator.key();
                let value = format!("v{step}");
                let lease = i64::try_from(generator.below(3)).unwrap();
                let request = PutRequest {
                    lease,
                    prev_kv: true,
                    ..put_request(key, &value)
                };
                let response = key_space.put(&request).unwrap();
                let previous = Model::put(&mut working, revision, key, &value, lease);
                assert_eq!(response.prev_kv, previous);
                assert_eq!(revision_of(&response.header), revision);
                model.commit(working, true);
            }
            4 => {
                // ignore_value on a key that may be missing.
                let key = generator.key();
                let request = PutRequest {
                    ignore_value: true,
                    ..put_request(key, "")
                };
                let result = key_space.put(&request);
                match working.get(key.as_bytes()).cloned() {
                    Some(previous) => {
                        assert!(result.is_ok());
                        let value = String::from_utf8(previous.value).unwrap();
                        Model::put(&mut working, revision, key, &value, 0);
                        model.commit(working, true);
                    }
                    None => assert_eq!(result, Err(KeySpaceError::KeyNotFound)),
                }
            }
            5 | 6 => {
                let key = generator.key();
                let range_end = ["", "", "\0", "c", "e"][generator.below(5)];
                let request = DeleteRangeRequest {
                    prev_kv: true,
                    ..delete_request(key, range_end)
                };
                let response = key_space.delete_range(&request).unwrap();
                let deleted = Model::delete(&mut working, key, range_end);
                assert_eq!(response.prev_kvs, deleted);
                assert_eq!(response.deleted, i64::try_from(deleted.len()).unwrap());
                let changed = !deleted.is_empty();
                model.commit(working, changed);
            }
            7 | 8 => {
                // A txn on distinct keys: compare, then puts, a delete and reads.
                let compared = generator.key();
                let threshold = i64::try_from(generator.below(3)).unwrap();
                let mut keys: Vec<&str> = KEYS.to_vec();
                let first = keys.remove(generator.below(keys.len()));
                let second = keys.remove(generator.below(keys.len()));
                let third = keys.remove(generator.below(keys.len()));
                let request = TxnRequest {
                    compare: vec![compare(
                        compared,
                        CompareTarget::Version,
                        CompareResult::Greater,
                        TargetUnion::Version(threshold),
                    )],
                    success: vec![
                        put_op(first, "t1"),
                        delete_op(second, ""),
                        range_op("\0", "\0"),
                        put_op(third, "t3"),
                    ],
                    failure: vec![range_op(first, ""), delete_op(third, "")],
                };
                let response = key_space.txn(&request).unwrap();
                let holds = model
                    .current()
                    .get(compared.as_bytes())
                    .map_or(0, |kv| kv.version)
                    > threshold;
                assert_eq!(response.succeeded, holds);
                let mut changed = false;
                if holds {
                    Model::put(&mut working, revision, first, "t1", 0);
                    Model::delete(&mut working, second, "");
                    let expected: Vec<KeyValue> = working.values().cloned().collect();
                    let Some(response_op::Response::ResponseRange(read)) =
                        &response.responses[2].response
                    else {
                        panic!("a range response");
                    };
                    assert_eq!(read.kvs, expected, "reads see the txn's writes");
                    Model::put(&mut working, revision, third, "t3", 0);
                    changed = true;
                } else {
                    changed |= !Model::delete(&mut working, third, "").is_empty();
                }
                let expected_revision = if changed { revision } else { revision - 1 };
                assert_eq!(revision_of(&response.header), expected_revision);
                model.commit(working, changed);
            }
            _ => {
                let current = model.current_revision();
                let lowest = model.compact_revision + 1;
                if lowest <= current {
                    let span = usize::try_from(current - lowest + 1).unwrap();
                    let target = lowest + i64::try_from(generator.below(span)).unwrap();
                    key_space.compact(&compaction_request(target)).unwrap();
                    model.compact_revision = target;
                }
            }
        }
        check_reads(&key_space, &model);
    }

    // The hash is equal on a key space rebuilt from a snapshot, at every revision
    // that can be hashed, and the rebuilt key space is equal.
    let mut snapshot = StateMachineSnapshot::default();
    key_space.write_snapshot(&mut snapshot);
    let restored = KeySpace::from_snapshot(&snapshot).unwrap();
    assert_eq!(restored, key_space);
    for revision in model.compact_revision.max(1)..=model.current_revision() {
        assert_eq!(restored.hash_kv(revision), key_space.hash_kv(revision));
    }
}

#[test]
fn random_workloads_agree_with_the_model() {
    for seed in 1..=8_u64 {
        run_workload(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), 250);
    }
}
