//! What this agent owns: its node record, its services and the state of their
//! checks; and the pure decision of what to write to the store to make the
//! store say the same (the anti-entropy of Consul's agents).
//!
//! Writes are few by construction: the store is told only what differs from
//! what was last written under the current lease. A check's status change is
//! written at once; a change of output alone waits until the node's output
//! flush is due (once a minute), and then every pending output goes in the
//! same transaction, so a node with nothing changing writes at most once a
//! minute.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::catalog::{
    check_key, instance_key, node_key, CheckRecord, CheckSummary, InstanceRecord, NodeRecord,
};
use crate::check_state::{startup_complete, CheckState, CheckStatus};
use crate::definition::{CheckDefinition, DefinitionError, Probe, ServiceDefinition};
use crate::probe::truncate;

/// Most services one agent registers.
pub const SERVICES_PER_AGENT_MAX: usize = 1024;
/// How often a check's changed output alone is written (Consul's
/// `check_update_interval` is five minutes; the issue asks for one).
pub const OUTPUT_FLUSH_INTERVAL: Duration = Duration::from_secs(60);

/// Where a service definition came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A file in `--config-dir`: loaded again at every start.
    ConfigDir,
    /// The HTTP API or the CLI: persisted under `--data-dir`.
    Api,
    /// A task of an allocation (the supervisor registers it while the task
    /// runs): not persisted.
    Allocation,
}

/// One check of a local service.
#[derive(Debug, Clone)]
pub struct LocalCheck {
    pub definition: CheckDefinition,
    pub state: CheckState,
    pub output: String,
    /// For TTL checks: when it turns critical unless reported.
    pub ttl_deadline: Option<Instant>,
}

/// One local service.
#[derive(Debug, Clone)]
pub struct LocalService {
    pub definition: ServiceDefinition,
    pub source: Source,
    pub checks: BTreeMap<String, LocalCheck>,
}

impl LocalService {
    /// Whether the service's startup checks all passed.
    pub fn startup_complete(&self) -> bool {
        startup_complete(
            self.checks
                .values()
                .map(|check| (check.definition.kind, check.state.status())),
        )
    }
}

/// Why a local operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    #[error("no service with id {0:?} on this agent")]
    UnknownService(String),
    #[error("no check with id {0:?} on this agent")]
    UnknownCheck(String),
    #[error("check {0:?} is not a TTL check; only TTL checks are reported through the API")]
    NotTtl(String),
    #[error("this agent already has {SERVICES_PER_AGENT_MAX} services")]
    TooManyServices,
}

/// Everything the agent owns.
#[derive(Debug, Clone)]
pub struct LocalState {
    pub node: NodeRecord,
    pub services: BTreeMap<String, LocalService>,
}

impl LocalState {
    pub fn new(node: NodeRecord) -> LocalState {
        LocalState {
            node,
            services: BTreeMap::new(),
        }
    }

    /// Adds or replaces a service. Checks whose definition did not change
    /// keep their state (a reload changes nothing); new ones start at their
    /// initial status. Refused as a whole if a check id is used by another
    /// service of this agent.
    pub fn register(
        &mut self,
        definition: ServiceDefinition,
        source: Source,
        now: Instant,
    ) -> Result<(), LocalError> {
        if !self.services.contains_key(&definition.id)
            && self.services.len() >= SERVICES_PER_AGENT_MAX
        {
            return Err(LocalError::TooManyServices);
        }
        for (index, check) in definition.checks.iter().enumerate() {
            let taken = self.services.values().any(|service| {
                service.definition.id != definition.id && service.checks.contains_key(&check.id)
            });
            if taken {
                return Err(DefinitionError {
                    field: format!("checks[{index}].id"),
                    reason: format!("{:?} is used by another service on this agent", check.id),
                }
                .into());
            }
        }
        let previous = self.services.remove(&definition.id);
        let checks = definition
            .checks
            .iter()
            .map(|check| {
                let kept = previous
                    .as_ref()
                    .and_then(|previous| previous.checks.get(&check.id))
                    .filter(|old| old.definition == *check)
                    .cloned();
                let local = kept.unwrap_or_else(|| LocalCheck {
                    definition: check.clone(),
                    state: CheckState::new(check.initial_status, now),
                    output: String::new(),
                    ttl_deadline: match check.probe {
                        Probe::Ttl { ttl } => Some(now + ttl),
                        _ => None,
                    },
                });
                (check.id.clone(), local)
            })
            .collect();
        self.services.insert(
            definition.id.clone(),
            LocalService {
                definition,
                source,
                checks,
            },
        );
        Ok(())
    }

