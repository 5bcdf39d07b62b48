//! Self-healing workloads with real processes on loopback: three members,
//! three agents (each running a controller; one is active), jobs registered
//! with `keel job run`.
//!
//! `controller_with_simulated_supervisors` plays the agents' supervisors
//! itself (it writes `/keel/alloc-status/<id>` as a supervisor would: a
//! placed allocation turns running and ready, a stopped one complete), so it
//! checks the controller alone: placement on distinct nodes, `keel job
//! plan` writing nothing, validation naming the field, a node killed →
//! its allocations lost after the grace and replaced on the others, the
//! node back → forgotten as down, a pause shorter than the TTL → nothing
//! moves, a drain → allocations off the node one at a time, the
//! controller's agent killed → another agent takes over, and from the
//! store's whole history of `/keel/allocs/`: never more than `count`
//! allocations wanted running, never two in one slot.

mod agent_support;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_support::{get, request, wait_until, Agents};
use common::Cluster;
use keel_client::keel_types::mvccpb::event::EventType as WatchEventType;
use keel_client::{Client, ClientConfig, WatchOptions};
use serde_json::{json, Value};

const SIMULATED_MEMBERS_PORT_BASE: u16 = 30500;
const SIMULATED_AGENTS_PORT_BASE: u16 = 30510;
/// Dynamic ports of node N: 30600 + 100 × (N - 1) …
const SIMULATED_DYNAMIC_PORTS_BASE: u16 = 30600;
const NODE_TTL_SECONDS: u64 = 3;

const SIMULATED_JOB: &str = r#"
name = "web"

[group.web]
count = 3

[group.web.disconnect]
lost_after = "2s"

[group.web.migrate]
max_parallel = 1
min_healthy_time = "1s"
healthy_deadline = "30s"

