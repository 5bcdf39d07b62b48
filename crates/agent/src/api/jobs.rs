//! The job and node-control API, on every agent: `GET|PUT|POST /v1/jobs`
//! (register a job, `?plan=true` for a dry run), `POST /v1/jobs/plan`,
//! `GET|DELETE /v1/job/<name>` (status with allocations; stop),
//! `GET /v1/job/<name>/history` (versions and events), `PUT
//! /v1/node/<name>/drain` and `PUT /v1/node/<name>/eligibility`.
//!
//! Unlike discovery (Consul's API and DNS, answered from the agent's watch),
//! these read the store: they are operator commands, rare, and a `keel job
//! status` right after `keel job run` must see the registration. Writes
//! are compare-and-swaps on the key's mod revision (a new job: on its
//! absence), retried a few times, so two registrations never lose one
//! another. The controller alone writes allocations.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use keel_client::keel_types::etcdserverpb::compare::CompareResult;
use keel_client::keel_types::etcdserverpb::TxnRequest;
use keel_client::{txn, ClientError};
use keel_scheduler::{
    evaluate, plan_job, AllocationId, Cluster, Drain, Evaluation, Job, JobState, Plan,
    SchedulerAlgorithm,
};
use serde_json::{json, Value};

use crate::agent::Shared;
use crate::controller::store_view::{
    job_key, node_controls_key, NodeControls, StoreView, ALLOC_STATUS_PREFIX, NODES_PREFIX,
};
use crate::controller::{now, read_view};
use crate::events::{self, EventType};

/// Attempts at a compare-and-swap that keeps losing to other writers.
const WRITE_ATTEMPTS_MAX: usize = 5;
/// Largest request body: a spec, as JSON (more verbose than its TOML).
const JOB_BODY_BYTES_MAX: usize = 2 * keel_scheduler::limits::SPEC_BYTES_MAX;
/// Events returned by a job's history, at most (the newest).
const HISTORY_EVENTS_MAX: usize = 1000;

/// The routes, merged into the agent's router.
pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/jobs", get(list_jobs).put(register).post(register))
        .route("/v1/jobs/plan", post(plan).put(plan))
        .route("/v1/job/{name}", get(job_status).delete(stop_job))
        .route("/v1/job/{name}/history", get(job_history))
        .route("/v1/node/{name}/drain", put(drain))
        .route("/v1/node/{name}/eligibility", put(eligibility))
        .layer(DefaultBodyLimit::max(JOB_BODY_BYTES_MAX))
}

/// Why a request failed, as an HTTP status and a message naming what.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the store is unavailable: {0}")]
    Store(#[from] ClientError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        (status, self.to_string()).into_response()
    }
}

type Parameters = Query<Vec<(String, String)>>;

fn flag(parameters: &[(String, String)], name: &str) -> bool {
    parameters
        .iter()
        .any(|(key, value)| key == name && (value.is_empty() || value == "true" || value == "1"))
}

fn random_seed() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// The nodes gossip suspects, as this agent sees them.
fn suspects(shared: &Shared) -> BTreeSet<String> {
    shared
        .view
        .read()
        .expect("view lock")
        .catalog
        .liveness
        .iter()
        .filter(|(_, liveness)| liveness.suspect)
        .map(|(name, _)| name.clone())
        .collect()
}

fn parse_job(body: &str) -> Result<Job, ApiError> {
    Job::from_json_validated(body).map_err(|error| ApiError::BadRequest(error.to_string()))
}

fn decode_job(name: &str, value: &[u8]) -> Result<JobState, ApiError> {
    serde_json::from_slice(value).map_err(|error| {
        ApiError::Conflict(format!(
            "the stored job {name:?} is not understood: {error}"
        ))
    })
}

/// A plan with counts a person reads first.
fn plan_json(plan: &Plan) -> Value {
    json!({
        "summary": {
            "placements": plan.placements.len(),
            "stops": plan.stops.len(),
            "in_place_updates": plan.in_place_updates.len(),
            "failed_placements": plan.failed_placements.len(),
        },
        "plan": plan,
    })
}

