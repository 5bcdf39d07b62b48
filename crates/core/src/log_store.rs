//! The in-memory copy of the Raft log that raft-rs reads through its `Storage`
//! trait.
//!
//! raft-rs asks its storage for entries synchronously, but `core` may not touch a
//! disk. So, as etcd does with its `MemoryStorage`, the core keeps every entry
//! since the newest snapshot (plus a tail kept for slow followers) in memory, and
//! the shell makes the same entries durable in the write-ahead log before they
//! count. On restart the shell replays the write-ahead log into a fresh
//! `LogStore`. Memory is bounded by the snapshot interval: every
//! `snapshot_count` applied entries the log is compacted behind a snapshot.

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};

/// The Raft log, hard state and newest snapshot, held in memory.
#[derive(Debug, Default)]
pub struct LogStore {
    hard_state: HardState,
    conf_state: ConfState,
    /// Metadata of the newest snapshot; entries start right after its index.
    snapshot_metadata: SnapshotMetadata,
    /// The state machine image of that snapshot; `Bytes` is reference
    /// counted, so handing it to raft-rs for a lagging follower copies nothing.
    snapshot_data: bytes::Bytes,
    /// `entries[i]` has index `snapshot_metadata.index + 1 + i` after the
    /// entries compacted behind the snapshot are accounted for by `first_index`.
    entries: Vec<Entry>,
    /// Set when raft-rs asked for a snapshot we could not give (too old, or its
    /// configuration does not include the recipient yet); the node then makes
    /// a fresh one. A `Cell` because raft-rs asks through `&self`.
    snapshot_wanted: std::cell::Cell<bool>,
    /// Set from [`LogStore::release_snapshot_image`] until the next snapshot is
    /// installed: raft-rs is then told the snapshot is temporarily unavailable,
    /// never handed metadata without its image.
    snapshot_image_released: bool,
}

impl LogStore {
    /// A log that starts at the given snapshot (index 1 for a new cluster, whose
    /// "snapshot" is just the initial configuration).
    pub fn from_snapshot(metadata: SnapshotMetadata, data: bytes::Bytes) -> LogStore {
        let conf_state = metadata.get_conf_state().clone();
        let hard_state = HardState {
            term: metadata.term,
            commit: metadata.index,
            ..Default::default()
        };
        LogStore {
            hard_state,
            conf_state,
            snapshot_metadata: metadata,
            snapshot_data: data,
            entries: Vec::new(),
            snapshot_wanted: std::cell::Cell::new(false),
            snapshot_image_released: false,
        }
    }

    /// True (once) when raft-rs wanted a newer snapshot than we have.
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.replace(false)
    }

    /// The index of the first entry still held (entries before it are in the snapshot).
    pub fn first_index(&self) -> u64 {
        match self.entries.first() {
            Some(entry) => entry.index,
            None => self.snapshot_metadata.index + 1,
        }
    }

    /// The index of the last entry held, or of the snapshot if no entry follows it.
    pub fn last_index(&self) -> u64 {
        match self.entries.last() {
            Some(entry) => entry.index,
            None => self.snapshot_metadata.index,
        }
    }

    /// The newest snapshot's metadata.
    pub fn snapshot_metadata(&self) -> &SnapshotMetadata {
        &self.snapshot_metadata
    }

    /// The current hard state (term, vote, commit).
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Records a new hard state that the shell is persisting in the same batch.
    pub fn set_hard_state(&mut self, hard_state: HardState) {
        self.hard_state = hard_state;
    }

    /// Records only a new commit index (raft-rs reports commit advances on their own).
    pub fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    /// Records the configuration in force after a configuration change was applied.
    pub fn set_conf_state(&mut self, conf_state: ConfState) {
        self.conf_state = conf_state;
    }

    /// Appends entries, replacing any existing suffix they conflict with (§5.3: a
    /// follower's conflicting entries are overwritten by the leader's).
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        assert!(
            first.index >= self.first_index(),
            "append at index {} overwrites compacted entries (first index {})",
            first.index,
            self.first_index()
        );
        assert!(
            first.index <= self.last_index() + 1,
            "append at index {} leaves a gap after last index {}",
            first.index,
            self.last_index()
        );
        let keep = (first.index - self.first_index()) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
    }

    /// Installs a snapshot received from the leader: the log restarts after it.
    pub fn apply_snapshot(&mut self, snapshot: &Snapshot) {
        let metadata = snapshot.get_metadata().clone();
        self.hard_state.term = self.hard_state.term.max(metadata.term);
        self.hard_state.commit = metadata.index;
        self.conf_state = metadata.get_conf_state().clone();
        self.snapshot_data = snapshot.data.clone();
        self.snapshot_image_released = false;
        self.snapshot_metadata = metadata;
        self.entries.clear();
    }

    /// Records a snapshot this member made of its own state machine, and drops
    /// log entries before `compact_index` (exclusive).
    pub fn install_own_snapshot(
        &mut self,
        metadata: SnapshotMetadata,
        data: bytes::Bytes,
        compact_index: u64,
    ) {
        assert!(
            metadata.index <= self.last_index(),
            "snapshot at {} is beyond the log's last index {}",
            metadata.index,
            self.last_index()
        );
        assert!(
            compact_index <= metadata.index + 1,
            "compaction to {} would drop entries after the snapshot at {}",
            compact_index,
            metadata.index
        );
        self.compact(compact_index);
        // The snapshot may be older than entries we keep: keep those entries,
        // the snapshot only has to cover everything compacted away.
        self.snapshot_metadata = metadata;
        self.snapshot_data = data;
        self.snapshot_image_released = false;
    }

    /// Drops entries with index below `compact_index`.
    fn compact(&mut self, compact_index: u64) {
        if compact_index <= self.first_index() {
            return;
        }
        let drop_count = (compact_index - self.first_index()) as usize;
        let drop_count = drop_count.min(self.entries.len());
        self.entries.drain(..drop_count);
    }

    /// Lets go of the snapshot image when the next one is being made, so that
    /// encoding it does not need room for two. Until
    /// [`LogStore::install_own_snapshot`] (or a received snapshot) brings an
    /// image back, raft-rs is told the snapshot is temporarily unavailable.
    pub fn release_snapshot_image(&mut self) {
        self.snapshot_data = bytes::Bytes::new();
        self.snapshot_image_released = true;
    }

    /// The whole snapshot (metadata and data) as raft-rs sends it to a follower.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(self.snapshot_metadata.clone());
        snapshot.data = self.snapshot_data.clone();
        snapshot
    }

    /// Entries in `[low, high)`, for replay and tests.
    pub fn entries_between(&self, low: u64, high: u64) -> Vec<Entry> {
        let first = self.first_index();
        let low = low.max(first);
        if low >= high {
            return Vec::new();
        }
        self.entries[(low - first) as usize..(high - first) as usize].to_vec()
    }
}

