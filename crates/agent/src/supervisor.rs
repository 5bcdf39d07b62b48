//! The supervisor: runs the allocations the controller placed on this node
//! (`/keel/allocs/<node>/<alloc id>`) and reports them
//! (`/keel/alloc-status/<alloc id>`), Nomad's client side.
//!
//! - The agent's one watch of `/keel/` feeds [`SupervisorView`] with the
//!   allocations and statuses of every node, which the HTTP API reads and
//!   the reconcile loop compares with the runners it has.
//! - One runner per allocation of this node wanted running: each task of
//!   the group is started with [`keel_scheduler::task_launch`] in a process
//!   group of its own, under the limits of [`resource_limits`], its output
//!   in rotated files ([`logs`]); its `service` blocks are registered in the
//!   agent's local registry while it runs ([`services`]); when it ends,
//!   [`RestartTracker::on_task_end`] decides (restart after a delay, fail,
//!   complete). A liveness check turning critical kills the task's group
//!   and counts as a failure.
//! - Desired `stop`, a deleted allocation, or this agent cut off from the
//!   store longer than the group's `disconnect.stop_on_client_after`
//!   ([`stop_after_client_disconnect`]): SIGTERM to the group, SIGKILL
//!   after [`KILL_TIMEOUT`]; the status turns `complete`.
//! - Statuses are written whenever they change, retried while the store is
//!   away (the newest status wins; older unwritten ones are skipped).
//! - An agent started again after a crash kills the process groups its
//!   previous life recorded (`<data-dir>/allocs/<id>/pids`) and starts the
//!   allocations afresh with the restart tracker and counts persisted in
//!   their statuses (so a crash grants no fresh attempts).
//! - Every [`USAGE_INTERVAL`], the CPU use of each allocation's processes
//!   (sysinfo) is gossiped (`alloc_cpu_millicores:<alloc id>`).

pub mod logs;
pub mod process;
pub mod resource_limits;
pub mod services;
pub mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::Duration;

use keel_client::Client;
use keel_scheduler::{
    stop_after_client_disconnect, task_launch, Allocation, ClientStatus, DesiredStatus, Group,
    JobState, JobType, RestartDecision, Task, TaskEnd, Time,
};
use tokio::sync::{watch, Notify};
use tokio::task::{JoinHandle, JoinSet};

use crate::agent::Shared;
use crate::check_state::{CheckKind, CheckStatus};
use crate::events::{self, EventType};
use crate::gossip::Gossip;
use crate::local::Source;
use process::RecordedProcess;
use resource_limits::Limiter;
use status::{AllocationStatus, TaskState, ALLOCS_PREFIX, JOBS_PREFIX, STATUS_PREFIX};

/// Time a task's process group gets between SIGTERM and SIGKILL (Nomad's
/// default `kill_timeout`).
pub const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the reconcile loop runs even when nothing changed (for the
/// disconnect deadline and finished runners).
const RECONCILE_TICK: Duration = Duration::from_secs(1);
/// How often a running task's checks are looked at (liveness, readiness).
const HEALTH_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How often each allocation's CPU use is sampled and gossiped.
pub const USAGE_INTERVAL: Duration = Duration::from_secs(2);
/// The directory under `--data-dir` holding one directory per allocation.
pub const ALLOCS_DIRECTORY: &str = "allocs";
/// Longest the reconcile loop waits for a job spec from the store.
const JOB_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Most allocations (of all nodes) the view holds; beyond, new ones are
/// ignored with an error in the log.
pub const VIEW_ALLOCATIONS_MAX: usize = 100_000;
/// Most finished allocation directories (logs) kept on disk; the oldest
/// are removed beyond.
pub const FINISHED_DIRECTORIES_KEPT: usize = 64;
/// First pause after a failed store request.
const STORE_RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest pause between two attempts at an unreachable store.
const STORE_RETRY_MAX: Duration = Duration::from_secs(2);
/// Longest the final status of a stopping allocation may wait before the
/// log copiers are given up on.
const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Now, as the scheduler's time (Unix milliseconds).
pub fn now() -> Time {
    Time(events::now_unix_ms())
}

/// Allocations and statuses of every node, as the watch last saw them.
#[derive(Debug, Default, Clone)]
pub struct AllocationsView {
    /// The desired halves, by allocation id.
    pub allocations: BTreeMap<String, Allocation>,
    /// The statuses, by allocation id.
    pub statuses: BTreeMap<String, AllocationStatus>,
    /// The first listing arrived.
    pub listed: bool,
    /// This node's allocations' CPU use at the last sample (also gossiped).
    pub cpu_millicores: BTreeMap<String, u64>,
}

/// What the supervisor shares with the HTTP API.
#[derive(Debug, Default)]
pub struct SupervisorView {
    state: RwLock<AllocationsView>,
    changed: Notify,
}

impl SupervisorView {
    pub fn read(&self) -> RwLockReadGuard<'_, AllocationsView> {
        self.state.read().expect("supervisor view lock")
    }

    /// Replaces the view with a listing of `/keel/` (the agent's watch
    /// lists again after a break).
    pub fn reset(&self, listing: &[keel_client::keel_types::mvccpb::KeyValue]) {
        {
            let mut state = self.state.write().expect("supervisor view lock");
            state.allocations.clear();
            state.statuses.clear();
        }
        for kv in listing {
            let key = String::from_utf8_lossy(&kv.key);
            if key.starts_with(ALLOCS_PREFIX) || key.starts_with(STATUS_PREFIX) {
                self.apply_inner(&key, Some(&kv.value));
            }
        }
        self.state.write().expect("supervisor view lock").listed = true;
        self.changed.notify_one();
    }

    /// Takes one change of a key of `/keel/` (keys outside the allocations
    /// and statuses are ignored); `None` is a deletion.
    pub fn apply(&self, key: &str, value: Option<&[u8]>) {
        if !key.starts_with(ALLOCS_PREFIX) && !key.starts_with(STATUS_PREFIX) {
            return;
        }
        self.apply_inner(key, value);
        self.changed.notify_one();
    }

    fn apply_inner(&self, key: &str, value: Option<&[u8]>) {
        let mut state = self.state.write().expect("supervisor view lock");
        if let Some(rest) = key.strip_prefix(ALLOCS_PREFIX) {
            let Some((_node, id)) = rest.split_once('/') else {
                return;
            };
            match value {
                None => {
                    state.allocations.remove(id);
                }
                Some(bytes) => match serde_json::from_slice::<Allocation>(bytes) {
                    Ok(allocation) => {
                        if state.allocations.len() >= VIEW_ALLOCATIONS_MAX
                            && !state.allocations.contains_key(id)
                        {
                            tracing::error!(%key, "more than {VIEW_ALLOCATIONS_MAX} allocations; ignored");
                            return;
                        }
                        state.allocations.insert(id.to_string(), allocation);
                    }
                    Err(error) => {
                        tracing::warn!(%key, %error, "an allocation that does not decode; skipped")
                    }
                },
            }
        } else if let Some(id) = key.strip_prefix(STATUS_PREFIX) {
            match value {
                None => {
                    state.statuses.remove(id);
                }
                Some(bytes) => match AllocationStatus::from_json(bytes) {
                    Ok(status) => {
                        if state.statuses.len() >= VIEW_ALLOCATIONS_MAX
                            && !state.statuses.contains_key(id)
                        {
                            return;
                        }
                        state.statuses.insert(id.to_string(), status);
                    }
                    Err(error) => {
                        tracing::warn!(%key, %error, "an allocation status that does not decode; skipped")
                    }
                },
            }
        }
    }
}

