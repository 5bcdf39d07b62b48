//! `SimDisk`: an in-memory [`Disk`] for deterministic simulation, with the faults real disks
//! have.
//!
//! It models the POSIX durability rules the storage code must respect, so that the simulator
//! can catch code that forgets one:
//! - each file has the content the operating system shows now and the content that is durable;
//!   [`DiskFile::sync`] makes the former durable;
//! - the directory namespace (which names exist, pointing at which files) likewise has a current
//!   and a durable version; [`Disk::sync_directory`] makes one directory's entries durable;
//! - [`SimDisk::crash`] throws away everything not durable, except that it can keep a prefix of
//!   a file's un-fsynced tail, possibly with its last bytes garbled: a torn write;
//! - [`SimDisk::fail_next_fsync`] makes fsyncs fail. As on Linux (PostgreSQL's "fsyncgate"), the
//!   bytes whose write-back failed are lost for good: reads still show them until a crash, but a
//!   later successful fsync persists zeros in their place.
//!
//! There is no hidden randomness: a torn crash draws from a generator seeded by the caller, so a
//! simulation seed reproduces every byte. The generator is a SplitMix64 written here rather than
//! `rand`'s `StdRng`, whose algorithm `rand` does not promise to keep across versions, which
//! would silently change what a recorded seed replays.
//!
//! The handle is an `Arc<Mutex<…>>` so it is `Send` like real files, though the simulator uses it
//! from one thread; clones share one disk.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::disk::{parent_directory, Disk, DiskFile};

/// How [`SimDisk::crash`] treats bytes written since the last fsync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Crash {
    /// Every byte not fsynced is lost.
    Clean,
    /// Each file with an un-fsynced tail keeps a prefix of it of random length (possibly none or
    /// all), and for about half of them the last one to eight kept bytes are garbled. Randomness
    /// comes from a generator seeded with `seed`.
    Torn {
        /// Seed of the generator that picks the prefixes and the garbling.
        seed: u64,
    },
    /// Only the file now named `path` keeps `kept_bytes` of its un-fsynced tail (capped at the
    /// tail's length), and the last `garbled_bytes` of those (capped at `kept_bytes`) are
    /// inverted. Every other file loses its un-fsynced tail.
    TornFile {
        /// The file that is torn rather than cleanly cut.
        path: PathBuf,
        /// How many bytes of its un-fsynced tail survive.
        kept_bytes: usize,
        /// How many of the surviving bytes, at their end, are garbled.
        garbled_bytes: usize,
    },
}

/// Counters of what a [`SimDisk`] was asked to do, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimDiskStats {
    /// File fsyncs attempted, failed ones included.
    pub file_syncs: u64,
    /// Directory fsyncs attempted, failed ones included.
    pub directory_syncs: u64,
    /// Fsyncs (of files or directories) that failed by [`SimDisk::fail_next_fsync`].
    pub syncs_failed: u64,
    /// Bytes appended to files.
    pub bytes_written: u64,
    /// Crashes simulated.
    pub crashes: u64,
}

/// An in-memory disk with crash and fsync faults; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<SimState>>,
}

#[derive(Debug)]
struct SimState {
    /// Files by inode number. A file lives while a current or durable name points at it.
    inodes: BTreeMap<u64, Inode>,
    inode_next: u64,
    /// The namespace as the operating system shows it now.
    names: BTreeMap<PathBuf, u64>,
    /// The namespace as it would be found after a crash.
    names_durable: BTreeMap<PathBuf, u64>,
    /// Directories that exist now; the root (empty path) always does.
    directories: BTreeSet<PathBuf>,
    /// Directories that would survive a crash.
    directories_durable: BTreeSet<PathBuf>,
    /// How many fsyncs succeed before `fsync_failures_pending` start to apply.
    fsync_successes_before_failures: u64,
    /// How many fsyncs fail, after the successes above.
    fsync_failures_pending: u64,
    /// Incremented by each crash; handles opened before it refuse to work, like file
    /// descriptors of a process that died.
    generation: u64,
    stats: SimDiskStats,
}

