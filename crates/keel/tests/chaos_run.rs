//! `keel chaos run` end to end on real processes: a scenario passes with its history in
//! keel-check's format, and the fault suite's self-test — members that acknowledge
//! before fsync — fails the whole-cluster crash scenario. Ports 28300–28399.

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
