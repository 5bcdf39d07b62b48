//! Validation of job specs: a bad spec is refused as a whole, with every
//! problem named by its field path (`group "web".task "server".resources.memory_mib`)
//! and the reason, so nothing of it is ever half-applied.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use crate::spec::{
    Check, CheckType, Constraint, ConstraintOperator, Group, Job, RestartMode, Spread, Task,
};
use crate::{limits, SpecError};

/// One problem in a spec: where, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldProblem {
    /// The field's path, such as `group "web".count`.
    pub path: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}: {}", self.path, self.reason)
    }
}

/// Collects problems while walking the spec.
struct Problems(Vec<FieldProblem>);

impl Problems {
    fn add(&mut self, path: impl fmt::Display, reason: impl Into<String>) {
        if self.0.len() < limits::SPEC_PROBLEMS_MAX {
            self.0.push(FieldProblem {
                path: path.to_string(),
                reason: reason.into(),
            });
        }
    }

    fn require(&mut self, ok: bool, path: impl fmt::Display, reason: impl Into<String>) {
        if !ok {
            self.add(path, reason);
        }
    }
}

impl Job {
    /// Checks the spec's meaning. Returns every problem found (up to
    /// [`limits::SPEC_PROBLEMS_MAX`]), each naming its field.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut problems = Problems(Vec::new());
        check_name(&mut problems, "name", &self.name, limits::NAME_BYTES_MAX);
        if self.groups.is_empty() {
            problems.add("group", "a job needs at least one group");
        }
        problems.require(
            self.groups.len() <= limits::GROUPS_PER_JOB_MAX,
            "group",
            format!("at most {} groups", limits::GROUPS_PER_JOB_MAX),
        );
        check_constraints(&mut problems, "constraint", &self.constraints);
        for (group_name, group) in &self.groups {
            check_group(&mut problems, group_name, group);
        }
        if problems.0.is_empty() {
            Ok(())
        } else {
            Err(SpecError::Invalid {
                problems: problems.0,
            })
        }
    }
}

/// Names become store keys, environment variables and DNS labels: keep them
/// to letters, digits, `-` and `_`.
fn check_name(problems: &mut Problems, path: impl fmt::Display, name: &str, bytes_max: usize) {
    if name.is_empty() {
        problems.add(path, "must not be empty");
    } else if name.len() > bytes_max {
        problems.add(path, format!("must be at most {bytes_max} bytes"));
    } else if !name
        .chars()
        .all(|character| character.is_ascii_alphanumeric() || character == '-' || character == '_')
    {
        problems.add(path, "may hold only ASCII letters, digits, '-' and '_'");
    }
}

