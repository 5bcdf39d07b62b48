//! A task's `service` blocks as the agent's own service definitions, so the
//! supervisor registers them in the local registry like any other service
//! (catalog, DNS, check runners). Pure: job spec in, definitions out.
//!
//! The instance id is derived from the allocation id (`<alloc id>:<task>:<service>`),
//! so two allocations of one job on one node never collide; check ids are
//! `<instance id>:<check name>`. Checks probe the node's address at the
//! allocation's port. Liveness checks start passing (as Kubernetes'
//! liveness probes: only failures turn them critical, so a starting task is
//! not killed before its first probe); readiness and startup checks start
//! critical, so an instance enters discovery only once ready.

use keel_scheduler::{Allocation, CheckKind, CheckType, Service, Task};
use serde_json::{json, Map, Value};

use crate::definition::{self, DefinitionError, ServiceDefinition};

/// The instance id of `service` of `task` in allocation `alloc_id`.
pub fn instance_id(alloc_id: &str, task: &str, service: &str) -> String {
    format!("{alloc_id}:{}:{}", sanitise(task), sanitise(service))
}

/// Replaces what ids may not hold (they become store keys and URL parts).
fn sanitise(text: &str) -> String {
    text.chars()
        .map(|character| {
            if character.is_ascii_alphanumeric() || matches!(character, '-' | '_' | '.') {
                character
            } else {
                '_'
            }
        })
        .collect()
}

fn duration(duration: std::time::Duration) -> String {
    format!("{}ms", duration.as_millis())
}

/// The definitions of `task`'s services for `allocation`, on a node whose
/// address is `node_address`.
pub fn definitions(
    allocation: &Allocation,
    task_name: &str,
    task: &Task,
    node_address: &str,
) -> Result<Vec<ServiceDefinition>, DefinitionError> {
    task.services
        .iter()
        .map(|service| definition(allocation, task_name, task, service, node_address))
        .collect()
}

fn port_of(allocation: &Allocation, task: &Task, label: Option<&String>) -> u16 {
    match label {
        Some(label) => allocation.ports.get(label).copied().unwrap_or(0),
        // Without a label, the task's only port, if it has one.
        None if task.ports.len() == 1 => task
            .ports
            .keys()
            .next()
            .and_then(|label| allocation.ports.get(label))
            .copied()
            .unwrap_or(0),
        None => 0,
    }
}