/// Starts the supervisor's tasks; they end when the returned handle is
/// aborted (dropping the agent), leaving the tasks' processes running as a
/// crash would.
pub fn spawn(shared: Arc<Shared>, gossip: Arc<Gossip>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let allocs_dir = shared.config.data_dir.join(ALLOCS_DIRECTORY);
        let killed = {
            let allocs_dir = allocs_dir.clone();
            tokio::task::spawn_blocking(move || process::kill_leftovers(&allocs_dir))
                .await
                .unwrap_or_default()
        };
        let limiter = Arc::new(
            tokio::task::spawn_blocking(Limiter::detect)
                .await
                .unwrap_or(Limiter::Rlimits {
                    reason: "detection failed".into(),
                }),
        );
        let mut supervisor = Supervisor {
            shared,
            gossip,
            limiter,
            allocs_dir,
            runners: BTreeMap::new(),
            jobs: BTreeMap::new(),
            leftovers: killed,
            last_store_contact: now(),
            cleanups: JoinSet::new(),
            done: BTreeSet::new(),
            deleting: BTreeSet::new(),
            system: process_sampler(),
        };
        supervisor.run().await;
    })
}

/// Whether an allocation id is safe as a directory name (the controller
/// draws UUID-shaped ids).
fn valid_alloc_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= crate::definition::NAME_BYTES_MAX
        && id
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || matches!(character, '-' | '_'))
}

/// Why an allocation's job spec could not be had.
enum JobError {
    /// The store did not answer: try again later.
    Unavailable(String),
    /// The job or its version is not there (or unreadable): the allocation
    /// cannot run, ever.
    Missing(String),
}

/// Why a runner's tasks must stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Desire {
    Run,
    /// The controller wants it stopped.
    Stop,
    /// The allocation key was deleted.
    Gone,
    /// The agent was cut off from the store longer than the group allows.
    Disconnected,
    /// Another task of the allocation failed for good.
    SiblingFailed,
}