fn check_group(problems: &mut Problems, group_name: &str, group: &Group) {
    let at = format!("group {group_name:?}");
    check_name(problems, &at, group_name, limits::NAME_BYTES_MAX);
    problems.require(
        group.count <= limits::GROUP_COUNT_MAX,
        format!("{at}.count"),
        format!("must be at most {}", limits::GROUP_COUNT_MAX),
    );
    if group.tasks.is_empty() {
        problems.add(format!("{at}.task"), "a group needs at least one task");
    }
    problems.require(
        group.tasks.len() <= limits::TASKS_PER_GROUP_MAX,
        format!("{at}.task"),
        format!("at most {} tasks", limits::TASKS_PER_GROUP_MAX),
    );
    check_constraints(problems, format!("{at}.constraint"), &group.constraints);
    check_spreads(problems, &at, &group.spreads);

    let restart = &group.restart;
    if restart.attempts > 0 {
        problems.require(
            !restart.interval.is_zero(),
            format!("{at}.restart.interval"),
            "must be > 0 when attempts > 0",
        );
        let needed = restart.delay.saturating_mul(restart.attempts);
        problems.require(
            needed <= restart.interval,
            format!("{at}.restart.interval"),
            format!(
                "{} attempts with a delay of {} do not fit in {}",
                restart.attempts,
                crate::time::format_duration(restart.delay),
                crate::time::format_duration(restart.interval)
            ),
        );
    }
    if restart.mode == RestartMode::Delay {
        problems.require(
            !restart.interval.is_zero(),
            format!("{at}.restart.interval"),
            "mode \"delay\" needs an interval > 0",
        );
    }

    let reschedule = &group.reschedule;
    problems.require(
        !reschedule.delay.is_zero(),
        format!("{at}.reschedule.delay"),
        "must be > 0",
    );
    problems.require(
        reschedule.max_delay >= reschedule.delay,
        format!("{at}.reschedule.max_delay"),
        "must be >= delay",
    );
    if !reschedule.unlimited {
        problems.require(
            reschedule.attempts <= limits::RESCHEDULE_ATTEMPTS_MAX,
            format!("{at}.reschedule.attempts"),
            format!(
                "must be at most {} (or set unlimited = true)",
                limits::RESCHEDULE_ATTEMPTS_MAX
            ),
        );
        if reschedule.attempts > 0 {
            problems.require(
                !reschedule.interval.is_zero(),
                format!("{at}.reschedule.interval"),
                "must be > 0 when attempts > 0",
            );
        }
    }

    if let Some(update) = &group.update {
        problems.require(
            update.max_parallel >= 1,
            format!("{at}.update.max_parallel"),
            "must be >= 1",
        );
        problems.require(
            update.min_healthy_time < update.healthy_deadline,
            format!("{at}.update.healthy_deadline"),
            "must be longer than min_healthy_time",
        );
    }
    problems.require(
        group.migrate.max_parallel >= 1,
        format!("{at}.migrate.max_parallel"),
        "must be >= 1",
    );
    problems.require(
        group.migrate.min_healthy_time < group.migrate.healthy_deadline,
        format!("{at}.migrate.healthy_deadline"),
        "must be longer than min_healthy_time",
    );
    if let Some(stop_after) = group.disconnect.stop_on_client_after {
        problems.require(
            !stop_after.is_zero(),
            format!("{at}.disconnect.stop_on_client_after"),
            "must be > 0 when set",
        );
    }

    if let Some(scaling) = &group.scaling {
        problems.require(
            scaling.min <= scaling.max,
            format!("{at}.scaling.min"),
            "must be <= max",
        );
        problems.require(
            scaling.max <= limits::GROUP_COUNT_MAX,
            format!("{at}.scaling.max"),
            format!("must be at most {}", limits::GROUP_COUNT_MAX),
        );
        problems.require(
            (scaling.min..=scaling.max).contains(&group.count),
            format!("{at}.count"),
            format!(
                "must be within scaling's min {} and max {}",
                scaling.min, scaling.max
            ),
        );
        problems.require(
            (1..=100).contains(&scaling.target_cpu_percent),
            format!("{at}.scaling.target_cpu_percent"),
            "must be between 1 and 100",
        );
    }

    let mut port_labels = BTreeSet::new();
    let mut static_ports = BTreeSet::new();
    let mut service_names = BTreeSet::new();
    for (task_name, task) in &group.tasks {
        check_task(
            problems,
            &at,
            task_name,
            task,
            &mut port_labels,
            &mut static_ports,
            &mut service_names,
        );
    }
    problems.require(
        port_labels.len() <= limits::PORTS_PER_GROUP_MAX,
        format!("{at}.task"),
        format!("at most {} ports per group", limits::PORTS_PER_GROUP_MAX),
    );
}

