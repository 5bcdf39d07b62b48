//! The web dashboard: `/ui` is a server-rendered page (its first state
//! embedded, so it paints without waiting) whose small script polls
//! `/v1/ui/state` every second and listens to `/v1/events/stream` for the
//! timeline. The assets are compiled into the binary (`include_str!`): no
//! internet, no build step. `/v1/ui/kv` is the read-only key browser, the one
//! part that reads the store directly (a bounded page of keys per request).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use keel_client::keel_types::etcdserverpb::{range_request, RangeRequest};
use serde_json::{json, Value};

use crate::agent::Shared;
use crate::catalog::NodeStatus;

/// Keys one page of the key browser lists at most.
pub const KEYS_PAGE_MAX: usize = 500;
/// Keys listed unless `limit` says otherwise.
const KEYS_PAGE_DEFAULT: usize = 100;
/// Bytes of each value shown in a listing.
pub const VALUE_PREVIEW_BYTES_MAX: usize = 200;
/// Bytes of one value shown when a single key is asked for.
pub const VALUE_BYTES_MAX: usize = 64 * 1024;
/// Allocations the state lists at most (the newest).
pub const ALLOCATIONS_SHOWN_MAX: usize = 200;

const PAGE: &str = include_str!("../ui/index.html");
const SCRIPT: &str = include_str!("../ui/app.js");
const STYLE: &str = include_str!("../ui/style.css");

/// `/ui`: the page with its first state embedded.
pub async fn page(State(shared): State<Arc<Shared>>) -> Response {
    shared.observed.note_viewed();
    let state = serde_json::to_string(&state_json(&shared)).expect("state serializes");
    // Inside <script>, "</" would end the element: escape every '<'.
    let embedded = state.replace('<', "\\u003c");
    let html = PAGE
        .replace("{{NODE}}", &html_escape(&shared.config.name))
        .replace("{{STATE}}", &embedded);
    ([(header::CACHE_CONTROL, "no-store")], Html(html)).into_response()
}

pub async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
        .into_response()
}

pub async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
}

pub async fn redirect() -> Response {
    (StatusCode::FOUND, [(header::LOCATION, "/ui")]).into_response()
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `/v1/ui/state`: everything the page shows but the timeline and keys.
pub async fn state(State(shared): State<Arc<Shared>>) -> Response {
    shared.observed.note_viewed();
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(state_json(&shared)),
    )
        .into_response()
}

