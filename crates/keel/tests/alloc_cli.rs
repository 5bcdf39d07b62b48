//! `keel alloc status|logs` against a real `keel agent` process, and the
//! agent killed with SIGKILL (a real kill -9) then started again on its data
//! directory: its task's old process group is killed, one new one runs.
//!
//! Ports 30200–30219 belong to this test.

mod agent_support;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use agent_support::{wait_until, Agents};
use common::Cluster;
use serde_json::Value;

const MEMBERS_PORT_BASE: u16 = 30200;
const AGENTS_PORT_BASE: u16 = 30210;
const ALLOC_ID: &str = "c0ffee00-0000-4000-8000-000000000001";

/// Kills, on drop, the process groups the test saw.
#[derive(Default)]
struct Reaper(Mutex<BTreeSet<u32>>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in self.0.lock().unwrap().iter() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    }
}

fn keel(arguments: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(arguments)
        .output()
        .expect("keel runs")
}

fn keel_ok(arguments: &[&str]) -> String {
    let output = keel(arguments);
    assert!(
        output.status.success(),
        "keel {arguments:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Living processes of the allocation (by `KEEL_ALLOC_ID` in their
/// environment) and their process groups.
fn processes_of(id: &str) -> BTreeMap<u32, u32> {
    let marker = format!("KEEL_ALLOC_ID={id}");
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(environment) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if !environment
            .split(|byte| *byte == 0)
            .any(|variable| variable == marker.as_bytes())
        {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        if fields.first().is_some_and(|state| *state == "Z") {
            continue;
        }
        if let Some(group) = fields.get(2).and_then(|group| group.parse().ok()) {
            found.insert(pid, group);
        }
    }
    found
}

#[test]
fn alloc_status_and_logs_and_a_kill_9_agent_started_again() {
    let reaper = Reaper::default();
    let cluster = Cluster::start(1, MEMBERS_PORT_BASE);
    let endpoints = cluster.endpoints();
    let mut agents = Agents::new(1, AGENTS_PORT_BASE, &endpoints, "5s");
    // This test writes the job and its allocation itself, as a controller
    // would; a controller of its own would evaluate the job too and could
    // stop the hand-written allocation under the test's feet.
    agents.add_arguments(0, &["--no-controller"]);
    agents.start(0);
    let agent_addr = agents.agents[0].http_addr();
    let job = r#"{"versions":[{"version":0,"stable":false,"job":{"name":"cli","group":{"g":{"task":{"main":{"config":{"command":"sh","args":["-c","sleep 300 & echo hello-cli; wait"]}}}}}}}]}"#;
    keel_ok(&[
        "kv",
        "--endpoints",
        &endpoints,
        "put",
        "/keel/jobs/cli",
        job,
    ]);
    let allocation = format!(
        r#"{{"id":"{ALLOC_ID}","job":"cli","job_version":0,"group":"g","index":0,"node":"node1","resources":{{"cpu_millicores":100,"memory_mib":300}},"ports":{{}},"placement_reason":"new","created_at":0,"desired_status":{{"status":"run"}},"client":{{"status":"pending"}}}}"#
    );
    keel_ok(&[
        "kv",
        "--endpoints",
        &endpoints,
        "put",
        &format!("/keel/allocs/node1/{ALLOC_ID}"),
        &allocation,
    ]);

    let status_json = |prefix: &str| -> Value {
        serde_json::from_str(&keel_ok(&[
            "alloc",
            "status",
            prefix,
            "-o",
            "json",
            "--agent-addr",
            &agent_addr,
        ]))
        .unwrap()
    };
    let first = wait_until(Duration::from_secs(20), "the task to run", || {
        let entry = status_json("c0ffee");
        let pid = entry["status"]["tasks"]["main"]["pid"].as_u64()?;
        (entry["client_status"] == "running").then_some(pid as u32)
    });
    reaper.0.lock().unwrap().insert(first);

    let table = keel_ok(&["alloc", "status", "--agent-addr", &agent_addr]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["ID", "JOB", "GROUP", "INDEX", "NODE", "DESIRED", "STATUS", "RESTARTS", "LIMITS"]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..8],
        [ALLOC_ID, "cli", "g", "0", "node1", "run", "running", "0"]
    );
    assert!(["rlimits", "cgroup-v2"].contains(&row[8]), "{table}");
    let detail = keel_ok(&["alloc", "status", "c0ffee", "--agent-addr", &agent_addr]);
    assert!(
        detail.contains(&format!("ID:             {ALLOC_ID}")),
        "{detail}"
    );
    assert!(detail.contains("Recent events of main:"), "{detail}");
    wait_until(Duration::from_secs(10), "the task's output", || {
        keel_ok(&["alloc", "logs", "c0ffee", "--agent-addr", &agent_addr])
            .contains("hello-cli")
            .then_some(())
    });
    let refused = keel(&[
        "alloc",
        "logs",
        ALLOC_ID,
        "--task",
        "nope",
        "--agent-addr",
        &agent_addr,
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no task \"nope\""));
    let unknown = keel(&["alloc", "status", "ffff", "--agent-addr", &agent_addr]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no allocation"));

    // kill -9 the agent: the task's group lives on (at least its `sleep`).
    agents.kill(0);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        processes_of(ALLOC_ID).values().all(|group| *group == first)
            && !processes_of(ALLOC_ID).is_empty(),
        "the killed agent's task lives on"
    );
    agents.start(0);
    let second = wait_until(
        Duration::from_secs(20),
        "the task under the new agent",
        || {
            let entry = status_json(ALLOC_ID);
            let pid = entry["status"]["tasks"]["main"]["pid"].as_u64()? as u32;
            (entry["client_status"] == "running" && pid != first).then_some(pid)
        },
    );
    reaper.0.lock().unwrap().insert(second);
    wait_until(
        Duration::from_secs(10),
        "one process group, the new one",
        || {
            let processes = processes_of(ALLOC_ID);
            (processes.len() == 2 && processes.values().all(|group| *group == second)).then_some(())
        },
    );
    let entry = status_json(ALLOC_ID);
    assert_eq!(entry["status"]["tasks"]["main"]["restarts"], 0);

    // Stopped: the group goes, the status says complete.
    let stopped = allocation.replace(
        r#""desired_status":{"status":"run"}"#,
        r#""desired_status":{"status":"stop","reason":"job_stopped"}"#,
    );
    keel_ok(&[
        "kv",
        "--endpoints",
        &endpoints,
        "put",
        &format!("/keel/allocs/node1/{ALLOC_ID}"),
        &stopped,
    ]);
    wait_until(
        Duration::from_secs(20),
        "the allocation to complete",
        || {
            let entry = status_json(ALLOC_ID);
            (entry["client_status"] == "complete" && processes_of(ALLOC_ID).is_empty())
                .then_some(())
        },
    );
}
