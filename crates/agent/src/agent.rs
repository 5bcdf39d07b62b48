//! The running agent: wiring and the tokio tasks. Each task only reads,
//! writes or probes; what to do is decided by the pure modules.
//!
//! - one runner task per check (`run_check`), feeding results to the local state;
//! - the sync task: keeps the node lease (granting a new one when it is lost,
//!   then writing everything again), and writes what differs from what was
//!   last written, in transactions (`local::plan`);
//! - the watch task: one listing and one watch of `/keel/` for the whole
//!   agent, feeding the [`Catalog`] that the HTTP API and DNS read;
//! - gossip (phi-accrual suspicion, live usage) and the DNS server from
//!   `gossip.rs` and `dns.rs`;
//! - the HTTP API (`api.rs`).
//!
//! When the store is unreachable, checks go on, reads are answered from the
//! last view (marked stale), and the sync task writes the difference once it
//! is back (all of it, under a new lease, if the old one expired meanwhile).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use keel_client::keel_types::etcdserverpb::{
    request_op, DeleteRangeRequest, PutRequest, RequestOp, TxnRequest,
};
use keel_client::keel_types::mvccpb::event::EventType;
use keel_client::{Client, ClientConfig, ClientError, LeaseKeeper, LeaseState, WatchOptions};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::catalog::{Catalog, Change, NodeLiveness, NodeRecord, PREFIX};
use crate::check_state::{should_run, CheckStatus};
use crate::definition::{self, DefinitionError, Probe, ServiceDefinition};
use crate::dns::{DnsConfig, DnsServer};
use crate::gossip::{Gossip, GossipConfig, GossipStatus};
use crate::local::{self, LocalError, LocalState, Record, Source, Write};
use crate::probe::{self, HttpClient};
use crate::resources::ResourceSampler;

/// Operations in one store transaction (etcd's default `--max-txn-ops` is 128).
pub const TXN_OPERATIONS_MAX: usize = 64;
/// How often the sync task looks at the lease, deregistration deadlines and
/// pending output even when nothing woke it.
const SYNC_TICK: Duration = Duration::from_secs(1);
/// Longest pause between two attempts at an unreachable store.
const STORE_RETRY_MAX: Duration = Duration::from_secs(2);
/// First pause after a failed store request.
const STORE_RETRY_MIN: Duration = Duration::from_millis(100);
/// How often the node's live usage is sampled and gossiped.
const USAGE_INTERVAL: Duration = Duration::from_secs(2);
/// File under `--data-dir` holding the services registered through the API.
const SERVICES_FILE: &str = "services.json";
/// Characters of a check's output quoted in its `check.status` event.
const CHECK_EVENT_OUTPUT_CHARS_MAX: usize = 160;
/// Most definition files read from `--config-dir`.
const CONFIG_FILES_MAX: usize = 1024;

/// How the agent is configured (the `keel agent` flags).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The node's name (`--name`).
    pub name: String,
    /// Members' client URLs (`--endpoints`).
    pub endpoints: Vec<String>,
    pub data_dir: PathBuf,
    pub http_addr: SocketAddr,
    pub dns_addr: SocketAddr,
    pub gossip_addr: SocketAddr,
    /// Other agents' gossip addresses (`--join`).
    pub join: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// TTL of the node lease (`--node-ttl`): the node is down this long
    /// after its agent stopped renewing.
    pub node_ttl: Duration,
    /// Service definitions (`*.toml`) loaded at start (`--config-dir`).
    pub config_dir: Option<PathBuf>,
    pub dns_domain: String,
    /// Fault injection on this agent and its tasks (`--enable-chaos`).
    pub chaos: crate::chaos::ChaosConfig,
    /// The ports allocations are given their dynamic ports from
    /// (`--dynamic-ports`, Nomad's `min/max_dynamic_port`).
    pub dynamic_ports: keel_scheduler::PortRange,
    /// Whether this agent campaigns to be the controller (`--no-controller`
    /// turns it off: an agent that only runs allocations).
    pub controller: bool,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error("invalid agent configuration: {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {error}")]
    Definition {
        path: PathBuf,
        error: DefinitionError,
    },
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Gossip(#[from] crate::gossip::GossipError),
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
}

