//! The write-ahead log under the simulated disk's faults: crashes that lose un-fsynced bytes,
//! torn writes, failed fsyncs, and crashes around segment creation and deletion.

mod common;

use std::path::Path;

use common::*;
use keel_storage::{
    Crash, Disk, DiskFile, HardState, LogEntry, SimDisk, StorageError, Wal, WalOptions,
};

/// The bytes that `append(batch)` adds to the last segment after `earlier` batches, found by
/// doing the same on a scratch disk (the log is deterministic).
fn bytes_of_append(options: &WalOptions, earlier: &[Vec<LogEntry>], batch: &[LogEntry]) -> Vec<u8> {
    let scratch = SimDisk::new();
    let (mut wal, _) = open(&scratch, options);
    for entries in earlier {
        wal.append(entries, None).unwrap();
    }
    let before = scratch.read_file(&last_segment(&scratch)).unwrap().len();
    wal.append(batch, None).unwrap();
    let after = scratch.read_file(&last_segment(&scratch)).unwrap();
    after[before..].to_vec()
}

/// A disk holding entries 1..=5, fsynced, plus entries 6..=8 written but not fsynced: the state
/// a crash in the middle of an append finds. Returns the disk and the in-flight bytes.
fn append_in_flight() -> (SimDisk, Vec<u8>) {
    let options = WalOptions::default();
    let disk = SimDisk::new();
    let (mut wal, _) = open(&disk, &options);
    let durable = entries(1..=5, 1);
    wal.append(&durable, None).unwrap();
    drop(wal);
    let in_flight = bytes_of_append(&options, &[durable], &entries(6..=8, 1));
    let mut file = disk.open_append(&last_segment(&disk)).unwrap();
    file.append(&in_flight).unwrap();
    (disk, in_flight)
}

#[test]
fn crash_loses_exactly_the_unsynced_append() {
    let (disk, _) = append_in_flight();
    let (_, before_crash) = open(&disk, &WalOptions::default());
    assert_eq!(
        before_crash.entries.len(),
        8,
        "the page cache shows the append"
    );
    disk.crash(Crash::Clean);
    let (_, recovered) = open(&disk, &WalOptions::default());
    assert_eq!(recovered.entries, entries(1..=5, 1));
    assert_eq!(
        recovered.truncated_tail, None,
        "a clean cut is not a torn tail"
    );
}

#[test]
fn torn_crash_keeps_whole_records_of_the_prefix() {
    let (disk, in_flight) = append_in_flight();
    let offsets = record_offsets(&in_flight);
    let path = last_segment(&disk);
    let durable_bytes = disk.read_file(&path).unwrap().len() - in_flight.len();
    disk.crash(Crash::TornFile {
        path: path.clone(),
        kept_bytes: offsets[2] + 5,
        garbled_bytes: 0,
    });
    let (mut wal, recovered) = open(&disk, &WalOptions::default());
    assert_eq!(positions(&recovered.entries), positions(&entries(1..=7, 1)));
    let torn = recovered.truncated_tail.expect("torn tail");
    assert_eq!(torn.offset, (durable_bytes + offsets[2]) as u64);
    assert_eq!(torn.bytes_removed, 5);
    wal.append(&entries(8..=9, 2), None).unwrap();
    drop(wal);
    disk.crash(Crash::Clean);
    let (_, recovered) = open(&disk, &WalOptions::default());
    assert_eq!(recovered.entries.len(), 9);
    assert_eq!(recovered.truncated_tail, None);
}

#[test]
fn torn_crash_with_garbled_bytes_drops_the_damaged_record() {
    let (disk, in_flight) = append_in_flight();
    let offsets = record_offsets(&in_flight);
    disk.crash(Crash::TornFile {
        path: last_segment(&disk),
        kept_bytes: offsets[2],
        garbled_bytes: 2,
    });
    let (_, recovered) = open(&disk, &WalOptions::default());
    assert_eq!(positions(&recovered.entries), positions(&entries(1..=6, 1)));
    assert!(recovered
        .truncated_tail
        .unwrap()
        .reason
        .contains("checksum"));
}

