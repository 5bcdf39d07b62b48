//! Write-ahead log appends with group commit, on a real file system with the real fsync.
//!
//! One iteration is one [`Wal::append`] of a batch of entries and a hard state: one write
//! call and one fsync however many entries the batch holds, which is how the member loop
//! persists a Ready. Throughput is counted in entries, so the batches of 1, 10 and 100
//! entries show what group commit buys, for payloads of 256 B (a small put) and 4 KiB.
//!
//! The log lives in a temporary directory under cargo's target directory
//! (`CARGO_TARGET_TMPDIR`) rather than in the system's temporary directory, which may be a
//! tmpfs on which an fsync costs nothing. Numbers depend on the disk under that directory.
//!
//! Run with `cargo bench -p keel-storage --bench wal_append`.

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keel_storage::{FileDisk, HardState, LogEntry, Wal, WalOptions};

/// Entries per append: a lone write, and the batches group commit makes under load.
const BATCH_ENTRIES: [usize; 3] = [1, 10, 100];

/// Payload of each entry: a small put, and a value of one page.
const PAYLOAD_BYTES: [usize; 2] = [256, 4096];

/// The term every benchmark entry carries; one leader wrote them all.
const TERM: u64 = 1;

/// A log being appended to, with the batch reused across appends so that building it is
/// not measured.
struct AppendingLog {
    wal: Wal<FileDisk>,
    batch: Vec<LogEntry>,
}

impl AppendingLog {
    fn open(root: &Path) -> AppendingLog {
        let (wal, recovered) =
            Wal::open(FileDisk::new(root), WalOptions::default()).expect("opening the log");
        assert!(recovered.entries.is_empty(), "the directory is new");
        AppendingLog {
            wal,
            batch: Vec::new(),
        }
    }

    /// Prepares the next `entry_count` entries after the log's end.
    fn prepare_batch(&mut self, entry_count: usize, payload_bytes: usize) {
        if self.batch.len() != entry_count
            || self.batch.first().map(|entry| entry.payload.len()) != Some(payload_bytes)
        {
            // The checksum costs the same whatever the bytes; a varying pattern rather than
            // zeros keeps a compressing file system from making the write cheaper.
            let payload = (0..payload_bytes)
                .map(|offset| offset as u8)
                .collect::<Vec<_>>();
            self.batch = vec![
                LogEntry {
                    index: 0,
                    term: TERM,
                    payload
                };
                entry_count
            ];
        }
        let first_index = self.wal.last_index() + 1;
        for (offset, entry) in self.batch.iter_mut().enumerate() {
            entry.index = first_index + offset as u64;
        }
    }

    /// Appends `iterations` batches and returns the time spent in `Wal::append` alone.
    fn append_batches(
        &mut self,
        iterations: u64,
        entry_count: usize,
        payload_bytes: usize,
    ) -> Duration {
        let mut elapsed = Duration::ZERO;
        for _ in 0..iterations {
            self.prepare_batch(entry_count, payload_bytes);
            let last_index = self.batch.last().expect("a batch has entries").index;
            // The hard state moves with every Ready under load: commit follows the log.
            let hard_state = HardState {
                term: TERM,
                vote: 1,
                commit: last_index,
            };
            let start = Instant::now();
            self.wal
                .append(&self.batch, Some(hard_state))
                .expect("appending to the log");
            elapsed += start.elapsed();
            self.release_closed_segments();
        }
        elapsed
    }

    /// Deletes closed segments, as a member does after a snapshot, so that a long run does
    /// not fill the disk. Not measured: it is compaction, not append.
    fn release_closed_segments(&mut self) {
        if self.wal.segment_count() <= 1 {
            return;
        }
        let last_index = self.wal.last_index();
        self.wal
            .save_snapshot_marker(last_index, TERM)
            .expect("saving a snapshot marker");
        self.wal
            .release_before(last_index)
            .expect("releasing closed segments");
    }
}

fn wal_append(criterion: &mut Criterion) {
    let directory = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("creating a directory under the target directory");
    let mut group = criterion.benchmark_group("wal_append");
    for payload_bytes in PAYLOAD_BYTES {
        for entry_count in BATCH_ENTRIES {
            // A fresh log per case, so one case's segments do not weigh on the next.
            let root = directory
                .path()
                .join(format!("payload_{payload_bytes}_batch_{entry_count}"));
            std::fs::create_dir(&root).expect("creating the log's root");
            let mut log = AppendingLog::open(&root);
            group.throughput(Throughput::Elements(entry_count as u64));
            group.bench_function(
                BenchmarkId::new(
                    format!("payload_{payload_bytes}_bytes"),
                    format!("batch_{entry_count}"),
                ),
                |bencher| {
                    bencher.iter_custom(|iterations| {
                        log.append_batches(iterations, entry_count, payload_bytes)
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // An append costs milliseconds (an fsync): ten samples over a few seconds are enough
    // to see the effect of batching, and keep the whole run short.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = wal_append
}
criterion_main!(benches);
