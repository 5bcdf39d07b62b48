//! The agent's view of the registry: the records under `/keel/` (nodes,
//! service instances, check statuses) at one store revision, kept current by
//! one shared watch per agent, plus what gossip says of each node. Pure:
//! events in, answers out; the HTTP API and DNS read it, never the store.
//!
//! Key layout (JSON values, all attached to the owning node's lease):
//! `/keel/nodes/<node>` → [`NodeRecord`];
//! `/keel/services/<service>/<node>:<instance id>` → [`InstanceRecord`];
//! `/keel/checks/<service>/<node>:<instance id>/<check id>` → [`CheckRecord`].
//! Instance ids are unique per agent (as Consul's), so the store key puts the
//! node first; node names cannot contain `:`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::check_state::{instance_status, CheckKind, CheckStatus};
use crate::definition::Weights;

/// Prefix of everything the registry keeps in the store.
pub const PREFIX: &str = "/keel/";
/// Prefix of node records.
pub const NODES_PREFIX: &str = "/keel/nodes/";
/// Prefix of instance records.
pub const SERVICES_PREFIX: &str = "/keel/services/";
/// Prefix of check records.
pub const CHECKS_PREFIX: &str = "/keel/checks/";
/// Most nodes remembered as down after their record vanished (the oldest
/// are forgotten first).
pub const DOWN_NODES_MAX: usize = 1024;

/// A node as registered by its agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    /// The IP address other nodes and DNS answers use.
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub cpu_cores: u32,
    pub memory_total_bytes: u64,
    pub disk_total_bytes: u64,
    pub http_address: String,
    pub dns_address: String,
    pub gossip_address: String,
    /// The lease the node's records are attached to.
    pub lease_id: i64,
    /// The range dynamic ports of allocations are taken from
    /// (`--dynamic-ports`); absent from agents that predate workloads.
    #[serde(default)]
    pub dynamic_ports: Option<keel_scheduler::PortRange>,
}

/// A check of an instance, as its definition says (status is separate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSummary {
    pub id: String,
    pub name: String,
    pub kind: String,
    #[serde(rename = "type")]
    pub type_name: String,
}

/// One registered service instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub node: String,
    pub id: String,
    pub service: String,
    /// Empty means the node's address.
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub weights: Weights,
    pub checks: Vec<CheckSummary>,
}

/// The status of one check of one instance (written on transitions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRecord {
    pub node: String,
    pub service_id: String,
    pub service: String,
    pub id: String,
    pub name: String,
    pub kind: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub status: String,
    pub output: String,
    pub notes: String,
}

impl CheckRecord {
    pub fn status(&self) -> CheckStatus {
        CheckStatus::parse(&self.status).unwrap_or(CheckStatus::Critical)
    }

    pub fn kind(&self) -> CheckKind {
        CheckKind::parse(&self.kind).unwrap_or(CheckKind::Readiness)
    }
}

/// A record with its revisions (Consul's `CreateIndex` and `ModifyIndex`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored<T> {
    pub value: T,
    pub create_revision: i64,
    pub modify_revision: i64,
}

/// The key of an instance record.
pub fn instance_key(service: &str, node: &str, id: &str) -> String {
    format!("{SERVICES_PREFIX}{service}/{node}:{id}")
}

/// The key of a check record.
pub fn check_key(service: &str, node: &str, instance_id: &str, check: &str) -> String {
    format!("{CHECKS_PREFIX}{service}/{node}:{instance_id}/{check}")
}

/// The key of a node record.
pub fn node_key(node: &str) -> String {
    format!("{NODES_PREFIX}{node}")
}

/// Where a key sits in the layout.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    Node(String),
    /// (service, node, instance id)
    Instance(String, String, String),
    /// (service, node, instance id, check id)
    Check(String, String, String, String),
}

fn slot_of(key: &str) -> Option<Slot> {
    if let Some(node) = key.strip_prefix(NODES_PREFIX) {
        return (!node.is_empty() && !node.contains('/')).then(|| Slot::Node(node.into()));
    }
    if let Some(rest) = key.strip_prefix(SERVICES_PREFIX) {
        let (service, instance) = rest.split_once('/')?;
        let (node, id) = instance.split_once(':')?;
        return Some(Slot::Instance(service.into(), node.into(), id.into()));
    }
    if let Some(rest) = key.strip_prefix(CHECKS_PREFIX) {
        let (service, rest) = rest.split_once('/')?;
        let (instance, check) = rest.split_once('/')?;
        let (node, id) = instance.split_once(':')?;
        return Some(Slot::Check(
            service.into(),
            node.into(),
            id.into(),
            check.into(),
        ));
    }
    None
}

