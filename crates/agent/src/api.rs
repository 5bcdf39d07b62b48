//! The agent's HTTP API: the part of Consul's `/v1` that registration,
//! health and discovery need, with Consul's paths, JSON field names and
//! headers, so Consul's clients and tools (Prometheus' `consul_sd_configs`,
//! python-consul) work against it; and `/v1/keel/nodes` for `keel node list`.
//!
//! Reads come from the agent's view (one shared watch of `/keel/`), never
//! from the store. A blocking query (`?index=N&wait=D`) waits on the view's
//! change signal until the view moved past revision N or D passed;
//! `X-Consul-Index` is the store revision of the view, and
//! `X-Consul-KnownLeader: false` says the view may be stale.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use serde_json::{json, Value};

mod allocations;

use crate::agent::Shared;
use crate::catalog::{Catalog, CheckRecord, HealthEntry, NodeStatus, Stored};
use crate::check_state::CheckStatus;
use crate::definition::{self, DEFINITION_BYTES_MAX};
use crate::local::{LocalError, Source};

mod dashboard;
pub mod event_stream;
pub mod jobs;
mod observability;

/// Consul's default blocking wait.
const WAIT_DEFAULT: Duration = Duration::from_secs(300);
/// Consul's longest blocking wait.
const WAIT_MAX: Duration = Duration::from_secs(600);
/// Longest note accepted with a TTL report.
const NOTE_BYTES_MAX: usize = 4096;
/// The datacenter name Consul's clients expect in answers.
pub const DATACENTER: &str = "dc1";
/// The check id of the node's own health, as Consul names it.
const NODE_CHECK_ID: &str = "serfHealth";

/// The API's routes over the agent's shared state.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/agent/self", get(agent_self))
        .route("/v1/agent/services", get(agent_services))
        .route("/v1/agent/checks", get(agent_checks))
        .route("/v1/agent/service/register", put(register))
        .route("/v1/agent/service/deregister/{id}", put(deregister))
        .route("/v1/agent/check/pass/{id}", put(check_pass))
        .route("/v1/agent/check/warn/{id}", put(check_warn))
        .route("/v1/agent/check/fail/{id}", put(check_fail))
        .route("/v1/agent/check/update/{id}", put(check_update))
        .route("/v1/health/service/{name}", get(health_service))
        .route("/v1/health/node/{node}", get(health_node))
        .route("/v1/health/checks/{service}", get(health_checks))
        .route("/v1/catalog/services", get(catalog_services))
        .route("/v1/catalog/service/{name}", get(catalog_service))
        .route("/v1/catalog/nodes", get(catalog_nodes))
        .route("/v1/keel/nodes", get(keel_nodes))
        // The events log, metrics, health and the dashboard (issue 13).
        .route("/v1/events", get(event_stream::list))
        .route("/v1/events/stream", get(event_stream::stream))
        .route("/metrics", get(observability::metrics))
        .route("/livez", get(observability::livez))
        .route("/readyz", get(observability::readyz))
        .route("/", get(dashboard::redirect))
        .route("/ui", get(dashboard::page))
        .route("/ui/", get(dashboard::page))
        .route("/ui/app.js", get(dashboard::script))
        .route("/ui/style.css", get(dashboard::style))
        .route("/v1/ui/state", get(dashboard::state))
        .route("/v1/ui/kv", get(dashboard::keys))
        .merge(allocations::routes())
        .layer(DefaultBodyLimit::max(DEFINITION_BYTES_MAX))
        .merge(jobs::routes())
        .with_state(shared)
}

type Parameters = Query<Vec<(String, String)>>;

fn parameter<'a>(parameters: &'a [(String, String)], name: &str) -> Option<&'a str> {
    parameters
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

fn bad_request(message: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, message.into()).into_response()
}

fn local_error(error: LocalError) -> Response {
    let status = match error {
        LocalError::UnknownService(_) | LocalError::UnknownCheck(_) => StatusCode::NOT_FOUND,
        LocalError::Definition(_) | LocalError::NotTtl(_) => StatusCode::BAD_REQUEST,
        LocalError::TooManyServices => StatusCode::TOO_MANY_REQUESTS,
    };
    (status, error.to_string()).into_response()
}