/// The view the HTTP API and DNS read.
#[derive(Debug, Default)]
pub struct View {
    pub catalog: Catalog,
    /// The watch is established and current.
    pub watch_healthy: bool,
    /// The node lease was renewed recently.
    pub lease_healthy: bool,
    /// Jobs and allocations (issue 12's keys), from the same watch.
    pub workloads: crate::workloads::Workloads,
}

impl View {
    /// Whether reads may be behind the store (Consul's `X-Consul-KnownLeader: false`).
    pub fn stale(&self) -> bool {
        !(self.watch_healthy && self.lease_healthy)
    }
}

/// What every task of the agent shares.
pub struct Shared {
    pub config: AgentConfig,
    pub client: Client,
    pub local: Mutex<LocalState>,
    pub view: RwLock<View>,
    /// Bumped on every change of the view; blocking queries wait on it.
    pub generation: watch::Sender<u64>,
    /// Wakes the sync task after a local change.
    pub sync_wakeup: Notify,
    pub http: HttpClient,
    /// Runner tasks by service id, aborted when the service goes.
    runners: Mutex<BTreeMap<String, Vec<JoinHandle<()>>>>,
    /// Serialises writes of the services file.
    persist: tokio::sync::Mutex<()>,
    pub started_at: Instant,
    /// The events log's recorder: this agent's one, for everything it records.
    pub events: crate::events::EventRecorder,
    /// The members' status, throughput samples and the live event feed.
    pub observed: crate::observer::Observed,
    /// The agent's Prometheus registry (`/metrics`).
    pub metrics: crate::agent_metrics::AgentMetrics,
    /// Allocations and their statuses, for the supervisor and the API.
    pub supervisor: crate::supervisor::SupervisorView,
    /// The controller's counters (for `/metrics`), once it is started.
    pub controller_stats: std::sync::OnceLock<Arc<crate::controller::ControllerStats>>,
}

impl Shared {
    pub fn bump(&self) {
        self.generation.send_modify(|generation| *generation += 1);
    }

    /// Registers (or replaces) a service and starts its checks.
    pub async fn register(
        self: &Arc<Self>,
        definition: ServiceDefinition,
        source: Source,
    ) -> Result<(), LocalError> {
        let id = definition.id.clone();
        {
            let mut local = self.local.lock().expect("local state lock");
            local.register(definition, source, Instant::now())?;
        }
        self.restart_runners(&id);
        if source == Source::Api {
            self.persist().await;
        }
        self.sync_wakeup.notify_one();
        tracing::info!(service = %id, "service registered");
        Ok(())
    }

    /// Deregisters a service and stops its checks.
    pub async fn deregister(self: &Arc<Self>, id: &str) -> Result<(), LocalError> {
        let removed = {
            let mut local = self.local.lock().expect("local state lock");
            local.deregister(id)?
        };
        if let Some(runners) = self.runners.lock().expect("runners lock").remove(id) {
            runners.iter().for_each(JoinHandle::abort);
        }
        if removed.source == Source::Api {
            self.persist().await;
        }
        self.sync_wakeup.notify_one();
        tracing::info!(service = %id, "service deregistered");
        Ok(())
    }

    /// Records a TTL check's report.
    pub fn report_ttl(
        &self,
        check_id: &str,
        status: CheckStatus,
        note: String,
    ) -> Result<(), LocalError> {
        let changed = self.local.lock().expect("local state lock").report_ttl(
            check_id,
            status,
            note,
            Instant::now(),
        )?;
        if changed {
            self.check_changed(check_id, status);
        }
        self.sync_wakeup.notify_one();
        Ok(())
    }

