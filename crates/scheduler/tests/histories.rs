//! Seeded property tests: thousands of random cluster histories (nodes that
//! crash, are cut off, blip or drain and come back; tasks that fail; jobs
//! that change count, version or break), each replayed second by second
//! through the reconciler and a model of the agents, checking after every
//! step the invariants the issue lists:
//!
//! - never more than `count` allocations wanted running per group, and at
//!   most one per slot;
//! - never a placement on an infeasible node (down, suspect, ineligible,
//!   draining, against a constraint, without room or ports);
//! - no allocation placed twice, none replaced twice;
//! - reschedule delays never shrink along a chain (but for Nomad's reset
//!   after a run longer than `max_delay`), and are waited out;
//! - a lost allocation is replaced in the same plan unless no node has
//!   room, and after a quiet period every slot is filled where room exists
//!   (Nomad 1461);
//! - a node that is only suspect, or down within its grace, loses nothing
//!   (Nomad 10341);
//! - a node that comes back runs nothing the controller stopped, and an agent
//!   cut off for `stop_on_client_after` runs nothing (Nomad 10953, 12680);
//! - drains and rolling updates move at most `max_parallel` at a time;
//! - an evaluation is a pure function of its inputs.
//!
//! A failure prints its seed; `KEEL_SCHEDULER_SEED=<seed>` replays that one
//! history, `KEEL_SCHEDULER_HISTORIES=<n>` runs more.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use keel_scheduler::{
    drain_complete, evaluate, Allocation, AllocationId, ClientStatus, Cluster, DesiredStatus,
    Drain, Evaluation, Job, JobState, JobVersion, NodeStatus, PlacementReason, Plan, PortRange,
    Resources, SchedulerAlgorithm, SplitMix64, StopReason, Time,
};

/// Seconds simulated per history, with faults.
const FAULT_SECONDS: u64 = 150;
/// Seconds of calm at the end, after which everything must have converged.
const QUIET_SECONDS: u64 = 150;
/// The agents' node TTL: a node cut off is down this long after.
const NODE_TTL: Duration = Duration::from_secs(5);
/// Terminal, stopped allocations are forgotten this long after (the
/// controller's garbage collection).
const GARBAGE_AFTER: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Machine {
    Up,
    /// Gossip suspects it; its lease and its link to the store are fine.
    Blip {
        until: u64,
    },
    /// Cut off from the store and the other agents; its processes run on.
    Partitioned {
        since: u64,
        until: u64,
    },
    /// Off: its processes died.
    Crashed {
        since: u64,
        until: u64,
    },
}

struct History {
    seed: u64,
    rng: SplitMix64,
    now_seconds: u64,
    state: JobState,
    cluster: Cluster,
    machines: BTreeMap<String, Machine>,
    /// Allocations whose process runs, wherever the store thinks it is.
    running: BTreeSet<AllocationId>,
    /// Every allocation id ever placed.
    placed: BTreeSet<AllocationId>,
    /// Every allocation ever replaced (a previous_allocation).
    replaced: BTreeSet<AllocationId>,
    /// Failure times of allocations, kept after garbage collection.
    failed_at: BTreeMap<AllocationId, Time>,
    evaluation_seed: u64,
    /// The version the last plan was made for (a revert registers a newer
    /// one, which the next evaluation takes up).
    evaluated_version: u64,
    /// How often each kind of decision happened, to show the histories
    /// exercise every rule.
    coverage: BTreeMap<String, u64>,
}

fn fail(seed: u64, step: u64, message: String) -> ! {
    panic!("seed {seed} at second {step}: {message}\nreplay: KEEL_SCHEDULER_SEED={seed} cargo test -p keel-scheduler --test histories")
}

macro_rules! ensure {
    ($history:expr, $condition:expr, $($message:tt)+) => {
        if !$condition {
            fail($history.seed, $history.now_seconds, format!($($message)+));
        }
    };
}

