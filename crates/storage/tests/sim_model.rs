//! Randomised simulation of the write-ahead log against a model: random appends (with
//! overwrites), hard states, snapshot markers, releases, fsync failures and crashes on a
//! `SimDisk`, checking after every restart that replay returns exactly what was acknowledged.
//! Seeds are fixed, so a failure names the seed that reproduces it.

mod common;

use common::*;
use keel_storage::{Crash, HardState, LogEntry, SimDisk, SnapshotMarker, Wal, WalOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What the log has acknowledged: the state replay must return.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Model {
    hard_state: Option<HardState>,
    snapshot_marker: Option<SnapshotMarker>,
    entries: Vec<LogEntry>,
}

impl Model {
    fn marker_index(&self) -> u64 {
        self.snapshot_marker.map_or(0, |marker| marker.index)
    }

    fn last_index(&self) -> u64 {
        self.entries
            .last()
            .map_or(self.marker_index(), |entry| entry.index)
    }

    fn append(&mut self, batch: &[LogEntry]) {
        if let Some(first) = batch.first() {
            self.entries.retain(|entry| entry.index < first.index);
            self.entries.extend_from_slice(batch);
        }
    }

    fn save_marker(&mut self, marker: SnapshotMarker) {
        self.entries.retain(|entry| entry.index > marker.index);
        self.snapshot_marker = Some(marker);
    }
}

const SEEDS: u64 = 150;
const STEPS: usize = 80;

/// How often the interesting paths ran, so the test cannot silently stop exercising them.
#[derive(Debug, Default)]
struct Coverage {
    overwrites: u64,
    failures: u64,
    failures_with_partial_batch: u64,
    segments_removed: u64,
    crashes: u64,
}

#[test]
fn replay_matches_the_model_under_random_faults() {
    let mut coverage = Coverage::default();
    for seed in 0..SEEDS {
        run(seed, &mut coverage);
    }
    assert!(coverage.overwrites > 100, "{coverage:?}");
    assert!(coverage.failures > 100, "{coverage:?}");
    assert!(coverage.failures_with_partial_batch > 0, "{coverage:?}");
    assert!(coverage.segments_removed > 100, "{coverage:?}");
    assert!(coverage.crashes > 100, "{coverage:?}");
}

fn run(seed: u64, coverage: &mut Coverage) {
    let mut random = StdRng::seed_from_u64(seed);
    let options = WalOptions {
        segment_bytes_max: random.gen_range(120..600),
        ..WalOptions::default()
    };
    let disk = SimDisk::new();
    let (mut wal, _) = open(&disk, &options);
    let mut model = Model::default();
    let mut term = 1;

    for step in 0..STEPS {
        let context = format!("seed {seed} step {step}");
        let inject_failure = random.gen_ratio(1, 12);
        if inject_failure {
            disk.fail_fsync_after(random.gen_range(0..3), 1);
        }
        let choice = random.gen_range(0..100);
        let outcome: Result<(), (Vec<Model>, String)> = if choice < 60 {
            // Append, overwriting a random suffix now and then, as a new leader would.
            if random.gen_ratio(1, 5) {
                term += 1;
            }
            let first = if random.gen_ratio(1, 4) && model.last_index() > model.marker_index() {
                coverage.overwrites += 1;
                random.gen_range(model.marker_index() + 1..=model.last_index())
            } else {
                model.last_index() + 1
            };
            let count = random.gen_range(0..6);
            let batch = entries(first..=first + count, term)
                .into_iter()
                .take(count as usize)
                .collect::<Vec<_>>();
            let hard_state = random.gen_ratio(1, 2).then_some(HardState {
                term,
                vote: random.gen_range(0..4),
                commit: model.marker_index(),
            });
            match wal.append(&batch, hard_state) {
                Ok(()) => {
                    model.append(&batch);
                    if hard_state.is_some() {
                        model.hard_state = hard_state;
                    }
                    Ok(())
                }
                Err(error) => {
                    // Entries in a segment closed before the failure may be durable: any
                    // prefix of the batch, and never the hard state, which is written last.
                    let candidates = (0..=batch.len())
                        .map(|kept| {
                            let mut candidate = model.clone();
                            candidate.append(&batch[..kept]);
                            candidate
                        })
                        .collect();
                    Err((candidates, error.to_string()))
                }
            }
        } else if choice < 72 {
            let low = model.marker_index();
            let index = random.gen_range(low..=model.last_index() + 2);
            let marker = SnapshotMarker { index, term };
            match wal.save_snapshot_marker(marker.index, marker.term) {
                Ok(()) => {
                    model.save_marker(marker);
                    Ok(())
                }
                Err(error) => Err((vec![model.clone()], error.to_string())),
            }
        } else if choice < 82 {
            match model.snapshot_marker {
                Some(marker) => match wal.release_before(marker.index) {
                    Ok(removed) => {
                        coverage.segments_removed += removed as u64;
                        Ok(())
                    }
                    Err(error) => Err((vec![model.clone()], error.to_string())),
                },
                None => Ok(()),
            }
        } else {
            // A crash between operations; torn or not, nothing un-fsynced is pending.
            coverage.crashes += 1;
            drop(wal);
            disk.crash(Crash::Torn { seed: random.gen() });
            let (reopened, recovered) = Wal::open(disk.clone(), options.clone())
                .unwrap_or_else(|error| panic!("{context}: reopen: {error}"));
            check(&model, &recovered, &context);
            wal = reopened;
            Ok(())
        };

        if let Err((candidates, error)) = outcome {
            assert!(wal.is_poisoned(), "{context}: {error}");
            coverage.failures += 1;
            drop(wal);
            disk.crash(Crash::Torn { seed: random.gen() });
            let (reopened, recovered) = Wal::open(disk.clone(), options.clone())
                .unwrap_or_else(|error| panic!("{context}: reopen after failure: {error}"));
            let found = candidates
                .into_iter()
                .find(|candidate| matches(candidate, &recovered))
                .unwrap_or_else(|| {
                    panic!("{context}: after `{error}`, recovered {recovered:?} from {model:?}")
                });
            if found.entries != model.entries {
                coverage.failures_with_partial_batch += 1;
            }
            model = found;
            wal = reopened;
        } else {
            // The failure was not reached (an operation without fsync); clear it.
            disk.fail_next_fsync(0);
        }
        assert_eq!(wal.last_index(), model.last_index(), "{context}");
    }
}

fn matches(model: &Model, recovered: &keel_storage::Recovered) -> bool {
    model.hard_state == recovered.hard_state
        && model.snapshot_marker == recovered.snapshot_marker
        && model.entries == recovered.entries
}

fn check(model: &Model, recovered: &keel_storage::Recovered, context: &str) {
    assert_eq!(recovered.truncated_tail, None, "{context}");
    assert_eq!(recovered.hard_state, model.hard_state, "{context}");
    assert_eq!(
        recovered.snapshot_marker, model.snapshot_marker,
        "{context}"
    );
    assert_eq!(
        positions(&recovered.entries),
        positions(&model.entries),
        "{context}"
    );
    assert_eq!(recovered.entries, model.entries, "{context}");
}
