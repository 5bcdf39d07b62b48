//! `/v1/allocations`, `/v1/allocation/<id>` and
//! `/v1/allocation/<id>/logs` on every agent: allocations (the controller's
//! desired half joined with the status their node's agent reports), read
//! from the supervisor's view (one watch, never the store); logs served by
//! the allocation's own node, to which any other agent proxies.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http_body_util::Full;
use hyper::body::Bytes;
use keel_scheduler::{Allocation, DesiredStatus};
use serde_json::{json, Value};

use crate::agent::Shared;
use crate::supervisor::logs::{self, LogStream};
use crate::supervisor::status::AllocationStatus;
use crate::supervisor::ALLOCS_DIRECTORY;

/// Chunks buffered between a followed log file and a slow client.
const FOLLOW_CHANNEL_CHUNKS: usize = 16;
/// Most bytes sent in one chunk of a followed log.
const FOLLOW_CHUNK_BYTES_MAX: u64 = 64 * 1024;

/// The routes, merged into the agent's router.
pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/allocations", get(list))
        .route("/v1/allocation/{id}", get(one))
        .route("/v1/allocation/{id}/logs", get(logs))
}

type Parameters = Query<Vec<(String, String)>>;

fn parameter<'a>(parameters: &'a [(String, String)], name: &str) -> Option<&'a str> {
    parameters
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, message.into()).into_response()
}

/// One allocation as the API shows it: a summary for tables, the desired
/// half with the reported `client` joined in, and the full status.
fn joined(
    allocation: &Allocation,
    status: Option<&AllocationStatus>,
    cpu_millicores: Option<u64>,
    full: bool,
) -> Value {
    let mut desired = allocation.clone();
    if let Some(status) = status {
        desired.client = status.client;
    }
    let (desired_status, desired_reason) = match allocation.desired_status {
        DesiredStatus::Run => ("run", Value::Null),
        DesiredStatus::Stop(reason) => {
            ("stop", serde_json::to_value(reason).unwrap_or(Value::Null))
        }
    };
    let mut value = json!({
        "id": allocation.id.0,
        "job": allocation.job,
        "job_version": allocation.job_version,
        "group": allocation.group,
        "index": allocation.index,
        "node": allocation.node,
        "desired_status": desired_status,
        "desired_reason": desired_reason,
        "client_status": desired.client.status,
        "restarts": status.map_or(0, |status| status.tasks.values().map(|task| task.restarts).sum::<u32>()),
        "resource_limits": status.and_then(|status| status.resource_limits).map(|limits| limits.as_str()),
        // Sampled by the allocation's own node (null elsewhere).
        "cpu_millicores": cpu_millicores,
        "allocation": desired,
    });
    if full {
        value["status"] = serde_json::to_value(status).unwrap_or(Value::Null);
    }
    value
}

async fn list(State(shared): State<Arc<Shared>>, Query(parameters): Parameters) -> Response {
    let job = parameter(&parameters, "job");
    let node = parameter(&parameters, "node");
    let view = shared.supervisor.read();
    let mut entries: Vec<&Allocation> = view
        .allocations
        .values()
        .filter(|allocation| job.is_none_or(|job| allocation.job == job))
        .filter(|allocation| node.is_none_or(|node| allocation.node == node))
        .collect();
    entries.sort_by(|left, right| {
        (&left.job, &left.group, left.index, left.created_at).cmp(&(
            &right.job,
            &right.group,
            right.index,
            right.created_at,
        ))
    });
    let values: Vec<Value> = entries
        .into_iter()
        .map(|allocation| {
            joined(
                allocation,
                view.statuses.get(&allocation.id.0),
                view.cpu_millicores.get(&allocation.id.0).copied(),
                false,
            )
        })
        .collect();
    axum::Json(Value::Array(values)).into_response()
}

async fn one(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let view = shared.supervisor.read();
    match view.allocations.get(&id) {
        Some(allocation) => axum::Json(joined(
            allocation,
            view.statuses.get(&id),
            view.cpu_millicores.get(&id).copied(),
            true,
        ))
        .into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no allocation {id:?}")),
    }
}