impl raft::Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        assert!(
            high <= self.last_index() + 1,
            "entries requested up to {} beyond last index {}",
            high,
            self.last_index()
        );
        let first = self.first_index();
        let mut entries = self.entries[(low - first) as usize..(high - first) as usize].to_vec();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index == self.snapshot_metadata.index {
            return Ok(self.snapshot_metadata.term);
        }
        let first = self.first_index();
        if index < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if index > self.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(index - first) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(LogStore::first_index(self))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(LogStore::last_index(self))
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        // Our snapshot always covers every compacted entry, so it is never too
        // old for a follower that needs entries we no longer hold. But a member
        // added after it is not in its configuration, and raft-rs on the
        // recipient refuses such a snapshot: ask for a fresh one and let
        // raft-rs retry.
        let conf_state = self.snapshot_metadata.get_conf_state();
        let includes_recipient = conf_state.voters.contains(&to)
            || conf_state.learners.contains(&to)
            || conf_state.voters_outgoing.contains(&to)
            || conf_state.learners_next.contains(&to);
        if self.snapshot_metadata.index < request_index || !includes_recipient {
            self.snapshot_wanted.set(true);
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        if self.snapshot_image_released {
            // A fresh snapshot is being written off the member loop; raft-rs
            // retries when the follower is probed again.
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    #[test]
    fn append_overwrites_conflicting_suffix() {
        let mut log = LogStore::default();
        log.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]);
        log.append(&[entry(2, 2)]);
        assert_eq!(log.last_index(), 2);
        assert_eq!(log.term(2).unwrap(), 2);
        assert_eq!(log.term(1).unwrap(), 1);
        assert!(matches!(
            log.term(3),
            Err(raft::Error::Store(StorageError::Unavailable))
        ));
    }

    #[test]
    fn own_snapshot_compacts_and_keeps_term_of_snapshot_index() {
        let mut log = LogStore::default();
        log.append(&(1..=10).map(|index| entry(index, 1)).collect::<Vec<_>>());
        let metadata = SnapshotMetadata {
            index: 8,
            term: 1,
            ..Default::default()
        };
        log.install_own_snapshot(metadata, bytes::Bytes::from_static(&[1, 2, 3]), 6);
        assert_eq!(LogStore::first_index(&log), 6);
        assert_eq!(LogStore::last_index(&log), 10);
        assert!(matches!(
            log.entries(5, 7, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!(
            log.entries(6, 11, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            5
        );
        // The snapshot's configuration does not include member 2 yet: raft-rs
        // must wait for a fresh one, and the node is asked to make it.
        assert!(matches!(
            raft::Storage::snapshot(&log, 0, 2),
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable
            ))
        ));
        assert!(log.take_snapshot_wanted());
        assert!(!log.take_snapshot_wanted(), "asked for once");
        let mut metadata = log.snapshot_metadata().clone();
        metadata.mut_conf_state().voters = vec![1, 2];
        log.install_own_snapshot(metadata, bytes::Bytes::from_static(&[1, 2, 3]), 6);
        assert_eq!(
            raft::Storage::snapshot(&log, 0, 2).unwrap().data.as_ref(),
            &[1, 2, 3]
        );
    }

    #[test]
    fn received_snapshot_resets_the_log() {
        let mut log = LogStore::default();
        log.append(&[entry(1, 1), entry(2, 1)]);
        let mut snapshot = Snapshot::default();
        snapshot.mut_metadata().index = 20;
        snapshot.mut_metadata().term = 3;
        log.apply_snapshot(&snapshot);
        assert_eq!(LogStore::first_index(&log), 21);
        assert_eq!(LogStore::last_index(&log), 20);
        assert_eq!(log.term(20).unwrap(), 3);
        assert_eq!(log.hard_state().commit, 20);
    }
}
