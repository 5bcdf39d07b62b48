//! Gossip among agents: membership, fast suspicion and live usage.
//!
//! Agents gossip with Quickwit's `chitchat` (scuttlebutt anti-entropy over
//! UDP with a phi-accrual failure detector). Each agent publishes, as
//! key-values of its own node state, its HTTP and DNS addresses and its live
//! [`Usage`]; every agent therefore holds every other agent's latest usage
//! without one write to the store. Nothing here writes to the store: gossip
//! is the *fast, local, may-be-wrong* signal (a node is **suspect** when the
//! phi of its heartbeats crosses the threshold); the store's node lease is
//! the authoritative one (**down**), decided elsewhere.
//!
//! What this module adds to chitchat:
//! - one [`GossipMember`] per node name: a restarted agent comes back with a
//!   newer generation, which replaces the old one, so a node is never listed
//!   twice;
//! - a node is listed once this agent has heard it alive (a joining node is
//!   not "suspect" before its second heartbeat);
//! - **local health** (Lifeguard's lesson, Consul issue 1212): when this
//!   agent itself was stalled (paused, swapped out, starved of CPU), the
//!   silence it measured is its own fault, so for a grace period it does not
//!   turn alive nodes suspect; it waits for fresh heartbeats instead. A paused
//!   agent therefore does not, on resuming, call the healthy ones suspect.
//!
//! The status decisions are a pure function (`MemberTracker::observe`) of
//! what chitchat reports and a time, so they are unit-tested without sockets.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chitchat::transport::UdpTransport;
use chitchat::{
    spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig,
    ProtocolVersion,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::resources::Usage;

/// How often an agent starts a gossip round (with up to three peers). Each
/// round also advances the agent's heartbeat, so this is the heartbeat
/// interval. 500 ms, Consul's LAN probe interval halved: a few rounds fit in
/// the couple of seconds we want suspicion to take, while 50 agents cost each
/// other only ~6 small UDP datagrams per agent per round.
pub const GOSSIP_INTERVAL: Duration = Duration::from_millis(500);

/// The phi above which a node is suspect. Chitchat's phi is the silence since
/// a node's last heartbeat divided by the mean interval between the heartbeats
/// this agent observed; heartbeats arrive directly and relayed, about two per
/// gossip round, so 8 means about four rounds (2 s) of silence. Measured (see
/// docs/BENCHMARKS.md): suspect on every other agent 2–4 s after a kill -9,
/// with 5 agents or 50. Lower makes a peer starved of CPU for a second
/// suspect on a loaded machine; a false suspicion costs more than a late one,
/// and the node lease remains the authoritative verdict.
pub const PHI_THRESHOLD: f64 = 8.0;

/// How many heartbeat intervals the detector averages per node: about a
/// minute of history at a few heartbeats per round, so the mean follows a
/// change of load but one burst does not move it much.
pub const HEARTBEAT_SAMPLES_MAX: usize = 200;

/// A gap between heartbeats longer than this is not a sample (it is an
/// outage, and would inflate the mean so much that the next one goes
/// unnoticed).
pub const HEARTBEAT_INTERVAL_SAMPLE_MAX: Duration = Duration::from_secs(5);

/// How long a node that stopped gossiping stays listed (as suspect) before
/// gossip forgets it. Longer than any node TTL, so the store's verdict
/// ("down") always arrives while gossip still reports the node.
pub const DEAD_NODE_GRACE_PERIOD: Duration = Duration::from_secs(60 * 60);

/// How often the member view is recomputed and published on the watch
/// channel: a fraction of the gossip interval, so a change is seen promptly.
pub const MEMBER_REFRESH_INTERVAL: Duration = Duration::from_millis(100);

/// A refresh that comes this much later than scheduled means this agent
/// itself was stalled (SIGSTOP, swap, CPU starvation): its measurements of
/// others' silence are then not evidence against them.
pub const LOCAL_STALL_THRESHOLD: Duration = Duration::from_millis(1_000);

/// After a local stall, how long alive nodes are not turned suspect: enough
/// for a few gossip rounds to bring fresh heartbeats (chitchat needs two
/// after a reset).
pub const LOCAL_STALL_GRACE: Duration = Duration::from_secs(3);

/// The cluster name agents gossip under, unless configured otherwise.
pub const DEFAULT_CLUSTER_ID: &str = "keel";

/// Key under which a node publishes its HTTP API address.
const KEY_HTTP_ADDR: &str = "http_addr";
/// Key under which a node publishes its DNS address.
const KEY_DNS_ADDR: &str = "dns_addr";
/// Key under which a node publishes its live usage, as JSON.
const KEY_USAGE: &str = "usage";

/// How to start gossiping. `GossipConfig::new` fills in the defaults.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    /// The node's name (`--name`), unique in the cluster.
    pub node_name: String,
    /// Where to listen for gossip (`--gossip-addr`), UDP.
    pub gossip_addr: SocketAddr,
    /// The address other agents reach this one at, when `gossip_addr` is a
    /// wildcard (0.0.0.0) or behind NAT. Defaults to `gossip_addr`.
    pub advertise_addr: Option<SocketAddr>,
    /// Other agents' gossip addresses (`--join`), `host:port`. One reachable
    /// agent is enough; the rest is learned by gossip.
    pub join: Vec<String>,
    /// This agent's HTTP API address, published to the others.
    pub http_addr: Option<SocketAddr>,
    /// This agent's DNS address, published to the others.
    pub dns_addr: Option<SocketAddr>,
    /// Agents gossip only with agents of the same cluster id.
    pub cluster_id: String,
    /// See [`GOSSIP_INTERVAL`].
    pub gossip_interval: Duration,
    /// See [`PHI_THRESHOLD`].
    pub phi_threshold: f64,
    /// See [`DEAD_NODE_GRACE_PERIOD`].
    pub dead_node_grace_period: Duration,
}

