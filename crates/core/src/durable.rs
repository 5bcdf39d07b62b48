//! `DurableState`: the write-ahead log and snapshot store of one member, and
//! the translation between the core's outputs and their records on disk.
//!
//! It reaches the disk only through `keel_storage::Disk`: the server passes a
//! real `FileDisk`, the simulator a fault-injecting `SimDisk`. Keeping this glue
//! here, rather than in the server, means the simulator exercises exactly the
//! code that decides what is written, in which order, and how it is recovered.
//!
//! Write order, each step durable before the next:
//! 1. a snapshot (received from the leader, or our own) is written as a file;
//! 2. its marker is appended to the log;
//! 3. entries and hard state are appended with one fsync;
//! 4. only then may log segments behind a snapshot be released.
//!
//! This member's own snapshots are written by a [`SnapshotWriter`], on a thread
//! of the server's (or at a later step of the simulator), while the member loop
//! goes on appending to the log; steps 2 and 4 follow on the loop once the node
//! hears the snapshot is durable ([`DurableState::compact_log`]). A crash in
//! between leaves a snapshot file newer than the log's marker, which
//! [`DurableState::open`] completes.

use keel_storage::{
    Disk, HardState, LogEntry, ReleasedSegments, SnapshotOptions, SnapshotStore, StorageError, Wal,
    WalOptions,
};
use keel_types::keelpb::MemberRecord;
use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState as RaftHardState, Snapshot, SnapshotMetadata};

use std::sync::{Arc, Mutex};

use crate::node::{bootstrap_snapshot, LogCompaction, Persist, Recovered, SnapshotCapture};

/// Why the durable state could not be opened or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DurableError {
    /// The log or snapshot store failed (I/O, corruption, fsync).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A record passed its checksum but does not make sense.
    #[error("{0}")]
    Inconsistent(String),
}

/// One member's write-ahead log and snapshot files.
#[derive(Debug)]
pub struct DurableState<D: Disk> {
    wal: Wal<D>,
    /// Shared with the [`SnapshotWriter`]; the lock keeps two saves (an own
    /// snapshot off the loop, a received one on it) from applying retention at
    /// the same time.
    snapshots: Arc<Mutex<SnapshotStore<D>>>,
}

/// Writes captures of this member's own state machine as snapshot files. It
/// shares the snapshot store with its [`DurableState`] and may run on another
/// thread: that is what keeps encoding, writing and fsyncing a snapshot (all
/// O(key space)) off the member loop.
#[derive(Debug)]
pub struct SnapshotWriter<D: Disk> {
    snapshots: Arc<Mutex<SnapshotStore<D>>>,
}

impl<D: Disk> SnapshotWriter<D> {
    /// Encodes `capture` and saves it durably (file and directory fsynced).
    /// Returns the snapshot to report to the node with
    /// [`Event::SnapshotDurable`](crate::Event::SnapshotDurable). An error
    /// (an fsync error above all) must stop the member, as a log error does:
    /// the node is never told about a snapshot that is not durable.
    pub fn write(&self, capture: &SnapshotCapture) -> Result<Snapshot, DurableError> {
        let snapshot = capture.encode();
        self.save(&snapshot)?;
        Ok(snapshot)
    }

    /// The second half of [`SnapshotWriter::write`], for a caller that
    /// encodes the capture itself (to time the two halves apart): saves an
    /// encoded capture durably.
    pub fn save(&self, snapshot: &Snapshot) -> Result<(), DurableError> {
        save_snapshot_file(&self.snapshots, snapshot)
    }
}

/// The first half of opening a member's files ([`DurableState::open_snapshot`]):
/// the newest snapshot read and checked, the log not yet. A restart starts restoring
/// that snapshot's state machine on another thread before it finishes the opening
/// with [`OpeningState::open_log`], so that replaying the log and restoring the key
/// space (at a million keys, most of a restart) overlap.
#[derive(Debug)]
pub struct OpeningState<D: Disk> {
    disk: D,
    snapshots: SnapshotStore<D>,
    snapshot: Option<Snapshot>,
}

impl<D: Disk + Clone> DurableState<D> {
    /// Opens the log and snapshots on `disk`. Returns the recovered state, or
    /// `None` when the disk holds no member yet (no snapshot, not even the
    /// bootstrap one).
    pub fn open(disk: D) -> Result<(Self, Option<Recovered>), DurableError> {
        Self::open_snapshot(disk)?.open_log()
    }