    /// Removes a service; returns it.
    pub fn deregister(&mut self, id: &str) -> Result<LocalService, LocalError> {
        self.services
            .remove(id)
            .ok_or_else(|| LocalError::UnknownService(id.to_string()))
    }

    /// Finds the service holding check `check_id`.
    pub fn service_of_check(&self, check_id: &str) -> Option<&str> {
        self.services
            .values()
            .find(|service| service.checks.contains_key(check_id))
            .map(|service| service.definition.id.as_str())
    }

    /// Takes a result of check `check_id` of service `service_id`; returns
    /// whether its status changed. Results for checks since removed are ignored.
    pub fn record(
        &mut self,
        service_id: &str,
        check_id: &str,
        status: CheckStatus,
        output: String,
        now: Instant,
    ) -> bool {
        let Some(check) = self
            .services
            .get_mut(service_id)
            .and_then(|service| service.checks.get_mut(check_id))
        else {
            return false;
        };
        check.output = truncate(output, check.definition.output_max_bytes);
        check
            .state
            .record(status, check.definition.thresholds, now)
            .is_some()
    }

    /// A TTL check reported by its service (`/v1/agent/check/pass|warn|fail`):
    /// extends its deadline and records the result. Returns whether the
    /// status changed.
    pub fn report_ttl(
        &mut self,
        check_id: &str,
        status: CheckStatus,
        note: String,
        now: Instant,
    ) -> Result<bool, LocalError> {
        let service_id = self
            .service_of_check(check_id)
            .ok_or_else(|| LocalError::UnknownCheck(check_id.to_string()))?
            .to_string();
        let check = self
            .services
            .get_mut(&service_id)
            .and_then(|service| service.checks.get_mut(check_id))
            .expect("found above");
        let Probe::Ttl { ttl } = check.definition.probe else {
            return Err(LocalError::NotTtl(check_id.to_string()));
        };
        check.ttl_deadline = Some(now + ttl);
        Ok(self.record(&service_id, check_id, status, note, now))
    }

    /// Services to deregister because a check stayed critical longer than
    /// its `deregister_critical_service_after`.
    pub fn due_for_deregistration(&self, now: Instant) -> Vec<String> {
        self.services
            .values()
            .filter(|service| {
                service.checks.values().any(|check| {
                    check
                        .state
                        .should_deregister(check.definition.deregister_critical_service_after, now)
                })
            })
            .map(|service| service.definition.id.clone())
            .collect()
    }

    /// The definitions to persist (those from the API and CLI).
    pub fn persisted_definitions(&self) -> Vec<serde_json::Value> {
        self.services
            .values()
            .filter(|service| service.source == Source::Api)
            .map(|service| service.definition.to_register_json())
            .collect()
    }

    /// The instance record of a local service, as stored.
    pub fn instance_record(&self, service: &LocalService) -> InstanceRecord {
        let definition = &service.definition;
        InstanceRecord {
            node: self.node.name.clone(),
            id: definition.id.clone(),
            service: definition.name.clone(),
            address: definition.address.clone(),
            port: definition.port,
            tags: definition.tags.clone(),
            meta: definition.meta.clone(),
            weights: definition.weights,
            checks: definition
                .checks
                .iter()
                .map(|check| CheckSummary {
                    id: check.id.clone(),
                    name: check.name.clone(),
                    kind: check.kind.as_str().into(),
                    type_name: check.probe.type_name().into(),
                })
                .collect(),
        }
    }