[group.web.task.server]
config = { command = "sleep", args = ["1000"] }
port.http = {}
resources = { cpu_millicores = 100, memory_mib = 64 }
"#;

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Runs `keel` with `arguments`; returns (success, stdout, stderr).
fn keel(arguments: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(arguments)
        .output()
        .expect("keel runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The allocations of `job` as `/v1/job/<job>` shows them.
fn allocations(address: &str, job: &str) -> Vec<Value> {
    get(address, &format!("/v1/job/{job}"))
        .map(|response| {
            response.json()["allocations"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .unwrap_or_default()
}

fn wanted_running(allocations: &[Value]) -> Vec<&Value> {
    allocations
        .iter()
        .filter(|allocation| allocation["desired_status"]["status"] == "run")
        .collect()
}

fn nodes_of(allocations: &[&Value]) -> BTreeMap<String, usize> {
    let mut nodes = BTreeMap::new();
    for allocation in allocations {
        *nodes
            .entry(allocation["node"].as_str().unwrap_or_default().to_string())
            .or_insert(0) += 1;
    }
    nodes
}

/// Stands in for the supervisors of the nodes in `alive`: every 100 ms,
/// placed allocations turn running and ready, stopped ones complete.
async fn simulate_supervisors(client: Client, alive: Arc<Mutex<BTreeSet<String>>>) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(desired) = client.get_prefix("/keel/allocs/").await else {
            continue;
        };
        let Ok(statuses) = client.get_prefix("/keel/alloc-status/").await else {
            continue;
        };
        let statuses: BTreeMap<String, Value> = statuses
            .kvs
            .iter()
            .filter_map(|kv| {
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                let id = key.strip_prefix("/keel/alloc-status/")?.to_string();
                Some((id, serde_json::from_slice(&kv.value).ok()?))
            })
            .collect();
        let alive = alive.lock().expect("alive lock").clone();
        for kv in desired.kvs {
            let Ok(allocation) = serde_json::from_slice::<Value>(&kv.value) else {
                continue;
            };
            let node = allocation["node"].as_str().unwrap_or_default().to_string();
            if !alive.contains(&node) {
                continue;
            }
            let id = allocation["id"].as_str().unwrap_or_default().to_string();
            let reported = statuses
                .get(&id)
                .and_then(|status| status["client"]["status"].as_str().map(str::to_string));
            let now = now_unix_ms();
            let client_state = match (
                allocation["desired_status"]["status"].as_str(),
                reported.as_deref(),
            ) {
                (Some("run"), None) => {
                    json!({"status": "running", "started_at": now, "ready_since": now})
                }
                (Some("stop"), Some("running") | Some("pending") | None) => {
                    json!({"status": "complete", "started_at": now, "finished_at": now})
                }
                _ => continue,
            };
            let status = json!({
                "alloc_id": id, "node": node, "client": client_state,
                "resource_limits": "rlimits", "tasks": {},
            });
            let _ = client
                .put(format!("/keel/alloc-status/{id}"), status.to_string())
                .await;
        }
    }
}

/// Every revision's view of `/keel/allocs/` replayed from revision 1: at
/// no revision are more than `count` allocations of `job` wanted running,
/// nor two in one slot; and no allocation id is created twice.
async fn check_allocation_history(client: &Client, job: &str, count: usize) -> usize {
    // The newest change of an allocation (none is deleted in this test:
    // fewer than the garbage collector's bound end).
    let current = client
        .get_prefix("/keel/allocs/")
        .await
        .expect("listing")
        .kvs
        .iter()
        .map(|kv| kv.mod_revision)
        .max()
        .expect("allocations exist");
    let mut watcher = client
        .watch(WatchOptions::prefix("/keel/allocs/").from_revision(1))
        .await
        .expect("watch from revision 1");
    let mut live: BTreeMap<String, Value> = BTreeMap::new();
    let mut created: BTreeSet<String> = BTreeSet::new();
    let mut revisions_checked = 0;
    let mut last_revision = 0;
    while last_revision < current {
        let response = tokio::time::timeout(Duration::from_secs(10), watcher.next())
            .await
            .expect("the history arrives")
            .expect("the watch goes on")
            .expect("no watch error");
        let mut by_revision: BTreeMap<i64, Vec<_>> = BTreeMap::new();
        for event in response.events {
            let kv = event.kv.clone().expect("an event has its key-value");
            by_revision.entry(kv.mod_revision).or_default().push(event);
        }
        for (revision, events) in by_revision {
            for event in events {
                let kv = event.kv.clone().expect("kv");
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                if event.r#type() == WatchEventType::Delete {
                    live.remove(&key);
                    continue;
                }
                if kv.create_revision == kv.mod_revision {
                    assert!(created.insert(key.clone()), "{key} created twice");
                }
                live.insert(
                    key,
                    serde_json::from_slice(&kv.value).expect("allocation JSON"),
                );
            }
            let running: Vec<&Value> = live
                .values()
                .filter(|allocation| allocation["job"] == job)
                .filter(|allocation| allocation["desired_status"]["status"] == "run")
                .collect();
            assert!(
                running.len() <= count,
                "at revision {revision}, {} allocations of {job} wanted running: {running:#?}",
                running.len()
            );
            let slots: BTreeSet<(String, u64)> = running
                .iter()
                .map(|allocation| {
                    (
                        allocation["group"].as_str().unwrap_or_default().to_string(),
                        allocation["index"].as_u64().unwrap_or_default(),
                    )
                })
                .collect();
            assert_eq!(
                slots.len(),
                running.len(),
                "two allocations in one slot at revision {revision}"
            );
            revisions_checked += 1;
            last_revision = revision;
        }
    }
    revisions_checked
}

/// The events recorded of `kind` (all sources), oldest first.
async fn events_of(client: &Client, kind: &str) -> Vec<Value> {
    client
        .get_prefix("/keel/events/")
        .await
        .expect("events")
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice::<Value>(&kv.value).ok())
        .filter(|event| event["type"] == kind)
        .collect()
}

fn controller_index(client: &Client, runtime: &tokio::runtime::Runtime) -> Option<usize> {
    let leader = runtime
        .block_on(client.election_leader("/keel/controller"))
        .ok()?;
    let name = String::from_utf8_lossy(&leader.kv?.value).into_owned();
    name.strip_prefix("node")?
        .parse::<usize>()
        .ok()
        .map(|n| n - 1)
}

#[test]
fn controller_with_simulated_supervisors() {
    let cluster = Cluster::start(3, SIMULATED_MEMBERS_PORT_BASE);
    let mut agents = Agents::new(
        3,
        SIMULATED_AGENTS_PORT_BASE,
        &cluster.endpoints(),
        &format!("{NODE_TTL_SECONDS}s"),
    );
    for index in 0..3 {
        let first = SIMULATED_DYNAMIC_PORTS_BASE + 100 * index as u16;
        agents.add_arguments(
            index,
            &["--dynamic-ports", &format!("{first}-{}", first + 99)],
        );
    }
    agents.start_all();
    let addresses: Vec<String> = agents
        .agents
        .iter()
        .map(|agent| agent.http_addr())
        .collect();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let endpoints: Vec<String> = cluster
        .members
        .iter()
        .map(|member| member.endpoint())
        .collect();
    let client = runtime
        .block_on(Client::connect(&endpoints, ClientConfig::default()))
        .expect("client");
    let alive = Arc::new(Mutex::new(BTreeSet::from([
        "node1".to_string(),
        "node2".to_string(),
        "node3".to_string(),
    ])));
    runtime.spawn(simulate_supervisors(client.clone(), alive.clone()));
    let directory = tempfile::tempdir().expect("temporary directory");
    let job_file = directory.path().join("web.toml");
    std::fs::write(&job_file, SIMULATED_JOB).expect("job file");
    let job_path = job_file.display().to_string();

    // A controller is elected.
    wait_until(Duration::from_secs(20), "a controller is elected", || {
        controller_index(&client, &runtime)
    });

    // A bad spec is refused as a whole, naming the field.
    let bad = SIMULATED_JOB.replace("memory_mib = 64", "memory_mib = 0");
    let job: Value =
        serde_json::to_value(keel_scheduler::Job::from_toml(&bad).expect("the bad job parses"))
            .expect("JSON");
    let response = request(
        &addresses[0],
        "PUT",
        "/v1/jobs",
        Some(&job.to_string()),
        Duration::from_secs(10),
    )
    .expect("agent answers");
    assert_eq!(response.status, 400, "{}", response.body);
    assert!(
        response.body.contains("resources.memory_mib"),
        "the error names the field: {}",
        response.body
    );
    let bad_file = directory.path().join("bad.toml");
    std::fs::write(&bad_file, &bad).expect("bad file");
    let (ok, _, stderr) = keel(&[
        "job",
        "run",
        &bad_file.display().to_string(),
        "--agent-addr",
        &addresses[0],
    ]);
    assert!(!ok && stderr.contains("resources.memory_mib"), "{stderr}");

    // `keel job plan` shows three placements and writes nothing.
    let (ok, stdout, stderr) = keel(&["job", "plan", &job_path, "--agent-addr", &addresses[1]]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.matches("+ place web.web[").count(), 3, "{stdout}");
    assert!(stdout.contains("nothing is written"), "{stdout}");
    let response = request(
        &addresses[1],
        "GET",
        "/v1/job/web",
        None,
        Duration::from_secs(10),
    )
    .expect("agent answers");
    assert_eq!(response.status, 404, "a plan registers nothing");

    // `keel job run`: three instances on three nodes, running.
    let (ok, stdout, stderr) = keel(&["job", "run", &job_path, "--agent-addr", &addresses[2]]);
    assert!(ok, "{stderr}\n{}", agents.logs());
    assert!(
        stdout.contains("job web registered as version 0"),
        "{stdout}"
    );
    let running = wait_until(Duration::from_secs(20), "3 instances run", || {
        let allocations = allocations(&addresses[0], "web");
        let running: Vec<Value> = allocations
            .iter()
            .filter(|allocation| {
                allocation["desired_status"]["status"] == "run"
                    && allocation["client"]["status"] == "running"
            })
            .cloned()
            .collect();
        (running.len() == 3).then_some(running)
    });
    let nodes = nodes_of(&running.iter().collect::<Vec<_>>());
    assert_eq!(nodes.len(), 3, "one instance per node: {nodes:?}");
    for allocation in &running {
        let node: u16 = allocation["node"].as_str().unwrap()[4..].parse().unwrap();
        let port = allocation["ports"]["http"].as_u64().unwrap() as u16;
        let first = SIMULATED_DYNAMIC_PORTS_BASE + 100 * (node - 1);
        assert!(
            (first..first + 100).contains(&port),
            "port {port} from node{node}'s range"
        );
    }
    let (ok, stdout, _) = keel(&["job", "status", "web", "--agent-addr", &addresses[0]]);
    assert!(ok);
    assert_eq!(stdout.matches(" running ").count(), 3, "{stdout}");

    // SIGSTOP an agent that does not run the controller for less than its
    // TTL: nothing moves.
    let controller = controller_index(&client, &runtime).expect("a controller");
    let paused = (controller + 1) % 3;
    let before: BTreeSet<String> = wanted_running(&allocations(&addresses[controller], "web"))
        .iter()
        .map(|allocation| allocation["id"].as_str().unwrap().to_string())
        .collect();
    agents.signal(paused, "STOP");
    std::thread::sleep(Duration::from_millis(NODE_TTL_SECONDS * 1000 / 2));
    agents.signal(paused, "CONT");
    std::thread::sleep(Duration::from_secs(NODE_TTL_SECONDS));
    let after: BTreeSet<String> = wanted_running(&allocations(&addresses[controller], "web"))
        .iter()
        .map(|allocation| allocation["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(before, after, "a pause shorter than the TTL moves nothing");

    // Kill -9 a node that does not run the controller: after TTL + grace
    // its allocation is lost and replaced on the others.
    let victim = (controller + 2) % 3;
    let victim_name = format!("node{}", victim + 1);
    agents.kill(victim);
    alive.lock().unwrap().remove(&victim_name);
    let killed_at = Instant::now();
    // The node's going is remembered in the store (a new controller grants
    // the same grace) while its allocation waits out the grace.
    wait_until(
        Duration::from_secs(20),
        "the node is remembered down",
        || {
            runtime
                .block_on(client.get(format!("/keel/node-down/{victim_name}")))
                .ok()?
                .map(|_| ())
        },
    );
    wait_until(
        Duration::from_secs(30),
        "the lost instance is replaced",
        || {
            let allocations = allocations(&addresses[controller], "web");
            let running = wanted_running(&allocations);
            let nodes = nodes_of(&running);
            (running.len() == 3
                && !nodes.contains_key(&victim_name)
                && running
                    .iter()
                    .all(|allocation| allocation["client"]["status"] == "running"))
            .then_some(())
        },
    );
    let replaced_after = killed_at.elapsed();
    assert!(
        replaced_after >= Duration::from_secs(2),
        "replaced after {replaced_after:?}: not before the TTL and the grace"
    );
    let lost = runtime.block_on(events_of(&client, "allocation.lost"));
    assert!(
        lost.iter()
            .any(|event| event["fields"]["node"] == victim_name.as_str()),
        "allocation.lost recorded: {lost:#?}"
    );
    // The node comes back: its old allocation stays stopped (the simulated
    // supervisor completes it); 3 stay wanted running.
    agents.start(victim);
    alive.lock().unwrap().insert(victim_name.clone());
    wait_until(
        Duration::from_secs(20),
        "the returning node's old allocation completes",
        || {
            let allocations = allocations(&addresses[controller], "web");
            allocations
                .iter()
                .filter(|allocation| allocation["node"] == victim_name.as_str())
                .all(|allocation| {
                    allocation["desired_status"]["status"] == "stop"
                        && allocation["client"]["status"] == "complete"
                })
                .then_some(())
        },
    );
    assert_eq!(
        wanted_running(&allocations(&addresses[controller], "web")).len(),
        3
    );

    // Drain a node holding allocations: they move off, one at a time.
    let allocations_now = allocations(&addresses[controller], "web");
    let nodes = nodes_of(&wanted_running(&allocations_now));
    let (drained, _) = nodes
        .iter()
        .max_by_key(|(_, count)| **count)
        .map(|(node, count)| (node.clone(), *count))
        .expect("a node with allocations");
    let (ok, stdout, stderr) = keel(&["node", "drain", &drained, "--agent-addr", &addresses[0]]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("draining"), "{stdout}");
    wait_until(Duration::from_secs(30), "the drained node is empty", || {
        let allocations = allocations(&addresses[controller], "web");
        let running = wanted_running(&allocations);
        (running.len() == 3
            && !nodes_of(&running).contains_key(&drained)
            && running
                .iter()
                .all(|allocation| allocation["client"]["status"] == "running"))
        .then_some(())
    });
    wait_until(
        Duration::from_secs(10),
        "the drain is cleared, the node ineligible",
        || {
            let controls = runtime
                .block_on(client.get(format!("/keel/node-controls/{drained}")))
                .ok()??;
            let controls: Value = serde_json::from_slice(&controls.value).ok()?;
            (controls["drain"].is_null() && controls["eligible"] == false).then_some(())
        },
    );
    let migrated: Vec<Value> = allocations(&addresses[controller], "web")
        .into_iter()
        .filter(|allocation| allocation["placement_reason"] == "migrated")
        .collect();
    let mut placed_at: Vec<u64> = migrated
        .iter()
        .map(|allocation| allocation["created_at"].as_u64().unwrap())
        .collect();
    placed_at.sort();
    for pair in placed_at.windows(2) {
        assert!(
            pair[1] - pair[0] >= 1000,
            "max_parallel = 1: each migration waits for the previous one to be healthy for 1s: {placed_at:?}"
        );
    }
    let (ok, _, stderr) = keel(&[
        "node",
        "eligibility",
        &drained,
        "--enable",
        "--agent-addr",
        &addresses[0],
    ]);
    assert!(ok, "{stderr}");

    // Kill -9 the agent running the controller: another takes over.
    let controller = controller_index(&client, &runtime).expect("a controller");
    let controller_name = format!("node{}", controller + 1);
    let elected_before = runtime
        .block_on(events_of(&client, "controller.elected"))
        .len();
    agents.kill(controller);
    alive.lock().unwrap().remove(&controller_name);
    let killed_at = Instant::now();
    let successor = wait_until(
        Duration::from_secs(20),
        "another controller is elected",
        || controller_index(&client, &runtime).filter(|index| *index != controller),
    );
    let failover = killed_at.elapsed();
    assert!(
        failover <= Duration::from_secs(NODE_TTL_SECONDS + 5),
        "failover took {failover:?}"
    );
    let survivor = addresses[successor].clone();
    wait_until(
        Duration::from_secs(30),
        "the dead controller's node's instances are replaced",
        || {
            let allocations = allocations(&survivor, "web");
            let running = wanted_running(&allocations);
            (running.len() == 3
                && !nodes_of(&running).contains_key(&controller_name)
                && running
                    .iter()
                    .all(|allocation| allocation["client"]["status"] == "running"))
            .then_some(())
        },
    );
    let elected_after = runtime
        .block_on(events_of(&client, "controller.elected"))
        .len();
    assert!(
        elected_after > elected_before,
        "controller.elected recorded"
    );

    // `keel job history` shows the version and the events.
    let (ok, stdout, _) = keel(&["job", "history", "web", "--agent-addr", &survivor]);
    assert!(ok);
    assert!(stdout.contains("allocation.lost"), "{stdout}");
    assert!(stdout.contains("allocation.placed"), "{stdout}");

    // Stop the job: every allocation stops.
    let (ok, stdout, _) = keel(&["job", "stop", "web", "--agent-addr", &survivor]);
    assert!(ok && stdout.contains("job web stopped"), "{stdout}");
    wait_until(
        Duration::from_secs(20),
        "every allocation is stopped",
        || {
            wanted_running(&allocations(&survivor, "web"))
                .is_empty()
                .then_some(())
        },
    );

    // The whole history: never more than 3 wanted running, never two in a slot.
    let revisions = runtime.block_on(check_allocation_history(&client, "web", 3));
    // Placement, replacement of the lost one, the drain, the failover, the stop.
    assert!(revisions >= 5, "{revisions} revisions checked");
}