/// Whether `key` is a record of the registry (a node, instance or check),
/// as opposed to other keys under `/keel/` (events, jobs, allocations).
pub fn is_registry_key(key: &str) -> bool {
    slot_of(key).is_some()
}

/// A change from the store's watch.
#[derive(Debug, Clone)]
pub enum Change {
    Put {
        key: String,
        value: Vec<u8>,
        create_revision: i64,
        modify_revision: i64,
    },
    Delete {
        key: String,
    },
}

/// What gossip says of a node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeLiveness {
    pub suspect: bool,
    pub phi: Option<f64>,
    pub usage: Option<serde_json::Value>,
}

/// A node's state: alive, suspect (gossip), down (its lease expired).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStatus {
    Alive,
    Suspect,
    Down,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Alive => "alive",
            NodeStatus::Suspect => "suspect",
            NodeStatus::Down => "down",
        }
    }
}

/// One instance with everything discovery shows of it.
#[derive(Debug, Clone)]
pub struct HealthEntry<'a> {
    pub node: &'a Stored<NodeRecord>,
    pub node_status: NodeStatus,
    pub instance: &'a Stored<InstanceRecord>,
    pub checks: Vec<&'a Stored<CheckRecord>>,
}

impl HealthEntry<'_> {
    /// Whether discovery serves it: node alive (not suspect) and every
    /// gating check (readiness, startup) passing; liveness is reported only.
    pub fn passing(&self) -> bool {
        self.node_status == NodeStatus::Alive && self.aggregated_status() == CheckStatus::Passing
    }

    /// The worst gating check status (a check without a record is critical).
    pub fn aggregated_status(&self) -> CheckStatus {
        let recorded = self.instance.value.checks.iter().map(|summary| {
            let status = self
                .checks
                .iter()
                .find(|check| check.value.id == summary.id)
                .map_or(CheckStatus::Critical, |check| check.value.status());
            (
                CheckKind::parse(&summary.kind).unwrap_or(CheckKind::Readiness),
                status,
            )
        });
        instance_status(recorded)
    }

    /// The address clients should use: the instance's, else its node's.
    pub fn address(&self) -> &str {
        if self.instance.value.address.is_empty() {
            &self.node.value.address
        } else {
            &self.instance.value.address
        }
    }
}

/// The registry as this agent last saw it.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// The store revision the view is current at.
    pub revision: i64,
    pub nodes: BTreeMap<String, Stored<NodeRecord>>,
    /// By (service, node, instance id).
    pub instances: BTreeMap<(String, String, String), Stored<InstanceRecord>>,
    /// By (service, node, instance id, check id).
    pub checks: BTreeMap<(String, String, String, String), Stored<CheckRecord>>,
    /// Nodes whose record vanished (lease expired), with the revision it did.
    pub down: BTreeMap<String, (NodeRecord, i64)>,
    /// What gossip says, by node name.
    pub liveness: BTreeMap<String, NodeLiveness>,
    /// Values that could not be decoded (logged and skipped), for diagnosis.
    pub undecodable_keys: BTreeSet<String>,
}

impl Catalog {
    /// Replaces everything with a full listing at `revision`; nodes known
    /// before and now absent are down.
    pub fn reset(&mut self, listing: Vec<Change>, revision: i64) {
        let before: Vec<(String, NodeRecord)> = self
            .nodes
            .iter()
            .map(|(name, node)| (name.clone(), node.value.clone()))
            .collect();
        self.nodes.clear();
        self.instances.clear();
        self.checks.clear();
        self.undecodable_keys.clear();
        for change in listing {
            self.apply(change, revision);
        }
        for (name, node) in before {
            if !self.nodes.contains_key(&name) {
                self.mark_down(name, node, revision);
            }
        }
        self.revision = revision;
    }

    fn mark_down(&mut self, name: String, node: NodeRecord, revision: i64) {
        self.down.insert(name, (node, revision));
        while self.down.len() > DOWN_NODES_MAX {
            let oldest = self
                .down
                .iter()
                .min_by_key(|(_, (_, revision))| *revision)
                .map(|(name, _)| name.clone());
            match oldest {
                Some(name) => self.down.remove(&name),
                None => break,
            };
        }
    }

