//! The write-ahead log: a directory of append-only segment files holding log entries, hard
//! states and snapshot markers, like etcd's WAL.
//!
//! Why our own log rather than a library: the simulator must own every byte of I/O so that it
//! can crash, tear and fail the log deterministically (DESIGN.md, storage).
//!
//! Layout. Segments are `{directory}/{sequence:016x}-{first_index:016x}.wal`, sequence numbers
//! consecutive from the oldest kept segment; `first_index` is the index the log expected next
//! when the segment was started (informational: an overwrite can later append lower indexes).
//! Records are described in `record.rs`. A segment is closed (fsynced, never written again)
//! before the next is started, and a new record goes into a new segment when it would take the
//! current one past `segment_bytes_max`. Each new segment starts with a copy of the current
//! snapshot marker and hard state, so that deleting older segments never loses them.
//!
//! Replay applies Raft's rules to what it reads, in order:
//! - an entry at index `i` replaces every entry at `i` and after (Raft overwrites a conflicting
//!   suffix by appending again, §5.3);
//! - a snapshot marker at index `s` drops the entries at `s` and before; entries after `s` stay,
//!   as in etcd (they are uncommitted entries Raft will check against the leader);
//! - the last hard state wins.
//!
//! Damage. A torn tail (damage in the last segment with no valid record anywhere after it:
//! an incomplete record, garbled last bytes, a zero-filled extension) is what a crash during an
//! append leaves, so it is truncated with a warning. Anything else that fails its checksum is
//! corruption and fails `open`: never skip data silently, since data that was fsynced may have
//! been acknowledged to the cluster. The price of that rule: a crash that persisted a later
//! record of the last batch but not an earlier one (a disk reordering sectors) is reported as
//! corruption, and the member is rebuilt from its peers rather than trusted.

use std::path::{Path, PathBuf};

use crate::disk::{parent_directory, Disk, DiskFile};
use crate::error::StorageError;
use crate::record::{self, DecodeError, Record, RecordRef, RECORD_BYTES_MIN};

/// Hard-state records kept unwritten by [`Wal::record_hard_state_without_sync`]
/// before they are written and fsynced anyway (a member that only ever moves its
/// commit index must not buffer without bound).
const UNSYNCED_BUFFER_BYTES_MAX: usize = 64 * 1024;

/// One Raft log entry, stored as an opaque payload with its index and term visible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Position in the log, from 1.
    pub index: u64,
    /// Term of the leader that created the entry.
    pub term: u64,
    /// The encoded entry, opaque to storage.
    pub payload: Vec<u8>,
}

/// Raft's persistent state besides the log (§5, Figure 2): current term, vote, commit index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HardState {
    /// The latest term this member has seen.
    pub term: u64,
    /// The member voted for in `term`, or 0 for none.
    pub vote: u64,
    /// The highest index known to be committed.
    pub commit: u64,
}

/// The log position a snapshot covers: entries up to and including `index` live in the
/// snapshot, not in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotMarker {
    /// Index of the last entry the snapshot covers.
    pub index: u64,
    /// Term of that entry.
    pub term: u64,
}

/// Configuration of a [`Wal`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalOptions {
    /// Directory of the segments, relative to the disk root.
    pub directory: PathBuf,
    /// A record goes into a new segment if it would take the current one past this size. A
    /// single record larger than this still gets a segment of its own.
    pub segment_bytes_max: u64,
    /// Largest encoded record, header included; larger appends are refused and larger records
    /// read back are corruption. At most `u32::MAX`.
    pub record_bytes_max: u64,
}

impl Default for WalOptions {
    fn default() -> WalOptions {
        WalOptions {
            directory: PathBuf::from("wal"),
            segment_bytes_max: 64 * 1024 * 1024,
            record_bytes_max: 16 * 1024 * 1024,
        }
    }
}

impl WalOptions {
    fn validate(&self) -> Result<(), StorageError> {
        let invalid = |reason: String| Err(StorageError::InvalidOptions { reason });
        if self.record_bytes_max < RECORD_BYTES_MIN as u64 {
            return invalid(format!(
                "record_bytes_max {} is below the smallest record, {RECORD_BYTES_MIN} bytes",
                self.record_bytes_max
            ));
        }
        if self.record_bytes_max > u64::from(u32::MAX) {
            return invalid(format!(
                "record_bytes_max {} exceeds the format's limit of {} bytes",
                self.record_bytes_max,
                u32::MAX
            ));
        }
        if self.segment_bytes_max == 0 {
            return invalid("segment_bytes_max is zero".to_owned());
        }
        if self.directory.as_os_str().is_empty() || self.directory.is_absolute() {
            return invalid(format!(
                "directory {:?} must be a non-empty relative path",
                self.directory
            ));
        }
        Ok(())
    }
}