async fn logs(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(parameters): Parameters,
) -> Response {
    let (node, tasks, terminal) = {
        let view = shared.supervisor.read();
        let Some(allocation) = view.allocations.get(&id) else {
            return error(StatusCode::NOT_FOUND, format!("no allocation {id:?}"));
        };
        let status = view.statuses.get(&id);
        (
            allocation.node.clone(),
            status
                .map(|status| status.tasks.keys().cloned().collect::<Vec<_>>())
                .unwrap_or_default(),
            status.is_some_and(|status| status.client.status.is_terminal()),
        )
    };
    if node != shared.config.name {
        return proxy(&shared, &node, &id, &parameters).await;
    }
    let text = parameter(&parameters, "type").unwrap_or("stdout");
    let Some(stream) = LogStream::parse(text) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("type: {text:?} is not stdout or stderr"),
        );
    };
    let task = match parameter(&parameters, "task") {
        Some(task) if tasks.iter().any(|known| known == task) => task.to_string(),
        Some(task) => {
            return error(
                StatusCode::NOT_FOUND,
                format!(
                    "task: allocation {id} has no task {task:?} (its tasks: {})",
                    tasks.join(", ")
                ),
            )
        }
        None if tasks.len() == 1 => tasks[0].clone(),
        None if tasks.is_empty() => {
            return error(
                StatusCode::NOT_FOUND,
                format!("allocation {id} has not reported its tasks yet"),
            )
        }
        None => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "task: required, allocation {id} has several (its tasks: {})",
                    tasks.join(", ")
                ),
            )
        }
    };
    let follow = match parameter(&parameters, "follow") {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("follow: {other:?} is not true or false"),
            )
        }
    };
    let path = logs::log_path(
        &shared.config.data_dir.join(ALLOCS_DIRECTORY).join(&id),
        &task,
        stream,
    );
    let (tail, offset) = match logs::tail(&path, logs::LOG_RESPONSE_BYTES_MAX).await {
        Ok(read) => read,
        Err(read_error) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{}: {read_error}", path.display()),
            )
        }
    };
    let headers = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if !follow || terminal {
        return (headers, tail).into_response();
    }
    let (sender, receiver) =
        tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(FOLLOW_CHANNEL_CHUNKS);
    let _ = sender.try_send(Ok(Bytes::from(tail)));
    tokio::spawn(follow_log(shared.clone(), id, path, offset, sender));
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(receiver));
    (headers, body).into_response()
}

/// Sends what is appended to a log file until the client goes, the
/// allocation ends (and the file is read out), or
/// [`logs::FOLLOW_DURATION_MAX`] passes.
async fn follow_log(
    shared: Arc<Shared>,
    id: String,
    path: std::path::PathBuf,
    mut offset: u64,
    sender: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let started = Instant::now();
    while started.elapsed() < logs::FOLLOW_DURATION_MAX {
        let ended = shared
            .supervisor
            .read()
            .statuses
            .get(&id)
            .is_none_or(|status| status.client.status.is_terminal());
        match logs::read_from(&path, offset, FOLLOW_CHUNK_BYTES_MAX).await {
            Ok((bytes, next)) => {
                offset = next;
                if bytes.is_empty() {
                    if ended {
                        return;
                    }
                    if sender.is_closed() {
                        return;
                    }
                    tokio::time::sleep(logs::FOLLOW_POLL_INTERVAL).await;
                    continue;
                }
                if sender.send(Ok(Bytes::from(bytes))).await.is_err() {
                    return;
                }
            }
            Err(read_error) => {
                let _ = sender.send(Err(read_error)).await;
                return;
            }
        }
    }
}

/// Forwards a logs request to the agent of the allocation's node.
async fn proxy(shared: &Shared, node: &str, id: &str, parameters: &[(String, String)]) -> Response {
    let address = {
        let view = shared.view.read().expect("view lock");
        view.catalog
            .nodes
            .get(node)
            .map(|record| record.value.http_address.clone())
    };
    let Some(address) = address.filter(|address| !address.is_empty()) else {
        return error(
            StatusCode::BAD_GATEWAY,
            format!("allocation {id} runs on node {node}, which is not registered (down?); its logs are there"),
        );
    };
    let query: String = parameters
        .iter()
        .map(|(key, value)| format!("{}={}", encode(key), encode(value)))
        .collect::<Vec<_>>()
        .join("&");
    let uri = format!("http://{address}/v1/allocation/{id}/logs?{query}");
    let request = match hyper::Request::get(&uri).body(Full::new(Bytes::new())) {
        Ok(request) => request,
        Err(build_error) => return error(StatusCode::BAD_REQUEST, build_error.to_string()),
    };
    match shared.http.request(request).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            Response::from_parts(parts, Body::new(body))
        }
        Err(request_error) => error(
            StatusCode::BAD_GATEWAY,
            format!("cannot reach node {node}'s agent at {address}: {request_error}"),
        ),
    }
}

/// Percent-encodes a query component (RFC 3986 unreserved characters kept).
fn encode(text: &str) -> String {
    text.bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
                (byte as char).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect()
}
