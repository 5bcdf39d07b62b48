//! The MVCC key space's hot paths over 100k keys: puts (new keys and overwrites) and ranges
//! (one key, a prefix of 100 keys), read at the current revision and at an older one.
//!
//! These are what every member does for every applied write and every read it serves, with
//! no Raft, encoding or network around them, so they bound how fast the state machine can
//! go. Keys look like `key/00012345`; values are 128 bytes.
//!
//! Puts change the key space they measure, so between samples (not measured) the keys a
//! sample added are deleted and history is compacted, which brings it back to 100k keys
//! with one version each.
//!
//! Run with `cargo bench -p keel-core --bench mvcc`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use keel_core::mvcc::KeySpace;
use keel_types::etcdserverpb::{CompactionRequest, PutRequest, RangeRequest};

/// Keys in the key space before a benchmark runs.
const KEY_COUNT: u64 = 100_000;

/// Bytes in every value.
const VALUE_BYTES: usize = 128;

/// Keys under one range prefix: `key/000123` covers `key/00012300` to `key/00012399`.
const PREFIX_KEY_COUNT: u64 = 100;

/// Consecutive benchmark iterations pick keys this far apart (modulo [`KEY_COUNT`]), so
/// they are spread over the key space rather than walking it in order, which would flatter
/// the caches. Coprime with `KEY_COUNT`, so every key is visited.
const KEY_STRIDE: u64 = 7_919;

/// Pre-built range requests to cycle through, so that building one is not measured.
const RANGE_REQUEST_COUNT: u64 = 1_000;

fn key(index: u64) -> Vec<u8> {
    format!("key/{index:08}").into_bytes()
}

fn put_request(key: Vec<u8>) -> PutRequest {
    PutRequest {
        key,
        value: vec![b'v'; VALUE_BYTES],
        ..PutRequest::default()
    }
}

/// A key space holding `key(0)..key(KEY_COUNT)`, each written `generations` times: the
/// first generation at revisions 2 to `KEY_COUNT + 1`, the next after it, and so on.
fn key_space_of(generations: u64) -> KeySpace {
    let mut key_space = KeySpace::new();
    for _ in 0..generations {
        for index in 0..KEY_COUNT {
            key_space
                .put(&put_request(key(index)))
                .expect("filling the key space");
        }
    }
    assert_eq!(key_space.key_count() as u64, KEY_COUNT);
    key_space
}

/// The key space the put benchmarks write to.
struct PutTarget {
    key_space: KeySpace,
    keys: KeyPicker,
}

/// Chooses the keys of the puts, and remembers those it created. Apart from the key space
/// so that the setup and the measured routine can each borrow their own part.
struct KeyPicker {
    /// Puts made so far; picks the next key.
    put_count: u64,
    /// Keys created since the last reset, to delete at the next.
    new_keys: Vec<Vec<u8>>,
}

impl KeyPicker {
    /// A key that does not exist yet, placed right after an existing one, so that new keys
    /// land all over the key space as they would in practice.
    fn next_new_key(&mut self) -> PutRequest {
        let mut new_key = key(self.put_count * KEY_STRIDE % KEY_COUNT);
        new_key.extend_from_slice(format!("/{}", self.put_count).as_bytes());
        self.put_count += 1;
        self.new_keys.push(new_key.clone());
        put_request(new_key)
    }

    /// One of the keys the key space started with.
    fn next_existing_key(&mut self) -> PutRequest {
        let request = put_request(key(self.put_count * KEY_STRIDE % KEY_COUNT));
        self.put_count += 1;
        request
    }
}

impl PutTarget {
    fn new() -> PutTarget {
        PutTarget {
            key_space: key_space_of(1),
            keys: KeyPicker {
                put_count: 0,
                new_keys: Vec::new(),
            },
        }
    }