impl Default for SimState {
    fn default() -> SimState {
        let root = BTreeSet::from([PathBuf::new()]);
        SimState {
            inodes: BTreeMap::new(),
            inode_next: 0,
            names: BTreeMap::new(),
            names_durable: BTreeMap::new(),
            directories: root.clone(),
            directories_durable: root,
            fsync_successes_before_failures: 0,
            fsync_failures_pending: 0,
            generation: 0,
            stats: SimDiskStats::default(),
        }
    }
}

#[derive(Debug, Default)]
struct Inode {
    /// What reads return now.
    content: Vec<u8>,
    /// What a crash would leave.
    durable: Vec<u8>,
    /// `content[..synced_bytes]` has been fsynced since it was last changed; bytes past it were
    /// written (or the file was truncated below them) after the last successful fsync.
    synced_bytes: usize,
    /// Ranges of `content` whose write-back failed: never to become durable.
    lost: Vec<Range<usize>>,
}

impl Inode {
    /// Length of the un-fsynced tail that a crash may partly keep: only a pure extension of the
    /// durable content qualifies; after a truncation or a failed fsync nothing is kept.
    fn tail_bytes(&self) -> usize {
        let extends_durable = self.synced_bytes == self.durable.len()
            && self.content.len() >= self.durable.len()
            && self.lost.is_empty();
        if extends_durable {
            self.content.len() - self.durable.len()
        } else {
            0
        }
    }
}

impl SimDisk {
    /// An empty disk holding only its root directory.
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    /// Makes the next `count` fsyncs, of files or directories, fail. A failed file fsync loses
    /// the bytes written since the last successful one (see the module documentation).
    pub fn fail_next_fsync(&self, count: u64) {
        self.fail_fsync_after(0, count);
    }

    /// Lets the next `successes` fsyncs succeed and makes the `count` after them fail, to aim a
    /// failure at one step of a multi-step operation (say the directory fsync of a rename).
    pub fn fail_fsync_after(&self, successes: u64, count: u64) {
        let mut state = self.lock();
        state.fsync_successes_before_failures = successes;
        state.fsync_failures_pending = count;
    }

    /// Simulates a power loss and restart: everything not durable is undone as `crash` says.
    /// Handles opened before the crash return errors afterwards.
    pub fn crash(&self, crash: Crash) {
        let mut state = self.lock();
        let state = &mut *state;
        state.generation += 1;
        state.stats.crashes += 1;
        state.fsync_successes_before_failures = 0;
        state.fsync_failures_pending = 0;

        // Directories and names revert to their durable versions; a name survives only if its
        // directory does. BTreeSet order visits a parent before its children.
        let mut directories = BTreeSet::new();
        for directory in &state.directories_durable {
            let parent_survives = directory
                .parent()
                .is_none_or(|parent| directories.contains(parent));
            if parent_survives {
                directories.insert(directory.clone());
            }
        }
        state.names = state
            .names_durable
            .iter()
            .filter(|(path, _)| directories.contains(parent_directory(path)))
            .map(|(path, inode)| (path.clone(), *inode))
            .collect();
        state.names_durable = state.names.clone();
        state.directories_durable = directories.clone();
        state.directories = directories;
        let live: BTreeSet<u64> = state.names.values().copied().collect();
        state.inodes.retain(|inode, _| live.contains(inode));

        let torn_inode = match &crash {
            Crash::TornFile { path, .. } => state.names.get(path).copied(),
            Crash::Clean | Crash::Torn { .. } => None,
        };
        let mut generator = match crash {
            Crash::Torn { seed } => Some(SplitMix64::new(seed)),
            Crash::Clean | Crash::TornFile { .. } => None,
        };
        for (inode_number, inode) in &mut state.inodes {
            let tail_bytes = inode.tail_bytes();
            let (kept_bytes, garbled_bytes, garble_mask) = match (&crash, &mut generator) {
                (Crash::Torn { .. }, Some(generator)) if tail_bytes > 0 => {
                    let kept_bytes = generator.below(tail_bytes as u64 + 1) as usize;
                    let garbled_bytes = if kept_bytes > 0 && generator.next() % 2 == 0 {
                        kept_bytes.min(1 + generator.below(8) as usize)
                    } else {
                        0
                    };
                    // A nonzero mask so that garbled bytes really change.
                    let garble_mask = (generator.below(255) + 1) as u8;
                    (kept_bytes, garbled_bytes, garble_mask)
                }
                (
                    Crash::TornFile {
                        kept_bytes,
                        garbled_bytes,
                        ..
                    },
                    _,
                ) if torn_inode == Some(*inode_number) => {
                    let kept_bytes = (*kept_bytes).min(tail_bytes);
                    (kept_bytes, (*garbled_bytes).min(kept_bytes), 0xFF)
                }
                _ => (0, 0, 0),
            };
            let mut content = std::mem::take(&mut inode.durable);
            let tail_start = content.len();
            content.extend_from_slice(&inode.content[tail_start..tail_start + kept_bytes]);
            let garbled_start = content.len() - garbled_bytes;
            for byte in &mut content[garbled_start..] {
                *byte ^= garble_mask;
            }
            inode.synced_bytes = content.len();
            inode.durable = content.clone();
            inode.content = content;
            inode.lost.clear();
        }
    }

