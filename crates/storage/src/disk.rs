//! The `Disk` trait: the few file operations the write-ahead log and the snapshot store need,
//! and `FileDisk`, its implementation over real files.
//!
//! The trait is deliberately small and synchronous so that a simulated disk can model every
//! operation's durability exactly (see `sim_disk`). Paths are relative to the disk's root and
//! use `/` separators; the root itself is the empty path. Two rules of POSIX durability shape
//! the interface, and the callers follow both:
//! - bytes appended to a file survive a crash only after that file is fsynced ([`DiskFile::sync`]);
//! - a file created, renamed or removed survives a crash only after its directory is fsynced
//!   ([`Disk::sync_directory`]).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// File operations over a directory tree rooted somewhere; see the module documentation.
pub trait Disk {
    /// A file open for appending.
    type File: DiskFile;

    /// Creates `directory` and any missing parents. The new entries are durable only after the
    /// parent directory is synced.
    fn create_directory_all(&self, directory: &Path) -> io::Result<()>;

    /// Names of the entries of `directory`, sorted bytewise.
    fn list_directory(&self, directory: &Path) -> io::Result<Vec<String>>;

    /// Opens `path` for appending, creating it empty if it does not exist.
    fn open_append(&self, path: &Path) -> io::Result<Self::File>;

    /// The whole content of `path` as the operating system currently sees it (including bytes
    /// not yet fsynced).
    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>>;

    /// Atomically replaces `to` with `from`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;

    /// Removes the file `path`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;

    /// Makes creations, renames and removals of entries in `directory` durable.
    fn sync_directory(&self, directory: &Path) -> io::Result<()>;

    /// Writes the concatenation of `parts` to `path` so that after a crash `path` holds either
    /// its old content or all of it, never a mix: write a temporary file, fsync it, rename it
    /// over `path`, fsync the directory. The temporary file is `path` with [`TEMPORARY_SUFFIX`]
    /// appended, so that owners of a directory can remove leftovers from a crash. The content
    /// comes in parts so that a large snapshot is written from where it already is in memory,
    /// never copied behind a header first.
    ///
    /// A large file is written and fsynced [`ATOMIC_WRITE_SYNC_BYTES`] at a time, so that
    /// it never builds a backlog of dirty pages: on ext4 (data=ordered) a member's log fsync
    /// waits for the journal commit that carries them, and one fsync of a snapshot of a
    /// hundred megabytes held the log's fsyncs for hundreds of milliseconds.
    fn write_file_atomic(&self, path: &Path, parts: &[&[u8]]) -> io::Result<()> {
        let temporary_path = temporary_path_for(path);
        let mut file = self.open_append(&temporary_path)?;
        // A leftover from an earlier crash may exist; start it over.
        file.truncate(0)?;
        let mut unsynced_bytes = 0;
        for part in parts {
            for chunk in part.chunks(ATOMIC_WRITE_SYNC_BYTES) {
                file.append(chunk)?;
                unsynced_bytes += chunk.len();
                if unsynced_bytes >= ATOMIC_WRITE_SYNC_BYTES {
                    file.sync()?;
                    unsynced_bytes = 0;
                }
            }
        }
        file.sync()?;
        drop(file);
        self.rename(&temporary_path, path)?;
        self.sync_directory(parent_directory(path))
    }
}

/// A file open for appending, from [`Disk::open_append`].
pub trait DiskFile {
    /// Appends `bytes` at the end of the file. Not durable until [`DiskFile::sync`].
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;

    /// Cuts the file to `length_bytes`; later appends continue from there. Not durable until
    /// [`DiskFile::sync`].
    fn truncate(&mut self, length_bytes: u64) -> io::Result<()>;

    /// Makes the file's content durable (fdatasync). After an error, the bytes written since
    /// the last successful sync must be presumed lost whatever later syncs report.
    fn sync(&mut self) -> io::Result<()>;
}

/// [`Disk::write_file_atomic`] fsyncs after every this many bytes: at the
/// 233 MB/s of the benchmark machine's disk (docs/BENCHMARKS.md), about 20 ms
/// of writing, the longest a log fsync then waits behind one of them.
pub const ATOMIC_WRITE_SYNC_BYTES: usize = 4 * 1024 * 1024;

/// Suffix of the temporary files of [`Disk::write_file_atomic`].
pub const TEMPORARY_SUFFIX: &str = ".tmp";