    /// Logs and records (`check.status`) a transition of one of this
    /// agent's checks, with the check's output.
    pub fn check_changed(&self, check_id: &str, status: CheckStatus) {
        let record = {
            let local = self.local.lock().expect("local state lock");
            local.services.values().find_map(|service| {
                let check = service.checks.get(check_id)?;
                Some(local.check_record(service, check))
            })
        };
        let Some(record) = record else { return };
        tracing::info!(service = %record.service_id, check = %check_id, status = status.as_str(), "check status changed");
        let subject = format!("{}/{}", record.node, record.service_id);
        // The output says why a check fails; a passing one needs no reason.
        let output: String = record
            .output
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let reason = if status == CheckStatus::Passing || output.is_empty() {
            String::new()
        } else {
            let cut: String = output.chars().take(CHECK_EVENT_OUTPUT_CHARS_MAX).collect();
            format!(": {cut}")
        };
        let message = format!(
            "{} on {}: {} is {}{reason}",
            record.service_id,
            record.node,
            record.name,
            status.as_str(),
        );
        self.events.record(
            crate::events::EventType::CheckStatus,
            subject,
            message,
            [
                ("service".to_string(), record.service.clone()),
                ("service_id".to_string(), record.service_id.clone()),
                ("check".to_string(), check_id.to_string()),
                ("node".to_string(), record.node.clone()),
                ("status".to_string(), status.as_str().to_string()),
            ],
        );
    }

    fn restart_runners(self: &Arc<Self>, service_id: &str) {
        let checks: Vec<definition::CheckDefinition> = {
            let local = self.local.lock().expect("local state lock");
            match local.services.get(service_id) {
                Some(service) => service.definition.checks.clone(),
                None => Vec::new(),
            }
        };
        let handles = checks
            .into_iter()
            .map(|check| tokio::spawn(run_check(self.clone(), service_id.to_string(), check)))
            .collect();
        if let Some(old) = self
            .runners
            .lock()
            .expect("runners lock")
            .insert(service_id.to_string(), handles)
        {
            old.iter().for_each(JoinHandle::abort);
        }
    }

    /// Writes the API-registered services to `--data-dir` (atomically, fsynced).
    async fn persist(&self) {
        let _guard = self.persist.lock().await;
        let definitions = self
            .local
            .lock()
            .expect("local state lock")
            .persisted_definitions();
        let path = self.config.data_dir.join(SERVICES_FILE);
        let result = tokio::task::spawn_blocking(move || write_atomically(&path, &definitions))
            .await
            .map_err(|error| std::io::Error::other(error.to_string()))
            .and_then(|result| result);
        if let Err(error) = result {
            tracing::error!(%error, "cannot persist the registered services");
        }
    }
}

