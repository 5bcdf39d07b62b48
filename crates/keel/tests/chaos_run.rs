//! `keel chaos run` end to end on real processes: a scenario passes with its history in
//! keel-check's format, and the fault suite's self-test — members that acknowledge
//! before fsync — fails the whole-cluster crash scenario. With agents: the fault
//! suite's node-failure scenario passes, with the job's report (serving again after the
//! node's kill, never more than its count wanted running), leaving no process behind;
//! and a hypothesis that cannot hold with a node killed (serving again within 1 s, when
//! noticing the loss alone takes the node TTL) fails the run. Ports 28300–28399.

use std::path::PathBuf;

use std::path::Path;
use std::process::Command;

fn chaos_run(
    scenario: &Path,
    port_base: u16,
    work_dir: &Path,
    extra: &[&str],
) -> (bool, String, String) {
    // keel-check is found beside the keel binary; make sure it is built.
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "keel-check"])
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building keel-check");
    let output = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["chaos", "run"])
        .arg(scenario)
        .args(["--port-base", &port_base.to_string(), "-o", "json"])
        .arg("--work-dir")
        .arg(work_dir)
        .args(extra)
        .output()
        .expect("keel chaos run runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_minority_partition_scenario_passes_with_a_checkable_history() {
    let directory = tempfile::tempdir().unwrap();
    let scenario = directory.path().join("scenario.toml");
    std::fs::write(
        &scenario,
        r#"
        name = "short minority partition"
        seed = 11
        duration = "6s"
        [hypothesis]
        write_success_fraction_min = 0.8
        availability_min = 0.8
        [[fault]]
        kind = "partition"
        target = "minority"
        at = "2s"
        for = "2s"
        "#,
    )
    .unwrap();
    let work_dir = directory.path().join("work");
    let (success, stdout, stderr) = chaos_run(&scenario, 28300, &work_dir, &[]);
    assert!(success, "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["passed"], true);
    assert_eq!(report["acknowledged_writes_lost"], 0);
    assert_eq!(report["linearizability"], "linearizable");
    assert_eq!(report["faults"][0]["kind"], "partition");
    assert!(
        report["writes_acknowledged"].as_u64().unwrap() > 50,
        "{stdout}"
    );
    // The history is exactly what keel-check reads.
    let text = std::fs::read_to_string(work_dir.join("history.json")).unwrap();
    let history = keel_check::History::from_json(&text, 1_000_000).unwrap();
    assert!(history.operations.len() > 50);
}

#[test]
fn acknowledging_before_fsync_fails_the_cluster_crash_scenario() {
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/cluster-crash.toml");
    let directory = tempfile::tempdir().unwrap();
    let (success, stdout, stderr) = chaos_run(
        &scenario,
        28320,
        directory.path(),
        &["--unsafe-member-argument=--unsafe-fault-acknowledge-before-fsync"],
    );
    assert!(!success, "the broken members passed:\n{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let lost = report["acknowledged_writes_lost"].as_u64().unwrap();
    let verdict = report["linearizability"].as_str().unwrap();
    assert!(
        lost > 0 || verdict.starts_with("violation"),
        "the run failed, but not for lost writes: {stdout}"
    );
}

/// Processes with a working directory or an argument inside `directory`: the members
/// and agents a run started (their data directories), and the agents' tasks (which run
/// in their allocation's directory).
fn processes_inside(directory: &Path) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let command_line = std::fs::read(entry.path().join("cmdline")).ok()?;
            let arguments: Vec<String> = command_line
                .split(|&byte| byte == 0)
                .map(|argument| String::from_utf8_lossy(argument).into_owned())
                .collect();
            let working_directory: Option<PathBuf> =
                std::fs::read_link(entry.path().join("cwd")).ok();
            let inside = working_directory.is_some_and(|cwd| cwd.starts_with(directory))
                || arguments
                    .iter()
                    .any(|argument| Path::new(argument).starts_with(directory));
            inside.then(|| (pid, arguments.join(" ")))
        })
        .filter(|(pid, _)| *pid != std::process::id())
        .collect()
}

