//! Placement: feasibility, then ranking, then selection, as Nomad's stack.
//!
//! Ranking appends scores per node and averages them (Nomad's score
//! normalisation): the fit score (bin-packing by default: Nomad's BestFit v3,
//! `20 - (10^free_cpu + 10^free_memory)` over 18, which prefers the fullest
//! node that still fits; or its mirror image, worst fit, when the cluster asks
//! for spread), the job anti-affinity penalty `-(collisions + 1) / count` on
//! nodes that already hold instances of the group (so instances land on
//! distinct nodes when they can), a penalty of -1 on nodes where the
//! allocation being rescheduled failed before, and the weighted `spread`
//! boosts. The best score wins; ties go to the first node in an order
//! shuffled by the seed, so a seed gives one answer and different seeds do
//! not all pile onto the same node. Unlike Nomad, every feasible node is
//! scored (no sampling of log2(n) candidates): keel's clusters are small.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::cluster::{Allocation, Cluster, Node};
use crate::feasibility::{
    compile_constraints, exhausted_dimension, node_refusal, ports_available, NodeProperty,
};
use crate::rng::SplitMix64;
use crate::spec::{Group, Job, Resources};

/// How the fit score ranks nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerAlgorithm {
    /// Fill nodes up (Nomad's default): fewer nodes used, more room for big
    /// allocations.
    #[default]
    Binpack,
    /// Prefer the emptiest node.
    Spread,
}

/// Why an allocation could not be placed: Nomad's allocation metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementFailure {
    /// Nodes considered.
    pub nodes_evaluated: u32,
    /// Nodes refused by state or constraint, per reason (`node down`,
    /// `${meta.zone} = a`, `distinct_hosts`).
    pub nodes_filtered: BTreeMap<String, u32>,
    /// Feasible nodes without room, per resource (`cpu`, `memory`, `ports`).
    pub nodes_exhausted: BTreeMap<String, u32>,
}

/// The chosen node and the ports given there.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Choice {
    pub(crate) node: String,
    pub(crate) ports: BTreeMap<String, u16>,
}

/// What one node holds, as the plan so far leaves it.
#[derive(Clone, Debug)]
struct NodeUsage {
    used: Resources,
    ports: BTreeSet<u16>,
    /// Active allocations per (job, group).
    per_group: BTreeMap<(String, String), u32>,
    /// Active allocations per job.
    per_job: BTreeMap<String, u32>,
}

impl NodeUsage {
    /// Nothing held. (Not `Default`: `Resources::default()` is a task's
    /// default reservation, not zero.)
    fn empty() -> NodeUsage {
        NodeUsage {
            used: Resources::ZERO,
            ports: BTreeSet::new(),
            per_group: BTreeMap::new(),
            per_job: BTreeMap::new(),
        }
    }
}

/// The placement engine for one evaluation: the cluster's usage, updated as
/// the plan stops and places allocations.
pub(crate) struct Placer<'cluster> {
    nodes: Vec<&'cluster Node>,
    usage: BTreeMap<&'cluster str, NodeUsage>,
    rng: SplitMix64,
    algorithm: SchedulerAlgorithm,
}