/// What [`Wal::open`] found on disk.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovered {
    /// The last hard state written, if any.
    pub hard_state: Option<HardState>,
    /// The newest snapshot marker, if any; `entries` follow it.
    pub snapshot_marker: Option<SnapshotMarker>,
    /// The log after the snapshot marker, contiguous, with overwritten suffixes applied.
    pub entries: Vec<LogEntry>,
    /// The torn tail that was cut off the last segment, if there was one.
    pub truncated_tail: Option<TruncatedTail>,
}

/// A torn tail removed by [`Wal::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruncatedTail {
    /// The segment, relative to the disk root.
    pub file: String,
    /// Where the torn record started; the segment now ends here.
    pub offset: u64,
    /// How many bytes were cut.
    pub bytes_removed: u64,
    /// What was wrong with the torn record.
    pub reason: String,
}

/// Counters for metrics, since the [`Wal`] was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WalStats {
    /// Successful fsyncs of segments and of the directory.
    pub fsyncs: u64,
    /// Bytes appended to segments.
    pub bytes_written: u64,
    /// Segments started.
    pub segments_created: u64,
    /// Segments deleted by [`Wal::release_before`].
    pub segments_removed: u64,
}

/// A segment file the log knows about.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    sequence: u64,
    first_index: u64,
    /// Highest entry index physically in the segment (superseded entries included), which
    /// decides when it may be deleted.
    entry_index_max: Option<u64>,
}

impl Segment {
    fn file_name(&self) -> String {
        format!("{:016x}-{:016x}.wal", self.sequence, self.first_index)
    }
}

/// Parses `{sequence:016x}-{first_index:016x}.wal`, or `None` for any other name.
fn parse_segment_name(name: &str) -> Option<Segment> {
    let stem = name.strip_suffix(".wal")?;
    let (sequence, first_index) = stem.split_once('-')?;
    let parse = |hex: &str| {
        let well_formed = hex.len() == 16 && hex.bytes().all(|byte| byte.is_ascii_hexdigit());
        well_formed
            .then(|| u64::from_str_radix(hex, 16).ok())
            .flatten()
    };
    Some(Segment {
        sequence: parse(sequence)?,
        first_index: parse(first_index)?,
        entry_index_max: None,
    })
}

/// The segmented write-ahead log; see the module documentation.
///
/// Failure model: any I/O error while writing (an append, an fsync, a segment creation or
/// deletion) poisons the log, and every later write returns [`StorageError::Poisoned`]. Retrying
/// is not safe: after a failed fsync Linux may have dropped the dirty pages and a retried fsync
/// would report success for data that is gone (PostgreSQL's "fsyncgate", 2018). The caller must
/// treat the member as failed and restart it; on restart, entries after the last successful
/// fsync must be presumed lost, which Raft tolerates because they were never acknowledged.
pub struct Wal<D: Disk> {
    disk: D,
    options: WalOptions,
    /// Oldest first; never empty; the last one is open for appending.
    segments: Vec<Segment>,
    /// The last segment, open for appending.
    file: D::File,
    /// Bytes in the last segment, written to the file (not counting `buffer`).
    segment_bytes: u64,
    /// Bytes of the last segment known durable: its length at its last successful fsync.
    segment_synced_bytes: u64,
    /// Bytes of copied snapshot marker and hard state at the start of the last segment: a
    /// segment holding only these is not worth closing.
    segment_header_bytes: u64,
    /// Index of the last entry, or of the snapshot marker if no entries follow it, or 0.
    last_index: u64,
    hard_state: Option<HardState>,
    snapshot_marker: Option<SnapshotMarker>,
    /// Why the log refuses writes, after an I/O error.
    poisoned: Option<String>,
    stats: WalStats,
    /// Records encoded but not yet written, so that a batch is one write call.
    buffer: Vec<u8>,
}

