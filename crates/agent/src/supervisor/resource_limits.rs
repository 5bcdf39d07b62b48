//! Memory and CPU limits of a task: a cgroup v2 child of the agent's own
//! cgroup (`memory.max`, `cpu.max`) when the machine lets the agent create
//! one, `RLIMIT_AS` otherwise.
//!
//! The limits are applied by a `/bin/sh` wrapper that the task then `exec`s
//! into (same PID): it moves itself into the task's cgroup (`echo $$ >
//! cgroup.procs`) or sets its address-space limit (`ulimit -v`) *before* the
//! task's program runs, so no allocation and no child of the task escapes
//! them. (The workspace forbids `unsafe`, hence no `pre_exec` hook.)

use std::path::{Path, PathBuf};

use super::status::ResourceLimits;

/// Where the cgroup v2 hierarchy is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The directory, under the agent's cgroup, holding one cgroup per task.
const ALLOCATIONS_CGROUP: &str = "keel-allocations";
/// The leaf the agent moves itself into when its own cgroup must have no
/// processes for controllers to be enabled below it (cgroup v2's "no
/// internal processes" rule).
const AGENT_CGROUP: &str = "keel-agent";
/// `cpu.max`'s period: 1,000 millicores are the whole period.
const CPU_PERIOD_MICROSECONDS: u64 = 100_000;
/// The shell that applies the limits before `exec`ing the task.
pub const WRAPPER_SHELL: &str = "/bin/sh";

/// How this agent limits its tasks, decided once at start.
#[derive(Clone, Debug)]
pub enum Limiter {
    /// Task cgroups are created under this directory.
    CgroupV2 { parent: PathBuf },
    /// No usable cgroup v2: `RLIMIT_AS`, and why.
    Rlimits { reason: String },
}

/// What to wrap a task's command in.
#[derive(Clone, Debug)]
pub struct Applied {
    pub kind: ResourceLimits,
    /// Exactly what was applied, for the status.
    pub detail: String,
    /// The wrapper's arguments before the task's command and arguments.
    pub wrapper_arguments: Vec<String>,
    /// The task's cgroup, removed when the task ends.
    pub cgroup: Option<PathBuf>,
}

impl Limiter {
    /// Looks at the machine: cgroup v2 mounted at `/sys/fs/cgroup`, the
    /// agent's cgroup writable with the `memory` and `cpu` controllers.
    pub fn detect() -> Limiter {
        match prepare_cgroup_v2() {
            Ok(parent) => {
                tracing::info!(cgroup = %parent.display(), "task limits through cgroup v2");
                Limiter::CgroupV2 { parent }
            }
            Err(reason) => {
                tracing::info!(%reason, "no usable cgroup v2; task limits through rlimits");
                Limiter::Rlimits { reason }
            }
        }
    }

    /// Prepares the limits of one task (`name` is unique per allocation
    /// and task). A cgroup that cannot be created falls back to rlimits.
    pub fn apply(&self, name: &str, cpu_millicores: u64, memory_mib: u64) -> Applied {
        let memory_bytes = memory_mib.saturating_mul(1024 * 1024);
        if let Limiter::CgroupV2 { parent } = self {
            match create_task_cgroup(parent, name, cpu_millicores, memory_bytes) {
                Ok(cgroup) => {
                    let procs = cgroup.join("cgroup.procs");
                    return Applied {
                        kind: ResourceLimits::CgroupV2,
                        detail: format!(
                            "cgroup {}: memory.max={memory_bytes} bytes, cpu.max={} {CPU_PERIOD_MICROSECONDS} ({cpu_millicores} millicores)",
                            cgroup.display(),
                            cpu_quota(cpu_millicores)
                        ),
                        wrapper_arguments: vec![
                            "-c".into(),
                            "echo $$ > \"$1\" && shift && exec \"$@\"".into(),
                            "keel-task".into(),
                            procs.display().to_string(),
                        ],
                        cgroup: Some(cgroup),
                    };
                }
                Err(error) => {
                    tracing::warn!(%error, task = name, "cannot create the task's cgroup; using rlimits");
                }
            }
        }
        let kibibytes = memory_mib.saturating_mul(1024);
        Applied {
            kind: ResourceLimits::Rlimits,
            detail: format!(
                "RLIMIT_AS={memory_bytes} bytes (soft and hard); CPU not limited (an rlimit cannot cap a rate)"
            ),
            wrapper_arguments: vec![
                "-c".into(),
                "ulimit -v \"$1\" && shift && exec \"$@\"".into(),
                "keel-task".into(),
                kibibytes.to_string(),
            ],
            cgroup: None,
        }
    }
}

impl Limiter {
    /// Removes the cgroup of task `name` if there is one left (a task whose
    /// cgroup could not be removed when it ended).
    pub fn forget(&self, name: &str) {
        if let Limiter::CgroupV2 { parent } = self {
            let cgroup = parent.join(name);
            if cgroup.exists() {
                remove_cgroup(&cgroup);
            }
        }
    }
}