fn state_json(shared: &Shared) -> Value {
    let cluster = shared
        .observed
        .cluster
        .read()
        .expect("cluster lock")
        .clone();
    let samples = shared
        .observed
        .sampler
        .lock()
        .expect("sampler lock")
        .samples();
    let view = shared.view.read().expect("view lock");
    let catalog = &view.catalog;
    let mut nodes: Vec<Value> = catalog
        .nodes
        .values()
        .map(|node| {
            let record = &node.value;
            let liveness = catalog.liveness.get(&record.name);
            json!({
                "name": record.name,
                "address": record.address,
                "status": catalog.node_status(&record.name).as_str(),
                "phi": liveness.and_then(|liveness| liveness.phi),
                "cpu_cores": record.cpu_cores,
                "memory_total_bytes": record.memory_total_bytes,
                "disk_total_bytes": record.disk_total_bytes,
                "usage": liveness.and_then(|liveness| liveness.usage.clone()),
                "labels": record.labels,
                "instances": catalog.instances_on(&record.name).count(),
                "http_address": record.http_address,
            })
        })
        .collect();
    for (name, (record, _)) in &catalog.down {
        nodes.push(json!({
            "name": name,
            "address": record.address,
            "status": NodeStatus::Down.as_str(),
            "phi": catalog.liveness.get(name).and_then(|liveness| liveness.phi),
            "cpu_cores": record.cpu_cores,
            "memory_total_bytes": record.memory_total_bytes,
            "disk_total_bytes": record.disk_total_bytes,
            "usage": null,
            "labels": record.labels,
            "instances": 0,
            "http_address": record.http_address,
        }));
    }
    let services: Vec<Value> = catalog
        .services()
        .into_iter()
        .map(|(name, tags)| {
            let instances: Vec<Value> = catalog
                .health_service(&name, None)
                .iter()
                .map(|entry| {
                    let instance = &entry.instance.value;
                    json!({
                        "id": instance.id,
                        "node": instance.node,
                        "address": entry.address(),
                        "port": instance.port,
                        "tags": instance.tags,
                        "node_status": entry.node_status.as_str(),
                        "status": entry.aggregated_status().as_str(),
                        "passing": entry.passing(),
                        "checks": entry.checks.iter().map(|check| json!({
                            "id": check.value.id,
                            "name": check.value.name,
                            "kind": check.value.kind,
                            "type": check.value.type_name,
                            "status": check.value.status,
                            "output": check.value.output,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({"name": name, "tags": tags, "instances": instances})
        })
        .collect();
    json!({
        "agent": {
            "name": shared.config.name,
            "reporter": shared.observed.reporter.load(Ordering::Relaxed),
            "stale": view.stale(),
            "revision": catalog.revision,
            "uptime_seconds": shared.started_at.elapsed().as_secs(),
        },
        "cluster": cluster,
        "nodes": nodes,
        "services": services,
        "jobs": view.workloads.jobs_json(),
        "allocations": view.workloads.allocations_json(ALLOCATIONS_SHOWN_MAX),
        "allocation_counts": view.workloads.allocation_counts(),
        "samples": samples,
    })
}

/// `/v1/ui/kv?prefix=…&after=…&limit=…` lists keys (with a preview of each
/// value); `/v1/ui/kv?key=…` shows one value. Read-only.
pub async fn keys(
    State(shared): State<Arc<Shared>>,
    Query(parameters): Query<Vec<(String, String)>>,
) -> Response {
    let parameter = |name: &str| {
        parameters
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    let bad = |message: String| (StatusCode::BAD_REQUEST, message).into_response();
    let limit = match parameter("limit") {
        None => KEYS_PAGE_DEFAULT,
        Some(text) => match text.parse::<usize>() {
            Ok(limit) if (1..=KEYS_PAGE_MAX).contains(&limit) => limit,
            _ => {
                return bad(format!(
                    "limit: {text:?} is not a number from 1 to {KEYS_PAGE_MAX}"
                ))
            }
        },
    };
    let unavailable = |error: keel_client::ClientError| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read the store: {error}"),
        )
            .into_response()
    };
    if let Some(key) = parameter("key") {
        return match shared.client.get(key).await {
            Ok(Some(kv)) => {
                let truncated = kv.value.len() > VALUE_BYTES_MAX;
                let shown = &kv.value[..kv.value.len().min(VALUE_BYTES_MAX)];
                axum::Json(json!({
                    "key": key,
                    "value": String::from_utf8_lossy(shown),
                    "size_bytes": kv.value.len(),
                    "truncated": truncated,
                    "create_revision": kv.create_revision,
                    "mod_revision": kv.mod_revision,
                    "version": kv.version,
                    "lease": format!("{:x}", kv.lease),
                }))
                .into_response()
            }
            Ok(None) => (StatusCode::NOT_FOUND, format!("no key {key:?}")).into_response(),
            Err(error) => unavailable(error),
        };
    }
    let prefix = parameter("prefix").unwrap_or("");
    let start = match parameter("after") {
        // The first key after `after`: `after` followed by a zero byte.
        Some(after) if !after.is_empty() => {
            if !after.starts_with(prefix) {
                return bad(format!(
                    "after: {after:?} is not under the prefix {prefix:?}"
                ));
            }
            let mut start = after.as_bytes().to_vec();
            start.push(0);
            start
        }
        _ => prefix.as_bytes().to_vec(),
    };
    let response = shared
        .client
        .range(RangeRequest {
            key: if start.is_empty() { vec![0] } else { start },
            range_end: keel_client::prefix_end(prefix.as_bytes()),
            limit: limit as i64,
            sort_order: range_request::SortOrder::Ascend as i32,
            sort_target: range_request::SortTarget::Key as i32,
            serializable: true,
            ..RangeRequest::default()
        })
        .await;
    match response {
        Ok(response) => {
            let keys: Vec<Value> = response
                .kvs
                .iter()
                .map(|kv| {
                    let shown = &kv.value[..kv.value.len().min(VALUE_PREVIEW_BYTES_MAX)];
                    json!({
                        "key": String::from_utf8_lossy(&kv.key),
                        "preview": String::from_utf8_lossy(shown),
                        "size_bytes": kv.value.len(),
                        "mod_revision": kv.mod_revision,
                        "lease": format!("{:x}", kv.lease),
                    })
                })
                .collect();
            axum::Json(json!({
                "prefix": prefix,
                "keys": keys,
                "more": response.more,
                "count": response.count,
                "revision": response.header.map_or(0, |header| header.revision),
            }))
            .into_response()
        }
        Err(error) => unavailable(error),
    }
}