fn random_job(rng: &mut SplitMix64) -> Job {
    let mut text = String::from("name = \"app\"\n");
    let groups = 1 + rng.below(2);
    for group in 0..groups {
        let name = format!("g{group}");
        let count = 1 + rng.below(4);
        text.push_str(&format!("[group.{name}]\ncount = {count}\n"));
        let delay = 1 + rng.below(5);
        let function = ["constant", "exponential", "fibonacci"][rng.below(3) as usize];
        let max_delay = delay * (1 + rng.below(12));
        text.push_str(&format!("[group.{name}.reschedule]\ndelay = \"{delay}s\"\ndelay_function = \"{function}\"\nmax_delay = \"{max_delay}s\"\n"));
        if rng.below(3) == 0 {
            let attempts = 1 + rng.below(3);
            text.push_str(&format!(
                "unlimited = false\nattempts = {attempts}\ninterval = \"{}s\"\n",
                30 + rng.below(120)
            ));
        }
        let lost_after = rng.below(20);
        text.push_str(&format!(
            "[group.{name}.disconnect]\nlost_after = \"{lost_after}s\"\n"
        ));
        if rng.below(2) == 0 {
            // At most TTL + lost_after, so that no replacement runs beside it.
            let stop_after = 1 + rng.below(NODE_TTL.as_secs() + lost_after);
            text.push_str(&format!("stop_on_client_after = \"{stop_after}s\"\n"));
        }
        if rng.below(2) == 0 {
            let min_healthy = 1 + rng.below(4);
            text.push_str(&format!(
                "[group.{name}.update]\nmax_parallel = {}\nmin_healthy_time = \"{min_healthy}s\"\nhealthy_deadline = \"{}s\"\nauto_revert = {}\n",
                1 + rng.below(2),
                min_healthy + 5 + rng.below(20),
                rng.below(2) == 0
            ));
        }
        text.push_str(&format!("[group.{name}.migrate]\nmax_parallel = {}\nmin_healthy_time = \"{}s\"\nhealthy_deadline = \"20s\"\n", 1 + rng.below(2), 1 + rng.below(4)));
        if rng.below(3) == 0 {
            text.push_str(&format!("[[group.{name}.constraint]]\nattribute = \"${{meta.zone}}\"\noperator = \"!=\"\nvalue = \"c\"\n"));
        }
        if rng.below(4) == 0 {
            text.push_str(&format!(
                "[[group.{name}.spread]]\nattribute = \"${{meta.zone}}\"\n"
            ));
        }
        let cpu = 100 * (1 + rng.below(6));
        let memory = 64 * (1 + rng.below(8));
        text.push_str(&format!(
            "[group.{name}.task.main]\nconfig = {{ command = \"serve\" }}\nport.http = {{}}\nresources = {{ cpu_millicores = {cpu}, memory_mib = {memory} }}\n"
        ));
        if rng.below(3) == 0 {
            text.push_str(&format!("port.admin = {{ static = {} }}\n", 9000 + group));
        }
    }
    common::job(&text)
}

impl History {
    fn new(seed: u64) -> History {
        let mut rng = SplitMix64::new(seed);
        let node_count = 3 + rng.below(4);
        let mut nodes = Vec::new();
        let mut machines = BTreeMap::new();
        for number in 0..node_count {
            let name = format!("n{number}");
            // Zone a always exists, so the `!= c` constraint is satisfiable.
            let zone = ["a", "b", "c"][if number == 0 {
                0
            } else {
                rng.below(3) as usize
            }];
            let mut node = common::node(
                &name,
                zone,
                1000 * (1 + rng.below(4)),
                512 * (1 + rng.below(8)),
            );
            node.port_range = PortRange {
                first: 20000,
                last: 20000 + 3 + rng.below(20) as u16,
            };
            nodes.push(node);
            machines.insert(name, Machine::Up);
        }
        let job = random_job(&mut rng);
        History {
            seed,
            rng,
            now_seconds: 0,
            state: JobState::new(job),
            cluster: Cluster {
                nodes,
                ..Cluster::default()
            },
            machines,
            running: BTreeSet::new(),
            placed: BTreeSet::new(),
            replaced: BTreeSet::new(),
            failed_at: BTreeMap::new(),
            evaluation_seed: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            evaluated_version: 0,
            coverage: BTreeMap::new(),
        }
    }

    fn now(&self) -> Time {
        Time(1_000_000 + self.now_seconds * 1000)
    }

    fn run(&mut self) {
        for _ in 0..FAULT_SECONDS {
            self.inject_faults();
            self.second();
        }
        // Calm: everything comes back and stays up.
        for machine in self.machines.values_mut() {
            *machine = Machine::Up;
        }
        let mut last_plan = None;
        for _ in 0..QUIET_SECONDS {
            self.finish_drains(true);
            last_plan = Some(self.second());
        }
        self.check_converged(&last_plan.expect("the quiet phase ran"));
    }