impl GossipConfig {
    /// A configuration with the defaults above.
    pub fn new(node_name: impl Into<String>, gossip_addr: SocketAddr) -> GossipConfig {
        GossipConfig {
            node_name: node_name.into(),
            gossip_addr,
            advertise_addr: None,
            join: Vec::new(),
            http_addr: None,
            dns_addr: None,
            cluster_id: DEFAULT_CLUSTER_ID.to_string(),
            gossip_interval: GOSSIP_INTERVAL,
            phi_threshold: PHI_THRESHOLD,
            dead_node_grace_period: DEAD_NODE_GRACE_PERIOD,
        }
    }

    fn validate(&self) -> Result<SocketAddr, GossipError> {
        let invalid =
            |field: &'static str, reason: String| GossipError::InvalidConfig { field, reason };
        if self.node_name.is_empty() {
            return Err(invalid("node_name", "must not be empty".to_string()));
        }
        if self.gossip_interval.is_zero() {
            return Err(invalid(
                "gossip_interval",
                "must be more than zero".to_string(),
            ));
        }
        if !(self.phi_threshold.is_finite() && self.phi_threshold > 0.0) {
            return Err(invalid(
                "phi_threshold",
                format!("must be a positive number, not {}", self.phi_threshold),
            ));
        }
        for peer in &self.join {
            let port = peer.rsplit_once(':').map(|(_, port)| port.parse::<u16>());
            if !matches!(port, Some(Ok(port)) if port != 0) {
                return Err(invalid("join", format!("{peer:?} is not host:port")));
            }
        }
        let advertise_addr = self.advertise_addr.unwrap_or(self.gossip_addr);
        if advertise_addr.ip().is_unspecified() || advertise_addr.port() == 0 {
            return Err(invalid(
                "advertise_addr",
                format!("{advertise_addr} cannot be reached by other agents: give an address and a port"),
            ));
        }
        Ok(advertise_addr)
    }
}

/// Why gossip could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GossipError {
    #[error("invalid gossip configuration: {field} {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("cannot start gossip on {addr}: {reason}")]
    Start { addr: SocketAddr, reason: String },
    #[error("gossip has stopped")]
    Stopped,
}

/// A node's status as gossip sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GossipStatus {
    /// Its heartbeats arrive (phi under the threshold).
    Alive,
    /// Its heartbeats stopped: phi crossed the threshold. Local and fast; the
    /// node lease decides whether it is down.
    Suspect,
}

/// One node as this agent sees it through gossip.
#[derive(Debug, Clone, PartialEq)]
pub struct GossipMember {
    pub node_name: String,
    /// Grows with every restart of the node's agent (its start time in µs).
    pub generation: u64,
    pub gossip_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub dns_addr: Option<SocketAddr>,
    pub status: GossipStatus,
    /// Current phi: the silence since the last heartbeat over the mean
    /// interval between heartbeats. `None` for this agent itself and for a
    /// node without two heartbeats yet.
    pub phi: Option<f64>,
    /// The node's last published usage, if it published one.
    pub usage: Option<Usage>,
    /// Time since this agent last saw the node's heartbeat advance (zero for
    /// this agent itself).
    pub since_last_heartbeat: Duration,
    /// Whether this member is the local agent.
    pub is_self: bool,
}

