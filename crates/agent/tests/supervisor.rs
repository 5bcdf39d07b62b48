//! The supervisor with real processes: a real keel member (in this test
//! process) and a real agent; jobs and allocations are written straight into
//! the store, as the controller would, and the tests watch the tasks' real
//! processes (`/proc`), their log files, the statuses the agent writes and
//! its HTTP API.
//!
//! Ports 30000–30499 belong to these tests; each test has its own block of
//! 20 (member client, member peer, agent HTTP/DNS/gossip, a second agent's,
//! task ports from `base + 10`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use keel_agent::agent::{Agent, AgentConfig};
use keel_agent::supervisor::status::AllocationStatus;
use keel_client::{Client, ClientConfig};
use keel_scheduler::{
    Allocation, AllocationId, ClientState, ClientStatus, DesiredStatus, Job, JobState,
    PlacementReason, StopReason, Time,
};
use keel_server::{Server, ServerConfig};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const NODE: &str = "node1";

/// Kills, on drop, every process group a test saw (a failed test leaves
/// nothing running).
#[derive(Default)]
struct Reaper(Mutex<BTreeSet<u32>>);

impl Reaper {
    fn watch(&self, pid: u32) {
        self.0.lock().unwrap().insert(pid);
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in self.0.lock().unwrap().iter() {
            let _ = killpg(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
    }
}

struct Fixture {
    base: u16,
    directory: tempfile::TempDir,
    client: Client,
    _member: Server,
    reaper: Reaper,
}

impl Fixture {
    /// Starts a one-member keel cluster on `base` and `base + 1`.
    async fn start(base: u16) -> Fixture {
        let directory = tempfile::tempdir().unwrap();
        let client_addr = SocketAddr::from(([127, 0, 0, 1], base));
        let peer_addr = SocketAddr::from(([127, 0, 0, 1], base + 1));
        let config = ServerConfig::single(
            "member1",
            directory.path().join("member"),
            client_addr,
            peer_addr,
        );
        let member = Server::start(config).await.expect("the member starts");
        let client = Client::connect([format!("http://{client_addr}")], ClientConfig::default())
            .await
            .expect("client");
        let deadline = Instant::now() + Duration::from_secs(20);
        while client.put("/test/ready", "yes").await.is_err() {
            assert!(Instant::now() < deadline, "the member never took a write");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Fixture {
            base,
            directory,
            client,
            _member: member,
            reaper: Reaper::default(),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.directory.path().join(NODE)
    }

    /// Starts the agent `node1`; `slot` 0 or 1 picks its ports (a restarted
    /// agent takes fresh ones: the dropped agent's sockets close lazily).
    async fn agent(&self, slot: u16) -> Agent {
        self.agent_through(slot, self.base).await
    }

    /// Starts the agent talking to the member at `member_port` (the member,
    /// or a proxy in front of it).
    async fn agent_through(&self, slot: u16, member_port: u16) -> Agent {
        self.agent_with(NODE, slot, member_port).await
    }

    async fn agent_with(&self, name: &str, slot: u16, member_port: u16) -> Agent {
        let http = self.base + 2 + 3 * slot;
        let config = AgentConfig {
            name: name.into(),
            endpoints: vec![format!("http://127.0.0.1:{member_port}")],
            data_dir: self.directory.path().join(name),
            http_addr: SocketAddr::from(([127, 0, 0, 1], http)),
            dns_addr: SocketAddr::from(([127, 0, 0, 1], http + 1)),
            gossip_addr: SocketAddr::from(([127, 0, 0, 1], http + 2)),
            join: Vec::new(),
            labels: BTreeMap::new(),
            node_ttl: Duration::from_secs(5),
            config_dir: None,
            dns_domain: "keel".into(),
            dynamic_ports: keel_scheduler::PortRange {
                first: 20000,
                last: 32000,
            },
            // These tests write allocations themselves; a controller would
            // evaluate their jobs too.
            controller: false,
        };
        Agent::start(config).await.expect("the agent starts")
    }

    async fn put_job(&self, toml: &str) -> Job {
        let job = Job::from_toml_validated(toml).expect("a valid job");
        let state = JobState::new(job.clone());
        self.client
            .put(
                format!("/keel/jobs/{}", job.name),
                serde_json::to_vec(&state).unwrap(),
            )
            .await
            .unwrap();
        job
    }

    async fn put_allocation(&self, allocation: &Allocation) {
        self.client
            .put(
                format!("/keel/allocs/{}/{}", allocation.node, allocation.id),
                serde_json::to_vec(allocation).unwrap(),
            )
            .await
            .unwrap();
    }

    async fn status(&self, id: &str) -> Option<AllocationStatus> {
        let kv = self
            .client
            .get(format!("/keel/alloc-status/{id}"))
            .await
            .ok()??;
        Some(AllocationStatus::from_json(&kv.value).expect("a status decodes"))
    }

    /// Waits (bounded) for the allocation's status to satisfy `condition`.
    async fn status_until(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        condition: impl Fn(&AllocationStatus) -> bool,
    ) -> AllocationStatus {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Some(status) = self.status(id).await {
                for task in status.tasks.values() {
                    if let Some(pid) = task.pid {
                        self.reaper.watch(pid);
                    }
                }
                if condition(&status) {
                    return status;
                }
                last = Some(status);
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status: {last:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn allocation(id: &str, job: &str, ports: &[(&str, u16)]) -> Allocation {
    Allocation {
        id: AllocationId(id.into()),
        job: job.into(),
        job_version: 0,
        group: "g".into(),
        index: 0,
        node: NODE.into(),
        resources: keel_scheduler::Resources::default(),
        ports: ports
            .iter()
            .map(|(label, port)| (label.to_string(), *port))
            .collect(),
        placement_reason: PlacementReason::New,
        previous_allocation: None,
        reschedule_events: Vec::new(),
        created_at: Time(0),
        desired_status: DesiredStatus::Run,
        deployment_healthy: None,
        client: ClientState::PENDING,
    }
}

/// A process that exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
            !state.is_some_and(|rest| rest.starts_with('Z') || rest.starts_with('X'))
        }
        Err(_) => false,
    }
}

/// Living processes started for allocation `id` (by `KEEL_ALLOC_ID` in
/// their environment), with their process group.
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
        let matches = environment
            .split(|byte| *byte == 0)
            .any(|variable| variable == marker.as_bytes());
        if !matches || !alive(pid) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // After the command: state, ppid, pgrp.
        if let Some(group) = fields.get(2).and_then(|group| group.parse().ok()) {
            found.insert(pid, group);
        }
    }
    found
}

async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GETs `path` from the agent; status and body.
async fn http_get(agent: &Agent, path: &str) -> (u16, String) {
    let client = keel_agent::probe::http_client();
    let request = hyper::Request::get(format!("http://{}{path}", agent.http_addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("the agent answers in time")
        .expect("the agent answers");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Waits (bounded) until the agent's API shows what the condition wants.
async fn http_until(
    agent: &Agent,
    path: &str,
    what: &str,
    condition: impl Fn(u16, &str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = http_get(agent, path).await;
        if condition(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} at {path}; last answer {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn log_file(fixture: &Fixture, id: &str, name: &str) -> PathBuf {
    fixture.data_dir().join("allocs").join(id).join(name)
}

async fn events_of(client: &Client, subject: &str) -> Vec<String> {
    let listing = client.get_prefix("/keel/events/").await.unwrap();
    listing
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice::<Value>(&kv.value).ok())
        .filter(|event| event["subject"] == subject)
        .map(|event| event["type"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_runs_logs_is_limited_and_stops_with_its_whole_process_group() {
    let fixture = Fixture::start(30000).await;
    let agent = fixture.agent(0).await;
    fixture
        .put_job(
            r#"
name = "one"
[group.g]
[group.g.restart]
attempts = 1
interval = "1m"
delay = "100ms"
[group.g.task.main]
# Ignores SIGTERM (and so does its background child): only the SIGKILL
# after the kill timeout stops them.
config = { command = "sh", args = ["-c", "trap '' TERM; sleep 300 & echo child=$!; echo hello-from-task; echo oops >&2; i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.2; done"] }
resources = { cpu_millicores = 200, memory_mib = 256 }
"#,
        )
        .await;
    let id = "a0000000-0000-4000-8000-000000000001";
    fixture.put_allocation(&allocation(id, "one", &[])).await;

    let status = fixture
        .status_until(id, "the task to run", Duration::from_secs(20), |status| {
            status.client.status == ClientStatus::Running
        })
        .await;
    let task = &status.tasks["main"];
    let pid = task.pid.expect("a running task has a pid");
    assert!(alive(pid), "pid {pid} runs");
    assert_eq!(status.node, NODE);
    assert!(status.client.started_at.is_some());
    // No readiness checks: ready as soon as it runs.
    let status = fixture
        .status_until(id, "ready_since", Duration::from_secs(10), |status| {
            status.client.ready_since.is_some()
        })
        .await;

    // Its output, in the files and through the API.
    wait_until("stdout in the log file", Duration::from_secs(10), || {
        std::fs::read_to_string(log_file(&fixture, id, "main.stdout"))
            .is_ok_and(|text| text.contains("hello-from-task"))
    })
    .await;
    let stdout = http_until(
        &agent,
        &format!("/v1/allocation/{id}/logs?task=main"),
        "the stdout",
        |code, body| code == 200 && body.contains("hello-from-task"),
    )
    .await;
    let child: u32 = stdout
        .lines()
        .find_map(|line| line.strip_prefix("child="))
        .expect("the task printed its child's pid")
        .parse()
        .unwrap();
    fixture.reaper.watch(child);
    assert!(alive(child));
    let (code, stderr) = http_get(&agent, &format!("/v1/allocation/{id}/logs?type=stderr")).await;
    assert_eq!(code, 200);
    assert!(stderr.contains("oops"), "{stderr}");
    let (code, body) = http_get(&agent, &format!("/v1/allocation/{id}/logs?task=nope")).await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("nope"), "{body}");
    let (code, body) = http_get(&agent, &format!("/v1/allocation/{id}/logs?type=stdlog")).await;
    assert_eq!(code, 400, "{body}");

    // Following: the first chunk is the tail, later ones are new lines.
    let client = keel_agent::probe::http_client();
    let request = hyper::Request::get(format!(
        "http://{}/v1/allocation/{id}/logs?task=main&follow=true",
        agent.http_addr
    ))
    .body(Full::new(Bytes::new()))
    .unwrap();
    let response = client.request(request).await.unwrap();
    let mut body = response.into_body();
    let mut chunks = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while chunks < 3 {
        let frame = tokio::time::timeout_at(deadline.into(), body.frame())
            .await
            .expect("followed lines arrive")
            .expect("the stream goes on")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            if String::from_utf8_lossy(&data).contains("tick-") {
                chunks += 1;
            }
        }
    }
    drop(body);

    // The listing and the allocation, joined with the status.
    let listing = http_until(
        &agent,
        "/v1/allocations?job=one",
        "the allocation listed as running",
        |code, body| code == 200 && body.contains("\"client_status\":\"running\""),
    )
    .await;
    let listing: Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(listing[0]["id"], id);
    assert_eq!(listing[0]["node"], NODE);
    http_until(
        &agent,
        &format!("/v1/allocation/{id}"),
        "the CPU sample",
        |code, body| code == 200 && !body.contains("\"cpu_millicores\":null"),
    )
    .await;
    let (_, none) = http_get(&agent, "/v1/allocations?job=other").await;
    assert_eq!(none, "[]");
    let (code, one) = http_get(&agent, &format!("/v1/allocation/{id}")).await;
    assert_eq!(code, 200);
    let one: Value = serde_json::from_str(&one).unwrap();
    assert_eq!(one["status"]["tasks"]["main"]["pid"], pid);

    // The limits, as reported and as the kernel sees them.
    match status.resource_limits.expect("limits reported").as_str() {
        "rlimits" => {
            let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
            let line = limits
                .lines()
                .find(|line| line.starts_with("Max address space"))
                .unwrap();
            let expected = (256u64 * 1024 * 1024).to_string();
            assert_eq!(
                line.split_whitespace().skip(3).take(2).collect::<Vec<_>>(),
                [expected.as_str(), expected.as_str()],
                "{line}"
            );
            assert!(status
                .resource_limits_detail
                .contains("RLIMIT_AS=268435456"));
        }
        "cgroup-v2" => {
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
            assert!(cgroup.contains(&format!("{id}.main")), "{cgroup}");
            assert!(status
                .resource_limits_detail
                .contains("memory.max=268435456"));
        }
        other => panic!("unexpected resource_limits {other}"),
    }

    // Desired stop: SIGTERM (ignored), then SIGKILL to the whole group.
    let mut stopped = allocation(id, "one", &[]);
    stopped.desired_status = DesiredStatus::Stop(StopReason::JobStopped);
    fixture.put_allocation(&stopped).await;
    let status = fixture
        .status_until(
            id,
            "the allocation to complete",
            Duration::from_secs(20),
            |status| status.client.status == ClientStatus::Complete,
        )
        .await;
    assert!(status.client.finished_at.is_some());
    assert_eq!(status.tasks["main"].pid, None);
    assert_eq!(status.tasks["main"].last_signal, Some(9), "{status:#?}");
    wait_until(
        "the leader and its child to be gone",
        Duration::from_secs(5),
        || !alive(pid) && !alive(child),
    )
    .await;
    assert!(processes_of(id).is_empty());
    let events = events_of(&fixture.client, id).await;
    assert!(
        events.iter().any(|kind| kind == "allocation.started"),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_each_stream_within_its_bound() {
    let fixture = Fixture::start(30020).await;
    let agent = fixture.agent(0).await;
    // 36 MB of output: more than the three 10 MiB files kept.
    fixture
        .put_job(
            r#"
name = "chatty"
type = "batch"
[group.g.task.main]
config = { command = "sh", args = ["-c", "yes 0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz | head -c 36000000; echo; echo last-line"] }
"#,
        )
        .await;
    let id = "a0000000-0000-4000-8000-000000000002";
    fixture.put_allocation(&allocation(id, "chatty", &[])).await;
    let status = fixture
        .status_until(
            id,
            "the batch task to complete",
            Duration::from_secs(60),
            |status| status.client.status.is_terminal(),
        )
        .await;
    assert_eq!(status.client.status, ClientStatus::Complete, "{status:#?}");
    assert_eq!(status.tasks["main"].last_exit_code, Some(0));
    let bound = keel_agent::supervisor::logs::LOG_FILE_BYTES_MAX;
    let mut total = 0;
    for name in ["main.stdout", "main.stdout.1", "main.stdout.2"] {
        let length = std::fs::metadata(log_file(&fixture, id, name))
            .unwrap_or_else(|error| panic!("{name}: {error}"))
            .len();
        assert!(length <= bound, "{name} holds {length} bytes");
        total += length;
    }
    assert!(!log_file(&fixture, id, "main.stdout.3").exists());
    assert!(total <= bound * keel_agent::supervisor::logs::LOG_FILES_KEPT as u64);
    assert!(total >= 2 * bound, "{total}");
    let (code, tail) = http_get(&agent, &format!("/v1/allocation/{id}/logs")).await;
    assert_eq!(code, 200);
    assert!(tail.ends_with("\nlast-line\n"));
    assert_eq!(
        tail.len() as u64,
        keel_agent::supervisor::logs::LOG_RESPONSE_BYTES_MAX,
        "the API answers the newest bytes, bounded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_task_is_restarted_by_its_policy_then_failed() {
    let fixture = Fixture::start(30040).await;
    let _agent = fixture.agent(0).await;
    fixture
        .put_job(
            r#"
name = "crashy"
[group.g.restart]
attempts = 2
interval = "1m"
delay = "300ms"
mode = "fail"
[group.g.task.main]
config = { command = "sh", args = ["-c", "echo attempt; exit 1"] }
"#,
        )
        .await;
    let id = "a0000000-0000-4000-8000-000000000003";
    fixture.put_allocation(&allocation(id, "crashy", &[])).await;
    let status = fixture
        .status_until(
            id,
            "the allocation to fail",
            Duration::from_secs(20),
            |status| status.client.status.is_terminal(),
        )
        .await;
    assert_eq!(status.client.status, ClientStatus::Failed, "{status:#?}");
    let task = &status.tasks["main"];
    assert_eq!(task.restarts, 2);
    assert_eq!(task.last_exit_code, Some(1));
    assert_eq!(status.restart_tracker.failures_in_interval, 3);
    let restarting = task
        .events
        .iter()
        .filter(|event| {
            event
                .message
                .starts_with("Restarting in 300ms (exit code 1)")
        })
        .count();
    assert_eq!(restarting, 2, "{:#?}", task.events);
    assert!(task
        .events
        .last()
        .unwrap()
        .message
        .starts_with("Not restarting"));
    let stdout = std::fs::read_to_string(log_file(&fixture, id, "main.stdout")).unwrap();
    assert_eq!(stdout.matches("attempt").count(), 3, "{stdout}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = events_of(&fixture.client, id).await;
        let restarted = events
            .iter()
            .filter(|kind| *kind == "allocation.restarted")
            .count();
        if restarted == 2 && events.iter().any(|kind| kind == "allocation.failed") {
            break;
        }
        assert!(Instant::now() < deadline, "events: {events:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_liveness_failure_restarts_a_task_that_keeps_running() {
    let fixture = Fixture::start(30060).await;
    let agent = fixture.agent(0).await;
    let flag = fixture.directory.path().join("unhealthy");
    let port = fixture.base + 10;
    fixture
        .put_job(&format!(
            r#"
name = "zombie"
[group.g.restart]
attempts = 5
interval = "1m"
delay = "100ms"
[group.g.task.main]
config = {{ command = "sh", args = ["-c", "echo up; sleep 300"] }}
port.http = {{}}
[[group.g.task.main.service]]
name = "zombie-web"
port = "http"
[[group.g.task.main.service.check]]
name = "ready"
kind = "readiness"
type = "exec"
command = "true"
interval = "300ms"
timeout = "300ms"
[[group.g.task.main.service.check]]
name = "alive"
kind = "liveness"
type = "exec"
command = "sh"
# Exit 2: critical (exit 1 would be a warning, as Consul's script checks).
args = ["-c", "test ! -e {} || exit 2"]
interval = "300ms"
timeout = "300ms"
failures_before_critical = 2
"#,
            flag.display()
        ))
        .await;
    let id = "a0000000-0000-4000-8000-000000000004";
    fixture
        .put_allocation(&allocation(id, "zombie", &[("http", port)]))
        .await;
    let status = fixture
        .status_until(id, "ready", Duration::from_secs(20), |status| {
            status.client.ready_since.is_some()
        })
        .await;
    let first = status.tasks["main"].pid.unwrap();
    // Registered in the catalog at the allocated port, id from the alloc id.
    let catalog = http_until(
        &agent,
        "/v1/health/service/zombie-web?passing=true",
        "a passing instance",
        |code, body| code == 200 && body.contains(&format!("\"Port\":{port}")),
    )
    .await;
    assert!(
        catalog.contains(&format!("{id}:main:zombie-web")),
        "{catalog}"
    );

    std::fs::write(&flag, "x").unwrap();
    let status = fixture
        .status_until(
            id,
            "a restart after the liveness failure",
            Duration::from_secs(20),
            |status| {
                let task = &status.tasks["main"];
                task.restarts >= 1 && task.pid.is_some_and(|pid| pid != first)
            },
        )
        .await;
    std::fs::remove_file(&flag).unwrap();
    let task = &status.tasks["main"];
    assert!(
        task.events
            .iter()
            .any(|event| event.message.contains("liveness check \"alive\" critical")),
        "{:#?}",
        task.events
    );
    assert!(task
        .events
        .iter()
        .any(|event| event.message.contains("(liveness check critical)")));
    wait_until(
        "the first process to be gone",
        Duration::from_secs(10),
        || !alive(first),
    )
    .await;
    // Running again, and ready again once its checks pass.
    fixture
        .status_until(id, "ready again", Duration::from_secs(20), |status| {
            status.client.status == ClientStatus::Running && status.client.ready_since.is_some()
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_agent_started_again_leaves_no_duplicate_processes() {
    let fixture = Fixture::start(30080).await;
    let agent = fixture.agent(0).await;
    fixture
        .put_job(
            r#"
name = "steady"
[group.g.restart]
attempts = 3
interval = "10m"
delay = "100ms"
[group.g.task.main]
config = { command = "sh", args = ["-c", "sleep 300 & echo up; wait"] }
"#,
        )
        .await;
    let id = "a0000000-0000-4000-8000-000000000005";
    fixture.put_allocation(&allocation(id, "steady", &[])).await;
    let status = fixture
        .status_until(id, "running", Duration::from_secs(20), |status| {
            status.client.status == ClientStatus::Running
        })
        .await;
    let first = status.tasks["main"].pid.unwrap();
    wait_until("the task and its child", Duration::from_secs(10), || {
        processes_of(id).len() == 2
    })
    .await;
    assert!(processes_of(id).values().all(|group| *group == first));

    // The agent dies without a word (its tasks aborted, nothing cleaned up,
    // as kill -9 would): the task's processes live on.
    drop(agent);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(alive(first), "a crashed agent leaves its tasks running");
    assert!(fixture
        .data_dir()
        .join("allocs")
        .join(id)
        .join("pids")
        .exists());

    let _agent = fixture.agent(1).await;
    let status = fixture
        .status_until(
            id,
            "running under the new agent",
            Duration::from_secs(20),
            |status| {
                status.client.status == ClientStatus::Running
                    && status.tasks["main"].pid.is_some_and(|pid| pid != first)
            },
        )
        .await;
    let second = status.tasks["main"].pid.unwrap();
    wait_until(
        "the previous process group to be gone",
        Duration::from_secs(10),
        || !alive(first),
    )
    .await;
    wait_until(
        "only the new process group",
        Duration::from_secs(10),
        || {
            let processes = processes_of(id);
            processes.len() == 2 && processes.values().all(|group| *group == second)
        },
    )
    .await;
    // The crash granted no fresh restart: counts and tracker carried over.
    let task = &status.tasks["main"];
    assert_eq!(task.restarts, 0);
    assert!(task.events.iter().any(|event| event
        .message
        .starts_with("Agent restarted: killed the process groups")));
}

/// A TCP proxy in front of the member that a test can cut (every
/// connection closed, new ones refused) and heal: a partition between the
/// agent and the store.
struct Partition {
    cut: tokio::sync::watch::Sender<bool>,
    _task: tokio::task::JoinHandle<()>,
}

impl Partition {
    async fn start(listen: u16, member: u16) -> Partition {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", listen))
            .await
            .expect("the proxy binds");
        let (cut, cut_receiver) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if *cut_receiver.borrow() {
                    continue;
                }
                let mut cut = cut_receiver.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", member)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Partition { cut, _task: task }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cut_off_from_the_store_stops_its_allocations_after_the_grace() {
    let fixture = Fixture::start(30100).await;
    let partition = Partition::start(30100 + 9, 30100).await;
    let _agent = fixture.agent_through(0, 30100 + 9).await;
    fixture
        .put_job(
            r#"
name = "cautious"
[group.g.disconnect]
stop_on_client_after = "2s"
[group.g.task.main]
config = { command = "sh", args = ["-c", "sleep 300 & wait"] }
"#,
        )
        .await;
    let id = "a0000000-0000-4000-8000-000000000006";
    fixture
        .put_allocation(&allocation(id, "cautious", &[]))
        .await;
    let status = fixture
        .status_until(id, "running", Duration::from_secs(20), |status| {
            status.client.status == ClientStatus::Running
        })
        .await;
    let pid = status.tasks["main"].pid.unwrap();
    wait_until("the task and its child", Duration::from_secs(10), || {
        processes_of(id).len() == 2
    })
    .await;

    // The store goes away: after the grace, the agent stops the task by itself.
    let cut_at = Instant::now();
    partition.set_cut(true);
    wait_until("the task to be stopped", Duration::from_secs(20), || {
        processes_of(id).is_empty() && !alive(pid)
    })
    .await;
    assert!(
        cut_at.elapsed() >= Duration::from_secs(2),
        "stopped before stop_on_client_after"
    );

    // The store is back: the status says why, and nothing starts again.
    partition.set_cut(false);
    let status = fixture
        .status_until(
            id,
            "the complete status",
            Duration::from_secs(30),
            |status| status.client.status == ClientStatus::Complete,
        )
        .await;
    assert!(
        status.tasks["main"]
            .events
            .iter()
            .any(|event| event.message.contains("stop_on_client_after")),
        "{status:#?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        processes_of(id).is_empty(),
        "a stopped allocation never runs again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_agent_serves_the_logs_of_an_allocation_on_another_node() {
    let fixture = Fixture::start(30120).await;
    let first = fixture.agent(0).await;
    let second = fixture.agent_with("node2", 1, fixture.base).await;
    fixture
        .put_job(
            r#"
name = "elsewhere"
[group.g.task.main]
config = { command = "sh", args = ["-c", "echo from-node2; sleep 300"] }
"#,
        )
        .await;
    let id = "a0000000-0000-4000-8000-000000000007";
    let mut placed = allocation(id, "elsewhere", &[]);
    placed.node = "node2".into();
    fixture.put_allocation(&placed).await;
    let status = fixture
        .status_until(id, "running on node2", Duration::from_secs(20), |status| {
            status.client.status == ClientStatus::Running
        })
        .await;
    assert_eq!(status.node, "node2");
    assert!(processes_of(id)
        .values()
        .all(|group| Some(*group) == status.tasks["main"].pid));
    // Asked of node1, answered by node2 through node1.
    http_until(
        &first,
        &format!("/v1/allocation/{id}/logs"),
        "the proxied log",
        |code, body| code == 200 && body.contains("from-node2"),
    )
    .await;
    let (code, body) = http_get(&first, &format!("/v1/allocation/{id}/logs?task=nope")).await;
    assert_eq!(code, 404, "the owner's refusal comes through: {body}");
    let listing = http_until(
        &first,
        "/v1/allocations?node=node2",
        "node2's allocation listed",
        |code, body| code == 200 && body.contains(id),
    )
    .await;
    assert!(
        listing.contains("\"client_status\":\"running\""),
        "{listing}"
    );
    // Stopped by deleting its key: the task goes, then the status.
    fixture
        .client
        .delete(format!("/keel/allocs/node2/{id}"))
        .await
        .unwrap();
    wait_until("the task to be gone", Duration::from_secs(15), || {
        processes_of(id).is_empty()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while fixture.status(id).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "the status of a deleted allocation stays"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(second);
}