/// Waits as a blocking query asks; returns the headers to answer with.
async fn block(shared: &Shared, parameters: &[(String, String)]) -> Result<HeaderMap, Response> {
    let wait = match parameter(parameters, "wait") {
        Some(text) => definition::parse_duration(text)
            .map_err(|reason| bad_request(format!("wait: {reason}")))?
            .min(WAIT_MAX),
        None => WAIT_DEFAULT,
    };
    if let Some(text) = parameter(parameters, "index") {
        let index: u64 = text
            .parse()
            .map_err(|_| bad_request(format!("index: {text:?} is not a number")))?;
        let mut changes = shared.generation.subscribe();
        changes.borrow_and_update();
        let current = shared
            .view
            .read()
            .expect("view lock")
            .catalog
            .revision
            .max(1) as u64;
        if current == index {
            // One change of the view (a new revision, a node's suspicion, the
            // store's reachability) ends the wait.
            let _ = tokio::time::timeout(wait, changes.changed()).await;
        }
    }
    let view = shared.view.read().expect("view lock");
    let mut headers = HeaderMap::new();
    headers.insert(
        "X-Consul-Index",
        HeaderValue::from(view.catalog.revision.max(1) as u64),
    );
    headers.insert(
        "X-Consul-KnownLeader",
        HeaderValue::from_static(if view.stale() { "false" } else { "true" }),
    );
    headers.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
    Ok(headers)
}

fn json_response(headers: HeaderMap, value: Value) -> Response {
    (headers, axum::Json(value)).into_response()
}

fn node_json(catalog: &Catalog, node: &Stored<crate::catalog::NodeRecord>) -> Value {
    let record = &node.value;
    let _ = catalog;
    json!({
        "ID": "",
        "Node": record.name,
        "Address": record.address,
        "Datacenter": DATACENTER,
        "TaggedAddresses": {"lan": record.address, "wan": record.address},
        "Meta": record.labels,
        "CreateIndex": node.create_revision,
        "ModifyIndex": node.modify_revision,
    })
}

fn check_json(check: &Stored<CheckRecord>, tags: &[String]) -> Value {
    let record = &check.value;
    json!({
        "Node": record.node,
        "CheckID": record.id,
        "Name": record.name,
        "Status": record.status,
        "Notes": record.notes,
        "Output": record.output,
        "ServiceID": record.service_id,
        "ServiceName": record.service,
        "ServiceTags": tags,
        "Type": record.type_name,
        "Kind": record.kind,
        "Definition": {},
        "CreateIndex": check.create_revision,
        "ModifyIndex": check.modify_revision,
    })
}

/// The node's own health as a check, as Consul's `serfHealth`.
fn node_check_json(catalog: &Catalog, node: &Stored<crate::catalog::NodeRecord>) -> Value {
    let status = catalog.node_status(&node.value.name);
    let (check_status, output) = match status {
        NodeStatus::Alive => ("passing", "Agent alive and reachable".to_string()),
        NodeStatus::Suspect => {
            let phi = catalog
                .liveness
                .get(&node.value.name)
                .and_then(|liveness| liveness.phi)
                .map_or("unknown".to_string(), |phi| format!("{phi:.1}"));
            ("critical", format!("Agent suspected by gossip (phi {phi})"))
        }
        NodeStatus::Down => ("critical", "Agent's node lease expired".to_string()),
    };
    json!({
        "Node": node.value.name,
        "CheckID": NODE_CHECK_ID,
        "Name": "Serf Health Status",
        "Status": check_status,
        "Notes": "",
        "Output": output,
        "ServiceID": "",
        "ServiceName": "",
        "ServiceTags": [],
        "Type": "",
        "Definition": {},
        "CreateIndex": node.create_revision,
        "ModifyIndex": node.modify_revision,
    })
}

