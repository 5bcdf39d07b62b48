//! Write-ahead log behaviour over both disks: round trips, overwrites, segments, release, torn
//! tails, corruption and limits.

mod common;

use common::*;
use keel_storage::{Disk, HardState, SnapshotMarker, StorageError, TruncatedTail, Wal, WalOptions};

on_both_disks!(
    round_trip_in_batches,
    empty_log_opens_empty,
    overwritten_suffix_is_replaced,
    overwrite_across_segments,
    segment_rollover,
    release_before_deletes_whole_segments,
    detached_segments_are_removed_later_and_the_log_goes_on,
    marker_beyond_log_discards_it,
    torn_tail_cut_mid_record,
    torn_tail_header_incomplete,
    torn_tail_garbled_last_record,
    torn_tail_followed_by_zeros,
    corrupt_middle_record,
    corrupt_last_record_of_earlier_segment,
    corrupt_length_field_in_last_segment,
    missing_segment_is_corrupt,
    oversize_record_refused,
    oversize_record_on_read_is_corrupt,
    unexpected_files_are_ignored,
);

fn hard_state(term: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote: 1,
        commit,
    }
}

fn round_trip_in_batches<D: Disk + Clone>(disk: D) {
    let options = WalOptions::default();
    let (mut wal, recovered) = open(&disk, &options);
    assert_eq!(recovered.entries, []);
    wal.append(&entries(1..=3, 1), Some(hard_state(1, 0)))
        .unwrap();
    wal.append(&entries(4..=4, 1), None).unwrap();
    wal.append(&[], Some(hard_state(2, 3))).unwrap();
    wal.append(&entries(5..=9, 2), None).unwrap();
    assert_eq!(wal.last_index(), 9);
    let fsyncs = wal.stats().fsyncs;
    wal.append(&entries(10..=20, 2), Some(hard_state(2, 9)))
        .unwrap();
    assert_eq!(wal.stats().fsyncs, fsyncs + 1, "one batch, one fsync");
    drop(wal);

    let (wal, recovered) = open(&disk, &options);
    let mut expected = entries(1..=9, 1);
    expected.truncate(4);
    expected.extend(entries(5..=20, 2));
    assert_eq!(recovered.entries, expected);
    assert_eq!(recovered.hard_state, Some(hard_state(2, 9)));
    assert_eq!(recovered.snapshot_marker, None);
    assert_eq!(recovered.truncated_tail, None);
    assert_eq!(wal.last_index(), 20);
    assert_eq!(wal.hard_state(), Some(hard_state(2, 9)));
}

fn empty_log_opens_empty<D: Disk + Clone>(disk: D) {
    let options = WalOptions::default();
    let (mut wal, recovered) = open(&disk, &options);
    assert_eq!(recovered, Default::default());
    assert_eq!(wal.stats().bytes_written, 0);
    wal.append(&[], None).unwrap();
    assert_eq!(
        wal.stats().bytes_written,
        0,
        "an empty append writes nothing"
    );
    drop(wal);
    let (wal, recovered) = open(&disk, &options);
    assert_eq!(recovered, Default::default());
    assert_eq!(wal.segment_count(), 1);
    assert_eq!(
        segment_names(&disk),
        ["0000000000000000-0000000000000001.wal"]
    );
}

fn overwritten_suffix_is_replaced<D: Disk + Clone>(disk: D) {
    let options = WalOptions::default();
    let (mut wal, _) = open(&disk, &options);
    wal.append(&entries(1..=10, 1), None).unwrap();
    wal.append(&entries(6..=8, 2), None).unwrap();
    assert_eq!(wal.last_index(), 8);
    wal.append(&entries(9..=9, 2), None).unwrap();
    drop(wal);
    let (_, recovered) = open(&disk, &options);
    let mut expected = entries(1..=5, 1);
    expected.extend(entries(6..=9, 2));
    assert_eq!(recovered.entries, expected);
}

fn overwrite_across_segments<D: Disk + Clone>(disk: D) {
    let options = small_segments(200);
    let (mut wal, _) = open(&disk, &options);
    for index in 1..=30 {
        wal.append(&entries(index..=index, 1), None).unwrap();
    }
    assert!(wal.segment_count() > 3);
    // A new leader overwrites a suffix that spans several segments.
    wal.append(&entries(5..=12, 3), Some(hard_state(3, 4)))
        .unwrap();
    drop(wal);
    let (_, recovered) = open(&disk, &options);
    let mut expected = entries(1..=4, 1);
    expected.extend(entries(5..=12, 3));
    assert_eq!(recovered.entries, expected);
    assert_eq!(recovered.hard_state, Some(hard_state(3, 4)));
}