    /// The first half of [`DurableState::open`]: opens the snapshot files and reads
    /// the newest snapshot.
    pub fn open_snapshot(disk: D) -> Result<OpeningState<D>, DurableError> {
        let snapshots = SnapshotStore::open(disk.clone(), SnapshotOptions::default())?;
        let snapshot = match snapshots.load_newest()? {
            None => None,
            Some(file) => {
                let metadata =
                    SnapshotMetadata::parse_from_bytes(&file.metadata).map_err(|error| {
                        DurableError::Inconsistent(format!(
                            "snapshot at index {}: metadata does not decode: {error}",
                            file.index
                        ))
                    })?;
                let mut snapshot = Snapshot::default();
                snapshot.set_metadata(metadata);
                snapshot.data = file.data.into();
                Some(snapshot)
            }
        };
        Ok(OpeningState {
            disk,
            snapshots,
            snapshot,
        })
    }
}

impl<D: Disk + Clone> OpeningState<D> {
    /// The newest snapshot, which [`OpeningState::open_log`] will recover the
    /// member from (`None` for a disk that holds no member yet).
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref()
    }

    /// The second half of [`DurableState::open`]: opens the log and checks it
    /// against the snapshot.
    pub fn open_log(self) -> Result<(DurableState<D>, Option<Recovered>), DurableError> {
        let (wal, recovered_log) = Wal::open(self.disk, WalOptions::default())?;
        let durable = DurableState {
            wal,
            snapshots: Arc::new(Mutex::new(self.snapshots)),
        };
        let Some(snapshot) = self.snapshot else {
            if !recovered_log.entries.is_empty() {
                return Err(DurableError::Inconsistent(format!(
                    "the log holds {} entries but there is no snapshot, not even the \
                     bootstrap one: the snapshot directory was lost",
                    recovered_log.entries.len()
                )));
            }
            return Ok((durable, None));
        };
        let snapshot_index = snapshot.get_metadata().index;
        let snapshot_term = snapshot.get_metadata().term;
        let mut durable = durable;
        // A crash (or an fsync error) between saving a snapshot file and
        // appending its marker leaves the log behind the snapshot: finish the
        // interrupted save now, so the log accepts the entries after the
        // snapshot. Found by the simulator (seed 910).
        let marker_index = durable
            .wal
            .snapshot_marker()
            .map_or(0, |marker| marker.index);
        if marker_index > snapshot_index {
            // The log dropped its entries up to the marker for a snapshot that is
            // gone (its rename was never durable): starting from the older snapshot
            // would silently forget entries this member acknowledged.
            return Err(DurableError::Inconsistent(format!(
                "the log dropped its entries up to index {marker_index} for a snapshot, \
                 but the newest snapshot is at index {snapshot_index}: that snapshot was lost"
            )));
        }
        if snapshot_index > marker_index {
            durable
                .wal
                .save_snapshot_marker(snapshot_index, snapshot_term)?;
        }
        // Entries at or below the snapshot are covered by it.
        let entries = recovered_log
            .entries
            .iter()
            .filter(|record| record.index > snapshot_index)
            .map(decode_entry)
            .collect::<Result<Vec<_>, _>>()
            .map_err(DurableError::Inconsistent)?;
        let recovered = Recovered {
            snapshot,
            hard_state: recovered_log.hard_state.map(to_raft_hard_state),
            entries,
        };
        Ok((durable, Some(recovered)))
    }
}

impl<D: Disk + Clone> DurableState<D> {
    /// Makes a founding member's initial state durable: the bootstrap snapshot
    /// at index 1 holding the founding configuration, so a restart does not
    /// depend on the command-line flags matching again.
    pub fn bootstrap(
        &mut self,
        members: Vec<MemberRecord>,
        cluster_id: u64,
    ) -> Result<Recovered, DurableError> {
        let snapshot = bootstrap_snapshot(members, cluster_id);
        self.save_snapshot(&snapshot)?;
        Ok(Recovered {
            snapshot,
            hard_state: None,
            entries: Vec::new(),
        })
    }

    /// Makes a restored backup the initial state of a new member (its
    /// bootstrap snapshot, built by `backup::restore`).
    pub fn install_restored(&mut self, snapshot: &Snapshot) -> Result<(), DurableError> {
        self.save_snapshot(snapshot)
    }