    /// One second: node states move on, the controller evaluates and
    /// writes, the agents act.
    fn second(&mut self) -> Plan {
        self.now_seconds += 1;
        self.update_node_states();
        let plan = self.controller();
        self.agents();
        self.check_state();
        self.collect_garbage();
        plan
    }

    fn inject_faults(&mut self) {
        let now = self.now_seconds;
        let names: Vec<String> = self.machines.keys().cloned().collect();
        let pick = |rng: &mut SplitMix64| names[rng.below(names.len() as u64) as usize].clone();
        let roll = self.rng.below(1000);
        if roll < 20 {
            let name = pick(&mut self.rng);
            if self.machines[&name] == Machine::Up {
                let until = now + 1 + self.rng.below(40);
                self.machines
                    .insert(name, Machine::Partitioned { since: now, until });
            }
        } else if roll < 30 {
            let name = pick(&mut self.rng);
            if self.machines[&name] == Machine::Up {
                let until = now + 1 + self.rng.below(40);
                self.machines
                    .insert(name.clone(), Machine::Crashed { since: now, until });
                let on_node: Vec<AllocationId> = self
                    .cluster
                    .allocations
                    .iter()
                    .filter(|allocation| allocation.node == name)
                    .map(|allocation| allocation.id.clone())
                    .collect();
                for id in on_node {
                    self.running.remove(&id);
                }
            }
        } else if roll < 60 {
            let name = pick(&mut self.rng);
            if self.machines[&name] == Machine::Up {
                let until = now + 1 + self.rng.below(NODE_TTL.as_secs() - 1);
                self.machines.insert(name, Machine::Blip { until });
            }
        } else if roll < 110 {
            // A task fails for good (its restart policy gave up).
            let candidates: Vec<AllocationId> = self
                .cluster
                .allocations
                .iter()
                .filter(|allocation| {
                    self.running.contains(&allocation.id) && self.connected(&allocation.node)
                })
                .map(|allocation| allocation.id.clone())
                .collect();
            if !candidates.is_empty() {
                let id = candidates[self.rng.below(candidates.len() as u64) as usize].clone();
                let now = self.now();
                self.running.remove(&id);
                let allocation = self
                    .cluster
                    .allocations
                    .iter_mut()
                    .find(|allocation| allocation.id == id)
                    .unwrap();
                allocation.client.status = ClientStatus::Failed;
                allocation.client.finished_at = Some(now);
                allocation.client.ready_since = None;
                self.failed_at.insert(id, now);
            }
        } else if roll < 125 {
            self.change_job();
        } else if roll < 135 {
            let name = pick(&mut self.rng);
            let started_at = self.now();
            let node = self
                .cluster
                .nodes
                .iter_mut()
                .find(|node| node.name == name)
                .unwrap();
            if node.drain.is_none() {
                node.drain = Some(Drain { started_at });
                node.eligible = false;
            }
        }
        self.finish_drains(false);
        // Machines whose trouble is over come back.
        for machine in self.machines.values_mut() {
            let over = match *machine {
                Machine::Up => false,
                Machine::Blip { until }
                | Machine::Partitioned { until, .. }
                | Machine::Crashed { until, .. } => now >= until,
            };
            if over {
                *machine = Machine::Up;
            }
        }
    }

    /// A drained node that is empty is made eligible again (in the quiet
    /// phase at once, so that the end state has room).
    fn finish_drains(&mut self, quiet: bool) {
        let finished: Vec<String> = self
            .cluster
            .nodes
            .iter()
            .filter(|node| {
                node.drain.is_some() && (quiet || drain_complete(&self.cluster, &node.name))
            })
            .map(|node| node.name.clone())
            .collect();
        for node in self
            .cluster
            .nodes
            .iter_mut()
            .filter(|node| finished.contains(&node.name))
        {
            node.drain = None;
            node.eligible = true;
        }
    }

    fn change_job(&mut self) {
        let mut job = self.state.current().job.clone();
        let group_names: Vec<String> = job.groups.keys().cloned().collect();
        let group_name = &group_names[self.rng.below(group_names.len() as u64) as usize];
        let group = job.groups.get_mut(group_name).unwrap();
        let task = group.tasks.get_mut("main").unwrap();
        match self.rng.below(4) {
            0 => group.count = self.rng.below(5) as u32,
            1 => task.resources.memory_mib = 64 * (1 + self.rng.below(8)),
            // A version whose tasks never turn ready.
            2 => {
                task.env.insert("BROKEN".into(), "1".into());
            }
            _ => {
                task.env.remove("BROKEN");
            }
        }
        job.validate().expect("changes keep the job valid");
        self.register(job);
    }