fn segment_rollover<D: Disk + Clone>(disk: D) {
    let segment_bytes_max = 300;
    let options = small_segments(segment_bytes_max);
    let (mut wal, _) = open(&disk, &options);
    wal.append(&entries(1..=1, 1), Some(hard_state(1, 0)))
        .unwrap();
    for batch in 0..20 {
        let first = 2 + batch * 3;
        wal.append(&entries(first..=first + 2, 1), Some(hard_state(1, first)))
            .unwrap();
    }
    let names = segment_names(&disk);
    assert!(names.len() >= 5, "{names:?}");
    assert_eq!(wal.segment_count(), names.len());
    assert_eq!(wal.stats().segments_created, names.len() as u64);
    for (sequence, name) in names.iter().enumerate() {
        assert!(name.starts_with(&format!("{sequence:016x}-")), "{name}");
        let bytes = disk.read_file(&segment_path(name)).unwrap();
        assert!(
            bytes.len() as u64 <= segment_bytes_max,
            "{name}: {}",
            bytes.len()
        );
    }
    // Each segment is named for the entry after the last one of the segment before.
    for pair in names.windows(2) {
        let expected = max_entry_index(&disk, &pair[0]) + 1;
        assert!(
            pair[1].ends_with(&format!("-{expected:016x}.wal")),
            "{names:?}"
        );
    }
    drop(wal);

    let (wal, recovered) = open(&disk, &options);
    assert_eq!(
        positions(&recovered.entries),
        positions(&entries(1..=61, 1))
    );
    assert_eq!(recovered.hard_state, Some(hard_state(1, 59)));
    assert_eq!(wal.segment_count(), names.len());
}

fn release_before_deletes_whole_segments<D: Disk + Clone>(disk: D) {
    let options = small_segments(250);
    let (mut wal, _) = open(&disk, &options);
    wal.append(&[], Some(hard_state(1, 0))).unwrap();
    for index in 1..=40 {
        wal.append(&entries(index..=index, 1), None).unwrap();
    }
    let names_before = segment_names(&disk);
    assert!(names_before.len() >= 4, "{names_before:?}");

    // Which segments hold only entries up to 20? Read them back to know independently.
    let (_, recovered_before) = open(&disk, &options);
    assert_eq!(recovered_before.entries.len(), 40);
    let segment_entry_index_max: Vec<u64> = names_before
        .iter()
        .map(|name| max_entry_index(&disk, name))
        .collect();
    let deletable = segment_entry_index_max
        .iter()
        .take(names_before.len() - 1)
        .take_while(|index_max| **index_max <= 20)
        .count();
    assert!(deletable >= 1);

    wal.save_snapshot_marker(20, 1).unwrap();
    let removed = wal.release_before(20).unwrap();
    assert_eq!(removed, deletable);
    assert_eq!(segment_names(&disk), names_before[deletable..]);
    assert_eq!(wal.stats().segments_removed, deletable as u64);
    // Releasing again removes nothing more.
    assert_eq!(wal.release_before(20).unwrap(), 0);
    drop(wal);

    let (mut wal, recovered) = open(&disk, &options);
    assert_eq!(
        recovered.snapshot_marker,
        Some(SnapshotMarker { index: 20, term: 1 })
    );
    assert_eq!(
        positions(&recovered.entries),
        positions(&entries(21..=40, 1))
    );
    assert_eq!(
        recovered.hard_state,
        Some(hard_state(1, 0)),
        "kept by segment copies"
    );

    // The log goes on after the release, and a release of everything keeps the last segment.
    wal.append(&entries(41..=45, 2), Some(hard_state(2, 44)))
        .unwrap();
    wal.save_snapshot_marker(45, 2).unwrap();
    wal.release_before(45).unwrap();
    assert_eq!(wal.segment_count(), 1);
    drop(wal);
    let (_, recovered) = open(&disk, &options);
    assert_eq!(
        recovered.snapshot_marker,
        Some(SnapshotMarker { index: 45, term: 2 })
    );
    assert_eq!(recovered.entries, []);
    assert_eq!(recovered.hard_state, Some(hard_state(2, 44)));
}