    /// The check record of a local check, as stored.
    pub fn check_record(&self, service: &LocalService, check: &LocalCheck) -> CheckRecord {
        CheckRecord {
            node: self.node.name.clone(),
            service_id: service.definition.id.clone(),
            service: service.definition.name.clone(),
            id: check.definition.id.clone(),
            name: check.definition.name.clone(),
            kind: check.definition.kind.as_str().into(),
            type_name: check.definition.probe.type_name().into(),
            status: check.state.status().as_str().into(),
            output: check.output.clone(),
            notes: check.definition.notes.clone(),
        }
    }

    /// Every record the store should hold for this node, by key.
    pub fn desired(&self) -> BTreeMap<String, Record> {
        let mut desired = BTreeMap::new();
        desired.insert(
            node_key(&self.node.name),
            Record {
                value: encode(&self.node),
                check_status: None,
            },
        );
        for service in self.services.values() {
            let definition = &service.definition;
            desired.insert(
                instance_key(&definition.name, &self.node.name, &definition.id),
                Record {
                    value: encode(&self.instance_record(service)),
                    check_status: None,
                },
            );
            for check in service.checks.values() {
                desired.insert(
                    check_key(
                        &definition.name,
                        &self.node.name,
                        &definition.id,
                        &check.definition.id,
                    ),
                    Record {
                        value: encode(&self.check_record(service, check)),
                        check_status: Some(check.state.status()),
                    },
                );
            }
        }
        desired
    }
}

/// A record as the JSON stored.
fn encode(record: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(record).expect("registry records serialise")
}

/// A record the store should hold (or holds, as last written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub value: Vec<u8>,
    /// For check records, the status (output changes alone are throttled).
    pub check_status: Option<CheckStatus>,
}

/// One write of a sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

/// What to write now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub writes: Vec<Write>,
    /// Whether the plan writes output-only changes (the flush happened).
    pub flushed_output: bool,
    /// Whether output-only changes wait for the next flush.
    pub output_pending: bool,
}