impl<'cluster> Placer<'cluster> {
    pub(crate) fn new(
        cluster: &'cluster Cluster,
        seed: u64,
        algorithm: SchedulerAlgorithm,
    ) -> Placer<'cluster> {
        let mut rng = SplitMix64::new(seed);
        let mut nodes: Vec<&Node> = cluster.nodes.iter().collect();
        nodes.sort_by(|left, right| left.name.cmp(&right.name));
        rng.shuffle(&mut nodes);
        let mut placer = Placer {
            usage: nodes
                .iter()
                .map(|node| (node.name.as_str(), NodeUsage::empty()))
                .collect(),
            nodes,
            rng,
            algorithm,
        };
        for allocation in cluster
            .allocations
            .iter()
            .filter(|allocation| allocation.is_active())
        {
            placer.take(allocation);
        }
        placer
    }

    /// Records an allocation's hold on its node.
    pub(crate) fn take(&mut self, allocation: &Allocation) {
        let Some(usage) = self.usage.get_mut(allocation.node.as_str()) else {
            return;
        };
        usage.used = usage.used.plus(allocation.resources);
        usage.ports.extend(allocation.ports.values().copied());
        *usage
            .per_group
            .entry((allocation.job.clone(), allocation.group.clone()))
            .or_default() += 1;
        *usage.per_job.entry(allocation.job.clone()).or_default() += 1;
    }

    /// Frees what a stopped allocation held.
    pub(crate) fn release(&mut self, allocation: &Allocation) {
        let Some(usage) = self.usage.get_mut(allocation.node.as_str()) else {
            return;
        };
        usage.used = usage.used.minus(allocation.resources);
        for port in allocation.ports.values() {
            usage.ports.remove(port);
        }
        if let Some(count) = usage
            .per_group
            .get_mut(&(allocation.job.clone(), allocation.group.clone()))
        {
            *count = count.saturating_sub(1);
        }
        if let Some(count) = usage.per_job.get_mut(&allocation.job) {
            *count = count.saturating_sub(1);
        }
    }

    /// Chooses a node for one instance of `group`, or says why none fits.
    /// `penalty_nodes` are where the allocation being replaced failed.
    pub(crate) fn select(
        &mut self,
        job: &Job,
        group_name: &str,
        group: &Group,
        penalty_nodes: &[String],
    ) -> Result<Choice, PlacementFailure> {
        let (constraints, distinct_hosts) =
            compile_constraints(&job.constraints, &group.constraints);
        let needed = group.resources();
        let static_ports: Vec<u16> = group
            .ports()
            .filter_map(|(_, spec)| spec.static_port)
            .collect();
        let dynamic_count = group
            .ports()
            .filter(|(_, spec)| spec.static_port.is_none())
            .count();
        let group_key = (job.name.clone(), group_name.to_string());
        let spreads: Vec<(NodeProperty, &crate::spec::Spread)> = group
            .spreads
            .iter()
            .filter_map(|spread| {
                NodeProperty::parse(&spread.attribute)
                    .ok()
                    .map(|property| (property, spread))
            })
            .collect();
        // Instances of the group per spread value, over every node.
        let spread_counts: Vec<BTreeMap<&str, u32>> = spreads
            .iter()
            .map(|(property, _)| {
                let mut counts = BTreeMap::new();
                for node in &self.nodes {
                    if let Some(value) = property.value(node) {
                        let held = self.usage[node.name.as_str()]
                            .per_group
                            .get(&group_key)
                            .copied()
                            .unwrap_or(0);
                        *counts.entry(value).or_insert(0) += held;
                    }
                }
                counts
            })
            .collect();

        let mut failure = PlacementFailure::default();
        let mut best: Option<(f64, &Node)> = None;
        for node in &self.nodes {
            failure.nodes_evaluated += 1;
            let usage = &self.usage[node.name.as_str()];
            if let Some(reason) = node_refusal(node) {
                *failure
                    .nodes_filtered
                    .entry(reason.to_string())
                    .or_default() += 1;
                continue;
            }
            if let Some(constraint) = constraints
                .iter()
                .find(|constraint| !constraint.allows(node))
            {
                *failure
                    .nodes_filtered
                    .entry(constraint.description.clone())
                    .or_default() += 1;
                continue;
            }
            let collisions = usage.per_group.get(&group_key).copied().unwrap_or(0);
            if (distinct_hosts.per_group && collisions > 0)
                || (distinct_hosts.per_job
                    && usage.per_job.get(&job.name).copied().unwrap_or(0) > 0)
            {
                *failure
                    .nodes_filtered
                    .entry("distinct_hosts".to_string())
                    .or_default() += 1;
                continue;
            }
            if let Some(dimension) = exhausted_dimension(node.capacity.minus(usage.used), needed) {
                *failure
                    .nodes_exhausted
                    .entry(dimension.to_string())
                    .or_default() += 1;
                continue;
            }
            if let Some(dimension) =
                ports_available(node, &usage.ports, &static_ports, dynamic_count)
            {
                *failure
                    .nodes_exhausted
                    .entry(dimension.to_string())
                    .or_default() += 1;
                continue;
            }

            let mut scores = vec![fit_score(
                self.algorithm,
                node.capacity,
                usage.used.plus(needed),
            )];
            if collisions > 0 {
                scores.push(-f64::from(collisions + 1) / f64::from(group.count.max(1)));
            }
            if penalty_nodes.contains(&node.name) {
                scores.push(-1.0);
            }
            if !spreads.is_empty() {
                let weight_total: f64 = spreads
                    .iter()
                    .map(|(_, spread)| f64::from(spread.weight))
                    .sum();
                let boost: f64 = spreads
                    .iter()
                    .zip(&spread_counts)
                    .map(|((property, spread), counts)| {
                        spread_boost(property, spread, counts, node, group.count)
                            * f64::from(spread.weight)
                    })
                    .sum::<f64>()
                    / weight_total;
                scores.push(boost);
            }
            let score = scores.iter().sum::<f64>() / scores.len() as f64;
            if best.is_none_or(|(best_score, _)| score > best_score) {
                best = Some((score, node));
            }
        }
        let Some((_, node)) = best else {
            return Err(failure);
        };
        let ports = self.assign_ports(node, group);
        Ok(Choice {
            node: node.name.clone(),
            ports,
        })
    }

    /// Gives the group's static ports and draws free dynamic ones from the
    /// node's range, starting at a seeded offset (feasibility made sure
    /// enough are free).
    fn assign_ports(&mut self, node: &Node, group: &Group) -> BTreeMap<String, u16> {
        let usage = &self.usage[node.name.as_str()];
        let mut taken: BTreeSet<u16> = usage.ports.clone();
        taken.extend(group.ports().filter_map(|(_, spec)| spec.static_port));
        let mut ports = BTreeMap::new();
        let range = node.port_range;
        let range_size = u64::from(range.last.saturating_sub(range.first)) + 1;
        for (label, spec) in group.ports() {
            let port = match spec.static_port {
                Some(port) => port,
                None => {
                    let offset = self.rng.below(range_size);
                    let found = (0..range_size)
                        .map(|step| range.first + ((offset + step) % range_size) as u16)
                        .find(|candidate| !taken.contains(candidate));
                    match found {
                        Some(port) => port,
                        None => continue,
                    }
                }
            };
            taken.insert(port);
            ports.insert(label.to_string(), port);
        }
        ports
    }

    /// A fresh allocation id, drawn from the seed.
    pub(crate) fn allocation_id(&mut self) -> crate::cluster::AllocationId {
        let high = self.rng.next_u64();
        let low = self.rng.next_u64();
        crate::cluster::AllocationId(format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            high >> 32,
            (high >> 16) & 0xffff,
            high & 0x0fff,
            ((low >> 48) & 0x3fff) | 0x8000,
            low & 0xffff_ffff_ffff
        ))
    }
}

