//! The controller's view of the store, as values: the keys it lists and
//! watches (`/keel/nodes/`, `/keel/node-controls/`, `/keel/node-down/`,
//! `/keel/jobs/`, `/keel/allocs/`, `/keel/alloc-status/`), decoded, with
//! the revisions its writes compare; and the pure translations between
//! that view and the scheduler's values: the [`Cluster`] an evaluation
//! reads, and the key-values a [`Plan`] writes.
//!
//! Nothing here touches the network or a clock: the tokio loop
//! (`controller.rs`) feeds keys in and carries the writes out.

use std::collections::{BTreeMap, BTreeSet};

use keel_scheduler::{
    Allocation, AllocationId, ClientState, Cluster, Drain, JobState, Node, NodeStatus, Plan,
    PortRange, Resources, Time,
};
use serde::{Deserialize, Serialize};

use crate::catalog::NodeRecord;

/// Node records, one per live node lease.
pub const NODES_PREFIX: &str = "/keel/nodes/";
/// Operator controls per node (eligibility, drain).
pub const NODE_CONTROLS_PREFIX: &str = "/keel/node-controls/";
/// When the controller saw a node's record vanish (its grace starts there).
pub const NODE_DOWN_PREFIX: &str = "/keel/node-down/";
/// Jobs (`keel_scheduler::JobState`).
pub const JOBS_PREFIX: &str = "/keel/jobs/";
/// Allocations, the desired half, written only by the controller.
pub const ALLOCS_PREFIX: &str = "/keel/allocs/";
/// Allocation status, the actual half, written only by the node's agent.
pub const ALLOC_STATUS_PREFIX: &str = "/keel/alloc-status/";
/// The election the agents' controllers campaign in.
pub const ELECTION_NAME: &str = "/keel/controller";
/// Every prefix the controller lists and watches.
pub const WATCHED_PREFIXES: [&str; 6] = [
    NODES_PREFIX,
    NODE_CONTROLS_PREFIX,
    NODE_DOWN_PREFIX,
    JOBS_PREFIX,
    ALLOCS_PREFIX,
    ALLOC_STATUS_PREFIX,
];
/// Dynamic ports of a node that does not say (Nomad's default range).
pub const DEFAULT_DYNAMIC_PORTS: PortRange = PortRange {
    first: 20000,
    last: 32000,
};

/// The key of a job.
pub fn job_key(job: &str) -> String {
    format!("{JOBS_PREFIX}{job}")
}

/// The key of an allocation's desired half.
pub fn allocation_key(node: &str, allocation: &AllocationId) -> String {
    format!("{ALLOCS_PREFIX}{node}/{allocation}")
}

/// The key of an allocation's status.
pub fn allocation_status_key(allocation: &AllocationId) -> String {
    format!("{ALLOC_STATUS_PREFIX}{allocation}")
}

/// The key of a node's controls.
pub fn node_controls_key(node: &str) -> String {
    format!("{NODE_CONTROLS_PREFIX}{node}")
}

/// The key remembering when a node went down.
pub fn node_down_key(node: &str) -> String {
    format!("{NODE_DOWN_PREFIX}{node}")
}

/// `/keel/node-controls/<node>`: what the operator asked of a node. An
/// absent key means eligible and not draining.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeControls {
    /// Whether new allocations may be placed on the node.
    #[serde(default = "eligible_by_default")]
    pub eligible: bool,
    /// Set while a drain moves the node's allocations off.
    #[serde(default)]
    pub drain: Option<Drain>,
}

fn eligible_by_default() -> bool {
    true
}

impl Default for NodeControls {
    fn default() -> NodeControls {
        NodeControls {
            eligible: true,
            drain: None,
        }
    }
}

/// `/keel/node-down/<node>`: since when the controller has known the node
/// down, so a new controller after a failover grants the same grace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDown {
    /// When the node's record was seen gone.
    pub since: Time,
}

/// The part of an allocation status (`/keel/alloc-status/<id>`, written by
/// the supervisor) the controller reads: the client half of the allocation.
#[derive(Clone, Copy, Debug, Deserialize)]
struct AllocationStatusClient {
    client: ClientState,
}

/// A decoded value with the revision it was last modified at (what a
/// compare-and-swap of it compares).
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned<T> {
    /// The decoded value.
    pub value: T,
    /// The key's mod revision.
    pub modify_revision: i64,
}

/// Which part of the view a key changed, so the loop knows whether to
/// evaluate again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Touched {
    /// A key the evaluation reads.
    Relevant,
    /// A key of another prefix, or one that did not decode.
    Nothing,
}