async fn dry_run(shared: &Shared, job: &Job) -> Result<(Plan, StoreView, Cluster), ApiError> {
    let view = read_view(&shared.client).await?;
    let cluster = view.cluster(&suspects(shared), &BTreeMap::new());
    let existing = view.jobs.get(&job.name).map(|stored| &stored.value);
    let plan = plan_job(job, existing, &cluster, now(), random_seed());
    Ok((plan, view, cluster))
}

/// `POST /v1/jobs/plan`: what registering the job would do; nothing is written.
async fn plan(State(shared): State<Arc<Shared>>, body: String) -> Result<Json<Value>, ApiError> {
    let job = parse_job(&body)?;
    let (plan, _, _) = dry_run(&shared, &job).await?;
    Ok(Json(plan_json(&plan)))
}

/// `PUT|POST /v1/jobs`: registers the job as its next version (or a new
/// job); `?plan=true` answers as `/v1/jobs/plan`.
async fn register(
    State(shared): State<Arc<Shared>>,
    Query(parameters): Parameters,
    body: String,
) -> Result<Json<Value>, ApiError> {
    let job = parse_job(&body)?;
    if flag(&parameters, "plan") {
        let (plan, _, _) = dry_run(&shared, &job).await?;
        return Ok(Json(plan_json(&plan)));
    }
    let key = job_key(&job.name);
    for _ in 0..WRITE_ATTEMPTS_MAX {
        let (plan, _, _) = dry_run(&shared, &job).await?;
        let existing = shared.client.get(key.clone()).await?;
        let (state, compare, changed) = match &existing {
            Some(kv) => {
                let mut state = decode_job(&job.name, &kv.value)?;
                let was_stopped = state.stopped;
                let registered = state.register(job.clone());
                state.stopped = false;
                let compare =
                    txn::compare_mod_revision(key.clone(), CompareResult::Equal, kv.mod_revision);
                (state, compare, registered.is_some() || was_stopped)
            }
            None => (
                JobState::new(job.clone()),
                txn::compare_create_revision(key.clone(), CompareResult::Equal, 0),
                true,
            ),
        };
        let version = state.current().version;
        if !changed {
            return Ok(Json(json!({
                "name": job.name, "version": version, "changed": false,
                "evaluation": plan_json(&plan),
            })));
        }
        let response = shared
            .client
            .txn(TxnRequest {
                compare: vec![compare],
                success: vec![txn::put(
                    key.clone(),
                    serde_json::to_vec(&state).expect("jobs serialise"),
                )],
                failure: Vec::new(),
            })
            .await?;
        if response.succeeded {
            shared.events.record(
                EventType::JobUpdated,
                job.name.clone(),
                format!("job {} registered as version {version}", job.name),
                [("version".to_string(), version.to_string())],
            );
            return Ok(Json(json!({
                "name": job.name, "version": version, "changed": true,
                "evaluation": plan_json(&plan),
            })));
        }
    }
    Err(ApiError::Conflict(format!(
        "job {:?} kept changing; {WRITE_ATTEMPTS_MAX} attempts lost to other writers",
        job.name
    )))
}

/// `GET /v1/jobs`: every job with its version and counts.
async fn list_jobs(State(shared): State<Arc<Shared>>) -> Result<Json<Value>, ApiError> {
    let view = read_view(&shared.client).await?;
    let allocations = view.joined_allocations();
    let jobs: Vec<Value> = view
        .jobs
        .iter()
        .map(|(name, stored)| {
            let state = &stored.value;
            let current = state.current();
            let desired: u32 = current.job.groups.values().map(|group| group.count).sum();
            let running = allocations
                .iter()
                .filter(|allocation| {
                    &allocation.job == name
                        && allocation.is_active()
                        && allocation.client.status == keel_scheduler::ClientStatus::Running
                })
                .count();
            json!({
                "name": name,
                "type": current.job.job_type,
                "version": current.version,
                "stable": current.stable,
                "stopped": state.stopped,
                "desired": if state.stopped { 0 } else { desired },
                "running": running,
                "deployment": state.deployment,
            })
        })
        .collect();
    Ok(Json(Value::Array(jobs)))
}

