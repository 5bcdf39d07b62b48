//! `MeteredDisk`: the member's real disk, timed where etcd times its own.
//!
//! The write-ahead log writes through files it opens for appending and makes
//! them durable with [`DiskFile::sync`]: each such sync is one observation of
//! `etcd_disk_wal_fsync_duration_seconds`, and the bytes appended count in
//! `etcd_disk_wal_write_bytes_total`. The snapshot store writes whole files
//! with [`Disk::write_file_atomic`] (write, fsync, rename, fsync the
//! directory): that is when keel's backend, the in-memory key space, is
//! committed to disk, so it is what `etcd_disk_backend_commit_duration_seconds`
//! times. Wrapping the disk keeps the timing out of `storage` and `core`, whose
//! logic must stay free of clocks.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use keel_storage::{Disk, DiskFile, FileDisk};

use crate::metrics::MemberMetrics;

/// A [`FileDisk`] whose syncs and atomic writes are timed into the member's metrics.
#[derive(Debug, Clone)]
pub struct MeteredDisk {
    inner: FileDisk,
    metrics: Arc<MemberMetrics>,
}

impl MeteredDisk {
    /// `inner`, timed into `metrics`.
    pub fn new(inner: FileDisk, metrics: Arc<MemberMetrics>) -> MeteredDisk {
        MeteredDisk { inner, metrics }
    }
}

/// A file of a [`MeteredDisk`]: appends are counted, syncs timed.
#[derive(Debug)]
pub struct MeteredFile {
    inner: <FileDisk as Disk>::File,
    metrics: Arc<MemberMetrics>,
}

impl DiskFile for MeteredFile {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.inner.append(bytes)?;
        self.metrics.wal_write_bytes.inc_by(bytes.len() as u64);
        Ok(())
    }

    fn truncate(&mut self, length_bytes: u64) -> io::Result<()> {
        self.inner.truncate(length_bytes)
    }

    fn sync(&mut self) -> io::Result<()> {
        let started = Instant::now();
        let result = self.inner.sync();
        self.metrics
            .wal_fsync_duration
            .observe(started.elapsed().as_secs_f64());
        result
    }
}

impl Disk for MeteredDisk {
    type File = MeteredFile;

    fn create_directory_all(&self, directory: &Path) -> io::Result<()> {
        self.inner.create_directory_all(directory)
    }

    fn list_directory(&self, directory: &Path) -> io::Result<Vec<String>> {
        self.inner.list_directory(directory)
    }

    fn open_append(&self, path: &Path) -> io::Result<MeteredFile> {
        Ok(MeteredFile {
            inner: self.inner.open_append(path)?,
            metrics: self.metrics.clone(),
        })
    }

    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.inner.read_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_file(path)
    }

    fn sync_directory(&self, directory: &Path) -> io::Result<()> {
        self.inner.sync_directory(directory)
    }

    fn write_file_atomic(&self, path: &Path, parts: &[&[u8]]) -> io::Result<()> {
        // The inner disk's own implementation, so its syncs are not counted
        // as the log's.
        let started = Instant::now();
        let result = self.inner.write_file_atomic(path, parts);
        self.metrics
            .backend_commit_duration
            .observe(started.elapsed().as_secs_f64());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_syncs_and_snapshot_writes_are_told_apart() {
        let directory = tempfile::tempdir().unwrap();
        let metrics = Arc::new(MemberMetrics::new("3.5.0"));
        let disk = MeteredDisk::new(FileDisk::new(directory.path()), metrics.clone());
        let mut file = disk.open_append(Path::new("log")).unwrap();
        file.append(b"12345").unwrap();
        file.sync().unwrap();
        disk.write_file_atomic(Path::new("snapshot"), &[b"image"])
            .unwrap();
        let text = metrics.encode();
        for line in [
            "etcd_disk_wal_fsync_duration_seconds_count 1",
            "etcd_disk_wal_write_bytes_total 5",
            "etcd_disk_backend_commit_duration_seconds_count 1",
        ] {
            assert!(text.lines().any(|got| got == line), "{line:?} in\n{text}");
        }
    }
}