/// One allocation being run.
struct Runner {
    desire: watch::Sender<Desire>,
    handle: JoinHandle<()>,
    run: Arc<AllocationRun>,
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

struct Supervisor {
    shared: Arc<Shared>,
    gossip: Arc<Gossip>,
    limiter: Arc<Limiter>,
    allocs_dir: PathBuf,
    runners: BTreeMap<String, Runner>,
    /// Job specs by (job, version): a version never changes once written.
    jobs: BTreeMap<(String, u64), Arc<JobState>>,
    /// Process groups killed at start, by allocation (for its events).
    leftovers: BTreeMap<String, Vec<u32>>,
    last_store_contact: Time,
    /// Status writes and deletions of allocations without a runner.
    cleanups: JoinSet<()>,
    /// Allocations of this node that ran here for good (or never will).
    done: BTreeSet<String>,
    /// Statuses being deleted.
    deleting: BTreeSet<String>,
    system: sysinfo::System,
}

impl Supervisor {
    async fn run(&mut self) {
        let mut usage_ticker = tokio::time::interval(USAGE_INTERVAL);
        usage_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shared.supervisor.changed.notified() => {}
                _ = tokio::time::sleep(RECONCILE_TICK) => {}
                _ = usage_ticker.tick() => {
                    self.publish_usage().await;
                    continue;
                }
            }
            while self.cleanups.try_join_next().is_some() {}
            self.reconcile().await;
        }
    }

    async fn reconcile(&mut self) {
        let node = self.shared.config.name.clone();
        let now = now();
        if !self.shared.view.read().expect("view lock").stale() {
            self.last_store_contact = now;
        }
        let (own, statuses, listed) = {
            let view = self.shared.supervisor.read();
            let own: BTreeMap<String, Allocation> = view
                .allocations
                .iter()
                .filter(|(_, allocation)| allocation.node == node)
                .map(|(id, allocation)| (id.clone(), allocation.clone()))
                .collect();
            let statuses: BTreeMap<String, AllocationStatus> = view
                .statuses
                .iter()
                .filter(|(id, status)| status.node == node || own.contains_key(*id))
                .map(|(id, status)| (id.clone(), status.clone()))
                .collect();
            (own, statuses, view.listed)
        };
        if !listed {
            return;
        }
        // Finished runners: their allocation ran here for good (a stopped
        // or failed allocation never runs again; ids are never reused).
        let finished: Vec<String> = self
            .runners
            .iter()
            .filter(|(_, runner)| runner.handle.is_finished())
            .map(|(id, _)| id.clone())
            .collect();
        for id in finished {
            self.runners.remove(&id);
            self.done.insert(id);
        }
        for (id, runner) in &self.runners {
            let desire = match own.get(id) {
                None => Desire::Gone,
                Some(allocation) if allocation.desired_status != DesiredStatus::Run => Desire::Stop,
                Some(_)
                    if stop_after_client_disconnect(
                        &runner.run.group.disconnect,
                        self.last_store_contact,
                        now,
                    ) =>
                {
                    Desire::Disconnected
                }
                Some(_) => Desire::Run,
            };
            runner.desire.send_if_modified(|current| {
                // A stop is for good; only a deletion replaces its reason.
                let replace = *current == Desire::Run || desire == Desire::Gone;
                if replace && *current != desire && desire != Desire::Run {
                    *current = desire;
                    true
                } else {
                    false
                }
            });
        }
        for (id, allocation) in &own {
            if self.runners.contains_key(id) || self.done.contains(id) {
                continue;
            }
            if !valid_alloc_id(id) {
                // It names a directory under --data-dir: nothing that could
                // walk out of it is run.
                tracing::error!(alloc = %id, "an allocation id that is not letters, digits, `-` and `_`; not run");
                self.done.insert(id.clone());
                continue;
            }
            let stored = statuses.get(id);
            if stored.is_some_and(|status| status.client.status.is_terminal()) {
                self.done.insert(id.clone());
                continue;
            }
            if allocation.desired_status != DesiredStatus::Run {
                // Stopped before it ran here (or while this agent was
                // away, its processes killed at start): say so.
                self.done.insert(id.clone());
                let mut status = stored
                    .cloned()
                    .unwrap_or_else(|| AllocationStatus::pending(id, &node, std::iter::empty()));
                status.finish(ClientStatus::Complete, now);
                self.cleanups
                    .spawn(put_status(self.shared.client.clone(), status));
                continue;
            }
            match self.job(&allocation.job, allocation.job_version).await {
                Ok(job) => self.start_runner(allocation.clone(), stored.cloned(), job),
                Err(JobError::Unavailable(reason)) => {
                    // The store is away: try again at the next reconcile.
                    tracing::warn!(alloc = %id, %reason, "cannot read the allocation's job yet");
                }
                Err(JobError::Missing(reason)) => {
                    tracing::error!(alloc = %id, %reason, "cannot run the allocation");
                    self.done.insert(id.clone());
                    let mut status = stored.cloned().unwrap_or_else(|| {
                        AllocationStatus::pending(id, &node, std::iter::empty())
                    });
                    for task in status.tasks.values_mut() {
                        task.event(now, format!("Not started: {reason}"));
                    }
                    status.finish(ClientStatus::Failed, now);
                    self.shared.events.record(
                        EventType::AllocationFailed,
                        id.clone(),
                        format!("allocation {id} of job {} failed: {reason}", allocation.job),
                        [("job".to_string(), allocation.job.clone())],
                    );
                    self.cleanups
                        .spawn(put_status(self.shared.client.clone(), status));
                }
            }
        }
        // Statuses of this node's allocations that the controller deleted:
        // removed once nothing runs them.
        for (id, status) in &statuses {
            if status.node == node
                && !own.contains_key(id)
                && !self.runners.contains_key(id)
                && self.deleting.insert(id.clone())
            {
                self.cleanups
                    .spawn(delete_status(self.shared.client.clone(), id.clone()));
            }
        }
        self.done.retain(|id| own.contains_key(id));
        self.deleting.retain(|id| statuses.contains_key(id));
        self.jobs.retain(|(job, version), _| {
            own.values()
                .any(|allocation| allocation.job == *job && allocation.job_version == *version)
        });
        self.collect_finished_directories(&own);
    }

    /// The job state holding `version` of `job` (read from the store once
    /// per version: a version never changes).
    async fn job(&mut self, job: &str, version: u64) -> Result<Arc<JobState>, JobError> {
        if let Some(state) = self.jobs.get(&(job.to_string(), version)) {
            return Ok(state.clone());
        }
        let key = format!("{JOBS_PREFIX}{job}");
        let read = tokio::time::timeout(JOB_READ_TIMEOUT, self.shared.client.get(key.clone()))
            .await
            .map_err(|_| {
                JobError::Unavailable(format!("no answer for {key} within {JOB_READ_TIMEOUT:?}"))
            })?
            .map_err(|error| JobError::Unavailable(format!("cannot read {key}: {error}")))?;
        let kv = read.ok_or_else(|| JobError::Missing(format!("job {job:?} not found ({key})")))?;
        let state: JobState = serde_json::from_slice(&kv.value)
            .map_err(|error| JobError::Missing(format!("{key} does not decode: {error}")))?;
        if state.version(version).is_none() {
            return Err(JobError::Missing(format!(
                "job {job:?} has no version {version}"
            )));
        }
        let state = Arc::new(state);
        self.jobs.insert((job.to_string(), version), state.clone());
        Ok(state)
    }

    fn start_runner(
        &mut self,
        allocation: Allocation,
        stored: Option<AllocationStatus>,
        job: Arc<JobState>,
    ) {
        let version = job
            .version(allocation.job_version)
            .expect("checked when read");
        let job_type = version.job.job_type;
        let Some(group) = version.job.groups.get(&allocation.group).cloned() else {
            tracing::error!(alloc = %allocation.id, group = %allocation.group, "the allocation's group is not in its job version");
            let mut status = stored.unwrap_or_else(|| {
                AllocationStatus::pending(&allocation.id.0, &allocation.node, std::iter::empty())
            });
            status.finish(ClientStatus::Failed, now());
            self.cleanups
                .spawn(put_status(self.shared.client.clone(), status));
            return;
        };
        let id = allocation.id.0.clone();
        let mut status = AllocationStatus::pending(
            &id,
            &allocation.node,
            group.tasks.keys().map(String::as_str),
        );
        // What a previous life of this agent (or an earlier runner)
        // reported: restart counts and the tracker carry over.
        if let Some(stored) = stored {
            status.restart_tracker = stored.restart_tracker;
            status.client.started_at = stored.client.started_at;
            for (name, task) in status.tasks.iter_mut() {
                if let Some(previous) = stored.tasks.get(name) {
                    task.restarts = previous.restarts;
                    task.last_exit_code = previous.last_exit_code;
                    task.last_signal = previous.last_signal;
                    task.events = previous.events.clone();
                }
            }
        }
        if let Some(pids) = self.leftovers.remove(&id) {
            let now = now();
            for task in status.tasks.values_mut() {
                task.event(
                    now,
                    format!("Agent restarted: killed the process groups {pids:?} left by its previous run; starting afresh"),
                );
            }
        }
        let alloc_dir = self.allocs_dir.join(&id);
        let (status_sender, status_receiver) = watch::channel(status.clone());
        let (desire, desire_receiver) = watch::channel(Desire::Run);
        let run = Arc::new(AllocationRun {
            shared: self.shared.clone(),
            allocation,
            job_type,
            group,
            alloc_dir,
            limiter: self.limiter.clone(),
            status: Mutex::new(status),
            publish: status_sender,
            pids: Mutex::new(BTreeMap::new()),
            desire: desire.clone(),
            limits_detail: Mutex::new(BTreeMap::new()),
            failed: AtomicBool::new(false),
        });
        let handle = tokio::spawn(run_allocation(
            run.clone(),
            desire_receiver,
            status_receiver,
        ));
        self.runners.insert(
            id,
            Runner {
                desire,
                handle,
                run,
            },
        );
    }

    /// Samples the CPU use of every running allocation's processes and
    /// gossips it.
    async fn publish_usage(&mut self) {
        let leaders: BTreeMap<String, Vec<u32>> = self
            .runners
            .iter()
            .map(|(id, runner)| {
                let pids = runner.run.pids.lock().expect("pids lock");
                (
                    id.clone(),
                    pids.values().map(|process| process.pid).collect(),
                )
            })
            .filter(|(_, pids): &(String, Vec<u32>)| !pids.is_empty())
            .collect();
        let usage = if leaders.is_empty() {
            BTreeMap::new()
        } else {
            self.system.refresh_processes_specifics(
                sysinfo::ProcessesToUpdate::All,
                true,
                sysinfo::ProcessRefreshKind::nothing().with_cpu(),
            );
            cpu_millicores(&self.system, leaders)
        };
        self.shared
            .supervisor
            .state
            .write()
            .expect("supervisor view lock")
            .cpu_millicores = usage.clone();
        self.gossip.publish_allocation_usage(&usage).await;
    }

    /// Removes the oldest directories of allocations that are not running
    /// here any more, beyond [`FINISHED_DIRECTORIES_KEPT`].
    fn collect_finished_directories(&self, own: &BTreeMap<String, Allocation>) {
        let Ok(entries) = std::fs::read_dir(&self.allocs_dir) else {
            return;
        };
        let mut finished: Vec<(std::time::SystemTime, PathBuf)> = entries
            .flatten()
            .filter(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                !self.runners.contains_key(&name)
                    && !own
                        .get(&name)
                        .is_some_and(|allocation| allocation.desired_status == DesiredStatus::Run)
            })
            .filter_map(|entry| {
                let modified = entry
                    .metadata()
                    .and_then(|metadata| metadata.modified())
                    .ok()?;
                Some((modified, entry.path()))
            })
            .collect();
        if finished.len() <= FINISHED_DIRECTORIES_KEPT {
            return;
        }
        finished.sort();
        let excess = finished.len() - FINISHED_DIRECTORIES_KEPT;
        for (_, path) in finished.into_iter().take(excess) {
            if let Err(error) = std::fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), %error, "cannot remove a finished allocation's directory");
            }
        }
    }
}