    fn register(&mut self, job: Job) {
        if job == self.state.current().job {
            return;
        }
        let version = self.state.current().version + 1;
        self.state.versions.push(JobVersion {
            version,
            job,
            stable: false,
        });
    }

    fn connected(&self, node: &str) -> bool {
        matches!(
            self.machines.get(node),
            Some(Machine::Up | Machine::Blip { .. })
        )
    }

    fn update_node_states(&mut self) {
        let now = self.now_seconds;
        let ttl = NODE_TTL.as_secs();
        for node in &mut self.cluster.nodes {
            node.status = match self.machines[&node.name] {
                Machine::Up => NodeStatus::Alive,
                Machine::Blip { .. } => NodeStatus::Suspect,
                Machine::Partitioned { since, .. } | Machine::Crashed { since, .. } => {
                    if now >= since + ttl {
                        NodeStatus::Down {
                            since: Time(1_000_000 + (since + ttl) * 1000),
                        }
                    } else {
                        NodeStatus::Suspect
                    }
                }
            };
        }
    }

    fn controller(&mut self) -> Plan {
        self.evaluation_seed = self.evaluation_seed.wrapping_add(1);
        let evaluation = Evaluation {
            job: &self.state,
            cluster: &self.cluster,
            now: self.now(),
            seed: self.evaluation_seed,
            algorithm: SchedulerAlgorithm::Binpack,
        };
        let plan = evaluate(&evaluation);
        if self.now_seconds.is_multiple_of(16) {
            ensure!(
                self,
                evaluate(&evaluation) == plan,
                "the same inputs gave two plans"
            );
        }
        self.check_plan(&plan);
        self.count_decisions(&plan);
        self.evaluated_version = plan.job_version;
        self.apply(&plan);
        plan
    }

    fn count_decisions(&mut self, plan: &Plan) {
        let mut kinds: Vec<String> = Vec::new();
        kinds.extend(
            plan.placements
                .iter()
                .map(|placement| format!("placed {:?}", placement.placement_reason)),
        );
        kinds.extend(
            plan.stops
                .iter()
                .map(|stop| format!("stopped {:?}", stop.reason)),
        );
        kinds.extend(
            plan.failed_placements
                .iter()
                .map(|_| "placement failed".to_string()),
        );
        kinds.extend(
            plan.in_place_updates
                .iter()
                .map(|_| "updated in place".to_string()),
        );
        kinds.extend(
            plan.reschedule_later
                .iter()
                .map(|_| "reschedule delayed".to_string()),
        );
        if plan.revert_to_version.is_some() {
            kinds.push("reverted".into());
        }
        if plan.mark_stable.is_some() {
            kinds.push("marked stable".into());
        }
        for node in &self.cluster.nodes {
            if let NodeStatus::Down { since } = node.status {
                if self.now() < since.after(Duration::from_secs(20))
                    && self
                        .cluster
                        .allocations
                        .iter()
                        .any(|allocation| allocation.node == node.name && allocation.is_active())
                {
                    kinds.push("down node holding allocations in its grace".into());
                }
            }
            if node.status == NodeStatus::Suspect
                && self
                    .cluster
                    .allocations
                    .iter()
                    .any(|allocation| allocation.node == node.name && allocation.is_active())
            {
                kinds.push("suspect node holding allocations".into());
            }
        }
        for kind in kinds {
            *self.coverage.entry(kind).or_default() += 1;
        }
    }

    fn apply(&mut self, plan: &Plan) {
        let now = self.now();
        for update in &plan.in_place_updates {
            let allocation = self
                .cluster
                .allocations
                .iter_mut()
                .find(|allocation| allocation.id == update.allocation)
                .unwrap();
            allocation.job_version = update.job_version;
            allocation.deployment_healthy = None;
        }
        for update in &plan.health_updates {
            self.cluster
                .allocations
                .iter_mut()
                .find(|allocation| allocation.id == update.allocation)
                .unwrap()
                .deployment_healthy = Some(update.healthy);
        }
        for stop in &plan.stops {
            let allocation = self
                .cluster
                .allocations
                .iter_mut()
                .find(|allocation| allocation.id == stop.allocation)
                .unwrap();
            allocation.desired_status = DesiredStatus::Stop(stop.reason);
        }
        for placement in &plan.placements {
            self.cluster.allocations.push(placement.clone());
        }
        if let Some(deployment) = &plan.deployment {
            self.state.deployment = Some(deployment.clone());
        }
        if let Some(version) = plan.mark_stable {
            for candidate in self
                .state
                .versions
                .iter_mut()
                .filter(|candidate| candidate.version == version)
            {
                candidate.stable = true;
            }
        }
        if let Some(version) = plan.revert_to_version {
            let job = self
                .state
                .version(version)
                .expect("the revert target is kept")
                .job
                .clone();
            self.register(job);
        }
        let _ = now;
    }