fn check(report: &serde_json::Value, name_start: &str) -> serde_json::Value {
    report["hypothesis"]
        .as_array()
        .unwrap()
        .iter()
        .find(|check| check["name"].as_str().unwrap().starts_with(name_start))
        .unwrap_or_else(|| panic!("no check named {name_start}…: {report:#}"))
        .clone()
}

#[test]
fn a_node_failure_with_workloads_is_repaired_without_exceeding_the_count() {
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scenarios/node-failure-with-workloads.toml");
    let directory = tempfile::tempdir().unwrap();
    let work_dir = directory.path().join("work");
    let (success, stdout, stderr) =
        chaos_run(&scenario, 28306, &work_dir, &["--agent-port-base", "28330"]);
    let leftovers = processes_inside(&work_dir);
    assert!(success, "{stdout}\n{stderr}");
    assert!(leftovers.is_empty(), "left running: {leftovers:#?}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["passed"], true);
    assert_eq!(report["acknowledged_writes_lost"], 0);
    assert_eq!(report["linearizability"], "linearizable");
    let kill = &report["faults"][0];
    assert_eq!(kill["kind"], "kill");
    assert_eq!(kill["on_nodes"], true);
    assert!(kill["targets"][0].as_str().unwrap().starts_with("node"));
    let job = &report["job"];
    assert_eq!(job["name"], "web");
    assert_eq!(job["count"], 3);
    assert_eq!(job["serving_at_end"], 3);
    // The kill took the killed node's instance away for a while.
    assert!(job["fewest_serving"].as_u64().unwrap() < 3, "{job:#}");
    let recovered = job["recoveries"][0]["serving_again_after_seconds"]
        .as_f64()
        .unwrap();
    assert!(recovered > 0.0 && recovered <= 12.0, "{job:#}");
    let history = &job["allocation_history"];
    assert!(
        history["revisions_checked"].as_u64().unwrap() >= 2,
        "{job:#}"
    );
    assert_eq!(history["wanted_running_max"], 3);
    assert_eq!(history["revisions_with_a_shared_slot"], 0);
    // Per second, the instances serving are in the report.
    assert!(report["seconds"][0]["instances_serving_min"].is_u64());
}

#[test]
fn a_recovery_bound_that_cannot_hold_with_a_node_killed_fails_the_run() {
    let directory = tempfile::tempdir().unwrap();
    let scenario = directory.path().join("scenario.toml");
    let job = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/jobs/web-fast.toml");
    std::fs::write(
        &scenario,
        format!(
            r#"
            name = "impossible node recovery"
            seed = 15
            duration = "10s"
            [agents]
            count = 3
            node_ttl = "2s"
            job = "{}"
            [hypothesis]
            job_recovery_max = "1s"
            [[fault]]
            kind = "kill"
            target = "node-running-most-allocations"
            at = "2s"
            for = "6s"
            "#,
            job.display()
        ),
    )
    .unwrap();
    let work_dir = directory.path().join("work");
    let (success, stdout, stderr) =
        chaos_run(&scenario, 28312, &work_dir, &["--agent-port-base", "28360"]);
    let leftovers = processes_inside(&work_dir);
    assert!(!success, "a 1 s recovery held:\n{stdout}\n{stderr}");
    assert!(leftovers.is_empty(), "left running: {leftovers:#?}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["passed"], false);
    // It failed for the recovery, and for nothing else.
    let recovery = check(&report, "web serving 3 again after kill of node");
    assert_eq!(recovery["held"], false, "{recovery:#}");
    let failed: Vec<&serde_json::Value> = report["hypothesis"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|check| check["held"] == false)
        .collect();
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert_eq!(
        check(&report, "allocations of web wanted running at once")["held"],
        true
    );
}