/// A sysinfo system for per-process CPU use: processes' CPU use is a share
/// of the machine's CPU time, so the CPU list must be known first.
fn process_sampler() -> sysinfo::System {
    sysinfo::System::new_with_specifics(
        sysinfo::RefreshKind::nothing()
            .with_cpu(sysinfo::CpuRefreshKind::nothing().with_cpu_usage()),
    )
}

/// The CPU use of each allocation, in millicores: the sum over its task
/// leaders and all their descendants, from `system`'s last two refreshes.
fn cpu_millicores(
    system: &sysinfo::System,
    leaders: BTreeMap<String, Vec<u32>>,
) -> BTreeMap<String, u64> {
    let mut children: BTreeMap<sysinfo::Pid, Vec<sysinfo::Pid>> = BTreeMap::new();
    for (pid, process) in system.processes() {
        if let Some(parent) = process.parent() {
            children.entry(parent).or_default().push(*pid);
        }
    }
    leaders
        .into_iter()
        .map(|(id, pids)| {
            let mut percent = 0f32;
            let mut pending: Vec<sysinfo::Pid> =
                pids.into_iter().map(sysinfo::Pid::from_u32).collect();
            let mut seen = BTreeSet::new();
            while let Some(pid) = pending.pop() {
                if !seen.insert(pid) {
                    continue;
                }
                if let Some(process) = system.process(pid) {
                    percent += process.cpu_usage();
                }
                if let Some(descendants) = children.get(&pid) {
                    pending.extend(descendants.iter().copied());
                }
            }
            // sysinfo gives percent of one core; 100 % = 1,000 millicores.
            (id, (percent * 10.0).round() as u64)
        })
        .collect()
}

