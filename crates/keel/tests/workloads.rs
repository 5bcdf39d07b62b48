//! Self-healing workloads with real processes on loopback: three members,
//! three agents (each runs a supervisor and a controller; one controller is
//! active), jobs registered with `keel job run`, tasks that are real
//! `python3 -m http.server` processes with readiness and liveness checks,
//! discovery checked through the agents' DNS (`dig`).
//!
//! `node_failures_drain_and_controller_failover`: validation naming the
//! field, `keel job plan` writing nothing, 3 instances on 3 nodes passing
//! in DNS; an agent paused (SIGSTOP) for less than its TTL moves nothing;
//! an agent and its tasks killed (-9) → after TTL + grace its instance is
//! lost and replaced on the others, passing in DNS; the agent back → its
//! old allocation stays stopped, never more than 3 run; a drain moves the
//! node's allocations off one at a time; the agent running the controller
//! killed → another takes over; and from the store's whole history of
//! `/keel/allocs/` (a watch from revision 1): never more than `count`
//! allocations wanted running, never two in one slot, no id created twice.

mod agent_support;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use agent_support::{get, request, wait_until, Agents};
use common::Cluster;
use keel_client::keel_types::mvccpb::event::EventType as WatchEventType;
use keel_client::{Client, ClientConfig, WatchOptions};
use serde_json::Value;

const FAILURES_MEMBERS_PORT_BASE: u16 = 30500;
const FAILURES_AGENTS_PORT_BASE: u16 = 30510;
/// Dynamic ports of node N: 30600 + 100 × (N - 1) …
const FAILURES_DYNAMIC_PORTS_BASE: u16 = 30600;
const NODE_TTL_SECONDS: u64 = 3;

/// Three Python HTTP servers, ready and alive when `/` answers; lost 2 s
/// after their node is down; stopped by their own agent after 4 s cut off
/// from the store (at most TTL + grace, so no more than 3 ever serve).
const WEB_JOB: &str = r#"
name = "web"

[group.web]
count = 3

[group.web.restart]
attempts = 2
interval = "1m"
delay = "1s"
mode = "fail"

[group.web.disconnect]
lost_after = "2s"
stop_on_client_after = "4s"

[group.web.migrate]
max_parallel = 1
min_healthy_time = "1s"
healthy_deadline = "30s"

[group.web.task.server]
config = { command = "python3", args = ["-m", "http.server", "${KEEL_PORT_http}", "--bind", "127.0.0.1"] }
port.http = {}
resources = { cpu_millicores = 100, memory_mib = 64 }

[[group.web.task.server.service]]
name = "web"
port = "http"

[[group.web.task.server.service.check]]
name = "ready"
kind = "readiness"
type = "http"
path = "/"
interval = "300ms"
timeout = "300ms"

[[group.web.task.server.service.check]]
name = "alive"
kind = "liveness"
type = "http"
path = "/"
interval = "500ms"
timeout = "500ms"
failures_before_critical = 3
"#;

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

/// The ports `web.service.keel` has passing instances on, by SRV records
/// from agent DNS at `dns_port`.
fn dns_ports(dns_port: u16) -> BTreeSet<u16> {
    agent_support::dig(dns_port, "web.service.keel", "SRV")
        .iter()
        .filter_map(|line| line.split_whitespace().nth(2)?.parse().ok())
        .collect()
}

/// Kills (-9) the process groups of the tasks of `allocations` on `node`,
/// as their supervisor recorded them in the allocations' status.
fn kill_tasks_of(allocations: &[Value], node: &str) {
    for allocation in allocations
        .iter()
        .filter(|allocation| allocation["node"] == node)
    {
        for task in allocation["status"]["tasks"]
            .as_object()
            .into_iter()
            .flat_map(|tasks| tasks.values())
        {
            if let Some(pid) = task["pid"].as_u64() {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .status();
            }
        }
    }
}