/// The temporary file that [`Disk::write_file_atomic`] uses for `path`.
pub(crate) fn temporary_path_for(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(TEMPORARY_SUFFIX);
    PathBuf::from(name)
}

/// The directory holding `path`; the root (empty path) for a top-level name.
pub(crate) fn parent_directory(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new(""))
}

/// Faults injected into a [`FileDisk`] by an operator's chaos experiment (the server's
/// fault injector decides when; the disk only asks before each write and each fsync).
/// An error returned here takes the place of the real operation's result, so the log
/// reacts exactly as to a real failing disk: an fsync error stops the member.
pub trait DiskFaults: std::fmt::Debug + Send + Sync {
    /// Called before bytes are appended; an error fails the append.
    fn before_write(&self) -> io::Result<()>;
    /// Called before an fsync; may sleep (a slow disk), and an error fails the fsync.
    fn before_sync(&self) -> io::Result<()>;
}

/// [`Disk`] over real files below a root directory.
#[derive(Debug, Clone)]
pub struct FileDisk {
    root: PathBuf,
    faults: Option<std::sync::Arc<dyn DiskFaults>>,
    /// A deliberately broken mode for the fault suite's self-test: see
    /// [`FileDisk::with_unsafe_acknowledge_before_write`].
    acknowledge_before_write: bool,
}

impl FileDisk {
    /// A disk rooted at `root`, which must exist.
    pub fn new(root: impl Into<PathBuf>) -> FileDisk {
        FileDisk {
            root: root.into(),
            faults: None,
            acknowledge_before_write: false,
        }
    }

    /// The same disk, asking `faults` before every append and fsync of its files.
    pub fn with_faults(mut self, faults: std::sync::Arc<dyn DiskFaults>) -> FileDisk {
        self.faults = Some(faults);
        self
    }

    /// BROKEN ON PURPOSE, for testing the tests: appended bytes stay in memory until the
    /// file is closed or truncated, so a sync returns before its data is even written and
    /// a SIGKILL loses every write acknowledged since. (Keeping only the last batch back
    /// made the loss depend on which batch each member happened to hold when all were
    /// killed, so the suite's self-test passed by luck now and then.) The fault suite must
    /// fail against a member in this mode (`--unsafe-fault-acknowledge-before-fsync`).
    pub fn with_unsafe_acknowledge_before_write(mut self) -> FileDisk {
        self.acknowledge_before_write = true;
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn resolve(&self, path: &Path) -> PathBuf {
        assert!(
            path.is_relative(),
            "disk paths are relative to the root, got {}",
            path.display()
        );
        self.root.join(path)
    }
}

impl Disk for FileDisk {
    type File = FileDiskFile;

    fn create_directory_all(&self, directory: &Path) -> io::Result<()> {
        fs::create_dir_all(self.resolve(directory))
    }

    fn list_directory(&self, directory: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(self.resolve(directory))? {
            let name = entry?.file_name().into_string().map_err(|name| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("file name {name:?} is not UTF-8"),
                )
            })?;
            names.push(name);
        }
        names.sort();
        Ok(names)
    }

    fn open_append(&self, path: &Path) -> io::Result<FileDiskFile> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.resolve(path))?;
        Ok(FileDiskFile {
            file,
            faults: self.faults.clone(),
            acknowledge_before_write: self.acknowledge_before_write,
            pending: Vec::new(),
        })
    }

    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(self.resolve(path))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(self.resolve(from), self.resolve(to))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(self.resolve(path))
    }

    fn sync_directory(&self, directory: &Path) -> io::Result<()> {
        if let Some(faults) = &self.faults {
            faults.before_sync()?;
        }
        // On Linux a directory opened read-only can be fsynced, which persists its entries.
        fs::File::open(self.resolve(directory))?.sync_all()
    }
}

/// A real file open for appending.
#[derive(Debug)]
pub struct FileDiskFile {
    file: fs::File,
    faults: Option<std::sync::Arc<dyn DiskFaults>>,
    acknowledge_before_write: bool,
    /// In the broken mode: every byte appended since the file was opened or truncated.
    pending: Vec<u8>,
}

impl FileDiskFile {
    /// Writes everything the broken mode kept in memory (not synced).
    fn write_kept(&mut self) -> io::Result<()> {
        let pending = std::mem::take(&mut self.pending);
        self.file.write_all(&pending)
    }
}

