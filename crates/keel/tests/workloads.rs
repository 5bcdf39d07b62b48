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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_support::{get, request, wait_until, Agents};
use common::Cluster;
use keel_client::keel_types::mvccpb::event::EventType as WatchEventType;
use keel_client::{Client, ClientConfig, WatchOptions};
use serde_json::Value;

/// The tests of this file take turns: each runs six keel processes and
/// real tasks (one burns a CPU), and two cores do not carry both at once
/// within the health deadlines the tests give their jobs.
static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

const FAILURES_MEMBERS_PORT_BASE: u16 = 30500;
const FAILURES_AGENTS_PORT_BASE: u16 = 30510;
/// Dynamic ports of node N: 30600 + 100 × (N - 1) …
const FAILURES_DYNAMIC_PORTS_BASE: u16 = 30600;
const NODE_TTL_SECONDS: u64 = 3;

/// Three Python HTTP servers, ready and alive when `/` answers (liveness
/// only probed 3 s after the start, so a slow start on a loaded machine is
/// not killed); lost 2 s
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
resources = { cpu_millicores = 100, memory_mib = 256 }

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
initial_delay = "3s"
interval = "500ms"
timeout = "500ms"
failures_before_critical = 4
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

/// Waits until every agent's view has nodes node1 to node3 alive.
fn wait_for_all_alive(addresses: &[String]) {
    wait_until(
        Duration::from_secs(30),
        "every agent sees three alive nodes",
        || {
            addresses
                .iter()
                .all(|address| {
                    (1..=3).all(|index| {
                        agent_support::node_status(address, &format!("node{index}")).as_deref()
                            == Some("alive")
                    })
                })
                .then_some(())
        },
    );
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
    let _turn = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
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
    // Placement spreads a group over the nodes that are alive when it runs:
    // wait until every agent sees all three (none still suspect from start-up).
    wait_for_all_alive(&addresses);

    // A bad spec is refused as a whole, naming the field, by the API and
    // by the CLI (before sending).
    let bad = WEB_JOB.replace("memory_mib = 256", "memory_mib = 0");
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
    // What the README shows `keel job run examples/jobs/web.toml` print.
    let lines: Vec<String> = stdout
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(lines.len(), 10, "{stdout}");
    assert_eq!(lines[0], "job web registered as version 0");
    assert_eq!(lines[1], "evaluation:");
    for index in 0..3 {
        assert!(
            lines[2 + index].starts_with(&format!("+ place web.web[{index}] on node"))
                && lines[2 + index].ends_with("(new, version 0)"),
            "{stdout}"
        );
        assert!(
            lines[7 + index].contains(&format!(" web[{index}] 0 node"))
                && lines[7 + index].contains(" run "),
            "{stdout}"
        );
    }
    assert_eq!(
        lines[5],
        "3 to place, 0 to stop, 0 to update in place, 0 unplaceable"
    );
    assert_eq!(
        lines[6],
        "ID INSTANCE VERSION NODE DESIRED STATUS READY RESTARTS RESCHEDULES CREATED"
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

const TASKS_MEMBERS_PORT_BASE: u16 = 30520;
const TASKS_AGENTS_PORT_BASE: u16 = 30530;
/// Dynamic ports of node N: 30900 + 100 × (N - 1) …
const TASKS_DYNAMIC_PORTS_BASE: u16 = 30900;

/// A task that exits 1: restarted once, then failed and rescheduled with
/// exponentially growing delays (1s, 2s, 4s, …).
const CRASH_JOB: &str = r#"
name = "crash"

[group.crash]
count = 1

[group.crash.restart]
attempts = 1
interval = "1m"
delay = "300ms"
mode = "fail"

[group.crash.reschedule]
delay = "1s"
delay_function = "exponential"
max_delay = "8s"
unlimited = true

[group.crash.task.main]
config = { command = "sh", args = ["-c", "sleep 0.2; exit 1"] }
resources = { cpu_millicores = 50, memory_mib = 32 }
"#;

/// A server whose liveness endpoint fails 2 s after it starts but which
/// keeps running: its supervisor must kill and restart it.
const LIVENESS_JOB: &str = r#"
name = "stuck"

[group.stuck]
count = 1

[group.stuck.restart]
attempts = 5
interval = "1m"
delay = "300ms"
mode = "fail"

[group.stuck.task.server]
config = { command = "python3", args = ["-c", """
import http.server, os, time
start = time.time()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        alive = self.path != "/live" or time.time() - start < 2
        self.send_response(200 if alive else 500)
        self.end_headers()
    def log_message(self, *arguments):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["KEEL_PORT_http"])), Handler).serve_forever()
"""] }
port.http = {}
resources = { cpu_millicores = 50, memory_mib = 32 }

[[group.stuck.task.server.service]]
name = "stuck"
port = "http"

[[group.stuck.task.server.service.check]]
name = "alive"
kind = "liveness"
type = "http"
path = "/live"
interval = "300ms"
timeout = "300ms"
failures_before_critical = 2
"#;

/// Burns a CPU while the file named by $BURN exists, then idles; scaled
/// on its CPU use between 1 and 3 instances.
const BURN_JOB: &str = r#"
name = "burn"

[group.burn]
count = 1

[group.burn.scaling]
min = 1
max = 3
target_cpu_percent = 50
cooldown = "2s"

[group.burn.task.main]
config = { command = "python3", args = ["-c", """
import os, time
while os.path.exists(os.environ["BURN"]):
    pass
while True:
    time.sleep(1)
"""] }
env = { BURN = "BURN_FLAG" }
resources = { cpu_millicores = 100, memory_mib = 32 }
"#;

/// The web job with a rolling update that reverts a version never ready.
fn web_job_with_update(readiness_path: &str) -> String {
    WEB_JOB
        .replace(
            "[group.web.disconnect]",
            "[group.web.update]\nmax_parallel = 1\nmin_healthy_time = \"1s\"\nhealthy_deadline = \"10s\"\nauto_revert = true\n\n[group.web.disconnect]",
        )
        .replacen("path = \"/\"", &format!("path = \"{readiness_path}\""), 1)
}

/// The job's state (`JobState` JSON) as `/v1/job/<name>` shows it.
fn job_state(address: &str, job: &str) -> Value {
    get(address, &format!("/v1/job/{job}"))
        .map(|response| response.json()["job"].clone())
        .unwrap_or(Value::Null)
}

/// Polls DNS and HTTP every 100 ms: a poll where no instance listed in
/// DNS answers HTTP 200 is a gap. Stopped and read by `finish`.
struct ServingPoller {
    gaps: Arc<Mutex<Vec<String>>>,
    polls: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServingPoller {
    fn start(dns_port: u16) -> ServingPoller {
        let gaps = Arc::new(Mutex::new(Vec::new()));
        let polls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (gaps, polls, stop) = (gaps.clone(), polls.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let ports = dns_ports(dns_port);
                    let answered = ports.iter().any(|port| {
                        get(&format!("127.0.0.1:{port}"), "/")
                            .is_ok_and(|response| response.status == 200)
                    });
                    if !answered {
                        gaps.lock()
                            .expect("gaps lock")
                            .push(format!("DNS ports {ports:?}"));
                    }
                    polls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        ServingPoller {
            gaps,
            polls,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let gaps = self.gaps.lock().expect("gaps lock").clone();
        (self.polls.load(std::sync::atomic::Ordering::Relaxed), gaps)
    }
}

impl Drop for ServingPoller {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn task_failures_rolling_update_and_autoscaling() {
    let _turn = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let cluster = Cluster::start(3, TASKS_MEMBERS_PORT_BASE);
    let mut agents = Agents::new(
        3,
        TASKS_AGENTS_PORT_BASE,
        &cluster.endpoints(),
        &format!("{NODE_TTL_SECONDS}s"),
    );
    for index in 0..3 {
        let first = TASKS_DYNAMIC_PORTS_BASE + 100 * index as u16;
        agents.add_arguments(
            index,
            &["--dynamic-ports", &format!("{first}-{}", first + 99)],
        );
    }
    agents.start_all();
    let address = agents.agents[0].http_addr();
    let dns_port = agents.agents[0].dns_port;
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
    let write_job = |name: &str, text: &str| -> String {
        let path = directory.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).expect("job file");
        path.display().to_string()
    };
    let run = |path: &str| {
        let (ok, stdout, stderr) =
            keel(&["job", "run", path, "--detach", "--agent-addr", &address]);
        assert!(ok, "keel job run {path}: {stderr}");
        stdout
    };
    wait_until(Duration::from_secs(20), "a controller is elected", || {
        controller_index(&client, &runtime)
    });
    // Placement spreads a group over the nodes that are alive when it runs:
    // wait until every agent sees all three (none still suspect from start-up).
    let all_addresses: Vec<String> = agents
        .agents
        .iter()
        .map(|agent| agent.http_addr())
        .collect();
    wait_for_all_alive(&all_addresses);
    run(&write_job("crash", CRASH_JOB));
    run(&write_job("stuck", LIVENESS_JOB));
    run(&write_job("web", &web_job_with_update("/")));

    // The crashing task: restarted once per allocation, then rescheduled
    // with growing delays, visible in `keel job status` and the events.
    let chain = wait_until(
        Duration::from_secs(40),
        "three reschedules of the crashing task",
        || {
            allocations(&address, "crash")
                .into_iter()
                .find(|allocation| {
                    allocation["reschedule_events"]
                        .as_array()
                        .is_some_and(|events| events.len() >= 3)
                })
        },
    );
    let delays: Vec<String> = chain["reschedule_events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["delay"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        delays[..3],
        ["1s", "2s", "4s"],
        "exponential delays: {delays:?}"
    );
    let failed = allocations(&address, "crash");
    assert!(
        failed.iter().any(|allocation| {
            allocation["client"]["status"] == "failed"
                && allocation["status"]["tasks"]["main"]["restarts"].as_u64() >= Some(1)
        }),
        "a failed allocation was restarted first: {failed:#?}"
    );
    let (ok, stdout, _) = keel(&["job", "status", "crash", "--agent-addr", &address]);
    assert!(ok);
    assert!(stdout.contains("1s,2s,4s"), "{stdout}");
    let (ok, stdout, _) = keel(&["job", "history", "crash", "--agent-addr", &address]);
    assert!(ok);
    assert!(
        stdout.matches("allocation.rescheduled").count() >= 3,
        "{stdout}"
    );
    keel(&["job", "stop", "crash", "--agent-addr", &address]);

    // The task whose liveness fails while it keeps running: restarted in
    // place (same allocation), not rescheduled.
    let stuck = wait_until(
        Duration::from_secs(30),
        "the stuck task is restarted",
        || {
            allocations(&address, "stuck")
                .into_iter()
                .find(|allocation| {
                    allocation["status"]["tasks"]["server"]["restarts"].as_u64() >= Some(1)
                })
        },
    );
    assert_eq!(
        allocations(&address, "stuck").len(),
        1,
        "restarted, not replaced"
    );
    assert_eq!(stuck["desired_status"]["status"], "run");
    keel(&["job", "stop", "stuck", "--agent-addr", &address]);

    // A rolling update to a version that never turns ready is reverted
    // and the old version serves throughout.
    let deadline = Instant::now() + Duration::from_secs(40);
    while job_state(&address, "web")["versions"][0]["stable"] != true {
        assert!(
            Instant::now() < deadline,
            "web version 0 is not stable after 40s: deployment {}, now {}, allocations {:?}",
            job_state(&address, "web")["deployment"],
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
            allocations(&address, "web")
                .iter()
                .map(|allocation| format!(
                    "{} v{} {} created {} client {} health {}",
                    allocation["node"],
                    allocation["job_version"],
                    allocation["desired_status"],
                    allocation["created_at"],
                    allocation["client"],
                    allocation["deployment_healthy"]
                ))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for_three_serving(
        &address,
        dns_port,
        None,
        Duration::from_secs(20),
        "web serves",
    );
    let poller = ServingPoller::start(dns_port);
    let stdout = run(&write_job("web-v1", &web_job_with_update("/never-ready")));
    assert!(stdout.contains("version 1"), "{stdout}");
    wait_until(
        Duration::from_secs(40),
        "version 1 is reverted and the revert is stable",
        || {
            let state = job_state(&address, "web");
            let versions = state["versions"].as_array()?;
            let current = versions.last()?;
            (versions.len() == 3 && current["version"] == 2 && current["stable"] == true)
                .then_some(())
        },
    );
    let serving_after = wait_for_three_serving(
        &address,
        dns_port,
        None,
        Duration::from_secs(20),
        "the reverted version serves",
    );
    assert!(serving_after
        .iter()
        .all(|allocation| allocation["job_version"] != 1));
    let (polls, gaps) = poller.finish();
    assert!(polls > 20, "{polls} polls");
    assert!(
        gaps.is_empty(),
        "the old version served throughout: {gaps:?}"
    );
    let (ok, stdout, _) = keel(&["job", "history", "web", "--agent-addr", &address]);
    assert!(ok && stdout.contains("reverted to version 0"), "{stdout}");
    keel(&["job", "stop", "web", "--agent-addr", &address]);

    // Autoscaling: the burning task scales the group up to its max, and
    // back to its min once the load stops.
    let flag = directory.path().join("burn.flag");
    std::fs::write(&flag, "").expect("flag file");
    run(&write_job(
        "burn",
        &BURN_JOB.replace("BURN_FLAG", &flag.display().to_string()),
    ));
    let counts = |state: &Value| -> Vec<u64> {
        state["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|version| version["job"]["group"]["burn"]["count"].as_u64())
            .collect()
    };
    wait_until(Duration::from_secs(40), "burn scales up to 3", || {
        let running = wanted_running(&allocations(&address, "burn")).len();
        (counts(&job_state(&address, "burn")).last() == Some(&3) && running == 3).then_some(())
    });
    std::fs::remove_file(&flag).expect("the load stops");
    wait_until(Duration::from_secs(40), "burn scales down to 1", || {
        let running = wanted_running(&allocations(&address, "burn")).len();
        (counts(&job_state(&address, "burn")).last() == Some(&1) && running == 1).then_some(())
    });
    let history = counts(&job_state(&address, "burn"));
    assert!(
        history.iter().all(|count| (1..=3).contains(count)),
        "within bounds: {history:?}"
    );
    keel(&["job", "stop", "burn", "--agent-addr", &address]);
}
