//! The reconciler: desired state (the job's current version) against actual
//! state (its allocations, their nodes and what their agents report) gives a
//! [`Plan`]. It is Nomad's allocation reconciler, reduced to keel's needs:
//!
//! - Every group has `count` slots (Nomad's name indexes). An empty slot gets
//!   a placement; slots past `count` are stopped (scale down); a slot held by
//!   two allocations (a race, or a node that came back) keeps one and stops
//!   the other, so no more than `count` allocations are ever wanted running.
//! - **Node down** (its lease expired): its allocations stay counted while
//!   `disconnect.lost_after` runs, so a node that comes back within the grace
//!   keeps them and nothing moves; past the grace they are stopped as `lost`
//!   and replaced elsewhere. The stop is written before the node can return,
//!   and a stopped allocation never runs again, so a node that returns finds
//!   its replaced allocations stopped (Nomad issues 10953, 12680). A lost
//!   allocation whose replacement finds no room leaves its slot empty, and an
//!   empty slot is filled at every evaluation until capacity exists (1461).
//! - **Node suspect** (gossip only): nothing moves (Nomad 10341), not even
//!   for a drain or an update.
//! - **Failed allocations** move per `reschedule`, after their delay; one not
//!   eligible any more stays failed in its slot.
//! - **Draining node**: its allocations move `migrate.max_parallel` at a time,
//!   the next only once the previous replacements are ready for
//!   `migrate.min_healthy_time`.
//! - **New version**: allocations whose tasks did not change are updated in
//!   place; the others are replaced, all at once without an `update` block,
//!   otherwise `max_parallel` at a time under a deployment that fails when a
//!   new allocation is not healthy within `healthy_deadline`, and then, with
//!   `auto_revert`, asks for the last stable version back.
//!
//! Replacements of allocations that are still running (migrations, updates,
//! completed service allocations) stop their predecessor only when they
//! found a node: when nothing fits, the old allocation keeps serving.

use std::collections::BTreeMap;

use crate::autoscale::autoscale;
use crate::cluster::{
    Allocation, ClientState, ClientStatus, Cluster, Deployment, DeploymentStatus, DesiredStatus,
    JobState, NodeStatus, PlacementReason, RescheduleEvent, StopReason,
};
use crate::limits;
use crate::placement::{Placer, SchedulerAlgorithm};
use crate::plan::{
    DelayedReschedule, FailedPlacement, HealthUpdate, InPlaceUpdate, Plan, PlannedStop,
};
use crate::policy::{allocation_health, next_reschedule_delay, reschedule_eligible, Health};
use crate::spec::{Group, Job, JobType};
use crate::time::Time;

/// The inputs of one evaluation of one job.
#[derive(Clone, Copy, Debug)]
pub struct Evaluation<'input> {
    /// The job, its versions and deployment.
    pub job: &'input JobState,
    /// The cluster: nodes, every job's allocations, gossiped usage.
    pub cluster: &'input Cluster,
    /// The time of the evaluation.
    pub now: Time,
    /// Seeds every choice made by chance (node order on ties, dynamic
    /// ports, allocation ids). Use a fresh one per evaluation, such as the
    /// store revision the snapshot was read at mixed with the controller's
    /// boot id: ids must never repeat.
    pub seed: u64,
    /// Bin-packing (default) or spread.
    pub algorithm: SchedulerAlgorithm,
}

/// Evaluates a job: the plan that moves the cluster towards its current
/// version. Pure: the same inputs give the same plan.
pub fn evaluate(evaluation: &Evaluation<'_>) -> Plan {
    Reconciler::new(evaluation).run()
}

/// What `keel job plan FILE` shows: the plan of registering `job` as the
/// next version of `existing` (or as a new job), without registering it.
pub fn plan_job(
    job: &Job,
    existing: Option<&JobState>,
    cluster: &Cluster,
    now: Time,
    seed: u64,
) -> Plan {
    let mut state = match existing {
        Some(existing) => existing.clone(),
        None => JobState::new(job.clone()),
    };
    if state.current().job != *job {
        let version = state.current().version + 1;
        state.versions.push(crate::cluster::JobVersion {
            version,
            job: job.clone(),
            stable: false,
        });
    }
    state.stopped = false;
    evaluate(&Evaluation {
        job: &state,
        cluster,
        now,
        seed,
        algorithm: SchedulerAlgorithm::default(),
    })
}

