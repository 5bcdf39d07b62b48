//! Job specs: the example parses and validates, JSON and TOML say the same
//! thing, defaults are Nomad's, and a bad spec is refused as a whole with
//! each problem named by its field path.

use std::time::Duration;

use keel_scheduler::{
    CheckKind, CheckType, ConstraintOperator, DelayFunction, Job, RestartMode, SpecError,
};

fn example_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/jobs/web.toml")
}

const MINIMAL: &str = r#"
name = "api"
[group.api.task.server]
config = { command = "/usr/bin/api" }
"#;

fn problems(text: &str) -> Vec<String> {
    match Job::from_toml_validated(text) {
        Err(SpecError::Invalid { problems }) => problems.iter().map(ToString::to_string).collect(),
        other => panic!("expected a validation error, got {other:?}"),
    }
}

#[test]
fn the_web_example_parses_and_validates() {
    let text = std::fs::read_to_string(example_path()).expect("examples/jobs/web.toml exists");
    let job = Job::from_toml_validated(&text).expect("the example is valid");
    assert_eq!(job.name, "web");
    let group = &job.groups["web"];
    assert_eq!(group.count, 3);
    let task = &group.tasks["server"];
    assert_eq!(task.config.command, "python3");
    assert!(task
        .config
        .args
        .iter()
        .any(|argument| argument == "${KEEL_PORT_http}"));
    assert!(task.ports.contains_key("http"));
    let service = &task.services[0];
    assert_eq!(service.name, "web");
    assert_eq!(service.port.as_deref(), Some("http"));
    let check = &service.checks[0];
    assert_eq!(
        (check.kind, check.check_type, check.path.as_deref()),
        (CheckKind::Readiness, CheckType::Http, Some("/"))
    );
    assert_eq!(
        group.update.as_ref().map(|update| update.auto_revert),
        Some(true)
    );
    assert_eq!(group.disconnect.lost_after, Duration::from_secs(10));
    assert_eq!(
        group.disconnect.stop_on_client_after,
        Some(Duration::from_secs(15))
    );
}

#[test]
fn json_and_toml_say_the_same() {
    let text = std::fs::read_to_string(example_path()).unwrap();
    let job = Job::from_toml_validated(&text).unwrap();
    let json = job.to_json();
    assert!(
        json.contains("\"lost_after\":\"10s\""),
        "durations travel as Go strings: {json}"
    );
    assert_eq!(Job::from_json_validated(&json).unwrap(), job);
}

#[test]
fn defaults_are_nomads() {
    let job = Job::from_toml_validated(MINIMAL).unwrap();
    let group = &job.groups["api"];
    assert_eq!(group.count, 1);
    assert_eq!(
        (
            group.restart.attempts,
            group.restart.interval,
            group.restart.delay
        ),
        (2, Duration::from_secs(1800), Duration::from_secs(15))
    );
    assert_eq!(group.restart.mode, RestartMode::Fail);
    assert!(group.reschedule.unlimited);
    assert_eq!(group.reschedule.delay_function, DelayFunction::Exponential);
    assert_eq!(
        (group.reschedule.delay, group.reschedule.max_delay),
        (Duration::from_secs(30), Duration::from_secs(3600))
    );
    assert!(group.update.is_none());
    assert_eq!(group.migrate.max_parallel, 1);
    assert_eq!(group.disconnect.lost_after, Duration::ZERO);
    let task = &group.tasks["server"];
    assert_eq!(
        (task.resources.cpu_millicores, task.resources.memory_mib),
        (100, 300)
    );
}

#[test]
fn constraint_operators_are_spelt_as_nomad_does() {
    let job = Job::from_toml_validated(
        r#"
name = "api"
[[constraint]]
attribute = "${attr.kernel.name}"
value = "linux"
[group.api]
[[group.api.constraint]]
attribute = "${meta.zone}"
operator = "!="
value = "c"
[[group.api.constraint]]
attribute = "${node.unique.name}"
operator = "regexp"
value = "^node-[0-9]+$"
[[group.api.constraint]]
attribute = "${attr.kernel.version}"
operator = "version"
value = ">= 5.10"
[[group.api.constraint]]
operator = "distinct_hosts"
value = "true"
[group.api.task.server]
config = { command = "api" }
"#,
    )
    .unwrap();
    let operators: Vec<ConstraintOperator> = job.groups["api"]
        .constraints
        .iter()
        .map(|constraint| constraint.operator)
        .collect();
    assert_eq!(
        operators,
        [
            ConstraintOperator::NotEqual,
            ConstraintOperator::Regexp,
            ConstraintOperator::Semver,
            ConstraintOperator::DistinctHosts
        ]
    );
    assert_eq!(job.constraints[0].operator, ConstraintOperator::Equal);
}