impl Drop for FileDiskFile {
    fn drop(&mut self) {
        // Only a killed process loses what the broken mode kept; a closed file keeps it.
        if self.acknowledge_before_write {
            let _ = self.write_kept();
        }
    }
}

impl DiskFile for FileDiskFile {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if let Some(faults) = &self.faults {
            faults.before_write()?;
        }
        if self.acknowledge_before_write {
            self.pending.extend_from_slice(bytes);
            return Ok(());
        }
        self.file.write_all(bytes)
    }

    fn truncate(&mut self, length_bytes: u64) -> io::Result<()> {
        if self.acknowledge_before_write {
            self.write_kept()?;
        }
        // The file is in append mode, so the next write lands at the new end.
        self.file.set_len(length_bytes)
    }

    fn sync(&mut self) -> io::Result<()> {
        if let Some(faults) = &self.faults {
            faults.before_sync()?;
        }
        if self.acknowledge_before_write {
            // Claims durability for bytes not even written.
            return Ok(());
        }
        // fdatasync: the file's size is data for this purpose, so appends are covered.
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_disk_round_trip() {
        let directory = tempfile::tempdir().unwrap();
        let disk = FileDisk::new(directory.path());
        disk.create_directory_all(Path::new("a/b")).unwrap();
        disk.sync_directory(Path::new("")).unwrap();
        let path = Path::new("a/b/file");
        let mut file = disk.open_append(path).unwrap();
        file.append(b"hello ").unwrap();
        file.append(b"world").unwrap();
        file.sync().unwrap();
        assert_eq!(disk.read_file(path).unwrap(), b"hello world");
        file.truncate(5).unwrap();
        file.append(b"!").unwrap();
        file.sync().unwrap();
        assert_eq!(disk.read_file(path).unwrap(), b"hello!");
        assert_eq!(disk.list_directory(Path::new("a/b")).unwrap(), ["file"]);

        disk.write_file_atomic(Path::new("a/atomic"), &[b"o", b"ne"])
            .unwrap();
        disk.write_file_atomic(Path::new("a/atomic"), &[b"two"])
            .unwrap();
        assert_eq!(disk.read_file(Path::new("a/atomic")).unwrap(), b"two");
        assert_eq!(
            disk.list_directory(Path::new("a")).unwrap(),
            ["atomic", "b"],
            "the temporary file is renamed away"
        );
        disk.remove_file(Path::new("a/atomic")).unwrap();
        assert_eq!(disk.list_directory(Path::new("a")).unwrap(), ["b"]);
    }

    /// Counts the fsyncs a [`FileDisk`] makes.
    #[derive(Debug, Default)]
    struct SyncCounter(std::sync::atomic::AtomicUsize);

    impl DiskFaults for SyncCounter {
        fn before_write(&self) -> io::Result<()> {
            Ok(())
        }
        fn before_sync(&self) -> io::Result<()> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
    }

    /// A large atomic write is fsynced chunk by chunk (never one backlog of
    /// dirty pages), and its parts still land in order across chunk bounds.
    #[test]
    fn a_large_atomic_write_is_synced_in_chunks() {
        let directory = tempfile::tempdir().unwrap();
        let counter = std::sync::Arc::new(SyncCounter::default());
        let disk = FileDisk::new(directory.path()).with_faults(counter.clone());
        let head = vec![1u8; 3];
        let body: Vec<u8> = (0..2 * ATOMIC_WRITE_SYNC_BYTES + 5)
            .map(|byte| (byte % 251) as u8)
            .collect();
        disk.write_file_atomic(Path::new("big"), &[&head, &body])
            .unwrap();
        let mut expected = head.clone();
        expected.extend_from_slice(&body);
        assert_eq!(disk.read_file(Path::new("big")).unwrap(), expected);
        // Two full chunks, the rest at the end, and the directory.
        assert_eq!(
            counter.0.load(std::sync::atomic::Ordering::Relaxed),
            2 + 1 + 1
        );
    }

    #[test]
    fn temporary_path_appends_suffix() {
        assert_eq!(
            temporary_path_for(Path::new("snap/x.snap")),
            Path::new("snap/x.snap.tmp")
        );
        assert_eq!(parent_directory(Path::new("top")), Path::new(""));
    }
}