/// Writes a status, retrying until the store takes it.
async fn put_status(client: Client, status: AllocationStatus) {
    let key = status::status_key(&status.alloc_id);
    let value = status.to_json();
    let mut retry_delay = STORE_RETRY_MIN;
    while let Err(error) = client.put(key.clone(), value.clone()).await {
        tracing::warn!(%key, %error, "cannot write an allocation status; retrying");
        tokio::time::sleep(retry_delay).await;
        retry_delay = (retry_delay * 2).min(STORE_RETRY_MAX);
    }
}

/// Deletes a status, retrying until the store takes it.
async fn delete_status(client: Client, alloc_id: String) {
    let key = status::status_key(&alloc_id);
    let mut retry_delay = STORE_RETRY_MIN;
    while let Err(error) = client.delete(key.clone()).await {
        tracing::warn!(%key, %error, "cannot delete an allocation status; retrying");
        tokio::time::sleep(retry_delay).await;
        retry_delay = (retry_delay * 2).min(STORE_RETRY_MAX);
    }
}

/// Writes each new status of one allocation, the newest first: a status
/// superseded while the store was away is never written.
async fn write_statuses(client: Client, mut receiver: watch::Receiver<AllocationStatus>) {
    loop {
        let status = receiver.borrow_and_update().clone();
        let key = status::status_key(&status.alloc_id);
        let mut retry_delay = STORE_RETRY_MIN;
        loop {
            match client.put(key.clone(), status.to_json()).await {
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%key, %error, "cannot write an allocation status; retrying");
                    tokio::time::sleep(retry_delay).await;
                    retry_delay = (retry_delay * 2).min(STORE_RETRY_MAX);
                    if receiver.has_changed().unwrap_or(false) {
                        break;
                    }
                }
            }
        }
        if receiver.has_changed().unwrap_or(false) {
            continue;
        }
        if receiver.changed().await.is_err() {
            return;
        }
    }
}

/// What the tasks of one allocation share.
struct AllocationRun {
    shared: Arc<Shared>,
    allocation: Allocation,
    job_type: JobType,
    group: Group,
    alloc_dir: PathBuf,
    limiter: Arc<Limiter>,
    status: Mutex<AllocationStatus>,
    /// The newest status, for the writer.
    publish: watch::Sender<AllocationStatus>,
    /// Running process group leaders by task (the pids file's content).
    pids: Mutex<BTreeMap<String, RecordedProcess>>,
    desire: watch::Sender<Desire>,
    /// What limits were applied, by task.
    limits_detail: Mutex<BTreeMap<String, String>>,
    /// A task failed for good: the allocation is failed.
    failed: AtomicBool,
}

impl AllocationRun {
    fn id(&self) -> &str {
        &self.allocation.id.0
    }

    /// Changes the status and hands it to the writer.
    fn update(&self, change: impl FnOnce(&mut AllocationStatus)) {
        let snapshot = {
            let mut status = self.status.lock().expect("status lock");
            let before = status.clone();
            change(&mut status);
            let ready = self.ready();
            status.refresh_client(ready, now());
            if *status == before {
                return;
            }
            status.clone()
        };
        self.publish.send_replace(snapshot);
    }

    /// Follows the readiness checks: a status change only when readiness
    /// changed (cheap when nothing did: this runs every health poll).
    fn refresh_readiness(&self) {
        let ready = self.ready();
        let changed = {
            let status = self.status.lock().expect("status lock");
            status.client.status == ClientStatus::Running
                && status.client.ready_since.is_some() != ready
        };
        if changed {
            self.update(|_| {});
        }
    }

    /// The instance ids of the services of `task`.
    fn service_ids(&self, task_name: &str, task: &Task) -> Vec<String> {
        task.services
            .iter()
            .map(|service| services::instance_id(self.id(), task_name, &service.name))
            .collect()
    }

    /// Whether every service of the allocation is registered and all their
    /// readiness checks pass.
    fn ready(&self) -> bool {
        let local = self.shared.local.lock().expect("local state lock");
        self.group.tasks.iter().all(|(name, task)| {
            self.service_ids(name, task).iter().all(|id| {
                local.services.get(id).is_some_and(|service| {
                    service.checks.values().all(|check| {
                        check.definition.kind != CheckKind::Readiness
                            || check.state.status() == CheckStatus::Passing
                    })
                })
            })
        })
    }

    /// Whether a liveness check of these services is critical.
    fn liveness_critical(&self, service_ids: &[String]) -> Option<String> {
        let local = self.shared.local.lock().expect("local state lock");
        service_ids.iter().find_map(|id| {
            local.services.get(id).and_then(|service| {
                service
                    .checks
                    .values()
                    .find(|check| {
                        check.definition.kind == CheckKind::Liveness
                            && check.state.status() == CheckStatus::Critical
                    })
                    .map(|check| {
                        format!(
                            "liveness check {:?} critical: {}",
                            check.definition.name, check.output
                        )
                    })
            })
        })
    }

