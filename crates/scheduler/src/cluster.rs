//! The scheduler's view of the world, as values: nodes, allocations (desired
//! and actual), jobs with their version history and deployment. The
//! controller builds one [`Cluster`] and one [`JobState`] per evaluation from
//! its snapshot of the store (`/keel/nodes/`, `/keel/allocs/`,
//! `/keel/alloc-status/`, `/keel/jobs/`) and the gossiped usage.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spec::{Job, Resources};
use crate::time::{duration_text, Time};

/// A node as the controller sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// The agent's `--name`.
    pub name: String,
    /// User labels (`keel agent --labels`), `${meta.<key>}` in constraints.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Detected attributes, `${attr.<name>}` in constraints.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// What the node offers to allocations.
    pub capacity: Resources,
    /// The range dynamic ports are taken from.
    pub port_range: PortRange,
    /// Whether new allocations may be placed on it (`keel node eligibility`).
    pub eligible: bool,
    /// Set while `keel node drain` moves its allocations off.
    #[serde(default)]
    pub drain: Option<Drain>,
    /// Alive, suspect (from gossip) or down (its lease expired).
    pub status: NodeStatus,
}

/// An inclusive range of port numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    /// The first port of the range.
    pub first: u16,
    /// The last port of the range (inclusive).
    pub last: u16,
}

/// A drain in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// When the drain was asked for.
    pub started_at: Time,
}

/// A node's health, from the two sources of the fault-tolerance layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum NodeStatus {
    /// Its lease is alive and its gossip heartbeats arrive.
    Alive,
    /// Its lease is alive but gossip suspects it (phi over the threshold).
    /// Fast and possibly wrong: nothing moves because of it, but nothing new
    /// is placed there either.
    Suspect,
    /// Its lease expired (the authoritative verdict), at `since`.
    Down {
        /// When the controller saw the lease expire.
        since: Time,
    },
}

/// An allocation's identifier (a UUID-shaped string).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AllocationId(pub String);

impl fmt::Display for AllocationId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// One instance of a group on one node: the desired half written by the
/// controller (`/keel/allocs/<node>/<id>`) and the actual half reported by
/// the node's agent (`/keel/alloc-status/<id>`), joined.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// Unique, never reused.
    pub id: AllocationId,
    /// The job's name.
    pub job: String,
    /// The job version the allocation runs.
    pub job_version: u64,
    /// The group's name.
    pub group: String,
    /// The instance's index in the group, 0 to count - 1 (Nomad's name index:
    /// `web.web[2]`). A replacement takes its predecessor's index.
    pub index: u32,
    /// Where it runs.
    pub node: String,
    /// What it reserves there.
    pub resources: Resources,
    /// The ports given to it, by label.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    /// Why it was placed.
    pub placement_reason: PlacementReason,
    /// The allocation it replaced, if any.
    #[serde(default)]
    pub previous_allocation: Option<AllocationId>,
    /// The reschedules of its chain, oldest first (at most
    /// [`limits::RESCHEDULE_EVENTS_MAX`](crate::limits::RESCHEDULE_EVENTS_MAX)).
    #[serde(default)]
    pub reschedule_events: Vec<RescheduleEvent>,
    /// When the controller placed it.
    pub created_at: Time,
    /// Run or stop, as the controller wants it.
    pub desired_status: DesiredStatus,
    /// Set once a deployment (or a migration) decided whether it turned
    /// healthy in time; written by the controller from the plan.
    #[serde(default)]
    pub deployment_healthy: Option<bool>,
    /// What the agent reports.
    pub client: ClientState,
}

/// Why an allocation was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlacementReason {
    /// To reach the group's count.
    New,
    /// Its predecessor's node was down past the grace.
    Lost,
    /// Its predecessor failed and the reschedule policy allowed a move.
    Rescheduled,
    /// Its predecessor's node is draining.
    Migrated,
    /// Its predecessor ran an older version (a rolling or destructive update).
    Updated,
    /// Its predecessor ended, for a service job.
    Completed,
}

/// The controller's intent for an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", content = "reason", rename_all = "lowercase")]
pub enum DesiredStatus {
    /// Keep it running.
    Run,
    /// Stop it (for good: a stopped allocation never runs again).
    Stop(StopReason),
}

/// Why an allocation is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The job was stopped.
    JobStopped,
    /// Its group is no longer in the job.
    GroupRemoved,
    /// The group's count went down.
    ScaledDown,
    /// Its node was down longer than `disconnect.lost_after`.
    Lost,
    /// It failed and was replaced elsewhere.
    Rescheduled,
    /// Its node is draining and it was replaced elsewhere.
    Migrated,
    /// A newer version replaced it.
    Updated,
    /// Another allocation holds the same index (after a node came back).
    Duplicate,
    /// It ended (service job) and was replaced.
    Completed,
}

