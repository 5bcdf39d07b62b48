//! What the supervisor reports of an allocation, as stored under
//! `/keel/alloc-status/<alloc id>` (the actual half of an allocation; the
//! controller reads only `client`), and the pure bookkeeping of its changes.

use std::collections::BTreeMap;

use keel_scheduler::{ClientState, ClientStatus, RestartTracker, Time};
use serde::{Deserialize, Serialize};

/// Where allocation statuses live: `/keel/alloc-status/<alloc id>`.
pub const STATUS_PREFIX: &str = "/keel/alloc-status/";
/// Where the controller writes allocations: `/keel/allocs/<node>/<alloc id>`.
pub const ALLOCS_PREFIX: &str = "/keel/allocs/";
/// Where job states live: `/keel/jobs/<job>`.
pub const JOBS_PREFIX: &str = "/keel/jobs/";
/// Events kept per task in the status (the newest; Nomad keeps 10).
pub const TASK_EVENTS_MAX: usize = 32;
/// Longest event message kept in a status, in bytes.
pub const TASK_EVENT_BYTES_MAX: usize = 512;

/// The key of an allocation's status.
pub fn status_key(alloc_id: &str) -> String {
    format!("{STATUS_PREFIX}{alloc_id}")
}

/// How a task's memory and CPU limits were applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResourceLimits {
    /// A cgroup v2 child of the agent's cgroup, with `memory.max` and `cpu.max`.
    #[serde(rename = "cgroup-v2")]
    CgroupV2,
    /// `RLIMIT_AS` (memory only: an rlimit cannot cap a CPU rate).
    #[serde(rename = "rlimits")]
    Rlimits,
}

impl ResourceLimits {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceLimits::CgroupV2 => "cgroup-v2",
            ResourceLimits::Rlimits => "rlimits",
        }
    }
}

/// A task's lifecycle state (Nomad's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Not started yet, or waiting for a restart.
    Pending,
    /// Its process runs.
    Running,
    /// It ended for good.
    Dead,
}

/// One thing that happened to a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEvent {
    pub time: Time,
    pub message: String,
}

/// What the supervisor reports of one task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub state: TaskState,
    /// The process group leader's PID while it runs.
    pub pid: Option<u32>,
    /// Restarts so far (kept across agent restarts).
    pub restarts: u32,
    pub last_exit_code: Option<i32>,
    pub last_signal: Option<i32>,
    pub started_at: Option<Time>,
    pub finished_at: Option<Time>,
    /// The newest [`TASK_EVENTS_MAX`] events, oldest first.
    pub events: Vec<TaskEvent>,
}

impl TaskStatus {
    pub fn new() -> TaskStatus {
        TaskStatus {
            state: TaskState::Pending,
            pid: None,
            restarts: 0,
            last_exit_code: None,
            last_signal: None,
            started_at: None,
            finished_at: None,
            events: Vec::new(),
        }
    }

    /// Appends an event, dropping the oldest beyond [`TASK_EVENTS_MAX`].
    pub fn event(&mut self, time: Time, message: impl Into<String>) {
        let message = crate::probe::truncate(message.into(), TASK_EVENT_BYTES_MAX);
        self.events.push(TaskEvent { time, message });
        if self.events.len() > TASK_EVENTS_MAX {
            let excess = self.events.len() - TASK_EVENTS_MAX;
            self.events.drain(..excess);
        }
    }
}

impl Default for TaskStatus {
    fn default() -> Self {
        TaskStatus::new()
    }
}

/// The status of one allocation, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationStatus {
    pub alloc_id: String,
    pub node: String,
    pub client: ClientState,
    /// How memory and CPU limits were applied (`cgroup-v2` or `rlimits`).
    pub resource_limits: Option<ResourceLimits>,
    /// Exactly what was applied, for `keel alloc status` (e.g.
    /// `RLIMIT_AS=314572800 bytes; CPU not limited`).
    #[serde(default)]
    pub resource_limits_detail: String,
    /// The allocation's restart tracker: restarts of all its tasks count
    /// against the group's `restart` block together. Persisted so that an
    /// agent restart does not grant fresh attempts.
    pub restart_tracker: RestartTracker,
    pub tasks: BTreeMap<String, TaskStatus>,
}