    /// XORs the byte at `offset` of `path` with `mask`, durably: media corruption, as opposed to
    /// a torn write. Panics if there is no such byte, since that is a bug in the test.
    pub fn corrupt(&self, path: &Path, offset: usize, mask: u8) {
        let mut state = self.lock();
        let state = &mut *state;
        let inode_number = state.names[path];
        let inode = state.inodes.get_mut(&inode_number).expect("named inode");
        inode.content[offset] ^= mask;
        if offset < inode.durable.len() {
            inode.durable[offset] ^= mask;
        }
    }

    /// Counters since the disk was created.
    pub fn stats(&self) -> SimDiskStats {
        self.lock().stats
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // The simulator is single-threaded, so a poisoned lock only follows a panic that is
        // already failing the test; keep going to let it report.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file or directory", path.display()),
    )
}

fn injected_fsync_failure() -> io::Error {
    io::Error::other("injected fsync failure")
}

impl SimState {
    fn require_directory(&self, directory: &Path) -> io::Result<()> {
        if self.directories.contains(directory) {
            Ok(())
        } else {
            Err(not_found(directory))
        }
    }

    /// Decides whether this fsync fails, consuming one planned success or failure.
    fn take_fsync_failure(&mut self) -> bool {
        if self.fsync_failures_pending == 0 {
            false
        } else if self.fsync_successes_before_failures > 0 {
            self.fsync_successes_before_failures -= 1;
            false
        } else {
            self.fsync_failures_pending -= 1;
            self.stats.syncs_failed += 1;
            true
        }
    }
}

impl Disk for SimDisk {
    type File = SimDiskFile;

    fn create_directory_all(&self, directory: &Path) -> io::Result<()> {
        let mut state = self.lock();
        for ancestor in directory.ancestors() {
            if state.names.contains_key(ancestor) {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} is a file", ancestor.display()),
                ));
            }
            state.directories.insert(ancestor.to_path_buf());
        }
        Ok(())
    }

    fn list_directory(&self, directory: &Path) -> io::Result<Vec<String>> {
        let state = self.lock();
        state.require_directory(directory)?;
        let files = state.names.keys();
        let subdirectories = state
            .directories
            .iter()
            .filter(|path| !path.as_os_str().is_empty());
        let mut names: Vec<String> = files
            .chain(subdirectories)
            .filter(|path| parent_directory(path) == directory)
            .filter_map(|path| path.file_name())
            .map(|name| name.to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    }

    fn open_append(&self, path: &Path) -> io::Result<SimDiskFile> {
        let mut state = self.lock();
        state.require_directory(parent_directory(path))?;
        if state.directories.contains(path) {
            return Err(io::Error::other(format!(
                "{} is a directory",
                path.display()
            )));
        }
        let inode = match state.names.get(path) {
            Some(inode) => *inode,
            None => {
                let inode = state.inode_next;
                state.inode_next += 1;
                state.inodes.insert(inode, Inode::default());
                state.names.insert(path.to_path_buf(), inode);
                inode
            }
        };
        Ok(SimDiskFile {
            disk: self.clone(),
            inode,
            generation: state.generation,
        })
    }

    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        let state = self.lock();
        let inode = state.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(state.inodes[inode].content.clone())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.require_directory(parent_directory(to))?;
        let inode = state.names.remove(from).ok_or_else(|| not_found(from))?;
        state.names.insert(to.to_path_buf(), inode);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.names.remove(path).ok_or_else(|| not_found(path))?;
        Ok(())
    }

    fn sync_directory(&self, directory: &Path) -> io::Result<()> {
        let mut state = self.lock();
        let state = &mut *state;
        state.require_directory(directory)?;
        state.stats.directory_syncs += 1;
        if state.take_fsync_failure() {
            return Err(injected_fsync_failure());
        }
        let in_directory =
            |path: &Path| !path.as_os_str().is_empty() && parent_directory(path) == directory;
        state.names_durable.retain(|path, _| !in_directory(path));
        for (path, inode) in &state.names {
            if in_directory(path) {
                state.names_durable.insert(path.clone(), *inode);
            }
        }
        for path in &state.directories {
            if in_directory(path) {
                state.directories_durable.insert(path.clone());
            }
        }
        Ok(())
    }
}