/// `GET /v1/job/<name>`: the job's state, its allocations (desired half,
/// reported half and the supervisor's full status) and what the controller
/// waits for (reschedule delays, unplaceable instances).
async fn job_status(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let view = read_view(&shared.client).await?;
    let Some(stored) = view.jobs.get(&name) else {
        return Err(ApiError::NotFound(format!("no job named {name:?}")));
    };
    let statuses: BTreeMap<AllocationId, Value> = shared
        .client
        .get_prefix(ALLOC_STATUS_PREFIX)
        .await?
        .kvs
        .into_iter()
        .filter_map(|kv| {
            let key = String::from_utf8_lossy(&kv.key);
            let id = key.strip_prefix(ALLOC_STATUS_PREFIX)?.to_string();
            let value: Value = serde_json::from_slice(&kv.value).ok()?;
            Some((AllocationId(id), value))
        })
        .collect();
    let cluster = view.cluster(&suspects(&shared), &BTreeMap::new());
    // What the controller would decide now: its pending reschedules and
    // blocked placements (nothing is written).
    let pending = evaluate(&Evaluation {
        job: &stored.value,
        cluster: &cluster,
        now: now(),
        seed: random_seed(),
        algorithm: SchedulerAlgorithm::Binpack,
    });
    let mut allocations: Vec<Value> = cluster
        .allocations
        .iter()
        .filter(|allocation| allocation.job == name)
        .map(|allocation| {
            let mut value = serde_json::to_value(allocation).expect("allocations serialise");
            value["status"] = statuses.get(&allocation.id).cloned().unwrap_or(Value::Null);
            value
        })
        .collect();
    allocations.sort_by_key(|value| {
        (
            value["group"].as_str().unwrap_or_default().to_string(),
            value["index"].as_u64().unwrap_or_default(),
            value["created_at"].as_u64().unwrap_or_default(),
        )
    });
    Ok(Json(json!({
        "name": name,
        "job": stored.value,
        "allocations": allocations,
        "reschedule_later": pending.reschedule_later,
        "failed_placements": pending.failed_placements,
    })))
}

/// `DELETE /v1/job/<name>`: stops the job (every allocation stops; the
/// job and its history stay).
async fn stop_job(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let key = job_key(&name);
    for _ in 0..WRITE_ATTEMPTS_MAX {
        let Some(kv) = shared.client.get(key.clone()).await? else {
            return Err(ApiError::NotFound(format!("no job named {name:?}")));
        };
        let mut state = decode_job(&name, &kv.value)?;
        if state.stopped {
            return Ok(Json(
                json!({"name": name, "stopped": true, "changed": false}),
            ));
        }
        state.stopped = true;
        let response = shared
            .client
            .txn(TxnRequest {
                compare: vec![txn::compare_mod_revision(
                    key.clone(),
                    CompareResult::Equal,
                    kv.mod_revision,
                )],
                success: vec![txn::put(
                    key.clone(),
                    serde_json::to_vec(&state).expect("jobs serialise"),
                )],
                failure: Vec::new(),
            })
            .await?;
        if response.succeeded {
            shared.events.record(
                EventType::JobUpdated,
                name.clone(),
                format!("job {name} stopped"),
                [],
            );
            return Ok(Json(
                json!({"name": name, "stopped": true, "changed": true}),
            ));
        }
    }
    Err(ApiError::Conflict(format!(
        "job {name:?} kept changing; {WRITE_ATTEMPTS_MAX} attempts lost to other writers"
    )))
}

/// `GET /v1/job/<name>/history`: its versions (oldest first), deployment,
/// scaling times, and the events about it (oldest first).
async fn job_history(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let Some(kv) = shared.client.get(job_key(&name)).await? else {
        return Err(ApiError::NotFound(format!("no job named {name:?}")));
    };
    let state = decode_job(&name, &kv.value)?;
    let since = events::now_unix_ms().saturating_sub(events::EVENT_RETENTION.as_millis() as u64);
    let mut recorded = events::list(
        &shared.client,
        since,
        &[],
        events::EVENTS_RETAINED_MAX as usize,
    )
    .await?;
    recorded.retain(|event| event.subject == name);
    if recorded.len() > HISTORY_EVENTS_MAX {
        recorded.drain(..recorded.len() - HISTORY_EVENTS_MAX);
    }
    Ok(Json(json!({
        "name": name,
        "versions": state.versions,
        "stopped": state.stopped,
        "deployment": state.deployment,
        "last_scaled_at": state.last_scaled_at,
        "events": recorded,
    })))
}

