//! The agent's eyes on the cluster, for the events log, the dashboard and
//! the agent's metrics: the tokio tasks that poll the members
//! ([`crate::members`]), sample throughput and latency, and turn changes of
//! node status (gossip's suspicion, the node lease) into events.
//!
//! **Who records a cluster-level event.** Every agent sees a leader change
//! or a node turning suspect; recording it once per agent would triple the
//! timeline. The rule: only the *reporter* records cluster-level events (the
//! members' events and node suspect/alive/down), and the reporter is the
//! agent with the smallest name among the nodes its gossip holds alive
//! (itself included) and the registered nodes its gossip has not heard of
//! yet (an agent that just started has not heard the others: they may well
//! report, so it keeps quiet until gossip says otherwise). Every agent
//! computes the same answer from a converged gossip view; while gossip
//! disagrees (a partition, a node just killed) two agents may both report
//! for a moment, which duplicates an event rather than losing one. A
//! suspected reporter is replaced by the next name as soon as gossip
//! suspects it.
//! Each agent records its own checks' transitions itself (`check.status`),
//! since only it runs them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Limited};
use hyper::body::Bytes;
use keel_client::api::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_client::keel_types::etcdserverpb::alarm_request::AlarmAction;
use keel_client::keel_types::etcdserverpb::{AlarmRequest, AlarmType, StatusRequest};
use tokio::sync::{broadcast, watch};
use tonic::transport::{Channel, Endpoint};

use crate::agent::Shared;
use crate::catalog::NodeStatus;
use crate::events::{self, Event};
use crate::gossip::{GossipMember, GossipStatus};
use crate::members::{
    cluster_events, parse_exposition, ClusterSnapshot, MemberStatus, MemberView, Observation,
    Sampler, Scrape, DASHBOARD_VIEW_WINDOW, EXPOSITION_BYTES_MAX, IDLE_POLL_INTERVAL, MEMBERS_MAX,
    MEMBER_POLL_INTERVAL, MEMBER_STATUS_TIMEOUT, SAMPLE_INTERVAL,
};
use crate::probe::HttpClient;

/// Events kept for live subscribers (server-sent events) that fall behind;
/// a subscriber further behind is told it lost some and carries on.
pub const EVENT_FEED_CAPACITY: usize = 256;

/// Polls after the agent starts whose changes are not recorded as events.
const MEMBER_WARM_UP_POLLS: u32 = 3;

/// What the observer tasks share with the API.
pub struct Observed {
    /// The members as last polled.
    pub cluster: RwLock<ClusterSnapshot>,
    /// Throughput and latency over the last minutes.
    pub sampler: Mutex<Sampler>,
    /// Whether this agent records cluster-level events now.
    pub reporter: AtomicBool,
    /// Every event the watch of `/keel/events/` delivers, for live subscribers.
    pub feed: broadcast::Sender<Event>,
    /// When the dashboard was last loaded or polled on this agent.
    viewed_at: Mutex<Option<Instant>>,
}

impl Default for Observed {
    fn default() -> Observed {
        Observed {
            cluster: RwLock::new(ClusterSnapshot::default()),
            sampler: Mutex::new(Sampler::default()),
            reporter: AtomicBool::new(false),
            feed: broadcast::channel(EVENT_FEED_CAPACITY).0,
            viewed_at: Mutex::new(None),
        }
    }
}

impl Observed {
    /// Notes that someone looks at the dashboard: poll at full rate.
    pub fn note_viewed(&self) {
        *self.viewed_at.lock().expect("viewed lock") = Some(Instant::now());
    }

    /// Whether this agent polls at full rate now: it reports, or its
    /// dashboard was looked at within [`DASHBOARD_VIEW_WINDOW`].
    fn busy(&self) -> bool {
        self.reporter.load(Ordering::Relaxed)
            || self
                .viewed_at
                .lock()
                .expect("viewed lock")
                .is_some_and(|viewed| viewed.elapsed() < DASHBOARD_VIEW_WINDOW)
    }

    /// Hands an event the watch delivered to the live subscribers.
    pub fn publish(&self, key: &str, value: &[u8]) {
        if !key.starts_with(events::PREFIX) {
            return;
        }
        if let Ok(event) = Event::from_json(value) {
            // No subscriber is not an error.
            let _ = self.feed.send(event);
        }
    }
}

