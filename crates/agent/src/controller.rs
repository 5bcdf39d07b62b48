//! The controller: runs in every agent, active in exactly one. It campaigns
//! in keel's election `/keel/controller`; once elected it lists and watches
//! the keys the scheduler reads (`controller/store_view.rs`), and evaluates
//! every job with `keel_scheduler::evaluate` when a job, a node or an
//! allocation changes, when a plan asked to be evaluated again
//! (`next_evaluation_at`: a grace, a reschedule delay, a health deadline, a
//! cooldown), and every [`EVALUATION_INTERVAL`] (the gossiped CPU use that
//! autoscaling reads changes without a store write).
//!
//! Every write it makes is a transaction whose compares include the create
//! revision of its election key (the fencing token): a deposed controller
//! changes nothing, sees the compare fail, stops acting and campaigns again.
//! A plan is written in `Plan::apply`'s order, at most
//! [`TXN_OPERATIONS_MAX`](crate::agent::TXN_OPERATIONS_MAX) operations per
//! transaction; the job's own changes (deployment, stability, revert,
//! scaling) also compare the job key's mod revision, so a `keel job run`
//! racing with the controller is never overwritten. After writing, the
//! controller evaluates again only once its watch has delivered its own
//! writes, so it never decides twice from a view that misses a placement.
//!
//! Node failure: a node is down when its record vanished (its lease
//! expired). The controller remembers when in `/keel/node-down/<node>`
//! (fenced), so a controller elected later grants the same
//! `disconnect.lost_after` grace instead of a fresh or no one; the key is
//! deleted when the node's record is back or nothing wanted running is left
//! on it. Gossip's suspicion marks a node suspect: nothing moves for it.
//!
//! It also finishes drains (`drain_complete` → the drain is cleared, the
//! node stays ineligible), garbage-collects terminal allocations beyond
//! [`TERMINAL_ALLOCATIONS_KEPT_PER_JOB`] per job, and records what it did in
//! the events log.

pub mod store_view;

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel_client::keel_types::etcdserverpb::{
    compare::CompareResult, response_op, Compare, RequestOp, TxnRequest, TxnResponse,
};
use keel_client::keel_types::mvccpb::event::EventType as WatchEventType;
use keel_client::keel_types::v3electionpb::LeaderKey;
use keel_client::{txn, Client, ClientError, LeaseKeeper, WatchOptions};
use keel_scheduler::{
    drain_complete, evaluate, Evaluation, JobState, PlacementReason, Plan, SchedulerAlgorithm,
    StopReason, Time,
};
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::agent::TXN_OPERATIONS_MAX;
use crate::events::{EventRecorder, EventType};
use crate::gossip::{Gossip, GossipStatus};
use store_view::{
    allocation_key, allocation_status_key, job_key, node_controls_key, node_down_key, plan_writes,
    NodeControls, NodeDown, StoreView, Touched, ALLOC_STATUS_PREFIX, ELECTION_NAME, NODES_PREFIX,
    WATCHED_PREFIXES,
};

/// Terminal allocations (stopped and ended) kept per job for `keel job
/// status`; older ones are deleted with their status.
pub const TERMINAL_ALLOCATIONS_KEPT_PER_JOB: usize = 16;
/// Longest time between two evaluations of every job, even when nothing in
/// the store changed (autoscaling reads gossip, not the store).
pub const EVALUATION_INTERVAL: Duration = Duration::from_secs(5);
/// How long the controller gathers changes before evaluating, so a burst of
/// status updates costs one evaluation.
pub const CHANGE_DEBOUNCE: Duration = Duration::from_millis(50);
/// Events recorded per plan; the rest are summed up in one more.
pub const EVENTS_PER_PLAN_MAX: usize = 32;
/// First pause after a failed store request.
const STORE_RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest pause between two attempts at an unreachable store.
const STORE_RETRY_MAX: Duration = Duration::from_secs(2);

/// How the controller is configured.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// The agent's node name (the campaign's value and the events' source).
    pub node_name: String,
    /// TTL of the campaign's lease: how long a dead controller holds the
    /// election before another agent takes over.
    pub lease_ttl: Duration,
    /// Bin-packing (default) or spread.
    pub algorithm: SchedulerAlgorithm,
}

