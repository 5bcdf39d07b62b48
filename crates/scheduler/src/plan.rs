//! A plan: the decisions of one evaluation, for the controller to write to
//! the store in one fenced transaction (or for `keel job plan` to show).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cluster::{Allocation, AllocationId, Deployment, PlacementReason, StopReason};
use crate::placement::PlacementFailure;
use crate::time::Time;

/// The changes one evaluation of a job asks for.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The job evaluated.
    pub job: String,
    /// Its current version.
    pub job_version: u64,
    /// New allocations, complete records ready to write (desired `run`,
    /// client `pending`).
    pub placements: Vec<Allocation>,
    /// Allocations to stop (set desired status to `stop` with the reason).
    /// A `lost` stop marks an allocation whose node is down past the grace.
    pub stops: Vec<PlannedStop>,
    /// Allocations whose version changes without a restart: set their
    /// `job_version` and clear `deployment_healthy`.
    pub in_place_updates: Vec<InPlaceUpdate>,
    /// Health decided for allocations of the running deployment: record it
    /// in `deployment_healthy`.
    pub health_updates: Vec<HealthUpdate>,
    /// The deployment record to write, when it started or changed status.
    pub deployment: Option<Deployment>,
    /// The deployment failed with `auto_revert`: register this (stable)
    /// version's spec again as the newest version.
    pub revert_to_version: Option<u64>,
    /// The deployment succeeded: mark this version stable.
    pub mark_stable: Option<u64>,
    /// Autoscaling: register a new version with these counts.
    pub scaling: Vec<ScalingDecision>,
    /// Instances that could not be placed, and why. The controller
    /// evaluates again when nodes or allocations change.
    pub failed_placements: Vec<FailedPlacement>,
    /// Failed allocations that will be rescheduled once their delay passed.
    pub reschedule_later: Vec<DelayedReschedule>,
    /// When to evaluate this job again even if nothing changes (a grace, a
    /// reschedule delay, a health deadline or a cooldown ends).
    pub next_evaluation_at: Option<Time>,
}

/// One allocation to stop.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedStop {
    /// The allocation.
    pub allocation: AllocationId,
    /// Its node (the key is `/keel/allocs/<node>/<id>`).
    pub node: String,
    /// Its group.
    pub group: String,
    /// Why.
    pub reason: StopReason,
}

/// One allocation to move to a new version in place.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InPlaceUpdate {
    /// The allocation.
    pub allocation: AllocationId,
    /// Its node.
    pub node: String,
    /// The version it runs from now on.
    pub job_version: u64,
}

/// A health decision for the current deployment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthUpdate {
    /// The allocation.
    pub allocation: AllocationId,
    /// Its node.
    pub node: String,
    /// Whether it turned healthy in time.
    pub healthy: bool,
}

/// An autoscaling decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScalingDecision {
    /// The group.
    pub group: String,
    /// Its count now.
    pub from: u32,
    /// The count wanted.
    pub to: u32,
    /// The CPU use measured, in percent of the reserved CPU.
    pub cpu_percent: u32,
}

/// An instance that could not be placed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedPlacement {
    /// The group.
    pub group: String,
    /// The instance's index.
    pub index: u32,
    /// Why it was to be placed.
    pub reason: PlacementReason,
    /// Why no node fit.
    pub failure: PlacementFailure,
}

/// A failed allocation waiting for its reschedule delay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelayedReschedule {
    /// The failed allocation.
    pub allocation: AllocationId,
    /// When it will be rescheduled.
    pub at: Time,
    /// The delay applied.
    #[serde(with = "crate::time::duration_text")]
    pub delay: Duration,
}

impl Plan {
    /// Whether the plan changes nothing in the store.
    pub fn is_empty(&self) -> bool {
        self.placements.is_empty()
            && self.stops.is_empty()
            && self.in_place_updates.is_empty()
            && self.health_updates.is_empty()
            && self.deployment.is_none()
            && self.revert_to_version.is_none()
            && self.mark_stable.is_none()
            && self.scaling.is_empty()
    }

    /// Asks for an evaluation at `at` at the latest.
    pub(crate) fn evaluate_again_at(&mut self, at: Time) {
        self.next_evaluation_at = Some(
            self.next_evaluation_at
                .map_or(at, |earlier| earlier.min(at)),
        );
    }
}
