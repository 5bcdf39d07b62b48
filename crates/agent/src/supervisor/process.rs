//! A task's processes: started in a process group of their own (so the
//! whole tree is signalled at once), with their output piped to the log
//! files, recorded in `<data-dir>/allocs/<alloc id>/pids` so that an agent
//! started again after a crash finds and kills what its previous life left
//! behind.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use keel_scheduler::TaskLaunch;
use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::resource_limits::{Applied, WRAPPER_SHELL};

/// The file, in an allocation's directory, naming its running process groups.
pub const PIDS_FILE: &str = "pids";
/// The capacity asked for each task output pipe (Linux's default is 64 KiB;
/// 1 MiB is the default `/proc/sys/fs/pipe-max-size`).
pub const PIPE_BUFFER_BYTES: i32 = 1024 * 1024;
/// Most allocation directories looked at for leftovers at start.
pub const LEFTOVER_DIRECTORIES_MAX: usize = 10_000;

/// A process group leader, identified beyond its PID: a PID whose start
/// time differs is another process that reused the number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedProcess {
    pub pid: u32,
    /// Seconds since the epoch, as sysinfo reports it.
    pub start_time: u64,
}

/// The start time of `pid`, if it runs.
pub fn start_time_of(pid: u32) -> Option<u64> {
    let mut system = sysinfo::System::new();
    let target = sysinfo::Pid::from_u32(pid);
    system.refresh_processes_specifics(
        sysinfo::ProcessesToUpdate::Some(&[target]),
        true,
        sysinfo::ProcessRefreshKind::nothing(),
    );
    system.process(target).map(sysinfo::Process::start_time)
}

/// Writes an allocation's running process groups (atomically).
pub fn write_pids(
    alloc_dir: &Path,
    pids: &BTreeMap<String, RecordedProcess>,
) -> std::io::Result<()> {
    let path = alloc_dir.join(PIDS_FILE);
    if pids.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        };
    }
    let temporary = alloc_dir.join(format!("{PIDS_FILE}.tmp"));
    std::fs::write(
        &temporary,
        serde_json::to_vec(pids).expect("pids serialise"),
    )?;
    std::fs::rename(temporary, path)
}

/// Kills every process group recorded under `allocs_dir` by a previous run
/// of the agent (SIGKILL: the previous agent is gone, nobody reads their
/// output any more), and forgets them. Returns the groups killed, by
/// allocation id.
pub fn kill_leftovers(allocs_dir: &Path) -> BTreeMap<String, Vec<u32>> {
    let mut killed = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(allocs_dir) else {
        return killed;
    };
    for entry in entries.flatten().take(LEFTOVER_DIRECTORIES_MAX) {
        let path = entry.path().join(PIDS_FILE);
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let alloc_id = entry.file_name().to_string_lossy().into_owned();
        let recorded: BTreeMap<String, RecordedProcess> = match serde_json::from_slice(&bytes) {
            Ok(recorded) => recorded,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "unreadable pids file; ignored");
                let _ = std::fs::remove_file(&path);
                continue;
            }
        };
        for (task, process) in recorded {
            // A leader still running with another start time is a new
            // process that reused the PID: leave it alone. A leader gone
            // while its group lives keeps the number from being reused
            // (the kernel holds a PID while a group uses it), so the
            // group is killed then too.
            let reused = start_time_of(process.pid)
                .is_some_and(|start_time| start_time != process.start_time);
            if reused {
                continue;
            }
            if killpg(Pid::from_raw(process.pid as i32), Signal::SIGKILL).is_ok() {
                tracing::warn!(alloc = %alloc_id, %task, pid = process.pid, "killed a task left over by the agent's previous run");
                killed
                    .entry(alloc_id.clone())
                    .or_insert_with(Vec::new)
                    .push(process.pid);
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    killed
}

/// A started task.
pub struct Started {
    pub child: tokio::process::Child,
    pub pid: u32,
    pub start_time: u64,
}

/// Why a task could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("command {0:?} not found (not a file, and not in PATH)")]
    NotFound(String),
    #[error("working directory {path}: {source}")]
    WorkDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {command:?}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
}

