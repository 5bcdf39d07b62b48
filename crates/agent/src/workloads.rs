//! The agent's read-only view of the workloads (issue 12's keys): jobs
//! (`/keel/jobs/<job>`, [`JobState`]), allocations as the controller wants
//! them (`/keel/allocs/<node>/<id>`, [`Allocation`]) and as their node's
//! agent reports them (`/keel/alloc-status/<id>`, JSON whose `client` field
//! is a [`ClientState`]). Fed by the agent's one watch of `/keel/`, so the
//! dashboard and the allocation metrics never read the store. Pure: changes
//! in, summaries out; a value that does not decode is skipped and counted.

use std::collections::BTreeMap;

use keel_scheduler::{Allocation, ClientState, ClientStatus, DesiredStatus, JobState};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::catalog::Change;

/// Prefix of job records.
pub const JOBS_PREFIX: &str = "/keel/jobs/";
/// Prefix of allocations (the controller's half).
pub const ALLOCATIONS_PREFIX: &str = "/keel/allocs/";
/// Prefix of allocation statuses (the node agent's half).
pub const ALLOCATION_STATUS_PREFIX: &str = "/keel/alloc-status/";

/// The part of an allocation status this view reads; the rest is kept as
/// JSON for display.
#[derive(Debug, Clone, Deserialize)]
struct StatusHead {
    client: ClientState,
}

/// An allocation status as reported by its node's agent.
#[derive(Debug, Clone)]
pub struct ReportedStatus {
    pub client: ClientState,
    /// The whole record (tasks, restarts, resource limits), for display.
    pub raw: Value,
}

/// Jobs and allocations as this agent last saw them.
#[derive(Debug, Clone, Default)]
pub struct Workloads {
    pub jobs: BTreeMap<String, JobState>,
    /// By allocation id.
    pub allocations: BTreeMap<String, Allocation>,
    /// By allocation id.
    pub statuses: BTreeMap<String, ReportedStatus>,
    /// Values under the workload prefixes that did not decode.
    pub undecodable: u64,
}

impl Workloads {
    /// Replaces everything with a full listing.
    pub fn reset(&mut self, listing: &[Change]) {
        *self = Workloads::default();
        for change in listing {
            self.apply(change);
        }
    }

