//! keel's workload decisions as pure functions (issue 12's scheduler).
//!
//! Nothing here does I/O, reads a clock, spawns a task or draws an unseeded
//! random number: inputs are values (job specs, a snapshot of nodes and
//! allocations, the time, a seed) and outputs are decisions. The controller
//! and the supervisor in the agent carry them out. Nomad's scheduler is the
//! model: feasibility → ranking → selection for placement, and a reconciler
//! that diffs desired and actual state into a plan.
//!
//! The API, by who calls it:
//!
//! - **CLI / HTTP** (`keel job run|plan`): [`Job::from_toml_validated`],
//!   [`Job::from_json_validated`] (errors name the field), then
//!   [`plan_job`] for `keel job plan`.
//! - **Controller**: build a [`JobState`] and a [`Cluster`] from the store,
//!   call [`evaluate`] with the time and a fresh seed, write the [`Plan`]
//!   in one fenced transaction, evaluate again at
//!   [`Plan::next_evaluation_at`] or on the next change. [`drain_complete`]
//!   tells when a drained node is empty.
//! - **Supervisor** (agent): [`RestartTracker::on_task_end`] for every task
//!   exit or liveness failure; [`stop_after_client_disconnect`] while the
//!   store is unreachable.

mod autoscale;
mod cluster;
mod feasibility;
pub mod limits;
mod placement;
mod plan;
mod policy;
mod reconcile;
mod rng;
mod spec;
pub mod time;
mod validate;

pub use autoscale::{autoscale, SCALING_TOLERANCE};
pub use cluster::{
    Allocation, AllocationId, ClientState, ClientStatus, Cluster, Deployment, DeploymentStatus,
    DesiredStatus, Drain, JobState, JobVersion, Node, NodeStatus, PlacementReason, PortRange,
    RescheduleEvent, StopReason,
};
pub use feasibility::NodeProperty;
pub use placement::{fit_score, PlacementFailure, SchedulerAlgorithm};
pub use plan::{
    DelayedReschedule, FailedPlacement, HealthUpdate, InPlaceUpdate, Plan, PlannedStop,
    ScalingDecision,
};
pub use policy::{
    allocation_health, next_reschedule_delay, reschedule_eligible, stop_after_client_disconnect,
    Health, RestartDecision, RestartTracker, TaskEnd,
};
pub use reconcile::{evaluate, plan_job, Evaluation};
pub use rng::SplitMix64;
pub use spec::{
    Check, CheckKind, CheckType, Constraint, ConstraintOperator, DelayFunction, Disconnect, Driver,
    ExecConfig, Group, Job, JobType, MigrateStrategy, PortSpec, ReschedulePolicy, Resources,
    RestartMode, RestartPolicy, Scaling, Service, Spread, SpreadTarget, Task, UpdateStrategy,
};
pub use time::Time;
pub use validate::FieldProblem;

/// Why a job spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// The text is not a job of the right shape (the message has the line,
    /// column and field).
    #[error("the job's {format} does not parse: {message}")]
    Parse {
        /// `TOML` or `JSON`.
        format: &'static str,
        /// The parser's message.
        message: String,
    },
    /// The spec is larger than [`limits::SPEC_BYTES_MAX`].
    #[error(
        "the job spec is {bytes} bytes; at most {} are accepted",
        limits::SPEC_BYTES_MAX
    )]
    TooLarge {
        /// Its size.
        bytes: usize,
    },
    /// The spec parses but means something impossible.
    #[error("the job is invalid: {}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid {
        /// Every problem found, each naming its field.
        problems: Vec<FieldProblem>,
    },
}

/// Whether a draining node holds nothing that still runs or should: the
/// drain is over and the controller can clear it (the node stays ineligible).
pub fn drain_complete(cluster: &Cluster, node: &str) -> bool {
    !cluster
        .allocations
        .iter()
        .any(|allocation| allocation.node == node && allocation.is_active())
}
