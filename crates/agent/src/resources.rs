//! The node's resources: its static capacity (CPU cores, memory, the disk that
//! holds the agent's data directory) and its live usage (CPU %, memory used,
//! disk free, load average), read with `sysinfo` from procfs.
//!
//! The capacity is registered once in the store with the node; the usage
//! changes every few seconds and travels only by gossip (see `gossip.rs`),
//! never through the Raft log. A [`ResourceSampler`] keeps sysinfo's state
//! between samples so that a sample costs a few small procfs reads
//! (`/proc/stat`, `/proc/meminfo`, `/proc/loadavg`, one `statvfs`): the
//! caller decides the interval (CPU % is the average since the previous
//! sample, so the interval is also the averaging window).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sysinfo::{CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};

/// What the node has, independent of load: registered once with the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Logical CPUs the operating system schedules on (hyper-threads count),
    /// as Nomad's `cpu.numcores`.
    pub cpu_cores: u32,
    /// Physical memory.
    pub memory_total_bytes: u64,
    /// Size of the file system that holds the agent's data directory.
    pub disk_total_bytes: u64,
}

/// What the node is using now: published by gossip on every sample.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Busy share of all CPUs since the previous sample, 0 to 100.
    pub cpu_percent: f32,
    /// Memory in use (total minus what the kernel reports available, so page
    /// cache that can be reclaimed does not count).
    pub memory_used_bytes: u64,
    /// Free space on the data directory's file system, for unprivileged users.
    pub disk_free_bytes: u64,
    /// Load average over one, five and fifteen minutes.
    pub load_average: [f64; 3],
}

/// Reads the node's capacity once and its usage on every [`sample`](Self::sample).
///
/// Not `Sync` on purpose: one owner (the agent's resource task) samples on
/// its own interval and hands the [`Usage`] to whoever needs it.
pub struct ResourceSampler {
    system: System,
    disks: Disks,
    /// Index in `disks` of the file system holding the data directory, if any
    /// file system is mounted above it (always the case on Linux, where `/`
    /// is; `None` only in odd containers without a mount table).
    data_disk: Option<usize>,
    data_dir: PathBuf,
}

impl ResourceSampler {
    /// Reads the CPU list, memory and mount table. `data_dir` chooses the
    /// disk that is reported (the one the agent and its workloads write to).
    pub fn new(data_dir: &Path) -> ResourceSampler {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        let disks =
            Disks::new_with_refreshed_list_specifics(DiskRefreshKind::nothing().with_storage());
        // A relative or not-yet-created data directory is resolved as far as
        // it exists, so the sampler can be made before the directory is.
        let data_dir = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
        let data_dir = data_dir.canonicalize().unwrap_or(data_dir);
        let mount_points: Vec<&Path> = disks.list().iter().map(|disk| disk.mount_point()).collect();
        let data_disk = disk_holding(&mount_points, &data_dir);
        ResourceSampler {
            system,
            disks,
            data_disk,
            data_dir,
        }
    }

    /// The data directory whose file system is reported.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The node's capacity.
    pub fn capacity(&self) -> Capacity {
        Capacity {
            cpu_cores: u32::try_from(self.system.cpus().len()).unwrap_or(u32::MAX),
            memory_total_bytes: self.system.total_memory(),
            disk_total_bytes: self
                .data_disk
                .map(|index| self.disks.list()[index].total_space())
                .unwrap_or(0),
        }
    }

    /// Takes one sample. CPU % is averaged since the previous call (or since
    /// `new` for the first one); call it no more often than every 200 ms
    /// (`sysinfo::MINIMUM_CPU_UPDATE_INTERVAL`), or the CPU % is noise.
    pub fn sample(&mut self) -> Usage {
        self.system.refresh_cpu_usage();
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let disk_free_bytes = match self.data_disk {
            Some(index) => {
                let disk = &mut self.disks.list_mut()[index];
                disk.refresh_specifics(DiskRefreshKind::nothing().with_storage());
                disk.available_space()
            }
            None => 0,
        };
        let load_average = System::load_average();
        Usage {
            cpu_percent: self.system.global_cpu_usage().clamp(0.0, 100.0),
            memory_used_bytes: self
                .system
                .total_memory()
                .saturating_sub(self.system.available_memory()),
            disk_free_bytes,
            load_average: [load_average.one, load_average.five, load_average.fifteen],
        }
    }
}

/// The index of the mount point that holds `path`: the longest one that is a
/// prefix of it, as the kernel resolves it (component-wise, so `/data` does
/// not hold `/database`).
fn disk_holding(mount_points: &[&Path], path: &Path) -> Option<usize> {
    mount_points
        .iter()
        .enumerate()
        .filter(|(_, mount_point)| path.starts_with(mount_point))
        .max_by_key(|(_, mount_point)| mount_point.components().count())
        .map(|(index, _)| index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_mount_point_above_the_path_holds_it() {
        let mount_points = [
            Path::new("/"),
            Path::new("/data"),
            Path::new("/data/keel"),
            Path::new("/home"),
        ];
        assert_eq!(
            disk_holding(&mount_points, Path::new("/data/keel/agent")),
            Some(2)
        );
        assert_eq!(
            disk_holding(&mount_points, Path::new("/data/other")),
            Some(1)
        );
        // Component-wise, not by string prefix.
        assert_eq!(disk_holding(&mount_points, Path::new("/database")), Some(0));
        assert_eq!(disk_holding(&[Path::new("/data")], Path::new("/var")), None);
    }

    #[test]
    fn a_sample_reads_this_machine() {
        let data_dir = tempfile::tempdir().unwrap();
        let mut sampler = ResourceSampler::new(data_dir.path());
        let capacity = sampler.capacity();
        assert!(capacity.cpu_cores >= 1);
        assert!(capacity.memory_total_bytes > 0);
        assert!(
            capacity.disk_total_bytes > 0,
            "the data directory's file system has a size"
        );
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let usage = sampler.sample();
        assert!((0.0..=100.0).contains(&usage.cpu_percent));
        assert!(
            usage.memory_used_bytes > 0 && usage.memory_used_bytes <= capacity.memory_total_bytes
        );
        assert!(usage.disk_free_bytes <= capacity.disk_total_bytes);
        assert!(usage.load_average.iter().all(|load| *load >= 0.0));
        // Usage is what gossip carries: it must survive its JSON encoding.
        let encoded = serde_json::to_string(&usage).unwrap();
        assert_eq!(serde_json::from_str::<Usage>(&encoded).unwrap(), usage);
    }
}