/// Everything the controller knows from the store, at one revision.
#[derive(Clone, Debug, Default)]
pub struct StoreView {
    /// The revision the view is complete at.
    pub revision: i64,
    /// Live node records, by node name.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Operator controls, by node name.
    pub node_controls: BTreeMap<String, Versioned<NodeControls>>,
    /// Nodes known down, by node name.
    pub node_down: BTreeMap<String, Versioned<NodeDown>>,
    /// Jobs, by name.
    pub jobs: BTreeMap<String, Versioned<JobState>>,
    /// Desired halves of allocations, by id.
    pub allocations: BTreeMap<AllocationId, Allocation>,
    /// Reported halves, by allocation id.
    pub statuses: BTreeMap<AllocationId, ClientState>,
    /// The last record seen of each node, kept after it vanished so a down
    /// node keeps its labels and capacity in the cluster snapshot.
    pub last_records: BTreeMap<String, NodeRecord>,
}

/// Why a stored value was not understood.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct DecodeError {
    /// The key.
    pub key: String,
    /// What was wrong.
    pub reason: String,
}

impl StoreView {
    /// Applies one key's new value. A value that does not decode leaves the
    /// key absent from the view (and is reported).
    pub fn put(
        &mut self,
        key: &str,
        value: &[u8],
        modify_revision: i64,
    ) -> Result<Touched, DecodeError> {
        let decode_error = |error: serde_json::Error| DecodeError {
            key: key.to_string(),
            reason: error.to_string(),
        };
        if let Some(node) = key.strip_prefix(NODES_PREFIX) {
            let record: NodeRecord = serde_json::from_slice(value).map_err(decode_error)?;
            self.last_records.insert(node.to_string(), record.clone());
            self.nodes.insert(node.to_string(), record);
        } else if let Some(node) = key.strip_prefix(NODE_CONTROLS_PREFIX) {
            let controls: NodeControls = serde_json::from_slice(value).map_err(decode_error)?;
            self.node_controls.insert(
                node.to_string(),
                Versioned {
                    value: controls,
                    modify_revision,
                },
            );
        } else if let Some(node) = key.strip_prefix(NODE_DOWN_PREFIX) {
            let down: NodeDown = serde_json::from_slice(value).map_err(decode_error)?;
            self.node_down.insert(
                node.to_string(),
                Versioned {
                    value: down,
                    modify_revision,
                },
            );
        } else if let Some(job) = key.strip_prefix(JOBS_PREFIX) {
            let state: JobState = serde_json::from_slice(value).map_err(decode_error)?;
            if state.versions.is_empty() {
                return Err(DecodeError {
                    key: key.to_string(),
                    reason: "a job holds at least one version".to_string(),
                });
            }
            self.jobs.insert(
                job.to_string(),
                Versioned {
                    value: state,
                    modify_revision,
                },
            );
        } else if key.starts_with(ALLOCS_PREFIX) {
            let allocation: Allocation = serde_json::from_slice(value).map_err(decode_error)?;
            self.allocations.insert(allocation.id.clone(), allocation);
        } else if let Some(id) = key.strip_prefix(ALLOC_STATUS_PREFIX) {
            let status: AllocationStatusClient =
                serde_json::from_slice(value).map_err(decode_error)?;
            self.statuses
                .insert(AllocationId(id.to_string()), status.client);
        } else {
            return Ok(Touched::Nothing);
        }
        Ok(Touched::Relevant)
    }

    /// Applies one key's deletion.
    pub fn delete(&mut self, key: &str) -> Touched {
        if let Some(node) = key.strip_prefix(NODES_PREFIX) {
            self.nodes.remove(node);
        } else if let Some(node) = key.strip_prefix(NODE_CONTROLS_PREFIX) {
            self.node_controls.remove(node);
        } else if let Some(node) = key.strip_prefix(NODE_DOWN_PREFIX) {
            self.node_down.remove(node);
        } else if let Some(job) = key.strip_prefix(JOBS_PREFIX) {
            self.jobs.remove(job);
        } else if let Some(rest) = key.strip_prefix(ALLOCS_PREFIX) {
            if let Some((_, id)) = rest.split_once('/') {
                self.allocations.remove(&AllocationId(id.to_string()));
            }
        } else if let Some(id) = key.strip_prefix(ALLOC_STATUS_PREFIX) {
            self.statuses.remove(&AllocationId(id.to_string()));
        } else {
            return Touched::Nothing;
        }
        Touched::Relevant
    }

