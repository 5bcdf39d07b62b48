//! Scenario files for `keel chaos run`: a seed, a cluster, a workload, a steady-state
//! hypothesis and a schedule of faults, in TOML. See `scenarios/` for examples.
//!
//! A scenario may also start agents (`[agents]`: nodes `node1`…, and a job they run):
//! faults `kill` and `pause` may then target nodes, and the hypothesis covers the job
//! (never more than its count of allocations wanted running; serving again within a
//! bound after a node fault).

use std::time::Duration;

use serde::Deserialize;

/// The most faults one scenario may schedule.
pub const SCHEDULED_FAULTS_MAX: usize = 64;
/// The most workload clients.
pub const CLIENTS_MAX: usize = 64;
/// The longest run.
pub const RUN_DURATION_MAX: Duration = Duration::from_secs(3_600);
/// The most agents (nodes) a scenario may start.
pub const AGENTS_MAX: usize = 9;
/// The target naming the node with the most allocations wanted running when the
/// fault starts (ties: the first by name).
pub const BUSIEST_NODE: &str = "node-running-most-allocations";

/// A scenario as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// A short name for reports.
    pub name: String,
    /// Seeds every random choice of the workload and the fault schedule.
    #[serde(default)]
    pub seed: u64,
    /// How long the workload runs (`--long` multiplies it).
    #[serde(with = "text_duration")]
    pub duration: Duration,
    /// Members in the cluster the runner starts.
    #[serde(default = "default_members")]
    pub members: usize,
    /// Extra `keel server` flags for every member.
    #[serde(default)]
    pub server_arguments: Vec<String>,
    /// Agents started beside the members, and the job they run.
    #[serde(default)]
    pub agents: Option<Agents>,
    #[serde(default)]
    pub workload: Workload,
    #[serde(default)]
    pub hypothesis: Hypothesis,
    #[serde(default, rename = "fault")]
    pub faults: Vec<ScheduledFault>,
}

fn default_members() -> usize {
    3
}

/// Agents (`keel agent`) the runner starts beside the members: nodes `node1`…
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agents {
    /// How many (nodes node1 to node<count>).
    pub count: usize,
    /// `--node-ttl`: how long a silent node stays registered.
    #[serde(default = "default_node_ttl", with = "text_duration")]
    pub node_ttl: Duration,
    /// A job file (keel's TOML job spec), relative to the scenario file: registered
    /// once every node is alive; the workload starts when all its instances serve.
    #[serde(default)]
    pub job: Option<String>,
    /// Extra `keel agent` flags for every agent.
    #[serde(default)]
    pub arguments: Vec<String>,
}

fn default_node_ttl() -> Duration {
    Duration::from_secs(2)
}

/// Built-in clients doing put, linearizable get and compare-and-swap transactions on a
/// small key set, each recording its history.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    /// Concurrent clients.
    pub clients: usize,
    /// Keys shared by the clients (few keys, many conflicts: a sharper check).
    pub keys: usize,
    /// Requests per second per client at most (each client waits for its answer).
    pub rate_per_client: f64,
    /// Fraction of requests that are linearizable gets.
    pub read_fraction: f64,
    /// Fraction that are compare-and-swap transactions; the rest are puts.
    pub transaction_fraction: f64,
    /// How long a client waits for an answer before it counts the outcome unknown.
    #[serde(with = "text_duration")]
    pub request_timeout: Duration,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            clients: 4,
            keys: 8,
            rate_per_client: 40.0,
            read_fraction: 0.3,
            transaction_fraction: 0.2,
            request_timeout: Duration::from_secs(1),
        }
    }
}