/// A [`SimDisk`] file open for appending.
#[derive(Debug)]
pub struct SimDiskFile {
    disk: SimDisk,
    inode: u64,
    /// The disk's crash generation when this handle was opened.
    generation: u64,
}

impl SimDiskFile {
    fn with_inode<R>(
        &mut self,
        operation: impl FnOnce(&mut SimState, u64) -> io::Result<R>,
    ) -> io::Result<R> {
        let mut state = self.disk.lock();
        if state.generation != self.generation {
            return Err(io::Error::other(
                "stale file handle: the disk crashed after the file was opened",
            ));
        }
        if !state.inodes.contains_key(&self.inode) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the file was removed",
            ));
        }
        operation(&mut state, self.inode)
    }
}

impl DiskFile for SimDiskFile {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.with_inode(|state, inode| {
            state.stats.bytes_written += bytes.len() as u64;
            let inode = state.inodes.get_mut(&inode).expect("checked");
            inode.content.extend_from_slice(bytes);
            Ok(())
        })
    }

    fn truncate(&mut self, length_bytes: u64) -> io::Result<()> {
        self.with_inode(|state, inode| {
            let inode = state.inodes.get_mut(&inode).expect("checked");
            let length_bytes = usize::try_from(length_bytes).map_err(io::Error::other)?;
            // Like ftruncate, growing fills with zeros.
            inode.content.resize(length_bytes, 0);
            inode.synced_bytes = inode.synced_bytes.min(length_bytes);
            // Pages past the new end are discarded, with their failed write-back.
            for lost in &mut inode.lost {
                lost.end = lost.end.min(length_bytes);
                lost.start = lost.start.min(lost.end);
            }
            inode.lost.retain(|lost| !lost.is_empty());
            Ok(())
        })
    }

    fn sync(&mut self) -> io::Result<()> {
        self.with_inode(|state, inode_number| {
            state.stats.file_syncs += 1;
            let failed = state.take_fsync_failure();
            let inode = state.inodes.get_mut(&inode_number).expect("checked");
            if failed {
                let unsynced = inode.synced_bytes..inode.content.len();
                if !unsynced.is_empty() {
                    inode.lost.push(unsynced);
                }
                return Err(injected_fsync_failure());
            }
            let mut durable = inode.content.clone();
            for lost in inode.lost.drain(..) {
                let end = lost.end.min(durable.len());
                let start = lost.start.min(end);
                durable[start..end].fill(0);
            }
            inode.durable = durable;
            inode.synced_bytes = inode.content.len();
            Ok(())
        })
    }
}

