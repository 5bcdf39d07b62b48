//! The nodes of a `keel chaos run` scenario with `[agents]`: the runner starts the agent
//! processes (nodes `node1`…) beside its members, registers the scenario's job, kills
//! (agent and tasks, SIGKILL) and pauses (agent, SIGSTOP) nodes as the schedule says,
//! and judges the job: how many of its instances serve over time, and from the store's
//! whole history of `/keel/allocs/`, never more than its count of allocations wanted
//! running at once, never two in one slot.
//!
//! An instance *serves* when its allocation is wanted running, its tasks run and are
//! ready (`client.ready_since`), and every port it was given accepts a connection on
//! 127.0.0.1: the last part is what a client would see, and what tells an instance on a
//! killed node (whose allocation the store still says runs) from a live one.
//!
//! A killed agent leaves its tasks running, as a real agent crash does; a killed *node*
//! loses them too, so the runner ends the process groups the agent recorded
//! (`<data-dir>/allocs/<id>/pids`) right after the agent, and again for every agent when
//! the run ends, also when it fails (on drop).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use keel_agent::api_client::ApiClient;
use keel_client::keel_types::mvccpb::event::EventType as WatchEventType;
use keel_client::{Client, WatchOptions};
use serde::Serialize;
use serde_json::Value;

use super::scenario;

/// Ports each agent takes from `--agent-port-base`: HTTP, DNS, gossip, then the
/// dynamic ports of its tasks.
pub const PORTS_PER_AGENT: u16 = 10;
/// The first of an agent's ports given to its tasks (`--dynamic-ports`).
const FIRST_TASK_PORT_OFFSET: u16 = 3;
/// How long agents get to answer and to see every node alive.
const AGENTS_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one request to an agent may take (a paused agent never answers).
const AGENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a port of an instance gets to accept a connection.
const PORT_CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// How long one message of the allocation history may take to arrive.
const HISTORY_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Revisions of the allocation history replayed at most.
pub const HISTORY_REVISIONS_MAX: usize = 1_000_000;
/// Log filter of the agents: their own info lines, not their libraries' chatter.
const AGENT_LOG_FILTER: &str = "info,hickory_server=warn,chitchat=warn,h2=warn";

struct RunnerAgent {
    name: String,
    http_port: u16,
    data_dir: PathBuf,
    arguments: Vec<String>,
    child: Option<Child>,
    paused: bool,
}

/// The agent processes of a scenario; killed, with their tasks, when dropped.
pub struct RunnerAgents {
    executable: PathBuf,
    directory: PathBuf,
    agents: Vec<RunnerAgent>,
}

impl RunnerAgents {
    /// Lays out `settings.count` agents for the members at `endpoints`; starts none.
    pub fn new(
        settings: &scenario::Agents,
        port_base: u16,
        endpoints: &str,
        directory: &Path,
    ) -> anyhow::Result<RunnerAgents> {
        anyhow::ensure!(
            u32::from(port_base) + u32::from(PORTS_PER_AGENT) * settings.count as u32 <= 32_768,
            "--agent-port-base {port_base} leaves too few ports below the ephemeral range"
        );
        let port = |index: usize, offset: u16| port_base + PORTS_PER_AGENT * index as u16 + offset;
        let gossip: Vec<String> = (0..settings.count)
            .map(|index| format!("127.0.0.1:{}", port(index, 2)))
            .collect();
        let agents = (0..settings.count)
            .map(|index| {
                let name = format!("node{}", index + 1);
                let data_dir = directory.join(&name);
                let join: Vec<&str> = gossip
                    .iter()
                    .enumerate()
                    .filter(|(other, _)| *other != index)
                    .map(|(_, address)| address.as_str())
                    .collect();
                let mut arguments: Vec<String> = vec![
                    "agent".into(),
                    "--name".into(),
                    name.clone(),
                    "--endpoints".into(),
                    endpoints.into(),
                    "--data-dir".into(),
                    data_dir.display().to_string(),
                    "--http-addr".into(),
                    format!("127.0.0.1:{}", port(index, 0)),
                    "--dns-addr".into(),
                    format!("127.0.0.1:{}", port(index, 1)),
                    "--gossip-addr".into(),
                    gossip[index].clone(),
                    "--node-ttl".into(),
                    format!("{}ms", settings.node_ttl.as_millis()),
                    // Agents share 127.0.0.1: disjoint task port ranges.
                    "--dynamic-ports".into(),
                    format!(
                        "{}-{}",
                        port(index, FIRST_TASK_PORT_OFFSET),
                        port(index, PORTS_PER_AGENT - 1)
                    ),
                ];
                if !join.is_empty() {
                    arguments.extend(["--join".into(), join.join(",")]);
                }
                arguments.extend(settings.arguments.iter().cloned());
                RunnerAgent {
                    name,
                    http_port: port(index, 0),
                    data_dir,
                    arguments,
                    child: None,
                    paused: false,
                }
            })
            .collect();
        Ok(RunnerAgents {
            executable: std::env::current_exe().context("finding the keel executable")?,
            directory: directory.to_owned(),
            agents,
        })
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// The index of node `name`, if the scenario has it.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.agents.iter().position(|agent| agent.name == name)
    }