    /// Applies one change seen at `revision`.
    pub fn apply(&mut self, change: Change, revision: i64) {
        match change {
            Change::Put {
                key,
                value,
                create_revision,
                modify_revision,
            } => {
                let Some(slot) = slot_of(&key) else {
                    return;
                };
                let decoded = match &slot {
                    Slot::Node(name) => {
                        serde_json::from_slice::<NodeRecord>(&value).map(|record| {
                            self.down.remove(name);
                            self.nodes.insert(
                                name.clone(),
                                Stored {
                                    value: record,
                                    create_revision,
                                    modify_revision,
                                },
                            );
                        })
                    }
                    Slot::Instance(service, node, id) => {
                        serde_json::from_slice::<InstanceRecord>(&value).map(|record| {
                            self.instances.insert(
                                (service.clone(), node.clone(), id.clone()),
                                Stored {
                                    value: record,
                                    create_revision,
                                    modify_revision,
                                },
                            );
                        })
                    }
                    Slot::Check(service, node, id, check) => {
                        serde_json::from_slice::<CheckRecord>(&value).map(|record| {
                            self.checks.insert(
                                (service.clone(), node.clone(), id.clone(), check.clone()),
                                Stored {
                                    value: record,
                                    create_revision,
                                    modify_revision,
                                },
                            );
                        })
                    }
                };
                match decoded {
                    Ok(()) => {
                        self.undecodable_keys.remove(&key);
                    }
                    Err(error) => {
                        tracing::warn!(%key, %error, "skipping a registry record that does not decode");
                        self.undecodable_keys.insert(key);
                    }
                }
            }
            Change::Delete { key } => {
                self.undecodable_keys.remove(&key);
                match slot_of(&key) {
                    Some(Slot::Node(name)) => {
                        if let Some(node) = self.nodes.remove(&name) {
                            self.mark_down(name, node.value, revision);
                        }
                    }
                    Some(Slot::Instance(service, node, id)) => {
                        self.instances.remove(&(service, node, id));
                    }
                    Some(Slot::Check(service, node, id, check)) => {
                        self.checks.remove(&(service, node, id, check));
                    }
                    None => {}
                }
            }
        }
        self.revision = self.revision.max(revision);
    }

    /// A node's status: down once its record is gone, suspect while gossip
    /// suspects it, alive otherwise.
    pub fn node_status(&self, node: &str) -> NodeStatus {
        if !self.nodes.contains_key(node) {
            return NodeStatus::Down;
        }
        match self.liveness.get(node) {
            Some(liveness) if liveness.suspect => NodeStatus::Suspect,
            _ => NodeStatus::Alive,
        }
    }