/// Whether `command` names a program that exists (a path, or a name found
/// in `PATH`), so that a typo is reported as a start failure rather than
/// as the wrapper shell's exit code 127.
fn command_exists(command: &str) -> bool {
    if command.contains('/') {
        return Path::new(command).is_file();
    }
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|directory| directory.join(command).is_file())
    })
}

/// Starts a task in its own process group, in `alloc_dir` (or the job's
/// `work_dir`, relative to it), its limits applied by the wrapper.
pub fn start(
    launch: &TaskLaunch,
    limits: &Applied,
    alloc_dir: &Path,
) -> Result<Started, StartError> {
    if !command_exists(&launch.command) {
        return Err(StartError::NotFound(launch.command.clone()));
    }
    let work_dir = match &launch.work_dir {
        Some(directory) => alloc_dir.join(directory),
        None => alloc_dir.to_path_buf(),
    };
    std::fs::create_dir_all(&work_dir).map_err(|source| StartError::WorkDir {
        path: work_dir.clone(),
        source,
    })?;
    let mut command = tokio::process::Command::new(WRAPPER_SHELL);
    command
        .args(&limits.wrapper_arguments)
        .arg(&launch.command)
        .args(&launch.args)
        .envs(&launch.env)
        .current_dir(&work_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        // A crashed agent leaves its tasks running (as kill -9 would);
        // the next agent kills them from the pids file.
        .kill_on_drop(false);
    let child = command.spawn().map_err(|source| StartError::Spawn {
        command: launch.command.clone(),
        source,
    })?;
    // A wider pipe lets a task keep writing while the agent is paused
    // (SIGSTOP, a long GC-like stall) before its writes block.
    for pipe in [
        child.stdout.as_ref().map(|pipe| pipe.as_fd()),
        child.stderr.as_ref().map(|pipe| pipe.as_fd()),
    ]
    .into_iter()
    .flatten()
    {
        if let Err(error) = fcntl(pipe, FcntlArg::F_SETPIPE_SZ(PIPE_BUFFER_BYTES)) {
            tracing::debug!(%error, "cannot widen a task's output pipe");
        }
    }
    let pid = child.id().unwrap_or(0);
    let start_time = start_time_of(pid).unwrap_or(0);
    Ok(Started {
        child,
        pid,
        start_time,
    })
}

/// Signals a task's whole process group (ignoring a group already gone).
pub fn signal_group(pid: u32, signal: Signal) {
    if pid == 0 {
        return;
    }
    let _ = killpg(Pid::from_raw(pid as i32), signal);
}

/// Stops a task: SIGTERM to its group, SIGKILL after `kill_timeout` if the
/// leader has not exited, then SIGKILL to what is left of the group.
/// Returns the leader's exit status.
pub async fn stop(
    child: &mut tokio::process::Child,
    pid: u32,
    kill_timeout: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    signal_group(pid, Signal::SIGTERM);
    let status = match tokio::time::timeout(kill_timeout, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            signal_group(pid, Signal::SIGKILL);
            child.wait().await
        }
    };
    signal_group(pid, Signal::SIGKILL);
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::resource_limits::Limiter;

    #[tokio::test]
    async fn a_task_runs_in_its_own_group_with_wide_output_pipes() {
        let directory = tempfile::tempdir().unwrap();
        let launch = TaskLaunch {
            command: "sleep".into(),
            args: vec!["30".into()],
            env: BTreeMap::new(),
            work_dir: None,
        };
        let limits = Limiter::Rlimits {
            reason: "test".into(),
        }
        .apply("test.task", 100, 64);
        let mut started = start(&launch, &limits, directory.path()).unwrap();
        let stdout = started.child.stdout.as_ref().unwrap();
        let size = fcntl(stdout.as_fd(), FcntlArg::F_GETPIPE_SZ).unwrap();
        assert_eq!(size, PIPE_BUFFER_BYTES);
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", started.pid)).unwrap();
        let group: u32 = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .nth(2)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(group, started.pid, "the task leads its own process group");
        let exit = stop(&mut started.child, started.pid, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&exit),
            Some(15)
        );
        assert!(matches!(
            start(
                &TaskLaunch {
                    command: "no-such-command-anywhere".into(),
                    ..launch
                },
                &limits,
                directory.path()
            ),
            Err(StartError::NotFound(_))
        ));
    }
}
