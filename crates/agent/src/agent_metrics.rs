//! The agent's Prometheus metrics (`GET /metrics` on its HTTP port), with
//! prometheus-client as the members use it. Everything here is a picture of
//! the agent's view, so the families are refreshed from the view when
//! Prometheus scrapes, never on the agent's hot paths.
//!
//! Node and check statuses take the shape of Prometheus' consul_exporter,
//! which `deploy/prometheus/alerts.yml` relies on: one series per node (per
//! check) and status, 1 for the current status and 0 for the others:
//! `keel_node_status{node,status="alive"|"suspect"|"down"}` and
//! `keel_health_check_status{service,check,node,status="passing"|"warning"|"critical"}`.
//! Every agent exports every node it knows, so rules aggregate with
//! `max by (node)`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::agent::Shared;
use crate::catalog::{HealthEntry, NodeStatus};
use crate::check_state::CheckStatus;

/// The content type of [`AgentMetrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const NODE_STATUSES: [NodeStatus; 3] = [NodeStatus::Alive, NodeStatus::Suspect, NodeStatus::Down];
const CHECK_STATUSES: [CheckStatus; 3] = [
    CheckStatus::Passing,
    CheckStatus::Warning,
    CheckStatus::Critical,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    service: String,
    check: String,
    node: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    node: String,
}

/// The agent's registry and its families; see the module documentation.
pub struct AgentMetrics {
    registry: Registry,
    node_status: Family<NodeLabels, Gauge>,
    check_status: Family<CheckLabels, Gauge>,
    service_instances: Family<ServiceLabels, Gauge>,
    services: Gauge,
    gossip_members: Family<StatusLabel, Gauge>,
    gossip_phi: Family<PeerLabel, Gauge<f64, AtomicU64>>,
    allocations: Family<StatusLabel, Gauge>,
    jobs: Gauge,
    events_recorded: Counter,
    events_dropped: Counter,
    event_reporter: Gauge,
    view_revision: Gauge,
    view_stale: Gauge,
    node_lease_healthy: Gauge,
    members_reachable: Gauge,
    controller_active: Gauge,
    controller_elections: Counter,
    controller_evaluations: Counter,
    controller_plans: Counter,
    controller_placements: Counter,
    /// One scrape at a time refreshes and encodes.
    scrape: Mutex<()>,
}

impl Default for AgentMetrics {
    fn default() -> AgentMetrics {
        AgentMetrics::new()
    }
}