fn service_json(entry: &HealthEntry<'_>) -> Value {
    let instance = &entry.instance.value;
    json!({
        "ID": instance.id,
        "Service": instance.service,
        "Tags": instance.tags,
        "Address": instance.address,
        "Meta": instance.meta,
        "Port": instance.port,
        "Weights": instance.weights,
        "EnableTagOverride": false,
        "CreateIndex": entry.instance.create_revision,
        "ModifyIndex": entry.instance.modify_revision,
    })
}

async fn agent_self(State(shared): State<Arc<Shared>>) -> Response {
    let node = shared.local.lock().expect("local state lock").node.clone();
    json_response(
        HeaderMap::new(),
        json!({
            "Config": {
                "Datacenter": DATACENTER,
                "NodeName": node.name,
                "NodeID": "",
                "Server": false,
                "Revision": "",
                "Version": env!("CARGO_PKG_VERSION"),
                "Domain": shared.config.dns_domain,
            },
            "Member": {
                "Name": node.name,
                "Addr": node.address,
                "Port": shared.config.gossip_addr.port(),
                "Status": 1,
                "Tags": {},
            },
            "Meta": node.labels,
            "Keel": {
                "Endpoints": shared.config.endpoints,
                "NodeTtlSeconds": shared.config.node_ttl.as_secs(),
                "LeaseID": node.lease_id,
                "HttpAddress": node.http_address,
                "DnsAddress": node.dns_address,
                "GossipAddress": node.gossip_address,
                "UptimeSeconds": shared.started_at.elapsed().as_secs(),
            },
        }),
    )
}

async fn agent_services(State(shared): State<Arc<Shared>>) -> Response {
    let local = shared.local.lock().expect("local state lock");
    let services: serde_json::Map<String, Value> = local
        .services
        .values()
        .map(|service| {
            let definition = &service.definition;
            (
                definition.id.clone(),
                json!({
                    "ID": definition.id,
                    "Service": definition.name,
                    "Tags": definition.tags,
                    "Meta": definition.meta,
                    "Port": definition.port,
                    "Address": definition.address,
                    "Weights": definition.weights,
                    "EnableTagOverride": false,
                    "Datacenter": DATACENTER,
                }),
            )
        })
        .collect();
    json_response(HeaderMap::new(), Value::Object(services))
}

async fn agent_checks(State(shared): State<Arc<Shared>>) -> Response {
    let local = shared.local.lock().expect("local state lock");
    let mut checks = serde_json::Map::new();
    for service in local.services.values() {
        for check in service.checks.values() {
            let record = local.check_record(service, check);
            let stored = Stored {
                value: record,
                create_revision: 0,
                modify_revision: 0,
            };
            checks.insert(
                check.definition.id.clone(),
                check_json(&stored, &service.definition.tags),
            );
        }
    }
    json_response(HeaderMap::new(), Value::Object(checks))
}

async fn register(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let definition = match definition::parse_json(&body) {
        Ok(definition) => definition,
        Err(error) => return bad_request(error.to_string()),
    };
    match shared.register(definition, Source::Api).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(error) => local_error(error),
    }
}

async fn deregister(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match shared.deregister(&id).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(error) => local_error(error),
    }
}

fn report(shared: &Shared, id: &str, status: CheckStatus, note: String) -> Response {
    if note.len() > NOTE_BYTES_MAX {
        return bad_request(format!("note: longer than {NOTE_BYTES_MAX} bytes"));
    }
    match shared.report_ttl(id, status, note) {
        Ok(()) => StatusCode::OK.into_response(),
        Err(error) => local_error(error),
    }
}

async fn check_pass(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(parameters): Parameters,
) -> Response {
    let note = parameter(&parameters, "note")
        .unwrap_or_default()
        .to_string();
    report(&shared, &id, CheckStatus::Passing, note)
}

async fn check_warn(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(parameters): Parameters,
) -> Response {
    let note = parameter(&parameters, "note")
        .unwrap_or_default()
        .to_string();
    report(&shared, &id, CheckStatus::Warning, note)
}