    /// The agents: connected ones carry out the store's wishes; cut-off ones
    /// stop their allocations after `stop_on_client_after`.
    fn agents(&mut self) {
        let now = self.now();
        let now_seconds = self.now_seconds;
        let machines = self.machines.clone();
        // Per (version, group): whether its tasks are broken, and its
        // stop_on_client_after.
        let behaviour: BTreeMap<(u64, &str), (bool, Option<Duration>)> = self
            .state
            .versions
            .iter()
            .flat_map(|version| {
                version.job.groups.iter().map(move |(name, group)| {
                    (
                        (version.version, name.as_str()),
                        (
                            group.tasks["main"].env.contains_key("BROKEN"),
                            group.disconnect.stop_on_client_after,
                        ),
                    )
                })
            })
            .collect();
        // Stops first, on every node, then starts: as in one real second.
        for allocation in &mut self.cluster.allocations {
            match machines[&allocation.node] {
                Machine::Up | Machine::Blip { .. } => {
                    if matches!(allocation.desired_status, DesiredStatus::Stop(_))
                        && !allocation.client.status.is_terminal()
                    {
                        self.running.remove(&allocation.id);
                        allocation.client.status = ClientStatus::Complete;
                        allocation.client.finished_at = Some(now);
                    }
                }
                Machine::Partitioned { since, .. } => {
                    let stop_after = behaviour
                        .get(&(allocation.job_version, allocation.group.as_str()))
                        .and_then(|(_, stop_after)| *stop_after);
                    if stop_after.is_some_and(|after| now_seconds >= since + after.as_secs()) {
                        self.running.remove(&allocation.id);
                    }
                }
                Machine::Crashed { .. } => {}
            }
        }
        for allocation in &mut self.cluster.allocations {
            if !matches!(
                machines[&allocation.node],
                Machine::Up | Machine::Blip { .. }
            ) || allocation.desired_status != DesiredStatus::Run
            {
                continue;
            }
            let broken = behaviour
                .get(&(allocation.job_version, allocation.group.as_str()))
                .is_some_and(|(broken, _)| *broken);
            match allocation.client.status {
                ClientStatus::Pending => {
                    allocation.client.status = ClientStatus::Running;
                    allocation.client.started_at = Some(now);
                    allocation.client.ready_since = if broken { None } else { Some(now) };
                    self.running.insert(allocation.id.clone());
                }
                ClientStatus::Running if !self.running.contains(&allocation.id) => {
                    // Back from a crash or a self-stop: the agent reports
                    // what happened; the controller decides what follows.
                    allocation.client.status = ClientStatus::Complete;
                    allocation.client.finished_at = Some(now);
                    allocation.client.ready_since = None;
                }
                ClientStatus::Running if !broken && allocation.client.ready_since.is_none() => {
                    allocation.client.ready_since = Some(now);
                }
                _ => {}
            }
        }
    }

    fn collect_garbage(&mut self) {
        let now = self.now();
        self.cluster.allocations.retain(|allocation| {
            let finished = allocation
                .client
                .finished_at
                .unwrap_or(allocation.created_at);
            !(matches!(allocation.desired_status, DesiredStatus::Stop(_))
                && allocation.client.status.is_terminal()
                && now.since(finished) > GARBAGE_AFTER)
        });
    }