    /// The instances of `service` (optionally with `tag`), with their checks,
    /// ordered by node and id. Instances whose node record is missing are left out.
    pub fn health_service(&self, service: &str, tag: Option<&str>) -> Vec<HealthEntry<'_>> {
        let start = (service.to_string(), String::new(), String::new());
        self.instances
            .range(start..)
            .take_while(|((name, _, _), _)| name == service)
            .filter(|(_, instance)| {
                tag.is_none_or(|tag| instance.value.tags.iter().any(|t| t == tag))
            })
            .filter_map(|((name, node, id), instance)| {
                let node_record = self.nodes.get(node)?;
                Some(HealthEntry {
                    node: node_record,
                    node_status: self.node_status(node),
                    instance,
                    checks: self.checks_of(name, node, id),
                })
            })
            .collect()
    }

    /// The check records of one instance.
    pub fn checks_of(&self, service: &str, node: &str, id: &str) -> Vec<&Stored<CheckRecord>> {
        let start = (
            service.to_string(),
            node.to_string(),
            id.to_string(),
            String::new(),
        );
        self.checks
            .range(start..)
            .take_while(|((s, n, i, _), _)| s == service && n == node && i == id)
            .map(|(_, check)| check)
            .collect()
    }

    /// Every instance on `node`.
    pub fn instances_on<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = &'a Stored<InstanceRecord>> + 'a {
        self.instances
            .iter()
            .filter(move |((_, instance_node, _), _)| instance_node == node)
            .map(|(_, instance)| instance)
    }

    /// Service names with the union of their tags (Consul's catalog/services).
    pub fn services(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut services: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for ((service, node, _), instance) in &self.instances {
            if !self.nodes.contains_key(node) {
                continue;
            }
            services
                .entry(service.clone())
                .or_default()
                .extend(instance.value.tags.iter().cloned());
        }
        services
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            address: "127.0.0.1".into(),
            labels: BTreeMap::new(),
            cpu_cores: 2,
            memory_total_bytes: 1,
            disk_total_bytes: 1,
            http_address: String::new(),
            dns_address: String::new(),
            gossip_address: String::new(),
            lease_id: 7,
            dynamic_ports: None,
        }
    }

    fn put(key: String, value: impl Serialize, revision: i64) -> Change {
        Change::Put {
            key,
            value: serde_json::to_vec(&value).expect("serialises"),
            create_revision: revision,
            modify_revision: revision,
        }
    }

    fn instance(node: &str, id: &str, tags: &[&str]) -> InstanceRecord {
        InstanceRecord {
            node: node.into(),
            id: id.into(),
            service: "web".into(),
            address: String::new(),
            port: 80,
            tags: tags.iter().map(|tag| tag.to_string()).collect(),
            meta: BTreeMap::new(),
            weights: Weights::default(),
            checks: vec![CheckSummary {
                id: "ready".into(),
                name: "ready".into(),
                kind: "readiness".into(),
                type_name: "http".into(),
            }],
        }
    }

    fn check(node: &str, id: &str, status: &str) -> CheckRecord {
        CheckRecord {
            node: node.into(),
            service_id: id.into(),
            service: "web".into(),
            id: "ready".into(),
            name: "ready".into(),
            kind: "readiness".into(),
            type_name: "http".into(),
            status: status.into(),
            output: String::new(),
            notes: String::new(),
        }
    }

    #[test]
    fn health_follows_checks_nodes_and_gossip() {
        let mut catalog = Catalog::default();
        catalog.reset(
            vec![
                put(node_key("a"), node("a"), 2),
                put(node_key("b"), node("b"), 3),
                put(
                    instance_key("web", "a", "web-1"),
                    instance("a", "web-1", &["v1"]),
                    4,
                ),
                put(
                    instance_key("web", "b", "web-1"),
                    instance("b", "web-1", &["v2"]),
                    5,
                ),
                put(
                    check_key("web", "a", "web-1", "ready"),
                    check("a", "web-1", "passing"),
                    6,
                ),
                put(
                    check_key("web", "b", "web-1", "ready"),
                    check("b", "web-1", "passing"),
                    7,
                ),
            ],
            7,
        );
        let passing = |catalog: &Catalog, tag| {
            catalog
                .health_service("web", tag)
                .iter()
                .filter(|entry| entry.passing())
                .map(|entry| entry.node.value.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(passing(&catalog, None), ["a", "b"]);
        assert_eq!(passing(&catalog, Some("v2")), ["b"]);
        catalog.apply(
            put(
                check_key("web", "a", "web-1", "ready"),
                check("a", "web-1", "critical"),
                8,
            ),
            8,
        );
        assert_eq!(passing(&catalog, None), ["b"]);
        catalog.liveness.insert(
            "b".into(),
            NodeLiveness {
                suspect: true,
                ..NodeLiveness::default()
            },
        );
        assert_eq!(catalog.node_status("b"), NodeStatus::Suspect);
        assert!(passing(&catalog, None).is_empty());
        // The lease of b expires: its records go at one revision.
        for key in [
            node_key("b"),
            instance_key("web", "b", "web-1"),
            check_key("web", "b", "web-1", "ready"),
        ] {
            catalog.apply(Change::Delete { key }, 9);
        }
        assert_eq!(catalog.node_status("b"), NodeStatus::Down);
        assert_eq!(catalog.down["b"].1, 9);
        assert_eq!(catalog.health_service("web", None).len(), 1);
        assert_eq!(catalog.revision, 9);
        // A re-listing that lacks node a marks it down too.
        catalog.reset(vec![], 12);
        assert!(catalog.down.contains_key("a"));
        catalog.apply(put(node_key("a"), node("a"), 13), 13);
        assert!(!catalog.down.contains_key("a"));
    }

    #[test]
    fn an_undecodable_record_is_skipped() {
        let mut catalog = Catalog::default();
        catalog.apply(
            Change::Put {
                key: node_key("x"),
                value: b"not json".to_vec(),
                create_revision: 1,
                modify_revision: 1,
            },
            1,
        );
        assert!(catalog.nodes.is_empty());
        assert!(catalog.undecodable_keys.contains(&node_key("x")));
    }
}