/// The steady state that must hold for the run to pass. Lost acknowledged writes must
/// be zero and the history linearizable, always; these are the rest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hypothesis {
    /// Of all writes attempted, the fraction acknowledged within `write_within`.
    pub write_success_fraction_min: f64,
    /// See `write_success_fraction_min`.
    #[serde(with = "text_duration")]
    pub write_within: Duration,
    /// The 99th percentile latency of acknowledged writes.
    #[serde(with = "text_duration")]
    pub write_latency_p99_max: Duration,
    /// Fraction of 100 ms windows with an acknowledged write.
    pub availability_min: f64,
    /// With a job: after each fault on a node, the longest its instances serving
    /// (wanted running, running, ready, their ports answering) may stay below its count,
    /// from the fault's start. Whatever this says, the job must never have more than its
    /// count of allocations wanted running, and must serve its count after the run.
    #[serde(with = "optional_text_duration")]
    pub job_recovery_max: Option<Duration>,
}

impl Default for Hypothesis {
    fn default() -> Self {
        Hypothesis {
            write_success_fraction_min: 0.0,
            write_within: Duration::from_secs(1),
            write_latency_p99_max: Duration::from_secs(10),
            availability_min: 0.0,
            job_recovery_max: None,
        }
    }
}

/// One line of the fault schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduledFault {
    /// partition, drop, delay, clock, fsync-error, slow-fsync, write-error, pause,
    /// kill (the runner kills the process and restarts it after `for`), replace (the
    /// member is removed, wiped and replaced by a fresh one with its address), or
    /// random-kill (each member fails and is repaired at random, see `random`).
    pub kind: String,
    /// `leader`, `follower`, `minority`, `majority`, `all`, or member names (`m1,m2`);
    /// with `[agents]`, for kill and pause, also node names (`node1,node2`) or
    /// `node-running-most-allocations`. A killed node is its agent and its tasks
    /// (SIGKILL), restarted after `for`; a paused node is its agent (SIGSTOP).
    #[serde(default = "default_target")]
    pub target: String,
    /// When the fault starts, from the start of the workload.
    #[serde(default, with = "text_duration")]
    pub at: Duration,
    /// How long it lasts.
    #[serde(default = "default_for", rename = "for", with = "text_duration")]
    pub for_duration: Duration,
    /// Repeats every this long, if set.
    #[serde(default, with = "optional_text_duration")]
    pub every: Option<Duration>,
    /// Fault parameters, as `keel chaos inject` takes them.
    #[serde(default)]
    pub direction: Option<String>,
    #[serde(default)]
    pub fraction: Option<f64>,
    #[serde(default, with = "optional_text_duration")]
    pub delay: Option<Duration>,
    #[serde(default, with = "optional_text_duration")]
    pub jitter: Option<Duration>,
    #[serde(default)]
    pub rate: Option<f64>,
    #[serde(default, with = "optional_text_duration")]
    pub fsync_delay: Option<Duration>,
    /// For random-kill: exponential failure and repair rates per second of every member.
    #[serde(default)]
    pub random: Option<RandomFailures>,
}

fn default_target() -> String {
    "leader".to_owned()
}

fn default_for() -> Duration {
    Duration::from_secs(5)
}

/// A failure-and-repair process: each member up for Exp(λ), then down for Exp(μ).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomFailures {
    /// λ, failures per second of an up member.
    pub failure_rate_per_second: f64,
    /// μ, repairs per second of a down member.
    pub repair_rate_per_second: f64,
}

/// Whether a fault's target names nodes rather than members.
pub fn targets_nodes(target: &str) -> bool {
    target == BUSIEST_NODE
        || target
            .split(',')
            .all(|name| node_number(name.trim()).is_some())
}

/// `n` of a node name `node<n>`.
pub fn node_number(name: &str) -> Option<usize> {
    name.strip_prefix("node")?
        .parse()
        .ok()
        .filter(|&number| number >= 1)
}

/// The fault kinds a schedule may name.
pub const FAULT_KINDS: &[&str] = &[
    "partition",
    "drop",
    "delay",
    "clock",
    "fsync-error",
    "slow-fsync",
    "write-error",
    "pause",
    "kill",
    "random-kill",
    "replace",
];