    fn check_plan(&mut self, plan: &Plan) {
        let now = self.now();
        let spec = &self.state.current().job;
        let by_id: BTreeMap<&AllocationId, &Allocation> = self
            .cluster
            .allocations
            .iter()
            .map(|allocation| (&allocation.id, allocation))
            .collect();

        for stop in &plan.stops {
            let allocation = by_id.get(&stop.allocation).unwrap_or_else(|| {
                fail(
                    self.seed,
                    self.now_seconds,
                    format!("stop of unknown {}", stop.allocation),
                )
            });
            ensure!(
                self,
                allocation.desired_status == DesiredStatus::Run,
                "{} stopped twice",
                stop.allocation
            );
            let node = self.cluster.node(&allocation.node);
            let moves = matches!(
                stop.reason,
                StopReason::Lost | StopReason::Migrated | StopReason::Updated
            );
            match node.map(|node| node.status) {
                Some(NodeStatus::Suspect) => {
                    ensure!(
                        self,
                        !moves,
                        "{} on suspect node {} stopped as {:?}",
                        stop.allocation,
                        allocation.node,
                        stop.reason
                    )
                }
                Some(NodeStatus::Down { since }) => {
                    let group = spec.groups.get(&allocation.group);
                    let grace_over =
                        group.is_none_or(|group| now >= since.after(group.disconnect.lost_after));
                    ensure!(
                        self,
                        !moves || grace_over,
                        "{} on {} stopped as {:?} within the grace",
                        stop.allocation,
                        allocation.node,
                        stop.reason
                    );
                }
                Some(NodeStatus::Alive) | None => {
                    ensure!(
                        self,
                        stop.reason != StopReason::Lost,
                        "{} on a live node marked lost",
                        stop.allocation
                    )
                }
            }
            if stop.reason == StopReason::Lost {
                let replaced = plan.placements.iter().any(|placement| {
                    placement.previous_allocation.as_ref() == Some(&stop.allocation)
                });
                let no_room = plan
                    .failed_placements
                    .iter()
                    .any(|failed| failed.group == allocation.group);
                ensure!(
                    self,
                    replaced || no_room,
                    "lost {} neither replaced nor reported unplaceable",
                    stop.allocation
                );
            }
        }

        let mut updates_per_group: BTreeMap<&str, u32> = BTreeMap::new();
        for placement in &plan.placements {
            ensure!(
                self,
                self.placed.insert(placement.id.clone()),
                "{} placed twice",
                placement.id
            );
            if let Some(previous) = &placement.previous_allocation {
                ensure!(
                    self,
                    self.replaced.insert(previous.clone()),
                    "{previous} replaced twice"
                );
            }
            let node = self.cluster.node(&placement.node).unwrap_or_else(|| {
                fail(
                    self.seed,
                    self.now_seconds,
                    format!("placed on unknown node {}", placement.node),
                )
            });
            ensure!(
                self,
                node.status == NodeStatus::Alive && node.eligible && node.drain.is_none(),
                "{} placed on {} which is {:?}, eligible {}, drain {:?}",
                placement.id,
                node.name,
                node.status,
                node.eligible,
                node.drain
            );
            let group = &spec.groups[&placement.group];
            let excluded = group.constraints.iter().any(|constraint| {
                constraint.attribute == "${meta.zone}"
                    && node.labels.get("zone") == Some(&constraint.value)
            });
            ensure!(
                self,
                !excluded,
                "{} placed on {} against the zone constraint",
                placement.id,
                node.name
            );
            ensure!(
                self,
                placement.index < group.count,
                "{} placed at index {} of a group of {}",
                placement.id,
                placement.index,
                group.count
            );
            if placement.placement_reason == PlacementReason::Updated {
                *updates_per_group
                    .entry(placement.group.as_str())
                    .or_default() += 1;
            }
            if placement.placement_reason == PlacementReason::Rescheduled {
                self.check_reschedule_chain(placement, group);
            }
        }
        for (group_name, updates) in updates_per_group {
            if let Some(update) = &spec.groups[group_name].update {
                ensure!(
                    self,
                    updates <= update.max_parallel,
                    "{updates} updates at once in {group_name}, max_parallel {}",
                    update.max_parallel
                );
            }
        }
    }

    fn check_reschedule_chain(&self, placement: &Allocation, group: &keel_scheduler::Group) {
        let policy = &group.reschedule;
        let events = &placement.reschedule_events;
        let last = events.last().unwrap_or_else(|| {
            fail(
                self.seed,
                self.now_seconds,
                format!("reschedule {} without an event", placement.id),
            )
        });
        ensure!(
            self,
            last.delay <= policy.max_delay.max(policy.delay),
            "delay {:?} beyond max_delay",
            last.delay
        );
        let failed_at = self.failed_at.get(&last.previous_allocation).copied();
        if let Some(failed_at) = failed_at {
            ensure!(
                self,
                placement.created_at >= failed_at.after(last.delay),
                "rescheduled {} before its delay of {:?}",
                placement.id,
                last.delay
            );
        }
        if events.len() >= 2 {
            let before = &events[events.len() - 2];
            let reset = last.delay == policy.delay
                && failed_at.is_some_and(|failed_at| failed_at.since(before.at) > policy.max_delay);
            ensure!(
                self,
                last.delay >= before.delay || reset,
                "reschedule delay shrank from {:?} to {:?} in {events:?}",
                before.delay,
                last.delay
            );
        }
    }