/// The highest entry index in a segment, found by walking its records (kind 1 is an entry,
/// whose index follows the kind byte).
fn max_entry_index<D: Disk>(disk: &D, name: &str) -> u64 {
    let bytes = disk.read_file(&segment_path(name)).unwrap();
    record_offsets(&bytes)
        .into_iter()
        .filter(|offset| bytes[offset + 8] == 1)
        .map(|offset| u64::from_le_bytes(bytes[offset + 9..offset + 17].try_into().unwrap()))
        .max()
        .unwrap_or(0)
}

/// The member loop detaches released segments and another thread deletes them: the log
/// appends meanwhile, and reopening before or after the deletion finds the same entries.
fn detached_segments_are_removed_later_and_the_log_goes_on<D: Disk + Clone>(disk: D) {
    let options = small_segments(250);
    let (mut wal, _) = open(&disk, &options);
    for index in 1..=40 {
        wal.append(&entries(index..=index, 1), None).unwrap();
    }
    let names_before = segment_names(&disk);
    wal.save_snapshot_marker(20, 1).unwrap();
    let released = wal.detach_before(20).unwrap();
    assert!(!released.is_empty());
    let count = released.len();
    assert_eq!(wal.segment_count(), names_before.len() - count);
    // Still on disk, and the log appends (and may roll over) before they go.
    assert_eq!(segment_names(&disk), names_before);
    wal.append(&entries(41..=50, 1), None).unwrap();
    {
        let (_, recovered) = open(&disk, &options);
        assert_eq!(
            positions(&recovered.entries),
            positions(&entries(21..=50, 1)),
            "segments not yet deleted are read back behind the marker"
        );
    }
    let names_kept = segment_names(&disk)[count..].to_vec();
    released.remove().unwrap();
    assert_eq!(segment_names(&disk), names_kept);
    drop(wal);
    let (_, recovered) = open(&disk, &options);
    assert_eq!(
        positions(&recovered.entries),
        positions(&entries(21..=50, 1))
    );
}

fn marker_beyond_log_discards_it<D: Disk + Clone>(disk: D) {
    let options = WalOptions::default();
    let (mut wal, _) = open(&disk, &options);
    wal.append(&entries(1..=5, 1), None).unwrap();
    // A snapshot from the leader beyond the end of this log replaces all of it.
    wal.save_snapshot_marker(50, 3).unwrap();
    assert_eq!(wal.last_index(), 50);
    wal.append(&entries(51..=52, 3), None).unwrap();
    drop(wal);
    let (_, recovered) = open(&disk, &options);
    assert_eq!(
        recovered.snapshot_marker,
        Some(SnapshotMarker { index: 50, term: 3 })
    );
    assert_eq!(positions(&recovered.entries), [(51, 3), (52, 3)]);
}

/// Writes entries 1..=10 in two batches and returns the last segment's bytes and record offsets.
fn ten_entries<D: Disk + Clone>(disk: &D) -> (Vec<u8>, Vec<usize>) {
    let (mut wal, _) = open(disk, &WalOptions::default());
    wal.append(&entries(1..=5, 1), None).unwrap();
    wal.append(&entries(6..=10, 1), None).unwrap();
    let bytes = disk.read_file(&last_segment(disk)).unwrap();
    let offsets = record_offsets(&bytes);
    assert_eq!(offsets.len(), 10);
    (bytes, offsets)
}

/// After damage to the tail: open succeeds with entries 1..=9, reports the cut at the last
/// record, later appends work, and the next open is clean.
fn expect_torn_tail_recovery<D: Disk + Clone>(disk: &D, last_record_offset: usize) {
    let options = WalOptions::default();
    let path = last_segment(disk);
    let (mut wal, recovered) = open(disk, &options);
    assert_eq!(positions(&recovered.entries), positions(&entries(1..=9, 1)));
    let TruncatedTail { file, offset, .. } = recovered.truncated_tail.expect("a torn tail");
    assert_eq!(file, path.display().to_string());
    assert_eq!(offset, last_record_offset as u64);
    assert_eq!(disk.read_file(&path).unwrap().len(), last_record_offset);

    wal.append(&entries(10..=12, 2), None).unwrap();
    drop(wal);
    let (_, recovered) = open(disk, &options);
    assert_eq!(recovered.truncated_tail, None);
    let mut expected = entries(1..=9, 1);
    expected.extend(entries(10..=12, 2));
    assert_eq!(recovered.entries, expected);
}