impl Scenario {
    /// Reads and checks a scenario file's text.
    pub fn parse(text: &str) -> anyhow::Result<Scenario> {
        let scenario: Scenario = toml::from_str(text)?;
        scenario.validate()?;
        Ok(scenario)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.duration.is_zero() && self.duration <= RUN_DURATION_MAX,
            "duration must be above zero and at most an hour"
        );
        anyhow::ensure!(
            (1..=7).contains(&self.members),
            "members must be between 1 and 7"
        );
        let workload = &self.workload;
        anyhow::ensure!(
            (1..=CLIENTS_MAX).contains(&workload.clients),
            "workload.clients must be between 1 and {CLIENTS_MAX}"
        );
        anyhow::ensure!(
            (1..=10_000).contains(&workload.keys),
            "workload.keys must be between 1 and 10000"
        );
        anyhow::ensure!(
            workload.rate_per_client > 0.0 && workload.rate_per_client <= 10_000.0,
            "workload.rate_per_client must be in (0, 10000]"
        );
        anyhow::ensure!(
            workload.read_fraction >= 0.0
                && workload.transaction_fraction >= 0.0
                && workload.read_fraction + workload.transaction_fraction < 1.0,
            "workload.read_fraction + transaction_fraction must be below 1 (some puts are needed)"
        );
        anyhow::ensure!(
            self.faults.len() <= SCHEDULED_FAULTS_MAX,
            "at most {SCHEDULED_FAULTS_MAX} faults"
        );
        if let Some(agents) = &self.agents {
            anyhow::ensure!(
                (1..=AGENTS_MAX).contains(&agents.count),
                "agents.count must be between 1 and {AGENTS_MAX}"
            );
            anyhow::ensure!(
                agents.node_ttl >= Duration::from_secs(1),
                "agents.node_ttl must be at least 1s"
            );
        }
        let has_job = self
            .agents
            .as_ref()
            .is_some_and(|agents| agents.job.is_some());
        let mut node_faults = 0;
        for (index, fault) in self.faults.iter().enumerate() {
            anyhow::ensure!(
                FAULT_KINDS.contains(&fault.kind.as_str()),
                "fault {index}: unknown kind {:?}; kinds are {}",
                fault.kind,
                FAULT_KINDS.join(", ")
            );
            if targets_nodes(&fault.target) {
                node_faults += 1;
                let agents = self.agents.as_ref().ok_or_else(|| {
                    anyhow::anyhow!(
                        "fault {index}: target {:?} names nodes, but the scenario starts no \
                         agents ([agents] count = …)",
                        fault.target
                    )
                })?;
                anyhow::ensure!(
                    fault.kind == "kill" || fault.kind == "pause",
                    "fault {index}: only kill and pause apply to nodes, not {:?}",
                    fault.kind
                );
                for name in fault.target.split(',').filter(|name| *name != BUSIEST_NODE) {
                    let number = node_number(name.trim()).unwrap_or(0);
                    anyhow::ensure!(
                        number <= agents.count,
                        "fault {index}: there is no {name} (the scenario starts {} agents)",
                        agents.count
                    );
                }
                anyhow::ensure!(
                    fault.target != BUSIEST_NODE || has_job,
                    "fault {index}: {BUSIEST_NODE} needs a job (agents.job)"
                );
            }
            if fault.kind == "random-kill" {
                let random = fault.random.ok_or_else(|| {
                    anyhow::anyhow!("fault {index}: random-kill needs random = {{ failure_rate_per_second, repair_rate_per_second }}")
                })?;
                anyhow::ensure!(
                    random.failure_rate_per_second > 0.0 && random.repair_rate_per_second > 0.0,
                    "fault {index}: random rates must be above zero"
                );
            }
            if let Some(every) = fault.every {
                anyhow::ensure!(
                    every > fault.for_duration,
                    "fault {index}: every must be longer than for"
                );
            }
        }
        if self.hypothesis.job_recovery_max.is_some() {
            anyhow::ensure!(
                has_job && node_faults > 0,
                "hypothesis.job_recovery_max needs a job (agents.job) and a fault on a node"
            );
        }
        Ok(())
    }
}