    /// Invariants on the state after the controller and the agents acted.
    fn check_state(&self) {
        let spec = &self
            .state
            .version(self.evaluated_version)
            .expect("the evaluated version is kept")
            .job;
        let mut per_group: BTreeMap<&str, u32> = BTreeMap::new();
        let mut slots = BTreeSet::new();
        let mut used: BTreeMap<&str, Resources> = BTreeMap::new();
        let mut ports: BTreeSet<(&str, u16)> = BTreeSet::new();
        for allocation in self
            .cluster
            .allocations
            .iter()
            .filter(|allocation| allocation.is_active())
        {
            *per_group.entry(allocation.group.as_str()).or_default() += 1;
            ensure!(
                self,
                slots.insert((allocation.group.as_str(), allocation.index)),
                "two allocations wanted running in slot {}[{}]",
                allocation.group,
                allocation.index
            );
            let total = used
                .entry(allocation.node.as_str())
                .or_insert(Resources::ZERO);
            *total = total.plus(allocation.resources);
            for port in allocation.ports.values() {
                ensure!(
                    self,
                    ports.insert((allocation.node.as_str(), *port)),
                    "port {port} given twice on {}",
                    allocation.node
                );
            }
        }
        for (group_name, active) in &per_group {
            let count = spec.groups.get(*group_name).map_or(0, |group| group.count);
            let listing: Vec<String> = self
                .cluster
                .allocations
                .iter()
                .filter(|allocation| allocation.is_active() && allocation.group == *group_name)
                .map(|allocation| {
                    format!(
                        "{}[{}]@{} v{} {:?}",
                        allocation.id.0.get(..8).unwrap_or_default(),
                        allocation.index,
                        allocation.node,
                        allocation.job_version,
                        allocation.client.status
                    )
                })
                .collect();
            ensure!(
                self,
                *active <= count,
                "{active} allocations wanted running in {group_name}, count {count}: {listing:?}"
            );
        }
        for (node_name, total) in used {
            let node = self.cluster.node(node_name).unwrap();
            ensure!(
                self,
                node.capacity.holds(total),
                "{node_name} over capacity: {total:?} of {:?}",
                node.capacity
            );
        }
        for allocation in &self.cluster.allocations {
            if !self.running.contains(&allocation.id) {
                continue;
            }
            match self.machines[&allocation.node] {
                Machine::Up | Machine::Blip { .. } => ensure!(
                    self,
                    allocation.desired_status == DesiredStatus::Run,
                    "{} runs on reachable {} though stopped ({:?})",
                    allocation.id,
                    allocation.node,
                    allocation.desired_status
                ),
                Machine::Partitioned { since, .. } => {
                    let group = self
                        .state
                        .version(allocation.job_version)
                        .and_then(|version| version.job.groups.get(&allocation.group));
                    if let Some(after) =
                        group.and_then(|group| group.disconnect.stop_on_client_after)
                    {
                        ensure!(
                            self,
                            self.now_seconds < since + after.as_secs(),
                            "{} runs on {} cut off longer than stop_on_client_after",
                            allocation.id,
                            allocation.node
                        );
                    }
                }
                Machine::Crashed { .. } => fail(
                    self.seed,
                    self.now_seconds,
                    format!("{} runs on crashed {}", allocation.id, allocation.node),
                ),
            }
        }
        // Drains move at most max_parallel at a time.
        let now = self.now();
        for (group_name, group) in &spec.groups {
            let moving =
                self.cluster
                    .allocations
                    .iter()
                    .filter(|allocation| {
                        allocation.group == *group_name
                            && allocation.placement_reason == PlacementReason::Migrated
                            && allocation.is_active()
                            && now < allocation.created_at.after(group.migrate.healthy_deadline)
                            && allocation.client.ready_since.is_none_or(|ready| {
                                now < ready.after(group.migrate.min_healthy_time)
                            })
                            && allocation.created_at == now
                    })
                    .count();
            ensure!(
                self,
                moving as u32 <= group.migrate.max_parallel,
                "{moving} migrations at once in {group_name}"
            );
        }
    }