fn torn_tail_cut_mid_record<D: Disk + Clone>(disk: D) {
    let (bytes, offsets) = ten_entries(&disk);
    let last = offsets[9];
    rewrite(&disk, &last_segment(&disk), &bytes[..last + 12]);
    expect_torn_tail_recovery(&disk, last);
}

fn torn_tail_header_incomplete<D: Disk + Clone>(disk: D) {
    let (bytes, offsets) = ten_entries(&disk);
    let last = offsets[9];
    rewrite(&disk, &last_segment(&disk), &bytes[..last + 3]);
    expect_torn_tail_recovery(&disk, last);
}

fn torn_tail_garbled_last_record<D: Disk + Clone>(disk: D) {
    let (mut bytes, offsets) = ten_entries(&disk);
    let length = bytes.len();
    for byte in &mut bytes[length - 3..] {
        *byte ^= 0x5A;
    }
    rewrite(&disk, &last_segment(&disk), &bytes);
    expect_torn_tail_recovery(&disk, offsets[9]);
}

fn torn_tail_followed_by_zeros<D: Disk + Clone>(disk: D) {
    let (mut bytes, offsets) = ten_entries(&disk);
    let length = bytes.len();
    bytes[length - 1] ^= 0x01;
    // Some file systems leave a zero-filled extension after a crash.
    bytes.extend([0; 4096]);
    rewrite(&disk, &last_segment(&disk), &bytes);
    expect_torn_tail_recovery(&disk, offsets[9]);
}