/// A running gossip instance. Dropping it stops gossiping (others then see
/// this node suspect); [`Gossip::shutdown`] does the same and waits.
pub struct Gossip {
    handle: Option<ChitchatHandle>,
    shared: Arc<Shared>,
    members_receiver: watch::Receiver<Arc<Vec<GossipMember>>>,
    refresh_task: JoinHandle<()>,
}

/// What the refresh task and `members()` share.
struct Shared {
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    self_id: ChitchatId,
    phi_threshold: f64,
    tracker: StdMutex<MemberTracker>,
    /// Each node's published values, parsed, with the max version they
    /// were parsed at. Locked only inside the chitchat lock.
    published_cache: StdMutex<HashMap<ChitchatId, (u64, Published)>>,
}

impl Gossip {
    /// Binds the gossip socket and starts gossiping with `config.join`.
    /// Must be called inside a tokio runtime, which runs the gossip tasks.
    pub async fn start(config: GossipConfig) -> Result<Gossip, GossipError> {
        let advertise_addr = config.validate()?;
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|since_epoch| since_epoch.as_micros() as u64)
            .unwrap_or(0);
        let self_id = ChitchatId::new(config.node_name.clone(), generation, advertise_addr);
        let chitchat_config = ChitchatConfig {
            chitchat_id: self_id.clone(),
            cluster_id: config.cluster_id.clone(),
            gossip_interval: config.gossip_interval,
            listen_addr: config.gossip_addr,
            seed_nodes: config.join.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: config.phi_threshold,
                sampling_window_size: HEARTBEAT_SAMPLES_MAX,
                max_interval: HEARTBEAT_INTERVAL_SAMPLE_MAX,
                // The prior mean before there are samples: heartbeats are
                // observed about twice per gossip round (measured).
                initial_interval: config.gossip_interval / 2,
                dead_node_grace_period: config.dead_node_grace_period,
            },
            // Nothing is ever deleted from a node's key-values.
            marked_for_deletion_grace_period: config.dead_node_grace_period,
            catchup_callback: None,
            extra_liveness_predicate: None,
            // Every keel agent runs the same chitchat, so the compressed
            // digest (smaller datagrams with many nodes) is understood.
            protocol_version: ProtocolVersion::V1,
        };
        let mut initial_key_values = Vec::new();
        if let Some(http_addr) = config.http_addr {
            initial_key_values.push((KEY_HTTP_ADDR.to_string(), http_addr.to_string()));
        }
        if let Some(dns_addr) = config.dns_addr {
            initial_key_values.push((KEY_DNS_ADDR.to_string(), dns_addr.to_string()));
        }
        let handle = spawn_chitchat(chitchat_config, initial_key_values, &UdpTransport)
            .await
            .map_err(|error| GossipError::Start {
                addr: config.gossip_addr,
                reason: format!("{error:#}"),
            })?;
        let shared = Arc::new(Shared {
            chitchat: handle.chitchat(),
            self_id,
            phi_threshold: config.phi_threshold,
            tracker: StdMutex::new(MemberTracker::new(Instant::now())),
            published_cache: StdMutex::new(HashMap::new()),
        });
        let (members_sender, members_receiver) = watch::channel(Arc::new(Vec::new()));
        let refresh_task = tokio::spawn(refresh_loop(shared.clone(), members_sender));
        Ok(Gossip {
            handle: Some(handle),
            shared,
            members_receiver,
            refresh_task,
        })
    }

    /// This agent's identity in gossip.
    pub fn node_name(&self) -> &str {
        &self.shared.self_id.node_id
    }

    /// Publishes this node's live usage to the other agents (call it after
    /// each resource sample).
    pub async fn publish_usage(&self, usage: &Usage) {
        let encoded = serde_json::to_string(usage).expect("usage is plain numbers");
        self.shared
            .chitchat
            .lock()
            .await
            .self_node_state()
            .set(KEY_USAGE, encoded);
    }

    /// CPU use of every running allocation in the cluster, in millicores,
    /// by allocation id: the `alloc_cpu_millicores:<id>` keys every node's
    /// supervisor publishes, merged (the controller's autoscaling input).
    pub async fn allocation_usage(&self) -> BTreeMap<String, u64> {
        const PREFIX: &str = "alloc_cpu_millicores:";
        let chitchat = self.shared.chitchat.lock().await;
        let mut usage = BTreeMap::new();
        for state in chitchat.node_states().values() {
            for (key, value) in state.key_values() {
                let Some(allocation) = key.strip_prefix(PREFIX) else {
                    continue;
                };
                if let Ok(millicores) = value.parse::<u64>() {
                    usage.insert(allocation.to_string(), millicores);
                }
            }
        }
        usage
    }

    /// Every node this agent has heard alive, this agent included, sorted by
    /// name, with the current phi.
    pub async fn members(&self) -> Vec<GossipMember> {
        self.shared.refresh(false).await
    }

    /// The member list as of the last refresh (every
    /// [`MEMBER_REFRESH_INTERVAL`]); the receiver is notified when a member
    /// joins, changes status, addresses or usage, or leaves (not when only
    /// phi moves).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Vec<GossipMember>>> {
        self.members_receiver.clone()
    }

    /// Stops gossiping and waits for the gossip task to end.
    pub async fn shutdown(mut self) -> Result<(), GossipError> {
        self.refresh_task.abort();
        match self.handle.take() {
            Some(handle) => handle.shutdown().await.map_err(|_| GossipError::Stopped),
            None => Ok(()),
        }
    }
}