async fn check_fail(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(parameters): Parameters,
) -> Response {
    let note = parameter(&parameters, "note")
        .unwrap_or_default()
        .to_string();
    report(&shared, &id, CheckStatus::Critical, note)
}

async fn check_update(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let value: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(error) => return bad_request(format!("not valid JSON: {error}")),
    };
    let field = |name: &str| {
        value
            .as_object()
            .and_then(|object| {
                object
                    .iter()
                    .find(|(key, _)| key.eq_ignore_ascii_case(name))
                    .map(|(_, value)| value.as_str().unwrap_or_default().to_string())
            })
            .unwrap_or_default()
    };
    let Some(status) = CheckStatus::parse(&field("Status")) else {
        return bad_request("Status: must be one of passing, warning, critical");
    };
    report(&shared, &id, status, field("Output"))
}

async fn health_service(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    Query(parameters): Parameters,
) -> Response {
    let headers = match block(&shared, &parameters).await {
        Ok(headers) => headers,
        Err(response) => return response,
    };
    let passing_only = parameters
        .iter()
        .any(|(key, value)| key == "passing" && !matches!(value.as_str(), "false" | "0"));
    let tags: Vec<&str> = parameters
        .iter()
        .filter(|(key, _)| key == "tag")
        .map(|(_, value)| value.as_str())
        .collect();
    let view = shared.view.read().expect("view lock");
    let catalog = &view.catalog;
    let entries: Vec<Value> = catalog
        .health_service(&name, None)
        .into_iter()
        .filter(|entry| {
            tags.iter()
                .all(|tag| entry.instance.value.tags.iter().any(|t| t == tag))
        })
        .filter(|entry| !passing_only || entry.passing())
        .map(|entry| {
            let mut checks = vec![node_check_json(catalog, entry.node)];
            checks.extend(
                entry
                    .checks
                    .iter()
                    .map(|check| check_json(check, &entry.instance.value.tags)),
            );
            json!({
                "Node": node_json(catalog, entry.node),
                "Service": service_json(&entry),
                "Checks": checks,
            })
        })
        .collect();
    json_response(headers, Value::Array(entries))
}

async fn health_node(
    State(shared): State<Arc<Shared>>,
    Path(node): Path<String>,
    Query(parameters): Parameters,
) -> Response {
    let headers = match block(&shared, &parameters).await {
        Ok(headers) => headers,
        Err(response) => return response,
    };
    let view = shared.view.read().expect("view lock");
    let catalog = &view.catalog;
    let Some(record) = catalog.nodes.get(&node) else {
        return json_response(headers, json!([]));
    };
    let mut checks = vec![node_check_json(catalog, record)];
    for instance in catalog.instances_on(&node) {
        for check in catalog.checks_of(&instance.value.service, &node, &instance.value.id) {
            checks.push(check_json(check, &instance.value.tags));
        }
    }
    json_response(headers, Value::Array(checks))
}

async fn health_checks(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    Query(parameters): Parameters,
) -> Response {
    let headers = match block(&shared, &parameters).await {
        Ok(headers) => headers,
        Err(response) => return response,
    };
    let view = shared.view.read().expect("view lock");
    let checks: Vec<Value> = view
        .catalog
        .health_service(&service, None)
        .iter()
        .flat_map(|entry| {
            entry
                .checks
                .iter()
                .map(|check| check_json(check, &entry.instance.value.tags))
        })
        .collect();
    json_response(headers, Value::Array(checks))
}

async fn catalog_services(
    State(shared): State<Arc<Shared>>,
    Query(parameters): Parameters,
) -> Response {
    let headers = match block(&shared, &parameters).await {
        Ok(headers) => headers,
        Err(response) => return response,
    };
    let view = shared.view.read().expect("view lock");
    let services: BTreeMap<String, Vec<String>> = view
        .catalog
        .services()
        .into_iter()
        .map(|(name, tags)| (name, tags.into_iter().collect()))
        .collect();
    json_response(headers, json!(services))
}