fn corrupt_middle_record<D: Disk + Clone>(disk: D) {
    let (mut bytes, offsets) = ten_entries(&disk);
    bytes[offsets[4] + 12] ^= 0x01;
    let path = last_segment(&disk);
    rewrite(&disk, &path, &bytes);
    let error = Wal::open(disk.clone(), WalOptions::default()).unwrap_err();
    match &error {
        StorageError::Corrupt {
            file,
            offset,
            reason,
        } => {
            assert_eq!(file, &path.display().to_string());
            assert_eq!(*offset, offsets[4] as u64);
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let message = error.to_string();
    assert!(
        message.contains(&path.display().to_string())
            && message.contains(&format!("offset {}", offsets[4])),
        "{message}"
    );
    // Nothing was truncated: the evidence stays for the operator.
    assert_eq!(disk.read_file(&path).unwrap(), bytes);
}

fn corrupt_last_record_of_earlier_segment<D: Disk + Clone>(disk: D) {
    let options = small_segments(200);
    let (mut wal, _) = open(&disk, &options);
    for index in 1..=20 {
        wal.append(&entries(index..=index, 1), None).unwrap();
    }
    drop(wal);
    let names = segment_names(&disk);
    assert!(names.len() >= 2);
    let path = segment_path(&names[0]);
    let mut bytes = disk.read_file(&path).unwrap();
    let last = *record_offsets(&bytes).last().unwrap();
    // Damage that would pass for a torn tail in the last segment is corruption here.
    bytes.truncate(bytes.len() - 2);
    rewrite(&disk, &path, &bytes);
    match Wal::open(disk.clone(), options).unwrap_err() {
        StorageError::Corrupt { file, offset, .. } => {
            assert_eq!(file, path.display().to_string());
            assert_eq!(offset, last as u64);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

fn corrupt_length_field_in_last_segment<D: Disk + Clone>(disk: D) {
    let (mut bytes, offsets) = ten_entries(&disk);
    // A huge length makes the record run past the end, like a torn write would, but valid
    // records follow it: that is corruption, not a tail to cut.
    bytes[offsets[6] + 2] = 0x7F;
    rewrite(&disk, &last_segment(&disk), &bytes);
    match Wal::open(disk.clone(), WalOptions::default()).unwrap_err() {
        StorageError::Corrupt { offset, .. } => assert_eq!(offset, offsets[6] as u64),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

fn missing_segment_is_corrupt<D: Disk + Clone>(disk: D) {
    let options = small_segments(200);
    let (mut wal, _) = open(&disk, &options);
    for index in 1..=30 {
        wal.append(&entries(index..=index, 1), None).unwrap();
    }
    drop(wal);
    let names = segment_names(&disk);
    assert!(names.len() >= 3);
    disk.remove_file(&segment_path(&names[1])).unwrap();
    match Wal::open(disk.clone(), options.clone()).unwrap_err() {
        StorageError::Corrupt { file, reason, .. } => {
            assert_eq!(file, segment_path(&names[2]).display().to_string());
            assert!(reason.contains("missing"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Losing the first segment without a snapshot marker loses entries too.
    let disk_without_first = disk.clone();
    for name in &names[..2] {
        let _ = disk_without_first.remove_file(&segment_path(name));
    }
    match Wal::open(disk_without_first, options).unwrap_err() {
        StorageError::Corrupt { reason, .. } => assert!(reason.contains("missing"), "{reason}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

fn oversize_record_refused<D: Disk + Clone>(disk: D) {
    let options = WalOptions {
        record_bytes_max: 1024,
        ..WalOptions::default()
    };
    let (mut wal, _) = open(&disk, &options);
    wal.append(&entries(1..=2, 1), None).unwrap();
    let mut batch = entries(3..=5, 1);
    batch[1].payload = vec![7; 1024];
    match wal.append(&batch, None).unwrap_err() {
        StorageError::RecordTooLarge { bytes, limit } => {
            assert_eq!(limit, 1024);
            assert_eq!(bytes, 8 + 17 + 1024);
        }
        other => panic!("expected RecordTooLarge, got {other:?}"),
    }
    // Nothing of the batch was written and the log still works.
    assert!(!wal.is_poisoned());
    assert_eq!(wal.last_index(), 2);
    let largest_payload = 1024 - 8 - 17;
    batch[1].payload = vec![7; largest_payload];
    wal.append(&batch, None).unwrap();
    drop(wal);
    let (_, recovered) = open(&disk, &options);
    assert_eq!(recovered.entries.len(), 5);
    assert_eq!(recovered.entries[3].payload.len(), largest_payload);
}

fn oversize_record_on_read_is_corrupt<D: Disk + Clone>(disk: D) {
    let (mut wal, _) = open(&disk, &WalOptions::default());
    let mut batch = entries(1..=3, 1);
    batch[1].payload = vec![1; 5000];
    wal.append(&batch, None).unwrap();
    drop(wal);
    let bytes = disk.read_file(&last_segment(&disk)).unwrap();
    let offsets = record_offsets(&bytes);
    let smaller = WalOptions {
        record_bytes_max: 1024,
        ..WalOptions::default()
    };
    match Wal::open(disk.clone(), smaller).unwrap_err() {
        StorageError::Corrupt { offset, reason, .. } => {
            assert_eq!(offset, offsets[1] as u64);
            assert!(reason.contains("record_bytes_max"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

fn unexpected_files_are_ignored<D: Disk + Clone>(disk: D) {
    let options = WalOptions::default();
    let (mut wal, _) = open(&disk, &options);
    wal.append(&entries(1..=2, 1), None).unwrap();
    drop(wal);
    rewrite(&disk, &segment_path("README"), b"not a segment");
    let (_, recovered) = open(&disk, &options);
    assert_eq!(recovered.entries.len(), 2);
    // A file that claims to be a segment but is misnamed is not ignored.
    rewrite(&disk, &segment_path("1-1.wal"), b"");
    assert!(matches!(
        Wal::open(disk.clone(), options),
        Err(StorageError::Corrupt { .. })
    ));
}

#[test]
#[should_panic(expected = "gap")]
fn appending_with_a_gap_is_a_bug() {
    let disk = keel_storage::SimDisk::new();
    let (mut wal, _) = open(&disk, &WalOptions::default());
    wal.append(&entries(1..=2, 1), None).unwrap();
    let _ = wal.append(&entries(4..=4, 1), None);
}

#[test]
#[should_panic(expected = "snapshot marker")]
fn release_beyond_the_marker_is_a_bug() {
    let disk = keel_storage::SimDisk::new();
    let (mut wal, _) = open(&disk, &WalOptions::default());
    wal.append(&entries(1..=5, 1), None).unwrap();
    wal.save_snapshot_marker(2, 1).unwrap();
    let _ = wal.release_before(3);
}

#[test]
fn invalid_options_are_refused() {
    let disk = keel_storage::SimDisk::new();
    let options = WalOptions {
        segment_bytes_max: 0,
        ..WalOptions::default()
    };
    assert!(matches!(
        Wal::open(disk, options),
        Err(StorageError::InvalidOptions { .. })
    ));
}