/// The reporter rule (see the module documentation): `registered` are the
/// nodes the store holds.
pub fn is_reporter<'a>(
    self_name: &str,
    members: &[GossipMember],
    registered: impl IntoIterator<Item = &'a String>,
) -> bool {
    let unheard = registered
        .into_iter()
        .filter(|name| !members.iter().any(|member| &member.node_name == *name));
    let smallest_other = members
        .iter()
        .filter(|member| member.is_self || member.status == GossipStatus::Alive)
        .map(|member| member.node_name.clone())
        .chain(unheard.cloned())
        .min();
    smallest_other.is_none_or(|name| name.as_str() >= self_name)
}

fn record_all(shared: &Shared, observations: Vec<Observation>) {
    for observation in observations {
        shared.events.record(
            observation.kind,
            observation.subject,
            observation.message,
            observation.fields,
        );
    }
}

/// Keeps the reporter flag current and records node status transitions.
pub async fn watch_nodes(shared: Arc<Shared>, mut gossip: watch::Receiver<Arc<Vec<GossipMember>>>) {
    let mut generation = shared.generation.subscribe();
    let mut previous: Option<BTreeMap<String, (NodeStatus, Option<f64>)>> = None;
    loop {
        let members = gossip.borrow_and_update().clone();
        let reporter = {
            let view = shared.view.read().expect("view lock");
            is_reporter(&shared.config.name, &members, view.catalog.nodes.keys())
        };
        if shared.observed.reporter.swap(reporter, Ordering::Relaxed) != reporter {
            tracing::info!(reporter, "cluster-level event reporting changed");
        }
        let current = node_statuses(&shared);
        // Only a current view judges: a stale one (store away) would call
        // every node down when the listing comes back.
        let view_current = !shared.view.read().expect("view lock").stale();
        if view_current {
            if let Some(previous) = &previous {
                if reporter {
                    record_all(&shared, node_events(previous, &current));
                }
            }
            previous = Some(current);
        }
        tokio::select! {
            changed = generation.changed() => if changed.is_err() { return },
            changed = gossip.changed() => if changed.is_err() { return },
        }
    }
}

fn node_statuses(shared: &Shared) -> BTreeMap<String, (NodeStatus, Option<f64>)> {
    let view = shared.view.read().expect("view lock");
    let catalog = &view.catalog;
    catalog
        .nodes
        .keys()
        .chain(catalog.down.keys())
        .map(|name| {
            (
                name.clone(),
                (
                    catalog.node_status(name),
                    catalog.liveness.get(name).and_then(|liveness| liveness.phi),
                ),
            )
        })
        .collect()
}

/// The events between two node status maps (pure).
pub fn node_events(
    previous: &BTreeMap<String, (NodeStatus, Option<f64>)>,
    current: &BTreeMap<String, (NodeStatus, Option<f64>)>,
) -> Vec<Observation> {
    let mut observations = Vec::new();
    for (name, (status, phi)) in current {
        let before = previous.get(name).map(|(status, _)| *status);
        if before == Some(*status) {
            continue;
        }
        let phi_text = phi.map_or("unknown".to_string(), |phi| format!("{phi:.1}"));
        let (kind, message) = match (before, status) {
            (_, NodeStatus::Suspect) => (
                events::EventType::NodeSuspect,
                format!("node {name} is suspect: gossip heartbeats stopped (phi {phi_text})"),
            ),
            (Some(NodeStatus::Suspect), NodeStatus::Alive) => (
                events::EventType::NodeAlive,
                format!("node {name} is alive again: gossip heartbeats arrive"),
            ),
            (_, NodeStatus::Alive) => (
                events::EventType::NodeAlive,
                format!("node {name} registered and is alive"),
            ),
            // node.down is the controller's to record: only the active
            // controller watches for it, so the log has one event per failure.
            (_, NodeStatus::Down) => continue,
        };
        let mut fields = vec![("status".to_string(), status.as_str().to_string())];
        if let Some(phi) = phi {
            fields.push(("phi".to_string(), format!("{phi:.2}")));
        }
        observations.push(Observation {
            kind,
            subject: name.clone(),
            message,
            fields,
        });
    }
    observations
}