impl<D: Disk> std::fmt::Debug for Wal<D> {
    // Written by hand so that `Wal<D>` is `Debug` whatever the disk is.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Wal")
            .field("options", &self.options)
            .field("segments", &self.segments)
            .field("segment_bytes", &self.segment_bytes)
            .field("last_index", &self.last_index)
            .field("hard_state", &self.hard_state)
            .field("snapshot_marker", &self.snapshot_marker)
            .field("poisoned", &self.poisoned)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<D: Disk> Wal<D> {
    /// Opens the log in `options.directory`, creating it if needed, and replays it.
    ///
    /// A torn tail of the last segment is truncated (and reported in
    /// [`Recovered::truncated_tail`] and by a warning); any other damage is
    /// [`StorageError::Corrupt`].
    pub fn open(disk: D, options: WalOptions) -> Result<(Wal<D>, Recovered), StorageError> {
        options.validate()?;
        let directory = options.directory.clone();
        let directory_name = directory.display().to_string();
        disk.create_directory_all(&directory)
            .map_err(|source| StorageError::io(format!("creating {directory_name}"), source))?;
        disk.sync_directory(parent_directory(&directory))
            .map_err(|source| StorageError::FsyncFailed {
                file: format!("parent directory of {directory_name}"),
                source,
            })?;
        // Segment names created or removed just before a failed directory fsync may be
        // visible without being durable: make them durable before trusting them.
        disk.sync_directory(&directory)
            .map_err(|source| StorageError::FsyncFailed {
                file: directory_name.clone(),
                source,
            })?;
        let mut stats = WalStats {
            fsyncs: 1,
            ..WalStats::default()
        };

        let mut segments = list_segments(&disk, &directory)?;
        let SegmentsReplayed {
            replay,
            last_segment_bytes,
            truncated_tail,
        } = replay_segments(&disk, &directory, &mut segments, &options)?;

        let last_index = replay
            .entries
            .last()
            .map(|entry| entry.index)
            .or(replay.snapshot_marker.map(|marker| marker.index))
            .unwrap_or(0);
        if segments.is_empty() {
            segments.push(Segment {
                sequence: 0,
                first_index: last_index + 1,
                entry_index_max: None,
            });
            stats.segments_created += 1;
        }
        let last_segment = segments.last().expect("at least one segment");
        let path = directory.join(last_segment.file_name());
        let file_name = path.display().to_string();
        let mut file = disk
            .open_append(&path)
            .map_err(|source| StorageError::io(format!("opening {file_name}"), source))?;
        if stats.segments_created > 0 {
            disk.sync_directory(&directory)
                .map_err(|source| StorageError::FsyncFailed {
                    file: directory_name.clone(),
                    source,
                })?;
            stats.fsyncs += 1;
        }
        if let Some(torn) = &truncated_tail {
            file.truncate(torn.offset).map_err(|source| {
                StorageError::io(format!("truncating {file_name} to {}", torn.offset), source)
            })?;
            file.sync().map_err(|source| StorageError::FsyncFailed {
                file: file_name.clone(),
                source,
            })?;
            stats.fsyncs += 1;
        }

        let wal = Wal {
            disk,
            options,
            segments,
            file,
            segment_bytes: last_segment_bytes,
            segment_synced_bytes: last_segment_bytes,
            segment_header_bytes: 0,
            last_index,
            hard_state: replay.hard_state,
            snapshot_marker: replay.snapshot_marker,
            poisoned: None,
            stats,
            buffer: Vec::new(),
        };
        wal.check_invariants();
        let recovered = Recovered {
            hard_state: replay.hard_state,
            snapshot_marker: replay.snapshot_marker,
            entries: replay.entries,
            truncated_tail,
        };
        Ok((wal, recovered))
    }

    /// Appends `entries` and then `hard_state`, and returns after one fsync made them durable
    /// (more only when a segment fills up). Batch many proposals into one call: the fsync is the
    /// cost (DESIGN.md measures 2–5k fsyncs/s).
    ///
    /// `entries` must be contiguous, start after the snapshot marker and at most one past the
    /// last index; starting at or below the last index overwrites that suffix (§5.3). Violations
    /// are bugs in the caller and panic. A record over `record_bytes_max` is refused with
    /// [`StorageError::RecordTooLarge`] before anything is written. Any I/O error poisons the
    /// log (see [`Wal`]).
    pub fn append(
        &mut self,
        entries: &[LogEntry],
        hard_state: Option<HardState>,
    ) -> Result<(), StorageError> {
        self.check_writable()?;
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        self.assert_appendable(entries);
        for entry in entries {
            let record_bytes = RecordRef::Entry(entry).encoded_bytes() as u64;
            if record_bytes > self.options.record_bytes_max {
                return Err(StorageError::RecordTooLarge {
                    bytes: record_bytes,
                    limit: self.options.record_bytes_max,
                });
            }
        }
        let result = self.write_batch(entries, hard_state);
        self.poison_on_error(result)?;
        self.check_invariants();
        Ok(())
    }

    /// Records a hard state whose term and vote did not change (only the commit
    /// index moved) without an fsync of its own: it is written and made durable
    /// with the next append or marker. A commit index needs no fsync (raft-rs's
    /// `Ready::must_sync`): after a crash the member relearns it from the
    /// leader, and recovery clamps it to the snapshot. Waiting for an fsync
    /// here put a second, sequential fsync on every write's path.
    pub fn record_hard_state_without_sync(
        &mut self,
        hard_state: HardState,
    ) -> Result<(), StorageError> {
        self.check_writable()?;
        let result = self.write_record(RecordRef::HardState(&hard_state));
        self.poison_on_error(result)?;
        self.hard_state = Some(hard_state);
        if self.buffer.len() > UNSYNCED_BUFFER_BYTES_MAX {
            let result = self.flush_and_sync();
            self.poison_on_error(result)?;
        }
        Ok(())
    }

    /// Durably records that a snapshot covering the log through `index` (whose entry has `term`)
    /// is saved, so replay drops entries at `index` and before. Save the snapshot itself first
    /// ([`crate::SnapshotStore::save`]). Marker indexes must not decrease (a bug otherwise).
    pub fn save_snapshot_marker(&mut self, index: u64, term: u64) -> Result<(), StorageError> {
        self.check_writable()?;
        if let Some(current) = self.snapshot_marker {
            assert!(
                index >= current.index,
                "snapshot marker {index} is older than the saved marker {}",
                current.index
            );
        }
        let marker = SnapshotMarker { index, term };
        let result = self
            .write_record(RecordRef::SnapshotMarker(&marker))
            .and_then(|()| self.flush_and_sync());
        self.poison_on_error(result)?;
        self.snapshot_marker = Some(marker);
        // Entries after the marker stay; if there are none, the log now ends at the marker.
        self.last_index = self.last_index.max(index);
        self.check_invariants();
        Ok(())
    }

    /// Deletes the oldest segments all of whose entries are at or below `index`, stopping at the
    /// first segment that holds a later entry; the segment being written is never deleted.
    /// Returns how many were deleted. `index` must not exceed the saved snapshot marker's index
    /// (a bug otherwise), so the entries deleted are all in a durable snapshot.
    ///
    /// Only a prefix is deleted, oldest first, with a directory fsync after each: a crash midway
    /// leaves consecutive segments, and an older segment never outlives a newer one whose
    /// entries overwrote its own.
    pub fn release_before(&mut self, index: u64) -> Result<usize, StorageError> {
        let paths = self.detach_paths_before(index)?;
        let removed = paths.len();
        let mut result = Ok(());
        for path in &paths {
            result = self.remove_segment(path);
            if result.is_err() {
                break;
            }
        }
        self.poison_on_error(result)?;
        Ok(removed)
    }

    /// The first half of [`Wal::release_before`]: forgets the segments it would delete and
    /// returns them, to be deleted by [`ReleasedSegments::remove`], which may run on another
    /// thread (deleting a 64 MiB file and fsyncing the directory after it takes tens of
    /// milliseconds that the member loop should not wait). Until they are deleted the log
    /// goes on without them: a crash first leaves them on disk behind the snapshot marker,
    /// the same state as a crash between saving the marker and releasing, which
    /// [`Wal::open`] reads back as usual.
    pub fn detach_before(&mut self, index: u64) -> Result<ReleasedSegments<D>, StorageError>
    where
        D: Clone,
    {
        let paths = self.detach_paths_before(index)?;
        Ok(ReleasedSegments {
            disk: self.disk.clone(),
            directory: self.options.directory.clone(),
            paths,
        })
    }

    fn detach_paths_before(&mut self, index: u64) -> Result<Vec<PathBuf>, StorageError> {
        self.check_writable()?;
        let marker_index = self.snapshot_marker.map(|marker| marker.index);
        assert!(
            marker_index.is_some_and(|marker_index| index <= marker_index),
            "release_before({index}) beyond the durable snapshot marker {marker_index:?}"
        );
        let mut paths = Vec::new();
        while self.segments.len() > 1 {
            let oldest = &self.segments[0];
            if oldest
                .entry_index_max
                .is_some_and(|entry_index| entry_index > index)
            {
                break;
            }
            paths.push(self.options.directory.join(oldest.file_name()));
            self.segments.remove(0);
            self.stats.segments_removed += 1;
        }
        self.check_invariants();
        Ok(paths)
    }

    /// Index of the last entry, or of the snapshot marker when no entry follows it, or 0.
    pub fn last_index(&self) -> u64 {
        self.last_index
    }

    /// The last hard state written.
    pub fn hard_state(&self) -> Option<HardState> {
        self.hard_state
    }

    /// The newest snapshot marker written.
    pub fn snapshot_marker(&self) -> Option<SnapshotMarker> {
        self.snapshot_marker
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Counters since open.
    pub fn stats(&self) -> WalStats {
        self.stats
    }

    /// Whether an I/O error made the log refuse writes.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// Asserts what must hold between operations. Cheap (segments are few), so always on.
    fn check_invariants(&self) {
        assert!(
            !self.segments.is_empty(),
            "the log always has a segment to write"
        );
        for pair in self.segments.windows(2) {
            assert_eq!(
                pair[1].sequence,
                pair[0].sequence + 1,
                "segment sequences are consecutive"
            );
        }
        if let Some(marker) = self.snapshot_marker {
            assert!(
                self.last_index >= marker.index,
                "the log ends at {} before its snapshot marker {}",
                self.last_index,
                marker.index
            );
        }
        assert!(
            self.buffer.is_empty(),
            "every operation writes what it encodes"
        );
    }

    fn check_writable(&self) -> Result<(), StorageError> {
        match &self.poisoned {
            Some(reason) => Err(StorageError::Poisoned {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn poison_on_error<T>(&mut self, result: Result<T, StorageError>) -> Result<T, StorageError> {
        if let Err(error) = &result {
            tracing::error!(%error, "write-ahead log poisoned");
            self.poisoned = Some(error.to_string());
            self.buffer.clear();
        }
        result
    }

    fn assert_appendable(&self, entries: &[LogEntry]) {
        let Some(first) = entries.first() else {
            return;
        };
        let marker_index = self.snapshot_marker.map_or(0, |marker| marker.index);
        assert!(
            first.index > marker_index,
            "appending entry {} at or below the snapshot marker {marker_index}",
            first.index
        );
        assert!(
            first.index <= self.last_index + 1,
            "appending entry {} leaves a gap after the last index {}",
            first.index,
            self.last_index
        );
        for pair in entries.windows(2) {
            assert_eq!(
                pair[1].index,
                pair[0].index + 1,
                "entries in a batch must be contiguous"
            );
        }
    }

    fn write_batch(
        &mut self,
        entries: &[LogEntry],
        hard_state: Option<HardState>,
    ) -> Result<(), StorageError> {
        for entry in entries {
            self.write_record(RecordRef::Entry(entry))?;
            let segment = self.segments.last_mut().expect("at least one segment");
            segment.entry_index_max = segment.entry_index_max.max(Some(entry.index));
            self.last_index = entry.index;
        }
        if let Some(hard_state) = hard_state {
            self.write_record(RecordRef::HardState(&hard_state))?;
            self.hard_state = Some(hard_state);
        }
        self.flush_and_sync()
    }

    /// Encodes `record` into the buffer, first closing the segment if the record would take it
    /// past `segment_bytes_max`.
    fn write_record(&mut self, record: RecordRef<'_>) -> Result<(), StorageError> {
        let record_bytes = record.encoded_bytes() as u64;
        let segment_bytes = self.segment_bytes + self.buffer.len() as u64;
        let segment_full = segment_bytes + record_bytes > self.options.segment_bytes_max;
        if segment_full && segment_bytes > self.segment_header_bytes {
            let first_index = match record {
                RecordRef::Entry(entry) => entry.index,
                RecordRef::HardState(_) | RecordRef::SnapshotMarker(_) => self.last_index + 1,
            };
            self.start_segment(first_index)?;
        }
        record.encode_into(&mut self.buffer);
        Ok(())
    }

    /// Closes the current segment (everything in it fsynced) and starts the next, durably
    /// created, with copies of the snapshot marker and hard state at its start.
    fn start_segment(&mut self, first_index: u64) -> Result<(), StorageError> {
        self.flush_and_sync()?;
        let previous = self.segments.last().expect("at least one segment");
        let segment = Segment {
            sequence: previous.sequence + 1,
            first_index,
            entry_index_max: None,
        };
        let path = self.options.directory.join(segment.file_name());
        let file_name = path.display().to_string();
        self.file = self
            .disk
            .open_append(&path)
            .map_err(|source| StorageError::io(format!("creating {file_name}"), source))?;
        self.sync_directory()?;
        self.segments.push(segment);
        self.segment_bytes = 0;
        self.segment_synced_bytes = 0;
        self.stats.segments_created += 1;
        tracing::debug!(file = %file_name, "started write-ahead log segment");

        debug_assert!(self.buffer.is_empty(), "flushed before starting a segment");
        if let Some(marker) = self.snapshot_marker {
            RecordRef::SnapshotMarker(&marker).encode_into(&mut self.buffer);
        }
        if let Some(hard_state) = self.hard_state {
            RecordRef::HardState(&hard_state).encode_into(&mut self.buffer);
        }
        self.segment_header_bytes = self.buffer.len() as u64;
        Ok(())
    }

    fn flush_and_sync(&mut self) -> Result<(), StorageError> {
        if !self.buffer.is_empty() {
            self.file.append(&self.buffer).map_err(|source| {
                StorageError::io(format!("appending to {}", self.current_file_name()), source)
            })?;
            self.stats.bytes_written += self.buffer.len() as u64;
            self.segment_bytes += self.buffer.len() as u64;
            self.buffer.clear();
        }
        if let Err(source) = self.file.sync() {
            // Linux marks the pages whose write-back failed clean: they stay readable
            // but never reach the disk. Cut them off, so that a restart of this process
            // cannot read back (and acknowledge) a batch that is not durable, and a later
            // successful fsync cannot leave a hole in the middle of the segment.
            let _ = self.file.truncate(self.segment_synced_bytes);
            self.segment_bytes = self.segment_synced_bytes;
            return Err(StorageError::FsyncFailed {
                file: self.current_file_name(),
                source,
            });
        }
        self.segment_synced_bytes = self.segment_bytes;
        self.stats.fsyncs += 1;
        Ok(())
    }

    fn remove_segment(&mut self, path: &Path) -> Result<(), StorageError> {
        remove_segment_file(&self.disk, &self.options.directory, path)?;
        self.stats.fsyncs += 1;
        Ok(())
    }

    fn sync_directory(&mut self) -> Result<(), StorageError> {
        self.disk
            .sync_directory(&self.options.directory)
            .map_err(|source| StorageError::FsyncFailed {
                file: self.options.directory.display().to_string(),
                source,
            })?;
        self.stats.fsyncs += 1;
        Ok(())
    }

    fn current_file_name(&self) -> String {
        let segment = self.segments.last().expect("at least one segment");
        self.options
            .directory
            .join(segment.file_name())
            .display()
            .to_string()
    }
}

/// Deletes one segment and makes its deletion durable.
fn remove_segment_file<D: Disk>(
    disk: &D,
    directory: &Path,
    path: &Path,
) -> Result<(), StorageError> {
    disk.remove_file(path)
        .map_err(|source| StorageError::io(format!("removing {}", path.display()), source))?;
    tracing::debug!(file = %path.display(), "removed write-ahead log segment");
    disk.sync_directory(directory)
        .map_err(|source| StorageError::FsyncFailed {
            file: directory.display().to_string(),
            source,
        })
}

/// Segments behind a durable snapshot that the log no longer reads, from
/// [`Wal::detach_before`], waiting to be deleted.
#[derive(Debug)]
#[must_use = "the segments stay on disk until removed"]
pub struct ReleasedSegments<D: Disk> {
    disk: D,
    directory: PathBuf,
    /// Oldest first.
    paths: Vec<PathBuf>,
}

impl<D: Disk> ReleasedSegments<D> {
    /// How many segments there are.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// True when there is nothing to delete.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Deletes the segments oldest first, with a directory fsync after each, and stops at the
    /// first error: what is left on disk is then still a run of consecutive segments, which
    /// [`Wal::open`] accepts. An error must stop the member like any log error.
    pub fn remove(self) -> Result<(), StorageError> {
        for path in &self.paths {
            remove_segment_file(&self.disk, &self.directory, path)?;
        }
        Ok(())
    }
}

/// The segments in `directory`, oldest first, checked to be consecutive.
fn list_segments<D: Disk>(disk: &D, directory: &Path) -> Result<Vec<Segment>, StorageError> {
    let names = disk
        .list_directory(directory)
        .map_err(|source| StorageError::io(format!("listing {}", directory.display()), source))?;
    let mut segments = Vec::new();
    for name in names {
        let file = directory.join(&name).display().to_string();
        if !name.ends_with(".wal") {
            tracing::warn!(
                file = %file,
                "ignoring unexpected file in the write-ahead log directory"
            );
            continue;
        }
        let segment = parse_segment_name(&name).ok_or_else(|| StorageError::Corrupt {
            file: file.clone(),
            offset: 0,
            reason: "segment file name is not {sequence:016x}-{first_index:016x}.wal".to_owned(),
        })?;
        segments.push(segment);
    }
    segments.sort_by_key(|segment| segment.sequence);
    for pair in segments.windows(2) {
        if pair[1].sequence != pair[0].sequence + 1 {
            return Err(StorageError::Corrupt {
                file: directory.join(pair[1].file_name()).display().to_string(),
                offset: 0,
                reason: format!(
                    "segment sequence {} follows {}: a segment is missing",
                    pair[1].sequence, pair[0].sequence
                ),
            });
        }
    }
    Ok(segments)
}

/// What [`replay_segments`] read.
struct SegmentsReplayed {
    replay: Replay,
    /// Length of the last segment's valid prefix.
    last_segment_bytes: u64,
    truncated_tail: Option<TruncatedTail>,
}

/// Reads every segment in order, applying its records to a [`Replay`] and noting each segment's
/// highest entry index. A torn tail of the last segment is reported, not yet truncated.
fn replay_segments<D: Disk>(
    disk: &D,
    directory: &Path,
    segments: &mut [Segment],
    options: &WalOptions,
) -> Result<SegmentsReplayed, StorageError> {
    let record_bytes_max = options.record_bytes_max as usize;
    let mut replay = Replay::default();
    let mut last_segment_bytes = 0;
    let mut truncated_tail = None;
    let segment_count = segments.len();
    for (position, segment) in segments.iter_mut().enumerate() {
        let is_last = position + 1 == segment_count;
        let path = directory.join(segment.file_name());
        let file = path.display().to_string();
        let bytes = disk
            .read_file(&path)
            .map_err(|source| StorageError::io(format!("reading {file}"), source))?;
        let scan = scan_segment(&bytes, &file, is_last, record_bytes_max)?;
        for (offset, record) in scan.records {
            if let Record::Entry(entry) = &record {
                segment.entry_index_max = segment.entry_index_max.max(Some(entry.index));
            }
            replay
                .apply(record)
                .map_err(|reason| StorageError::Corrupt {
                    file: file.clone(),
                    offset,
                    reason,
                })?;
        }
        if let Some(reason) = scan.torn_tail_reason {
            let bytes_removed = (bytes.len() - scan.valid_bytes) as u64;
            tracing::warn!(
                file = %file,
                offset = scan.valid_bytes,
                bytes_removed,
                %reason,
                "truncating torn tail of write-ahead log segment"
            );
            truncated_tail = Some(TruncatedTail {
                file,
                offset: scan.valid_bytes as u64,
                bytes_removed,
                reason,
            });
        }
        last_segment_bytes = scan.valid_bytes as u64;
    }
    let first_file = segments.first().map_or_else(
        || directory.display().to_string(),
        |segment| directory.join(segment.file_name()).display().to_string(),
    );
    replay.finish().map_err(|reason| StorageError::Corrupt {
        file: first_file,
        offset: 0,
        reason,
    })?;
    Ok(SegmentsReplayed {
        replay,
        last_segment_bytes,
        truncated_tail,
    })
}

/// The records of one segment and where its valid data ends.
struct SegmentScan {
    /// Each record with its byte offset.
    records: Vec<(u64, Record)>,
    /// Length of the valid prefix of the segment.
    valid_bytes: usize,
    /// Set when a torn tail starts at `valid_bytes`: what was wrong with it.
    torn_tail_reason: Option<String>,
}

fn scan_segment(
    bytes: &[u8],
    file: &str,
    is_last: bool,
    record_bytes_max: usize,
) -> Result<SegmentScan, StorageError> {
    let mut records = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        match record::decode(bytes, offset, record_bytes_max) {
            Ok((record, end)) => {
                records.push((offset as u64, record));
                offset = end;
            }
            Err(error) => {
                let reason = error.describe(record_bytes_max);
                if is_last && is_torn_tail(bytes, offset, &error, record_bytes_max) {
                    return Ok(SegmentScan {
                        records,
                        valid_bytes: offset,
                        torn_tail_reason: Some(reason),
                    });
                }
                let context = if is_last {
                    "not a torn tail: valid data follows, or the damage is not from a torn write"
                } else {
                    "in a segment that is not the last, so it was fsynced before"
                };
                return Err(StorageError::Corrupt {
                    file: file.to_owned(),
                    offset: offset as u64,
                    reason: format!("{reason} ({context})"),
                });
            }
        }
    }
    Ok(SegmentScan {
        records,
        valid_bytes: bytes.len(),
        torn_tail_reason: None,
    })
}

/// Whether the damaged record at `offset` of the last segment is what a crash during an append
/// leaves: nothing valid follows it. That covers an incomplete record, a record whose last
/// bytes were garbled, zeros that some file systems leave after a crash, and a garbled record
/// followed by the first few bytes of the next (a tear across a record boundary). Damage with
/// a valid record after it is not a tail and so is corruption. A record whose checksum matches
/// but whose body is malformed was written that way, which is a bug, never a tear.
fn is_torn_tail(bytes: &[u8], offset: usize, error: &DecodeError, record_bytes_max: usize) -> bool {
    match error {
        DecodeError::Malformed { .. } => false,
        DecodeError::HeaderIncomplete { .. } => true,
        DecodeError::LengthZero
        | DecodeError::RunsPastEnd { .. }
        | DecodeError::TooLarge { .. }
        | DecodeError::ChecksumMismatch { .. } => {
            !record::any_record_after(bytes, offset + 1, record_bytes_max)
        }
    }
}

/// The state replay builds, applying Raft's rules record by record.
#[derive(Debug, Default)]
struct Replay {
    hard_state: Option<HardState>,
    snapshot_marker: Option<SnapshotMarker>,
    /// Contiguous at every step.
    entries: Vec<LogEntry>,
}

impl Replay {
    /// Applies one record; an error is a reason the log is corrupt.
    fn apply(&mut self, record: Record) -> Result<(), String> {
        match record {
            Record::Entry(entry) => self.apply_entry(entry)?,
            Record::HardState(hard_state) => self.hard_state = Some(hard_state),
            Record::SnapshotMarker(marker) => {
                if let Some(current) = self.snapshot_marker {
                    if marker.index < current.index {
                        return Err(format!(
                            "snapshot marker {} is older than the earlier marker {}",
                            marker.index, current.index
                        ));
                    }
                }
                let covered = self
                    .entries
                    .partition_point(|entry| entry.index <= marker.index);
                self.entries.drain(..covered);
                self.snapshot_marker = Some(marker);
            }
        }
        debug_assert!(self.is_contiguous(), "replayed entries stay contiguous");
        Ok(())
    }

    fn apply_entry(&mut self, entry: LogEntry) -> Result<(), String> {
        let marker_index = self.snapshot_marker.map_or(0, |marker| marker.index);
        if entry.index <= marker_index {
            return Err(format!(
                "entry {} is at or below the snapshot marker {marker_index}",
                entry.index
            ));
        }
        if let (Some(first), Some(last)) = (self.entries.first(), self.entries.last()) {
            if entry.index > last.index + 1 {
                return Err(format!(
                    "entry {} follows entry {}: entries are missing",
                    entry.index, last.index
                ));
            }
            // Raft's overwrite: the new entry replaces the one at its index and all after.
            let kept = entry.index.saturating_sub(first.index) as usize;
            self.entries.truncate(kept);
        }
        // When the list is empty the entry may start anywhere: the oldest kept segment begins
        // wherever released segments ended. `finish` checks the result against the marker.
        self.entries.push(entry);
        Ok(())
    }

    /// Checks the replayed log is whole: it continues the snapshot marker (or starts at 1).
    fn finish(&self) -> Result<(), String> {
        if let Some(first) = self.entries.first() {
            let expected = self.snapshot_marker.map_or(1, |marker| marker.index + 1);
            if first.index != expected {
                return Err(format!(
                    "the log starts at entry {} but should start at {expected} after the \
                     snapshot marker {:?}: entries are missing",
                    first.index, self.snapshot_marker
                ));
            }
        }
        assert!(self.is_contiguous(), "replayed entries are contiguous");
        Ok(())
    }

    fn is_contiguous(&self) -> bool {
        self.entries
            .windows(2)
            .all(|pair| pair[1].index == pair[0].index + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Record {
        Record::Entry(LogEntry {
            index,
            term,
            payload: vec![index as u8],
        })
    }

    fn indexes(replay: &Replay) -> Vec<(u64, u64)> {
        replay
            .entries
            .iter()
            .map(|entry| (entry.index, entry.term))
            .collect()
    }

    #[test]
    fn segment_names_round_trip_and_reject_malformed() {
        let segment = Segment {
            sequence: 3,
            first_index: 0x1f,
            entry_index_max: None,
        };
        assert_eq!(segment.file_name(), "0000000000000003-000000000000001f.wal");
        assert_eq!(parse_segment_name(&segment.file_name()), Some(segment));
        for bad in [
            "3-1f.wal",
            "000000000000000g-0000000000000000.wal",
            "+000000000000003-0000000000000000.wal",
            "0000000000000003_000000000000001f.wal",
            "0000000000000003-000000000000001f.log",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn replay_overwrites_suffix() {
        let mut replay = Replay::default();
        for record in [
            entry(1, 1),
            entry(2, 1),
            entry(3, 1),
            entry(2, 2),
            entry(3, 2),
        ] {
            replay.apply(record).unwrap();
        }
        assert_eq!(indexes(&replay), [(1, 1), (2, 2), (3, 2)]);
        replay.finish().unwrap();
    }

    #[test]
    fn replay_marker_drops_covered_entries_and_keeps_later_ones() {
        let mut replay = Replay::default();
        for index in 1..=5 {
            replay.apply(entry(index, 1)).unwrap();
        }
        replay
            .apply(Record::SnapshotMarker(SnapshotMarker { index: 3, term: 1 }))
            .unwrap();
        assert_eq!(indexes(&replay), [(4, 1), (5, 1)]);
        replay
            .apply(Record::SnapshotMarker(SnapshotMarker { index: 9, term: 2 }))
            .unwrap();
        assert!(replay.entries.is_empty());
        replay.finish().unwrap();
    }

    #[test]
    fn replay_rejects_gaps_and_regressions() {
        let mut replay = Replay::default();
        replay.apply(entry(1, 1)).unwrap();
        assert!(replay.apply(entry(3, 1)).unwrap_err().contains("missing"));
        replay
            .apply(Record::SnapshotMarker(SnapshotMarker { index: 5, term: 1 }))
            .unwrap();
        assert!(replay.apply(entry(5, 1)).is_err(), "entry under the marker");
        assert!(replay
            .apply(Record::SnapshotMarker(SnapshotMarker { index: 4, term: 1 }))
            .is_err());
        let mut replay = Replay::default();
        replay.apply(entry(7, 1)).unwrap();
        assert!(
            replay.finish().is_err(),
            "without a marker the log must start at 1"
        );
    }

    #[test]
    fn options_are_validated() {
        let valid = WalOptions::default();
        valid.validate().unwrap();
        for options in [
            WalOptions {
                record_bytes_max: 10,
                ..valid.clone()
            },
            WalOptions {
                record_bytes_max: u64::from(u32::MAX) + 1,
                ..valid.clone()
            },
            WalOptions {
                segment_bytes_max: 0,
                ..valid.clone()
            },
            WalOptions {
                directory: PathBuf::new(),
                ..valid.clone()
            },
        ] {
            assert!(matches!(
                options.validate(),
                Err(StorageError::InvalidOptions { .. })
            ));
        }
    }
}