    fn http_addr(&self, index: usize) -> String {
        format!("127.0.0.1:{}", self.agents[index].http_port)
    }

    /// HTTP addresses of the agents that run and are not paused: those that answer.
    pub fn answering_addresses(&self) -> Vec<String> {
        (0..self.agents.len())
            .filter(|&index| self.agents[index].child.is_some() && !self.agents[index].paused)
            .map(|index| self.http_addr(index))
            .collect()
    }

    /// Starts agent `index` (its log appended to `<name>.log`), unless it runs.
    pub fn start(&mut self, index: usize) -> anyhow::Result<()> {
        let agent = &mut self.agents[index];
        if agent.child.is_some() {
            return Ok(());
        }
        let log_path = self.directory.join(format!("{}.log", agent.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let child = Command::new(&self.executable)
            .args(&agent.arguments)
            .env("RUST_LOG", AGENT_LOG_FILTER)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting agent {}", agent.name))?;
        agent.child = Some(child);
        agent.paused = false;
        Ok(())
    }

    /// Kills node `index`: its agent (SIGKILL), then its tasks' process groups.
    pub fn kill(&mut self, index: usize) {
        self.resume(index);
        let agent = &mut self.agents[index];
        if let Some(mut child) = agent.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let allocations = agent
            .data_dir
            .join(keel_agent::supervisor::ALLOCS_DIRECTORY);
        let killed = keel_agent::supervisor::process::kill_leftovers(&allocations);
        if !killed.is_empty() {
            tracing::info!(node = %agent.name, ?killed, "killed the tasks of a killed node");
        }
    }

    /// Stops agent `index` (SIGSTOP); its tasks go on.
    pub fn pause(&mut self, index: usize) {
        let agent = &mut self.agents[index];
        if let Some(child) = &agent.child {
            signal(child.id(), "STOP");
            agent.paused = true;
        }
    }

    /// Continues agent `index` if it is paused.
    pub fn resume(&mut self, index: usize) {
        let agent = &mut self.agents[index];
        if let (Some(child), true) = (&agent.child, agent.paused) {
            signal(child.id(), "CONT");
        }
        agent.paused = false;
    }

    /// Continues paused agents and starts killed (or exited) ones; returns their names.
    pub fn restore(&mut self) -> anyhow::Result<Vec<String>> {
        let mut restored = Vec::new();
        for index in 0..self.agents.len() {
            let exited = match self.agents[index].child.as_mut() {
                None => true,
                Some(child) => child.try_wait()?.is_some(),
            };
            if exited {
                self.agents[index].child = None;
                self.start(index)?;
                restored.push(self.agents[index].name.clone());
            } else if self.agents[index].paused {
                self.resume(index);
                restored.push(self.agents[index].name.clone());
            }
        }
        Ok(restored)
    }
}

impl Drop for RunnerAgents {
    fn drop(&mut self) {
        for index in 0..self.agents.len() {
            self.kill(index);
        }
    }
}

fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

async fn agent_get(address: &str, path: &str) -> Option<Value> {
    tokio::time::timeout(AGENT_REQUEST_TIMEOUT, ApiClient::new(address).get(path))
        .await
        .ok()?
        .ok()
}

/// Waits until every agent answers and the first sees every node alive.
pub async fn wait_until_ready(
    agents: &std::sync::Mutex<RunnerAgents>,
    count: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + AGENTS_READY_TIMEOUT;
    loop {
        let addresses = agents.lock().expect("not poisoned").answering_addresses();
        let mut answering = 0;
        for address in &addresses {
            if agent_get(address, "/v1/agent/self").await.is_some() {
                answering += 1;
            }
        }
        let alive = match addresses.first() {
            Some(first) => agent_get(first, "/v1/keel/nodes")
                .await
                .and_then(|nodes| nodes.as_array().cloned())
                .map_or(0, |nodes| {
                    nodes
                        .iter()
                        .filter(|node| node["Status"] == "alive")
                        .count()
                }),
            None => 0,
        };
        if answering == count && alive == count {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the agents were not ready within {AGENTS_READY_TIMEOUT:?}: {answering} of {count} \
             answer, {alive} nodes alive (see node*.log)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The scenario's job: its name and how many instances it wants in all.
#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    pub count: usize,
}

impl Job {
    /// Reads and checks the job file.
    pub fn read(path: &Path) -> anyhow::Result<(Job, Value)> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the job file {}", path.display()))?;
        let job = keel_scheduler::Job::from_toml_validated(&text)
            .with_context(|| format!("the job file {}", path.display()))?;
        let body: Value = serde_json::from_str(&job.to_json())?;
        let count = job.groups.values().map(|group| group.count as usize).sum();
        Ok((
            Job {
                name: job.name.clone(),
                count,
            },
            body,
        ))
    }
}

/// Registers the job through the first agent that takes it.
pub async fn register(addresses: &[String], body: &Value) -> anyhow::Result<()> {
    let mut last_error = None;
    for address in addresses {
        match ApiClient::new(address)
            .call(keel_agent::api_client::Method::PUT, "/v1/jobs", Some(body))
            .await
        {
            Ok(_) => return Ok(()),
            Err(error) => last_error = Some(error),
        }
    }
    Err(anyhow::anyhow!(
        "registering the job: {}",
        last_error.map_or("no agent answers".to_owned(), |error| error.to_string())
    ))
}

/// The job's allocations as the first answering agent lists them.
async fn allocations(addresses: &[String], job: &Job) -> Option<Vec<Value>> {
    for address in addresses {
        if let Some(answer) = agent_get(address, &format!("/v1/job/{}", job.name)).await {
            return Some(
                answer["allocations"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
            );
        }
    }
    None
}

fn wanted_running(allocation: &Value) -> bool {
    allocation["desired_status"]["status"] == "run"
}

/// Whether every port the allocation was given accepts a connection.
async fn ports_answer(allocation: &Value) -> bool {
    let ports: Vec<u16> = allocation["ports"]
        .as_object()
        .into_iter()
        .flat_map(|ports| ports.values())
        .filter_map(|port| port.as_u64())
        .filter_map(|port| u16::try_from(port).ok())
        .collect();
    for port in ports {
        let connected = tokio::time::timeout(
            PORT_CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await;
        if !matches!(connected, Ok(Ok(_))) {
            return false;
        }
    }
    true
}

/// How many of the job's instances serve now; `None` when no agent answers.
pub async fn serving(addresses: &[String], job: &Job) -> Option<usize> {
    let allocations = allocations(addresses, job).await?;
    let mut count = 0;
    for allocation in &allocations {
        let ready = wanted_running(allocation)
            && allocation["client"]["status"] == "running"
            && !allocation["client"]["ready_since"].is_null();
        if ready && ports_answer(allocation).await {
            count += 1;
        }
    }
    Some(count)
}

/// The node with the most allocations of the job wanted running (ties: the first by
/// name), as the agents list them now.
pub async fn busiest_node(addresses: &[String], job: &Job) -> Option<String> {
    let allocations = allocations(addresses, job).await?;
    let mut by_node: BTreeMap<String, usize> = BTreeMap::new();
    for allocation in allocations
        .iter()
        .filter(|allocation| wanted_running(allocation))
    {
        if let Some(node) = allocation["node"].as_str() {
            *by_node.entry(node.to_owned()).or_insert(0) += 1;
        }
    }
    let most = *by_node.values().max()?;
    by_node
        .into_iter()
        .find(|(_, count)| *count == most)
        .map(|(node, _)| node)
}

/// What the store's history of `/keel/allocs/` says of the job.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AllocationHistory {
    /// Revisions at which allocations changed, replayed.
    pub revisions_checked: usize,
    /// The most allocations of the job wanted running at any one revision.
    pub wanted_running_max: usize,
    /// Revisions at which two allocations wanted running shared a slot (group, index).
    pub revisions_with_a_shared_slot: usize,
    /// Allocation keys created more than once.
    pub keys_created_twice: usize,
}

/// Replays every revision of `/keel/allocs/` from revision 1 (a watch) up to the newest
/// change of an allocation still listed.
pub async fn allocation_history(client: &Client, job: &Job) -> anyhow::Result<AllocationHistory> {
    let listing = client
        .get_prefix("/keel/allocs/")
        .await
        .map_err(crate::kv::client_error)?;
    let Some(current) = listing.kvs.iter().map(|kv| kv.mod_revision).max() else {
        return Ok(AllocationHistory::default());
    };
    let mut watcher = client
        .watch(WatchOptions::prefix("/keel/allocs/").from_revision(1))
        .await
        .map_err(crate::kv::client_error)
        .context("watching /keel/allocs/ from revision 1")?;
    let mut live: BTreeMap<String, Value> = BTreeMap::new();
    let mut created: BTreeSet<String> = BTreeSet::new();
    let mut history = AllocationHistory::default();
    let mut last_revision = 0;
    while last_revision < current {
        anyhow::ensure!(
            history.revisions_checked < HISTORY_REVISIONS_MAX,
            "the allocation history has more than {HISTORY_REVISIONS_MAX} revisions"
        );
        let response = tokio::time::timeout(HISTORY_MESSAGE_TIMEOUT, watcher.next())
            .await
            .context("the allocation history stopped arriving")?
            .ok_or_else(|| anyhow::anyhow!("the watch of /keel/allocs/ ended"))?
            .map_err(crate::kv::client_error)?;
        let mut by_revision: BTreeMap<i64, Vec<_>> = BTreeMap::new();
        for event in response.events {
            if let Some(kv) = &event.kv {
                by_revision.entry(kv.mod_revision).or_default().push(event);
            }
        }
        for (revision, events) in by_revision {
            for event in events {
                let kv = event.kv.clone().expect("kept only with a key-value");
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                if event.r#type() == WatchEventType::Delete {
                    live.remove(&key);
                    continue;
                }
                if kv.create_revision == kv.mod_revision && !created.insert(key.clone()) {
                    history.keys_created_twice += 1;
                }
                if let Ok(allocation) = serde_json::from_slice::<Value>(&kv.value) {
                    live.insert(key, allocation);
                }
            }
            let running: Vec<&Value> = live
                .values()
                .filter(|allocation| allocation["job"] == job.name.as_str())
                .filter(|allocation| wanted_running(allocation))
                .collect();
            history.wanted_running_max = history.wanted_running_max.max(running.len());
            let slots: BTreeSet<(String, u64)> = running
                .iter()
                .map(|allocation| {
                    (
                        allocation["group"].as_str().unwrap_or_default().to_owned(),
                        allocation["index"].as_u64().unwrap_or_default(),
                    )
                })
                .collect();
            if slots.len() != running.len() {
                history.revisions_with_a_shared_slot += 1;
            }
            history.revisions_checked += 1;
            last_revision = revision;
        }
    }
    Ok(history)
}