/// Polls the members every [`MEMBER_POLL_INTERVAL`], records what changed
/// (when this agent is the reporter) and samples throughput and latency
/// every [`SAMPLE_INTERVAL`]; both every [`IDLE_POLL_INTERVAL`] while the
/// agent neither reports nor has its dashboard looked at.
pub async fn poll_members(shared: Arc<Shared>) {
    let mut channels: BTreeMap<String, Channel> = BTreeMap::new();
    let mut previous: Option<ClusterSnapshot> = None;
    let mut ticker = tokio::time::interval(MEMBER_POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_poll: Option<Instant> = None;
    let mut last_sample: Option<Instant> = None;
    let mut polls: u32 = 0;
    loop {
        ticker.tick().await;
        let busy = shared.observed.busy();
        let (poll_interval, sample_interval) = if busy {
            (MEMBER_POLL_INTERVAL, SAMPLE_INTERVAL)
        } else {
            (IDLE_POLL_INTERVAL, IDLE_POLL_INTERVAL)
        };
        // A tick comes a little early or late; half an interval of slack.
        let due = |last: Option<Instant>, interval: Duration| {
            last.is_none_or(|last| last.elapsed() + MEMBER_POLL_INTERVAL / 2 >= interval)
        };
        if !due(last_poll, poll_interval) {
            continue;
        }
        last_poll = Some(Instant::now());
        let snapshot = poll_once(&shared, &mut channels).await;
        polls = polls.saturating_add(1);
        if let Some(previous) = &previous {
            // The first polls open the connections: what fails then is this
            // agent starting, not a member going away.
            if polls > MEMBER_WARM_UP_POLLS && shared.observed.reporter.load(Ordering::Relaxed) {
                record_all(&shared, cluster_events(previous, &snapshot));
            }
        }
        *shared.observed.cluster.write().expect("cluster lock") = snapshot.clone();
        // A failed listing keeps the last known membership for the next diff;
        // a poll during an election (no leader) keeps the last known leader,
        // so the next leader.elected says whom it replaced.
        let last_leader = previous
            .as_ref()
            .and_then(|previous| previous.leader.clone());
        if snapshot.error.is_none() || previous.is_none() {
            previous = Some(snapshot.clone());
        } else if let Some(previous) = previous.as_mut() {
            previous.leader = snapshot.leader.clone();
            previous.term = snapshot.term;
        }
        if let (Some(previous), Some(leader)) = (previous.as_mut(), last_leader) {
            if previous.leader.is_none() {
                previous.leader = Some(leader);
            }
        }
        if due(last_sample, sample_interval) {
            last_sample = Some(Instant::now());
            sample(&shared, &snapshot).await;
        }
    }
}

async fn poll_once(shared: &Shared, channels: &mut BTreeMap<String, Channel>) -> ClusterSnapshot {
    let client = shared
        .client
        .with_request_timeout(MEMBER_STATUS_TIMEOUT * 2);
    let list = client.member_list(false).await;
    let alarms = client
        .alarm(AlarmRequest {
            action: AlarmAction::Get as i32,
            member_id: 0,
            alarm: AlarmType::None as i32,
        })
        .await
        .map(|response| response.alarms)
        .unwrap_or_default();
    let mut snapshot = ClusterSnapshot::default();
    let members = match list {
        Ok(response) => response.members,
        Err(error) => {
            snapshot.error = Some(error.to_string());
            // The listing needs a leader, so it fails during an election: ask
            // the members last listed (names kept), or else the configured
            // endpoints, so their status still shows.
            let known: Vec<keel_client::keel_types::etcdserverpb::Member> = shared
                .observed
                .cluster
                .read()
                .expect("cluster lock")
                .members
                .iter()
                .filter(|member| !member.name.is_empty())
                .map(|member| keel_client::keel_types::etcdserverpb::Member {
                    id: u64::from_str_radix(&member.id, 16).unwrap_or(0),
                    name: member.name.clone(),
                    peer_ur_ls: member.peer_urls.clone(),
                    client_ur_ls: member.client_urls.clone(),
                    is_learner: member.is_learner,
                })
                .collect();
            if !known.is_empty() {
                known
            } else {
                shared
                    .config
                    .endpoints
                    .iter()
                    .map(|endpoint| keel_client::keel_types::etcdserverpb::Member {
                        client_ur_ls: vec![keel_client::endpoint_url(endpoint)
                            .unwrap_or_else(|_| endpoint.clone())],
                        ..Default::default()
                    })
                    .collect()
            }
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (position, member) in members.into_iter().take(MEMBERS_MAX).enumerate() {
        let url = member.client_ur_ls.first().cloned().unwrap_or_default();
        let channel = match channels.get(&url) {
            Some(channel) => Some(channel.clone()),
            None => Endpoint::from_shared(url.clone()).ok().map(|endpoint| {
                let channel = endpoint
                    .connect_timeout(MEMBER_STATUS_TIMEOUT)
                    .timeout(MEMBER_STATUS_TIMEOUT)
                    .connect_lazy();
                channels.insert(url.clone(), channel.clone());
                channel
            }),
        };
        let http = shared.http.clone();
        let member_alarms: Vec<String> = alarms
            .iter()
            .filter(|alarm| alarm.member_id == member.id && member.id != 0)
            .map(|alarm| {
                AlarmType::try_from(alarm.alarm)
                    .map_or("UNKNOWN", |alarm| alarm.as_str_name())
                    .to_string()
            })
            .collect();
        tasks.spawn(async move {
            let mut view = MemberView {
                id: format!("{:x}", member.id),
                name: member.name.clone(),
                client_urls: member.client_ur_ls.clone(),
                peer_urls: member.peer_ur_ls.clone(),
                is_learner: member.is_learner,
                reachable: false,
                error: None,
                status: None,
                alarms: member_alarms,
                ready: None,
            };
            let Some(channel) = channel else {
                view.error = Some(format!("{url:?} is not a URL"));
                return (position, view);
            };
            let answer = tokio::time::timeout(
                MEMBER_STATUS_TIMEOUT,
                MaintenanceClient::new(channel).status(StatusRequest {}),
            )
            .await;
            match answer {
                Ok(Ok(response)) => {
                    let status = response.into_inner();
                    if member.id == 0 {
                        let id = status.header.as_ref().map_or(0, |header| header.member_id);
                        view.id = format!("{id:x}");
                    }
                    view.reachable = true;
                    view.status = Some(MemberStatus {
                        leader: if status.leader == 0 {
                            String::new()
                        } else {
                            format!("{:x}", status.leader)
                        },
                        term: status.raft_term,
                        commit_index: status.raft_index,
                        applied_index: status.raft_applied_index,
                        db_size_bytes: status.db_size,
                        db_size_in_use_bytes: status.db_size_in_use,
                        version: status.version,
                        errors: status.errors,
                    });
                    view.ready = http_get(&http, &url, "/readyz", 4096)
                        .await
                        .map(|(status, _)| status == 200)
                        .ok();
                }
                Ok(Err(status)) => view.error = Some(status.message().to_string()),
                Err(_) => view.error = Some(format!("no answer within {MEMBER_STATUS_TIMEOUT:?}")),
            }
            (position, view)
        });
    }
    let mut views: Vec<(usize, MemberView)> = tasks.join_all().await;
    views.sort_by_key(|(position, _)| *position);
    snapshot.members = views.into_iter().map(|(_, view)| view).collect();
    snapshot
        .members
        .sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
    snapshot.settle_leader();
    snapshot.time_unix_ms = events::now_unix_ms();
    snapshot
}

/// GETs `base_url` + `path`, reading at most `limit` bytes.
async fn http_get(
    http: &HttpClient,
    base_url: &str,
    path: &str,
    limit: usize,
) -> Result<(u16, Bytes), String> {
    let request = hyper::Request::get(format!("{}{path}", base_url.trim_end_matches('/')))
        .body(http_body_util::Full::new(Bytes::new()))
        .map_err(|error| error.to_string())?;
    let response = tokio::time::timeout(MEMBER_STATUS_TIMEOUT, http.request(request))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|error| error.to_string())?;
    let status = response.status().as_u16();
    let body = tokio::time::timeout(
        MEMBER_STATUS_TIMEOUT,
        Limited::new(response.into_body(), limit).collect(),
    )
    .await
    .map_err(|_| "timed out".to_string())?
    .map_err(|error| error.to_string())?
    .to_bytes();
    Ok((status, body))
}

/// One sampling round: every reachable member's `/metrics`, and a timed
/// linearizable read.
async fn sample(shared: &Shared, snapshot: &ClusterSnapshot) {
    let mut tasks = tokio::task::JoinSet::new();
    for member in snapshot.members.iter().filter(|member| member.reachable) {
        let Some(url) = member.client_urls.first().cloned() else {
            continue;
        };
        let (http, id) = (shared.http.clone(), member.id.clone());
        tasks.spawn(async move {
            let scrape: Option<Scrape> = http_get(&http, &url, "/metrics", EXPOSITION_BYTES_MAX)
                .await
                .ok()
                .filter(|(status, _)| *status == 200)
                .map(|(_, body)| parse_exposition(&String::from_utf8_lossy(&body)));
            (id, scrape)
        });
    }
    let read_started = Instant::now();
    let read = shared
        .client
        .with_request_timeout(Duration::from_secs(2))
        .get("/keel/dashboard/read-probe")
        .await;
    let read_latency = read.is_ok().then(|| read_started.elapsed().as_secs_f64());
    let scrapes: BTreeMap<String, Scrape> = tasks
        .join_all()
        .await
        .into_iter()
        .filter_map(|(id, scrape)| Some((id, scrape?)))
        .collect();
    let commit_index = snapshot
        .members
        .iter()
        .filter_map(|member| member.status.as_ref())
        .map(|status| status.commit_index)
        .max()
        .unwrap_or(0);
    let mut sampler = shared.observed.sampler.lock().expect("sampler lock");
    // Snapshots sent show as counters in the sender's metrics (members have
    // no events recorder of their own); the reporter turns increases into events.
    let mut observations = Vec::new();
    if shared.observed.reporter.load(Ordering::Relaxed) {
        for (id, scrape) in &scrapes {
            let sender = snapshot.members.iter().find(|member| member.id == *id);
            if let (Some(sender), Some(previous)) = (sender, sampler.previous_scrape(id)) {
                observations.extend(crate::members::snapshot_events(
                    sender,
                    previous,
                    scrape,
                    &snapshot.members,
                ));
            }
        }
    }
    sampler.record(events::now_unix_ms(), commit_index, scrapes, read_latency);
    drop(sampler);
    record_all(shared, observations);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn gossip_member(name: &str, status: GossipStatus, is_self: bool) -> GossipMember {
        GossipMember {
            node_name: name.into(),
            generation: 1,
            gossip_addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            http_addr: None,
            dns_addr: None,
            status,
            phi: None,
            usage: None,
            since_last_heartbeat: Duration::ZERO,
            is_self,
        }
    }

    #[test]
    fn the_smallest_alive_name_reports() {
        let members = vec![
            gossip_member("a", GossipStatus::Suspect, false),
            gossip_member("b", GossipStatus::Alive, true),
            gossip_member("c", GossipStatus::Alive, false),
        ];
        let none: [String; 0] = [];
        assert!(
            is_reporter("b", &members, &none),
            "a suspect node does not report"
        );
        assert!(!is_reporter("c", &members, &none));
        assert!(is_reporter("z", &[], &none), "alone, an agent reports");
        let registered = ["a".to_string(), "aa".to_string()];
        assert!(
            !is_reporter("b", &members, &registered),
            "a registered node gossip has not heard of yet may report"
        );
    }

    #[test]
    fn node_transitions_become_events_but_first_sightings_of_down_nodes_do_not() {
        let previous = BTreeMap::from([
            ("n1".to_string(), (NodeStatus::Alive, Some(0.5))),
            ("n2".to_string(), (NodeStatus::Suspect, Some(9.0))),
            ("n3".to_string(), (NodeStatus::Alive, None)),
        ]);
        let current = BTreeMap::from([
            ("n1".to_string(), (NodeStatus::Suspect, Some(12.0))),
            ("n2".to_string(), (NodeStatus::Alive, Some(0.4))),
            ("n3".to_string(), (NodeStatus::Down, None)),
            ("n4".to_string(), (NodeStatus::Down, None)),
            ("n5".to_string(), (NodeStatus::Alive, None)),
        ]);
        let events = node_events(&previous, &current);
        let summary: Vec<(events::EventType, &str)> = events
            .iter()
            .map(|event| (event.kind, event.subject.as_str()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (events::EventType::NodeSuspect, "n1"),
                (events::EventType::NodeAlive, "n2"),
                (events::EventType::NodeAlive, "n5"),
            ]
        );
        assert!(events[0].message.contains("phi 12.0"));
    }
}