impl AgentMetrics {
    /// Registers every family.
    pub fn new() -> AgentMetrics {
        let mut registry = Registry::default();
        let metrics = AgentMetrics {
            node_status: Family::default(),
            check_status: Family::default(),
            service_instances: Family::default(),
            services: Gauge::default(),
            gossip_members: Family::default(),
            gossip_phi: Family::default(),
            allocations: Family::default(),
            jobs: Gauge::default(),
            events_recorded: Counter::default(),
            events_dropped: Counter::default(),
            event_reporter: Gauge::default(),
            view_revision: Gauge::default(),
            view_stale: Gauge::default(),
            node_lease_healthy: Gauge::default(),
            members_reachable: Gauge::default(),
            controller_active: Gauge::default(),
            controller_elections: Counter::default(),
            controller_evaluations: Counter::default(),
            controller_plans: Counter::default(),
            controller_placements: Counter::default(),
            registry: Registry::default(),
            scrape: Mutex::new(()),
        };
        registry.register(
            "keel_node_status",
            "Status of each node this agent knows (1 for the current one): alive, suspect (gossip), down (lease expired)",
            metrics.node_status.clone(),
        );
        registry.register(
            "keel_health_check_status",
            "Status of each health check (1 for the current one): passing, warning, critical",
            metrics.check_status.clone(),
        );
        registry.register(
            "keel_service_instances",
            "Registered instances of each service, by aggregated health",
            metrics.service_instances.clone(),
        );
        registry.register(
            "keel_services",
            "Services with at least one registered instance",
            metrics.services.clone(),
        );
        registry.register(
            "keel_gossip_members",
            "Nodes in this agent's gossip view, by status",
            metrics.gossip_members.clone(),
        );
        registry.register(
            "keel_gossip_phi",
            "Phi-accrual suspicion of each node's gossip heartbeats (suspect above the threshold)",
            metrics.gossip_phi.clone(),
        );
        registry.register(
            "keel_allocations",
            "Allocations in the store by client status",
            metrics.allocations.clone(),
        );
        registry.register("keel_jobs", "Jobs in the store", metrics.jobs.clone());
        registry.register(
            "keel_events_recorded",
            "Events this agent recorded into the events log",
            metrics.events_recorded.clone(),
        );
        registry.register(
            "keel_events_dropped",
            "Events this agent dropped because its recorder's queue was full",
            metrics.events_dropped.clone(),
        );
        registry.register(
            "keel_agent_event_reporter",
            "1 while this agent records cluster-level events (the smallest alive name in gossip)",
            metrics.event_reporter.clone(),
        );
        registry.register(
            "keel_agent_view_revision",
            "Store revision of this agent's view of /keel/",
            metrics.view_revision.clone(),
        );
        registry.register(
            "keel_agent_view_stale",
            "1 while the view may be behind the store (watch or node lease unhealthy)",
            metrics.view_stale.clone(),
        );
        registry.register(
            "keel_agent_node_lease_healthy",
            "1 while the node lease is renewed",
            metrics.node_lease_healthy.clone(),
        );
        registry.register(
            "keel_agent_members_reachable",
            "Store members that answered this agent's last Status poll",
            metrics.members_reachable.clone(),
        );
        for (name, help, counter) in [
            (
                "keel_controller_elections",
                "Times this agent was elected controller",
                &metrics.controller_elections,
            ),
            (
                "keel_controller_evaluations",
                "Job evaluations this agent's controller ran",
                &metrics.controller_evaluations,
            ),
            (
                "keel_controller_plans",
                "Non-empty plans this agent's controller wrote (fenced)",
                &metrics.controller_plans,
            ),
            (
                "keel_controller_placements",
                "Allocations this agent's controller placed",
                &metrics.controller_placements,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "keel_controller_active",
            "1 while this agent is the cluster's controller",
            metrics.controller_active.clone(),
        );
        AgentMetrics {
            registry,
            ..metrics
        }
    }

    /// Refreshes every family from the agent's state and encodes them.
    pub fn render(&self, shared: &Shared) -> String {
        let _scrape = self.scrape.lock().expect("scrape lock");
        {
            let view = shared.view.read().expect("view lock");
            let catalog = &view.catalog;
            self.node_status.clear();
            for name in catalog.nodes.keys().chain(catalog.down.keys()) {
                let current = catalog.node_status(name);
                for status in NODE_STATUSES {
                    self.node_status
                        .get_or_create(&NodeLabels {
                            node: name.clone(),
                            status: status.as_str().to_string(),
                        })
                        .set(i64::from(status == current));
                }
            }
            self.check_status.clear();
            for check in catalog.checks.values() {
                let current = check.value.status();
                for status in CHECK_STATUSES {
                    self.check_status
                        .get_or_create(&CheckLabels {
                            service: check.value.service.clone(),
                            check: check.value.id.clone(),
                            node: check.value.node.clone(),
                            status: status.as_str().to_string(),
                        })
                        .set(i64::from(status == current));
                }
            }
            self.service_instances.clear();
            let services = catalog.services();
            self.services.set(services.len() as i64);
            for name in services.keys() {
                let mut counts: BTreeMap<&str, i64> = CHECK_STATUSES
                    .iter()
                    .map(|status| (status.as_str(), 0))
                    .collect();
                for entry in catalog.health_service(name, None) {
                    *counts.entry(instance_status(&entry)).or_default() += 1;
                }
                for (status, count) in counts {
                    self.service_instances
                        .get_or_create(&ServiceLabels {
                            service: name.clone(),
                            status: status.to_string(),
                        })
                        .set(count);
                }
            }
            self.gossip_members.clear();
            self.gossip_phi.clear();
            let suspect = catalog
                .liveness
                .values()
                .filter(|liveness| liveness.suspect)
                .count();
            for (status, count) in [
                ("alive", catalog.liveness.len() - suspect),
                ("suspect", suspect),
            ] {
                self.gossip_members
                    .get_or_create(&StatusLabel {
                        status: status.to_string(),
                    })
                    .set(count as i64);
            }
            for (name, liveness) in &catalog.liveness {
                if let Some(phi) = liveness.phi {
                    self.gossip_phi
                        .get_or_create(&PeerLabel { node: name.clone() })
                        .set(phi);
                }
            }
            self.allocations.clear();
            for (status, count) in view.workloads.allocation_counts() {
                self.allocations
                    .get_or_create(&StatusLabel {
                        status: status.to_string(),
                    })
                    .set(count as i64);
            }
            self.jobs.set(view.workloads.jobs.len() as i64);
            self.view_revision.set(catalog.revision);
            self.view_stale.set(i64::from(view.stale()));
            self.node_lease_healthy.set(i64::from(view.lease_healthy));
        }
        catch_up(&self.events_recorded, shared.events.recorded());
        catch_up(&self.events_dropped, shared.events.dropped());
        self.event_reporter
            .set(i64::from(shared.observed.reporter.load(Ordering::Relaxed)));
        let reachable = shared
            .observed
            .cluster
            .read()
            .expect("cluster lock")
            .members
            .iter()
            .filter(|member| member.reachable)
            .count();
        self.members_reachable.set(reachable as i64);
        if let Some(stats) = shared.controller_stats.get() {
            let stats = stats.snapshot();
            self.controller_active.set(i64::from(stats.active));
            catch_up(&self.controller_elections, stats.elections);
            catch_up(&self.controller_evaluations, stats.evaluations);
            catch_up(&self.controller_plans, stats.plans);
            catch_up(&self.controller_placements, stats.placements);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// Brings a counter up to a total kept elsewhere.
fn catch_up(counter: &Counter, total: u64) {
    let current = counter.get();
    if total > current {
        counter.inc_by(total - current);
    }
}

/// An instance's health as one word: critical when its node is not alive.
fn instance_status(entry: &HealthEntry<'_>) -> &'static str {
    if entry.node_status != NodeStatus::Alive {
        return CheckStatus::Critical.as_str();
    }
    entry.aggregated_status().as_str()
}
