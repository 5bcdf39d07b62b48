//! The snapshot store: whole-state snapshots as single checksummed files, written atomically.
//!
//! Files are `{directory}/{term:016x}-{index:016x}.snap` (etcd's naming). Each is
//!
//! ```text
//! offset  0  magic "KEELSNP1"        (8 bytes; the digit is the format version)
//! offset  8  u32 crc32c of bytes 12..end
//! offset 12  u64 length of bytes 20..end
//! offset 20  u64 index, u64 term
//! offset 36  u32 metadata length, metadata bytes, data bytes
//! ```
//!
//! little endian. The index and term are inside the checksummed bytes as well as in the name,
//! so a file renamed by hand is detected. A file is written to a temporary name, fsynced,
//! renamed into place and the directory fsynced ([`Disk::write_file_atomic`]), so a crash
//! leaves either the whole snapshot or none of it, plus perhaps a temporary file that the next
//! [`SnapshotStore::open`] removes. A snapshot that fails its checksum is an error, never
//! skipped in favour of an older one: the log before the damaged snapshot may already be
//! released, so falling back would silently lose committed state.

use std::path::{Path, PathBuf};

use crate::disk::{Disk, TEMPORARY_SUFFIX};
use crate::error::StorageError;

const MAGIC: &[u8; 8] = b"KEELSNP1";
const CHECKSUM_OFFSET: usize = 8;
const LENGTH_OFFSET: usize = 12;
const BODY_OFFSET: usize = 20;
const METADATA_LENGTH_OFFSET: usize = 36;
const METADATA_OFFSET: usize = 40;
/// Debug builds read back every saved snapshot up to this size to check the round trip.
const DEBUG_ROUND_TRIP_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Configuration of a [`SnapshotStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// Directory of the snapshot files, relative to the disk root.
    pub directory: PathBuf,
    /// How many of the newest snapshots to keep; at least 1.
    pub retain: usize,
    /// Largest snapshot file, header included; larger saves are refused and larger files read
    /// back are corruption, so a damaged length cannot make a load allocate without bound.
    pub snapshot_bytes_max: u64,
}

impl Default for SnapshotOptions {
    fn default() -> SnapshotOptions {
        SnapshotOptions {
            directory: PathBuf::from("snap"),
            retain: 2,
            // etcd's largest recommended backend is 8 GiB.
            snapshot_bytes_max: 8 * 1024 * 1024 * 1024,
        }
    }
}

/// A snapshot as saved and loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Index of the last log entry the snapshot covers.
    pub index: u64,
    /// Term of that entry.
    pub term: u64,
    /// Opaque metadata, such as the cluster configuration.
    pub metadata: Vec<u8>,
    /// Opaque state-machine data.
    pub data: Vec<u8>,
}

/// Snapshot files in one directory; see the module documentation.
pub struct SnapshotStore<D: Disk> {
    disk: D,
    options: SnapshotOptions,
}

impl<D: Disk> std::fmt::Debug for SnapshotStore<D> {
    // Written by hand so that the store is `Debug` whatever the disk is.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SnapshotStore")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<D: Disk> SnapshotStore<D> {
    /// Opens the store in `options.directory`, creating it if needed and removing temporary
    /// files left by a crash during a save.
    pub fn open(disk: D, options: SnapshotOptions) -> Result<SnapshotStore<D>, StorageError> {
        if options.retain == 0 {
            return Err(StorageError::InvalidOptions {
                reason: "retain must keep at least one snapshot".to_owned(),
            });
        }
        if options.directory.as_os_str().is_empty() || options.directory.is_absolute() {
            return Err(StorageError::InvalidOptions {
                reason: format!(
                    "directory {:?} must be a non-empty relative path",
                    options.directory
                ),
            });
        }
        let store = SnapshotStore { disk, options };
        let directory = &store.options.directory;
        store
            .disk
            .create_directory_all(directory)
            .map_err(|source| {
                StorageError::io(format!("creating {}", directory.display()), source)
            })?;
        store
            .disk
            .sync_directory(crate::disk::parent_directory(directory))
            .map_err(|source| StorageError::FsyncFailed {
                file: format!("parent directory of {}", directory.display()),
                source,
            })?;
        for name in store.list_names()? {
            if name.ends_with(TEMPORARY_SUFFIX) {
                let path = directory.join(&name);
                tracing::info!(
                    file = %path.display(),
                    "removing temporary snapshot file left by a crash"
                );
                store.disk.remove_file(&path).map_err(|source| {
                    StorageError::io(format!("removing {}", path.display()), source)
                })?;
            }
        }
        // Always, not only after removing a leftover: a rename whose directory fsync
        // failed before a process restart is visible but not durable, and must not be
        // trusted (loaded, its marker written to the log) until it is.
        store.sync_directory()?;
        Ok(store)
    }

    /// Saves a snapshot atomically and durably, then deletes all but the newest `retain`.
    pub fn save(
        &self,
        index: u64,
        term: u64,
        metadata: &[u8],
        data: &[u8],
    ) -> Result<(), StorageError> {
        let snapshot_bytes = (METADATA_OFFSET + metadata.len() + data.len()) as u64;
        if snapshot_bytes > self.options.snapshot_bytes_max {
            return Err(StorageError::SnapshotTooLarge {
                bytes: snapshot_bytes,
                limit: self.options.snapshot_bytes_max,
            });
        }
        let metadata_length =
            u32::try_from(metadata.len()).map_err(|_| StorageError::SnapshotTooLarge {
                bytes: snapshot_bytes,
                limit: u64::from(u32::MAX),
            })?;
        let header = encode_header(index, term, metadata_length, metadata, data);

        let path = self.path(index, term);
        self.disk
            .write_file_atomic(&path, &[&header, metadata, data])
            .map_err(|source| StorageError::io(format!("writing {}", path.display()), source))?;
        // Reading a large snapshot back would hold it in memory twice more.
        if cfg!(debug_assertions) && snapshot_bytes <= DEBUG_ROUND_TRIP_BYTES_MAX {
            let snapshot = self
                .load(&path, index, term)
                .expect("a saved snapshot loads");
            assert_eq!(
                (snapshot.metadata.as_slice(), snapshot.data.as_slice()),
                (metadata, data),
                "snapshot round trip"
            );
        }
        self.apply_retention()
    }

    /// Loads the newest snapshot (highest index), or `None` if there is none. A newest snapshot
    /// that fails its checks is [`StorageError::Corrupt`]; older ones are not tried.
    pub fn load_newest(&self) -> Result<Option<Snapshot>, StorageError> {
        let Some(&(index, term)) = self.list()?.last() else {
            return Ok(None);
        };
        self.load(&self.path(index, term), index, term).map(Some)
    }

    /// The (index, term) of every snapshot file, oldest first.
    pub fn list(&self) -> Result<Vec<(u64, u64)>, StorageError> {
        let mut snapshots = Vec::new();
        for name in self.list_names()? {
            match parse_name(&name) {
                Some(index_and_term) => snapshots.push(index_and_term),
                None => tracing::warn!(
                    file = %self.options.directory.join(&name).display(),
                    "ignoring unexpected file in the snapshot directory"
                ),
            }
        }
        snapshots.sort_unstable();
        Ok(snapshots)
    }

    fn list_names(&self) -> Result<Vec<String>, StorageError> {
        let directory = &self.options.directory;
        self.disk
            .list_directory(directory)
            .map_err(|source| StorageError::io(format!("listing {}", directory.display()), source))
    }

    fn path(&self, index: u64, term: u64) -> PathBuf {
        self.options
            .directory
            .join(format!("{term:016x}-{index:016x}.snap"))
    }

    fn load(&self, path: &Path, index: u64, term: u64) -> Result<Snapshot, StorageError> {
        let file = path.display().to_string();
        let bytes = self
            .disk
            .read_file(path)
            .map_err(|source| StorageError::io(format!("reading {file}"), source))?;
        let snapshot =
            decode(&bytes, self.options.snapshot_bytes_max).map_err(|(offset, reason)| {
                StorageError::Corrupt {
                    file: file.clone(),
                    offset: offset as u64,
                    reason,
                }
            })?;
        if (snapshot.index, snapshot.term) != (index, term) {
            return Err(StorageError::Corrupt {
                file,
                offset: BODY_OFFSET as u64,
                reason: format!(
                    "the file holds index {} term {} but its name says index {index} term {term}",
                    snapshot.index, snapshot.term
                ),
            });
        }
        Ok(snapshot)
    }

    fn apply_retention(&self) -> Result<(), StorageError> {
        let snapshots = self.list()?;
        let excess = snapshots.len().saturating_sub(self.options.retain);
        if excess == 0 {
            return Ok(());
        }
        for &(index, term) in &snapshots[..excess] {
            let path = self.path(index, term);
            self.disk.remove_file(&path).map_err(|source| {
                StorageError::io(format!("removing {}", path.display()), source)
            })?;
            tracing::debug!(file = %path.display(), "removed old snapshot");
        }
        self.sync_directory()
    }

    fn sync_directory(&self) -> Result<(), StorageError> {
        let directory = &self.options.directory;
        self.disk
            .sync_directory(directory)
            .map_err(|source| StorageError::FsyncFailed {
                file: directory.display().to_string(),
                source,
            })
    }
}

/// Parses `{term:016x}-{index:016x}.snap` into (index, term).
fn parse_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".snap")?;
    let (term, index) = stem.split_once('-')?;
    let parse = |hex: &str| {
        let well_formed = hex.len() == 16 && hex.bytes().all(|byte| byte.is_ascii_hexdigit());
        well_formed
            .then(|| u64::from_str_radix(hex, 16).ok())
            .flatten()
    };
    Some((parse(index)?, parse(term)?))
}

/// The fixed-size header of a snapshot file whose metadata and data follow it; its
/// checksum covers everything after the checksum field, the data included.
fn encode_header(
    index: u64,
    term: u64,
    metadata_length: u32,
    metadata: &[u8],
    data: &[u8],
) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(METADATA_OFFSET);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&[0; 4]); // The checksum, filled in below.
    let body_bytes = (METADATA_OFFSET - BODY_OFFSET + metadata.len() + data.len()) as u64;
    bytes.extend_from_slice(&body_bytes.to_le_bytes());
    bytes.extend_from_slice(&index.to_le_bytes());
    bytes.extend_from_slice(&term.to_le_bytes());
    bytes.extend_from_slice(&metadata_length.to_le_bytes());
    debug_assert_eq!(bytes.len(), METADATA_OFFSET);
    let checksum = crc32c::crc32c(&bytes[LENGTH_OFFSET..]);
    let checksum = crc32c::crc32c_append(checksum, metadata);
    let checksum = crc32c::crc32c_append(checksum, data);
    bytes[CHECKSUM_OFFSET..LENGTH_OFFSET].copy_from_slice(&checksum.to_le_bytes());
    bytes
}

/// Decodes a snapshot file; an error is the offset of the bad field and what is wrong.
fn decode(bytes: &[u8], snapshot_bytes_max: u64) -> Result<Snapshot, (usize, String)> {
    if bytes.len() < METADATA_OFFSET {
        return Err((
            0,
            format!(
                "file of {} bytes is shorter than the {METADATA_OFFSET}-byte header",
                bytes.len()
            ),
        ));
    }
    if bytes.len() as u64 > snapshot_bytes_max {
        return Err((
            0,
            format!(
                "file of {} bytes exceeds snapshot_bytes_max of {snapshot_bytes_max}",
                bytes.len()
            ),
        ));
    }
    if &bytes[..CHECKSUM_OFFSET] != MAGIC {
        return Err((0, "not a keel snapshot: wrong magic".to_owned()));
    }
    let read_u64 = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let read_u32 = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let body_bytes = read_u64(LENGTH_OFFSET);
    let actual_body_bytes = (bytes.len() - BODY_OFFSET) as u64;
    if body_bytes != actual_body_bytes {
        return Err((
            LENGTH_OFFSET,
            format!("header claims {body_bytes} bytes after it, the file has {actual_body_bytes}"),
        ));
    }
    let checksum = read_u32(CHECKSUM_OFFSET);
    let actual_checksum = crc32c::crc32c(&bytes[LENGTH_OFFSET..]);
    if checksum != actual_checksum {
        return Err((
            CHECKSUM_OFFSET,
            format!(
                "checksum mismatch over bytes {LENGTH_OFFSET}..{}: stored {checksum:#010x}, \
                 computed {actual_checksum:#010x}",
                bytes.len()
            ),
        ));
    }
    let metadata_bytes = read_u32(METADATA_LENGTH_OFFSET) as usize;
    let metadata_end = METADATA_OFFSET + metadata_bytes;
    if metadata_end > bytes.len() {
        return Err((
            METADATA_LENGTH_OFFSET,
            format!("metadata of {metadata_bytes} bytes runs past the end of the file"),
        ));
    }
    Ok(Snapshot {
        index: read_u64(BODY_OFFSET),
        term: read_u64(BODY_OFFSET + 8),
        metadata: bytes[METADATA_OFFSET..metadata_end].to_vec(),
        data: bytes[metadata_end..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole snapshot file in one buffer, as it lands on disk.
    fn encode(
        index: u64,
        term: u64,
        metadata_length: u32,
        metadata: &[u8],
        data: &[u8],
    ) -> Vec<u8> {
        let mut bytes = encode_header(index, term, metadata_length, metadata, data);
        bytes.extend_from_slice(metadata);
        bytes.extend_from_slice(data);
        bytes
    }

    #[test]
    fn encode_decode_round_trip() {
        let bytes = encode(9, 4, 4, b"meta", b"data bytes");
        let snapshot = decode(&bytes, u64::MAX).unwrap();
        assert_eq!(
            snapshot,
            Snapshot {
                index: 9,
                term: 4,
                metadata: b"meta".to_vec(),
                data: b"data bytes".to_vec(),
            }
        );
    }

    #[test]
    fn every_field_is_checked() {
        let bytes = encode(9, 4, 4, b"meta", b"data");
        assert_eq!(decode(&bytes[..10], u64::MAX).unwrap_err().0, 0);
        assert_eq!(decode(&bytes, 10).unwrap_err().0, 0, "over the limit");
        let mut wrong_magic = bytes.clone();
        wrong_magic[0] = b'X';
        assert_eq!(decode(&wrong_magic, u64::MAX).unwrap_err().0, 0);
        assert_eq!(
            decode(&bytes[..bytes.len() - 1], u64::MAX).unwrap_err().0,
            LENGTH_OFFSET,
            "a truncated file"
        );
        for offset in [
            LENGTH_OFFSET + 8,
            BODY_OFFSET,
            METADATA_OFFSET + 1,
            bytes.len() - 1,
        ] {
            let mut flipped = bytes.clone();
            flipped[offset] ^= 0x10;
            let expected = if offset < BODY_OFFSET {
                LENGTH_OFFSET
            } else {
                CHECKSUM_OFFSET
            };
            assert_eq!(
                decode(&flipped, u64::MAX).unwrap_err().0,
                expected,
                "{offset}"
            );
        }
    }

    #[test]
    fn names_parse_as_term_then_index() {
        assert_eq!(
            parse_name("0000000000000002-0000000000000010.snap"),
            Some((16, 2))
        );
        assert_eq!(parse_name("2-10.snap"), None);
        assert_eq!(
            parse_name("0000000000000002-0000000000000010.snap.tmp"),
            None
        );
    }
}
