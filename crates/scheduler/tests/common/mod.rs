//! A tiny stand-in for the controller and the agents, for tests: it applies
//! plans to a `JobState` and `Cluster` the way the controller writes them to
//! the store, and moves allocations along the way agents report them.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use keel_scheduler::{
    evaluate, Allocation, ClientStatus, Cluster, DesiredStatus, Evaluation, Job, JobState,
    JobVersion, Node, NodeStatus, Plan, PortRange, Resources, SchedulerAlgorithm, Time,
};

pub fn node(name: &str, zone: &str, cpu_millicores: u64, memory_mib: u64) -> Node {
    Node {
        name: name.to_string(),
        labels: BTreeMap::from([("zone".to_string(), zone.to_string())]),
        attributes: BTreeMap::from([("kernel.name".to_string(), "linux".to_string())]),
        capacity: Resources {
            cpu_millicores,
            memory_mib,
        },
        port_range: PortRange {
            first: 20000,
            last: 20099,
        },
        eligible: true,
        drain: None,
        status: NodeStatus::Alive,
    }
}

pub fn job(text: &str) -> Job {
    Job::from_toml_validated(text).unwrap_or_else(|error| panic!("test job is valid: {error}"))
}

/// A one-group job `name` with `count` instances of a task reserving
/// `cpu`/`memory`, plus `extra` TOML lines inside the group.
pub fn simple_job(
    name: &str,
    count: u32,
    cpu_millicores: u64,
    memory_mib: u64,
    extra: &str,
) -> Job {
    job(&format!(
        "name = \"{name}\"\n[group.{name}]\ncount = {count}\n{extra}\n[group.{name}.task.main]\nconfig = {{ command = \"run\" }}\nport.http = {{}}\nresources = {{ cpu_millicores = {cpu_millicores}, memory_mib = {memory_mib} }}\n"
    ))
}

pub struct World {
    pub state: JobState,
    pub cluster: Cluster,
    pub now: Time,
    pub seed: u64,
    /// How long a started allocation takes to turn ready (None: never).
    pub ready_after: Option<Duration>,
}

impl World {
    pub fn new(job: Job, nodes: Vec<Node>) -> World {
        World {
            state: JobState::new(job),
            cluster: Cluster {
                nodes,
                ..Cluster::default()
            },
            now: Time(1_000_000),
            seed: 1,
            ready_after: Some(Duration::ZERO),
        }
    }

    pub fn evaluate(&mut self) -> Plan {
        self.seed += 1;
        evaluate(&Evaluation {
            job: &self.state,
            cluster: &self.cluster,
            now: self.now,
            seed: self.seed,
            algorithm: SchedulerAlgorithm::Binpack,
        })
    }

    /// Writes a plan as the controller would.
    pub fn apply(&mut self, plan: &Plan) {
        for update in &plan.in_place_updates {
            let allocation = self.allocation_mut(&update.allocation.0);
            allocation.job_version = update.job_version;
            allocation.deployment_healthy = None;
        }
        for update in &plan.health_updates {
            self.allocation_mut(&update.allocation.0).deployment_healthy = Some(update.healthy);
        }
        for stop in &plan.stops {
            let allocation = self.allocation_mut(&stop.allocation.0);
            assert_eq!(
                allocation.desired_status,
                DesiredStatus::Run,
                "{} stopped twice",
                stop.allocation
            );
            allocation.desired_status = DesiredStatus::Stop(stop.reason);
        }
        for placement in &plan.placements {
            assert!(
                !self
                    .cluster
                    .allocations
                    .iter()
                    .any(|existing| existing.id == placement.id),
                "{} placed twice",
                placement.id
            );
            self.cluster.allocations.push(placement.clone());
        }
        if let Some(deployment) = &plan.deployment {
            self.state.deployment = Some(deployment.clone());
        }
        if let Some(version) = plan.mark_stable {
            self.state
                .versions
                .iter_mut()
                .filter(|candidate| candidate.version == version)
                .for_each(|candidate| candidate.stable = true);
        }
        if let Some(version) = plan.revert_to_version {
            let job = self
                .state
                .version(version)
                .expect("revert target kept")
                .job
                .clone();
            self.register(job);
        }
        if !plan.scaling.is_empty() {
            let mut job = self.state.current().job.clone();
            for decision in &plan.scaling {
                job.groups.get_mut(&decision.group).unwrap().count = decision.to;
                self.state
                    .last_scaled_at
                    .insert(decision.group.clone(), self.now);
            }
            self.register(job);
        }
    }

    /// Registers a new version of the job.
    pub fn register(&mut self, job: Job) {
        let version = self.state.current().version + 1;
        self.state.versions.push(JobVersion {
            version,
            job,
            stable: false,
        });
    }

    /// One controller pass: evaluate and write.
    pub fn step(&mut self) -> Plan {
        let plan = self.evaluate();
        self.apply(&plan);
        plan
    }

    /// Agents on reachable nodes start pending allocations and stop the
    /// ones the controller stopped.
    pub fn agents_act(&mut self) {
        let now = self.now;
        let ready_after = self.ready_after;
        let reachable: Vec<String> = self
            .cluster
            .nodes
            .iter()
            .filter(|node| !matches!(node.status, NodeStatus::Down { .. }))
            .map(|node| node.name.clone())
            .collect();
        for allocation in &mut self.cluster.allocations {
            if !reachable.contains(&allocation.node) {
                continue;
            }
            match (allocation.desired_status, allocation.client.status) {
                (DesiredStatus::Run, ClientStatus::Pending) => {
                    allocation.client.status = ClientStatus::Running;
                    allocation.client.started_at = Some(now);
                    allocation.client.ready_since = ready_after.map(|after| now.after(after));
                }
                (DesiredStatus::Stop(_), ClientStatus::Pending | ClientStatus::Running) => {
                    allocation.client.status = ClientStatus::Complete;
                    allocation.client.finished_at = Some(now);
                }
                _ => {}
            }
        }
    }

    /// Steps (controller, then agents) until a plan is empty, at most `rounds`.
    pub fn settle(&mut self, rounds: usize) {
        for _ in 0..rounds {
            let plan = self.step();
            self.agents_act();
            if plan.is_empty() {
                return;
            }
        }
        panic!("the cluster did not settle in {rounds} rounds");
    }

    pub fn advance(&mut self, duration: Duration) {
        self.now = self.now.after(duration);
    }

    pub fn allocation_mut(&mut self, id: &str) -> &mut Allocation {
        self.cluster
            .allocations
            .iter_mut()
            .find(|allocation| allocation.id.0 == id)
            .unwrap_or_else(|| panic!("no allocation {id}"))
    }

    pub fn node_mut(&mut self, name: &str) -> &mut Node {
        self.cluster
            .nodes
            .iter_mut()
            .find(|node| node.name == name)
            .unwrap()
    }

    /// Allocations wanted running and not ended.
    pub fn active(&self) -> Vec<&Allocation> {
        self.cluster
            .allocations
            .iter()
            .filter(|allocation| allocation.is_active())
            .collect()
    }

    pub fn active_on(&self, node: &str) -> usize {
        self.active()
            .iter()
            .filter(|allocation| allocation.node == node)
            .count()
    }

    /// Fails an allocation as its agent would report after the restart
    /// policy gave up.
    pub fn fail(&mut self, id: &str) {
        let now = self.now;
        let allocation = self.allocation_mut(id);
        allocation.client.status = ClientStatus::Failed;
        allocation.client.finished_at = Some(now);
        allocation.client.ready_since = None;
    }
}

pub fn seconds(count: u64) -> Duration {
    Duration::from_secs(count)
}
