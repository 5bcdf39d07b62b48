//! The job specification: Nomad's vocabulary (job → group → task, with the
//! `constraint`, `spread`, `restart`, `reschedule`, `update`, `migrate`,
//! `disconnect` and `scaling` blocks), written in TOML or sent as JSON.
//!
//! Blocks are maps keyed by name where Nomad's HCL writes `group "web" { … }`,
//! so the TOML reads `[group.web]`, `[group.web.task.server]`. Unknown fields
//! are refused (a misspelt `cout = 3` must not silently mean `count = 1`), and
//! every field a user may leave out has Nomad's default for service jobs.
//! Parsing only checks shapes; [`Job::validate`](crate::validate) checks
//! meanings and names the field of every problem.
//!
//! Service checks mirror the agent's check definitions (issue 11: kinds
//! readiness, liveness and startup; Consul's check types and anti-flap
//! thresholds) as plain structs, so the agent converts them to its own types
//! without this crate depending on it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::time::{duration_text, optional_duration_text};

/// A job: what to run and how to keep it running.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// The job's name, unique in the cluster; also the key under `/keel/jobs/`.
    pub name: String,
    /// `service` (runs until stopped; any exit is a failure) or `batch` (runs
    /// to completion; exit 0 is success).
    #[serde(default, rename = "type")]
    pub job_type: JobType,
    /// Constraints every group of the job must satisfy.
    #[serde(default, rename = "constraint", skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<Constraint>,
    /// The groups, by name.
    #[serde(rename = "group")]
    pub groups: BTreeMap<String, Group>,
}

/// Nomad's job types that keel supports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobType {
    /// Long-running: restarted after any exit, replaced when it ends.
    #[default]
    Service,
    /// Runs to completion: an exit with code 0 completes the allocation.
    Batch,
}

/// A group: `count` instances, each an allocation that runs all the group's
/// tasks together on one node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// How many instances (allocations) to run.
    #[serde(default = "default_count")]
    pub count: u32,
    /// Placement constraints on node labels and attributes.
    #[serde(default, rename = "constraint", skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<Constraint>,
    /// Spread the instances over the values of a node attribute.
    #[serde(default, rename = "spread", skip_serializing_if = "Vec::is_empty")]
    pub spreads: Vec<Spread>,
    /// What the supervisor does when a task exits or fails its liveness check.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// What the controller does when an allocation has failed on its node.
    #[serde(default)]
    pub reschedule: ReschedulePolicy,
    /// Rolling updates; without it a new version replaces all instances at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateStrategy>,
    /// How allocations leave a draining node.
    #[serde(default)]
    pub migrate: MigrateStrategy,
    /// What happens to allocations on a node that went down.
    #[serde(default)]
    pub disconnect: Disconnect,
    /// Autoscaling bounds and target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<Scaling>,
    /// The tasks, by name.
    #[serde(rename = "task")]
    pub tasks: BTreeMap<String, Task>,
}

fn default_count() -> u32 {
    1
}

/// A placement constraint, Nomad's `constraint { attribute, operator, value }`.
///
/// `attribute` is an interpolation: `${meta.<label>}` (the node's labels, as
/// given to `keel agent --labels`), `${attr.<name>}` (attributes the agent
/// detects, such as `kernel.name` or `cpu.numcores`) or `${node.unique.name}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraint {
    /// The node property to test (empty for `distinct_hosts`).
    #[serde(default)]
    pub attribute: String,
    /// How to compare it.
    #[serde(default)]
    pub operator: ConstraintOperator,
    /// What to compare it with.
    #[serde(default)]
    pub value: String,
}

/// Constraint operators, spelt as in Nomad.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConstraintOperator {
    /// The property equals the value.
    #[default]
    #[serde(rename = "=", alias = "==", alias = "is")]
    Equal,
    /// The property is missing or differs from the value.
    #[serde(rename = "!=", alias = "not")]
    NotEqual,
    /// The property matches the regular expression (unanchored).
    #[serde(rename = "regexp")]
    Regexp,
    /// The property, read as a semantic version, satisfies the requirement
    /// (`">= 1.2, < 2"`).
    #[serde(rename = "semver", alias = "version")]
    Semver,
    /// The property is set, whatever its value.
    #[serde(rename = "is_set")]
    IsSet,
    /// The property is not set.
    #[serde(rename = "is_not_set")]
    IsNotSet,
    /// No two instances of the group (job, at job level) on one node when the
    /// value is `"true"` (the default).
    #[serde(rename = "distinct_hosts")]
    DistinctHosts,
}