    fn record_pids(&self, task: &str, process: Option<RecordedProcess>) {
        let snapshot = {
            let mut pids = self.pids.lock().expect("pids lock");
            match process {
                Some(process) => pids.insert(task.to_string(), process),
                None => pids.remove(task),
            };
            pids.clone()
        };
        if let Err(error) = process::write_pids(&self.alloc_dir, &snapshot) {
            tracing::error!(alloc = %self.id(), %error, "cannot write the pids file");
        }
    }
}

/// Runs one allocation until its tasks ended for good, then writes its
/// final status (and deletes it if the allocation is gone).
async fn run_allocation(
    run: Arc<AllocationRun>,
    mut desire: watch::Receiver<Desire>,
    status_receiver: watch::Receiver<AllocationStatus>,
) {
    let writer = tokio::spawn(write_statuses(run.shared.client.clone(), status_receiver));
    // Aborts the writer if this runner is aborted (the agent dropped).
    let writer = AbortOnDrop(writer);
    if let Err(error) = std::fs::create_dir_all(&run.alloc_dir) {
        tracing::error!(alloc = %run.id(), %error, "cannot create the allocation directory");
    }
    let mut tasks = JoinSet::new();
    for (name, task) in run.group.tasks.clone() {
        tasks.spawn(run_task(run.clone(), name, task));
    }
    let mut health = tokio::time::interval(HEALTH_POLL_INTERVAL);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut started_recorded =
        run.status.lock().expect("status lock").client.status == ClientStatus::Running;
    loop {
        tokio::select! {
            finished = tasks.join_next() => {
                if finished.is_none() {
                    break;
                }
            }
            _ = health.tick() => {
                run.refresh_readiness();
                let running = run.status.lock().expect("status lock").client.status == ClientStatus::Running;
                if running && !started_recorded {
                    started_recorded = true;
                    run.shared.events.record(
                        EventType::AllocationStarted,
                        run.id().to_string(),
                        format!("allocation {} of job {} ({}[{}]) started on {}", run.id(), run.allocation.job, run.allocation.group, run.allocation.index, run.allocation.node),
                        [("job".to_string(), run.allocation.job.clone()), ("node".to_string(), run.allocation.node.clone())],
                    );
                }
            }
            _ = desire.changed() => {}
        }
    }
    let final_desire = *desire.borrow();
    let now = now();
    run.update(|status| {
        if status.client.status.is_terminal() {
            return;
        }
        let failed = run.failed.load(Ordering::SeqCst);
        if final_desire == Desire::Disconnected {
            for task in status.tasks.values_mut() {
                task.event(now, "Stopped: the agent was cut off from the store longer than disconnect.stop_on_client_after");
            }
        }
        status.finish(
            if failed {
                ClientStatus::Failed
            } else {
                ClientStatus::Complete
            },
            now,
        );
    });
    if run.status.lock().expect("status lock").client.status == ClientStatus::Failed {
        run.shared.events.record(
            EventType::AllocationFailed,
            run.id().to_string(),
            format!(
                "allocation {} of job {} failed on {}: its restart policy gave up",
                run.id(),
                run.allocation.job,
                run.allocation.node
            ),
            [("job".to_string(), run.allocation.job.clone())],
        );
    }
    let _ = process::write_pids(&run.alloc_dir, &BTreeMap::new());
    for name in run.group.tasks.keys() {
        run.limiter.forget(&task_cgroup_name(run.id(), name));
    }
    // The final status must be in the store before the runner ends (the
    // reconcile loop then knows the allocation ran here for good), and
    // before a deletion, which must be the last word.
    wait_written(&run).await;
    drop(writer);
    if final_desire == Desire::Gone {
        delete_status(run.shared.client.clone(), run.id().to_string()).await;
    }
}

/// Waits until the status writer wrote the newest status (the store holds
/// what the runner last published).
async fn wait_written(run: &AllocationRun) {
    let expected = run.publish.borrow().clone();
    let key = status::status_key(run.id());
    loop {
        if let Ok(Some(kv)) = run.shared.client.get(key.clone()).await {
            if AllocationStatus::from_json(&kv.value).is_ok_and(|stored| stored == expected) {
                return;
            }
        }
        tokio::time::sleep(STORE_RETRY_MIN * 2).await;
    }
}

/// A task handle aborted when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The name of a task's cgroup (under the agent's `keel-allocations`).
fn task_cgroup_name(alloc_id: &str, task: &str) -> String {
    format!("{alloc_id}.{task}")
}

/// How a task's run ended.
enum Outcome {
    /// It ended by itself (or its liveness check killed it).
    Ended(TaskEnd),
    /// The allocation is stopping: the task was stopped.
    Stopped,
}