    /// Makes a Ready's `persist` durable, with one fsync for entries and hard state.
    pub fn persist(&mut self, persist: &Persist) -> Result<(), DurableError> {
        if let Some(snapshot) = &persist.snapshot {
            self.save_snapshot(snapshot)?;
        }
        if persist.entries.is_empty() && persist.hard_state.is_none() {
            return Ok(());
        }
        let hard_state = persist.hard_state.as_ref().map(|hard_state| HardState {
            term: hard_state.term,
            vote: hard_state.vote,
            commit: hard_state.commit,
        });
        // Only the commit index moved (raft-rs says no sync is needed): the
        // hard state rides on the next synced write.
        if !persist.must_sync {
            assert!(
                persist.entries.is_empty() && persist.snapshot.is_none(),
                "raft-rs asks for a sync whenever there are entries or a snapshot"
            );
            if let Some(hard_state) = hard_state {
                self.wal.record_hard_state_without_sync(hard_state)?;
                return Ok(());
            }
        }
        let entries: Vec<LogEntry> = persist.entries.iter().map(encode_entry).collect();
        self.wal.append(&entries, hard_state)?;
        Ok(())
    }

    /// A writer for this member's own snapshots, to run off the member loop.
    pub fn snapshot_writer(&self) -> SnapshotWriter<D> {
        SnapshotWriter {
            snapshots: Arc::clone(&self.snapshots),
        }
    }

    /// Records a durable own snapshot in the log (its marker) and releases the
    /// log behind it. A marker not newer than the log's (a snapshot received
    /// from the leader overtook this one) is skipped: markers only move forward.
    pub fn compact_log(&mut self, compaction: &LogCompaction) -> Result<(), DurableError> {
        let marker_index = self.wal.snapshot_marker().map_or(0, |marker| marker.index);
        if compaction.snapshot_index <= marker_index {
            return Ok(());
        }
        self.wal
            .save_snapshot_marker(compaction.snapshot_index, compaction.snapshot_term)?;
        self.wal.release_before(compaction.compact_index)?;
        Ok(())
    }

    /// [`DurableState::compact_log`] for a shell with a helper thread: records
    /// the marker here and returns the log segments to delete, which the helper
    /// deletes ([`ReleasedSegments::remove`]) so that the member loop never
    /// waits for it. `None` when there is nothing to delete.
    pub fn compact_log_detached(
        &mut self,
        compaction: &LogCompaction,
    ) -> Result<Option<ReleasedSegments<D>>, DurableError> {
        let marker_index = self.wal.snapshot_marker().map_or(0, |marker| marker.index);
        if compaction.snapshot_index <= marker_index {
            return Ok(None);
        }
        self.wal
            .save_snapshot_marker(compaction.snapshot_index, compaction.snapshot_term)?;
        let released = self.wal.detach_before(compaction.compact_index)?;
        Ok((!released.is_empty()).then_some(released))
    }

    fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), DurableError> {
        save_snapshot_file(&self.snapshots, snapshot)?;
        let metadata = snapshot.get_metadata();
        self.wal
            .save_snapshot_marker(metadata.index, metadata.term)?;
        Ok(())
    }

    /// The log's counters (fsyncs, bytes), for metrics and tests.
    pub fn wal_stats(&self) -> keel_storage::WalStats {
        self.wal.stats()
    }
}

/// Writes `snapshot` as a file, durably.
fn save_snapshot_file<D: Disk>(
    snapshots: &Mutex<SnapshotStore<D>>,
    snapshot: &Snapshot,
) -> Result<(), DurableError> {
    let metadata = snapshot.get_metadata();
    let metadata_bytes = metadata
        .write_to_bytes()
        .expect("encoding snapshot metadata cannot fail");
    snapshots
        .lock()
        .expect("a snapshot save panicked while holding the store")
        .save(
            metadata.index,
            metadata.term,
            &metadata_bytes,
            &snapshot.data,
        )?;
    Ok(())
}

/// A raft entry as a log record: the whole entry, protobuf-encoded, with its
/// index and term visible to the log for overwrite handling.
pub fn encode_entry(entry: &Entry) -> LogEntry {
    LogEntry {
        index: entry.index,
        term: entry.term,
        payload: entry
            .write_to_bytes()
            .expect("encoding a raft entry cannot fail"),
    }
}

/// The inverse of [`encode_entry`]. A record that passed its checksum but does
/// not decode, or disagrees with its own header, is reported with its index.
pub fn decode_entry(record: &LogEntry) -> Result<Entry, String> {
    let entry = Entry::parse_from_bytes(&record.payload)
        .map_err(|error| format!("log entry {} does not decode: {error}", record.index))?;
    if entry.index != record.index || entry.term != record.term {
        return Err(format!(
            "log record at index {} term {} holds entry {} term {}",
            record.index, record.term, entry.index, entry.term
        ));
    }
    Ok(entry)
}