fn write_atomically(path: &Path, definitions: &[serde_json::Value]) -> std::io::Result<()> {
    use std::io::Write as _;
    let temporary = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(&serde_json::to_vec_pretty(definitions).map_err(std::io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    if let Some(directory) = path.parent() {
        std::fs::File::open(directory)?.sync_all()?;
    }
    Ok(())
}

/// A running agent. Dropping it stops its tasks.
pub struct Agent {
    pub shared: Arc<Shared>,
    pub http_addr: SocketAddr,
    pub dns_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
    /// The controller (active in one agent of the cluster), unless
    /// `--no-controller`.
    pub controller: Option<crate::controller::Controller>,
    _gossip: Arc<Gossip>,
    _dns: DnsServer,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
        for runners in self.shared.runners.lock().expect("runners lock").values() {
            runners.iter().for_each(JoinHandle::abort);
        }
    }
}

impl Agent {
    /// Starts every part of the agent. Fails if a listener cannot bind or
    /// the configuration is wrong; a store that cannot be reached is not an
    /// error (the agent registers once it is).
    pub async fn start(config: AgentConfig) -> Result<Agent, AgentError> {
        definition::validate_node_name(&config.name).map_err(|error| {
            AgentError::InvalidConfig {
                field: "name",
                reason: error.reason,
            }
        })?;
        if config.node_ttl < Duration::from_secs(1) {
            return Err(AgentError::InvalidConfig {
                field: "node-ttl",
                reason: "must be at least 1s (leases count whole seconds)".into(),
            });
        }
        std::fs::create_dir_all(&config.data_dir).map_err(|source| AgentError::Io {
            path: config.data_dir.clone(),
            source,
        })?;
        let http_listener = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .map_err(|source| AgentError::Bind {
                addr: config.http_addr,
                source,
            })?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|source| AgentError::Bind {
                addr: config.http_addr,
                source,
            })?;
        let mut sampler = ResourceSampler::new(&config.data_dir);
        let capacity = sampler.capacity();
        let address: IpAddr = if http_addr.ip().is_unspecified() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            http_addr.ip()
        };
        let node = NodeRecord {
            name: config.name.clone(),
            address: address.to_string(),
            labels: config.labels.clone(),
            cpu_cores: capacity.cpu_cores,
            memory_total_bytes: capacity.memory_total_bytes,
            disk_total_bytes: capacity.disk_total_bytes,
            http_address: http_addr.to_string(),
            dns_address: config.dns_addr.to_string(),
            gossip_address: config.gossip_addr.to_string(),
            lease_id: 0,
            dynamic_ports: Some(config.dynamic_ports),
        };
        let client = Client::connect(&config.endpoints, ClientConfig::default()).await?;
        let controller_client = client.clone();
        let events = crate::events::EventRecorder::spawn(client.clone(), config.name.clone());
        let (generation, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            config: config.clone(),
            client,
            local: Mutex::new(LocalState::new(node)),
            view: RwLock::new(View::default()),
            generation,
            sync_wakeup: Notify::new(),
            http: probe::http_client(),
            runners: Mutex::new(BTreeMap::new()),
            persist: tokio::sync::Mutex::new(()),
            started_at: Instant::now(),
            events,
            observed: crate::observer::Observed::default(),
            metrics: crate::agent_metrics::AgentMetrics::new(),
            supervisor: crate::supervisor::SupervisorView::default(),
            controller_stats: std::sync::OnceLock::new(),
        });

        // Services: those persisted from the API, then the config directory's.
        for definition in load_persisted(&config.data_dir)? {
            if let Err(error) = shared.register(definition, Source::Api).await {
                tracing::error!(%error, "a persisted service was refused");
            }
        }
        if let Some(directory) = &config.config_dir {
            for (path, result) in load_config_dir(directory)? {
                match result {
                    Ok(definition) => {
                        if let Err(error) = shared.register(definition, Source::ConfigDir).await {
                            tracing::error!(path = %path.display(), %error, "service refused");
                        }
                    }
                    Err(error) => {
                        tracing::error!(path = %path.display(), %error, "service definition refused")
                    }
                }
            }
        }

        let mut gossip_config = GossipConfig::new(config.name.clone(), config.gossip_addr);
        gossip_config.join = config.join.clone();
        gossip_config.http_addr = Some(http_addr);
        gossip_config.dns_addr = Some(config.dns_addr);
        let gossip = Arc::new(Gossip::start(gossip_config).await?);
        let mut dns_config = DnsConfig::new(config.dns_addr);
        dns_config.domain = config.dns_domain.clone();
        let dns = DnsServer::start(dns_config, Arc::new(DnsView(shared.clone()))).await?;
        let dns_addr = dns.udp_addr();

        let mut tasks = vec![
            tokio::spawn(sync_task(shared.clone())),
            tokio::spawn(watch_task(shared.clone())),
            tokio::spawn(liveness_task(shared.clone(), gossip.subscribe())),
            // Events, the dashboard's members and samples (observer.rs).
            tokio::spawn(crate::observer::poll_members(shared.clone())),
            tokio::spawn(crate::observer::watch_nodes(
                shared.clone(),
                gossip.subscribe(),
            )),
        ];
        tasks.push(crate::supervisor::spawn(shared.clone(), gossip.clone()));
        let usage_gossip = gossip.clone();
        tasks.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(USAGE_INTERVAL);
            loop {
                ticker.tick().await;
                let usage = sampler.sample();
                usage_gossip.publish_usage(&usage).await;
            }
        }));
        let controller = config.controller.then(|| {
            crate::controller::Controller::spawn(
                controller_client,
                crate::controller::ControllerConfig {
                    node_name: config.name.clone(),
                    lease_ttl: config.node_ttl,
                    algorithm: keel_scheduler::SchedulerAlgorithm::Binpack,
                },
                gossip.clone(),
                shared.events.clone(),
            )
        });
        if let Some(controller) = &controller {
            let _ = shared.controller_stats.set(controller.stats.clone());
        }
        if config.chaos.enabled {
            tracing::warn!("fault injection is on (--enable-chaos)");
        }
        let chaos = crate::chaos::AgentChaos::new(
            config.chaos.clone(),
            config.name.clone(),
            shared.client.clone(),
        );
        let router = crate::api::router(shared.clone()).merge(crate::chaos::router(chaos));
        tasks.push(tokio::spawn(async move {
            // Fault injection tells loopback callers from remote ones.
            let service = router.into_make_service_with_connect_info::<SocketAddr>();
            if let Err(error) = axum::serve(http_listener, service).await {
                tracing::error!(%error, "the HTTP API stopped");
            }
        }));
        tracing::info!(name = %config.name, http = %http_addr, dns = %dns_addr, "agent started");
        Ok(Agent {
            shared,
            http_addr,
            dns_addr,
            tasks,
            controller,
            _gossip: gossip,
            _dns: dns,
        })
    }
}