/// Nomad's fit scores, normalised to 0..1: BestFit v3 for bin-packing and its
/// mirror (worst fit) for spread. `used` includes the allocation placed.
pub fn fit_score(algorithm: SchedulerAlgorithm, capacity: Resources, used: Resources) -> f64 {
    let free_fraction = |used: u64, total: u64| {
        if total == 0 {
            0.0
        } else {
            1.0 - (used as f64 / total as f64).min(1.0)
        }
    };
    let free_cpu = free_fraction(used.cpu_millicores, capacity.cpu_millicores);
    let free_memory = free_fraction(used.memory_mib, capacity.memory_mib);
    // 2 at full use, 20 when empty.
    let total = 10f64.powf(free_cpu) + 10f64.powf(free_memory);
    let score = match algorithm {
        SchedulerAlgorithm::Binpack => 20.0 - total,
        SchedulerAlgorithm::Spread => total - 2.0,
    };
    score.clamp(0.0, 18.0) / 18.0
}

/// The boost (-1 to 1) a node gets from one spread block: positive where its
/// value holds fewer instances than its share, negative where it holds more,
/// -1 when the node lacks the attribute.
fn spread_boost(
    property: &NodeProperty,
    spread: &crate::spec::Spread,
    counts: &BTreeMap<&str, u32>,
    node: &Node,
    count: u32,
) -> f64 {
    let Some(value) = property.value(node) else {
        return -1.0;
    };
    let held = f64::from(counts.get(value).copied().unwrap_or(0));
    if spread.targets.is_empty() {
        // Even spread: compare with the mean over the values seen.
        let total: u32 = counts.values().sum();
        let mean = f64::from(total) / counts.len().max(1) as f64;
        return ((mean - held) / mean.max(1.0)).clamp(-1.0, 1.0);
    }
    match spread.targets.iter().find(|target| target.value == value) {
        Some(target) => {
            let desired = f64::from(target.percent) / 100.0 * f64::from(count.max(1));
            if desired <= 0.0 {
                -1.0
            } else {
                ((desired - held) / desired).clamp(-1.0, 1.0)
            }
        }
        None => -1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binpack_prefers_fuller_nodes_and_spread_emptier_ones() {
        let capacity = Resources {
            cpu_millicores: 1000,
            memory_mib: 1000,
        };
        let nearly_full = Resources {
            cpu_millicores: 900,
            memory_mib: 900,
        };
        let nearly_empty = Resources {
            cpu_millicores: 100,
            memory_mib: 100,
        };
        assert!(
            fit_score(SchedulerAlgorithm::Binpack, capacity, nearly_full)
                > fit_score(SchedulerAlgorithm::Binpack, capacity, nearly_empty)
        );
        assert!(
            fit_score(SchedulerAlgorithm::Spread, capacity, nearly_full)
                < fit_score(SchedulerAlgorithm::Spread, capacity, nearly_empty)
        );
        assert_eq!(
            fit_score(SchedulerAlgorithm::Binpack, capacity, capacity),
            1.0
        );
        assert_eq!(
            fit_score(SchedulerAlgorithm::Binpack, capacity, Resources::ZERO),
            0.0
        );
    }
}