impl Drop for Gossip {
    fn drop(&mut self) {
        self.refresh_task.abort();
        if let Some(handle) = &self.handle {
            // Dropping the handle also ends the server loop; aborting makes
            // the socket close now rather than at its next wake-up.
            handle.abort();
        }
    }
}

impl Shared {
    /// Reads chitchat's view and turns it into members. `from_refresh_loop`
    /// says whether this is the periodic refresh (whose lateness measures
    /// this agent's own stalls).
    async fn refresh(&self, from_refresh_loop: bool) -> Vec<GossipMember> {
        let observations = {
            let chitchat = self.chitchat.lock().await;
            let mut published_cache = self
                .published_cache
                .lock()
                .expect("the published cache never panics");
            let live: std::collections::HashSet<&ChitchatId> = chitchat.live_nodes().collect();
            let observations = chitchat
                .node_states()
                .iter()
                .map(|(id, state)| {
                    // Key-values change only when a node publishes: parse
                    // them again only when its max version moved, so a
                    // refresh costs no allocation per node.
                    let published = match published_cache.get(id) {
                        Some((version, published)) if *version == state.max_version() => *published,
                        _ => {
                            let published = Published::from_key_values(state.key_values());
                            published_cache.insert(id.clone(), (state.max_version(), published));
                            published
                        }
                    };
                    NodeObservation {
                        id: id.clone(),
                        heartbeat: u64::from(state.heartbeat()),
                        is_live: live.contains(id),
                        detection_timeout: chitchat.failure_detection_timeout(id),
                        published,
                    }
                })
                .collect::<Vec<_>>();
            published_cache.retain(|id, _| chitchat.node_states().contains_key(id));
            observations
        };
        let mut tracker = self
            .tracker
            .lock()
            .expect("the member tracker never panics");
        tracker.observe(
            Instant::now(),
            from_refresh_loop,
            &self.self_id,
            self.phi_threshold,
            observations,
        )
    }
}

async fn refresh_loop(shared: Arc<Shared>, members_sender: watch::Sender<Arc<Vec<GossipMember>>>) {
    let mut interval = tokio::time::interval(MEMBER_REFRESH_INTERVAL);
    // After a stall, one late refresh (not a burst of them) is what we want:
    // its lateness is the evidence of the stall.
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let members = shared.refresh(true).await;
        members_sender.send_if_modified(|current| {
            if same_view(current, &members) {
                false
            } else {
                *current = Arc::new(members);
                true
            }
        });
    }
}

/// Whether two member lists differ only in phi and heartbeat age.
fn same_view(before: &[GossipMember], after: &[GossipMember]) -> bool {
    before.len() == after.len()
        && before.iter().zip(after).all(|(before, after)| {
            before.node_name == after.node_name
                && before.generation == after.generation
                && before.status == after.status
                && before.usage == after.usage
                && before.http_addr == after.http_addr
                && before.dns_addr == after.dns_addr
                && before.gossip_addr == after.gossip_addr
        })
}

/// What chitchat says about one node at one moment.
#[derive(Debug, Clone)]
pub(crate) struct NodeObservation {
    pub(crate) id: ChitchatId,
    pub(crate) heartbeat: u64,
    /// Chitchat's failure detector verdict (phi at or under the threshold).
    pub(crate) is_live: bool,
    /// Silence after which phi reaches the threshold (threshold × mean
    /// heartbeat interval); `None` before two heartbeats or after a reset.
    pub(crate) detection_timeout: Option<Duration>,
    pub(crate) published: Published,
}