    /// Allocations with their reported half joined (pending when the agent
    /// has not reported yet).
    pub fn joined_allocations(&self) -> Vec<Allocation> {
        self.allocations
            .values()
            .map(|desired| {
                let mut allocation = desired.clone();
                allocation.client = self
                    .statuses
                    .get(&allocation.id)
                    .copied()
                    .unwrap_or(ClientState::PENDING);
                allocation
            })
            .collect()
    }

    /// Nodes that some allocation wanted running sits on, whose record is
    /// gone and whose going is not remembered yet: the controller writes
    /// `/keel/node-down/<node>` for them before it evaluates.
    pub fn nodes_newly_down(&self) -> BTreeSet<String> {
        self.allocations
            .values()
            .filter(|allocation| allocation.desired_status == keel_scheduler::DesiredStatus::Run)
            .map(|allocation| allocation.node.clone())
            .filter(|node| !self.nodes.contains_key(node) && !self.node_down.contains_key(node))
            .collect()
    }

    /// `node-down` keys no longer needed: the node is back, or nothing
    /// wanted running is left on it.
    pub fn node_down_obsolete(&self) -> Vec<(String, i64)> {
        let wanted: BTreeSet<&str> = self
            .allocations
            .values()
            .filter(|allocation| allocation.desired_status == keel_scheduler::DesiredStatus::Run)
            .map(|allocation| allocation.node.as_str())
            .collect();
        self.node_down
            .iter()
            .filter(|(node, _)| self.nodes.contains_key(*node) || !wanted.contains(node.as_str()))
            .map(|(node, down)| (node.clone(), down.modify_revision))
            .collect()
    }

    /// The scheduler's snapshot: every node with a record (alive, or suspect
    /// when gossip says so) or remembered down, and every allocation joined.
    pub fn cluster(
        &self,
        suspects: &BTreeSet<String>,
        cpu_usage_millicores: &BTreeMap<String, u64>,
    ) -> Cluster {
        let mut nodes = Vec::new();
        let names: BTreeSet<&String> = self.nodes.keys().chain(self.node_down.keys()).collect();
        for name in names {
            let status = if self.nodes.contains_key(name) {
                if suspects.contains(name) {
                    NodeStatus::Suspect
                } else {
                    NodeStatus::Alive
                }
            } else {
                NodeStatus::Down {
                    since: self.node_down[name].value.since,
                }
            };
            let record = self.nodes.get(name).or_else(|| self.last_records.get(name));
            let controls = self
                .node_controls
                .get(name)
                .map(|controls| controls.value)
                .unwrap_or_default();
            nodes.push(scheduler_node(name, record, controls, status));
        }
        let cpu_usage_millicores = cpu_usage_millicores
            .iter()
            .map(|(id, millicores)| (AllocationId(id.clone()), *millicores))
            .filter(|(id, _)| self.allocations.contains_key(id))
            .collect();
        Cluster {
            nodes,
            allocations: self.joined_allocations(),
            cpu_usage_millicores,
        }
    }

    /// Terminal allocations of each job beyond `kept_per_job` (stopped by
    /// the controller and ended on their node), oldest first: what garbage
    /// collection deletes.
    pub fn collectable(&self, kept_per_job: usize) -> Vec<Allocation> {
        let mut terminal: BTreeMap<String, Vec<Allocation>> = BTreeMap::new();
        for allocation in self.joined_allocations() {
            if allocation.desired_status != keel_scheduler::DesiredStatus::Run
                && allocation.client.status.is_terminal()
            {
                terminal
                    .entry(allocation.job.clone())
                    .or_default()
                    .push(allocation);
            }
        }
        let mut collectable = Vec::new();
        for (_, mut allocations) in terminal {
            if allocations.len() <= kept_per_job {
                continue;
            }
            allocations.sort_by(|left, right| {
                (left.created_at, &left.id).cmp(&(right.created_at, &right.id))
            });
            let excess = allocations.len() - kept_per_job;
            collectable.extend(allocations.into_iter().take(excess));
        }
        collectable
    }
}

/// The scheduler's node from the agent's record and the operator's controls.
pub fn scheduler_node(
    name: &str,
    record: Option<&NodeRecord>,
    controls: NodeControls,
    status: NodeStatus,
) -> Node {
    const MEBIBYTE: u64 = 1024 * 1024;
    let mut attributes = BTreeMap::new();
    let (capacity, labels, port_range) = match record {
        Some(record) => {
            attributes.insert("cpu.numcores".to_string(), record.cpu_cores.to_string());
            attributes.insert(
                "memory.totalbytes".to_string(),
                record.memory_total_bytes.to_string(),
            );
            attributes.insert(
                "unique.network.ip-address".to_string(),
                record.address.clone(),
            );
            attributes.insert("kernel.name".to_string(), std::env::consts::OS.to_string());
            (
                Resources {
                    cpu_millicores: u64::from(record.cpu_cores) * 1000,
                    memory_mib: record.memory_total_bytes / MEBIBYTE,
                },
                record.labels.clone(),
                record.dynamic_ports.unwrap_or(DEFAULT_DYNAMIC_PORTS),
            )
        }
        None => (
            Resources {
                cpu_millicores: 0,
                memory_mib: 0,
            },
            BTreeMap::new(),
            DEFAULT_DYNAMIC_PORTS,
        ),
    };
    Node {
        name: name.to_string(),
        labels,
        attributes,
        capacity,
        port_range,
        eligible: controls.eligible,
        drain: controls.drain,
        status,
    }
}