fn to_raft_hard_state(hard_state: HardState) -> RaftHardState {
    RaftHardState {
        term: hard_state.term,
        vote: hard_state.vote,
        commit: hard_state.commit,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_storage::SimDisk;

    fn member(id: u64) -> MemberRecord {
        MemberRecord {
            id,
            name: format!("m{id}"),
            ..Default::default()
        }
    }

    #[test]
    fn fresh_disk_has_nothing_and_bootstrap_is_recovered() {
        let disk = SimDisk::new();
        let (mut durable, recovered) = DurableState::open(disk.clone()).unwrap();
        assert!(recovered.is_none());
        durable.bootstrap(vec![member(1), member(2)], 7).unwrap();
        drop(durable);
        let (_, recovered) = DurableState::open(disk).unwrap();
        let recovered = recovered.expect("bootstrap snapshot recovered");
        assert_eq!(recovered.snapshot.get_metadata().index, 1);
        assert_eq!(
            recovered.snapshot.get_metadata().get_conf_state().voters,
            vec![1, 2]
        );
    }

    #[test]
    fn entries_and_hard_state_round_trip_and_snapshot_cuts_the_log() {
        let disk = SimDisk::new();
        let (mut durable, _) = DurableState::open(disk.clone()).unwrap();
        durable.bootstrap(vec![member(1)], 7).unwrap();
        let entries: Vec<Entry> = (2..=10)
            .map(|index| Entry {
                index,
                term: 1,
                data: vec![index as u8].into(),
                ..Default::default()
            })
            .collect();
        durable
            .persist(&Persist {
                snapshot: None,
                entries,
                hard_state: Some(RaftHardState {
                    term: 1,
                    vote: 1,
                    commit: 10,
                    ..Default::default()
                }),
                must_sync: true,
            })
            .unwrap();
        // The writer runs off the member loop; the log learns of the snapshot
        // (and is released behind it) only afterwards.
        let capture = SnapshotCapture {
            metadata: SnapshotMetadata {
                index: 6,
                term: 1,
                ..Default::default()
            },
            state: crate::StateMachine::new(vec![member(1)], 7).capture(),
        };
        let written = durable.snapshot_writer().write(&capture).unwrap();
        assert_eq!(written.get_metadata().index, 6);
        durable
            .compact_log(&LogCompaction {
                snapshot_index: 6,
                snapshot_term: 1,
                compact_index: 4,
            })
            .unwrap();
        // A compaction behind an older snapshot (one a received snapshot
        // overtook) leaves the log's marker where it is.
        durable
            .compact_log(&LogCompaction {
                snapshot_index: 5,
                snapshot_term: 1,
                compact_index: 4,
            })
            .unwrap();
        drop(durable);
        let (_, recovered) = DurableState::open(disk).unwrap();
        let recovered = recovered.unwrap();
        assert_eq!(recovered.snapshot.get_metadata().index, 6);
        let indexes: Vec<u64> = recovered.entries.iter().map(|entry| entry.index).collect();
        assert_eq!(indexes, vec![7, 8, 9, 10]);
        assert_eq!(recovered.entries[0].data.as_ref(), &[7]);
        assert_eq!(recovered.hard_state.unwrap().commit, 10);
    }

    /// The server's way of compacting: the marker on the loop, the segments
    /// deleted later (by its snapshot thread); a restart in between recovers
    /// the same log.
    #[test]
    fn detached_compaction_recovers_the_same_log_before_and_after_the_deletion() {
        let disk = SimDisk::new();
        let (mut durable, _) = DurableState::open(disk.clone()).unwrap();
        durable.bootstrap(vec![member(1)], 7).unwrap();
        // Entries of 1 MiB fill the first 64 MiB segment at about index 64.
        let payload = bytes::Bytes::from(vec![7u8; 1024 * 1024]);
        for index in 2..=70 {
            durable
                .persist(&Persist {
                    snapshot: None,
                    entries: vec![Entry {
                        index,
                        term: 1,
                        data: payload.clone(),
                        ..Default::default()
                    }],
                    hard_state: None,
                    must_sync: true,
                })
                .unwrap();
        }
        let capture = SnapshotCapture {
            metadata: SnapshotMetadata {
                index: 68,
                term: 1,
                ..Default::default()
            },
            state: crate::StateMachine::new(vec![member(1)], 7).capture(),
        };
        durable.snapshot_writer().write(&capture).unwrap();
        let compaction = LogCompaction {
            snapshot_index: 68,
            snapshot_term: 1,
            compact_index: 67,
        };
        let released = durable
            .compact_log_detached(&compaction)
            .unwrap()
            .expect("the first segment is behind index 67");
        // Marked already: the same compaction again finds nothing to do.
        assert!(durable.compact_log_detached(&compaction).unwrap().is_none());
        let indexes = |disk: &SimDisk| {
            let (_, recovered) = DurableState::open(disk.clone()).unwrap();
            let recovered = recovered.unwrap();
            assert_eq!(recovered.snapshot.get_metadata().index, 68);
            recovered
                .entries
                .iter()
                .map(|entry| entry.index)
                .collect::<Vec<_>>()
        };
        assert_eq!(indexes(&disk), [69, 70], "before the deletion");
        released.remove().unwrap();
        assert_eq!(indexes(&disk), [69, 70], "after the deletion");
    }

    /// A hard state that only moves the commit index costs no fsync of its
    /// own: a crash may lose it (recovery falls back to the last synced one),
    /// and the next synced write makes it durable.
    #[test]
    fn a_commit_only_hard_state_waits_for_the_next_sync() {
        let disk = SimDisk::new();
        let (mut durable, _) = DurableState::open(disk.clone()).unwrap();
        durable.bootstrap(vec![member(1)], 7).unwrap();
        let entry = |index: u64| Entry {
            index,
            term: 1,
            data: vec![index as u8].into(),
            ..Default::default()
        };
        let hard_state = |commit: u64| RaftHardState {
            term: 1,
            vote: 1,
            commit,
            ..Default::default()
        };
        let persist = |entries: Vec<Entry>, commit: Option<u64>, must_sync: bool| Persist {
            snapshot: None,
            entries,
            hard_state: commit.map(hard_state),
            must_sync,
        };
        durable
            .persist(&persist(vec![entry(2), entry(3)], Some(2), true))
            .unwrap();
        let fsyncs = durable.wal_stats().fsyncs;
        durable
            .persist(&persist(Vec::new(), Some(3), false))
            .unwrap();
        assert_eq!(
            durable.wal_stats().fsyncs,
            fsyncs,
            "no fsync for a commit index"
        );
        drop(durable);
        let (mut durable, recovered) = DurableState::open(disk.clone()).unwrap();
        assert_eq!(recovered.unwrap().hard_state.unwrap().commit, 2);

        durable
            .persist(&persist(Vec::new(), Some(3), false))
            .unwrap();
        durable
            .persist(&persist(vec![entry(4)], None, true))
            .unwrap();
        drop(durable);
        let (_, recovered) = DurableState::open(disk).unwrap();
        assert_eq!(recovered.unwrap().hard_state.unwrap().commit, 3);
    }

    /// Simulator seed 910: a crash between saving a snapshot file and its
    /// marker in the log must not leave the log unable to take the entries
    /// after the snapshot.
    #[test]
    fn issue_3_seed_910_snapshot_whose_marker_was_lost_takes_later_entries() {
        let disk = SimDisk::new();
        let (mut durable, _) = DurableState::open(disk.clone()).unwrap();
        durable.bootstrap(vec![member(1)], 7).unwrap();
        let entries: Vec<Entry> = (2..=5)
            .map(|index| Entry {
                index,
                term: 1,
                ..Default::default()
            })
            .collect();
        durable
            .persist(&Persist {
                snapshot: None,
                entries,
                hard_state: None,
                must_sync: true,
            })
            .unwrap();
        drop(durable);
        // The snapshot file is durable, its marker in the log is not.
        let metadata = SnapshotMetadata {
            index: 20,
            term: 1,
            ..Default::default()
        };
        let snapshots = SnapshotStore::open(disk.clone(), SnapshotOptions::default()).unwrap();
        snapshots
            .save(
                20,
                1,
                &metadata.write_to_bytes().unwrap(),
                &bootstrap_snapshot(vec![member(1)], 7).data,
            )
            .unwrap();
        drop(snapshots);
        let (mut durable, recovered) = DurableState::open(disk.clone()).unwrap();
        assert_eq!(recovered.unwrap().snapshot.get_metadata().index, 20);
        let after: Vec<Entry> = (21..=23)
            .map(|index| Entry {
                index,
                term: 1,
                ..Default::default()
            })
            .collect();
        durable
            .persist(&Persist {
                snapshot: None,
                entries: after,
                hard_state: None,
                must_sync: true,
            })
            .unwrap();
        drop(durable);
        let (_, recovered) = DurableState::open(disk).unwrap();
        let indexes: Vec<u64> = recovered
            .unwrap()
            .entries
            .iter()
            .map(|entry| entry.index)
            .collect();
        assert_eq!(indexes, vec![21, 22, 23]);
    }
}