impl AllocationStatus {
    /// A pending status for a new allocation with these tasks.
    pub fn pending<'a>(
        alloc_id: &str,
        node: &str,
        tasks: impl IntoIterator<Item = &'a str>,
    ) -> AllocationStatus {
        AllocationStatus {
            alloc_id: alloc_id.to_string(),
            node: node.to_string(),
            client: ClientState::PENDING,
            resource_limits: None,
            resource_limits_detail: String::new(),
            restart_tracker: RestartTracker::default(),
            tasks: tasks
                .into_iter()
                .map(|task| (task.to_string(), TaskStatus::new()))
                .collect(),
        }
    }

    /// Decodes a stored status.
    pub fn from_json(bytes: &[u8]) -> Result<AllocationStatus, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a status holds only strings, numbers and maps")
    }

    /// Sets the allocation's client status from its tasks: running once
    /// every task has started and none is waiting, `ready_since` following
    /// `ready` (all readiness checks pass) while running.
    pub fn refresh_client(&mut self, ready: bool, now: Time) {
        if self.client.status.is_terminal() {
            return;
        }
        // Running: some task runs and none waits to start or restart (a
        // batch task that completed is dead and does not hold it back).
        let running = self
            .tasks
            .values()
            .any(|task| task.state == TaskState::Running)
            && self
                .tasks
                .values()
                .all(|task| task.state != TaskState::Pending);
        if running {
            if self.client.status != ClientStatus::Running {
                self.client.status = ClientStatus::Running;
                self.client.started_at.get_or_insert(now);
            }
            match (ready, self.client.ready_since) {
                (true, None) => self.client.ready_since = Some(now),
                (false, Some(_)) => self.client.ready_since = None,
                _ => {}
            }
        } else {
            self.client.ready_since = None;
            if self.client.status == ClientStatus::Running {
                // A task waits for its restart: the allocation is pending
                // again until it runs (Nomad keeps "running"; keel says what
                // is true, and the controller only gates health on it).
                self.client.status = ClientStatus::Pending;
            }
        }
    }

    /// Ends the allocation (complete or failed) at `now`.
    pub fn finish(&mut self, status: ClientStatus, now: Time) {
        debug_assert!(status.is_terminal());
        if self.client.status.is_terminal() {
            return;
        }
        self.client.status = status;
        self.client.ready_since = None;
        self.client.finished_at = Some(now);
        for task in self.tasks.values_mut() {
            task.state = TaskState::Dead;
            task.pid = None;
            task.finished_at.get_or_insert(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_events_keep_the_newest() {
        let mut task = TaskStatus::new();
        for index in 0..(TASK_EVENTS_MAX as u64 + 5) {
            task.event(Time(index), format!("event {index}"));
        }
        assert_eq!(task.events.len(), TASK_EVENTS_MAX);
        assert_eq!(task.events[0].message, "event 5");
        assert_eq!(
            task.events.last().unwrap().message,
            format!("event {}", TASK_EVENTS_MAX + 4)
        );
    }

    #[test]
    fn client_status_follows_the_tasks() {
        let mut status = AllocationStatus::pending("a1", "n1", ["one", "two"]);
        status.tasks.get_mut("one").unwrap().state = TaskState::Running;
        status.refresh_client(true, Time(10));
        assert_eq!(status.client.status, ClientStatus::Pending);
        status.tasks.get_mut("two").unwrap().state = TaskState::Running;
        status.refresh_client(false, Time(20));
        assert_eq!(status.client.status, ClientStatus::Running);
        assert_eq!(status.client.started_at, Some(Time(20)));
        assert_eq!(status.client.ready_since, None);
        status.refresh_client(true, Time(30));
        assert_eq!(status.client.ready_since, Some(Time(30)));
        status.refresh_client(true, Time(40));
        assert_eq!(status.client.ready_since, Some(Time(30)));
        // A completed (dead) task does not hold a running allocation back.
        status.tasks.get_mut("one").unwrap().state = TaskState::Dead;
        status.refresh_client(true, Time(45));
        assert_eq!(status.client.status, ClientStatus::Running);
        status.finish(ClientStatus::Failed, Time(50));
        status.refresh_client(true, Time(60));
        assert_eq!(status.client.status, ClientStatus::Failed);
        assert_eq!(status.client.finished_at, Some(Time(50)));
        assert!(status
            .tasks
            .values()
            .all(|task| task.state == TaskState::Dead));
    }

    #[test]
    fn the_stored_shape_is_the_contract() {
        let status = AllocationStatus::pending("a1", "n1", ["server"]);
        let value: serde_json::Value = serde_json::from_slice(&status.to_json()).unwrap();
        assert_eq!(value["client"]["status"], "pending");
        assert_eq!(value["tasks"]["server"]["state"], "pending");
        assert_eq!(value["tasks"]["server"]["restarts"], 0);
        assert!(value["tasks"]["server"]["pid"].is_null());
        assert!(value["restart_tracker"].is_object());
        assert_eq!(
            AllocationStatus::from_json(&status.to_json()).unwrap(),
            status
        );
    }
}
