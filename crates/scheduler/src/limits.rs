//! Named limits on everything a job spec or a plan may hold.

/// Bytes of a job spec (TOML or JSON) accepted.
pub const SPEC_BYTES_MAX: usize = 256 * 1024;
/// Problems reported for one spec (the rest are left out).
pub const SPEC_PROBLEMS_MAX: usize = 64;
/// Bytes of a job, group or task name.
pub const NAME_BYTES_MAX: usize = 128;
/// Groups in a job.
pub const GROUPS_PER_JOB_MAX: usize = 32;
/// Tasks in a group.
pub const TASKS_PER_GROUP_MAX: usize = 16;
/// Instances of a group (its `count` and `scaling.max`).
pub const GROUP_COUNT_MAX: u32 = 10_000;
/// Constraints at one level (job or group).
pub const CONSTRAINTS_MAX: usize = 32;
/// Named ports in a group, over its tasks.
pub const PORTS_PER_GROUP_MAX: usize = 32;
/// Arguments of a task's command.
pub const ARGS_MAX: usize = 256;
/// Environment variables of a task.
pub const ENV_MAX: usize = 256;
/// Services of a task.
pub const SERVICES_PER_TASK_MAX: usize = 8;
/// Checks of a service.
pub const CHECKS_PER_SERVICE_MAX: usize = 8;
/// `reschedule.attempts` when not unlimited.
pub const RESCHEDULE_ATTEMPTS_MAX: u32 = 32;
/// Reschedule events kept per allocation chain (the oldest are dropped):
/// enough for any limited `attempts` and for the delay functions, which look
/// at the last two.
pub const RESCHEDULE_EVENTS_MAX: usize = 32;
/// Versions of a job the controller keeps (for in-place updates and revert).
pub const JOB_VERSIONS_MAX: usize = 32;