#[test]
fn a_bad_field_is_named_with_its_path_and_reason() {
    let text = MINIMAL.replace(
        "config = { command = \"/usr/bin/api\" }",
        "config = { command = \"/usr/bin/api\" }\nresources = { memory_mib = 0 }",
    );
    assert_eq!(
        problems(&text),
        [r#"group "api".task "server".resources.memory_mib: must be > 0"#]
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let found = problems(
        r#"
name = "bad name"
[group.web]
count = 3
[group.web.scaling]
min = 1
max = 2
target_cpu_percent = 150
[group.web.reschedule]
delay = "10s"
max_delay = "5s"
[group.web.update]
min_healthy_time = "5m"
healthy_deadline = "1m"
[[group.web.constraint]]
attribute = "${datacenter}"
value = "x"
[[group.web.constraint]]
attribute = "${meta.zone}"
operator = "regexp"
value = "(unclosed"
[group.web.task.server]
config = { command = "" }
port.http = {}
[[group.web.task.server.service]]
name = "Web"
port = "admin"
[[group.web.task.server.service.check]]
name = "ready"
type = "http"
path = "health"
"#,
    );
    let expected = [
        "name: may hold only ASCII letters, digits, '-' and '_'",
        r#"group "web".count: must be within scaling's min 1 and max 2"#,
        r#"group "web".scaling.target_cpu_percent: must be between 1 and 100"#,
        r#"group "web".reschedule.max_delay: must be >= delay"#,
        r#"group "web".update.healthy_deadline: must be longer than min_healthy_time"#,
        r#"group "web".constraint[0].attribute"#,
        r#"group "web".constraint[1].value: not a regular expression"#,
        r#"group "web".task "server".config.command: must not be empty"#,
        r#"group "web".task "server".service[0].name: must be a DNS label"#,
        r#"group "web".task "server".service[0].port: the task has no port labelled "admin""#,
        r#"group "web".task "server".service[0].check[0].path: an http check needs a path starting with '/'"#,
    ];
    for wanted in expected {
        assert!(
            found.iter().any(|problem| problem.starts_with(wanted)),
            "missing {wanted:?} in {found:#?}"
        );
    }
    assert_eq!(found.len(), expected.len(), "{found:#?}");
}

#[test]
fn restart_attempts_must_fit_the_interval() {
    let text = MINIMAL.replace("[group.api.task.server]", "[group.api.restart]\nattempts = 5\ninterval = \"10s\"\ndelay = \"5s\"\n[group.api.task.server]");
    let found = problems(&text);
    assert!(
        found[0].starts_with(
            r#"group "api".restart.interval: 5 attempts with a delay of 5s do not fit in 10s"#
        ),
        "{found:?}"
    );
}

#[test]
fn unknown_fields_and_bad_values_are_refused_by_the_parser() {
    let misspelt = MINIMAL.replace(
        "[group.api.task.server]",
        "[group.api]\ncout = 3\n[group.api.task.server]",
    );
    let error = Job::from_toml(&misspelt).unwrap_err().to_string();
    assert!(error.contains("unknown field `cout`"), "{error}");

    let bad_duration = MINIMAL.replace(
        "[group.api.task.server]",
        "[group.api.restart]\ndelay = \"5 seconds\"\n[group.api.task.server]",
    );
    let error = Job::from_toml(&bad_duration).unwrap_err().to_string();
    assert!(error.contains("invalid duration \"5 seconds\""), "{error}");

    let bad_mode = MINIMAL.replace(
        "[group.api.task.server]",
        "[group.api.restart]\nmode = \"retry\"\n[group.api.task.server]",
    );
    let error = Job::from_toml(&bad_mode).unwrap_err().to_string();
    assert!(error.contains("unknown variant `retry`"), "{error}");

    let error = Job::from_json(r#"{"name": "x", "group": {"g": {"task": {"t": {"config": {"command": "c"}, "driver": "docker"}}}}}"#)
        .unwrap_err()
        .to_string();
    assert!(error.contains("unknown variant `docker`"), "{error}");
}

#[test]
fn oversized_specs_are_refused() {
    let text = format!(
        "{MINIMAL}\n#{}",
        "x".repeat(keel_scheduler::limits::SPEC_BYTES_MAX)
    );
    assert!(matches!(
        Job::from_toml(&text),
        Err(SpecError::TooLarge { .. })
    ));
}

#[test]
fn ports_must_be_unique_in_a_group() {
    let found = problems(
        r#"
name = "api"
[group.api.task.one]
config = { command = "one" }
port.http = { static = 8080 }
[group.api.task.two]
config = { command = "two" }
port.http = {}
port.admin = { static = 8080 }
"#,
    );
    assert!(found.contains(&r#"group "api".task "two".port "http": the label is already used by another task of the group"#.to_string()), "{found:#?}");
    assert!(found.contains(&r#"group "api".task "two".port "admin".static: the port is already used by another label of the group"#.to_string()), "{found:#?}");
}

#[test]
fn the_web_example_launches_with_its_port() {
    let text = std::fs::read_to_string(example_path()).unwrap();
    let job = Job::from_toml_validated(&text).unwrap();
    let nodes = vec![keel_scheduler::Node {
        name: "n1".into(),
        labels: Default::default(),
        attributes: Default::default(),
        capacity: keel_scheduler::Resources {
            cpu_millicores: 2000,
            memory_mib: 2048,
        },
        port_range: keel_scheduler::PortRange {
            first: 21000,
            last: 21010,
        },
        eligible: true,
        drain: None,
        status: keel_scheduler::NodeStatus::Alive,
    }];
    let cluster = keel_scheduler::Cluster {
        nodes,
        ..Default::default()
    };
    let plan = keel_scheduler::plan_job(&job, None, &cluster, keel_scheduler::Time(0), 9);
    assert_eq!(
        plan.placements.len(),
        3,
        "one node takes all three when it is the only one"
    );
    let allocation = &plan.placements[0];
    let launch =
        keel_scheduler::task_launch(allocation, "server", &job.groups["web"].tasks["server"]);
    let port = allocation.ports["http"].to_string();
    assert_eq!(launch.command, "python3");
    assert_eq!(
        launch.args,
        ["-m", "http.server", port.as_str(), "--bind", "127.0.0.1"]
    );
    assert_eq!(launch.env["KEEL_PORT_http"], port);
    assert_eq!(launch.env["KEEL_ALLOC_ID"], allocation.id.0);
    assert_eq!(launch.env["KEEL_MEMORY_LIMIT"], "128");
    let ports: std::collections::BTreeSet<u16> = plan
        .placements
        .iter()
        .map(|allocation| allocation.ports["http"])
        .collect();
    assert_eq!(
        ports.len(),
        3,
        "three instances on one node get three ports"
    );
}