/// Nomad's `spread { attribute, weight, target { value, percent } }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spread {
    /// The node property whose values the instances spread over.
    pub attribute: String,
    /// The spread's weight against the other scores, 1 to 100.
    #[serde(default = "default_spread_weight")]
    pub weight: u32,
    /// Desired shares per value; without targets the spread is even.
    #[serde(default, rename = "target", skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<SpreadTarget>,
}

fn default_spread_weight() -> u32 {
    50
}

/// A desired share of the instances for one value of a spread's attribute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpreadTarget {
    /// The attribute's value.
    pub value: String,
    /// The share of instances, in percent.
    pub percent: u32,
}

/// Nomad's `restart` block, applied by the supervisor on the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    /// Restarts allowed within `interval`.
    #[serde(default = "default_restart_attempts")]
    pub attempts: u32,
    /// The window in which `attempts` are counted.
    #[serde(default = "default_restart_interval", with = "duration_text")]
    pub interval: Duration,
    /// The wait before each restart.
    #[serde(default = "default_restart_delay", with = "duration_text")]
    pub delay: Duration,
    /// What happens when the attempts are used up.
    #[serde(default)]
    pub mode: RestartMode,
}

fn default_restart_attempts() -> u32 {
    2
}
fn default_restart_interval() -> Duration {
    Duration::from_secs(30 * 60)
}
fn default_restart_delay() -> Duration {
    Duration::from_secs(15)
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            attempts: default_restart_attempts(),
            interval: default_restart_interval(),
            delay: default_restart_delay(),
            mode: RestartMode::default(),
        }
    }
}

/// What the supervisor does once the restart attempts are used up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestartMode {
    /// The allocation fails (and the controller may reschedule it).
    #[default]
    Fail,
    /// Wait until the interval ends, then restart with fresh attempts.
    Delay,
}

/// Nomad's `reschedule` block, applied by the controller to failed allocations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReschedulePolicy {
    /// Reschedules allowed within `interval` (ignored when `unlimited`).
    #[serde(default)]
    pub attempts: u32,
    /// The window in which `attempts` are counted.
    #[serde(default, with = "duration_text")]
    pub interval: Duration,
    /// The wait before the first reschedule.
    #[serde(default = "default_reschedule_delay", with = "duration_text")]
    pub delay: Duration,
    /// How the wait grows from one reschedule to the next.
    #[serde(default)]
    pub delay_function: DelayFunction,
    /// The ceiling of the wait.
    #[serde(default = "default_reschedule_max_delay", with = "duration_text")]
    pub max_delay: Duration,
    /// Reschedule however often it fails.
    #[serde(default = "default_true")]
    pub unlimited: bool,
}

fn default_reschedule_delay() -> Duration {
    Duration::from_secs(30)
}
fn default_reschedule_max_delay() -> Duration {
    Duration::from_secs(3600)
}
fn default_true() -> bool {
    true
}

impl Default for ReschedulePolicy {
    fn default() -> Self {
        ReschedulePolicy {
            attempts: 0,
            interval: Duration::ZERO,
            delay: default_reschedule_delay(),
            delay_function: DelayFunction::default(),
            max_delay: default_reschedule_max_delay(),
            unlimited: true,
        }
    }
}

/// How a reschedule delay grows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DelayFunction {
    /// Always `delay`.
    Constant,
    /// Doubles each time.
    #[default]
    Exponential,
    /// The sum of the two previous delays.
    Fibonacci,
}

/// Nomad's `update` block: rolling updates with health gating.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateStrategy {
    /// Allocations updated at once.
    #[serde(default = "default_max_parallel")]
    pub max_parallel: u32,
    /// How long an updated allocation must be ready before it counts healthy.
    #[serde(default = "default_min_healthy_time", with = "duration_text")]
    pub min_healthy_time: Duration,
    /// How long after placement an allocation may take to turn healthy
    /// before it is marked unhealthy and the update fails.
    #[serde(default = "default_healthy_deadline", with = "duration_text")]
    pub healthy_deadline: Duration,
    /// Roll back to the last stable version when the update fails.
    #[serde(default)]
    pub auto_revert: bool,
}

fn default_max_parallel() -> u32 {
    1
}
fn default_min_healthy_time() -> Duration {
    Duration::from_secs(10)
}
fn default_healthy_deadline() -> Duration {
    Duration::from_secs(300)
}

impl Default for UpdateStrategy {
    fn default() -> Self {
        UpdateStrategy {
            max_parallel: default_max_parallel(),
            min_healthy_time: default_min_healthy_time(),
            healthy_deadline: default_healthy_deadline(),
            auto_revert: false,
        }
    }
}