/// One write of a plan: a key and its new value.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanWrite {
    /// The key.
    pub key: String,
    /// The JSON value.
    pub value: Vec<u8>,
}

/// The writes that carry `plan` out, in `Plan::apply`'s order (in-place
/// updates, health, stops, placements), each allocation once with its
/// final value; and the job's new state when the plan changes it
/// (deployment, stability, revert, scaling). The values come from
/// `Plan::apply` itself on copies, so the store means what the reference
/// means. Desired halves are written with a pending client half (the
/// actual half lives in `/keel/alloc-status/`).
pub fn plan_writes(
    plan: &Plan,
    state: &JobState,
    cluster: &Cluster,
    now: Time,
) -> (Vec<PlanWrite>, Option<JobState>) {
    let mut applied_state = state.clone();
    let mut applied = cluster.clone();
    plan.apply(&mut applied_state, &mut applied, now);
    let by_id: BTreeMap<&AllocationId, &Allocation> = applied
        .allocations
        .iter()
        .map(|allocation| (&allocation.id, allocation))
        .collect();
    let touched = plan
        .in_place_updates
        .iter()
        .map(|update| &update.allocation)
        .chain(plan.health_updates.iter().map(|update| &update.allocation))
        .chain(plan.stops.iter().map(|stop| &stop.allocation))
        .chain(plan.placements.iter().map(|placement| &placement.id));
    let mut seen = BTreeSet::new();
    let mut writes = Vec::new();
    for id in touched {
        if !seen.insert(id.clone()) {
            continue;
        }
        let Some(allocation) = by_id.get(id) else {
            continue;
        };
        let mut desired = (*allocation).clone();
        desired.client = ClientState::PENDING;
        writes.push(PlanWrite {
            key: allocation_key(&desired.node, &desired.id),
            value: serde_json::to_vec(&desired).expect("allocations serialise"),
        });
    }
    let job_changes = plan.deployment.is_some()
        || plan.mark_stable.is_some()
        || plan.revert_to_version.is_some()
        || !plan.scaling.is_empty();
    let job = (job_changes && applied_state != *state).then_some(applied_state);
    (writes, job)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_scheduler::{evaluate, Evaluation, Job, SchedulerAlgorithm};

    fn record(name: &str) -> NodeRecord {
        NodeRecord {
            name: name.to_string(),
            address: "127.0.0.1".to_string(),
            labels: BTreeMap::new(),
            cpu_cores: 4,
            memory_total_bytes: 8 << 30,
            disk_total_bytes: 0,
            http_address: String::new(),
            dns_address: String::new(),
            gossip_address: String::new(),
            lease_id: 1,
            dynamic_ports: Some(PortRange {
                first: 30000,
                last: 30099,
            }),
        }
    }

    fn job() -> Job {
        Job::from_toml_validated(
            "name = \"web\"\n[group.web]\ncount = 3\n[group.web.task.server]\nconfig = { command = \"sleep\", args = [\"100\"] }\nport.http = {}\n",
        )
        .unwrap()
    }

    fn view_with_nodes(names: &[&str]) -> StoreView {
        let mut view = StoreView::default();
        for (revision, name) in names.iter().enumerate() {
            let value = serde_json::to_vec(&record(name)).unwrap();
            view.put(
                &format!("{NODES_PREFIX}{name}"),
                &value,
                revision as i64 + 1,
            )
            .unwrap();
        }
        view
    }

    fn place(view: &mut StoreView, now: Time) -> Plan {
        let state = JobState::new(job());
        view.put(&job_key("web"), &serde_json::to_vec(&state).unwrap(), 10)
            .unwrap();
        let cluster = view.cluster(&BTreeSet::new(), &BTreeMap::new());
        let plan = evaluate(&Evaluation {
            job: &state,
            cluster: &cluster,
            now,
            seed: 7,
            algorithm: SchedulerAlgorithm::Binpack,
        });
        let (writes, _) = plan_writes(&plan, &state, &cluster, now);
        for (index, write) in writes.iter().enumerate() {
            view.put(&write.key, &write.value, 11 + index as i64)
                .unwrap();
        }
        plan
    }

    #[test]
    fn placements_are_written_once_each_with_a_pending_client_half() {
        let mut view = view_with_nodes(&["node1", "node2", "node3"]);
        let plan = place(&mut view, Time(1_000));
        assert_eq!(plan.placements.len(), 3);
        assert_eq!(view.allocations.len(), 3);
        let nodes: BTreeSet<&str> = view
            .allocations
            .values()
            .map(|allocation| allocation.node.as_str())
            .collect();
        assert_eq!(nodes.len(), 3, "instances of a group on different nodes");
        for allocation in view.allocations.values() {
            assert_eq!(allocation.client, ClientState::PENDING);
            let port = allocation.ports["http"];
            assert!(
                (30000..=30099).contains(&port),
                "port {port} from the node's range"
            );
        }
    }

    #[test]
    fn a_vanished_node_is_remembered_then_forgotten_when_it_returns() {
        let mut view = view_with_nodes(&["node1", "node2", "node3"]);
        place(&mut view, Time(1_000));
        view.delete(&format!("{NODES_PREFIX}node2"));
        assert_eq!(
            view.nodes_newly_down(),
            BTreeSet::from(["node2".to_string()])
        );
        let down = serde_json::to_vec(&NodeDown { since: Time(2_000) }).unwrap();
        view.put(&node_down_key("node2"), &down, 40).unwrap();
        assert!(view.nodes_newly_down().is_empty());
        assert!(view.node_down_obsolete().is_empty());
        let cluster = view.cluster(&BTreeSet::new(), &BTreeMap::new());
        let node2 = cluster.node("node2").unwrap();
        assert_eq!(node2.status, NodeStatus::Down { since: Time(2_000) });
        assert_eq!(
            node2.capacity.cpu_millicores, 4000,
            "kept from its last record"
        );
        let value = serde_json::to_vec(&record("node2")).unwrap();
        view.put(&format!("{NODES_PREFIX}node2"), &value, 41)
            .unwrap();
        assert_eq!(view.node_down_obsolete(), vec![("node2".to_string(), 40)]);
    }

    #[test]
    fn suspects_and_controls_reach_the_snapshot() {
        let mut view = view_with_nodes(&["node1", "node2"]);
        let controls = NodeControls {
            eligible: false,
            drain: Some(Drain {
                started_at: Time(5),
            }),
        };
        view.put(
            &node_controls_key("node1"),
            &serde_json::to_vec(&controls).unwrap(),
            3,
        )
        .unwrap();
        let cluster = view.cluster(&BTreeSet::from(["node2".to_string()]), &BTreeMap::new());
        assert!(!cluster.node("node1").unwrap().eligible);
        assert!(cluster.node("node1").unwrap().drain.is_some());
        assert_eq!(cluster.node("node2").unwrap().status, NodeStatus::Suspect);
    }

    #[test]
    fn the_reported_half_is_joined_and_terminal_allocations_are_collected_beyond_the_bound() {
        let mut view = view_with_nodes(&["node1", "node2", "node3"]);
        place(&mut view, Time(1_000));
        let ids: Vec<AllocationId> = view.allocations.keys().cloned().collect();
        for id in &ids {
            let status = serde_json::json!({
                "alloc_id": id.0, "node": "node1",
                "client": {"status": "complete", "started_at": 1100, "ready_since": 1200, "finished_at": 1300},
                "tasks": {}
            });
            view.put(
                &allocation_status_key(id),
                &serde_json::to_vec(&status).unwrap(),
                50,
            )
            .unwrap();
            view.allocations.get_mut(id).unwrap().desired_status =
                keel_scheduler::DesiredStatus::Stop(keel_scheduler::StopReason::JobStopped);
        }
        let joined = view.joined_allocations();
        assert!(joined
            .iter()
            .all(|allocation| allocation.client.status == keel_scheduler::ClientStatus::Complete));
        assert_eq!(view.collectable(1).len(), 2);
        assert!(view.collectable(3).is_empty());
    }

    #[test]
    fn undecodable_values_are_reported_and_left_out() {
        let mut view = StoreView::default();
        let error = view.put(&job_key("broken"), b"{", 1).unwrap_err();
        assert!(
            error.to_string().starts_with("/keel/jobs/broken:"),
            "{error}"
        );
        assert!(view.jobs.is_empty());
        assert_eq!(
            view.put("/keel/services/x/y", b"{}", 2).unwrap(),
            Touched::Nothing
        );
    }
}