/// Changes a node's controls by compare-and-swap; the node must be registered.
async fn change_controls(
    shared: &Shared,
    node: &str,
    change: impl Fn(NodeControls) -> NodeControls,
) -> Result<NodeControls, ApiError> {
    if shared
        .client
        .get(format!("{NODES_PREFIX}{node}"))
        .await?
        .is_none()
    {
        return Err(ApiError::NotFound(format!(
            "no node named {node:?} is registered"
        )));
    }
    let key = node_controls_key(node);
    for _ in 0..WRITE_ATTEMPTS_MAX {
        let existing = shared.client.get(key.clone()).await?;
        let (current, compare) = match &existing {
            Some(kv) => (
                serde_json::from_slice(&kv.value).unwrap_or_default(),
                txn::compare_mod_revision(key.clone(), CompareResult::Equal, kv.mod_revision),
            ),
            None => (
                NodeControls::default(),
                txn::compare_create_revision(key.clone(), CompareResult::Equal, 0),
            ),
        };
        let changed = change(current);
        let response = shared
            .client
            .txn(TxnRequest {
                compare: vec![compare],
                success: vec![txn::put(
                    key.clone(),
                    serde_json::to_vec(&changed).expect("controls serialise"),
                )],
                failure: Vec::new(),
            })
            .await?;
        if response.succeeded {
            return Ok(changed);
        }
    }
    Err(ApiError::Conflict(format!(
        "node {node:?}'s controls kept changing; {WRITE_ATTEMPTS_MAX} attempts lost"
    )))
}

fn body_json(body: &str) -> Result<Value, ApiError> {
    if body.trim().is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    serde_json::from_str(body)
        .map_err(|error| ApiError::BadRequest(format!("the body is not JSON: {error}")))
}

/// `PUT /v1/node/<name>/drain` with `{"enable": true|false}` (default
/// true): starts a drain (the node turns ineligible and its allocations
/// move off, `migrate.max_parallel` at a time), or cancels one (the node
/// stays ineligible; `eligibility` turns it back).
async fn drain(
    State(shared): State<Arc<Shared>>,
    Path(node): Path<String>,
    body: String,
) -> Result<Json<Value>, ApiError> {
    let body = body_json(&body)?;
    let enable = match body.get("enable") {
        None => true,
        Some(Value::Bool(enable)) => *enable,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "enable: expected true or false, got {other}"
            )))
        }
    };
    let started_at = now();
    let controls = change_controls(&shared, &node, |current| {
        if enable {
            NodeControls {
                eligible: false,
                drain: current.drain.or(Some(Drain { started_at })),
            }
        } else {
            NodeControls {
                drain: None,
                ..current
            }
        }
    })
    .await?;
    shared.events.record(
        EventType::NodeDrain,
        node.clone(),
        if enable {
            format!("node {node} is draining")
        } else {
            format!("the drain of node {node} was cancelled")
        },
        [("node".to_string(), node.clone())],
    );
    Ok(Json(json!({"node": node, "controls": controls})))
}

/// `PUT /v1/node/<name>/eligibility` with `{"eligible": true|false}`.
async fn eligibility(
    State(shared): State<Arc<Shared>>,
    Path(node): Path<String>,
    body: String,
) -> Result<Json<Value>, ApiError> {
    let body = body_json(&body)?;
    let Some(eligible) = body.get("eligible").and_then(Value::as_bool) else {
        return Err(ApiError::BadRequest(
            "eligible: expected true or false".to_string(),
        ));
    };
    let controls = change_controls(&shared, &node, |current| NodeControls {
        eligible,
        ..current
    })
    .await?;
    shared.events.record(
        EventType::NodeDrain,
        node.clone(),
        format!(
            "node {node} is {}",
            if eligible { "eligible" } else { "ineligible" }
        ),
        [("node".to_string(), node.clone())],
    );
    Ok(Json(json!({"node": node, "controls": controls})))
}
