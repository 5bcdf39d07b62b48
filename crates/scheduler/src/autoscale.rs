//! Autoscaling from the CPU use the agents gossip: for each group with a
//! `scaling` block, the count that brings the average use of the group's
//! reserved CPU to `target_cpu_percent` (Kubernetes' HPA rule:
//! `ceil(count × use / target)`, ignoring deviations within 10% so that noise
//! does not flap the count), clamped to `min..=max`, at most once per
//! `cooldown`.

use crate::cluster::{ClientStatus, Cluster, DesiredStatus, JobState};
use crate::plan::ScalingDecision;
use crate::time::Time;

/// Deviations from the target smaller than this fraction change nothing.
pub const SCALING_TOLERANCE: f64 = 0.1;

/// The scaling decisions for a job, and when a decision held back by a
/// cooldown may be taken.
pub fn autoscale(
    state: &JobState,
    cluster: &Cluster,
    now: Time,
) -> (Vec<ScalingDecision>, Option<Time>) {
    let current = state.current();
    let mut decisions = Vec::new();
    let mut next = None;
    for (group_name, group) in &current.job.groups {
        let Some(scaling) = &group.scaling else {
            continue;
        };
        let mut used_millicores = 0u64;
        let mut reserved_millicores = 0u64;
        for allocation in &cluster.allocations {
            if allocation.job != current.job.name
                || allocation.group != *group_name
                || allocation.desired_status != DesiredStatus::Run
                || allocation.client.status != ClientStatus::Running
            {
                continue;
            }
            // Allocations without a sample yet (just started) do not count.
            if let Some(used) = cluster.cpu_usage_millicores.get(&allocation.id) {
                used_millicores += used;
                reserved_millicores += allocation.resources.cpu_millicores;
            }
        }
        if reserved_millicores == 0 {
            continue;
        }
        let use_fraction = used_millicores as f64 / reserved_millicores as f64;
        let ratio = use_fraction * 100.0 / f64::from(scaling.target_cpu_percent);
        let desired = if (ratio - 1.0).abs() <= SCALING_TOLERANCE {
            group.count
        } else {
            (f64::from(group.count.max(1)) * ratio)
                .ceil()
                .min(f64::from(u32::MAX)) as u32
        };
        let desired = desired.clamp(scaling.min, scaling.max);
        if desired == group.count {
            continue;
        }
        if let Some(last) = state.last_scaled_at.get(group_name) {
            let cooldown_end = last.after(scaling.cooldown);
            if now < cooldown_end {
                next = Some(next.map_or(cooldown_end, |earlier: Time| earlier.min(cooldown_end)));
                continue;
            }
        }
        decisions.push(ScalingDecision {
            group: group_name.clone(),
            from: group.count,
            to: desired,
            cpu_percent: (use_fraction * 100.0).round() as u32,
        });
    }
    (decisions, next)
}