/// Runs one task: start, wait, decide, again.
async fn run_task(run: Arc<AllocationRun>, name: String, task: Task) {
    let mut desire = run.desire.subscribe();
    let launch = task_launch(&run.allocation, &name, &task);
    let service_ids = run.service_ids(&name, &task);
    let cgroup_name = task_cgroup_name(run.id(), &name);
    loop {
        if *desire.borrow_and_update() != Desire::Run {
            mark_dead(&run, &name, "Stopped before starting");
            return;
        }
        let outcome = run_once(
            &run,
            &name,
            &task,
            &launch,
            &service_ids,
            &cgroup_name,
            &mut desire,
        )
        .await;
        let end = match outcome {
            Outcome::Stopped => return,
            Outcome::Ended(end) => end,
        };
        let now = now();
        let mut decision = RestartDecision::Fail;
        run.update(|status| {
            let (tracker, decided) =
                status
                    .restart_tracker
                    .on_task_end(&run.group.restart, run.job_type, end, now);
            status.restart_tracker = tracker;
            decision = decided;
            let task_status = status.tasks.entry(name.clone()).or_default();
            let reason = describe_end(end);
            match decided {
                RestartDecision::Restart { delay } => {
                    task_status.state = TaskState::Pending;
                    task_status.restarts += 1;
                    task_status.event(
                        now,
                        format!("Restarting in {} ({reason})", keel_scheduler::time::format_duration(delay)),
                    );
                }
                RestartDecision::Fail => {
                    task_status.state = TaskState::Dead;
                    task_status.finished_at = Some(now);
                    task_status.event(
                        now,
                        format!("Not restarting: the restart policy gave up ({reason}; {} failures in the interval)", tracker.failures_in_interval),
                    );
                }
                RestartDecision::Complete => {
                    task_status.state = TaskState::Dead;
                    task_status.finished_at = Some(now);
                    task_status.event(now, format!("Completed ({reason})"));
                }
            }
        });
        match decision {
            RestartDecision::Restart { delay } => {
                run.shared.events.record(
                    EventType::AllocationRestarted,
                    run.id().to_string(),
                    format!(
                        "task {name} of allocation {} ({}) restarts in {} after {}",
                        run.id(),
                        run.allocation.job,
                        keel_scheduler::time::format_duration(delay),
                        describe_end(end)
                    ),
                    [
                        ("job".to_string(), run.allocation.job.clone()),
                        ("task".to_string(), name.clone()),
                    ],
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = wait_stop(&mut desire) => {
                        mark_dead(&run, &name, "Stopped while waiting to restart");
                        return;
                    }
                }
            }
            RestartDecision::Fail => {
                run.failed.store(true, Ordering::SeqCst);
                run.desire.send_if_modified(|current| {
                    if *current == Desire::Run {
                        *current = Desire::SiblingFailed;
                        true
                    } else {
                        false
                    }
                });
                return;
            }
            RestartDecision::Complete => return,
        }
    }
}

/// Waits until the allocation is no longer wanted running.
async fn wait_stop(desire: &mut watch::Receiver<Desire>) {
    loop {
        if *desire.borrow_and_update() != Desire::Run {
            return;
        }
        if desire.changed().await.is_err() {
            // The runner is gone: nothing will ever ask again.
            std::future::pending::<()>().await;
        }
    }
}

fn mark_dead(run: &AllocationRun, name: &str, message: &str) {
    let now = now();
    run.update(|status| {
        let task = status.tasks.entry(name.to_string()).or_default();
        if task.state != TaskState::Dead {
            task.state = TaskState::Dead;
            task.pid = None;
            task.finished_at = Some(now);
            task.event(now, message);
        }
    });
}

fn describe_end(end: TaskEnd) -> String {
    match end {
        TaskEnd::Exited { exit_code } => format!("exit code {exit_code}"),
        TaskEnd::Signaled { signal } => format!("killed by signal {signal}"),
        TaskEnd::LivenessCritical => "liveness check critical".into(),
        TaskEnd::StartFailed => "could not start".into(),
    }
}

