//! A task's stdout and stderr on disk: each stream is read from a pipe and
//! written to `<data-dir>/allocs/<alloc id>/<task>.stdout` (or `.stderr`),
//! rotated by size (`.1` is the previous file, `.2` the one before) so a
//! chatty task never holds more than [`LOG_FILES_KEPT`] ×
//! [`LOG_FILE_BYTES_MAX`] bytes per stream; and the reading side for
//! `GET /v1/allocation/<id>/logs` (the newest bytes, then, when following,
//! what is appended, across rotations).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// Largest log file before it is rotated (Nomad's default `max_file_size`).
pub const LOG_FILE_BYTES_MAX: u64 = 10 * 1024 * 1024;
/// Files kept per stream, the current one included (Nomad keeps 10; three
/// keeps a task's logs at 30 MiB per stream).
pub const LOG_FILES_KEPT: usize = 3;
/// Bytes read from a task's pipe at a time.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Most bytes a logs request returns before following (the newest ones).
pub const LOG_RESPONSE_BYTES_MAX: u64 = 1024 * 1024;
/// How often a followed log file is looked at for new bytes.
pub const FOLLOW_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Longest a follow stream lasts; the client asks again if it wants more.
pub const FOLLOW_DURATION_MAX: Duration = Duration::from_secs(30 * 60);

/// Which stream of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }

    pub fn parse(text: &str) -> Option<LogStream> {
        match text {
            "stdout" => Some(LogStream::Stdout),
            "stderr" => Some(LogStream::Stderr),
            _ => None,
        }
    }
}

/// The current log file of `task`'s `stream` in an allocation's directory.
pub fn log_path(alloc_dir: &Path, task: &str, stream: LogStream) -> PathBuf {
    alloc_dir.join(format!("{task}.{}", stream.as_str()))
}

/// The `generation`th older file (`1` is the previous one).
fn rotated_path(current: &Path, generation: usize) -> PathBuf {
    let mut name = current.as_os_str().to_owned();
    name.push(format!(".{generation}"));
    PathBuf::from(name)
}

/// Copies `pipe` into the rotated files of `current` until the pipe closes
/// (the task and every process holding its end exited).
pub async fn copy_rotated(
    mut pipe: impl AsyncRead + Unpin,
    current: PathBuf,
) -> std::io::Result<()> {
    copy_rotated_with(&mut pipe, &current, LOG_FILE_BYTES_MAX, LOG_FILES_KEPT).await
}

async fn open_append(path: &Path) -> std::io::Result<(tokio::fs::File, u64)> {
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await?;
    let length = file.metadata().await?.len();
    Ok((file, length))
}

async fn rotate(current: &Path, files_kept: usize) -> std::io::Result<()> {
    for generation in (1..files_kept).rev() {
        let from = if generation == 1 {
            current.to_path_buf()
        } else {
            rotated_path(current, generation - 1)
        };
        match tokio::fs::rename(&from, rotated_path(current, generation)).await {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    if files_kept <= 1 {
        tokio::fs::remove_file(current).await.or_else(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(error)
            }
        })?;
    }
    Ok(())
}

async fn copy_rotated_with(
    pipe: &mut (impl AsyncRead + Unpin),
    current: &Path,
    file_bytes_max: u64,
    files_kept: usize,
) -> std::io::Result<()> {
    let (mut file, mut length) = open_append(current).await?;
    let mut buffer = vec![0u8; READ_CHUNK_BYTES];
    loop {
        let read = pipe.read(&mut buffer).await?;
        if read == 0 {
            file.flush().await?;
            return Ok(());
        }
        let mut chunk = &buffer[..read];
        while !chunk.is_empty() {
            if length >= file_bytes_max {
                file.flush().await?;
                drop(file);
                rotate(current, files_kept).await?;
                (file, length) = open_append(current).await?;
            }
            let room = (file_bytes_max - length).min(chunk.len() as u64) as usize;
            file.write_all(&chunk[..room]).await?;
            length += room as u64;
            chunk = &chunk[room..];
        }
    }
}

/// The newest bytes of a stream, at most `limit`, across its rotated files
/// (oldest first), and where the current file was read up to.
pub async fn tail(current: &Path, limit: u64) -> std::io::Result<(Vec<u8>, u64)> {
    let mut pieces: Vec<Vec<u8>> = Vec::new();
    let mut remaining = limit;
    let mut current_length = 0;
    for generation in 0..LOG_FILES_KEPT {
        if remaining == 0 {
            break;
        }
        let path = if generation == 0 {
            current.to_path_buf()
        } else {
            rotated_path(current, generation)
        };
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        let length = file.metadata().await?.len();
        if generation == 0 {
            current_length = length;
        }
        let start = length.saturating_sub(remaining);
        file.seek(std::io::SeekFrom::Start(start)).await?;
        let mut piece = Vec::with_capacity((length - start) as usize);
        (&mut file)
            .take(length - start)
            .read_to_end(&mut piece)
            .await?;
        remaining -= piece.len() as u64;
        pieces.push(piece);
    }
    pieces.reverse();
    Ok((pieces.concat(), current_length))
}

/// Bytes appended to `current` after `offset` (at most `limit`), and the new
/// offset. A file shorter than `offset` was rotated: reading starts again
/// at its beginning.
pub async fn read_from(current: &Path, offset: u64, limit: u64) -> std::io::Result<(Vec<u8>, u64)> {
    let mut file = match tokio::fs::File::open(current).await {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(error) => return Err(error),
    };
    let length = file.metadata().await?.len();
    let start = if length < offset { 0 } else { offset };
    file.seek(std::io::SeekFrom::Start(start)).await?;
    let mut bytes = Vec::new();
    (&mut file).take(limit).read_to_end(&mut bytes).await?;
    let end = start + bytes.len() as u64;
    Ok((bytes, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rotation_keeps_the_bound_and_the_newest_bytes() {
        let directory = tempfile::tempdir().unwrap();
        let current = directory.path().join("task.stdout");
        let input: Vec<u8> = (0..10_000u32)
            .flat_map(|line| format!("line {line:05}\n").into_bytes())
            .collect();
        let mut pipe: &[u8] = &input;
        copy_rotated_with(&mut pipe, &current, 4096, 3)
            .await
            .unwrap();
        let mut total = 0;
        for path in [
            current.clone(),
            rotated_path(&current, 1),
            rotated_path(&current, 2),
        ] {
            let length = std::fs::metadata(&path).unwrap().len();
            assert!(length <= 4096, "{} holds {length} bytes", path.display());
            total += length;
        }
        assert!(!rotated_path(&current, 3).exists());
        let (tail_bytes, _) = tail(&current, total).await.unwrap();
        assert!(input.ends_with(&tail_bytes));
        assert_eq!(tail_bytes.len() as u64, total);
        let (last, _) = tail(&current, 11).await.unwrap();
        assert_eq!(last, b"line 09999\n");
    }

    #[tokio::test]
    async fn reading_on_restarts_after_a_rotation() {
        let directory = tempfile::tempdir().unwrap();
        let current = directory.path().join("task.stderr");
        std::fs::write(&current, b"abcdef").unwrap();
        let (bytes, offset) = read_from(&current, 2, 100).await.unwrap();
        assert_eq!(bytes, b"cdef");
        assert_eq!(offset, 6);
        std::fs::write(&current, b"xy").unwrap();
        let (bytes, offset) = read_from(&current, offset, 100).await.unwrap();
        assert_eq!(bytes, b"xy");
        assert_eq!(offset, 2);
    }
}
