//! `keel chaos run SCENARIO.toml`: starts a cluster of member processes with fault
//! injection on, runs the scenario's workload while its fault schedule plays, then heals
//! everything and judges the run: acknowledged writes lost (read back at their revisions),
//! the `keel-check` verdict on the recorded history, and the steady-state hypothesis.
//!
//! The runner is the members' supervisor: it kills and restarts processes for `kill` and
//! `random-kill` faults, and restarts a member that stopped itself (after an injected
//! fsync error) once the fault's window ends. Other faults are injected through the
//! members' Chaos service, exactly as `keel chaos inject` does. Its kills do not go
//! through the Chaos service's `kill`, which restarts the member by itself: a member
//! restarted that way is no child of the runner, which could then neither wait for it,
//! nor kill it when the run ends, nor choose when it comes back; the runner kills its
//! child (SIGKILL, the same fault) and starts it again after `for` instead, so there is
//! one restart, by one owner.
//!
//! With `[agents]` the runner also starts agent processes and their job (`nodes.rs`),
//! kills and pauses nodes the same way (it owns them too), counts the job's instances
//! serving every [`JOB_SAMPLE_INTERVAL`], and judges the job beside the key-value
//! workload.
//!
//! The linearizability check runs the `keel-check` binary on the history (written in its
//! JSON format) rather than linking `keel-check`: the binary must not depend on the
//! checker (ARCHITECTURE.md), and the checker must not share a bug with what it checks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use keel_server::api::etcdserverpb::kv_client::KvClient;
use keel_server::api::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_types::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_types::etcdserverpb::request_op::Request;
use keel_types::etcdserverpb::{
    Compare, Member, PutRequest, RangeRequest, RequestOp, StatusRequest, TxnRequest,
};
use keel_types::keelchaospb::{
    disk_fault, fault, process_fault, ClockRate, DelayMessages, DiskFault, DropMessages, Fault,
    HealRequest, Partition, ProcessFault,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tonic::transport::Channel;

use super::nodes;
use super::report::{self, Report};
use super::scenario::{RandomFailures, Scenario, ScheduledFault};

/// Operations recorded at most (the checker's own default limit is larger).
pub const HISTORY_OPERATIONS_MAX: usize = 500_000;
/// How long the cluster gets to elect a leader at the start and after healing.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long keel-check may search.
const CHECK_TIMEOUT_SECONDS: u64 = 120;
/// How often the job's instances serving are counted.
const JOB_SAMPLE_INTERVAL: Duration = Duration::from_millis(250);
/// How long the job gets to serve its count, at the start and after the run.
const JOB_SERVING_TIMEOUT: Duration = Duration::from_secs(60);
/// Job samples kept at most (an hour at one per 250 ms is 14,400).
const JOB_SAMPLES_MAX: usize = 100_000;

#[derive(Debug, clap::Args)]
pub struct RunArguments {
    /// The scenario file (TOML; see scenarios/ in the repository).
    scenario: PathBuf,
    /// Run five times as long as the scenario says.
    #[arg(long)]
    long: bool,
    /// Client port of the first member; member i uses base + 2i (client) and
    /// base + 2i + 1 (peer), on 127.0.0.1.
    #[arg(long, default_value_t = 23_790)]
    port_base: u16,
    /// First port of the agents, when the scenario starts some: agent i uses base + 10i
    /// (HTTP), + 1 (DNS), + 2 (gossip) and + 3 to + 9 (its tasks' ports), on 127.0.0.1.
    #[arg(long, default_value_t = 23_900)]
    agent_port_base: u16,
    /// Where members keep their data and logs, and the history is written (default: a
    /// new directory under the system's temporary directory, removed after a pass).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Also draw the timeline (faults, availability, latency) into this SVG file.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// The keel-check binary (default: beside this keel binary, then on PATH).
    #[arg(long)]
    keel_check: Option<PathBuf>,
    /// Extra `keel server` flag for every member (repeatable); used by
    /// `scripts/fault-suite --broken` to start deliberately broken members.
    #[arg(long, hide = true)]
    unsafe_member_argument: Vec<String>,
}

/// A request's input, in keel-check's history format.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HistoryInput {
    Put {
        key: String,
        value: String,
    },
    Get {
        key: String,
        serializable: bool,
    },
    CompareAndSwap {
        key: String,
        expected: Option<String>,
        new_value: String,
    },
}

/// A request's answer, in keel-check's history format.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HistoryOutput {
    Put {
        revision: u64,
    },
    Get {
        value: Option<String>,
        mod_revision: u64,
        revision: u64,
    },
    CompareAndSwap {
        succeeded: bool,
        revision: u64,
    },
    Unknown,
}

/// One operation of the history, in keel-check's format (times in microseconds since
/// the workload started).
#[derive(Debug, Clone, Serialize)]
pub struct HistoryOperation {
    pub client_id: u64,
    pub call_time: u64,
    pub return_time: Option<u64>,
    pub input: HistoryInput,
    pub output: HistoryOutput,
    /// Why the request failed, if it did (not part of keel-check's format; skipped there
    /// by being removed before writing).
    #[serde(skip)]
    pub error: Option<String>,
}

impl HistoryOperation {
    pub fn is_write(&self) -> bool {
        !matches!(self.input, HistoryInput::Get { .. })
    }
}

/// A fault's span on the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct FaultSpan {
    pub kind: String,
    pub targets: Vec<String>,
    pub start_seconds: f64,
    pub end_seconds: f64,
    /// The targets are nodes (agents and their tasks), not members.
    pub on_nodes: bool,
}