    /// Applies one change of the watch (changes outside the workload
    /// prefixes are ignored).
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::Put { key, value, .. } => {
                let decoded = if let Some(job) = key.strip_prefix(JOBS_PREFIX) {
                    serde_json::from_slice::<JobState>(value)
                        .map(|state| {
                            self.jobs.insert(job.to_string(), state);
                        })
                        .is_ok()
                } else if let Some(rest) = key.strip_prefix(ALLOCATIONS_PREFIX) {
                    let Some((_, id)) = rest.split_once('/') else {
                        return;
                    };
                    serde_json::from_slice::<Allocation>(value)
                        .map(|allocation| {
                            self.allocations.insert(id.to_string(), allocation);
                        })
                        .is_ok()
                } else if let Some(id) = key.strip_prefix(ALLOCATION_STATUS_PREFIX) {
                    serde_json::from_slice::<Value>(value)
                        .ok()
                        .and_then(|raw| {
                            let head = StatusHead::deserialize(&raw).ok()?;
                            self.statuses.insert(
                                id.to_string(),
                                ReportedStatus {
                                    client: head.client,
                                    raw,
                                },
                            );
                            Some(())
                        })
                        .is_some()
                } else {
                    true
                };
                if !decoded {
                    self.undecodable += 1;
                }
            }
            Change::Delete { key } => {
                if let Some(job) = key.strip_prefix(JOBS_PREFIX) {
                    self.jobs.remove(job);
                } else if let Some(rest) = key.strip_prefix(ALLOCATIONS_PREFIX) {
                    if let Some((_, id)) = rest.split_once('/') {
                        self.allocations.remove(id);
                    }
                } else if let Some(id) = key.strip_prefix(ALLOCATION_STATUS_PREFIX) {
                    self.statuses.remove(id);
                }
            }
        }
    }

    /// An allocation's actual status: its node's report, else what the
    /// controller wrote (pending until the node reports).
    pub fn client_status(&self, id: &str) -> Option<ClientStatus> {
        self.statuses
            .get(id)
            .map(|status| status.client.status)
            .or_else(|| {
                self.allocations
                    .get(id)
                    .map(|allocation| allocation.client.status)
            })
    }

    /// Allocations by client status (`pending`, `running`, `complete`,
    /// `failed`), every status present even at zero.
    pub fn allocation_counts(&self) -> BTreeMap<&'static str, u64> {
        let mut counts: BTreeMap<&'static str, u64> = [
            ClientStatus::Pending,
            ClientStatus::Running,
            ClientStatus::Complete,
            ClientStatus::Failed,
        ]
        .into_iter()
        .map(|status| (client_status_name(status), 0))
        .collect();
        for id in self.allocations.keys() {
            if let Some(status) = self.client_status(id) {
                *counts.entry(client_status_name(status)).or_default() += 1;
            }
        }
        counts
    }

    /// The jobs, each with its current version, type, groups (with their
    /// counts), deployment and its allocations' statuses, for the dashboard.
    pub fn jobs_json(&self) -> Vec<Value> {
        self.jobs
            .iter()
            .map(|(name, state)| {
                let current = state.versions.last();
                let groups: BTreeMap<&String, u32> = current
                    .map(|version| {
                        version
                            .job
                            .groups
                            .iter()
                            .map(|(name, group)| (name, group.count))
                            .collect()
                    })
                    .unwrap_or_default();
                let mut statuses: BTreeMap<&'static str, u64> = BTreeMap::new();
                for (id, allocation) in &self.allocations {
                    if &allocation.job == name && allocation.desired_status == DesiredStatus::Run {
                        if let Some(status) = self.client_status(id) {
                            *statuses.entry(client_status_name(status)).or_default() += 1;
                        }
                    }
                }
                json!({
                    "name": name,
                    "type": current.map(|version| version.job.job_type),
                    "version": current.map(|version| version.version),
                    "stopped": state.stopped,
                    "groups": groups,
                    "deployment": state.deployment,
                    "allocations": statuses,
                })
            })
            .collect()
    }

    /// The allocations, newest first, at most `limit`, for the dashboard.
    pub fn allocations_json(&self, limit: usize) -> Vec<Value> {
        let mut allocations: Vec<(&String, &Allocation)> = self.allocations.iter().collect();
        allocations.sort_by(|a, b| b.1.created_at.cmp(&a.1.created_at).then(a.0.cmp(b.0)));
        allocations
            .into_iter()
            .take(limit)
            .map(|(id, allocation)| {
                let reported = self.statuses.get(id);
                let tasks = reported
                    .and_then(|status| status.raw.get("tasks"))
                    .and_then(Value::as_object)
                    .map(|tasks| {
                        tasks
                            .iter()
                            .map(|(name, task)| {
                                json!({
                                    "name": name,
                                    "state": task.get("state"),
                                    "restarts": task.get("restarts"),
                                    "last_exit_code": task.get("last_exit_code"),
                                })
                            })
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default();
                let desired = match allocation.desired_status {
                    DesiredStatus::Run => "run".to_string(),
                    DesiredStatus::Stop(reason) => {
                        format!(
                            "stop ({})",
                            serde_json::to_value(reason)
                                .unwrap_or_default()
                                .as_str()
                                .unwrap_or("")
                        )
                    }
                };
                json!({
                    "id": id,
                    "job": allocation.job,
                    "version": allocation.job_version,
                    "group": allocation.group,
                    "index": allocation.index,
                    "node": allocation.node,
                    "desired": desired,
                    "status": self.client_status(id).map(client_status_name),
                    "created_at": allocation.created_at,
                    "tasks": tasks,
                })
            })
            .collect()
    }
}

/// A client status's name, as in the JSON.
pub fn client_status_name(status: ClientStatus) -> &'static str {
    match status {
        ClientStatus::Pending => "pending",
        ClientStatus::Running => "running",
        ClientStatus::Complete => "complete",
        ClientStatus::Failed => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: Value) -> Change {
        Change::Put {
            key: key.to_string(),
            value: serde_json::to_vec(&value).unwrap(),
            create_revision: 1,
            modify_revision: 1,
        }
    }

    #[test]
    fn statuses_come_from_the_node_report_and_undecodable_values_are_counted() {
        let mut workloads = Workloads::default();
        workloads.apply(&put(
            "/keel/alloc-status/a1",
            json!({"alloc_id": "a1", "client": {"status": "running"}, "tasks": {"web": {"state": "running", "restarts": 2}}}),
        ));
        workloads.apply(&put("/keel/jobs/web", json!({"not": "a job"})));
        workloads.apply(&put("/keel/nodes/n1", json!({"ignored": true})));
        assert_eq!(workloads.undecodable, 1);
        assert_eq!(
            workloads.statuses["a1"].client.status,
            ClientStatus::Running
        );
        // Without the controller's half, it is not counted as an allocation.
        assert_eq!(workloads.allocation_counts()["running"], 0);
        workloads.apply(&Change::Delete {
            key: "/keel/alloc-status/a1".into(),
        });
        assert!(workloads.statuses.is_empty());
    }
}