fn check_task(
    problems: &mut Problems,
    group_at: &str,
    task_name: &str,
    task: &Task,
    port_labels: &mut BTreeSet<String>,
    static_ports: &mut BTreeSet<u16>,
    service_names: &mut BTreeSet<String>,
) {
    let at = format!("{group_at}.task {task_name:?}");
    check_name(problems, &at, task_name, limits::NAME_BYTES_MAX);
    problems.require(
        !task.config.command.is_empty(),
        format!("{at}.config.command"),
        "must not be empty",
    );
    problems.require(
        task.config.args.len() <= limits::ARGS_MAX,
        format!("{at}.config.args"),
        format!("at most {} arguments", limits::ARGS_MAX),
    );
    if let Some(work_dir) = &task.config.work_dir {
        problems.require(
            !work_dir.is_empty(),
            format!("{at}.config.work_dir"),
            "must not be empty when set",
        );
    }
    problems.require(
        task.env.len() <= limits::ENV_MAX,
        format!("{at}.env"),
        format!("at most {} variables", limits::ENV_MAX),
    );
    for key in task.env.keys() {
        problems.require(
            !key.is_empty() && !key.contains('=') && !key.contains('\0'),
            format!("{at}.env.{key:?}"),
            "a variable name must be non-empty and hold no '=' or NUL",
        );
    }
    problems.require(
        task.resources.cpu_millicores > 0,
        format!("{at}.resources.cpu_millicores"),
        "must be > 0",
    );
    problems.require(
        task.resources.memory_mib > 0,
        format!("{at}.resources.memory_mib"),
        "must be > 0",
    );
    for (label, port) in &task.ports {
        let port_at = format!("{at}.port {label:?}");
        // The label becomes the environment variable KEEL_PORT_<label>.
        if label.is_empty()
            || !label
                .chars()
                .all(|character| character.is_ascii_alphanumeric() || character == '_')
        {
            problems.add(
                &port_at,
                "a port label may hold only ASCII letters, digits and '_'",
            );
        }
        if !port_labels.insert(label.clone()) {
            problems.add(
                &port_at,
                "the label is already used by another task of the group",
            );
        }
        if let Some(number) = port.static_port {
            problems.require(
                number > 0,
                format!("{port_at}.static"),
                "must be between 1 and 65535",
            );
            if !static_ports.insert(number) {
                problems.add(
                    format!("{port_at}.static"),
                    "the port is already used by another label of the group",
                );
            }
        }
    }
    problems.require(
        task.services.len() <= limits::SERVICES_PER_TASK_MAX,
        format!("{at}.service"),
        format!("at most {} services", limits::SERVICES_PER_TASK_MAX),
    );
    for (service_index, service) in task.services.iter().enumerate() {
        let service_at = format!("{at}.service[{service_index}]");
        let name_is_dns_label = !service.name.is_empty()
            && service.name.len() <= 63
            && service.name.chars().all(|character| {
                character.is_ascii_lowercase() || character.is_ascii_digit() || character == '-'
            })
            && !service.name.starts_with('-')
            && !service.name.ends_with('-');
        problems.require(
            name_is_dns_label,
            format!("{service_at}.name"),
            "must be a DNS label: lowercase letters, digits and '-', at most 63 bytes",
        );
        if !service_names.insert(service.name.clone()) {
            problems.add(
                format!("{service_at}.name"),
                "the group already registers a service of this name",
            );
        }
        if let Some(port) = &service.port {
            problems.require(
                task.ports.contains_key(port),
                format!("{service_at}.port"),
                format!("the task has no port labelled {port:?}"),
            );
        }
        problems.require(
            service.checks.len() <= limits::CHECKS_PER_SERVICE_MAX,
            format!("{service_at}.check"),
            format!("at most {} checks", limits::CHECKS_PER_SERVICE_MAX),
        );
        let mut check_names = BTreeSet::new();
        for (check_index, check) in service.checks.iter().enumerate() {
            let check_at = format!("{service_at}.check[{check_index}]");
            if !check_names.insert(check.name.clone()) {
                problems.add(
                    format!("{check_at}.name"),
                    "the service already has a check of this name",
                );
            }
            check_check(problems, &check_at, check, task, service.port.as_deref());
        }
    }
}