/// Compares what the store should hold with what was written under the
/// current lease. Output-only check changes are included only when
/// `output_flush_due`.
pub fn plan(
    desired: &BTreeMap<String, Record>,
    written: &BTreeMap<String, Record>,
    output_flush_due: bool,
) -> Plan {
    let mut plan = Plan::default();
    for (key, record) in desired {
        let put = match written.get(key) {
            None => true,
            Some(old) if old.value == record.value => false,
            Some(old)
                if record.check_status.is_some() && old.check_status == record.check_status =>
            {
                if output_flush_due {
                    plan.flushed_output = true;
                    true
                } else {
                    plan.output_pending = true;
                    false
                }
            }
            Some(_) => true,
        };
        if put {
            plan.writes.push(Write::Put {
                key: key.clone(),
                value: record.value.clone(),
            });
        }
    }
    for key in written.keys() {
        if !desired.contains_key(key) {
            plan.writes.push(Write::Delete { key: key.clone() });
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::parse_json;

    fn state() -> LocalState {
        LocalState::new(NodeRecord {
            name: "n1".into(),
            address: "127.0.0.1".into(),
            labels: BTreeMap::new(),
            cpu_cores: 2,
            memory_total_bytes: 1,
            disk_total_bytes: 1,
            http_address: String::new(),
            dns_address: String::new(),
            gossip_address: String::new(),
            lease_id: 1,
            dynamic_ports: None,
        })
    }

    fn web(id: &str) -> ServiceDefinition {
        parse_json(
            format!(
                r#"{{"Name": "web", "ID": "{id}", "Checks": [
                    {{"ID": "{id}-ready", "HTTP": "http://127.0.0.1:1/", "Interval": "1s"}},
                    {{"ID": "{id}-ttl", "TTL": "5s", "Kind": "liveness"}}]}}"#
            )
            .as_bytes(),
        )
        .expect("valid")
    }

    fn written_after(
        plan: &Plan,
        written: &mut BTreeMap<String, Record>,
        desired: &BTreeMap<String, Record>,
    ) {
        for write in &plan.writes {
            match write {
                Write::Put { key, .. } => {
                    written.insert(key.clone(), desired[key].clone());
                }
                Write::Delete { key } => {
                    written.remove(key);
                }
            }
        }
    }

    #[test]
    fn only_differences_are_written_and_output_waits_for_the_flush() {
        let now = Instant::now();
        let mut local = state();
        local
            .register(web("web-1"), Source::Api, now)
            .expect("registers");
        let mut written = BTreeMap::new();
        let desired = local.desired();
        let first = plan(&desired, &written, false);
        // node + instance + two checks
        assert_eq!(first.writes.len(), 4);
        written_after(&first, &mut written, &desired);
        assert!(plan(&local.desired(), &written, true).writes.is_empty());

        // Same status, new output: waits for the flush.
        local.record(
            "web-1",
            "web-1-ready",
            CheckStatus::Critical,
            "refused".into(),
            now,
        );
        let desired = local.desired();
        let waiting = plan(&desired, &written, false);
        assert!(waiting.writes.is_empty() && waiting.output_pending);
        let flush = plan(&desired, &written, true);
        assert_eq!(flush.writes.len(), 1);
        assert!(flush.flushed_output);
        written_after(&flush, &mut written, &desired);

        // A status change goes at once.
        assert!(local.record(
            "web-1",
            "web-1-ready",
            CheckStatus::Passing,
            "ok".into(),
            now
        ));
        let desired = local.desired();
        let change = plan(&desired, &written, false);
        assert_eq!(change.writes.len(), 1);
        written_after(&change, &mut written, &desired);

        // Deregistering deletes the instance and its checks.
        local.deregister("web-1").expect("known");
        let removal = plan(&local.desired(), &written, false);
        assert_eq!(removal.writes.len(), 3);
        assert!(removal
            .writes
            .iter()
            .all(|write| matches!(write, Write::Delete { .. })));
    }

    #[test]
    fn ttl_reports_and_refusals() {
        let now = Instant::now();
        let mut local = state();
        local
            .register(web("web-1"), Source::Api, now)
            .expect("registers");
        assert_eq!(
            local.report_ttl("web-1-ttl", CheckStatus::Passing, "fine".into(), now),
            Ok(true)
        );
        assert_eq!(
            local.report_ttl("web-1-ready", CheckStatus::Passing, String::new(), now),
            Err(LocalError::NotTtl("web-1-ready".into()))
        );
        assert!(matches!(
            local.report_ttl("nope", CheckStatus::Passing, String::new(), now),
            Err(LocalError::UnknownCheck(_))
        ));
        // Another service may not take a check id.
        let mut thief = web("web-2");
        thief.checks[0].id = "web-1-ready".into();
        let error = local
            .register(thief, Source::Api, now)
            .expect_err("refused");
        assert!(error.to_string().contains("checks[0].id"), "{error}");
        assert_eq!(local.services.len(), 1);
    }

    #[test]
    fn reregistering_the_same_definition_keeps_check_state() {
        let now = Instant::now();
        let mut local = state();
        local
            .register(web("web-1"), Source::ConfigDir, now)
            .expect("registers");
        local.record(
            "web-1",
            "web-1-ready",
            CheckStatus::Passing,
            "ok".into(),
            now,
        );
        local
            .register(web("web-1"), Source::ConfigDir, now)
            .expect("registers");
        assert_eq!(
            local.services["web-1"].checks["web-1-ready"].state.status(),
            CheckStatus::Passing
        );
        assert!(local.persisted_definitions().is_empty());
    }
}