fn load_persisted(data_dir: &Path) -> Result<Vec<ServiceDefinition>, AgentError> {
    let path = data_dir.join(SERVICES_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(AgentError::Io { path, source }),
    };
    let values: Vec<serde_json::Value> =
        serde_json::from_slice(&bytes).map_err(|error| AgentError::Io {
            path: path.clone(),
            source: std::io::Error::other(error),
        })?;
    values
        .into_iter()
        .map(|value| {
            definition::from_value(value).map_err(|error| AgentError::Definition {
                path: path.clone(),
                error,
            })
        })
        .collect()
}

/// One definition file of `--config-dir` and what it holds.
type ConfigFile = (PathBuf, Result<ServiceDefinition, DefinitionError>);

/// Reads every `*.toml` of `directory`, each parsed on its own (one bad file
/// does not keep the others out).
fn load_config_dir(directory: &Path) -> Result<Vec<ConfigFile>, AgentError> {
    let io = |source| AgentError::Io {
        path: directory.to_path_buf(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(directory)
        .map_err(io)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "toml")
        })
        .collect();
    paths.sort();
    if paths.len() > CONFIG_FILES_MAX {
        return Err(AgentError::InvalidConfig {
            field: "config-dir",
            reason: format!("more than {CONFIG_FILES_MAX} definition files"),
        });
    }
    Ok(paths
        .into_iter()
        .map(|path| {
            let parsed = std::fs::read_to_string(&path)
                .map_err(|error| DefinitionError {
                    field: "(file)".into(),
                    reason: error.to_string(),
                })
                .and_then(|text| definition::parse_toml(&text));
            (path, parsed)
        })
        .collect())
}

/// Runs one check until its service goes (the task is aborted then).
async fn run_check(shared: Arc<Shared>, service_id: String, check: definition::CheckDefinition) {
    tokio::time::sleep(check.initial_delay).await;
    if let Probe::Ttl { .. } = check.probe {
        return run_ttl(shared, service_id, check).await;
    }
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let runs = {
            let local = shared.local.lock().expect("local state lock");
            let Some(service) = local.services.get(&service_id) else {
                return;
            };
            let Some(state) = service.checks.get(&check.id) else {
                return;
            };
            should_run(check.kind, state.state.status(), service.startup_complete())
        };
        if !runs {
            continue;
        }
        let outcome = probe::run(&check, &shared.http).await;
        let changed = shared.local.lock().expect("local state lock").record(
            &service_id,
            &check.id,
            outcome.status,
            outcome.output,
            Instant::now(),
        );
        if changed {
            shared.check_changed(&check.id, outcome.status);
            shared.sync_wakeup.notify_one();
        }
    }
}