/// SplitMix64 (Steele, Lea and Flood, 2014): a tiny generator whose output for a seed is fixed
/// forever, which is what a replayable simulation seed needs.
#[derive(Debug, Clone)]
struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = self.state;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^ (mixed >> 31)
    }

    /// A value in `0..bound`; the modulo bias is irrelevant for fault injection.
    fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "empty range");
        self.next() % bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(disk: &SimDisk, path: &str, bytes: &[u8], sync: bool) -> SimDiskFile {
        let mut file = disk.open_append(Path::new(path)).unwrap();
        file.append(bytes).unwrap();
        if sync {
            file.sync().unwrap();
        }
        file
    }

    fn read(disk: &SimDisk, path: &str) -> Option<Vec<u8>> {
        disk.read_file(Path::new(path)).ok()
    }

    #[test]
    fn unsynced_file_name_is_lost_in_crash() {
        let disk = SimDisk::new();
        write(&disk, "file", b"data", true);
        disk.crash(Crash::Clean);
        assert_eq!(read(&disk, "file"), None, "the directory was never synced");
    }

    #[test]
    fn crash_keeps_exactly_the_synced_bytes() {
        let disk = SimDisk::new();
        let mut file = write(&disk, "file", b"durable", true);
        disk.sync_directory(Path::new("")).unwrap();
        file.append(b" volatile").unwrap();
        assert_eq!(read(&disk, "file").unwrap(), b"durable volatile");
        disk.crash(Crash::Clean);
        assert_eq!(read(&disk, "file").unwrap(), b"durable");
        assert!(file.append(b"x").is_err(), "handles die with the crash");
    }

    #[test]
    fn torn_file_keeps_a_garbled_prefix() {
        let disk = SimDisk::new();
        let mut file = write(&disk, "file", b"abc", true);
        disk.sync_directory(Path::new("")).unwrap();
        file.append(b"defgh").unwrap();
        disk.crash(Crash::TornFile {
            path: PathBuf::from("file"),
            kept_bytes: 3,
            garbled_bytes: 1,
        });
        assert_eq!(
            read(&disk, "file").unwrap(),
            [b'a', b'b', b'c', b'd', b'e', b'f' ^ 0xFF]
        );
    }

    #[test]
    fn seeded_torn_crash_is_deterministic() {
        let run = |seed| {
            let disk = SimDisk::new();
            let mut file = write(&disk, "file", b"0123", true);
            disk.sync_directory(Path::new("")).unwrap();
            file.append(&[7; 64]).unwrap();
            disk.crash(Crash::Torn { seed });
            read(&disk, "file").unwrap()
        };
        for seed in 0..20 {
            let content = run(seed);
            assert_eq!(content, run(seed));
            assert!(content.starts_with(b"0123"), "durable bytes are never torn");
            assert!(content.len() <= 68);
        }
    }

    #[test]
    fn failed_fsync_loses_data_even_after_a_later_successful_fsync() {
        let disk = SimDisk::new();
        let mut file = write(&disk, "file", b"ok", true);
        disk.sync_directory(Path::new("")).unwrap();
        file.append(b"lost").unwrap();
        disk.fail_next_fsync(1);
        assert!(file.sync().is_err());
        assert_eq!(
            read(&disk, "file").unwrap(),
            b"oklost",
            "the page cache still shows it"
        );
        file.append(b"!").unwrap();
        file.sync().unwrap();
        disk.crash(Crash::Clean);
        assert_eq!(read(&disk, "file").unwrap(), b"ok\0\0\0\0!");
        assert_eq!(disk.stats().syncs_failed, 1);
    }

    #[test]
    fn rename_is_durable_only_after_directory_sync() {
        let disk = SimDisk::new();
        disk.create_directory_all(Path::new("d")).unwrap();
        disk.sync_directory(Path::new("")).unwrap();
        disk.write_file_atomic(Path::new("d/f"), &[b"one"]).unwrap();
        let mut file = write(&disk, "d/g", b"two", true);
        file.sync().unwrap();
        disk.rename(Path::new("d/g"), Path::new("d/f")).unwrap();
        assert_eq!(read(&disk, "d/f").unwrap(), b"two");
        disk.crash(Crash::Clean);
        assert_eq!(read(&disk, "d/f").unwrap(), b"one");
        assert_eq!(disk.list_directory(Path::new("d")).unwrap(), ["f"]);
    }

    #[test]
    fn unsynced_directory_disappears_with_its_files() {
        let disk = SimDisk::new();
        disk.create_directory_all(Path::new("d")).unwrap();
        write(&disk, "d/f", b"x", true);
        disk.sync_directory(Path::new("d")).unwrap();
        disk.crash(Crash::Clean);
        assert!(disk.list_directory(Path::new("d")).is_err());
        assert_eq!(
            disk.list_directory(Path::new("")).unwrap(),
            Vec::<String>::new()
        );
    }
}
