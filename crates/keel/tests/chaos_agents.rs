//! `keel chaos` against agents (`keel agent --enable-chaos`), and who may
//! inject at all: an agent paused for two seconds stops answering and
//! answers again by itself, with both the fault and its end in the events
//! log; an agent killed dies of SIGKILL and restarts by itself after
//! `--for`, registering its node again; an agent without `--enable-chaos`,
//! a member fault aimed at an agent and an unknown name are refused with a
//! message naming the problem. Then, in two network namespaces this test
//! creates (a member and an agent in one, the caller in the other), a
//! caller outside the loopback interface is refused without the token or
//! with a wrong one, and served with the right one.

mod agent_support;
mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use agent_support::{get, wait_until, Agents};
use common::Cluster;

const MEMBERS_PORT_BASE: u16 = 32000;
const AGENTS_PORT_BASE: u16 = 32010;
const REMOTE_CLIENT_PORT: u16 = 32100;
const REMOTE_PEER_PORT: u16 = 32101;
const REMOTE_AGENT_PORT: u16 = 32110;
const TOKEN: &str = "correct-horse-battery-staple";

fn keel(arguments: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(arguments)
        .env_remove("KEEL_CHAOS_TOKEN_FILE")
        .output()
        .expect("keel runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The events of the log, as (type, subject, message).
fn events(cluster: &Cluster) -> Vec<(String, String, String)> {
    cluster
        .etcdctl(&["get", "/keel/events/", "--prefix", "--print-value-only"])
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .map(|event| {
            (
                event["type"].as_str().unwrap_or_default().to_owned(),
                event["subject"].as_str().unwrap_or_default().to_owned(),
                event["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The lease of a node's registration, `/keel/nodes/<node>` (each agent
/// process registers under a lease of its own).
fn node_lease(cluster: &Cluster, node: &str) -> Option<i64> {
    let output = cluster.etcdctl(&["get", &format!("/keel/nodes/{node}"), "-w", "json"]);
    let answer: serde_json::Value = serde_json::from_str(&output).ok()?;
    answer["kvs"][0]["lease"]
        .as_i64()
        .filter(|&lease| lease != 0)
}

/// A job of one long-sleeping task pinned to node1, in the agents' directory.
fn directory_job(agents: &Agents) -> std::path::PathBuf {
    let path = agents.directory.path().join("sleeper.toml");
    std::fs::write(
        &path,
        r#"name = "sleeper"
type = "service"

[group.sleeper]
count = 1

[[group.sleeper.constraint]]
attribute = "${node.unique.name}"
operator = "="
value = "node1"

[group.sleeper.restart]
attempts = 5
interval = "1m"
delay = "100ms"
mode = "fail"

[group.sleeper.task.sleeper]
driver = "exec"
config = { command = "sleep", args = ["600"] }
resources = { cpu_millicores = 50, memory_mib = 32 }
"#,
    )
    .expect("job file");
    path
}

/// `keel alloc status -o json` through the agent.
fn alloc_status(agent: &str) -> Option<serde_json::Value> {
    let output = keel(&["alloc", "status", "-o", "json", "--agent-addr", agent]);
    serde_json::from_slice(&output.stdout).ok()
}

/// The pid of the allocation's running task, from its status.
fn task_pid(agent: &str, allocation: &str) -> Option<u32> {
    let output = keel(&[
        "alloc",
        "status",
        allocation,
        "-o",
        "json",
        "--agent-addr",
        agent,
    ]);
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    let task = &status["status"]["tasks"]["sleeper"];
    (task["state"] == "running")
        .then(|| task["pid"].as_u64())?
        .map(|pid| pid as u32)
}

/// The state letter of `/proc/<pid>/stat` (`T` when stopped by a signal).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

#[test]
fn agents_are_paused_and_killed_on_request_and_refuse_what_they_cannot_do() {
    let cluster = Cluster::start_with(
        1,
        MEMBERS_PORT_BASE,
        &["--experimental-enable-fault-injection"],
    );
    let endpoints = cluster.endpoints();
    let mut agents = Agents::new(2, AGENTS_PORT_BASE, &cluster.members[0].url(), "4s");
    agents.agents[0].arguments.push("--enable-chaos".into());
    for agent in &mut agents.agents {
        // The job's ports, if it had any, would come from this test's range.
        agent
            .arguments
            .extend(["--dynamic-ports".into(), "32400-32449".into()]);
    }
    agents.start_all();
    let chaotic = agents.agents[0].http_addr();
    wait_until(Duration::from_secs(20), "both nodes registered", || {
        let listing = cluster.etcdctl(&["get", "/keel/nodes/", "--prefix", "--keys-only"]);
        (listing.contains("node1") && listing.contains("node2")).then_some(())
    });

    // A pause: the agent stops answering, then answers again by itself.
    let output = keel(&[
        "chaos",
        "inject",
        "pause",
        "--target",
        "node1",
        "--for",
        "2s",
        "--endpoints",
        &endpoints,
    ]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("node1 (node1): fault 1 injected"),
        "{}",
        text(&output)
    );
    let pid = agents.agents[0].pid();
    wait_until(
        Duration::from_secs(5),
        "the agent is stopped (SIGSTOP)",
        || (process_state(pid) == Some('T')).then_some(()),
    );
    let answer = agent_support::request(
        &chaotic,
        "GET",
        "/v1/agent/self",
        None,
        Duration::from_millis(500),
    );
    assert!(answer.is_err(), "a stopped agent answered");
    wait_until(Duration::from_secs(15), "the agent answers again", || {
        get(&chaotic, "/v1/agent/self").ok()
    });
    wait_until(
        Duration::from_secs(10),
        "the pause and its end in the events log",
        || {
            let events = events(&cluster);
            let injected = events.iter().any(|(kind, subject, message)| {
                kind == "fault.injected"
                    && subject == "node1"
                    && message.contains("pause the agent")
            });
            let healed = events.iter().any(|(kind, subject, message)| {
                kind == "fault.healed" && subject == "node1" && message.starts_with("expired")
            });
            (injected && healed).then_some(())
        },
    );

    // Refusals, each naming what is wrong.
    let output = keel(&[
        "chaos",
        "inject",
        "pause",
        "--target",
        "node2",
        "--for",
        "1s",
        "--endpoints",
        &endpoints,
    ]);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("--enable-chaos"),
        "{}",
        text(&output)
    );
    let output = keel(&[
        "chaos",
        "inject",
        "partition",
        "--target",
        "node1",
        "--for",
        "1s",
        "--endpoints",
        &endpoints,
    ]);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("only kill and pause apply to agents and tasks"),
        "{}",
        text(&output)
    );
    let output = keel(&[
        "chaos",
        "inject",
        "kill",
        "--target",
        "nobody",
        "--for",
        "1s",
        "--endpoints",
        &endpoints,
    ]);
    assert!(!output.status.success());
    let message = text(&output);
    assert!(
        message.contains("\"nobody\"") && message.contains("node1, node2"),
        "{message}"
    );
    let response = agent_support::request(
        &chaotic,
        "POST",
        "/v1/chaos/inject",
        Some(r#"{"kind":"pause","target":"agent","duration_milliseconds":0}"#),
        Duration::from_secs(5),
    )
    .expect("the agent answers");
    assert_eq!(response.status, 400, "{}", response.body);
    assert!(
        response.body.contains("duration_milliseconds"),
        "{}",
        response.body
    );

    // A member fault through the same command lands in the events log too.
    let member = cluster.members[0].name.clone();
    let output = keel(&[
        "chaos",
        "inject",
        "clock",
        "--rate",
        "0.5",
        "--target",
        &member,
        "--for",
        "1s",
        "--endpoints",
        &endpoints,
    ]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        events(&cluster)
            .iter()
            .any(|(kind, subject, _)| kind == "fault.injected" && *subject == member),
        "{:?}",
        events(&cluster)
    );

    // Faults on a supervised task, carried out by the agent of its node: a
    // pause stops the task's process group for a while, a kill makes the
    // supervisor restart it by its restart block.
    let job = directory_job(&agents);
    let output = keel(&[
        "job",
        "run",
        job.to_str().expect("UTF-8"),
        "--agent-addr",
        &chaotic,
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let (allocation, pid) = wait_until(Duration::from_secs(30), "the task runs on node1", || {
        let status = alloc_status(&chaotic)?;
        let allocation = status.as_array()?.iter().find(|allocation| {
            allocation["node"] == "node1" && allocation["client_status"] == "running"
        })?;
        let id = allocation["id"].as_str()?.to_owned();
        let pid = task_pid(&chaotic, &id)?;
        Some((id, pid))
    });
    let target = format!("{allocation}/sleeper");
    let output = keel(&[
        "chaos",
        "inject",
        "pause",
        "--target",
        &target,
        "--for",
        "2s",
        "--endpoints",
        &endpoints,
    ]);
    assert!(output.status.success(), "{}", text(&output));
    wait_until(Duration::from_secs(5), "the task is stopped", || {
        (process_state(pid) == Some('T')).then_some(())
    });
    wait_until(Duration::from_secs(10), "the task runs again", || {
        matches!(process_state(pid), Some('S' | 'R')).then_some(())
    });
    let output = keel(&[
        "chaos",
        "inject",
        "kill",
        "--target",
        &target,
        "--for",
        "1s",
        "--endpoints",
        &endpoints,
    ]);
    assert!(output.status.success(), "{}", text(&output));
    wait_until(
        Duration::from_secs(30),
        "the supervisor restarted the killed task",
        || {
            let restarted = task_pid(&chaotic, &allocation)?;
            (restarted != pid).then_some(())
        },
    );
    assert!(
        events(&cluster)
            .iter()
            .any(|(kind, subject, _)| kind == "fault.injected" && *subject == target),
        "{:?}",
        events(&cluster)
    );

    // A kill: the agent dies of SIGKILL, and runs again after --for by
    // itself: its API answers, its node is registered and alive again.
    let old_pid = agents.agents[0].pid();
    let old_lease = node_lease(&cluster, "node1").expect("node1 is registered");
    let killed_at = std::time::Instant::now();
    let output = keel(&[
        "chaos",
        "inject",
        "kill",
        "--target",
        "node1",
        "--for",
        "2s",
        "--endpoints",
        &endpoints,
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let process = agents.agents[0].process.as_mut().expect("agent runs");
    let status = wait_until(Duration::from_secs(10), "the killed agent exits", || {
        process.try_wait().expect("waitable")
    });
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "{status:?}");
    // No child of this test from here: the agents' drop finds the restarted
    // agent by its data directory and kills it by pid.
    agents.agents[0].process = None;
    wait_until(
        Duration::from_secs(20),
        "the killed agent answers again",
        || get(&chaotic, "/v1/agent/self").ok(),
    );
    assert!(
        killed_at.elapsed() >= Duration::from_millis(1_800),
        "answered again {:?} after a kill restarting after 2 s",
        killed_at.elapsed()
    );
    let restarted = common::processes_naming(&agents.agents[0].data_dir);
    assert_eq!(restarted.len(), 1, "one agent process: {restarted:?}");
    assert_ne!(restarted[0], old_pid);
    assert!(
        agents.agents[0].log().contains(&format!(
            "keel chaos: restarting the killed process as pid {}",
            restarted[0]
        )),
        "{}",
        agents.agents[0].log()
    );
    wait_until(
        Duration::from_secs(20),
        "node1 is registered again (a new lease) and alive",
        || {
            let registered = node_lease(&cluster, "node1").is_some_and(|lease| lease != old_lease);
            let alive = agent_support::node_status(&agents.agents[1].http_addr(), "node1")
                .as_deref()
                == Some("alive");
            (registered && alive).then_some(())
        },
    );
    assert!(
        events(&cluster)
            .iter()
            .any(|(kind, subject, message)| kind == "fault.injected"
                && subject == "node1"
                && message.contains("restarted after 2.0 s")),
        "{:?}",
        events(&cluster)
    );
    let data_dir = agents.agents[0].data_dir.clone();
    drop(agents);
    wait_until(
        Duration::from_secs(10),
        "the restarted agent is gone",
        || common::processes_naming(&data_dir).is_empty().then_some(()),
    );
}

/// A network namespace this test creates, deleted (with what runs in it) on drop.
struct Namespace(String);

impl Namespace {
    fn create(name: String) -> Namespace {
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Namespace(name)
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.0, program]);
        command
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(arguments: &[&str]) {
    let output = Command::new("ip")
        .args(arguments)
        .output()
        .expect("ip runs");
    assert!(
        output.status.success(),
        "ip {}: {} (this test needs root, as CI has, to create network namespaces)",
        arguments.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Processes killed by PID on drop.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_logged(mut command: Command, log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log file");
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("process starts")
}

#[test]
fn callers_outside_loopback_need_the_token() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let token_file = directory.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token file");
    let wrong_token_file = directory.path().join("wrong-token");
    std::fs::write(&wrong_token_file, "not-the-token-at-all").expect("token file");
    let short_token_file = directory.path().join("short-token");
    std::fs::write(&short_token_file, "short").expect("token file");

    // Two namespaces joined by a veth pair: the cluster side and the caller.
    let suffix = std::process::id() % 100_000;
    let cluster_side = Namespace::create(format!("keel-chaos-a{suffix}"));
    let caller_side = Namespace::create(format!("keel-chaos-b{suffix}"));
    let (cluster_link, caller_link) = (format!("kca{suffix}"), format!("kcb{suffix}"));
    ip(&[
        "link",
        "add",
        &cluster_link,
        "netns",
        &cluster_side.0,
        "type",
        "veth",
        "peer",
        "name",
        &caller_link,
        "netns",
        &caller_side.0,
    ]);
    ip(&[
        "-n",
        &cluster_side.0,
        "addr",
        "add",
        "10.213.7.1/24",
        "dev",
        &cluster_link,
    ]);
    ip(&[
        "-n",
        &caller_side.0,
        "addr",
        "add",
        "10.213.7.2/24",
        "dev",
        &caller_link,
    ]);
    ip(&["-n", &cluster_side.0, "link", "set", &cluster_link, "up"]);
    ip(&["-n", &caller_side.0, "link", "set", &caller_link, "up"]);

    let keel_binary = env!("CARGO_BIN_EXE_keel");
    let client_url = format!("http://10.213.7.1:{REMOTE_CLIENT_PORT}");
    let peer_url = format!("http://10.213.7.1:{REMOTE_PEER_PORT}");
    let mut processes = Processes(Vec::new());

    // A member that must refuse to start with a guessable token.
    let output = cluster_side
        .command(keel_binary)
        .args(["server", "--name", "remote1", "--data-dir"])
        .arg(directory.path().join("refused"))
        .args([
            "--experimental-enable-fault-injection",
            "--experimental-fault-injection-token-file",
        ])
        .arg(&short_token_file)
        .output()
        .expect("keel runs");
    assert!(!output.status.success());
    assert!(
        text(&output).contains("at least 16 characters"),
        "{}",
        text(&output)
    );

    let mut member = cluster_side.command(keel_binary);
    member
        .args(["server", "--name", "remote1", "--data-dir"])
        .arg(directory.path().join("remote1"))
        .args([
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("remote1={peer_url}")])
        .args([
            "--experimental-enable-fault-injection",
            "--experimental-fault-injection-token-file",
        ])
        .arg(&token_file);
    processes
        .0
        .push(spawn_logged(member, &directory.path().join("member.log")));

    let caller = |arguments: &[&str]| -> Output {
        caller_side
            .command(keel_binary)
            .args(arguments)
            .env_remove("KEEL_CHAOS_TOKEN_FILE")
            .output()
            .expect("keel runs")
    };
    wait_until(
        Duration::from_secs(30),
        "the member answers the other namespace",
        || {
            caller(&["kv", "put", "ready", "yes", "--endpoints", &client_url])
                .status
                .success()
                .then_some(())
        },
    );

    let agent_address = format!("10.213.7.1:{REMOTE_AGENT_PORT}");
    let mut agent = cluster_side.command(keel_binary);
    agent
        .args([
            "agent",
            "--name",
            "remote-node",
            "--endpoints",
            &client_url,
            "--data-dir",
        ])
        .arg(directory.path().join("agent"))
        .args(["--http-addr", &agent_address])
        .args([
            "--dns-addr",
            &format!("10.213.7.1:{}", REMOTE_AGENT_PORT + 1),
        ])
        .args([
            "--gossip-addr",
            &format!("10.213.7.1:{}", REMOTE_AGENT_PORT + 2),
        ])
        .args(["--enable-chaos", "--chaos-token-file"])
        .arg(&token_file);
    processes
        .0
        .push(spawn_logged(agent, &directory.path().join("agent.log")));
    wait_until(
        Duration::from_secs(30),
        "the agent registered its node",
        || {
            let output = caller(&[
                "kv",
                "get",
                "/keel/nodes/remote-node",
                "--endpoints",
                &client_url,
            ]);
            String::from_utf8_lossy(&output.stdout)
                .contains("remote-node")
                .then_some(())
        },
    );

    let token = token_file.display().to_string();
    let wrong_token = wrong_token_file.display().to_string();

    // The member: refused without a token and with a wrong one, served with it.
    let output = caller(&[
        "chaos",
        "list",
        "--target",
        "remote1",
        "--endpoints",
        &client_url,
    ]);
    assert!(!output.status.success());
    assert!(text(&output).contains("Bearer"), "{}", text(&output));
    let output = caller(&[
        "chaos",
        "list",
        "--target",
        "remote1",
        "--token-file",
        &wrong_token,
        "--endpoints",
        &client_url,
    ]);
    assert!(!output.status.success());
    assert!(text(&output).contains("is wrong"), "{}", text(&output));
    let output = caller(&[
        "chaos",
        "inject",
        "clock",
        "--rate",
        "0.5",
        "--target",
        "remote1",
        "--for",
        "1s",
        "--token-file",
        &token,
        "--endpoints",
        &client_url,
    ]);
    assert!(output.status.success(), "{}", text(&output));

    // The agent: the same.
    let output = caller(&[
        "chaos",
        "inject",
        "pause",
        "--target",
        "remote-node",
        "--for",
        "1s",
        "--endpoints",
        &client_url,
    ]);
    assert!(!output.status.success());
    assert!(text(&output).contains("Bearer"), "{}", text(&output));
    let output = caller(&[
        "chaos",
        "inject",
        "pause",
        "--target",
        "remote-node",
        "--for",
        "1s",
        "--token-file",
        &wrong_token,
        "--endpoints",
        &client_url,
    ]);
    assert!(!output.status.success());
    assert!(text(&output).contains("is wrong"), "{}", text(&output));
    let output = caller(&[
        "chaos",
        "inject",
        "pause",
        "--target",
        "remote-node",
        "--for",
        "1s",
        "--token-file",
        &token,
        "--endpoints",
        &client_url,
    ]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("fault 1 injected"),
        "{}",
        text(&output)
    );
}