fn check_check(
    problems: &mut Problems,
    at: &str,
    check: &Check,
    task: &Task,
    service_port: Option<&str>,
) {
    problems.require(
        !check.name.is_empty(),
        format!("{at}.name"),
        "must not be empty",
    );
    problems.require(
        !check.interval.is_zero(),
        format!("{at}.interval"),
        "must be > 0",
    );
    problems.require(
        !check.timeout.is_zero(),
        format!("{at}.timeout"),
        "must be > 0",
    );
    problems.require(
        check.timeout <= check.interval,
        format!("{at}.timeout"),
        "must not be longer than interval",
    );
    for (field, value) in [
        ("success_before_passing", check.success_before_passing),
        ("failures_before_warning", check.failures_before_warning),
        ("failures_before_critical", check.failures_before_critical),
    ] {
        problems.require(value >= 1, format!("{at}.{field}"), "must be >= 1");
    }
    problems.require(
        check.failures_before_warning <= check.failures_before_critical,
        format!("{at}.failures_before_warning"),
        "must be <= failures_before_critical",
    );
    if let Some(port) = &check.port {
        problems.require(
            task.ports.contains_key(port),
            format!("{at}.port"),
            format!("the task has no port labelled {port:?}"),
        );
    }
    let has_port = check.port.is_some() || service_port.is_some();
    match check.check_type {
        CheckType::Http => {
            problems.require(
                check
                    .path
                    .as_deref()
                    .is_some_and(|path| path.starts_with('/')),
                format!("{at}.path"),
                "an http check needs a path starting with '/'",
            );
            problems.require(
                has_port,
                format!("{at}.port"),
                "an http check needs a port (its own or the service's)",
            );
        }
        CheckType::Tcp | CheckType::Grpc => {
            problems.require(
                has_port,
                format!("{at}.port"),
                "this check needs a port (its own or the service's)",
            );
        }
        CheckType::Exec => {
            problems.require(
                check
                    .command
                    .as_deref()
                    .is_some_and(|command| !command.is_empty()),
                format!("{at}.command"),
                "an exec check needs a command",
            );
        }
        CheckType::Ttl => {
            problems.require(
                check.ttl.is_some_and(|ttl| ttl > Duration::ZERO),
                format!("{at}.ttl"),
                "a ttl check needs a ttl > 0",
            );
        }
    }
}

fn check_constraints(problems: &mut Problems, at: impl fmt::Display, constraints: &[Constraint]) {
    problems.require(
        constraints.len() <= limits::CONSTRAINTS_MAX,
        &at,
        format!("at most {} constraints", limits::CONSTRAINTS_MAX),
    );
    for (index, constraint) in constraints.iter().enumerate() {
        let constraint_at = format!("{at}[{index}]");
        if constraint.operator == ConstraintOperator::DistinctHosts {
            problems.require(
                matches!(constraint.value.as_str(), "" | "true" | "false"),
                format!("{constraint_at}.value"),
                "distinct_hosts takes \"true\" or \"false\"",
            );
            continue;
        }
        if let Err(reason) = crate::feasibility::NodeProperty::parse(&constraint.attribute) {
            problems.add(format!("{constraint_at}.attribute"), reason);
        }
        match constraint.operator {
            ConstraintOperator::Regexp => {
                if let Err(error) = regex::Regex::new(&constraint.value) {
                    problems.add(
                        format!("{constraint_at}.value"),
                        format!("not a regular expression: {error}"),
                    );
                }
            }
            ConstraintOperator::Semver => {
                if let Err(error) = semver::VersionReq::parse(&constraint.value) {
                    problems.add(
                        format!("{constraint_at}.value"),
                        format!("not a version requirement: {error}"),
                    );
                }
            }
            _ => {}
        }
    }
}

fn check_spreads(problems: &mut Problems, group_at: &str, spreads: &[Spread]) {
    for (index, spread) in spreads.iter().enumerate() {
        let at = format!("{group_at}.spread[{index}]");
        if let Err(reason) = crate::feasibility::NodeProperty::parse(&spread.attribute) {
            problems.add(format!("{at}.attribute"), reason);
        }
        problems.require(
            (1..=100).contains(&spread.weight),
            format!("{at}.weight"),
            "must be between 1 and 100",
        );
        let total: u32 = spread.targets.iter().map(|target| target.percent).sum();
        problems.require(
            total <= 100,
            format!("{at}.target"),
            "the percents must add up to at most 100",
        );
    }
}