/// Nomad's `migrate` block: how allocations leave a draining node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateStrategy {
    /// Allocations of the group moved at once.
    #[serde(default = "default_max_parallel")]
    pub max_parallel: u32,
    /// How long a moved allocation must be ready before the next one moves.
    #[serde(default = "default_min_healthy_time", with = "duration_text")]
    pub min_healthy_time: Duration,
    /// After this long, a moved allocation that is not healthy no longer
    /// holds the drain back.
    #[serde(default = "default_healthy_deadline", with = "duration_text")]
    pub healthy_deadline: Duration,
}

impl Default for MigrateStrategy {
    fn default() -> Self {
        MigrateStrategy {
            max_parallel: default_max_parallel(),
            min_healthy_time: default_min_healthy_time(),
            healthy_deadline: default_healthy_deadline(),
        }
    }
}

/// Nomad's `disconnect` block.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disconnect {
    /// How long after its node is down (its lease expired) an allocation is
    /// declared lost and replaced. A node back within this grace keeps its
    /// allocations and nothing moves.
    #[serde(default, with = "duration_text")]
    pub lost_after: Duration,
    /// Nomad's `stop_on_client_after` (formerly `stop_after_client_disconnect`):
    /// an agent cut off from the store this long stops the group's allocations
    /// itself. Keep it at most node TTL + `lost_after` so that a replacement
    /// never runs beside the original.
    #[serde(
        default,
        with = "optional_duration_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub stop_on_client_after: Option<Duration>,
}

/// Nomad's `scaling` block with the target-CPU policy of its autoscaler.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scaling {
    /// The fewest instances.
    pub min: u32,
    /// The most instances.
    pub max: u32,
    /// The CPU use to aim for, in percent of the group's reserved CPU.
    pub target_cpu_percent: u32,
    /// The least time between two scaling actions.
    #[serde(default = "default_cooldown", with = "duration_text")]
    pub cooldown: Duration,
}

fn default_cooldown() -> Duration {
    Duration::from_secs(300)
}

/// A task: one process, supervised.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    /// The driver; only `exec` (a process on the node) exists.
    #[serde(default)]
    pub driver: Driver,
    /// The driver's configuration.
    pub config: ExecConfig,
    /// Environment variables added to the process's environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// What the task reserves on its node.
    #[serde(default)]
    pub resources: Resources,
    /// Named ports; each is given to the task as `KEEL_PORT_<label>`.
    #[serde(default, rename = "port", skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, PortSpec>,
    /// Services registered in keel's registry while the task runs.
    #[serde(default, rename = "service", skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
}

/// Task drivers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// A process in its own process group, limited by cgroups or rlimits.
    #[default]
    Exec,
}

/// The `exec` driver's `config`, as Nomad's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// The program (a path, or a name looked up in `PATH`).
    pub command: String,
    /// Its arguments; `${KEEL_PORT_<label>}` is replaced by the port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// The working directory (default: the allocation's directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<String>,
}

/// Reserved resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU in millicores (1000 = one core).
    #[serde(default = "default_cpu_millicores")]
    pub cpu_millicores: u64,
    /// Memory in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
}

fn default_cpu_millicores() -> u64 {
    100
}
fn default_memory_mib() -> u64 {
    300
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpu_millicores: default_cpu_millicores(),
            memory_mib: default_memory_mib(),
        }
    }
}

impl Resources {
    /// No resources.
    pub const ZERO: Resources = Resources {
        cpu_millicores: 0,
        memory_mib: 0,
    };

    /// The sum of two reservations.
    pub fn plus(self, other: Resources) -> Resources {
        Resources {
            cpu_millicores: self.cpu_millicores.saturating_add(other.cpu_millicores),
            memory_mib: self.memory_mib.saturating_add(other.memory_mib),
        }
    }

    /// What is left after taking `other` away (never below zero).
    pub fn minus(self, other: Resources) -> Resources {
        Resources {
            cpu_millicores: self.cpu_millicores.saturating_sub(other.cpu_millicores),
            memory_mib: self.memory_mib.saturating_sub(other.memory_mib),
        }
    }

    /// Whether `other` fits in `self`.
    pub fn holds(self, other: Resources) -> bool {
        other.cpu_millicores <= self.cpu_millicores && other.memory_mib <= self.memory_mib
    }
}

/// A named port. Without `static`, a free port is taken from the node's
/// dynamic port range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// A fixed port number.
    #[serde(default, rename = "static", skip_serializing_if = "Option::is_none")]
    pub static_port: Option<u16>,
}

/// A service registered for the task, as issue 11's registry defines it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// The service name (a DNS label: `<name>.service.<domain>`).
    pub name: String,
    /// The label of the task port the service listens on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// Tags, for `?tag=` and `<tag>.<name>.service.<domain>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Free-form metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// Health checks.
    #[serde(default, rename = "check", skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<Check>,
}