#[test]
fn torn_crash_across_a_record_boundary_is_a_torn_tail() {
    let (disk, in_flight) = append_in_flight();
    let offsets = record_offsets(&in_flight);
    // Entry 7's last bytes and the first bytes of entry 8's header survive garbled.
    disk.crash(Crash::TornFile {
        path: last_segment(&disk),
        kept_bytes: offsets[2] + 3,
        garbled_bytes: 5,
    });
    let (_, recovered) = open(&disk, &WalOptions::default());
    assert_eq!(positions(&recovered.entries), positions(&entries(1..=6, 1)));
    assert_eq!(
        recovered.truncated_tail.unwrap().bytes_removed as usize,
        offsets[2] - offsets[1] + 3
    );
}

/// Any seeded torn crash during an append leaves a log that opens, holds the fsynced entries
/// and a prefix of the in-flight ones, and keeps working.
#[test]
fn seeded_torn_crashes_always_recover() {
    let options = WalOptions::default();
    for seed in 0..300 {
        let disk = SimDisk::new();
        let (mut wal, _) = open(&disk, &options);
        wal.append(&entries(1..=10, 1), Some(HardState::default()))
            .unwrap();
        drop(wal);
        let in_flight = bytes_of_append(&options, &[entries(1..=10, 1)], &entries(11..=16, 1));
        let mut file = disk.open_append(&last_segment(&disk)).unwrap();
        file.append(&in_flight).unwrap();
        disk.crash(Crash::Torn { seed });

        let (mut wal, recovered) = Wal::open(disk.clone(), options.clone())
            .unwrap_or_else(|error| panic!("seed {seed}: {error}"));
        let count = recovered.entries.len() as u64;
        assert!((10..=16).contains(&count), "seed {seed}: {count} entries");
        assert_eq!(
            positions(&recovered.entries),
            positions(&entries(1..=count, 1))
        );
        wal.append(&entries(count + 1..=count + 1, 2), None)
            .unwrap();
        drop(wal);
        let (_, recovered) = open(&disk, &options);
        assert_eq!(recovered.entries.len() as u64, count + 1, "seed {seed}");
        assert_eq!(recovered.truncated_tail, None, "seed {seed}");
    }
}

#[test]
fn fsync_failure_surfaces_and_poisons() {
    let options = WalOptions::default();
    let disk = SimDisk::new();
    let (mut wal, _) = open(&disk, &options);
    wal.append(&entries(1..=3, 1), None).unwrap();
    disk.fail_next_fsync(1);
    match wal.append(&entries(4..=5, 1), None).unwrap_err() {
        StorageError::FsyncFailed { file, .. } => {
            assert_eq!(file, last_segment(&disk).display().to_string());
        }
        other => panic!("expected FsyncFailed, got {other:?}"),
    }
    assert!(wal.is_poisoned());
    // Every later write is refused, even though the disk would now succeed.
    for result in [
        wal.append(&entries(4..=4, 1), None),
        wal.save_snapshot_marker(3, 1),
        wal.release_before(0).map(|_| ()),
    ] {
        assert!(
            matches!(result, Err(StorageError::Poisoned { .. })),
            "{result:?}"
        );
    }
    drop(wal);
    disk.crash(Crash::Clean);
    let (_, recovered) = open(&disk, &options);
    assert_eq!(recovered.entries, entries(1..=3, 1));
}

/// Appends entries one at a time until the append that starts a new segment, and makes the
/// fsync number `failing_fsync` (0: the old segment's, 1: the directory's, 2: the new
/// segment's) of that append fail. Returns the index of the entry that failed.
fn fail_fsync_while_starting_a_segment(disk: &SimDisk, failing_fsync: u64) -> u64 {
    let options = small_segments(150);
    let (mut wal, _) = open(disk, &options);
    // A scratch log in lockstep tells which append will start a segment.
    let scratch = SimDisk::new();
    let (mut scratch_wal, _) = open(&scratch, &options);
    for index in 1.. {
        let batch = entries(index..=index, 1);
        let segments = scratch_wal.segment_count();
        scratch_wal.append(&batch, None).unwrap();
        if scratch_wal.segment_count() > segments && index > 1 {
            disk.fail_fsync_after(failing_fsync, 1);
            assert!(matches!(
                wal.append(&batch, None),
                Err(StorageError::FsyncFailed { .. })
            ));
            assert!(wal.is_poisoned());
            return index;
        }
        wal.append(&batch, None).unwrap();
    }
    unreachable!()
}