/// What the agent reports of an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientState {
    /// Pending, running, complete or failed.
    pub status: ClientStatus,
    /// When the tasks started running (unset while pending).
    #[serde(default)]
    pub started_at: Option<Time>,
    /// Since when all readiness checks pass (without readiness checks: since
    /// the tasks run); unset while not ready.
    #[serde(default)]
    pub ready_since: Option<Time>,
    /// When it turned complete or failed.
    #[serde(default)]
    pub finished_at: Option<Time>,
}

impl ClientState {
    /// Not started yet.
    pub const PENDING: ClientState = ClientState {
        status: ClientStatus::Pending,
        started_at: None,
        ready_since: None,
        finished_at: None,
    };
}

/// The agent's status of an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientStatus {
    /// Placed, not yet running.
    Pending,
    /// Its tasks run.
    Running,
    /// Its tasks ended successfully (or were stopped).
    Complete,
    /// Its tasks failed and the restart policy gave up.
    Failed,
}

impl ClientStatus {
    /// Complete and failed allocations run nothing any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, ClientStatus::Complete | ClientStatus::Failed)
    }
}

/// One reschedule in an allocation's chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RescheduleEvent {
    /// When the replacement was placed.
    pub at: Time,
    /// The failed allocation it replaced.
    pub previous_allocation: AllocationId,
    /// Where that allocation ran.
    pub previous_node: String,
    /// The delay applied before this reschedule.
    #[serde(with = "duration_text")]
    pub delay: Duration,
}

impl Allocation {
    /// Whether the allocation holds resources on its node: wanted running and
    /// not ended.
    pub fn is_active(&self) -> bool {
        self.desired_status == DesiredStatus::Run && !self.client.status.is_terminal()
    }
}

/// Everything the controller knows about the cluster at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    /// Every registered node, including down ones the controller still
    /// remembers. An allocation whose node is not here counts as on a node
    /// down long ago: it is lost at once.
    pub nodes: Vec<Node>,
    /// Every allocation of every job that is not garbage-collected.
    pub allocations: Vec<Allocation>,
    /// CPU use per running allocation, in millicores, from gossip.
    #[serde(default)]
    pub cpu_usage_millicores: BTreeMap<AllocationId, u64>,
}

impl Cluster {
    /// The node of that name.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|node| node.name == name)
    }
}

/// A job as stored: its versions (the newest is the one wanted) and its
/// deployment and scaling history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobState {
    /// Versions, oldest first; the last is current. The controller keeps at
    /// most [`limits::JOB_VERSIONS_MAX`](crate::limits::JOB_VERSIONS_MAX).
    pub versions: Vec<JobVersion>,
    /// Set by `keel job stop`: every allocation stops.
    #[serde(default)]
    pub stopped: bool,
    /// The latest deployment, if any.
    #[serde(default)]
    pub deployment: Option<Deployment>,
    /// When each group was last scaled (for the cooldown).
    #[serde(default)]
    pub last_scaled_at: BTreeMap<String, Time>,
}

/// One version of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobVersion {
    /// Starts at 0, grows by one per change.
    pub version: u64,
    /// The spec.
    pub job: Job,
    /// Whether a deployment of this version succeeded (auto-revert's target).
    pub stable: bool,
}

impl JobState {
    /// A job with one version.
    pub fn new(job: Job) -> JobState {
        JobState {
            versions: vec![JobVersion {
                version: 0,
                job,
                stable: false,
            }],
            stopped: false,
            deployment: None,
            last_scaled_at: BTreeMap::new(),
        }
    }

    /// The version wanted now.
    pub fn current(&self) -> &JobVersion {
        self.versions
            .last()
            .expect("a JobState holds at least one version")
    }

    /// The spec of a version, if still kept.
    pub fn version(&self, version: u64) -> Option<&JobVersion> {
        self.versions
            .iter()
            .find(|candidate| candidate.version == version)
    }
}

/// A rolling update of a job to one version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// The version being rolled out.
    pub job_version: u64,
    /// Running, successful or failed.
    pub status: DeploymentStatus,
    /// When it started.
    pub started_at: Time,
}

/// A deployment's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeploymentStatus {
    /// Still replacing allocations.
    Running,
    /// Every allocation runs the version and turned healthy.
    Successful,
    /// An allocation of the version did not turn healthy in time.
    Failed,
}