/// A placement the reconciler wants, before a node is chosen.
struct Wanted<'input> {
    index: u32,
    reason: PlacementReason,
    /// The allocation it replaces.
    previous: Option<&'input Allocation>,
    /// How the previous allocation is stopped.
    stop: Option<StopReason>,
    /// Whether the stop stands even when no node fits (a lost allocation is
    /// lost either way; a running one keeps serving).
    stop_regardless: bool,
    /// The reschedule this placement is, if it is one.
    reschedule_event: Option<RescheduleEvent>,
}

/// An allocation that keeps its slot.
struct Kept<'input> {
    allocation: &'input Allocation,
    /// Runs the current version (possibly after an in-place update).
    current: bool,
    /// Updated in place by this plan: its recorded health is cleared.
    updated_in_place: bool,
}

/// How a group stands against its deployment.
#[derive(Default)]
struct GroupOutcome {
    unhealthy: bool,
    complete: bool,
}

struct Reconciler<'input> {
    state: &'input JobState,
    cluster: &'input Cluster,
    now: Time,
    placer: Placer<'input>,
    job_allocations: Vec<&'input Allocation>,
    plan: Plan,
}

impl<'input> Reconciler<'input> {
    fn new(evaluation: &Evaluation<'input>) -> Reconciler<'input> {
        let current = evaluation.job.current();
        let job_allocations: Vec<&Allocation> = evaluation
            .cluster
            .allocations
            .iter()
            .filter(|allocation| allocation.job == current.job.name)
            .collect();
        Reconciler {
            state: evaluation.job,
            cluster: evaluation.cluster,
            now: evaluation.now,
            placer: Placer::new(evaluation.cluster, evaluation.seed, evaluation.algorithm),
            job_allocations,
            plan: Plan {
                job: current.job.name.clone(),
                job_version: current.version,
                ..Plan::default()
            },
        }
    }

    fn run(mut self) -> Plan {
        let current = self.state.current();
        let spec = &current.job;
        let wanted_running: Vec<&Allocation> = self
            .job_allocations
            .iter()
            .copied()
            .filter(|allocation| allocation.desired_status == DesiredStatus::Run)
            .collect();
        if self.state.stopped {
            for allocation in wanted_running {
                self.stop(allocation, StopReason::JobStopped);
            }
            return self.plan;
        }
        for allocation in &wanted_running {
            if !spec.groups.contains_key(&allocation.group) {
                self.stop(allocation, StopReason::GroupRemoved);
            }
        }

        // The deployment of the current version: the recorded one, or a new
        // one when the version changed and some group rolls out with `update`.
        let mut deployment = self
            .state
            .deployment
            .clone()
            .filter(|deployment| deployment.job_version == current.version);
        if deployment.is_none() && spec.groups.values().any(|group| group.update.is_some()) {
            let started = Deployment {
                job_version: current.version,
                status: DeploymentStatus::Running,
                started_at: self.now,
            };
            self.plan.deployment = Some(started.clone());
            deployment = Some(started);
        }

        let mut any_unhealthy = false;
        let mut auto_revert = false;
        let mut all_complete = true;
        for (group_name, group) in &spec.groups {
            let outcome = self.reconcile_group(spec, group_name, group, deployment.as_ref());
            if group.update.is_some() {
                any_unhealthy |= outcome.unhealthy;
                auto_revert |= outcome.unhealthy
                    && group
                        .update
                        .as_ref()
                        .is_some_and(|update| update.auto_revert);
                all_complete &= outcome.complete;
            }
        }

        if let Some(deployment) =
            deployment.filter(|deployment| deployment.status == DeploymentStatus::Running)
        {
            if any_unhealthy {
                self.plan.deployment = Some(Deployment {
                    status: DeploymentStatus::Failed,
                    ..deployment
                });
                if auto_revert {
                    self.plan.revert_to_version = self.revert_target();
                }
            } else if all_complete {
                self.plan.deployment = Some(Deployment {
                    status: DeploymentStatus::Successful,
                    ..deployment
                });
                self.plan.mark_stable = Some(current.version);
            }
        }

        let deployment_running = self
            .plan
            .deployment
            .as_ref()
            .or(self.state.deployment.as_ref())
            .is_some_and(|deployment| {
                deployment.job_version == current.version
                    && deployment.status == DeploymentStatus::Running
            });
        if !deployment_running {
            let (decisions, next) = autoscale(self.state, self.cluster, self.now);
            self.plan.scaling = decisions;
            if let Some(next) = next {
                self.plan.evaluate_again_at(next);
            }
        }
        self.plan
    }

    /// The latest stable version before the current one, unless the current
    /// spec is itself a stable one (a revert that failed again is not
    /// reverted again, or two versions could chase each other forever).
    fn revert_target(&self) -> Option<u64> {
        let current = self.state.current();
        if self
            .state
            .versions
            .iter()
            .any(|version| version.stable && version.job == current.job)
        {
            return None;
        }
        self.state
            .versions
            .iter()
            .rev()
            .find(|version| version.version < current.version && version.stable)
            .map(|version| version.version)
    }

    fn stop(&mut self, allocation: &'input Allocation, reason: StopReason) {
        if allocation.is_active() {
            self.placer.release(allocation);
        }
        self.plan.stops.push(PlannedStop {
            allocation: allocation.id.clone(),
            node: allocation.node.clone(),
            group: allocation.group.clone(),
            reason,
        });
    }

    fn reconcile_group(
        &mut self,
        spec: &'input Job,
        group_name: &'input str,
        group: &'input Group,
        deployment: Option<&Deployment>,
    ) -> GroupOutcome {
        let now = self.now;
        let version = self.state.current().version;
        let mut slots: BTreeMap<u32, Vec<&'input Allocation>> = BTreeMap::new();
        for allocation in self.job_allocations.iter().copied() {
            if allocation.group == group_name && allocation.desired_status == DesiredStatus::Run {
                slots.entry(allocation.index).or_default().push(allocation);
            }
        }
        let beyond_count: Vec<&Allocation> = slots
            .range(group.count..)
            .flat_map(|(_, members)| members.iter().copied())
            .collect();
        for allocation in beyond_count {
            self.stop(allocation, StopReason::ScaledDown);
        }

        let watching = group
            .update
            .as_ref()
            .zip(deployment.filter(|deployment| deployment.status == DeploymentStatus::Running));
        let deployment_failed = group.update.is_some()
            && deployment.is_some_and(|deployment| deployment.status == DeploymentStatus::Failed);

        let mut wanted: Vec<Wanted<'input>> = Vec::new();
        let mut kept: Vec<Kept<'input>> = Vec::new();
        let mut migrate_candidates: Vec<&'input Allocation> = Vec::new();
        let mut update_candidates: Vec<&'input Allocation> = Vec::new();

        for index in 0..group.count {
            let Some(members) = slots.get(&index) else {
                wanted.push(Wanted {
                    index,
                    reason: PlacementReason::New,
                    previous: None,
                    stop: None,
                    stop_regardless: false,
                    reschedule_event: None,
                });
                continue;
            };
            let keeper = self.choose_keeper(members, version);
            for other in members
                .iter()
                .copied()
                .filter(|other| other.id != keeper.id)
            {
                self.stop(other, StopReason::Duplicate);
            }

            let node = self.cluster.node(&keeper.node);
            // A node missing from the snapshot went down so long ago that
            // the controller forgot it: its grace is over.
            let down_since = match node.map(|node| node.status) {
                None => Some(Time(0)),
                Some(NodeStatus::Down { since }) => Some(since),
                Some(NodeStatus::Alive | NodeStatus::Suspect) => None,
            };
            let batch_done =
                spec.job_type == JobType::Batch && keeper.client.status == ClientStatus::Complete;
            if let Some(since) = down_since.filter(|_| !batch_done) {
                let lost_at = since.after(group.disconnect.lost_after);
                if now >= lost_at {
                    wanted.push(Wanted {
                        index,
                        reason: PlacementReason::Lost,
                        previous: Some(keeper),
                        stop: Some(StopReason::Lost),
                        stop_regardless: true,
                        reschedule_event: None,
                    });
                } else {
                    self.plan.evaluate_again_at(lost_at);
                    kept.push(Kept {
                        allocation: keeper,
                        current: keeper.job_version == version,
                        updated_in_place: false,
                    });
                }
                continue;
            }

            match keeper.client.status {
                ClientStatus::Failed => {
                    let in_deployment = watching.is_some()
                        && keeper.job_version == version
                        && keeper.deployment_healthy != Some(true);
                    if in_deployment || (deployment_failed && keeper.job_version == version) {
                        // The deployment judges it: the failure fails the
                        // rollout (and may revert it) rather than moving.
                        kept.push(Kept {
                            allocation: keeper,
                            current: keeper.job_version == version,
                            updated_in_place: false,
                        });
                        continue;
                    }
                    let failed_at = keeper.client.finished_at.unwrap_or(keeper.created_at);
                    if !reschedule_eligible(&group.reschedule, &keeper.reschedule_events, failed_at)
                    {
                        kept.push(Kept {
                            allocation: keeper,
                            current: keeper.job_version == version,
                            updated_in_place: false,
                        });
                        continue;
                    }
                    let delay = next_reschedule_delay(
                        &group.reschedule,
                        &keeper.reschedule_events,
                        failed_at,
                    );
                    let due = failed_at.after(delay);
                    if now >= due {
                        wanted.push(Wanted {
                            index,
                            reason: PlacementReason::Rescheduled,
                            previous: Some(keeper),
                            stop: Some(StopReason::Rescheduled),
                            stop_regardless: false,
                            reschedule_event: Some(RescheduleEvent {
                                at: now,
                                previous_allocation: keeper.id.clone(),
                                previous_node: keeper.node.clone(),
                                delay,
                            }),
                        });
                    } else {
                        self.plan.reschedule_later.push(DelayedReschedule {
                            allocation: keeper.id.clone(),
                            at: due,
                            delay,
                        });
                        self.plan.evaluate_again_at(due);
                        kept.push(Kept {
                            allocation: keeper,
                            current: keeper.job_version == version,
                            updated_in_place: false,
                        });
                    }
                    continue;
                }
                ClientStatus::Complete => {
                    if spec.job_type == JobType::Service {
                        wanted.push(Wanted {
                            index,
                            reason: PlacementReason::Completed,
                            previous: Some(keeper),
                            stop: Some(StopReason::Completed),
                            stop_regardless: false,
                            reschedule_event: None,
                        });
                    } else {
                        kept.push(Kept {
                            allocation: keeper,
                            current: true,
                            updated_in_place: false,
                        });
                    }
                    continue;
                }
                ClientStatus::Pending | ClientStatus::Running => {}
            }

            // A suspect node's allocations are left alone: neither a drain
            // nor an update moves them until the node is known alive (or
            // down, and then lost after the grace).
            if node.is_some_and(|node| node.status != NodeStatus::Alive) {
                kept.push(Kept {
                    allocation: keeper,
                    current: keeper.job_version == version,
                    updated_in_place: false,
                });
                continue;
            }
            if node.is_some_and(|node| node.drain.is_some()) {
                migrate_candidates.push(keeper);
                continue;
            }
            if keeper.job_version != version {
                let unchanged = self
                    .state
                    .version(keeper.job_version)
                    .and_then(|old| old.job.groups.get(group_name))
                    .is_some_and(|old_group| group.runs_like(old_group));
                if unchanged {
                    self.plan.in_place_updates.push(InPlaceUpdate {
                        allocation: keeper.id.clone(),
                        node: keeper.node.clone(),
                        job_version: version,
                    });
                    kept.push(Kept {
                        allocation: keeper,
                        current: true,
                        updated_in_place: true,
                    });
                } else {
                    update_candidates.push(keeper);
                }
                continue;
            }
            kept.push(Kept {
                allocation: keeper,
                current: true,
                updated_in_place: false,
            });
        }

        // Health of the current version's allocations under the deployment.
        let mut outcome = GroupOutcome::default();
        let mut all_healthy = true;
        let mut pending_health = 0u32;
        if let Some((update, deployment)) = watching {
            for kept in kept.iter().filter(|kept| kept.current) {
                let health = if kept.updated_in_place {
                    let mut fresh = kept.allocation.clone();
                    fresh.deployment_healthy = None;
                    allocation_health(
                        &fresh,
                        update.min_healthy_time,
                        update.healthy_deadline,
                        deployment.started_at,
                        now,
                    )
                } else {
                    allocation_health(
                        kept.allocation,
                        update.min_healthy_time,
                        update.healthy_deadline,
                        deployment.started_at,
                        now,
                    )
                };
                let recorded = if kept.updated_in_place {
                    None
                } else {
                    kept.allocation.deployment_healthy
                };
                match health {
                    Health::Healthy => {
                        if recorded.is_none() {
                            self.plan.health_updates.push(HealthUpdate {
                                allocation: kept.allocation.id.clone(),
                                node: kept.allocation.node.clone(),
                                healthy: true,
                            });
                        }
                    }
                    Health::Unhealthy => {
                        if recorded.is_none() {
                            self.plan.health_updates.push(HealthUpdate {
                                allocation: kept.allocation.id.clone(),
                                node: kept.allocation.node.clone(),
                                healthy: false,
                            });
                        }
                        outcome.unhealthy = true;
                        all_healthy = false;
                    }
                    Health::Pending { decided_by } => {
                        pending_health += 1;
                        all_healthy = false;
                        self.plan.evaluate_again_at(decided_by);
                    }
                }
            }
        }
        all_healthy &= kept.iter().all(|kept| kept.current);

        // Drain: move max_parallel at a time, waiting for the moved ones.
        if !migrate_candidates.is_empty() {
            let migrating = self.migrations_in_flight(group_name, group);
            let mut budget = group.migrate.max_parallel.saturating_sub(migrating);
            for candidate in migrate_candidates {
                if budget > 0 {
                    budget -= 1;
                    wanted.push(Wanted {
                        index: candidate.index,
                        reason: PlacementReason::Migrated,
                        previous: Some(candidate),
                        stop: Some(StopReason::Migrated),
                        stop_regardless: false,
                        reschedule_event: None,
                    });
                } else {
                    all_healthy = false;
                    kept.push(Kept {
                        allocation: candidate,
                        current: candidate.job_version == version,
                        updated_in_place: false,
                    });
                }
            }
        }

        // Destructive updates: all at once without `update`, otherwise
        // max_parallel minus the new allocations not yet healthy.
        let mut update_budget = match &group.update {
            None => u32::MAX,
            // A failed deployment (or one failing now) replaces nothing more.
            Some(_) if deployment_failed || outcome.unhealthy => 0,
            Some(update) => update
                .max_parallel
                .saturating_sub(pending_health + wanted.len() as u32),
        };
        for candidate in update_candidates {
            if update_budget > 0 {
                update_budget -= 1;
                wanted.push(Wanted {
                    index: candidate.index,
                    reason: PlacementReason::Updated,
                    previous: Some(candidate),
                    stop: Some(StopReason::Updated),
                    stop_regardless: false,
                    reschedule_event: None,
                });
            } else {
                all_healthy = false;
                kept.push(Kept {
                    allocation: candidate,
                    current: false,
                    updated_in_place: false,
                });
            }
        }

        outcome.complete = all_healthy && wanted.is_empty();
        for want in wanted {
            self.place(spec, group_name, group, want);
        }
        outcome
    }

    /// Among allocations sharing a slot, keeps the one most worth keeping:
    /// on a node that is up, running, ready, of the current version, and
    /// then the newest (the one the cluster placed last).
    fn choose_keeper(&self, members: &[&'input Allocation], version: u64) -> &'input Allocation {
        let rank = |allocation: &Allocation| {
            let node_up = self
                .cluster
                .node(&allocation.node)
                .is_some_and(|node| !matches!(node.status, NodeStatus::Down { .. }));
            (
                node_up,
                allocation.client.status == ClientStatus::Running,
                allocation.client.ready_since.is_some(),
                allocation.job_version == version,
                allocation.created_at,
                allocation.id.clone(),
            )
        };
        members
            .iter()
            .copied()
            .max_by_key(|allocation| rank(allocation))
            .expect("a slot has at least one member")
    }

    /// Replacements of drained allocations still on their way to healthy;
    /// one past `migrate.healthy_deadline` no longer holds the drain back.
    fn migrations_in_flight(&mut self, group_name: &str, group: &Group) -> u32 {
        let mut in_flight = 0;
        let mut next = None;
        for allocation in &self.job_allocations {
            if allocation.group != group_name
                || allocation.placement_reason != PlacementReason::Migrated
                || !allocation.is_active()
            {
                continue;
            }
            let mut unjudged = (*allocation).clone();
            unjudged.deployment_healthy = None;
            if let Health::Pending { decided_by } = allocation_health(
                &unjudged,
                group.migrate.min_healthy_time,
                group.migrate.healthy_deadline,
                allocation.created_at,
                self.now,
            ) {
                in_flight += 1;
                next = Some(next.map_or(decided_by, |earlier: Time| earlier.min(decided_by)));
            }
        }
        if let Some(next) = next {
            self.plan.evaluate_again_at(next);
        }
        in_flight
    }

    fn place(
        &mut self,
        spec: &'input Job,
        group_name: &'input str,
        group: &'input Group,
        want: Wanted<'input>,
    ) {
        let now = self.now;
        if let Some(previous) = want
            .previous
            .filter(|previous| want.stop.is_some() && previous.is_active())
        {
            // The replacement may take the room its predecessor frees.
            self.placer.release(previous);
        }
        let mut penalty_nodes = Vec::new();
        let mut reschedule_events = want
            .previous
            .map(|previous| previous.reschedule_events.clone())
            .unwrap_or_default();
        if let Some(event) = &want.reschedule_event {
            penalty_nodes.extend(
                reschedule_events
                    .iter()
                    .map(|event| event.previous_node.clone()),
            );
            penalty_nodes.push(event.previous_node.clone());
            reschedule_events.push(event.clone());
            let excess = reschedule_events
                .len()
                .saturating_sub(limits::RESCHEDULE_EVENTS_MAX);
            reschedule_events.drain(..excess);
        }
        match self.placer.select(spec, group_name, group, &penalty_nodes) {
            Ok(choice) => {
                let allocation = Allocation {
                    id: self.placer.allocation_id(),
                    job: spec.name.clone(),
                    job_version: self.state.current().version,
                    group: group_name.to_string(),
                    index: want.index,
                    node: choice.node,
                    resources: group.resources(),
                    ports: choice.ports,
                    placement_reason: want.reason,
                    previous_allocation: want.previous.map(|previous| previous.id.clone()),
                    reschedule_events,
                    created_at: now,
                    desired_status: DesiredStatus::Run,
                    deployment_healthy: None,
                    client: ClientState::PENDING,
                };
                self.placer.take(&allocation);
                if let (Some(previous), Some(reason)) = (want.previous, want.stop) {
                    self.plan.stops.push(PlannedStop {
                        allocation: previous.id.clone(),
                        node: previous.node.clone(),
                        group: previous.group.clone(),
                        reason,
                    });
                }
                self.plan.placements.push(allocation);
            }
            Err(failure) => {
                self.plan.failed_placements.push(FailedPlacement {
                    group: group_name.to_string(),
                    index: want.index,
                    reason: want.reason,
                    failure,
                });
                if let (Some(previous), Some(reason)) = (want.previous, want.stop) {
                    if want.stop_regardless {
                        self.plan.stops.push(PlannedStop {
                            allocation: previous.id.clone(),
                            node: previous.node.clone(),
                            group: previous.group.clone(),
                            reason,
                        });
                    } else if previous.is_active() {
                        self.placer.take(previous);
                    }
                }
            }
        }
    }
}