/// Starts the task once and waits for its end.
#[allow(clippy::too_many_arguments)]
async fn run_once(
    run: &Arc<AllocationRun>,
    name: &str,
    task: &Task,
    launch: &keel_scheduler::TaskLaunch,
    service_ids: &[String],
    cgroup_name: &str,
    desire: &mut watch::Receiver<Desire>,
) -> Outcome {
    let applied = run.limiter.apply(
        cgroup_name,
        task.resources.cpu_millicores,
        task.resources.memory_mib,
    );
    let detail = {
        let mut details = run.limits_detail.lock().expect("limits lock");
        details.insert(name.to_string(), applied.detail.clone());
        details
            .iter()
            .map(|(task, detail)| format!("{task}: {detail}"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let started = process::start(launch, &applied, &run.alloc_dir);
    let now = now();
    let mut started = match started {
        Ok(started) => started,
        Err(error) => {
            tracing::warn!(alloc = %run.id(), task = %name, %error, "task not started");
            run.update(|status| {
                let task_status = status.tasks.entry(name.to_string()).or_default();
                task_status.event(now, format!("Start failed: {error}"));
            });
            return Outcome::Ended(TaskEnd::StartFailed);
        }
    };
    let pid = started.pid;
    run.record_pids(
        name,
        Some(RecordedProcess {
            pid,
            start_time: started.start_time,
        }),
    );
    let mut copiers = JoinSet::new();
    if let Some(stdout) = started.child.stdout.take() {
        let path = logs::log_path(&run.alloc_dir, name, logs::LogStream::Stdout);
        copiers.spawn(async move {
            if let Err(error) = logs::copy_rotated(stdout, path).await {
                tracing::warn!(%error, "a task's stdout could not be written");
            }
        });
    }
    if let Some(stderr) = started.child.stderr.take() {
        let path = logs::log_path(&run.alloc_dir, name, logs::LogStream::Stderr);
        copiers.spawn(async move {
            if let Err(error) = logs::copy_rotated(stderr, path).await {
                tracing::warn!(%error, "a task's stderr could not be written");
            }
        });
    }
    run.update(|status| {
        status.resource_limits = Some(applied.kind);
        status.resource_limits_detail = detail.clone();
        let task_status = status.tasks.entry(name.to_string()).or_default();
        task_status.state = TaskState::Running;
        task_status.pid = Some(pid);
        task_status.started_at = Some(now);
        task_status.finished_at = None;
        task_status.event(
            now,
            format!("Started (pid {pid}; limits: {})", applied.detail),
        );
    });
    tracing::info!(alloc = %run.id(), task = %name, pid, "task started");
    // Its services, registered while it runs.
    let node_address = run
        .shared
        .local
        .lock()
        .expect("local state lock")
        .node
        .address
        .clone();
    match services::definitions(&run.allocation, name, task, &node_address) {
        Ok(definitions) => {
            for definition in definitions {
                if let Err(error) = run.shared.register(definition, Source::Allocation).await {
                    tracing::error!(alloc = %run.id(), task = %name, %error, "cannot register the task's service");
                    run.update(|status| {
                        let task_status = status.tasks.entry(name.to_string()).or_default();
                        task_status.event(now, format!("Service not registered: {error}"));
                    });
                }
            }
        }
        Err(error) => {
            run.update(|status| {
                let task_status = status.tasks.entry(name.to_string()).or_default();
                task_status.event(now, format!("Service not registered: {error}"));
            });
        }
    }
    let outcome = tokio::select! {
        exit = started.child.wait() => match exit {
            Ok(exit) => match (exit.code(), exit.signal()) {
                (Some(code), _) => Outcome::Ended(TaskEnd::Exited { exit_code: code }),
                (None, Some(signal)) => Outcome::Ended(TaskEnd::Signaled { signal }),
                (None, None) => Outcome::Ended(TaskEnd::Exited { exit_code: -1 }),
            },
            Err(error) => {
                tracing::error!(alloc = %run.id(), task = %name, %error, "cannot wait for the task");
                Outcome::Ended(TaskEnd::Signaled { signal: 0 })
            }
        },
        reason = poll_liveness(run, service_ids) => {
            tracing::warn!(alloc = %run.id(), task = %name, %reason, "killing the task: liveness critical");
            run.update(|status| {
                let task_status = status.tasks.entry(name.to_string()).or_default();
                task_status.event(now_time(), format!("Killing: {reason}"));
            });
            let _ = process::stop(&mut started.child, pid, KILL_TIMEOUT).await;
            Outcome::Ended(TaskEnd::LivenessCritical)
        },
        _ = wait_stop(desire) => {
            // Out of discovery first, so no new request reaches a stopping task.
            for id in service_ids {
                let _ = run.shared.deregister(id).await;
            }
            let exit = process::stop(&mut started.child, pid, KILL_TIMEOUT).await;
            let now = now_time();
            run.update(|status| {
                let task_status = status.tasks.entry(name.to_string()).or_default();
                if let Ok(exit) = exit {
                    task_status.last_exit_code = exit.code();
                    task_status.last_signal = exit.signal();
                }
                task_status.event(now, "Stopped (SIGTERM to its process group, SIGKILL after the kill timeout)");
            });
            Outcome::Stopped
        },
    };
    // Whatever the leader left in its group goes with it.
    process::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
    for id in service_ids {
        let _ = run.shared.deregister(id).await;
    }
    run.record_pids(name, None);
    let _ = tokio::time::timeout(LOG_DRAIN_TIMEOUT, async {
        while copiers.join_next().await.is_some() {}
    })
    .await;
    if let Some(cgroup) = &applied.cgroup {
        resource_limits::remove_cgroup(cgroup);
    }
    let now = now_time();
    run.update(|status| {
        let task_status = status.tasks.entry(name.to_string()).or_default();
        task_status.pid = None;
        task_status.finished_at = Some(now);
        match &outcome {
            Outcome::Ended(TaskEnd::Exited { exit_code }) => {
                task_status.last_exit_code = Some(*exit_code);
                task_status.last_signal = None;
            }
            Outcome::Ended(TaskEnd::Signaled { signal }) => {
                task_status.last_exit_code = None;
                task_status.last_signal = Some(*signal);
            }
            _ => {}
        }
        if matches!(outcome, Outcome::Stopped) {
            task_status.state = TaskState::Dead;
        } else {
            task_status.state = TaskState::Pending;
        }
    });
    outcome
}

fn now_time() -> Time {
    now()
}

/// Returns once a liveness check of these services is critical.
async fn poll_liveness(run: &AllocationRun, service_ids: &[String]) -> String {
    loop {
        tokio::time::sleep(HEALTH_POLL_INTERVAL).await;
        if let Some(reason) = run.liveness_critical(service_ids) {
            return reason;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_ids_are_safe_directory_names() {
        assert!(valid_alloc_id("5b0c5a6e-0000-4000-8000-000000000001"));
        assert!(!valid_alloc_id(".."));
        assert!(!valid_alloc_id("a/../b"));
        assert!(!valid_alloc_id(""));
        assert!(!valid_alloc_id(&"a".repeat(200)));
    }

    #[test]
    fn cpu_use_counts_a_task_and_its_descendants() {
        // A shell whose child burns CPU: the leader itself is idle.
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sh -c 'while :; do :; done' & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let leader = child.id();
        let mut system = process_sampler();
        let refresh = |system: &mut sysinfo::System| {
            system.refresh_processes_specifics(
                sysinfo::ProcessesToUpdate::All,
                true,
                sysinfo::ProcessRefreshKind::nothing().with_cpu(),
            );
        };
        // sysinfo needs a process's CPU times non-zero at the first sample
        // to compute a use at the second.
        std::thread::sleep(Duration::from_millis(300));
        refresh(&mut system);
        std::thread::sleep(Duration::from_millis(1000));
        refresh(&mut system);
        let usage = cpu_millicores(
            &system,
            BTreeMap::from([
                ("busy".to_string(), vec![leader]),
                ("gone".to_string(), vec![u32::MAX - 1]),
            ]),
        );
        process::signal_group(leader, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
        // A spinning process gets a good share of a core even on a loaded
        // machine; an idle shell alone would be 0.
        assert!(usage["busy"] >= 50, "{usage:?}");
        assert_eq!(usage["gone"], 0);
    }
}