fn definition(
    allocation: &Allocation,
    task_name: &str,
    task: &Task,
    service: &Service,
    node_address: &str,
) -> Result<ServiceDefinition, DefinitionError> {
    let id = instance_id(&allocation.id.0, task_name, &service.name);
    let port = port_of(allocation, task, service.port.as_ref());
    let mut meta = service.meta.clone();
    meta.insert("alloc_id".into(), allocation.id.0.clone());
    meta.insert("job".into(), allocation.job.clone());
    meta.insert("task".into(), task_name.to_string());
    let checks: Vec<Value> = service
        .checks
        .iter()
        .map(|check| {
            let check_port = match &check.port {
                Some(label) => port_of(allocation, task, Some(label)),
                None => port,
            };
            let target = format!("{node_address}:{check_port}");
            let mut object = Map::new();
            object.insert(
                "id".into(),
                json!(format!("{id}:{}", sanitise(&check.name))),
            );
            object.insert("name".into(), json!(check.name));
            let kind = match check.kind {
                CheckKind::Readiness => "readiness",
                CheckKind::Liveness => "liveness",
                CheckKind::Startup => "startup",
            };
            object.insert("kind".into(), json!(kind));
            if check.kind == CheckKind::Liveness {
                object.insert("status".into(), json!("passing"));
            }
            match check.check_type {
                CheckType::Http => {
                    let path = check.path.clone().unwrap_or_else(|| "/".into());
                    let path = if path.starts_with('/') {
                        path
                    } else {
                        format!("/{path}")
                    };
                    object.insert("http".into(), json!(format!("http://{target}{path}")));
                    if let Some(method) = &check.method {
                        object.insert("method".into(), json!(method));
                    }
                    if !check.header.is_empty() {
                        object.insert("header".into(), json!(check.header));
                    }
                }
                CheckType::Tcp => {
                    object.insert("tcp".into(), json!(target));
                }
                CheckType::Grpc => {
                    let target = match &check.grpc_service {
                        Some(name) if !name.is_empty() => format!("{target}/{name}"),
                        _ => target,
                    };
                    object.insert("grpc".into(), json!(target));
                }
                CheckType::Exec => {
                    let mut arguments = vec![check.command.clone().unwrap_or_default()];
                    arguments.extend(check.args.iter().cloned());
                    object.insert("args".into(), json!(arguments));
                }
                CheckType::Ttl => {
                    let ttl = check.ttl.unwrap_or(check.interval);
                    object.insert("ttl".into(), json!(duration(ttl)));
                }
            }
            if check.check_type != CheckType::Ttl {
                object.insert("interval".into(), json!(duration(check.interval)));
            }
            object.insert("timeout".into(), json!(duration(check.timeout)));
            object.insert("initial_delay".into(), json!(duration(check.initial_delay)));
            object.insert(
                "success_before_passing".into(),
                json!(check.success_before_passing),
            );
            object.insert(
                "failures_before_warning".into(),
                json!(check
                    .failures_before_warning
                    .min(check.failures_before_critical)),
            );
            object.insert(
                "failures_before_critical".into(),
                json!(check.failures_before_critical),
            );
            Value::Object(object)
        })
        .collect();
    let value = json!({
        "id": id,
        "name": service.name,
        "port": port,
        "tags": service.tags,
        "meta": meta,
        "checks": checks,
    });
    definition::from_value(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check_state::{CheckKind as AgentKind, CheckStatus};
    use crate::definition::Probe;

    fn job() -> keel_scheduler::Job {
        keel_scheduler::Job::from_toml_validated(
            r#"
name = "web"
[group.web]
count = 1
[group.web.task.server]
config = { command = "python3", args = ["-m", "http.server", "${KEEL_PORT_http}"] }
port.http = {}
[[group.web.task.server.service]]
name = "web"
port = "http"
[[group.web.task.server.service.check]]
name = "ready"
type = "http"
path = "/health"
interval = "1s"
timeout = "1s"
[[group.web.task.server.service.check]]
name = "alive"
kind = "liveness"
type = "tcp"
interval = "2s"
timeout = "1s"
failures_before_critical = 3
"#,
        )
        .unwrap()
    }

    fn allocation() -> Allocation {
        Allocation {
            id: keel_scheduler::AllocationId("0f0e-a1".into()),
            job: "web".into(),
            job_version: 0,
            group: "web".into(),
            index: 0,
            node: "n1".into(),
            resources: keel_scheduler::Resources::default(),
            ports: [("http".to_string(), 30123u16)].into(),
            placement_reason: keel_scheduler::PlacementReason::New,
            previous_allocation: None,
            reschedule_events: Vec::new(),
            created_at: keel_scheduler::Time(0),
            desired_status: keel_scheduler::DesiredStatus::Run,
            deployment_healthy: None,
            client: keel_scheduler::ClientState::PENDING,
        }
    }

    #[test]
    fn services_become_definitions_at_the_allocated_port() {
        let job = job();
        let task = &job.groups["web"].tasks["server"];
        let definitions = definitions(&allocation(), "server", task, "127.0.0.1").unwrap();
        assert_eq!(definitions.len(), 1);
        let web = &definitions[0];
        assert_eq!(web.id, "0f0e-a1:server:web");
        assert_eq!(web.name, "web");
        assert_eq!(web.port, 30123);
        assert_eq!(web.meta["alloc_id"], "0f0e-a1");
        let ready = &web.checks[0];
        assert_eq!(ready.id, "0f0e-a1:server:web:ready");
        assert_eq!(ready.kind, AgentKind::Readiness);
        assert_eq!(ready.initial_status, CheckStatus::Critical);
        assert!(
            matches!(&ready.probe, Probe::Http { url, .. } if url == "http://127.0.0.1:30123/health")
        );
        let alive = &web.checks[1];
        assert_eq!(alive.kind, AgentKind::Liveness);
        assert_eq!(alive.initial_status, CheckStatus::Passing);
        assert_eq!(alive.thresholds.failures_before_critical, 3);
        assert!(matches!(&alive.probe, Probe::Tcp { address } if address == "127.0.0.1:30123"));
    }
}