/// A TTL check turns critical when its deadline passes unreported.
async fn run_ttl(shared: Arc<Shared>, service_id: String, check: definition::CheckDefinition) {
    let Probe::Ttl { ttl } = check.probe else {
        return;
    };
    loop {
        let mut expired = false;
        let deadline = {
            let mut local = shared.local.lock().expect("local state lock");
            let Some(state) = local
                .services
                .get_mut(&service_id)
                .and_then(|service| service.checks.get_mut(&check.id))
            else {
                return;
            };
            let now = Instant::now();
            let deadline = *state.ttl_deadline.get_or_insert(now + ttl);
            if deadline <= now {
                state.ttl_deadline = Some(now + ttl);
                let changed = local.record(
                    &service_id,
                    &check.id,
                    CheckStatus::Critical,
                    format!("TTL expired (no report within {ttl:?})"),
                    now,
                );
                if changed {
                    tracing::info!(service = %service_id, check = %check.id, "TTL check expired");
                    expired = true;
                    shared.sync_wakeup.notify_one();
                }
                now + ttl
            } else {
                deadline
            }
        };
        // Recorded once the local state's lock is released (it takes it).
        if expired {
            shared.check_changed(&check.id, CheckStatus::Critical);
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// Keeps the node lease and makes the store hold what the local state says.
async fn sync_task(shared: Arc<Shared>) {
    let ttl_seconds = shared.config.node_ttl.as_secs().max(1) as i64;
    let mut keeper: Option<LeaseKeeper> = None;
    let mut written: BTreeMap<String, Record> = BTreeMap::new();
    let mut last_output_flush = Instant::now();
    let mut retry_delay = STORE_RETRY_MIN;
    loop {
        let lease_alive = keeper.as_ref().is_some_and(LeaseKeeper::is_alive);
        if !lease_alive {
            if keeper.take().is_some() {
                tracing::warn!("the node lease was lost; registering again under a new one");
            }
            written.clear();
            set_lease_healthy(&shared, false);
            match shared.client.grant_kept_lease(ttl_seconds).await {
                Ok(granted) => {
                    tracing::info!(lease = granted.id(), "node lease granted");
                    shared.local.lock().expect("local state lock").node.lease_id = granted.id();
                    keeper = Some(granted);
                    retry_delay = STORE_RETRY_MIN;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot grant the node lease; retrying");
                    tokio::time::sleep(retry_delay).await;
                    retry_delay = (retry_delay * 2).min(STORE_RETRY_MAX);
                    continue;
                }
            }
        }
        let lease = keeper.as_ref().expect("granted above");
        set_lease_healthy(&shared, lease_renewed_recently(lease, ttl_seconds));

        let now = Instant::now();
        let due = shared
            .local
            .lock()
            .expect("local state lock")
            .due_for_deregistration(now);
        for service_id in due {
            tracing::warn!(service = %service_id, "deregistering: critical longer than deregister_critical_service_after");
            let _ = shared.deregister(&service_id).await;
        }

        let desired = shared.local.lock().expect("local state lock").desired();
        let flush_due = now.duration_since(last_output_flush) >= local::OUTPUT_FLUSH_INTERVAL;
        let plan = local::plan(&desired, &written, flush_due);
        if !plan.writes.is_empty() {
            match write(&shared.client, &plan.writes, lease.id()).await {
                Ok(()) => {
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
                    if plan.flushed_output {
                        last_output_flush = now;
                    }
                    retry_delay = STORE_RETRY_MIN;
                    tracing::debug!(writes = plan.writes.len(), "registry synced");
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot write to the store; retrying");
                    set_lease_healthy(&shared, false);
                    tokio::time::sleep(retry_delay).await;
                    retry_delay = (retry_delay * 2).min(STORE_RETRY_MAX);
                    continue;
                }
            }
        }
        tokio::select! {
            _ = shared.sync_wakeup.notified() => {}
            _ = lease.lost() => {}
            _ = tokio::time::sleep(SYNC_TICK) => {}
        }
    }
}

/// Whether the lease's last acknowledged keep-alive is recent: a keep-alive
/// goes every third of the TTL, so two missed ones mean the store is not
/// answering.
fn lease_renewed_recently(lease: &LeaseKeeper, ttl_seconds: i64) -> bool {
    match lease.state() {
        LeaseState::Alive { expires_at, .. } => {
            let ttl = Duration::from_secs(ttl_seconds as u64);
            let acknowledged = expires_at.checked_sub(ttl).unwrap_or(expires_at);
            acknowledged.elapsed() < ttl * 2 / 3 + Duration::from_secs(1)
        }
        LeaseState::Lost(_) => false,
    }
}

fn set_lease_healthy(shared: &Shared, healthy: bool) {
    let changed = {
        let mut view = shared.view.write().expect("view lock");
        let changed = view.lease_healthy != healthy;
        view.lease_healthy = healthy;
        changed
    };
    if changed {
        shared.bump();
    }
}

/// Writes `writes` in transactions of at most [`TXN_OPERATIONS_MAX`] operations.
async fn write(client: &Client, writes: &[Write], lease: i64) -> Result<(), ClientError> {
    for chunk in writes.chunks(TXN_OPERATIONS_MAX) {
        let success = chunk
            .iter()
            .map(|write| RequestOp {
                request: Some(match write {
                    Write::Put { key, value } => request_op::Request::RequestPut(PutRequest {
                        key: key.clone().into_bytes(),
                        value: value.clone(),
                        lease,
                        ..PutRequest::default()
                    }),
                    Write::Delete { key } => {
                        request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                            key: key.clone().into_bytes(),
                            ..DeleteRangeRequest::default()
                        })
                    }
                }),
            })
            .collect();
        client
            .txn(TxnRequest {
                compare: Vec::new(),
                success,
                failure: Vec::new(),
            })
            .await?;
    }
    Ok(())
}

/// Lists `/keel/` and watches it from there, for the whole agent.
async fn watch_task(shared: Arc<Shared>) {
    let mut retry_delay = STORE_RETRY_MIN;
    loop {
        let listing = match shared.client.get_prefix(PREFIX).await {
            Ok(listing) => listing,
            Err(error) => {
                tracing::warn!(%error, "cannot list the registry; retrying");
                set_watch_healthy(&shared, false);
                tokio::time::sleep(retry_delay).await;
                retry_delay = (retry_delay * 2).min(STORE_RETRY_MAX);
                continue;
            }
        };
        let revision = listing.header.as_ref().map_or(0, |header| header.revision);
        // The supervisor's allocations and statuses come from this same watch.
        shared.supervisor.reset(&listing.kvs);
        let changes: Vec<Change> = listing
            .kvs
            .into_iter()
            .map(|kv| Change::Put {
                key: String::from_utf8_lossy(&kv.key).into_owned(),
                value: kv.value,
                create_revision: kv.create_revision,
                modify_revision: kv.mod_revision,
            })
            .collect();
        {
            let mut view = shared.view.write().expect("view lock");
            view.workloads.reset(&changes);
            view.catalog.reset(changes, revision);
            view.watch_healthy = true;
        }
        shared.bump();
        let options = WatchOptions::prefix(PREFIX).from_revision(revision + 1);
        let mut watcher = match shared.client.watch(options).await {
            Ok(watcher) => watcher,
            Err(error) => {
                tracing::warn!(%error, "cannot watch the registry; retrying");
                set_watch_healthy(&shared, false);
                tokio::time::sleep(retry_delay).await;
                retry_delay = (retry_delay * 2).min(STORE_RETRY_MAX);
                continue;
            }
        };
        retry_delay = STORE_RETRY_MIN;
        while let Some(response) = watcher.next().await {
            let response = match response {
                Ok(response) => response,
                Err(error) => {
                    tracing::warn!(%error, "the registry watch ended; listing again");
                    break;
                }
            };
            if response.canceled || response.compact_revision > 0 {
                tracing::warn!("the registry watch was cancelled; listing again");
                break;
            }
            let revision = response.header.as_ref().map_or(0, |header| header.revision);
            // Blocking queries wake only for the registry: an event or an
            // allocation status written under /keel/ leaves their index alone.
            let registry_changed = {
                let mut view = shared.view.write().expect("view lock");
                let mut registry_changed = !view.watch_healthy;
                for event in response.events {
                    let deleted = event.r#type() == EventType::Delete;
                    let Some(kv) = event.kv else { continue };
                    let key = String::from_utf8_lossy(&kv.key).into_owned();
                    registry_changed |= crate::catalog::is_registry_key(&key);
                    shared
                        .supervisor
                        .apply(&key, (!deleted).then_some(&kv.value[..]));
                    let change = if deleted {
                        Change::Delete { key }
                    } else {
                        shared.observed.publish(&key, &kv.value);
                        Change::Put {
                            key,
                            value: kv.value,
                            create_revision: kv.create_revision,
                            modify_revision: kv.mod_revision,
                        }
                    };
                    view.workloads.apply(&change);
                    view.catalog.apply(change, kv.mod_revision.max(revision));
                }
                view.watch_healthy = true;
                registry_changed
            };
            if registry_changed {
                shared.bump();
            }
        }
        set_watch_healthy(&shared, false);
        tokio::time::sleep(STORE_RETRY_MIN).await;
    }
}

fn set_watch_healthy(shared: &Shared, healthy: bool) {
    let changed = {
        let mut view = shared.view.write().expect("view lock");
        let changed = view.watch_healthy != healthy;
        view.watch_healthy = healthy;
        changed
    };
    if changed {
        shared.bump();
    }
}

/// Copies gossip's verdicts into the view; wakes blocking queries when a
/// node's suspicion changes.
async fn liveness_task(
    shared: Arc<Shared>,
    mut members: watch::Receiver<Arc<Vec<crate::gossip::GossipMember>>>,
) {
    loop {
        let snapshot = members.borrow_and_update().clone();
        let liveness: BTreeMap<String, NodeLiveness> = snapshot
            .iter()
            .map(|member| {
                (
                    member.node_name.clone(),
                    NodeLiveness {
                        suspect: member.status == GossipStatus::Suspect,
                        phi: member.phi,
                        usage: member
                            .usage
                            .as_ref()
                            .and_then(|usage| serde_json::to_value(usage).ok()),
                    },
                )
            })
            .collect();
        let suspicion_changed = {
            let mut view = shared.view.write().expect("view lock");
            let suspects = |map: &BTreeMap<String, NodeLiveness>| -> Vec<String> {
                map.iter()
                    .filter(|(_, liveness)| liveness.suspect)
                    .map(|(name, _)| name.clone())
                    .collect()
            };
            let changed = suspects(&view.catalog.liveness) != suspects(&liveness);
            view.catalog.liveness = liveness;
            changed
        };
        if suspicion_changed {
            shared.bump();
        }
        if members.changed().await.is_err() {
            return;
        }
    }
}

/// DNS answers from the agent's view.
struct DnsView(Arc<Shared>);

impl crate::dns::Catalog for DnsView {
    fn passing_instances(&self, service: &str, tag: Option<&str>) -> Vec<crate::dns::DnsInstance> {
        let view = self.0.view.read().expect("view lock");
        let catalog = &view.catalog;
        let names: Vec<String> = catalog
            .services()
            .into_keys()
            .filter(|name| name.eq_ignore_ascii_case(service))
            .collect();
        let mut instances = Vec::new();
        for name in names {
            for entry in catalog.health_service(&name, None) {
                if !entry.passing() {
                    continue;
                }
                if let Some(tag) = tag {
                    if !entry
                        .instance
                        .value
                        .tags
                        .iter()
                        .any(|candidate| candidate.eq_ignore_ascii_case(tag))
                    {
                        continue;
                    }
                }
                let Ok(address) = entry.address().parse::<IpAddr>() else {
                    continue;
                };
                instances.push(crate::dns::DnsInstance {
                    node: entry.node.value.name.clone(),
                    address,
                    port: entry.instance.value.port,
                    weight: entry.instance.value.weights.passing,
                });
            }
        }
        instances
    }

    fn node_address(&self, node: &str) -> Option<IpAddr> {
        let view = self.0.view.read().expect("view lock");
        view.catalog
            .nodes
            .values()
            .find(|record| record.value.name.eq_ignore_ascii_case(node))
            .and_then(|record| record.value.address.parse().ok())
    }
}
