//! The snapshot store over both disks: save and load, retention, corruption, temporary files,
//! limits; and atomicity under simulated crashes.

mod common;

use std::path::Path;

use common::rewrite;
use keel_storage::{Crash, Disk, SimDisk, Snapshot, SnapshotOptions, SnapshotStore, StorageError};

on_both_disks!(
    save_and_load_newest,
    retention_keeps_the_newest,
    corrupt_newest_is_an_error_not_a_fallback,
    temporary_files_are_removed_on_open,
    oversize_snapshot_refused,
);

fn store<D: Disk + Clone>(disk: &D) -> SnapshotStore<D> {
    SnapshotStore::open(disk.clone(), SnapshotOptions::default()).unwrap()
}

fn snapshot_names<D: Disk>(disk: &D) -> Vec<String> {
    disk.list_directory(Path::new("snap")).unwrap()
}

fn save_and_load_newest<D: Disk + Clone>(disk: D) {
    let snapshots = store(&disk);
    assert_eq!(snapshots.load_newest().unwrap(), None);
    snapshots
        .save(10, 2, b"members 1 2 3", b"state at 10")
        .unwrap();
    snapshots.save(20, 3, b"", b"state at 20").unwrap();
    assert_eq!(
        snapshot_names(&disk),
        [
            "0000000000000002-000000000000000a.snap",
            "0000000000000003-0000000000000014.snap"
        ]
    );
    // A fresh store over the same files sees the same newest snapshot.
    let newest = store(&disk).load_newest().unwrap();
    assert_eq!(
        newest,
        Some(Snapshot {
            index: 20,
            term: 3,
            metadata: Vec::new(),
            data: b"state at 20".to_vec(),
        })
    );
    assert_eq!(snapshots.list().unwrap(), [(10, 2), (20, 3)]);
}

fn retention_keeps_the_newest<D: Disk + Clone>(disk: D) {
    let snapshots = store(&disk);
    for index in 1..=5 {
        snapshots.save(index * 10, 1, b"m", b"d").unwrap();
    }
    assert_eq!(snapshots.list().unwrap(), [(40, 1), (50, 1)]);
    let three = SnapshotStore::open(
        disk.clone(),
        SnapshotOptions {
            retain: 3,
            ..SnapshotOptions::default()
        },
    )
    .unwrap();
    three.save(60, 2, b"m", b"d").unwrap();
    three.save(70, 2, b"m", b"d").unwrap();
    assert_eq!(three.list().unwrap(), [(50, 1), (60, 2), (70, 2)]);
    assert!(matches!(
        SnapshotStore::open(
            disk,
            SnapshotOptions {
                retain: 0,
                ..SnapshotOptions::default()
            }
        ),
        Err(StorageError::InvalidOptions { .. })
    ));
}

fn corrupt_newest_is_an_error_not_a_fallback<D: Disk + Clone>(disk: D) {
    let snapshots = store(&disk);
    snapshots.save(10, 1, b"meta", b"older").unwrap();
    snapshots.save(20, 1, b"meta", b"newer").unwrap();
    let name = "0000000000000001-0000000000000014.snap";
    let path = Path::new("snap").join(name);
    let mut bytes = disk.read_file(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    rewrite(&disk, &path, &bytes);
    let error = snapshots.load_newest().unwrap_err();
    match &error {
        StorageError::Corrupt {
            file,
            offset,
            reason,
        } => {
            assert_eq!(file, &path.display().to_string());
            assert_eq!(*offset, 8, "the checksum field");
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(error.to_string().contains(name), "{error}");

    // A truncated file and a file renamed to another position are caught too.
    rewrite(&disk, &path, &bytes[..30]);
    assert!(matches!(
        snapshots.load_newest(),
        Err(StorageError::Corrupt { offset: 0, .. })
    ));
    let older = disk
        .read_file(Path::new("snap/0000000000000001-000000000000000a.snap"))
        .unwrap();
    rewrite(&disk, &path, &older);
    match snapshots.load_newest().unwrap_err() {
        StorageError::Corrupt { reason, .. } => assert!(reason.contains("name"), "{reason}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

fn temporary_files_are_removed_on_open<D: Disk + Clone>(disk: D) {
    let snapshots = store(&disk);
    snapshots.save(10, 1, b"m", b"d").unwrap();
    rewrite(
        &disk,
        Path::new("snap/0000000000000001-0000000000000014.snap.tmp"),
        b"half a snapshot",
    );
    assert_eq!(snapshot_names(&disk).len(), 2);
    assert_eq!(
        snapshots.list().unwrap(),
        [(10, 1)],
        "temporary files are not snapshots"
    );
    let reopened = store(&disk);
    assert_eq!(
        snapshot_names(&disk),
        ["0000000000000001-000000000000000a.snap"]
    );
    assert_eq!(reopened.load_newest().unwrap().unwrap().index, 10);
}

fn oversize_snapshot_refused<D: Disk + Clone>(disk: D) {
    let snapshots = SnapshotStore::open(
        disk.clone(),
        SnapshotOptions {
            snapshot_bytes_max: 100,
            ..SnapshotOptions::default()
        },
    )
    .unwrap();
    snapshots.save(1, 1, b"", &[0; 60]).unwrap();
    match snapshots.save(2, 1, b"", &[0; 61]).unwrap_err() {
        StorageError::SnapshotTooLarge { bytes, limit } => assert_eq!((bytes, limit), (101, 100)),
        other => panic!("expected SnapshotTooLarge, got {other:?}"),
    }
    assert_eq!(snapshots.list().unwrap(), [(1, 1)]);
}

#[test]
fn crash_during_save_leaves_the_previous_snapshot() {
    let disk = SimDisk::new();
    let snapshots = store(&disk);
    snapshots.save(10, 1, b"m", b"old").unwrap();
    // The temporary file's fsync fails: the save fails and nothing replaces the old snapshot.
    disk.fail_next_fsync(1);
    assert!(matches!(
        snapshots.save(20, 1, b"m", b"new"),
        Err(StorageError::Io { .. })
    ));
    disk.crash(Crash::Clean);
    let snapshots = store(&disk);
    assert_eq!(snapshots.load_newest().unwrap().unwrap().data, b"old");
    assert_eq!(
        snapshot_names(&disk),
        ["0000000000000001-000000000000000a.snap"]
    );
}

#[test]
fn saved_snapshot_survives_a_crash() {
    let disk = SimDisk::new();
    let snapshots = store(&disk);
    snapshots.save(10, 1, b"m", b"durable").unwrap();
    disk.crash(Crash::Torn { seed: 7 });
    assert_eq!(
        store(&disk).load_newest().unwrap().unwrap().data,
        b"durable"
    );
}

#[test]
fn failed_directory_sync_after_the_rename_loses_the_new_name_not_the_old_snapshot() {
    let disk = SimDisk::new();
    let snapshots = store(&disk);
    snapshots.save(10, 1, b"m", b"old").unwrap();
    // The temporary file's fsync succeeds, the directory's (after the rename) fails.
    disk.fail_fsync_after(1, 1);
    assert!(snapshots.save(20, 1, b"m", b"new").is_err());
    assert_eq!(
        snapshots.load_newest().unwrap().unwrap().data,
        b"new",
        "before a crash the rename is visible"
    );
    disk.crash(Crash::Clean);
    let snapshots = store(&disk);
    assert_eq!(snapshots.load_newest().unwrap().unwrap().data, b"old");
    assert_eq!(
        snapshot_names(&disk),
        ["0000000000000001-000000000000000a.snap"]
    );
}
