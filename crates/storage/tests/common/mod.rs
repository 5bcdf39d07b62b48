//! Helpers shared by the integration tests: fixtures, and the `on_both_disks!` macro that runs
//! one generic test over a real `FileDisk` in a temporary directory and over a `SimDisk`.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::path::{Path, PathBuf};

use keel_storage::{Disk, DiskFile, LogEntry, Recovered, Wal, WalOptions};

/// Runs each named generic test `fn name<D: Disk + Clone>(disk: D)` on both disks.
#[macro_export]
macro_rules! on_both_disks {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn file_disk() {
                    let directory = tempfile::tempdir().unwrap();
                    super::$name(keel_storage::FileDisk::new(directory.path()));
                }

                #[test]
                fn sim_disk() {
                    super::$name(keel_storage::SimDisk::new());
                }
            }
        )*
    };
}

/// Entries `indexes` at `term`, with payloads of varying length so records differ in size.
pub fn entries(indexes: std::ops::RangeInclusive<u64>, term: u64) -> Vec<LogEntry> {
    indexes
        .map(|index| LogEntry {
            index,
            term,
            payload: format!(
                "entry {index} term {term} {}",
                "x".repeat((index % 7) as usize)
            )
            .into_bytes(),
        })
        .collect()
}

/// (index, term) of each entry, for compact assertions.
pub fn positions(entries: &[LogEntry]) -> Vec<(u64, u64)> {
    entries
        .iter()
        .map(|entry| (entry.index, entry.term))
        .collect()
}

/// Options with small segments so tests roll over often.
pub fn small_segments(segment_bytes_max: u64) -> WalOptions {
    WalOptions {
        segment_bytes_max,
        ..WalOptions::default()
    }
}

/// Opens the log over a clone of `disk`, panicking on error.
pub fn open<D: Disk + Clone>(disk: &D, options: &WalOptions) -> (Wal<D>, Recovered) {
    Wal::open(disk.clone(), options.clone()).unwrap()
}

/// Names of the segment files, oldest first.
pub fn segment_names<D: Disk>(disk: &D) -> Vec<String> {
    disk.list_directory(Path::new("wal")).unwrap()
}

pub fn segment_path(name: &str) -> PathBuf {
    Path::new("wal").join(name)
}

/// The newest segment's path.
pub fn last_segment<D: Disk>(disk: &D) -> PathBuf {
    segment_path(segment_names(disk).last().expect("a segment"))
}

/// Replaces the content of `path` durably: damage done "by the disk" between runs.
pub fn rewrite<D: Disk>(disk: &D, path: &Path, bytes: &[u8]) {
    let mut file = disk.open_append(path).unwrap();
    file.truncate(0).unwrap();
    file.append(bytes).unwrap();
    file.sync().unwrap();
}

/// Offsets of the records in a segment, found by walking the documented length fields.
pub fn record_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut offset = 0;
    while offset + 8 <= bytes.len() {
        offsets.push(offset);
        let length = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap());
        offset += 8 + length as usize;
    }
    assert_eq!(
        offset,
        bytes.len(),
        "test helper expects an undamaged segment"
    );
    offsets
}