/// What a node publishes in its key-values, parsed. A value that does not
/// parse (from a newer or broken agent) reads as absent.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Published {
    pub(crate) http_addr: Option<SocketAddr>,
    pub(crate) dns_addr: Option<SocketAddr>,
    pub(crate) usage: Option<Usage>,
}

impl Published {
    fn from_key_values<'a>(key_values: impl Iterator<Item = (&'a str, &'a str)>) -> Published {
        let mut published = Published::default();
        for (key, value) in key_values {
            match key {
                KEY_HTTP_ADDR => published.http_addr = value.parse().ok(),
                KEY_DNS_ADDR => published.dns_addr = value.parse().ok(),
                KEY_USAGE => published.usage = serde_json::from_str(value).ok(),
                _ => {}
            }
        }
        published
    }
}

/// What this agent remembers about one node generation between refreshes.
#[derive(Debug, Clone)]
struct Tracked {
    heartbeat: u64,
    heartbeat_seen_at: Instant,
    /// The last detection timeout chitchat reported: kept after chitchat
    /// resets a dead node's samples, so phi goes on rising while it is silent.
    detection_timeout: Option<Duration>,
    heard_alive: bool,
    status: GossipStatus,
}

/// Turns chitchat's observations into member statuses. Pure: all time comes
/// in as arguments.
#[derive(Debug)]
pub(crate) struct MemberTracker {
    tracked: HashMap<ChitchatId, Tracked>,
    last_refresh_at: Instant,
    /// Until then, alive nodes are not turned suspect: this agent was
    /// stalled and has not heard from anyone since.
    distrust_until: Option<Instant>,
}

impl MemberTracker {
    pub(crate) fn new(now: Instant) -> MemberTracker {
        MemberTracker {
            tracked: HashMap::new(),
            last_refresh_at: now,
            distrust_until: None,
        }
    }

    /// Folds in one observation of every node chitchat knows and returns the
    /// member list. A refresh (`from_refresh_loop`), or any call, that comes
    /// more than [`LOCAL_STALL_THRESHOLD`] after the last refresh means this
    /// agent was stalled.
    pub(crate) fn observe(
        &mut self,
        now: Instant,
        from_refresh_loop: bool,
        self_id: &ChitchatId,
        phi_threshold: f64,
        observations: Vec<NodeObservation>,
    ) -> Vec<GossipMember> {
        if now.saturating_duration_since(self.last_refresh_at) > LOCAL_STALL_THRESHOLD {
            // Nobody could reach us: restart every silence from now.
            self.distrust_until = Some(now + LOCAL_STALL_GRACE);
            for tracked in self.tracked.values_mut() {
                tracked.heartbeat_seen_at = now;
            }
            tracing::info!(
                stalled_for = ?now.saturating_duration_since(self.last_refresh_at),
                "this agent was stalled; suspicion of others is held back"
            );
            self.last_refresh_at = now;
        }
        if from_refresh_loop {
            self.last_refresh_at = self.last_refresh_at.max(now);
        }
        let distrusting = self.distrust_until.is_some_and(|until| now < until);

        let mut seen = std::collections::HashSet::new();
        let mut newest_by_name: BTreeMap<String, GossipMember> = BTreeMap::new();
        for observation in observations {
            seen.insert(observation.id.clone());
            let is_self = observation.id == *self_id;
            let tracked = self
                .tracked
                .entry(observation.id.clone())
                .or_insert_with(|| Tracked {
                    heartbeat: observation.heartbeat,
                    heartbeat_seen_at: now,
                    detection_timeout: None,
                    heard_alive: false,
                    status: GossipStatus::Alive,
                });
            if observation.heartbeat > tracked.heartbeat {
                tracked.heartbeat = observation.heartbeat;
                tracked.heartbeat_seen_at = now;
            }
            if observation.detection_timeout.is_some() {
                tracked.detection_timeout = observation.detection_timeout;
            }
            let status = if is_self || observation.is_live {
                tracked.heard_alive = true;
                GossipStatus::Alive
            } else if distrusting && tracked.status == GossipStatus::Alive {
                GossipStatus::Alive
            } else {
                GossipStatus::Suspect
            };
            tracked.status = status;
            if !tracked.heard_alive {
                // Joining: not listed before this agent heard it alive.
                continue;
            }
            let since_last_heartbeat = if is_self {
                Duration::ZERO
            } else {
                now.saturating_duration_since(tracked.heartbeat_seen_at)
            };
            let phi = match (is_self, tracked.detection_timeout) {
                (false, Some(timeout)) if !timeout.is_zero() => {
                    Some(phi_threshold * since_last_heartbeat.as_secs_f64() / timeout.as_secs_f64())
                }
                _ => None,
            };
            let member = GossipMember {
                node_name: observation.id.node_id.to_string(),
                generation: observation.id.generation_id,
                gossip_addr: observation.id.gossip_advertise_addr,
                http_addr: observation.published.http_addr,
                dns_addr: observation.published.dns_addr,
                status,
                phi,
                usage: observation.published.usage,
                since_last_heartbeat,
                is_self,
            };
            // A restarted agent has a newer generation: it replaces the old.
            match newest_by_name.get(&member.node_name) {
                Some(existing) if existing.generation >= member.generation => {}
                _ => {
                    newest_by_name.insert(member.node_name.clone(), member);
                }
            }
        }
        // Forget generations chitchat has garbage collected.
        self.tracked.retain(|id, _| seen.contains(id));
        newest_by_name.into_values().collect()
    }
}