/// Durations written as `10s`, `500ms`, `2m`.
mod text_duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        crate::chaos::duration(&text).map_err(serde::de::Error::custom)
    }
}

mod optional_text_duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(deserializer)?;
        crate::chaos::duration(&text)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_scenario_with_defaults() {
        let scenario = Scenario::parse(
            r#"
            name = "leader partition"
            seed = 7
            duration = "20s"
            [hypothesis]
            availability_min = 0.5
            [[fault]]
            kind = "partition"
            at = "5s"
            for = "5s"
            "#,
        )
        .unwrap();
        assert_eq!(scenario.members, 3);
        assert_eq!(scenario.workload.clients, 4);
        assert_eq!(scenario.faults[0].target, "leader");
        assert_eq!(scenario.faults[0].at, Duration::from_secs(5));
    }

    #[test]
    fn reads_agents_and_faults_on_nodes() {
        let scenario = Scenario::parse(
            r#"
            name = "node failure"
            duration = "20s"
            [agents]
            count = 3
            job = "jobs/web-fast.toml"
            [hypothesis]
            job_recovery_max = "12s"
            [[fault]]
            kind = "kill"
            target = "node-running-most-allocations"
            at = "3s"
            [[fault]]
            kind = "pause"
            target = "node1,node3"
            "#,
        )
        .unwrap();
        let agents = scenario.agents.as_ref().unwrap();
        assert_eq!(agents.node_ttl, Duration::from_secs(2));
        assert_eq!(
            scenario.hypothesis.job_recovery_max,
            Some(Duration::from_secs(12))
        );
        assert!(targets_nodes(&scenario.faults[0].target));
        assert!(targets_nodes(&scenario.faults[1].target));
        assert!(!targets_nodes("leader") && !targets_nodes("m1,m2") && !targets_nodes("node"));
    }

    #[test]
    fn refuses_node_faults_that_cannot_be_played() {
        let cases = [
            (
                "[[fault]]\nkind = \"kill\"\ntarget = \"node1\"",
                "starts no agents",
            ),
            (
                "[agents]\ncount = 2\n[[fault]]\nkind = \"partition\"\ntarget = \"node1\"",
                "only kill and pause apply to nodes",
            ),
            (
                "[agents]\ncount = 2\n[[fault]]\nkind = \"kill\"\ntarget = \"node3\"",
                "there is no node3",
            ),
            (
                "[agents]\ncount = 2\n[[fault]]\nkind = \"kill\"\ntarget = \"node-running-most-allocations\"",
                "needs a job",
            ),
            (
                "[agents]\ncount = 2\n[hypothesis]\njob_recovery_max = \"5s\"",
                "needs a job (agents.job) and a fault on a node",
            ),
        ];
        for (text, expected) in cases {
            let error =
                Scenario::parse(&format!("name = \"x\"\nduration = \"5s\"\n{text}")).unwrap_err();
            assert!(error.to_string().contains(expected), "{error}");
        }
    }

    #[test]
    fn refuses_mistakes_by_name() {
        let error =
            Scenario::parse("name = \"x\"\nduration = \"5s\"\n[[fault]]\nkind = \"meteor\"")
                .unwrap_err();
        assert!(
            error.to_string().contains("unknown kind \"meteor\""),
            "{error}"
        );
        let error = Scenario::parse("name = \"x\"\nduration = \"5\"").unwrap_err();
        assert!(error.to_string().contains("needs a unit"), "{error}");
        let error = Scenario::parse("name = \"x\"\nduration = \"5s\"\nspeed = 1").unwrap_err();
        assert!(error.to_string().contains("unknown field"), "{error}");
    }
}