    /// After the quiet phase, every slot is held, or no node has room.
    fn check_converged(&self, last_plan: &Plan) {
        let spec = &self.state.current().job;
        for (group_name, group) in &spec.groups {
            for index in 0..group.count {
                let held = self.cluster.allocations.iter().any(|allocation| {
                    allocation.group == *group_name
                        && allocation.index == index
                        && allocation.desired_status == DesiredStatus::Run
                });
                if held {
                    continue;
                }
                let needed = group.resources();
                let room = self.cluster.nodes.iter().any(|node| {
                    let used = self
                        .cluster
                        .allocations
                        .iter()
                        .filter(|allocation| allocation.node == node.name && allocation.is_active())
                        .fold(Resources::ZERO, |total, allocation| {
                            total.plus(allocation.resources)
                        });
                    let excluded = group
                        .constraints
                        .iter()
                        .any(|constraint| node.labels.get("zone") == Some(&constraint.value));
                    let ports_used = self
                        .cluster
                        .allocations
                        .iter()
                        .filter(|allocation| allocation.node == node.name && allocation.is_active())
                        .map(|allocation| allocation.ports.len())
                        .sum::<usize>();
                    let ports_free = usize::from(node.port_range.last - node.port_range.first) + 1
                        > ports_used + 2;
                    let static_taken =
                        group
                            .ports()
                            .filter_map(|(_, spec)| spec.static_port)
                            .any(|port| {
                                self.cluster.allocations.iter().any(|allocation| {
                                    allocation.node == node.name
                                        && allocation.is_active()
                                        && allocation.ports.values().any(|used| *used == port)
                                })
                            });
                    !excluded
                        && node.capacity.minus(used).holds(needed)
                        && ports_free
                        && !static_taken
                });
                let nodes: Vec<String> = self
                    .cluster
                    .nodes
                    .iter()
                    .map(|node| {
                        let used = self
                            .cluster
                            .allocations
                            .iter()
                            .filter(|allocation| {
                                allocation.node == node.name && allocation.is_active()
                            })
                            .fold(Resources::ZERO, |total, allocation| {
                                total.plus(allocation.resources)
                            });
                        format!(
                            "{} {:?} capacity {:?} used {:?}",
                            node.name, node.status, node.capacity, used
                        )
                    })
                    .collect();
                ensure!(
                    self,
                    !room,
                    "slot {group_name}[{index}] empty after {QUIET_SECONDS}s of calm though a node has room for {:?}: {nodes:#?}; last plan {last_plan:?}",
                    group.resources()
                );
            }
        }
    }
}

fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("KEEL_SCHEDULER_SEED") {
        return vec![seed.parse().expect("KEEL_SCHEDULER_SEED is a number")];
    }
    let count = std::env::var("KEEL_SCHEDULER_HISTORIES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(2000);
    (1..=count).collect()
}

#[test]
fn random_cluster_histories_keep_the_invariants() {
    let seeds = seeds();
    let mut coverage: BTreeMap<String, u64> = BTreeMap::new();
    for seed in &seeds {
        let mut history = History::new(*seed);
        history.run();
        for (kind, count) in history.coverage {
            *coverage.entry(kind).or_default() += count;
        }
    }
    eprintln!(
        "{} histories of {}s each checked; decisions: {coverage:#?}",
        seeds.len(),
        FAULT_SECONDS + QUIET_SECONDS
    );
    if seeds.len() >= 500 {
        // The histories must keep reaching every rule, or they prove little.
        for kind in [
            "placed New",
            "placed Lost",
            "placed Rescheduled",
            "placed Migrated",
            "placed Updated",
            "placed Completed",
            "stopped Lost",
            "stopped ScaledDown",
            "stopped Updated",
            "stopped Migrated",
            "placement failed",
            "updated in place",
            "reschedule delayed",
            "reverted",
            "marked stable",
            "down node holding allocations in its grace",
            "suspect node holding allocations",
        ] {
            assert!(
                coverage.get(kind).copied().unwrap_or(0) > 0,
                "no history exercised {kind:?}: {coverage:#?}"
            );
        }
    }
}

#[test]
fn histories_replay_exactly() {
    let run = |seed| {
        let mut history = History::new(seed);
        history.run();
        (history.cluster, history.state)
    };
    assert_eq!(run(42), run(42));
}