/// Allocations wanted running that run and are ready.
fn serving(allocations: &[Value]) -> Vec<&Value> {
    allocations
        .iter()
        .filter(|allocation| {
            allocation["desired_status"]["status"] == "run"
                && allocation["client"]["status"] == "running"
                && !allocation["client"]["ready_since"].is_null()
        })
        .collect()
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

/// Waits until `web` has 3 instances serving, none on `excluded`, all
/// passing in DNS as seen by the agent at `dns_port`; returns them.
fn wait_for_three_serving(
    address: &str,
    dns_port: u16,
    excluded: Option<&str>,
    timeout: Duration,
    what: &str,
) -> Vec<Value> {
    wait_until(timeout, what, || {
        let allocations = allocations(address, "web");
        let serving: Vec<Value> = serving(&allocations).into_iter().cloned().collect();
        let nodes = nodes_of(&serving.iter().collect::<Vec<_>>());
        if serving.len() != 3 || excluded.is_some_and(|node| nodes.contains_key(node)) {
            return None;
        }
        let ports: BTreeSet<u16> = serving
            .iter()
            .filter_map(|allocation| allocation["ports"]["http"].as_u64())
            .map(|port| port as u16)
            .collect();
        (dns_ports(dns_port) == ports).then_some(serving)
    })
}

/// Kills agent `index` (-9) and the tasks it supervised.
fn kill_node(agents: &mut Agents, index: usize, address: &str) {
    let name = format!("node{}", index + 1);
    let before = allocations(address, "web");
    agents.kill(index);
    kill_tasks_of(&before, &name);
}

#[test]
fn node_failures_drain_and_controller_failover() {
    let cluster = Cluster::start(3, FAILURES_MEMBERS_PORT_BASE);
    let mut agents = Agents::new(
        3,
        FAILURES_AGENTS_PORT_BASE,
        &cluster.endpoints(),
        &format!("{NODE_TTL_SECONDS}s"),
    );
    for index in 0..3 {
        let first = FAILURES_DYNAMIC_PORTS_BASE + 100 * index as u16;
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
    let dns: Vec<u16> = agents.agents.iter().map(|agent| agent.dns_port).collect();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let endpoints: Vec<String> = cluster
        .members
        .iter()
        .map(|member| member.endpoint())
        .collect();
    let client = runtime
        .block_on(Client::connect(&endpoints, ClientConfig::default()))
        .expect("client");
    let directory = tempfile::tempdir().expect("temporary directory");
    let job_file = directory.path().join("web.toml");
    std::fs::write(&job_file, WEB_JOB).expect("job file");
    let job_path = job_file.display().to_string();

    wait_until(Duration::from_secs(20), "a controller is elected", || {
        controller_index(&client, &runtime)
    });

    // A bad spec is refused as a whole, naming the field, by the API and
    // by the CLI (before sending).
    let bad = WEB_JOB.replace("memory_mib = 64", "memory_mib = 0");
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

    // `keel job run`: three instances on three nodes, passing in DNS.
    let (ok, stdout, stderr) = keel(&["job", "run", &job_path, "--agent-addr", &addresses[2]]);
    assert!(ok, "{stderr}\n{}", agents.logs());
    assert!(
        stdout.contains("job web registered as version 0"),
        "{stdout}"
    );
    let running = wait_for_three_serving(
        &addresses[0],
        dns[0],
        None,
        Duration::from_secs(30),
        "3 instances serve and pass in DNS",
    );
    let nodes = nodes_of(&running.iter().collect::<Vec<_>>());
    assert_eq!(nodes.len(), 3, "one instance per node: {nodes:?}");
    for allocation in &running {
        let node: u16 = allocation["node"].as_str().unwrap()[4..].parse().unwrap();
        let port = allocation["ports"]["http"].as_u64().unwrap() as u16;
        let first = FAILURES_DYNAMIC_PORTS_BASE + 100 * (node - 1);
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
    let ids = |allocations: &[Value]| -> BTreeSet<String> {
        wanted_running(allocations)
            .iter()
            .map(|allocation| allocation["id"].as_str().unwrap().to_string())
            .collect()
    };
    let before = ids(&allocations(&addresses[controller], "web"));
    agents.signal(paused, "STOP");
    std::thread::sleep(Duration::from_millis(NODE_TTL_SECONDS * 1000 / 2));
    agents.signal(paused, "CONT");
    std::thread::sleep(Duration::from_secs(NODE_TTL_SECONDS));
    let after = ids(&allocations(&addresses[controller], "web"));
    assert_eq!(before, after, "a pause shorter than the TTL moves nothing");

    // Kill -9 a node (agent and tasks) that does not run the controller:
    // after TTL + grace its instance is lost and replaced on the others.
    let victim = (controller + 2) % 3;
    let victim_name = format!("node{}", victim + 1);
    let observer = controller;
    kill_node(&mut agents, victim, &addresses[observer]);
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
    wait_for_three_serving(
        &addresses[observer],
        dns[observer],
        Some(&victim_name),
        Duration::from_secs(30),
        "the lost instance is replaced and passes in DNS",
    );
    let replaced_after = killed_at.elapsed();
    assert!(
        replaced_after >= Duration::from_secs(NODE_TTL_SECONDS),
        "replaced after {replaced_after:?}: not before the TTL and the grace"
    );
    let lost = runtime.block_on(events_of(&client, "allocation.lost"));
    assert!(
        lost.iter()
            .any(|event| event["fields"]["node"] == victim_name.as_str()),
        "allocation.lost recorded: {lost:#?}"
    );

    // The node comes back: its old allocation is stopped for good, and
    // never more than 3 instances run.
    agents.start(victim);
    let back_at = Instant::now();
    wait_until(
        Duration::from_secs(20),
        "the returning node's old allocation is complete",
        || {
            let allocations = allocations(&addresses[observer], "web");
            let old: Vec<&Value> = allocations
                .iter()
                .filter(|allocation| allocation["node"] == victim_name.as_str())
                .collect();
            (!old.is_empty()
                && old.iter().all(|allocation| {
                    allocation["desired_status"]["status"] == "stop"
                        && allocation["client"]["status"] == "complete"
                }))
            .then_some(())
        },
    );
    while back_at.elapsed() < Duration::from_secs(2) {
        let allocations = allocations(&addresses[observer], "web");
        let running = allocations
            .iter()
            .filter(|allocation| allocation["client"]["status"] == "running")
            .count();
        assert!(running <= 3, "{running} running: {allocations:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(dns_ports(dns[observer]).len(), 3);

    // Drain the node holding the most allocations: they move off, one at a
    // time (max_parallel = 1 after 1 s healthy), and it turns ineligible.
    let allocations_now = allocations(&addresses[observer], "web");
    let nodes = nodes_of(&wanted_running(&allocations_now));
    let drained = nodes
        .iter()
        .max_by_key(|(_, count)| **count)
        .map(|(node, _)| node.clone())
        .expect("a node with allocations");
    let (ok, stdout, stderr) = keel(&["node", "drain", &drained, "--agent-addr", &addresses[0]]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("draining"), "{stdout}");
    wait_for_three_serving(
        &addresses[observer],
        dns[observer],
        Some(&drained),
        Duration::from_secs(30),
        "the drained node's instances serve elsewhere",
    );
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
    let mut migrated_at: Vec<u64> = allocations(&addresses[observer], "web")
        .iter()
        .filter(|allocation| allocation["placement_reason"] == "migrated")
        .map(|allocation| allocation["created_at"].as_u64().unwrap())
        .collect();
    migrated_at.sort();
    assert!(!migrated_at.is_empty(), "something migrated");
    for pair in migrated_at.windows(2) {
        assert!(
            pair[1] - pair[0] >= 1000,
            "max_parallel = 1: each migration waits for the previous one to be healthy for 1s: {migrated_at:?}"
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

    // Kill -9 the node running the controller: another agent takes over
    // and replaces its instances.
    let controller = controller_index(&client, &runtime).expect("a controller");
    let controller_name = format!("node{}", controller + 1);
    let elected_before = runtime
        .block_on(events_of(&client, "controller.elected"))
        .len();
    let survivor = (controller + 1) % 3;
    kill_node(&mut agents, controller, &addresses[survivor]);
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
    wait_for_three_serving(
        &addresses[successor],
        dns[successor],
        Some(&controller_name),
        Duration::from_secs(30),
        "the dead controller's node's instances are replaced",
    );
    let elected_after = runtime
        .block_on(events_of(&client, "controller.elected"))
        .len();
    assert!(
        elected_after > elected_before,
        "controller.elected recorded"
    );

    // `keel job history` shows the version and the events.
    let (ok, stdout, _) = keel(&[
        "job",
        "history",
        "web",
        "--agent-addr",
        &addresses[successor],
    ]);
    assert!(ok);
    assert!(stdout.contains("allocation.lost"), "{stdout}");
    assert!(stdout.contains("allocation.placed"), "{stdout}");

    // Stop the job: every allocation stops, DNS empties.
    let (ok, stdout, _) = keel(&["job", "stop", "web", "--agent-addr", &addresses[successor]]);
    assert!(ok && stdout.contains("job web stopped"), "{stdout}");
    wait_until(
        Duration::from_secs(20),
        "every allocation is stopped",
        || {
            wanted_running(&allocations(&addresses[successor], "web"))
                .is_empty()
                .then_some(())
        },
    );
    wait_until(Duration::from_secs(20), "DNS has no web instance", || {
        dns_ports(dns[successor]).is_empty().then_some(())
    });

    // The whole history: never more than 3 wanted running, never two in a
    // slot, no allocation created twice.
    let revisions = runtime.block_on(check_allocation_history(&client, "web", 3));
    // Placement, the lost one's replacement, the drain, the failover, the stop.
    assert!(revisions >= 5, "{revisions} revisions checked");
}