struct RunnerMember {
    name: String,
    client_port: u16,
    peer_port: u16,
    id: u64,
    child: Option<Child>,
    /// Started with `--initial-cluster-state existing` (a replacement joining the cluster).
    joining: bool,
}

/// The member processes the runner supervises; killed when dropped.
struct RunnerCluster {
    executable: PathBuf,
    directory: PathBuf,
    initial_cluster: String,
    server_arguments: Vec<String>,
    members: Vec<RunnerMember>,
}

impl RunnerCluster {
    fn new(scenario: &Scenario, port_base: u16, directory: &Path) -> anyhow::Result<Self> {
        anyhow::ensure!(
            u32::from(port_base) + 2 * scenario.members as u32 <= 32_768,
            "--port-base {port_base} leaves too few ports below the ephemeral range"
        );
        let members: Vec<RunnerMember> = (0..scenario.members)
            .map(|index| RunnerMember {
                name: format!("m{}", index + 1),
                client_port: port_base + 2 * index as u16,
                peer_port: port_base + 2 * index as u16 + 1,
                id: 0,
                child: None,
                joining: false,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|member| format!("{}=http://127.0.0.1:{}", member.name, member.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        Ok(RunnerCluster {
            executable: std::env::current_exe().context("finding the keel executable")?,
            directory: directory.to_owned(),
            initial_cluster,
            server_arguments: scenario.server_arguments.clone(),
            members,
        })
    }

    fn url(&self, index: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[index].client_port)
    }

    fn start(&mut self, index: usize) -> anyhow::Result<()> {
        let member = &self.members[index];
        if member.child.is_some() {
            return Ok(());
        }
        let client_url = self.url(index);
        let peer_url = format!("http://127.0.0.1:{}", member.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.directory.join(format!("{}.log", member.name)))
            .context("opening a member log")?;
        let child = Command::new(&self.executable)
            .arg("server")
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(self.directory.join(&member.name))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .arg("--experimental-enable-fault-injection")
            .args(if member.joining {
                &["--initial-cluster-state", "existing"][..]
            } else {
                &[]
            })
            .args(&self.server_arguments)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting member {}", member.name))?;
        self.members[index].child = Some(child);
        Ok(())
    }

    fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts every member whose process has exited (or was killed).
    fn restart_exited(&mut self) -> anyhow::Result<Vec<String>> {
        let mut restarted = Vec::new();
        for index in 0..self.members.len() {
            let exited = match self.members[index].child.as_mut() {
                None => true,
                Some(child) => child.try_wait()?.is_some(),
            };
            if exited {
                self.members[index].child = None;
                self.start(index)?;
                restarted.push(self.members[index].name.clone());
            }
        }
        Ok(restarted)
    }

    fn as_members(&self) -> Vec<Member> {
        (0..self.members.len())
            .map(|index| Member {
                id: self.members[index].id,
                name: self.members[index].name.clone(),
                client_ur_ls: vec![self.url(index)],
                ..Default::default()
            })
            .collect()
    }
}

impl Drop for RunnerCluster {
    fn drop(&mut self) {
        for index in 0..self.members.len() {
            self.kill(index);
        }
    }
}

async fn connect(url: &str, timeout: Duration) -> Option<Channel> {
    Channel::from_shared(url.to_owned())
        .ok()?
        .connect_timeout(timeout)
        .connect()
        .await
        .ok()
}

/// (member id, leader id) of a member, if it answers within a second.
async fn status(url: &str) -> Option<(u64, u64)> {
    let channel = connect(url, Duration::from_millis(500)).await?;
    let response = tokio::time::timeout(
        Duration::from_secs(1),
        MaintenanceClient::new(channel).status(StatusRequest {}),
    )
    .await
    .ok()?
    .ok()?
    .into_inner();
    Some((response.header?.member_id, response.leader))
}

/// The index of the leader that every answering member agrees on.
async fn find_leader(urls: &[String]) -> Option<usize> {
    let mut statuses = Vec::new();
    for url in urls {
        statuses.push(status(url).await);
    }
    let leader = statuses
        .iter()
        .flatten()
        .map(|(_, leader)| *leader)
        .find(|&id| id != 0)?;
    statuses
        .iter()
        .position(|status| status.is_some_and(|(member, _)| member == leader))
}

async fn wait_for_leader(urls: &[String]) -> anyhow::Result<usize> {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        if let Some(leader) = find_leader(urls).await {
            return Ok(leader);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no leader within {CONVERGE_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run(arguments: RunArguments, json: bool) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&arguments.scenario)
        .with_context(|| format!("reading {}", arguments.scenario.display()))?;
    let mut scenario = Scenario::parse(&text)
        .with_context(|| format!("scenario {}", arguments.scenario.display()))?;
    if arguments.long {
        scenario.duration *= 5;
    }
    let (directory, temporary) = match &arguments.work_dir {
        Some(directory) => (directory.clone(), false),
        None => (
            std::env::temp_dir().join(format!(
                "keel-chaos-{}-{}",
                std::process::id(),
                scenario.seed
            )),
            true,
        ),
    };
    std::fs::create_dir_all(&directory)
        .with_context(|| format!("creating {}", directory.display()))?;
    let scenario_directory = arguments
        .scenario
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let report = run_scenario(&scenario, &arguments, &scenario_directory, &directory).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report::print_table(&report);
    }
    if let Some(path) = &arguments.svg {
        std::fs::write(path, report::timeline_svg(&report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !report.passed {
        anyhow::bail!(
            "scenario {:?} failed (member logs and history in {})",
            scenario.name,
            directory.display()
        );
    }
    if temporary {
        let _ = std::fs::remove_dir_all(&directory);
    }
    Ok(())
}

async fn run_scenario(
    scenario: &Scenario,
    arguments: &RunArguments,
    scenario_directory: &Path,
    directory: &Path,
) -> anyhow::Result<Report> {
    let mut cluster = RunnerCluster::new(scenario, arguments.port_base, directory)?;
    cluster
        .server_arguments
        .extend(arguments.unsafe_member_argument.iter().cloned());
    for index in 0..scenario.members {
        cluster.start(index)?;
    }
    let urls: Vec<String> = (0..scenario.members)
        .map(|index| cluster.url(index))
        .collect();
    wait_for_leader(&urls).await?;
    for (index, url) in urls.iter().enumerate() {
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        cluster.members[index].id = loop {
            if let Some((id, _)) = status(url).await {
                break id;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "member m{} never answered",
                index + 1
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
    }
    let cluster = Arc::new(Mutex::new(cluster));
    let nodes = match &scenario.agents {
        Some(settings) => Some(
            start_nodes(
                settings,
                arguments.agent_port_base,
                &urls,
                scenario_directory,
                directory,
            )
            .await?,
        ),
        None => None,
    };
    let started = Instant::now();
    let end = started + scenario.duration;
    let history: Arc<Mutex<Vec<HistoryOperation>>> = Arc::default();
    let spans: Arc<Mutex<Vec<FaultSpan>>> = Arc::default();
    let down_intervals: Arc<Mutex<Vec<(usize, f64, f64)>>> = Arc::default();

    let mut clients = Vec::new();
    for client_id in 0..scenario.workload.clients {
        clients.push(tokio::spawn(client_loop(
            client_id as u64,
            urls.clone(),
            scenario.workload.clone(),
            scenario
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(client_id as u64),
            started,
            end,
            history.clone(),
        )));
    }
    let samples: Arc<Mutex<Vec<(f64, usize)>>> = Arc::default();
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = nodes.as_ref().and_then(|nodes| {
        let job = nodes.job.clone()?;
        Some(tokio::spawn(sample_job(
            nodes.agents.clone(),
            job,
            started,
            samples.clone(),
            sampling.clone(),
        )))
    });
    let mut fault_tasks = Vec::new();
    for (index, fault) in scenario.faults.iter().enumerate() {
        let context = FaultContext {
            nodes: nodes.clone(),
            cluster: cluster.clone(),
            urls: urls.clone(),
            started,
            end,
            spans: spans.clone(),
            down_intervals: down_intervals.clone(),
            seed: scenario.seed.wrapping_add(7_919 * (index as u64 + 1)),
        };
        let fault = fault.clone();
        fault_tasks.push(tokio::spawn(
            async move { play_fault(fault, context).await },
        ));
    }
    for client in clients {
        client.await.context("a workload client panicked")?;
    }
    for task in fault_tasks {
        task.await.context("a fault task panicked")??;
    }
    let elapsed_seconds = started.elapsed().as_secs_f64();

    // Heal: every injected fault off, every stopped member back, one leader.
    for url in &urls {
        if let Some(channel) = connect(url, Duration::from_millis(500)).await {
            let mut client = keel_server::api::keelchaospb::chaos_client::ChaosClient::new(channel);
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                client.heal(HealRequest { fault_id: 0 }),
            )
            .await;
        }
    }
    let restarted = cluster.lock().expect("not poisoned").restart_exited()?;
    if !restarted.is_empty() {
        tracing::info!(?restarted, "restarted members after the run");
    }
    wait_for_leader(&urls).await?;
    let job_outcome = match &nodes {
        Some(nodes) => {
            let restored = nodes.agents.lock().expect("not poisoned").restore()?;
            if !restored.is_empty() {
                tracing::info!(?restored, "restored nodes after the run");
            }
            match &nodes.job {
                Some(job) => Some(
                    judge_job(job, &urls, &samples, &sampling, sampler, elapsed_seconds).await?,
                ),
                None => None,
            }
        }
        None => None,
    };

    let mut operations = std::mem::take(&mut *history.lock().expect("not poisoned"));
    operations.sort_by_key(|operation| operation.call_time);
    let lost = lost_acknowledged_writes(&urls, &operations).await?;
    let history_path = directory.join("history.json");
    write_history(&history_path, &operations)?;
    let verdict = check_history(arguments.keel_check.as_deref(), &history_path);
    let spans = std::mem::take(&mut *spans.lock().expect("not poisoned"));
    let down_intervals = std::mem::take(&mut *down_intervals.lock().expect("not poisoned"));
    Ok(report::build(
        scenario,
        &operations,
        spans,
        &down_intervals,
        elapsed_seconds.min(scenario.duration.as_secs_f64()),
        report::Judged {
            acknowledged_writes_lost: lost,
            linearizability: verdict,
            job: job_outcome,
        },
    ))
}

/// The agents of a scenario and its job, shared by the fault tasks and the sampler.
#[derive(Clone)]
struct Nodes {
    agents: Arc<Mutex<nodes::RunnerAgents>>,
    job: Option<nodes::Job>,
}

/// Starts the agents, waits until every node is alive, registers the job and waits
/// until all its instances serve.
async fn start_nodes(
    settings: &super::scenario::Agents,
    port_base: u16,
    urls: &[String],
    scenario_directory: &Path,
    directory: &Path,
) -> anyhow::Result<Nodes> {
    let endpoints = urls
        .iter()
        .map(|url| url.trim_start_matches("http://"))
        .collect::<Vec<_>>()
        .join(",");
    let mut agents = nodes::RunnerAgents::new(settings, port_base, &endpoints, directory)?;
    for index in 0..agents.len() {
        agents.start(index)?;
    }
    let agents = Arc::new(Mutex::new(agents));
    nodes::wait_until_ready(&agents, settings.count).await?;
    let job = match &settings.job {
        None => None,
        Some(path) => {
            let (job, body) = nodes::Job::read(&scenario_directory.join(path))?;
            let addresses = agents.lock().expect("not poisoned").answering_addresses();
            nodes::register(&addresses, &body).await?;
            wait_for_serving(&agents, &job, "at the start").await?;
            Some(job)
        }
    };
    Ok(Nodes { agents, job })
}

/// Waits until the job's count of instances serve.
async fn wait_for_serving(
    agents: &Mutex<nodes::RunnerAgents>,
    job: &nodes::Job,
    when: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + JOB_SERVING_TIMEOUT;
    loop {
        let addresses = agents.lock().expect("not poisoned").answering_addresses();
        let serving = nodes::serving(&addresses, job).await;
        if serving == Some(job.count) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "job {} did not serve its {} instances {when} within {JOB_SERVING_TIMEOUT:?} \
             ({serving:?} serve; see node*.log)",
            job.name,
            job.count
        );
        tokio::time::sleep(JOB_SAMPLE_INTERVAL).await;
    }
}

/// Counts the job's instances serving every [`JOB_SAMPLE_INTERVAL`] while `sampling`.
async fn sample_job(
    agents: Arc<Mutex<nodes::RunnerAgents>>,
    job: nodes::Job,
    started: Instant,
    samples: Arc<Mutex<Vec<(f64, usize)>>>,
    sampling: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut interval = tokio::time::interval(JOB_SAMPLE_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while sampling.load(std::sync::atomic::Ordering::Acquire) {
        interval.tick().await;
        let addresses = agents.lock().expect("not poisoned").answering_addresses();
        // No agent answering (all killed or paused): nothing serves that anyone knows of.
        let serving = nodes::serving(&addresses, &job).await.unwrap_or(0);
        let mut samples = samples.lock().expect("not poisoned");
        if samples.len() < JOB_SAMPLES_MAX {
            samples.push((started.elapsed().as_secs_f64(), serving));
        }
    }
}

/// After the run: waits (bounded) for the job to serve its count again, still
/// sampling, then replays the allocation history.
async fn judge_job(
    job: &nodes::Job,
    urls: &[String],
    samples: &Mutex<Vec<(f64, usize)>>,
    sampling: &std::sync::atomic::AtomicBool,
    sampler: Option<tokio::task::JoinHandle<()>>,
    elapsed_seconds: f64,
) -> anyhow::Result<report::JobOutcome> {
    let deadline = Instant::now() + JOB_SERVING_TIMEOUT;
    loop {
        let newest = samples
            .lock()
            .expect("not poisoned")
            .last()
            .filter(|(time, _)| *time >= elapsed_seconds)
            .map(|(_, serving)| *serving);
        if newest == Some(job.count) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(JOB_SAMPLE_INTERVAL).await;
    }
    sampling.store(false, std::sync::atomic::Ordering::Release);
    if let Some(sampler) = sampler {
        sampler.await.context("the job sampler panicked")?;
    }
    let samples = std::mem::take(&mut *samples.lock().expect("not poisoned"));
    let endpoints = urls
        .iter()
        .map(|url| url.trim_start_matches("http://"))
        .collect::<Vec<_>>()
        .join(",");
    let history = match crate::kv::client(&endpoints).await {
        Ok(client) => nodes::allocation_history(&client, job)
            .await
            .map_err(|error| format!("{error:#}")),
        Err(error) => Err(format!("{error:#}")),
    };
    Ok(report::JobOutcome {
        name: job.name.clone(),
        count: job.count,
        samples,
        history,
    })
}

/// What every fault task shares.
struct FaultContext {
    nodes: Option<Nodes>,
    cluster: Arc<Mutex<RunnerCluster>>,
    urls: Vec<String>,
    started: Instant,
    end: Instant,
    spans: Arc<Mutex<Vec<FaultSpan>>>,
    down_intervals: Arc<Mutex<Vec<(usize, f64, f64)>>>,
    seed: u64,
}

impl FaultContext {
    fn now_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn names(&self, indexes: &[usize]) -> Vec<String> {
        let cluster = self.cluster.lock().expect("not poisoned");
        indexes
            .iter()
            .map(|&index| cluster.members[index].name.clone())
            .collect()
    }

    /// Member indexes for a target expression at this moment.
    async fn resolve(&self, target: &str) -> anyhow::Result<Vec<usize>> {
        let size = self.urls.len();
        let leader = find_leader(&self.urls).await;
        let followers: Vec<usize> = (0..size).filter(|&index| Some(index) != leader).collect();
        let minority = (size - 1) / 2;
        Ok(match target {
            "leader" => vec![leader.ok_or_else(|| anyhow::anyhow!("no leader to target"))?],
            "follower" => followers.into_iter().take(1).collect(),
            "minority" => followers.into_iter().take(minority.max(1)).collect(),
            // The leader and enough followers to be a majority: the rest are the minority.
            "majority" => {
                let mut targets: Vec<usize> = leader.into_iter().collect();
                targets.extend(followers.into_iter().take(size / 2 + 1 - targets.len()));
                targets
            }
            "all" => (0..size).collect(),
            names => {
                let cluster = self.cluster.lock().expect("not poisoned");
                names
                    .split(',')
                    .map(|name| {
                        cluster
                            .members
                            .iter()
                            .position(|member| member.name == name.trim())
                            .ok_or_else(|| anyhow::anyhow!("no member is named {name:?}"))
                    })
                    .collect::<anyhow::Result<_>>()?
            }
        })
    }
}

async fn sleep_until(instant: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(instant)).await;
}

async fn play_fault(fault: ScheduledFault, context: FaultContext) -> anyhow::Result<()> {
    if fault.kind == "random-kill" {
        let random = fault.random.expect("validated");
        let mut members = Vec::new();
        for index in 0..context.urls.len() {
            let context = FaultContext {
                nodes: context.nodes.clone(),
                cluster: context.cluster.clone(),
                urls: context.urls.clone(),
                spans: context.spans.clone(),
                down_intervals: context.down_intervals.clone(),
                seed: context.seed.wrapping_add(index as u64 * 104_729),
                ..context
            };
            members.push(tokio::spawn(random_failures(index, random, context)));
        }
        for member in members {
            member.await.context("a random-failure task panicked")??;
        }
        return Ok(());
    }
    let mut at = fault.at;
    loop {
        let start = context.started + at;
        if start >= context.end {
            return Ok(());
        }
        sleep_until(start).await;
        if super::scenario::targets_nodes(&fault.target) {
            play_node_fault(&fault, &context).await?;
            match fault.every {
                Some(every) => {
                    at += every;
                    continue;
                }
                None => return Ok(()),
            }
        }
        let targets = match context.resolve(&fault.target).await {
            Ok(targets) => targets,
            Err(error) => {
                tracing::warn!(%error, kind = fault.kind, "fault skipped");
                Vec::new()
            }
        };
        if !targets.is_empty() {
            let start_seconds = context.now_seconds();
            let fault_end = (Instant::now() + fault.for_duration).min(context.end);
            if fault.kind == "replace" {
                for &index in &targets {
                    if let Err(error) = replace_member(&context, index).await {
                        tracing::warn!(error = %format!("{error:#}"), "replacing a member failed");
                        anyhow::bail!("replacing member m{}: {error:#}", index + 1);
                    }
                }
            } else if fault.kind == "kill" {
                {
                    let mut cluster = context.cluster.lock().expect("not poisoned");
                    for &index in &targets {
                        cluster.kill(index);
                    }
                }
                sleep_until(fault_end).await;
            } else {
                let injected = build_fault(&fault, &targets, &context);
                let members = context.cluster.lock().expect("not poisoned").as_members();
                for &index in &targets {
                    if let Err(error) = crate::chaos::inject_one(
                        &members[index],
                        injected.clone(),
                        fault.for_duration,
                        None,
                    )
                    .await
                    {
                        tracing::warn!(error = %format!("{error:#}"), "injection failed");
                    }
                }
                sleep_until(fault_end).await;
            }
            // A member that stopped (killed, or after an fsync error) comes back now.
            let restarted = context
                .cluster
                .lock()
                .expect("not poisoned")
                .restart_exited()?;
            if !restarted.is_empty() {
                tracing::info!(?restarted, "restarted members after a fault");
            }
            context.spans.lock().expect("not poisoned").push(FaultSpan {
                kind: fault.kind.clone(),
                targets: context.names(&targets),
                start_seconds,
                end_seconds: context.now_seconds(),
                on_nodes: false,
            });
        }
        match fault.every {
            Some(every) => at += every,
            None => return Ok(()),
        }
    }
}

/// Kills (agent and tasks, SIGKILL; restarted after `for`) or pauses (agent, SIGSTOP;
/// continued after `for`) the nodes the fault targets, now.
async fn play_node_fault(fault: &ScheduledFault, context: &FaultContext) -> anyhow::Result<()> {
    let nodes = context
        .nodes
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("a fault on nodes, but no agents"))?;
    let names: Vec<String> = if fault.target == super::scenario::BUSIEST_NODE {
        let addresses = nodes
            .agents
            .lock()
            .expect("not poisoned")
            .answering_addresses();
        let busiest = match &nodes.job {
            Some(job) => nodes::busiest_node(&addresses, job).await,
            None => None,
        };
        match busiest {
            Some(node) => vec![node],
            None => {
                tracing::warn!(kind = fault.kind, "fault skipped: no node runs the job");
                return Ok(());
            }
        }
    } else {
        fault
            .target
            .split(',')
            .map(|name| name.trim().to_owned())
            .collect()
    };
    let indexes: Vec<usize> = {
        let agents = nodes.agents.lock().expect("not poisoned");
        names
            .iter()
            .map(|name| {
                agents
                    .index_of(name)
                    .ok_or_else(|| anyhow::anyhow!("no node is named {name:?}"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let start_seconds = context.now_seconds();
    let fault_end = (Instant::now() + fault.for_duration).min(context.end);
    {
        let mut agents = nodes.agents.lock().expect("not poisoned");
        for &index in &indexes {
            if fault.kind == "kill" {
                agents.kill(index);
            } else {
                agents.pause(index);
            }
        }
    }
    sleep_until(fault_end).await;
    {
        let mut agents = nodes.agents.lock().expect("not poisoned");
        for &index in &indexes {
            if fault.kind == "kill" {
                agents.start(index)?;
            } else {
                agents.resume(index);
            }
        }
    }
    context.spans.lock().expect("not poisoned").push(FaultSpan {
        kind: fault.kind.clone(),
        targets: names,
        start_seconds,
        end_seconds: context.now_seconds(),
        on_nodes: true,
    });
    Ok(())
}

fn build_fault(fault: &ScheduledFault, targets: &[usize], context: &FaultContext) -> Fault {
    let peer_ids: Vec<u64> = {
        let cluster = context.cluster.lock().expect("not poisoned");
        (0..cluster.members.len())
            .filter(|index| !targets.contains(index))
            .map(|index| cluster.members[index].id)
            .collect()
    };
    let direction = fault.direction.as_deref().unwrap_or("both");
    let kind = match fault.kind.as_str() {
        "partition" => fault::Kind::Partition(Partition {
            peer_ids,
            outgoing: direction != "incoming",
            incoming: direction != "outgoing",
        }),
        "drop" => fault::Kind::DropMessages(DropMessages {
            peer_ids,
            fraction: fault.fraction.unwrap_or(0.5),
        }),
        "delay" => fault::Kind::DelayMessages(DelayMessages {
            peer_ids,
            delay_milliseconds: fault
                .delay
                .unwrap_or(Duration::from_millis(100))
                .as_millis() as u64,
            jitter_milliseconds: fault.jitter.unwrap_or_default().as_millis() as u64,
        }),
        "clock" => fault::Kind::ClockRate(ClockRate {
            rate: fault.rate.unwrap_or(0.5),
        }),
        "fsync-error" | "slow-fsync" | "write-error" => fault::Kind::Disk(DiskFault {
            kind: match fault.kind.as_str() {
                "fsync-error" => disk_fault::Kind::FsyncError,
                "slow-fsync" => disk_fault::Kind::SlowFsync,
                _ => disk_fault::Kind::WriteError,
            } as i32,
            delay_milliseconds: fault
                .fsync_delay
                .unwrap_or(Duration::from_millis(200))
                .as_millis() as u64,
        }),
        _ => fault::Kind::Process(ProcessFault {
            kind: process_fault::Kind::Pause as i32,
        }),
    };
    Fault { kind: Some(kind) }
}

/// Retries `attempt` every 200 ms for up to 30 s.
async fn until_ok<T, F, Fut>(what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if Instant::now() >= deadline => anyhow::bail!("{what}: {error}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Replaces a member as an operator does after losing its machine: stop it, remove it
/// from the membership, wipe its data, add a fresh member with the same peer URL as a
/// learner, start it empty, and promote it once it has caught up.
async fn replace_member(context: &FaultContext, index: usize) -> anyhow::Result<()> {
    use keel_server::api::etcdserverpb::cluster_client::ClusterClient;
    use keel_types::etcdserverpb::{
        MemberAddRequest, MemberListRequest, MemberPromoteRequest, MemberRemoveRequest,
    };
    let (old_id, peer_url, data_dir) = {
        let mut cluster = context.cluster.lock().expect("not poisoned");
        cluster.kill(index);
        let member = &cluster.members[index];
        (
            member.id,
            format!("http://127.0.0.1:{}", member.peer_port),
            cluster.directory.join(&member.name),
        )
    };
    let others: Vec<String> = (0..context.urls.len())
        .filter(|&other| other != index)
        .map(|other| context.urls[other].clone())
        .collect();
    let cluster_client = |attempt: usize| {
        let url = others[attempt % others.len()].clone();
        async move {
            connect(&url, Duration::from_millis(500))
                .await
                .map(ClusterClient::new)
                .ok_or_else(|| format!("{url} does not answer"))
        }
    };
    let mut attempt = 0usize;
    until_ok("member remove", || {
        attempt += 1;
        let client = cluster_client(attempt);
        async move {
            match client
                .await?
                .member_remove(MemberRemoveRequest { id: old_id })
                .await
            {
                Ok(_) => Ok(()),
                // An earlier attempt that timed out took effect.
                Err(status) if status.message().contains("not found") => Ok(()),
                Err(status) => Err(status.message().to_owned()),
            }
        }
    })
    .await?;
    match std::fs::remove_dir_all(&data_dir) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            return Err(error).with_context(|| format!("wiping {}", data_dir.display()))
        }
        _ => {}
    }
    let new_id = until_ok("member add", || {
        attempt += 1;
        let client = cluster_client(attempt);
        let peer_url = peer_url.clone();
        async move {
            let mut client = client.await?;
            let added = client
                .member_add(MemberAddRequest {
                    peer_ur_ls: vec![peer_url.clone()],
                    is_learner: true,
                })
                .await;
            match added {
                Ok(response) => response
                    .into_inner()
                    .member
                    .map(|member| member.id)
                    .ok_or_else(|| "no member in the answer".to_owned()),
                Err(status) if status.message().contains("already exists") => client
                    .member_list(MemberListRequest::default())
                    .await
                    .map_err(|status| status.message().to_owned())?
                    .into_inner()
                    .members
                    .into_iter()
                    .find(|member| member.peer_ur_ls.contains(&peer_url))
                    .map(|member| member.id)
                    .ok_or_else(|| "the added member is not listed".to_owned()),
                Err(status) => Err(status.message().to_owned()),
            }
        }
    })
    .await?;
    {
        let mut cluster = context.cluster.lock().expect("not poisoned");
        cluster.members[index].joining = true;
        cluster.members[index].id = new_id;
        cluster.start(index)?;
    }
    until_ok("member promote", || {
        attempt += 1;
        let client = cluster_client(attempt);
        async move {
            match client
                .await?
                .member_promote(MemberPromoteRequest { id: new_id })
                .await
            {
                Ok(_) => Ok(()),
                Err(status) if status.message().contains("not a learner") => Ok(()),
                Err(status) => Err(status.message().to_owned()),
            }
        }
    })
    .await
}

/// One member failing after Exp(λ) up and coming back after Exp(μ) down, until the end.
async fn random_failures(
    index: usize,
    rates: RandomFailures,
    context: FaultContext,
) -> anyhow::Result<()> {
    let mut random = StdRng::seed_from_u64(context.seed);
    let mut exponential =
        |rate: f64| Duration::from_secs_f64(-(1.0 - random.gen::<f64>()).ln() / rate);
    loop {
        let up = exponential(rates.failure_rate_per_second);
        let failure = Instant::now() + up;
        if failure >= context.end {
            return Ok(());
        }
        sleep_until(failure).await;
        let down_start = context.now_seconds();
        context.cluster.lock().expect("not poisoned").kill(index);
        let repair = (Instant::now() + exponential(rates.repair_rate_per_second)).min(context.end);
        sleep_until(repair).await;
        context.cluster.lock().expect("not poisoned").start(index)?;
        let down_end = context.now_seconds();
        context
            .down_intervals
            .lock()
            .expect("not poisoned")
            .push((index, down_start, down_end));
        context.spans.lock().expect("not poisoned").push(FaultSpan {
            kind: "random-kill".to_owned(),
            targets: context.names(&[index]),
            start_seconds: down_start,
            end_seconds: down_end,
            on_nodes: false,
        });
    }
}

fn microseconds_since(started: Instant) -> u64 {
    started.elapsed().as_micros() as u64
}

fn error_kind(status: &tonic::Status) -> String {
    format!("{:?}", status.code())
}

/// One workload client: paced requests to one member at a time, moving to the next
/// member after any error, each request and its outcome recorded.
async fn client_loop(
    client_id: u64,
    urls: Vec<String>,
    workload: super::scenario::Workload,
    seed: u64,
    started: Instant,
    end: Instant,
    history: Arc<Mutex<Vec<HistoryOperation>>>,
) {
    let mut random = StdRng::seed_from_u64(seed);
    let mut endpoint = client_id as usize % urls.len();
    let mut client: Option<KvClient<Channel>> = None;
    let mut known: BTreeMap<String, Option<String>> = BTreeMap::new();
    let interval = Duration::from_secs_f64(1.0 / workload.rate_per_client);
    let mut next = Instant::now();
    let mut sequence = 0u64;
    while Instant::now() < end {
        sleep_until(next).await;
        next = (next + interval).max(Instant::now());
        if client.is_none() {
            client = connect(&urls[endpoint], Duration::from_millis(500))
                .await
                .map(KvClient::new);
            if client.is_none() {
                endpoint = (endpoint + 1) % urls.len();
                record_connection_failure(&history, client_id, started);
                continue;
            }
        }
        let kv = client.as_mut().expect("connected above");
        let key = format!("k{}", random.gen_range(0..workload.keys));
        sequence += 1;
        let value = format!("c{client_id}-{sequence}");
        let choice: f64 = random.gen();
        let call_time = microseconds_since(started);
        let (input, result) = if choice < workload.read_fraction {
            let request = RangeRequest {
                key: key.clone().into_bytes(),
                ..Default::default()
            };
            let result = tokio::time::timeout(workload.request_timeout, kv.range(request)).await;
            let result = flatten(result).map(|response| {
                let response = response.into_inner();
                let found = response.kvs.first();
                HistoryOutput::Get {
                    value: found.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()),
                    mod_revision: found.map_or(0, |kv| kv.mod_revision as u64),
                    revision: response.header.map_or(0, |header| header.revision as u64),
                }
            });
            (
                HistoryInput::Get {
                    key: key.clone(),
                    serializable: false,
                },
                result,
            )
        } else if choice < workload.read_fraction + workload.transaction_fraction {
            let expected = known.get(&key).cloned().flatten();
            let compare = match &expected {
                Some(value) => Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Value as i32,
                    key: key.clone().into_bytes(),
                    target_union: Some(TargetUnion::Value(value.clone().into_bytes())),
                    ..Default::default()
                },
                None => Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Create as i32,
                    key: key.clone().into_bytes(),
                    target_union: Some(TargetUnion::CreateRevision(0)),
                    ..Default::default()
                },
            };
            let request = TxnRequest {
                compare: vec![compare],
                success: vec![RequestOp {
                    request: Some(Request::RequestPut(PutRequest {
                        key: key.clone().into_bytes(),
                        value: value.clone().into_bytes(),
                        ..Default::default()
                    })),
                }],
                failure: vec![],
            };
            let result = tokio::time::timeout(workload.request_timeout, kv.txn(request)).await;
            let result = flatten(result).map(|response| {
                let response = response.into_inner();
                HistoryOutput::CompareAndSwap {
                    succeeded: response.succeeded,
                    revision: response.header.map_or(0, |header| header.revision as u64),
                }
            });
            (
                HistoryInput::CompareAndSwap {
                    key: key.clone(),
                    expected,
                    new_value: value.clone(),
                },
                result,
            )
        } else {
            let request = PutRequest {
                key: key.clone().into_bytes(),
                value: value.clone().into_bytes(),
                ..Default::default()
            };
            let result = tokio::time::timeout(workload.request_timeout, kv.put(request)).await;
            let result = flatten(result).map(|response| HistoryOutput::Put {
                revision: response
                    .into_inner()
                    .header
                    .map_or(0, |header| header.revision as u64),
            });
            (
                HistoryInput::Put {
                    key: key.clone(),
                    value: value.clone(),
                },
                result,
            )
        };
        let return_time = microseconds_since(started);
        let operation = match result {
            Ok(output) => {
                match &output {
                    HistoryOutput::Get { value, .. } => {
                        known.insert(key, value.clone());
                    }
                    HistoryOutput::Put { .. } => {
                        known.insert(key, Some(value));
                    }
                    HistoryOutput::CompareAndSwap {
                        succeeded: true, ..
                    } => {
                        known.insert(key, Some(value));
                    }
                    _ => {
                        known.remove(&key);
                    }
                }
                HistoryOperation {
                    client_id,
                    call_time,
                    return_time: Some(return_time),
                    input,
                    output,
                    error: None,
                }
            }
            Err(error) => {
                // The outcome is unknown: a write may still take effect. What this client
                // believed about the key no longer holds.
                known.remove(&key);
                client = None;
                endpoint = (endpoint + 1) % urls.len();
                HistoryOperation {
                    client_id,
                    call_time,
                    return_time: None,
                    input,
                    output: HistoryOutput::Unknown,
                    error: Some(error),
                }
            }
        };
        let mut history = history.lock().expect("not poisoned");
        if history.len() < HISTORY_OPERATIONS_MAX {
            history.push(operation);
        }
    }
}

fn flatten<T>(
    result: Result<Result<tonic::Response<T>, tonic::Status>, tokio::time::error::Elapsed>,
) -> Result<tonic::Response<T>, String> {
    match result {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(status)) => Err(error_kind(&status)),
        Err(_) => Err("ClientTimeout".to_owned()),
    }
}

/// A failed connection is an error a user would see, but no operation: it is kept as a
/// read with an unknown outcome (which the checker ignores) so errors by kind count it.
fn record_connection_failure(
    history: &Arc<Mutex<Vec<HistoryOperation>>>,
    client_id: u64,
    started: Instant,
) {
    let mut history = history.lock().expect("not poisoned");
    if history.len() < HISTORY_OPERATIONS_MAX {
        history.push(HistoryOperation {
            client_id,
            call_time: microseconds_since(started),
            return_time: None,
            input: HistoryInput::Get {
                key: "k0".to_owned(),
                serializable: false,
            },
            output: HistoryOutput::Unknown,
            error: Some("ConnectFailed".to_owned()),
        });
    }
}

/// Reads every acknowledged write back at its own revision: it must be there, with its
/// value. Returns how many are missing.
async fn lost_acknowledged_writes(
    urls: &[String],
    operations: &[HistoryOperation],
) -> anyhow::Result<u64> {
    let mut lost = 0u64;
    let mut client: Option<KvClient<Channel>> = None;
    let mut endpoint = 0usize;
    for operation in operations {
        let (key, value, revision) = match (&operation.input, &operation.output) {
            (HistoryInput::Put { key, value }, HistoryOutput::Put { revision }) => {
                (key, value, *revision)
            }
            (
                HistoryInput::CompareAndSwap { key, new_value, .. },
                HistoryOutput::CompareAndSwap {
                    succeeded: true,
                    revision,
                },
            ) => (key, new_value, *revision),
            _ => continue,
        };
        let mut attempts = 0;
        let found = loop {
            attempts += 1;
            anyhow::ensure!(
                attempts <= 20,
                "cannot read back acknowledged writes: no member answers"
            );
            if client.is_none() {
                client = connect(&urls[endpoint], Duration::from_secs(1))
                    .await
                    .map(KvClient::new);
            }
            let Some(kv) = client.as_mut() else {
                endpoint = (endpoint + 1) % urls.len();
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let request = RangeRequest {
                key: key.clone().into_bytes(),
                revision: revision as i64,
                ..Default::default()
            };
            match tokio::time::timeout(Duration::from_secs(5), kv.range(request)).await {
                Ok(Ok(response)) => break response.into_inner().kvs.into_iter().next(),
                // "required revision is a future revision": the store never reached (or
                // lost) the revision this write was acknowledged at.
                Ok(Err(status))
                    if status.code() == tonic::Code::OutOfRange
                        && status.message().contains("future") =>
                {
                    break None
                }
                _ => {
                    client = None;
                    endpoint = (endpoint + 1) % urls.len();
                }
            }
        };
        let intact = found
            .is_some_and(|kv| kv.value == value.as_bytes() && kv.mod_revision as u64 == revision);
        if !intact {
            tracing::error!(key, value, revision, "an acknowledged write is lost");
            lost += 1;
        }
    }
    Ok(lost)
}

fn write_history(path: &Path, operations: &[HistoryOperation]) -> anyhow::Result<()> {
    // Failed reads change nothing and are left out; failed writes stay, unknown.
    let kept: Vec<&HistoryOperation> = operations
        .iter()
        .filter(|operation| operation.is_write() || operation.return_time.is_some())
        .collect();
    let file =
        std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?;
    serde_json::to_writer(
        std::io::BufWriter::new(file),
        &serde_json::json!({ "operations": kept }),
    )?;
    Ok(())
}

/// The keel-check verdict on the history file.
fn check_history(explicit: Option<&Path>, history: &Path) -> String {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|executable| {
            executable
                .parent()
                .map(|directory| directory.join("keel-check"))
        })
        .filter(|path| path.exists());
    let program = explicit
        .map(Path::to_path_buf)
        .or(beside)
        .unwrap_or_else(|| PathBuf::from("keel-check"));
    match Command::new(&program)
        .args(["--timeout-seconds", &CHECK_TIMEOUT_SECONDS.to_string()])
        .arg(history)
        .output()
    {
        Ok(output) => match output.status.code() {
            Some(0) => "linearizable".to_owned(),
            Some(1) => format!(
                "violation: {}",
                String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .take(5)
                    .collect::<Vec<_>>()
                    .join(" / ")
            ),
            Some(2) => "undecided (the search hit its limit)".to_owned(),
            _ => format!(
                "not checked: keel-check failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        },
        Err(error) => format!(
            "not checked: cannot run {} ({error}); build it with cargo build -p keel-check",
            program.display()
        ),
    }
}