#[test]
fn fsync_failure_while_starting_a_segment_poisons() {
    for failing_fsync in 0..3 {
        let disk = SimDisk::new();
        let failed_index = fail_fsync_while_starting_a_segment(&disk, failing_fsync);
        disk.crash(Crash::Clean);
        let (_, recovered) = open(&disk, &small_segments(150));
        assert_eq!(
            positions(&recovered.entries),
            positions(&entries(1..=failed_index - 1, 1)),
            "failing fsync {failing_fsync}"
        );
    }
}

#[test]
fn one_append_is_one_fsync() {
    let disk = SimDisk::new();
    let (mut wal, _) = open(&disk, &WalOptions::default());
    let disk_before = disk.stats();
    let wal_before = wal.stats();
    let batch = entries(1..=100, 1);
    wal.append(
        &batch,
        Some(HardState {
            term: 1,
            vote: 1,
            commit: 0,
        }),
    )
    .unwrap();
    let disk_after = disk.stats();
    assert_eq!(disk_after.file_syncs - disk_before.file_syncs, 1);
    assert_eq!(disk_after.directory_syncs, disk_before.directory_syncs);
    assert_eq!(wal.stats().fsyncs - wal_before.fsyncs, 1);
    let bytes_written = disk_after.bytes_written - disk_before.bytes_written;
    assert_eq!(
        wal.stats().bytes_written - wal_before.bytes_written,
        bytes_written
    );
    assert_eq!(
        bytes_written as usize,
        disk.read_file(&last_segment(&disk)).unwrap().len()
    );
}

/// New segments and their directory entries are durable when `append` returns, and released
/// segments stay released.
#[test]
fn crash_after_rollover_and_release_keeps_everything_acknowledged() {
    let options = small_segments(200);
    let disk = SimDisk::new();
    let (mut wal, _) = open(&disk, &options);
    for index in 1..=40 {
        wal.append(&entries(index..=index, 1), None).unwrap();
    }
    assert!(wal.segment_count() > 4);
    wal.save_snapshot_marker(30, 1).unwrap();
    wal.release_before(30).unwrap();
    let names = segment_names(&disk);
    drop(wal);
    disk.crash(Crash::Clean);
    assert_eq!(segment_names(&disk), names);
    let (_, recovered) = open(&disk, &options);
    assert_eq!(
        positions(&recovered.entries),
        positions(&entries(31..=40, 1))
    );
}

#[test]
fn crash_right_after_first_open_leaves_an_openable_log() {
    let disk = SimDisk::new();
    let (wal, _) = open(&disk, &WalOptions::default());
    drop(wal);
    disk.crash(Crash::Clean);
    assert_eq!(disk.list_directory(Path::new("")).unwrap(), ["wal"]);
    let (_, recovered) = open(&disk, &WalOptions::default());
    assert_eq!(recovered, Default::default());
}

#[test]
fn media_corruption_of_fsynced_data_is_detected_after_crash() {
    let disk = SimDisk::new();
    let (mut wal, _) = open(&disk, &WalOptions::default());
    wal.append(&entries(1..=5, 1), None).unwrap();
    drop(wal);
    let path = last_segment(&disk);
    let offsets = record_offsets(&disk.read_file(&path).unwrap());
    disk.corrupt(&path, offsets[1] + 10, 0x04);
    disk.crash(Crash::Clean);
    match Wal::open(disk, WalOptions::default()).unwrap_err() {
        StorageError::Corrupt { offset, .. } => assert_eq!(offset, offsets[1] as u64),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}