/// `cpu.max`'s quota for `millicores` (at least 1 ms per period).
fn cpu_quota(millicores: u64) -> u64 {
    (millicores.saturating_mul(CPU_PERIOD_MICROSECONDS) / 1000).max(1000)
}

fn prepare_cgroup_v2() -> Result<PathBuf, String> {
    let root = Path::new(CGROUP_ROOT);
    if !root.join("cgroup.controllers").exists() {
        return Err(format!("{CGROUP_ROOT} is not a cgroup v2 hierarchy"));
    }
    let membership = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|error| format!("/proc/self/cgroup: {error}"))?;
    let own = membership
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or("the agent is in no cgroup v2 group")?;
    let own = root.join(own.trim_start_matches('/'));
    let available = std::fs::read_to_string(own.join("cgroup.controllers"))
        .map_err(|error| format!("{}: {error}", own.display()))?;
    for controller in ["memory", "cpu"] {
        if !available.split_whitespace().any(|name| name == controller) {
            return Err(format!(
                "the {controller} controller is not delegated to {}",
                own.display()
            ));
        }
    }
    let enable = |directory: &Path| {
        std::fs::write(directory.join("cgroup.subtree_control"), "+memory +cpu")
            .map_err(|error| format!("{}/cgroup.subtree_control: {error}", directory.display()))
    };
    if enable(&own).is_err() {
        // The agent's cgroup holds processes (the agent): move the agent
        // into a leaf of its own, then enable the controllers below.
        let leaf = own.join(AGENT_CGROUP);
        std::fs::create_dir_all(&leaf).map_err(|error| format!("{}: {error}", leaf.display()))?;
        std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())
            .map_err(|error| format!("{}/cgroup.procs: {error}", leaf.display()))?;
        if let Err(reason) = enable(&own) {
            // Other processes share the agent's cgroup (a login session):
            // leave everything as it was.
            let _ = std::fs::write(own.join("cgroup.procs"), std::process::id().to_string());
            let _ = std::fs::remove_dir(&leaf);
            return Err(reason);
        }
    }
    let parent = own.join(ALLOCATIONS_CGROUP);
    std::fs::create_dir_all(&parent).map_err(|error| format!("{}: {error}", parent.display()))?;
    enable(&parent)?;
    // Task cgroups of a previous run whose processes are gone (the kernel
    // refuses to remove one that still holds a process).
    if let Ok(entries) = std::fs::read_dir(&parent) {
        for entry in entries.flatten() {
            if entry.path().is_dir() {
                remove_cgroup(&entry.path());
            }
        }
    }
    Ok(parent)
}

fn create_task_cgroup(
    parent: &Path,
    name: &str,
    cpu_millicores: u64,
    memory_bytes: u64,
) -> std::io::Result<PathBuf> {
    let cgroup = parent.join(name);
    std::fs::create_dir_all(&cgroup)?;
    std::fs::write(cgroup.join("memory.max"), memory_bytes.to_string())?;
    std::fs::write(
        cgroup.join("cpu.max"),
        format!("{} {CPU_PERIOD_MICROSECONDS}", cpu_quota(cpu_millicores)),
    )?;
    Ok(cgroup)
}

/// Removes a task's cgroup once its processes are gone (best effort: the
/// kernel refuses while a process is still in it).
pub fn remove_cgroup(cgroup: &Path) {
    if let Err(error) = std::fs::remove_dir(cgroup) {
        if error.kind() != std::io::ErrorKind::NotFound {
            tracing::debug!(%error, cgroup = %cgroup.display(), "cannot remove a task cgroup yet");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quota_is_a_share_of_the_period() {
        assert_eq!(cpu_quota(1000), 100_000);
        assert_eq!(cpu_quota(250), 25_000);
        assert_eq!(cpu_quota(1), 1000);
    }

    #[test]
    fn rlimits_wrap_the_command_in_ulimit() {
        let limiter = Limiter::Rlimits {
            reason: "test".into(),
        };
        let applied = limiter.apply("a.task", 100, 300);
        assert_eq!(applied.kind, ResourceLimits::Rlimits);
        assert_eq!(applied.wrapper_arguments.last().unwrap(), "307200");
        let output = std::process::Command::new(WRAPPER_SHELL)
            .args(&applied.wrapper_arguments)
            .args(["cat", "/proc/self/limits"])
            .output()
            .unwrap();
        let limits = String::from_utf8(output.stdout).unwrap();
        let line = limits
            .lines()
            .find(|line| line.starts_with("Max address space"))
            .unwrap();
        assert!(line.contains(&(300u64 * 1024 * 1024).to_string()), "{line}");
    }
}