    /// Brings the key space back to `KEY_COUNT` keys with one version each: deletes the keys
    /// the last sample created and compacts away the versions it added.
    fn reset(&mut self) {
        self.key_space.delete_keys(&self.keys.new_keys);
        self.keys.new_keys.clear();
        // Compaction keeps a tombstone at the compact revision itself; one more write moves
        // the revision past the tombstones, so that compacting drops them.
        self.key_space
            .put(&put_request(key(0)))
            .expect("moving the revision on");
        let revision = self.key_space.current_revision();
        self.key_space
            .compact(&CompactionRequest {
                revision,
                physical: true,
            })
            .expect("compacting");
        assert_eq!(self.key_space.key_count() as u64, KEY_COUNT);
        assert_eq!(self.key_space.version_count() as u64, KEY_COUNT);
    }
}

/// Measures `KeySpace::put` alone: the request is built in setup and the key space is
/// reset before each sample (criterion calls this once per sample).
fn bench_put(
    bencher: &mut criterion::Bencher<'_>,
    target: &mut PutTarget,
    next_request: fn(&mut KeyPicker) -> PutRequest,
) {
    target.reset();
    let PutTarget { key_space, keys } = target;
    bencher.iter_batched_ref(
        || next_request(keys),
        |request| key_space.put(request).expect("put"),
        BatchSize::SmallInput,
    );
}

fn mvcc_put(criterion: &mut Criterion) {
    let mut target = PutTarget::new();
    let mut group = criterion.benchmark_group("mvcc_put");
    group.throughput(Throughput::Elements(1));
    group.bench_function("new_key", |bencher| {
        bench_put(bencher, &mut target, KeyPicker::next_new_key)
    });
    group.bench_function("overwrite", |bencher| {
        bench_put(bencher, &mut target, KeyPicker::next_existing_key)
    });
    group.finish();
}

/// A range request for the keys under `prefix`, etcd's way: `range_end` is the prefix with
/// its last byte incremented.
fn prefix_request(prefix: Vec<u8>) -> RangeRequest {
    let mut range_end = prefix.clone();
    *range_end.last_mut().expect("a prefix is not empty") += 1;
    RangeRequest {
        key: prefix,
        range_end,
        ..RangeRequest::default()
    }
}

fn mvcc_range(criterion: &mut Criterion) {
    // Two versions of every key: the second generation is current, the first is what a
    // read at `historical_revision` sees.
    let key_space = key_space_of(2);
    let historical_revision = KEY_COUNT as i64 + 1;
    let single_key_requests = (0..RANGE_REQUEST_COUNT)
        .map(|number| RangeRequest {
            key: key(number * KEY_STRIDE % KEY_COUNT),
            ..RangeRequest::default()
        })
        .collect::<Vec<_>>();
    let prefix_requests = (0..RANGE_REQUEST_COUNT)
        .map(|number| {
            let first_key_index =
                number * KEY_STRIDE % KEY_COUNT / PREFIX_KEY_COUNT * PREFIX_KEY_COUNT;
            let mut prefix = key(first_key_index);
            // `key/00012300` less its last two digits names the hundred keys after it.
            prefix.truncate(prefix.len() - 2);
            prefix_request(prefix)
        })
        .collect::<Vec<_>>();

    let mut group = criterion.benchmark_group("mvcc_range");
    let cases = [
        ("single_key", &single_key_requests, 1),
        ("prefix_100_keys", &prefix_requests, PREFIX_KEY_COUNT),
    ];
    for (name, requests, keys_per_request) in cases {
        for (revision_name, revision) in [("current", 0), ("historical", historical_revision)] {
            let requests = requests
                .iter()
                .map(|request| RangeRequest {
                    revision,
                    ..request.clone()
                })
                .collect::<Vec<_>>();
            let expected_version = if revision == 0 { 2 } else { 1 };
            let response = key_space.range(&requests[0]).expect("range");
            assert_eq!(response.kvs.len() as u64, keys_per_request);
            assert!(response.kvs.iter().all(|kv| kv.version == expected_version));

            group.throughput(Throughput::Elements(keys_per_request));
            let mut request_number = 0;
            group.bench_function(
                BenchmarkId::new(name, format!("{revision_name}_revision")),
                |bencher| {
                    bencher.iter(|| {
                        request_number = (request_number + 1) % requests.len();
                        key_space.range(&requests[request_number]).expect("range")
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Each operation takes microseconds: twenty samples in two seconds are plenty, and
    // keep the run short on a shared machine.
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = mvcc_put, mvcc_range
}
criterion_main!(benches);