/// Key prefix under which a node publishes the CPU use of each allocation
/// it runs: `alloc_cpu_millicores:<alloc id>` = decimal millicores.
pub const KEY_ALLOCATION_CPU_PREFIX: &str = "alloc_cpu_millicores:";

impl Gossip {
    /// Publishes the CPU use of this node's running allocations (alloc id →
    /// millicores), the autoscaler's input, and deletes the keys of
    /// allocations no longer in `usage`. A fast signal: never in the store.
    pub async fn publish_allocation_usage(&self, usage: &BTreeMap<String, u64>) {
        let mut chitchat = self.shared.chitchat.lock().await;
        let state = chitchat.self_node_state();
        let gone: Vec<String> = state
            .key_values()
            .filter_map(|(key, _)| key.strip_prefix(KEY_ALLOCATION_CPU_PREFIX))
            .filter(|alloc_id| !usage.contains_key(*alloc_id))
            .map(|alloc_id| format!("{KEY_ALLOCATION_CPU_PREFIX}{alloc_id}"))
            .collect();
        for key in gone {
            state.delete(&key);
        }
        for (alloc_id, millicores) in usage {
            let key = format!("{KEY_ALLOCATION_CPU_PREFIX}{alloc_id}");
            if state.get(&key) != Some(millicores.to_string().as_str()) {
                state.set(key, millicores);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str, generation: u64, port: u16) -> ChitchatId {
        ChitchatId::new(name, generation, SocketAddr::from(([127, 0, 0, 1], port)))
    }

    fn observation(id: &ChitchatId, heartbeat: u64, is_live: bool) -> NodeObservation {
        NodeObservation {
            id: id.clone(),
            heartbeat,
            is_live,
            detection_timeout: Some(Duration::from_secs(3)),
            published: Published::default(),
        }
    }

    fn statuses(members: &[GossipMember]) -> Vec<(String, GossipStatus)> {
        members
            .iter()
            .map(|member| (member.node_name.clone(), member.status))
            .collect()
    }

    #[test]
    fn a_node_is_listed_once_heard_alive_and_suspect_when_chitchat_says_so() {
        let start = Instant::now();
        let me = id("a", 1, 1);
        let other = id("b", 1, 2);
        let mut tracker = MemberTracker::new(start);
        let tick = |n: u64| start + MEMBER_REFRESH_INTERVAL * n as u32;

        // Known but not yet alive (one heartbeat): not listed.
        let members = tracker.observe(
            tick(1),
            true,
            &me,
            12.0,
            vec![observation(&me, 5, true), observation(&other, 1, false)],
        );
        assert_eq!(
            statuses(&members),
            vec![("a".to_string(), GossipStatus::Alive)]
        );

        let members = tracker.observe(
            tick(2),
            true,
            &me,
            12.0,
            vec![observation(&me, 6, true), observation(&other, 2, true)],
        );
        assert_eq!(
            statuses(&members),
            vec![
                ("a".into(), GossipStatus::Alive),
                ("b".into(), GossipStatus::Alive)
            ]
        );
        assert_eq!(members[0].phi, None, "no phi for oneself");
        assert!(members[0].is_self && !members[1].is_self);

        // Silent for ten refreshes: phi grows with the silence.
        let members = tracker.observe(
            tick(12),
            true,
            &me,
            12.0,
            vec![observation(&me, 7, true), observation(&other, 2, true)],
        );
        let phi = members[1].phi.unwrap();
        assert!((phi - 12.0 * 1.0 / 3.0).abs() < 1e-9, "phi {phi}");
        assert_eq!(members[1].since_last_heartbeat, Duration::from_secs(1));

        let members = tracker.observe(
            tick(13),
            true,
            &me,
            12.0,
            vec![observation(&me, 8, true), observation(&other, 2, false)],
        );
        assert_eq!(members[1].status, GossipStatus::Suspect);
        // Chitchat reset the samples: phi keeps using the last known timeout.
        let mut reset = observation(&other, 2, false);
        reset.detection_timeout = None;
        let members = tracker.observe(
            tick(14),
            true,
            &me,
            12.0,
            vec![observation(&me, 9, true), reset],
        );
        assert!(members[1].phi.unwrap() > 12.0 * 1.2 / 3.0 - 1e-9);
    }

    #[test]
    fn a_restarted_node_replaces_its_old_generation() {
        let start = Instant::now();
        let me = id("a", 1, 1);
        let old = id("b", 1, 2);
        let new = id("b", 2, 2);
        let mut tracker = MemberTracker::new(start);
        let t1 = start + MEMBER_REFRESH_INTERVAL;
        let t2 = t1 + MEMBER_REFRESH_INTERVAL;
        let t3 = t2 + MEMBER_REFRESH_INTERVAL;
        tracker.observe(
            t1,
            true,
            &me,
            12.0,
            vec![observation(&me, 1, true), observation(&old, 9, true)],
        );
        // The old generation died; the new one is not heard alive yet: the
        // old one, suspect, is what we know.
        let members = tracker.observe(
            t2,
            true,
            &me,
            12.0,
            vec![
                observation(&me, 2, true),
                observation(&old, 9, false),
                observation(&new, 1, false),
            ],
        );
        assert_eq!(members.len(), 2);
        assert_eq!(
            (members[1].generation, members[1].status),
            (1, GossipStatus::Suspect)
        );
        let members = tracker.observe(
            t3,
            true,
            &me,
            12.0,
            vec![
                observation(&me, 3, true),
                observation(&old, 9, false),
                observation(&new, 3, true),
            ],
        );
        assert_eq!(members.len(), 2, "one member per name");
        assert_eq!(
            (members[1].generation, members[1].status),
            (2, GossipStatus::Alive)
        );
    }

    #[test]
    fn after_a_local_stall_alive_nodes_are_not_turned_suspect_during_the_grace() {
        let start = Instant::now();
        let me = id("a", 1, 1);
        let healthy = id("b", 1, 2);
        let dead_before = id("c", 1, 3);
        let mut tracker = MemberTracker::new(start);
        let t1 = start + MEMBER_REFRESH_INTERVAL;
        tracker.observe(
            t1,
            true,
            &me,
            12.0,
            vec![
                observation(&me, 1, true),
                observation(&healthy, 5, true),
                observation(&dead_before, 5, true),
            ],
        );
        let t2 = t1 + MEMBER_REFRESH_INTERVAL;
        tracker.observe(
            t2,
            true,
            &me,
            12.0,
            vec![
                observation(&me, 2, true),
                observation(&healthy, 6, true),
                observation(&dead_before, 5, false),
            ],
        );

        // Paused for ten seconds; on resuming chitchat calls everyone dead.
        let resumed = t2 + Duration::from_secs(10);
        let members = tracker.observe(
            resumed,
            true,
            &me,
            12.0,
            vec![
                observation(&me, 3, true),
                observation(&healthy, 6, false),
                observation(&dead_before, 5, false),
            ],
        );
        assert_eq!(
            members[1].status,
            GossipStatus::Alive,
            "the healthy node is not blamed for our pause"
        );
        assert_eq!(
            members[1].since_last_heartbeat,
            Duration::ZERO,
            "its silence restarts when we resume"
        );
        assert_eq!(
            members[2].status,
            GossipStatus::Suspect,
            "a node suspect before the pause stays suspect"
        );

        // Refreshes go on every interval; a call from the API in the middle
        // of the grace still sees the healthy node alive.
        let silent = |heartbeat: u64| {
            vec![
                observation(&me, heartbeat, true),
                observation(&healthy, 6, false),
                observation(&dead_before, 5, false),
            ]
        };
        let mut now = resumed;
        let mut heartbeat = 4;
        while now + MEMBER_REFRESH_INTERVAL < resumed + LOCAL_STALL_GRACE / 2 {
            now += MEMBER_REFRESH_INTERVAL;
            heartbeat += 1;
            let members = tracker.observe(now, true, &me, 12.0, silent(heartbeat));
            assert_eq!(members[1].status, GossipStatus::Alive);
        }
        let members = tracker.observe(now, false, &me, 12.0, silent(heartbeat));
        assert_eq!(members[1].status, GossipStatus::Alive);

        // After the grace, a node still silent is suspect.
        while now < resumed + LOCAL_STALL_GRACE {
            now += MEMBER_REFRESH_INTERVAL;
            heartbeat += 1;
            tracker.observe(now, true, &me, 12.0, silent(heartbeat));
        }
        let members = tracker.observe(
            now + MEMBER_REFRESH_INTERVAL,
            true,
            &me,
            12.0,
            silent(heartbeat + 1),
        );
        assert_eq!(members[1].status, GossipStatus::Suspect);
    }

    #[test]
    fn without_a_stall_a_silent_node_is_suspect_at_once() {
        let start = Instant::now();
        let me = id("a", 1, 1);
        let other = id("b", 1, 2);
        let mut tracker = MemberTracker::new(start);
        let t1 = start + MEMBER_REFRESH_INTERVAL;
        tracker.observe(
            t1,
            true,
            &me,
            12.0,
            vec![observation(&me, 1, true), observation(&other, 5, true)],
        );
        let t2 = t1 + MEMBER_REFRESH_INTERVAL;
        let members = tracker.observe(
            t2,
            true,
            &me,
            12.0,
            vec![observation(&me, 2, true), observation(&other, 5, false)],
        );
        assert_eq!(members[1].status, GossipStatus::Suspect);
    }

    #[test]
    fn published_values_are_read_back_and_garbage_is_ignored() {
        let usage = Usage {
            cpu_percent: 12.5,
            memory_used_bytes: 1 << 30,
            disk_free_bytes: 1 << 40,
            load_average: [0.5, 0.25, 0.125],
        };
        let encoded_usage = serde_json::to_string(&usage).unwrap();
        let key_values = [
            (KEY_HTTP_ADDR, "127.0.0.1:8500"),
            (KEY_DNS_ADDR, "not an address"),
            (KEY_USAGE, encoded_usage.as_str()),
            ("from_a_newer_agent", "x"),
        ];
        let published = Published::from_key_values(key_values.into_iter());
        assert_eq!(published.http_addr, Some("127.0.0.1:8500".parse().unwrap()));
        assert_eq!(published.dns_addr, None);
        assert_eq!(published.usage, Some(usage));

        let me = id("a", 1, 1);
        let mut observed = observation(&me, 1, true);
        observed.published = published;
        let start = Instant::now();
        let members = MemberTracker::new(start).observe(start, true, &me, 12.0, vec![observed]);
        assert_eq!(members[0].usage, Some(usage));
        assert_eq!(members[0].http_addr, published.http_addr);
    }

    #[tokio::test]
    async fn a_taken_gossip_port_is_an_error_naming_the_address() {
        let addr: SocketAddr = "127.0.0.1:26295".parse().unwrap();
        let _first = Gossip::start(GossipConfig::new("first", addr))
            .await
            .unwrap();
        match Gossip::start(GossipConfig::new("second", addr)).await {
            Err(GossipError::Start { addr: reported, .. }) => assert_eq!(reported, addr),
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("two instances bound one port"),
        }
    }

    #[test]
    fn bad_configurations_are_refused_naming_the_field() {
        let addr: SocketAddr = "127.0.0.1:26290".parse().unwrap();
        let mut config = GossipConfig::new("", addr);
        assert!(matches!(
            config.validate(),
            Err(GossipError::InvalidConfig {
                field: "node_name",
                ..
            })
        ));
        config.node_name = "a".into();
        config.phi_threshold = f64::NAN;
        assert!(matches!(
            config.validate(),
            Err(GossipError::InvalidConfig {
                field: "phi_threshold",
                ..
            })
        ));
        config.phi_threshold = PHI_THRESHOLD;
        config.join = vec!["127.0.0.1".into()];
        assert!(matches!(
            config.validate(),
            Err(GossipError::InvalidConfig { field: "join", .. })
        ));
        config.join = vec!["agent-2.example:7946".into()];
        config.gossip_addr = "0.0.0.0:7946".parse().unwrap();
        assert!(matches!(
            config.validate(),
            Err(GossipError::InvalidConfig {
                field: "advertise_addr",
                ..
            })
        ));
        config.advertise_addr = Some(addr);
        assert_eq!(config.validate().unwrap(), addr);
    }
}