/// A health check, mirroring the agent's check definition (issue 11).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// The check's name, unique within its service.
    pub name: String,
    /// Readiness gates discovery; liveness restarts the task; startup holds
    /// the others back until it passes.
    #[serde(default)]
    pub kind: CheckKind,
    /// How the check probes.
    #[serde(rename = "type")]
    pub check_type: CheckType,
    /// HTTP: the path probed on the service's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// HTTP: the method (default `GET`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// HTTP: request headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub header: BTreeMap<String, Vec<String>>,
    /// gRPC: the service name asked of `grpc.health.v1` (empty: the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_service: Option<String>,
    /// Exec: the program run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Exec: its arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// TTL: how long a pass reported by the service stays valid.
    #[serde(
        default,
        with = "optional_duration_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<Duration>,
    /// The port label probed, when not the service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// Time between probes.
    #[serde(default = "default_check_interval", with = "duration_text")]
    pub interval: Duration,
    /// Time a probe may take.
    #[serde(default = "default_check_timeout", with = "duration_text")]
    pub timeout: Duration,
    /// Time after the task starts before the first probe.
    #[serde(default, with = "duration_text")]
    pub initial_delay: Duration,
    /// Consecutive successes before the status turns passing.
    #[serde(default = "default_threshold")]
    pub success_before_passing: u32,
    /// Consecutive failures before the status turns warning.
    #[serde(default = "default_threshold")]
    pub failures_before_warning: u32,
    /// Consecutive failures before the status turns critical.
    #[serde(default = "default_threshold")]
    pub failures_before_critical: u32,
}

fn default_check_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_check_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_threshold() -> u32 {
    1
}

/// Kubernetes' split of probes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// Gates discovery and rolling updates.
    #[default]
    Readiness,
    /// A critical status restarts the task.
    Liveness,
    /// The other checks wait until it passes.
    Startup,
}

/// Consul's check types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckType {
    /// 2xx passing, 429 warning, anything else critical.
    Http,
    /// A TCP connection succeeds.
    Tcp,
    /// `grpc.health.v1` answers SERVING.
    Grpc,
    /// Exit 0 passing, 1 warning, anything else critical.
    Exec,
    /// The service reports its own status before the TTL runs out.
    Ttl,
}

impl Group {
    /// The sum of the group's tasks' resources: what one allocation reserves.
    pub fn resources(&self) -> Resources {
        self.tasks
            .values()
            .fold(Resources::ZERO, |total, task| total.plus(task.resources))
    }

    /// The group's ports as (label, spec), over all its tasks.
    pub fn ports(&self) -> impl Iterator<Item = (&str, &PortSpec)> {
        self.tasks.values().flat_map(|task| {
            task.ports
                .iter()
                .map(|(label, spec)| (label.as_str(), spec))
        })
    }

    /// Whether an allocation running `other` can be changed to run `self`
    /// without a restart (Nomad's in-place update): only the fields that do
    /// not reach the running processes differ (count, policies, scaling).
    pub fn runs_like(&self, other: &Group) -> bool {
        self.tasks == other.tasks && self.constraints == other.constraints
    }
}

impl Job {
    /// Parses a job written in TOML. Shapes only: call
    /// [`Job::validate`] before using it, or use [`Job::from_toml_validated`].
    pub fn from_toml(text: &str) -> Result<Job, crate::SpecError> {
        check_size(text)?;
        toml::from_str(text).map_err(|error| crate::SpecError::Parse {
            format: "TOML",
            message: error.to_string(),
        })
    }

    /// Parses a job sent as JSON (the HTTP API). Shapes only.
    pub fn from_json(text: &str) -> Result<Job, crate::SpecError> {
        check_size(text)?;
        serde_json::from_str(text).map_err(|error| crate::SpecError::Parse {
            format: "JSON",
            message: error.to_string(),
        })
    }

    /// Parses and validates a TOML job.
    pub fn from_toml_validated(text: &str) -> Result<Job, crate::SpecError> {
        let job = Job::from_toml(text)?;
        job.validate()?;
        Ok(job)
    }

    /// Parses and validates a JSON job.
    pub fn from_json_validated(text: &str) -> Result<Job, crate::SpecError> {
        let job = Job::from_json(text)?;
        job.validate()?;
        Ok(job)
    }

    /// The job as JSON, the shape the store holds under `/keel/jobs/<name>`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect(
            "a job always serialises: it holds only strings, numbers and maps with string keys",
        )
    }
}

fn check_size(text: &str) -> Result<(), crate::SpecError> {
    if text.len() > crate::limits::SPEC_BYTES_MAX {
        return Err(crate::SpecError::TooLarge { bytes: text.len() });
    }
    Ok(())
}