async fn catalog_service(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    Query(parameters): Parameters,
) -> Response {
    let headers = match block(&shared, &parameters).await {
        Ok(headers) => headers,
        Err(response) => return response,
    };
    let tags: Vec<&str> = parameters
        .iter()
        .filter(|(key, _)| key == "tag")
        .map(|(_, value)| value.as_str())
        .collect();
    let view = shared.view.read().expect("view lock");
    let entries: Vec<Value> = view
        .catalog
        .health_service(&name, None)
        .into_iter()
        .filter(|entry| {
            tags.iter()
                .all(|tag| entry.instance.value.tags.iter().any(|t| t == tag))
        })
        .map(|entry| {
            let node = &entry.node.value;
            let instance = &entry.instance.value;
            json!({
                "ID": "",
                "Node": node.name,
                "Address": node.address,
                "Datacenter": DATACENTER,
                "TaggedAddresses": {"lan": node.address, "wan": node.address},
                "NodeMeta": node.labels,
                "ServiceID": instance.id,
                "ServiceName": instance.service,
                "ServiceTags": instance.tags,
                "ServiceAddress": instance.address,
                "ServicePort": instance.port,
                "ServiceMeta": instance.meta,
                "ServiceWeights": instance.weights,
                "ServiceEnableTagOverride": false,
                "CreateIndex": entry.instance.create_revision,
                "ModifyIndex": entry.instance.modify_revision,
            })
        })
        .collect();
    json_response(headers, Value::Array(entries))
}

async fn catalog_nodes(
    State(shared): State<Arc<Shared>>,
    Query(parameters): Parameters,
) -> Response {
    let headers = match block(&shared, &parameters).await {
        Ok(headers) => headers,
        Err(response) => return response,
    };
    let view = shared.view.read().expect("view lock");
    let nodes: Vec<Value> = view
        .catalog
        .nodes
        .values()
        .map(|node| node_json(&view.catalog, node))
        .collect();
    json_response(headers, Value::Array(nodes))
}

/// Every node this agent knows, with status (alive, suspect, down), phi,
/// resources, live usage, labels and its number of instances.
async fn keel_nodes(State(shared): State<Arc<Shared>>, Query(parameters): Parameters) -> Response {
    let headers = match block(&shared, &parameters).await {
        Ok(headers) => headers,
        Err(response) => return response,
    };
    let view = shared.view.read().expect("view lock");
    let catalog = &view.catalog;
    let mut nodes: Vec<Value> = catalog
        .nodes
        .values()
        .map(|node| {
            let record = &node.value;
            let liveness = catalog.liveness.get(&record.name);
            json!({
                "Node": record.name,
                "Address": record.address,
                "Status": catalog.node_status(&record.name).as_str(),
                "Phi": liveness.and_then(|liveness| liveness.phi),
                "CpuCores": record.cpu_cores,
                "MemoryTotalBytes": record.memory_total_bytes,
                "DiskTotalBytes": record.disk_total_bytes,
                "Usage": liveness.and_then(|liveness| liveness.usage.clone()),
                "Labels": record.labels,
                "Instances": catalog.instances_on(&record.name).count(),
                "HttpAddress": record.http_address,
                "DnsAddress": record.dns_address,
                "ModifyIndex": node.modify_revision,
            })
        })
        .collect();
    for (name, (record, revision)) in &catalog.down {
        nodes.push(json!({
            "Node": name,
            "Address": record.address,
            "Status": NodeStatus::Down.as_str(),
            "Phi": catalog.liveness.get(name).and_then(|liveness| liveness.phi),
            "CpuCores": record.cpu_cores,
            "MemoryTotalBytes": record.memory_total_bytes,
            "DiskTotalBytes": record.disk_total_bytes,
            "Usage": null,
            "Labels": record.labels,
            "Instances": 0,
            "HttpAddress": record.http_address,
            "DnsAddress": record.dns_address,
            "ModifyIndex": revision,
        }));
    }
    json_response(headers, Value::Array(nodes))
}