/// What the controller has done, for metrics and `keel agent` status.
#[derive(Debug, Default)]
pub struct ControllerStats {
    /// Jobs evaluated.
    pub evaluations: AtomicU64,
    /// Non-empty plans written.
    pub plans: AtomicU64,
    /// Allocations placed.
    pub placements: AtomicU64,
    /// Times this agent was elected controller.
    pub elections: AtomicU64,
    /// Whether this agent is the controller now.
    pub active: AtomicBool,
}

/// A copy of [`ControllerStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ControllerStatsSnapshot {
    pub evaluations: u64,
    pub plans: u64,
    pub placements: u64,
    pub elections: u64,
    pub active: bool,
}

impl ControllerStats {
    /// The counters now.
    pub fn snapshot(&self) -> ControllerStatsSnapshot {
        ControllerStatsSnapshot {
            evaluations: self.evaluations.load(Ordering::Relaxed),
            plans: self.plans.load(Ordering::Relaxed),
            placements: self.placements.load(Ordering::Relaxed),
            elections: self.elections.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
        }
    }
}

/// The running controller task. Dropping it stops it (its lease then
/// expires and another agent takes over).
pub struct Controller {
    /// Its counters.
    pub stats: Arc<ControllerStats>,
    task: JoinHandle<()>,
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Controller {
    /// Starts campaigning. Must be called inside a tokio runtime.
    pub fn spawn(
        client: Client,
        config: ControllerConfig,
        gossip: Arc<Gossip>,
        events: EventRecorder,
    ) -> Controller {
        let stats = Arc::new(ControllerStats::default());
        let context = Context {
            client,
            config,
            gossip,
            events,
            stats: stats.clone(),
            boot_random: std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish(),
            evaluation_counter: AtomicU64::new(0),
        };
        let task = tokio::spawn(campaign_loop(Arc::new(context)));
        Controller { stats, task }
    }
}

struct Context {
    client: Client,
    config: ControllerConfig,
    gossip: Arc<Gossip>,
    events: EventRecorder,
    stats: Arc<ControllerStats>,
    /// A random value drawn once per process, mixed into every seed so two
    /// controllers never draw the same allocation ids.
    boot_random: u64,
    evaluation_counter: AtomicU64,
}

impl Context {
    /// A seed no other evaluation used: this process's random value, the
    /// view's revision and a counter, mixed by SplitMix64's finaliser.
    fn seed(&self, revision: i64) -> u64 {
        let counter = self.evaluation_counter.fetch_add(1, Ordering::Relaxed);
        let mut value = self.boot_random
            ^ (revision as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ counter.wrapping_mul(0xD1B5_4A32_D192_ED03);
        value = (value ^ (value >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        value = (value ^ (value >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        value ^ (value >> 31)
    }
}

/// Unix milliseconds now (the store's `Time`).
pub fn now() -> Time {
    Time(crate::events::now_unix_ms())
}

/// Why leading ended.
#[derive(Debug, thiserror::Error)]
enum Deposed {
    #[error("the campaign's lease was lost: {0}")]
    LeaseLost(ClientError),
    #[error("a fenced write found another controller's key (deposed)")]
    Fenced,
}

/// Campaigns, leads until deposed, and campaigns again, for ever.
async fn campaign_loop(context: Arc<Context>) {
    let ttl_seconds = context.config.lease_ttl.as_secs().max(1) as i64;
    let campaigner = context.client.with_blocking_timeout(None);
    let mut retry_delay = STORE_RETRY_MIN;
    loop {
        let lease = match context.client.grant_kept_lease(ttl_seconds).await {
            Ok(lease) => lease,
            Err(error) => {
                tracing::warn!(%error, "controller: cannot grant the campaign lease; retrying");
                tokio::time::sleep(retry_delay).await;
                retry_delay = (retry_delay * 2).min(STORE_RETRY_MAX);
                continue;
            }
        };
        let elected = tokio::select! {
            elected = campaigner.campaign(ELECTION_NAME, lease.id(), context.config.node_name.clone()) => elected,
            error = lease.lost() => Err(error),
        };
        let leader = match elected {
            Ok(leader) => leader,
            Err(error) => {
                tracing::warn!(%error, "controller: the campaign failed; campaigning again");
                let _ = context.client.lease_revoke(lease.id()).await;
                tokio::time::sleep(retry_delay).await;
                retry_delay = (retry_delay * 2).min(STORE_RETRY_MAX);
                continue;
            }
        };
        retry_delay = STORE_RETRY_MIN;
        context.stats.active.store(true, Ordering::Relaxed);
        context.stats.elections.fetch_add(1, Ordering::Relaxed);
        context.events.record(
            EventType::ControllerElected,
            context.config.node_name.clone(),
            format!("{} is the controller", context.config.node_name),
            [("fencing_revision".to_string(), leader.rev.to_string())],
        );
        let deposed = lead(&context, &leader, &lease).await;
        context.stats.active.store(false, Ordering::Relaxed);
        tracing::warn!(reason = %deposed, "controller: no longer the controller");
        // Giving the election up lets another agent take over at once
        // instead of after the lease's TTL; if it fails, the TTL does it.
        let _ = context.client.resign(leader).await;
        let _ = context.client.lease_revoke(lease.id()).await;
        lease.stop();
    }
}

/// The election key and token every write compares.
struct Fence {
    key: Vec<u8>,
    revision: i64,
}

impl Fence {
    fn compare(&self) -> Compare {
        txn::compare_create_revision(self.key.clone(), CompareResult::Equal, self.revision)
    }
}

/// Why a fenced write did not happen.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("deposed")]
    Deposed,
    /// Another compare failed (someone changed the key meanwhile).
    #[error("a compared key changed meanwhile")]
    Conflict,
    #[error(transparent)]
    Store(#[from] ClientError),
}

/// One transaction: the fence, `compares`, `operations`. Returns the store
/// revision it was committed at.
async fn fenced_txn(
    client: &Client,
    fence: &Fence,
    compares: Vec<Compare>,
    operations: Vec<RequestOp>,
) -> Result<i64, WriteError> {
    let mut compare = vec![fence.compare()];
    compare.extend(compares);
    let response: TxnResponse = client
        .txn(TxnRequest {
            compare,
            success: operations,
            failure: vec![txn::get(fence.key.clone())],
        })
        .await?;
    let revision = response.header.as_ref().map_or(0, |header| header.revision);
    if response.succeeded {
        return Ok(revision);
    }
    let still_leader = response.responses.iter().any(|operation| {
        matches!(
            &operation.response,
            Some(response_op::Response::ResponseRange(range))
                if range.kvs.iter().any(|kv| kv.create_revision == fence.revision)
        )
    });
    if still_leader {
        Err(WriteError::Conflict)
    } else {
        Err(WriteError::Deposed)
    }
}

/// Lists the watched prefixes at one revision (one transaction of range
/// reads), into a fresh view.
pub async fn read_view(client: &Client) -> Result<StoreView, ClientError> {
    let response = client
        .txn(TxnRequest {
            compare: Vec::new(),
            success: WATCHED_PREFIXES
                .iter()
                .map(|prefix| txn::get_prefix(*prefix))
                .collect(),
            failure: Vec::new(),
        })
        .await?;
    let mut view = StoreView {
        revision: response.header.as_ref().map_or(0, |header| header.revision),
        ..StoreView::default()
    };
    for operation in response.responses {
        let Some(response_op::Response::ResponseRange(range)) = operation.response else {
            continue;
        };
        for kv in range.kvs {
            let key = String::from_utf8_lossy(&kv.key);
            if let Err(error) = view.put(&key, &kv.value, kv.mod_revision) {
                tracing::warn!(%error, "controller: a stored value is not understood; ignored");
            }
        }
    }
    Ok(view)
}

/// Leads until deposed: keeps the view current and evaluates. A store
/// failure (the watch broke, a write's outcome is unknown) lists again and
/// goes on leading; only the lease or the fence end the leadership.
async fn lead(context: &Context, leader: &LeaderKey, lease: &LeaseKeeper) -> Deposed {
    let fence = Fence {
        key: leader.key.clone(),
        revision: leader.rev,
    };
    let mut retry_delay = STORE_RETRY_MIN;
    loop {
        let outcome = tokio::select! {
            error = lease.lost() => return Deposed::LeaseLost(error),
            outcome = lead_from_listing(context, &fence) => outcome,
        };
        match outcome {
            Ok(never) => match never {},
            Err(WriteError::Deposed) => return Deposed::Fenced,
            Err(error) => {
                tracing::warn!(%error, "controller: the store failed; listing again");
                tokio::time::sleep(retry_delay).await;
                retry_delay = (retry_delay * 2).min(STORE_RETRY_MAX);
            }
        }
    }
}

enum Never {}

/// Lists, watches and evaluates until a store failure or deposition.
async fn lead_from_listing(context: &Context, fence: &Fence) -> Result<Never, WriteError> {
    let mut view = read_view(&context.client).await?;
    // One watch over the range holding every watched prefix (it also holds
    // checks, events and the election, which only advance the revision).
    let mut options = WatchOptions::prefix(ALLOC_STATUS_PREFIX).from_revision(view.revision + 1);
    options.range_end = keel_client::prefix_end(NODES_PREFIX.as_bytes());
    let mut watcher = context.client.watch(options.with_progress_notify()).await?;
    let mut dirty = true;
    let mut written_revision = 0i64;
    let mut next_evaluation_at: Option<Time> = None;
    let mut ticker = tokio::time::interval(EVALUATION_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if dirty && view.revision >= written_revision {
            // Gather what arrives right behind the first change.
            let deadline = tokio::time::Instant::now() + CHANGE_DEBOUNCE;
            while let Ok(response) = tokio::time::timeout_at(deadline, watcher.next()).await {
                apply_watch_response(&mut view, response, context)?;
            }
            dirty = false;
            let outcome = evaluation_pass(context, fence, &view).await?;
            if let Some(revision) = outcome.written_revision {
                written_revision = written_revision.max(revision);
                // Evaluate again once the watch shows our own writes.
                dirty = true;
            }
            next_evaluation_at = outcome.next_evaluation_at;
            continue;
        }
        let wait = next_evaluation_at.map_or(EVALUATION_INTERVAL, |at| {
            Duration::from_millis(at.0.saturating_sub(now().0)).min(EVALUATION_INTERVAL)
        });
        tokio::select! {
            response = watcher.next() => {
                if apply_watch_response(&mut view, response, context)? == Touched::Relevant {
                    dirty = true;
                }
            }
            _ = ticker.tick() => dirty = true,
            _ = tokio::time::sleep(wait), if next_evaluation_at.is_some() => {
                next_evaluation_at = None;
                dirty = true;
            }
        }
    }
}

/// Applies one watch response to the view; records node.down when a
/// node's record vanishes (its lease expired). Only the active controller
/// watches, so the log gets one node.down per failure.
fn apply_watch_response(
    view: &mut StoreView,
    response: Option<Result<keel_client::keel_types::etcdserverpb::WatchResponse, ClientError>>,
    context: &Context,
) -> Result<Touched, WriteError> {
    let response = match response {
        Some(Ok(response)) => response,
        Some(Err(error)) => return Err(WriteError::Store(error)),
        None => {
            return Err(WriteError::Store(ClientError::Protocol {
                endpoint: String::new(),
                message: "the controller's watch ended".to_string(),
            }))
        }
    };
    if response.canceled || response.compact_revision > 0 {
        return Err(WriteError::Store(ClientError::Protocol {
            endpoint: String::new(),
            message: "the controller's watch was cancelled".to_string(),
        }));
    }
    let mut touched = Touched::Nothing;
    for event in response.events {
        let deleted = event.r#type() == WatchEventType::Delete;
        let Some(kv) = event.kv else { continue };
        let key = String::from_utf8_lossy(&kv.key).into_owned();
        view.revision = view.revision.max(kv.mod_revision);
        let change = if deleted {
            if let Some(node) = key.strip_prefix(NODES_PREFIX) {
                context.events.record(
                    EventType::NodeDown,
                    node.to_string(),
                    format!("node {node} is down: its lease expired"),
                    [("node".to_string(), node.to_string())],
                );
            }
            view.delete(&key)
        } else {
            match view.put(&key, &kv.value, kv.mod_revision) {
                Ok(touched) => touched,
                Err(error) => {
                    tracing::warn!(%error, "controller: a stored value is not understood; ignored");
                    Touched::Relevant
                }
            }
        };
        if change == Touched::Relevant {
            touched = Touched::Relevant;
        }
    }
    if let Some(header) = &response.header {
        view.revision = view.revision.max(header.revision);
    }
    Ok(touched)
}

/// What one evaluation pass did.
struct PassOutcome {
    /// The newest revision written, if anything was.
    written_revision: Option<i64>,
    /// The earliest time a plan asked to be evaluated again.
    next_evaluation_at: Option<Time>,
}

/// Node bookkeeping, one evaluation per job (each plan written, then
/// applied to the snapshot so the next job sees its placements), finished
/// drains, garbage collection.
async fn evaluation_pass(
    context: &Context,
    fence: &Fence,
    view: &StoreView,
) -> Result<PassOutcome, WriteError> {
    let client = &context.client;
    let now = now();
    let mut view = view.clone();
    let mut written: Option<i64> = None;
    let mut note =
        |revision: i64| written = Some(written.map_or(revision, |old| old.max(revision)));

    // Down nodes: remember since when; forget returned or emptied ones.
    for node in view.nodes_newly_down() {
        let key = node_down_key(&node);
        let value = NodeDown { since: now };
        let operations = vec![txn::put(
            key.clone(),
            serde_json::to_vec(&value).expect("node-down serialises"),
        )];
        let compares = vec![txn::compare_version(key.clone(), CompareResult::Equal, 0)];
        match fenced_txn(client, fence, compares, operations).await {
            Ok(revision) => {
                note(revision);
                view.node_down.insert(
                    node.clone(),
                    store_view::Versioned {
                        value,
                        modify_revision: revision,
                    },
                );
                tracing::info!(%node, "node down: its allocations are lost after their disconnect grace");
            }
            Err(WriteError::Conflict) => {}
            Err(error) => return Err(error),
        }
    }
    for (node, revision) in view.node_down_obsolete() {
        let key = node_down_key(&node);
        let compares = vec![txn::compare_mod_revision(
            key.clone(),
            CompareResult::Equal,
            revision,
        )];
        match fenced_txn(client, fence, compares, vec![txn::delete(key)]).await {
            Ok(revision) => {
                note(revision);
                if view.nodes.contains_key(&node) {
                    context.events.record(
                        EventType::NodeAlive,
                        node.clone(),
                        format!("node {node} is back"),
                        [("node".to_string(), node.clone())],
                    );
                }
                view.node_down.remove(&node);
            }
            Err(WriteError::Conflict) => {}
            Err(error) => return Err(error),
        }
    }

    let suspects: BTreeSet<String> = context
        .gossip
        .subscribe()
        .borrow()
        .iter()
        .filter(|member| member.status == GossipStatus::Suspect)
        .map(|member| member.node_name.clone())
        .collect();
    let usage = context.gossip.allocation_usage().await;
    let mut cluster = view.cluster(&suspects, &usage);
    let mut next_evaluation_at: Option<Time> = None;
    for (name, job) in &view.jobs {
        context.stats.evaluations.fetch_add(1, Ordering::Relaxed);
        let plan = evaluate(&Evaluation {
            job: &job.value,
            cluster: &cluster,
            now,
            seed: context.seed(view.revision),
            algorithm: context.config.algorithm,
        });
        if let Some(at) = plan.next_evaluation_at {
            next_evaluation_at =
                Some(next_evaluation_at.map_or(at, |earlier: Time| earlier.min(at)));
        }
        if plan.is_empty() {
            continue;
        }
        let write_started = std::time::Instant::now();
        match write_plan(
            client,
            fence,
            &plan,
            &job.value,
            job.modify_revision,
            &cluster,
            now,
        )
        .await
        {
            Ok(revision) => {
                tracing::info!(
                    job = %name,
                    version = plan.job_version,
                    placements = plan.placements.len(),
                    stops = plan.stops.len(),
                    revision,
                    write_ms = write_started.elapsed().as_millis() as u64,
                    "controller: plan written"
                );
                note(revision);
                context.stats.plans.fetch_add(1, Ordering::Relaxed);
                context
                    .stats
                    .placements
                    .fetch_add(plan.placements.len() as u64, Ordering::Relaxed);
                record_plan_events(&context.events, &plan);
                let mut state = job.value.clone();
                plan.apply(&mut state, &mut cluster, now);
            }
            Err(WriteError::Conflict) => {
                tracing::info!(job = %name, "controller: the job changed while its plan was written; evaluating again");
                // The allocations written so far are in the store; the
                // watch brings them, and the next pass starts from there.
                next_evaluation_at = Some(now);
            }
            Err(error) => return Err(error),
        }
    }

    // Drains that are over: the drain is cleared, the node stays ineligible.
    for (node, controls) in &view.node_controls {
        if controls.value.drain.is_none() || !drain_complete(&cluster, node) {
            continue;
        }
        let key = node_controls_key(node);
        let value = NodeControls {
            eligible: false,
            drain: None,
        };
        let compares = vec![txn::compare_mod_revision(
            key.clone(),
            CompareResult::Equal,
            controls.modify_revision,
        )];
        let operations = vec![txn::put(
            key,
            serde_json::to_vec(&value).expect("controls serialise"),
        )];
        match fenced_txn(client, fence, compares, operations).await {
            Ok(revision) => {
                note(revision);
                context.events.record(
                    EventType::NodeDrain,
                    node.clone(),
                    format!("node {node} is drained; it stays ineligible"),
                    [("node".to_string(), node.clone())],
                );
            }
            Err(WriteError::Conflict) => {}
            Err(error) => return Err(error),
        }
    }

    // Garbage collection of terminal allocations beyond the bound.
    let collectable = view.collectable(TERMINAL_ALLOCATIONS_KEPT_PER_JOB);
    for chunk in collectable.chunks(TXN_OPERATIONS_MAX / 2) {
        let operations = chunk
            .iter()
            .flat_map(|allocation| {
                [
                    txn::delete(allocation_key(&allocation.node, &allocation.id)),
                    txn::delete(allocation_status_key(&allocation.id)),
                ]
            })
            .collect();
        match fenced_txn(client, fence, Vec::new(), operations).await {
            Ok(revision) => note(revision),
            Err(WriteError::Conflict) => {}
            Err(error) => return Err(error),
        }
    }
    if !collectable.is_empty() {
        tracing::info!(
            allocations = collectable.len(),
            "controller: garbage-collected terminal allocations"
        );
    }
    Ok(PassOutcome {
        written_revision: written,
        next_evaluation_at,
    })
}

/// Writes one plan: allocations in chunks of at most `TXN_OPERATIONS_MAX`,
/// then the job's new state comparing its mod revision.
async fn write_plan(
    client: &Client,
    fence: &Fence,
    plan: &Plan,
    state: &JobState,
    job_revision: i64,
    cluster: &keel_scheduler::Cluster,
    now: Time,
) -> Result<i64, WriteError> {
    let (writes, job) = plan_writes(plan, state, cluster, now);
    let mut revision = 0;
    for chunk in writes.chunks(TXN_OPERATIONS_MAX) {
        let operations = chunk
            .iter()
            .map(|write| txn::put(write.key.clone(), write.value.clone()))
            .collect();
        revision = fenced_txn(client, fence, Vec::new(), operations).await?;
    }
    if let Some(job) = job {
        let name = &job.current().job.name;
        let key = job_key(name);
        let compares = vec![txn::compare_mod_revision(
            key.clone(),
            CompareResult::Equal,
            job_revision,
        )];
        let operations = vec![txn::put(
            key,
            serde_json::to_vec(&job).expect("jobs serialise"),
        )];
        revision = fenced_txn(client, fence, compares, operations).await?;
    }
    Ok(revision)
}

/// The events of a written plan (bounded per plan).
fn record_plan_events(events: &EventRecorder, plan: &Plan) {
    let job = plan.job.clone();
    let mut recorded = 0usize;
    let mut skipped = 0usize;
    let mut record = |kind: EventType, message: String, fields: Vec<(String, String)>| {
        if recorded < EVENTS_PER_PLAN_MAX {
            recorded += 1;
            events.record(kind, job.clone(), message, fields);
        } else {
            skipped += 1;
        }
    };
    for stop in &plan.stops {
        let (kind, message) = match stop.reason {
            StopReason::Lost => (
                EventType::AllocationLost,
                format!(
                    "allocation {} ({}) is lost: node {} is down past its grace",
                    stop.allocation, stop.group, stop.node
                ),
            ),
            reason => (
                EventType::AllocationStopped,
                format!(
                    "allocation {} ({}) on {} stopped: {}",
                    stop.allocation,
                    stop.group,
                    stop.node,
                    stop_reason_text(reason)
                ),
            ),
        };
        record(
            kind,
            message,
            vec![
                ("allocation".to_string(), stop.allocation.0.clone()),
                ("node".to_string(), stop.node.clone()),
                ("group".to_string(), stop.group.clone()),
                (
                    "reason".to_string(),
                    stop_reason_text(stop.reason).to_string(),
                ),
            ],
        );
    }
    for placement in &plan.placements {
        let name = format!("{}.{}[{}]", placement.job, placement.group, placement.index);
        let mut fields = vec![
            ("allocation".to_string(), placement.id.0.clone()),
            ("node".to_string(), placement.node.clone()),
            ("group".to_string(), placement.group.clone()),
            ("index".to_string(), placement.index.to_string()),
            ("version".to_string(), placement.job_version.to_string()),
            (
                "reason".to_string(),
                placement_reason_text(placement.placement_reason).to_string(),
            ),
        ];
        let (kind, message) = match (
            placement.placement_reason,
            placement.reschedule_events.last(),
        ) {
            (PlacementReason::Rescheduled, Some(last)) => {
                fields.push((
                    "delay".to_string(),
                    keel_scheduler::time::format_duration(last.delay),
                ));
                (
                    EventType::AllocationRescheduled,
                    format!(
                        "{name} rescheduled to {} after {} (allocation {} failed on {}; reschedule {} of its chain)",
                        placement.node,
                        keel_scheduler::time::format_duration(last.delay),
                        last.previous_allocation,
                        last.previous_node,
                        placement.reschedule_events.len()
                    ),
                )
            }
            (reason, _) => (
                EventType::AllocationPlaced,
                format!(
                    "{name} placed on {} as allocation {} ({}, version {})",
                    placement.node,
                    placement.id,
                    placement_reason_text(reason),
                    placement.job_version
                ),
            ),
        };
        record(kind, message, fields);
    }
    let mut job_changes = Vec::new();
    if let Some(deployment) = &plan.deployment {
        job_changes.push(
            format!(
                "deployment of version {} is {:?}",
                deployment.job_version, deployment.status
            )
            .to_lowercase(),
        );
    }
    if let Some(version) = plan.mark_stable {
        job_changes.push(format!("version {version} is stable"));
    }
    if let Some(version) = plan.revert_to_version {
        job_changes.push(format!("reverted to version {version}"));
    }
    for decision in &plan.scaling {
        job_changes.push(format!(
            "group {} scaled from {} to {} (CPU at {}% of its reservation)",
            decision.group, decision.from, decision.to, decision.cpu_percent
        ));
    }
    if !job_changes.is_empty() {
        record(
            EventType::JobUpdated,
            format!("job {}: {}", plan.job, job_changes.join("; ")),
            vec![("version".to_string(), plan.job_version.to_string())],
        );
    }
    if skipped > 0 {
        events.record(
            EventType::JobUpdated,
            plan.job.clone(),
            format!(
                "job {}: {skipped} more allocation changes in the same plan ({} placed, {} stopped)",
                plan.job,
                plan.placements.len(),
                plan.stops.len()
            ),
            BTreeMap::<String, String>::new(),
        );
    }
}

/// A stop reason in words (its JSON name).
pub fn stop_reason_text(reason: StopReason) -> &'static str {
    match reason {
        StopReason::JobStopped => "job_stopped",
        StopReason::GroupRemoved => "group_removed",
        StopReason::ScaledDown => "scaled_down",
        StopReason::Lost => "lost",
        StopReason::Rescheduled => "rescheduled",
        StopReason::Migrated => "migrated",
        StopReason::Updated => "updated",
        StopReason::Duplicate => "duplicate",
        StopReason::Completed => "completed",
    }
}

/// A placement reason in words (its JSON name).
pub fn placement_reason_text(reason: PlacementReason) -> &'static str {
    match reason {
        PlacementReason::New => "new",
        PlacementReason::Lost => "lost",
        PlacementReason::Rescheduled => "rescheduled",
        PlacementReason::Migrated => "migrated",
        PlacementReason::Updated => "updated",
        PlacementReason::Completed => "completed",
    }
}
