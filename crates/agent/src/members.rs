//! What an agent sees of the store's members: each member's Raft status
//! (leader, term, commit and applied index, database size), the membership
//! and the alarms, polled every [`MEMBER_POLL_INTERVAL`] over the members'
//! own gRPC API (Status is asked of every member directly, so a member that
//! does not answer shows as unreachable); and a bounded ring of throughput
//! and latency samples taken from the members' `/metrics`.
//!
//! The decisions are pure: [`cluster_events`] turns two successive
//! snapshots into the events worth recording (a leader elected, a member
//! added, removed, unreachable or reachable again, an alarm raised or
//! cleared), and [`Sampler`] turns successive scrapes into rates.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use serde::Serialize;

use crate::events::EventType;

/// How often the members are polled.
pub const MEMBER_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long one member gets to answer its Status.
pub const MEMBER_STATUS_TIMEOUT: Duration = Duration::from_millis(900);
/// How often throughput and latency are sampled from the members' metrics.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);
/// How often an agent that neither records cluster-level events nor had its
/// dashboard open within [`DASHBOARD_VIEW_WINDOW`] polls and samples: every
/// agent polling every member each second would cost the members three
/// times what one reporter costs them.
pub const IDLE_POLL_INTERVAL: Duration = Duration::from_secs(10);
/// How long after its dashboard was last loaded or polled an agent keeps
/// polling at [`MEMBER_POLL_INTERVAL`].
pub const DASHBOARD_VIEW_WINDOW: Duration = Duration::from_secs(60);
/// Samples kept: ten minutes at [`SAMPLE_INTERVAL`] (more when idle).
pub const SAMPLES_MAX: usize = 300;
/// Largest `/metrics` exposition read from a member.
pub const EXPOSITION_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Members polled at most (etcd recommends at most 7; a bound all the same).
pub const MEMBERS_MAX: usize = 64;

/// One member as last polled.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemberView {
    /// etcd's member id, in hexadecimal as etcd prints it.
    pub id: String,
    pub name: String,
    pub client_urls: Vec<String>,
    pub peer_urls: Vec<String>,
    pub is_learner: bool,
    /// Whether it answered its Status.
    pub reachable: bool,
    /// Why it did not answer.
    pub error: Option<String>,
    /// Its own Status, when it answered.
    pub status: Option<MemberStatus>,
    /// Its alarms (NOSPACE, CORRUPT).
    pub alarms: Vec<String>,
    /// `/readyz` answered 200 (ready: a leader, no alarm, caught up).
    pub ready: Option<bool>,
}

/// A member's answer to Status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberStatus {
    /// The leader it knows, in hexadecimal (empty: none).
    pub leader: String,
    pub term: u64,
    /// Its commit index (etcd's `raft_index`).
    pub commit_index: u64,
    pub applied_index: u64,
    pub db_size_bytes: i64,
    pub db_size_in_use_bytes: i64,
    pub version: String,
    pub errors: Vec<String>,
}

/// The members as one poll saw them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ClusterSnapshot {
    /// When the poll ended, in Unix milliseconds.
    pub time_unix_ms: u64,
    pub members: Vec<MemberView>,
    /// The leader according to the member with the newest term, in hex.
    pub leader: Option<String>,
    /// That member's term.
    pub term: u64,
    /// Why the membership could not be listed, if it could not.
    pub error: Option<String>,
}

impl ClusterSnapshot {
    /// Picks the leader and term from the members that answered: the
    /// newest term wins (an old leader cut off may still think it leads).
    pub fn settle_leader(&mut self) {
        let newest = self
            .members
            .iter()
            .filter_map(|member| member.status.as_ref())
            .max_by_key(|status| status.term);
        self.term = newest.map_or(0, |status| status.term);
        self.leader = newest
            .filter(|status| !status.leader.is_empty() && status.leader != "0")
            .map(|status| status.leader.clone());
    }

    fn member_name(&self, id: &str) -> String {
        self.members
            .iter()
            .find(|member| member.id == id)
            .map(|member| member.name.clone())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| id.to_string())
    }
}

/// An event an observation calls for: type, subject, message, fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub kind: EventType,
    pub subject: String,
    pub message: String,
    pub fields: Vec<(String, String)>,
}

impl Observation {
    fn new(kind: EventType, subject: String, message: String) -> Observation {
        Observation {
            kind,
            subject,
            message,
            fields: Vec::new(),
        }
    }

    fn field(mut self, name: &str, value: impl ToString) -> Observation {
        self.fields.push((name.to_string(), value.to_string()));
        self
    }
}

/// The events between two successive snapshots. A snapshot whose member
/// list failed says nothing about membership, so membership changes are
/// judged only between two listed snapshots.
pub fn cluster_events(previous: &ClusterSnapshot, current: &ClusterSnapshot) -> Vec<Observation> {
    let mut observations = Vec::new();
    if let Some(leader) = &current.leader {
        if previous.leader.as_ref() != Some(leader) || previous.term != current.term {
            let name = current.member_name(leader);
            let mut message = format!("{name} is the leader at term {}", current.term);
            if let Some(old) = &previous.leader {
                if old != leader {
                    message.push_str(&format!(" (was {})", previous.member_name(old)));
                }
            }
            observations.push(
                Observation::new(EventType::LeaderElected, name, message)
                    .field("member_id", leader)
                    .field("term", current.term),
            );
        }
    }
    let listed = previous.error.is_none() && current.error.is_none();
    let before: BTreeMap<&str, &MemberView> = previous
        .members
        .iter()
        .map(|member| (member.id.as_str(), member))
        .collect();
    let after: BTreeMap<&str, &MemberView> = current
        .members
        .iter()
        .map(|member| (member.id.as_str(), member))
        .collect();
    if listed {
        for (id, member) in &after {
            if !before.contains_key(id) {
                let learner = if member.is_learner {
                    " as a learner"
                } else {
                    ""
                };
                observations.push(
                    Observation::new(
                        EventType::MemberAdded,
                        current.member_name(id),
                        format!("member {} ({id}) joined{learner}", current.member_name(id)),
                    )
                    .field("member_id", id),
                );
            }
        }
        for id in before.keys() {
            if !after.contains_key(id) {
                observations.push(
                    Observation::new(
                        EventType::MemberRemoved,
                        previous.member_name(id),
                        format!(
                            "member {} ({id}) left the cluster",
                            previous.member_name(id)
                        ),
                    )
                    .field("member_id", id),
                );
            }
        }
    }
    for (id, member) in &after {
        let Some(old) = before.get(id) else { continue };
        let name = current.member_name(id);
        if old.reachable && !member.reachable {
            let reason = member.error.clone().unwrap_or_default();
            observations.push(
                Observation::new(
                    EventType::MemberUnreachable,
                    name.clone(),
                    format!("member {name} does not answer: {reason}"),
                )
                .field("member_id", id),
            );
        } else if !old.reachable && member.reachable {
            observations.push(
                Observation::new(
                    EventType::MemberReachable,
                    name.clone(),
                    format!("member {name} answers again"),
                )
                .field("member_id", id),
            );
        }
    }
    // Alarms come from one AlarmList for the whole cluster; a member that
    // left takes its alarms with it, which is not a clearing.
    let alarms = |snapshot: &ClusterSnapshot| -> BTreeSet<(String, String)> {
        snapshot
            .members
            .iter()
            .flat_map(|member| {
                member
                    .alarms
                    .iter()
                    .map(|alarm| (member.id.clone(), alarm.clone()))
            })
            .collect()
    };
    let (alarms_before, alarms_after) = (alarms(previous), alarms(current));
    if listed {
        for (id, alarm) in alarms_after.difference(&alarms_before) {
            let name = current.member_name(id);
            observations.push(
                Observation::new(
                    EventType::AlarmRaised,
                    name.clone(),
                    format!("{alarm} alarm raised on member {name}"),
                )
                .field("member_id", id)
                .field("alarm", alarm),
            );
        }
        for (id, alarm) in alarms_before.difference(&alarms_after) {
            if !after.contains_key(id.as_str()) {
                continue;
            }
            let name = current.member_name(id);
            observations.push(
                Observation::new(
                    EventType::AlarmCleared,
                    name.clone(),
                    format!("{alarm} alarm cleared on member {name}"),
                )
                .field("member_id", id)
                .field("alarm", alarm),
            );
        }
    }
    observations
}

/// The figures of one member's `/metrics` that samples are made of.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    /// `grpc_server_handled_total`, every method and code.
    pub requests_handled: f64,
    /// `etcd_disk_wal_fsync_duration_seconds`: cumulative buckets by bound.
    pub fsync_buckets: Vec<(f64, f64)>,
    pub fsync_sum: f64,
    pub fsync_count: f64,
    /// `etcd_network_snapshot_send_success` by receiving member (its `To`
    /// label, the member id in hex): snapshots this member sent.
    pub snapshots_sent: BTreeMap<String, u64>,
}

/// The `snapshot.sent` events between two scrapes of one member: one per
/// receiving member whose count went up (a member restarted from zero
/// reports nothing until it sends again).
pub fn snapshot_events(
    sender: &MemberView,
    previous: &Scrape,
    current: &Scrape,
    members: &[MemberView],
) -> Vec<Observation> {
    current
        .snapshots_sent
        .iter()
        .filter(|(to, count)| {
            previous
                .snapshots_sent
                .get(*to)
                .is_some_and(|before| *count > before)
        })
        .map(|(to, _)| {
            let receiver = members
                .iter()
                .find(|member| member.id == *to)
                .map(|member| member.name.clone())
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| to.clone());
            Observation::new(
                EventType::SnapshotSent,
                receiver.clone(),
                format!(
                    "{} sent a snapshot to {receiver}, which had fallen behind the log",
                    sender.name
                ),
            )
            .field("from", &sender.id)
            .field("to", to)
        })
        .collect()
}

/// Reads the figures of [`Scrape`] from a Prometheus/OpenMetrics text
/// exposition (one sample per line: name, optional labels, value). Only the
/// few series named here are read, so this is a line filter rather than a
/// general parser.
pub fn parse_exposition(text: &str) -> Scrape {
    let mut scrape = Scrape::default();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, rest)) = split_series(line) else {
            continue;
        };
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        match name {
            "grpc_server_handled_total" => scrape.requests_handled += value,
            "etcd_network_snapshot_send_success" | "etcd_network_snapshot_send_success_total" => {
                if let Some(to) = labels
                    .split(',')
                    .find_map(|label| label.strip_prefix("To="))
                    .map(|to| to.trim_matches('"'))
                {
                    scrape.snapshots_sent.insert(to.to_string(), value as u64);
                }
            }
            "etcd_disk_wal_fsync_duration_seconds_sum" => scrape.fsync_sum += value,
            "etcd_disk_wal_fsync_duration_seconds_count" => scrape.fsync_count += value,
            "etcd_disk_wal_fsync_duration_seconds_bucket" => {
                let bound = labels
                    .split(',')
                    .find_map(|label| label.strip_prefix("le="))
                    .map(|bound| bound.trim_matches('"'))
                    .and_then(|bound| {
                        if bound == "+Inf" {
                            Some(f64::INFINITY)
                        } else {
                            bound.parse().ok()
                        }
                    });
                if let Some(bound) = bound {
                    scrape.fsync_buckets.push((bound, value));
                }
            }
            _ => {}
        }
    }
    scrape
}

/// Splits a sample line into its series (name and labels) and the rest,
/// minding spaces inside quoted label values.
fn split_series(line: &str) -> Option<(&str, &str)> {
    match line.find('{') {
        Some(open) if line[..open].find(' ').is_none() => {
            let close = line[open..].find('}')? + open;
            Some((&line[..=close], line[close + 1..].trim_start()))
        }
        _ => line.split_once(' '),
    }
}

/// One point of the throughput and latency charts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    pub time_unix_ms: u64,
    /// Raft entries committed per second (the leader's commit index).
    pub commits_per_second: f64,
    /// gRPC requests handled per second, summed over the members.
    pub requests_per_second: f64,
    /// WAL fsync latency over the interval, every member's fsyncs together.
    pub fsync_p99_seconds: Option<f64>,
    pub fsync_mean_seconds: Option<f64>,
    /// A linearizable read from this agent, timed.
    pub read_latency_seconds: Option<f64>,
}

/// Turns successive scrapes into rates; keeps the newest [`SAMPLES_MAX`].
#[derive(Debug, Default)]
pub struct Sampler {
    previous: Option<(u64, u64, BTreeMap<String, Scrape>)>,
    samples: VecDeque<Sample>,
}

impl Sampler {
    /// The member's scrape of the last sampling round, if it answered then.
    pub fn previous_scrape(&self, id: &str) -> Option<&Scrape> {
        self.previous.as_ref()?.2.get(id)
    }

    /// Takes the figures of one sampling round: the time, the highest
    /// commit index seen, each reachable member's scrape by id, and the
    /// timed read. A member's counters that went down (it restarted) count
    /// as zero for that interval.
    pub fn record(
        &mut self,
        time_unix_ms: u64,
        commit_index: u64,
        scrapes: BTreeMap<String, Scrape>,
        read_latency_seconds: Option<f64>,
    ) {
        if let Some((previous_time, previous_commit, previous_scrapes)) = &self.previous {
            let seconds = time_unix_ms.saturating_sub(*previous_time) as f64 / 1000.0;
            if seconds > 0.0 {
                let mut requests = 0.0;
                let mut fsync_sum = 0.0;
                let mut fsync_count = 0.0;
                let mut buckets: BTreeMap<u64, f64> = BTreeMap::new();
                for (id, scrape) in &scrapes {
                    let Some(before) = previous_scrapes.get(id) else {
                        continue;
                    };
                    requests += (scrape.requests_handled - before.requests_handled).max(0.0);
                    if scrape.fsync_count >= before.fsync_count {
                        fsync_sum += scrape.fsync_sum - before.fsync_sum;
                        fsync_count += scrape.fsync_count - before.fsync_count;
                        for ((bound, count), (_, count_before)) in
                            scrape.fsync_buckets.iter().zip(&before.fsync_buckets)
                        {
                            *buckets.entry(bound.to_bits()).or_default() +=
                                (count - count_before).max(0.0);
                        }
                    }
                }
                let mut bounds: Vec<(f64, f64)> = buckets
                    .into_iter()
                    .map(|(bits, count)| (f64::from_bits(bits), count))
                    .collect();
                bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
                let sample = Sample {
                    time_unix_ms,
                    commits_per_second: commit_index.saturating_sub(*previous_commit) as f64
                        / seconds,
                    requests_per_second: requests / seconds,
                    fsync_p99_seconds: quantile(&bounds, 0.99),
                    fsync_mean_seconds: (fsync_count > 0.0).then(|| fsync_sum / fsync_count),
                    read_latency_seconds,
                };
                self.samples.push_back(sample);
                while self.samples.len() > SAMPLES_MAX {
                    self.samples.pop_front();
                }
            }
        }
        let commit = match &self.previous {
            // A commit index never goes back; a poll that reached no member
            // keeps the last one.
            Some((_, previous_commit, _)) if commit_index == 0 => *previous_commit,
            _ => commit_index,
        };
        self.previous = Some((time_unix_ms, commit, scrapes));
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.iter().cloned().collect()
    }
}

/// The `q` quantile of cumulative `(upper bound, count)` buckets, the way
/// Prometheus' `histogram_quantile` interpolates; `None` without
/// observations.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower_bound = 0.0;
    let mut lower_count = 0.0;
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower_bound);
            }
            let width = count - lower_count;
            let fraction = if width > 0.0 {
                (rank - lower_count) / width
            } else {
                1.0
            };
            return Some(lower_bound + (bound - lower_bound) * fraction);
        }
        lower_bound = bound;
        lower_count = count;
    }
    Some(lower_bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_counter_that_grows_is_one_event_naming_the_receiver() {
        let exposition = |count: u64| {
            format!(
                "# TYPE etcd_network_snapshot_send_success counter\n\
                 etcd_network_snapshot_send_success_total{{To=\"b2\"}} {count}\n\
                 etcd_network_snapshot_send_success_total{{To=\"c3\"}} 1\n"
            )
        };
        let before = parse_exposition(&exposition(1));
        let after = parse_exposition(&exposition(2));
        assert_eq!(after.snapshots_sent.get("b2"), Some(&2));
        let members = vec![
            member("a1", "m1", true, "a1", 2),
            member("b2", "m2", true, "a1", 2),
            member("c3", "m3", true, "a1", 2),
        ];
        let events = snapshot_events(&members[0], &before, &after, &members);
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].kind, EventType::SnapshotSent);
        assert_eq!(events[0].subject, "m2");
        assert!(events[0].message.starts_with("m1 sent a snapshot to m2"));
        assert!(snapshot_events(&members[0], &after, &after, &members).is_empty());
    }

    fn member(id: &str, name: &str, reachable: bool, leader: &str, term: u64) -> MemberView {
        MemberView {
            id: id.into(),
            name: name.into(),
            client_urls: vec![],
            peer_urls: vec![],
            is_learner: false,
            reachable,
            error: (!reachable).then(|| "connection refused".to_string()),
            status: reachable.then(|| MemberStatus {
                leader: leader.into(),
                term,
                commit_index: 10,
                applied_index: 10,
                db_size_bytes: 1,
                db_size_in_use_bytes: 1,
                version: "3.5.0".into(),
                errors: vec![],
            }),
            alarms: vec![],
            ready: Some(reachable),
        }
    }

    fn snapshot(members: Vec<MemberView>) -> ClusterSnapshot {
        let mut snapshot = ClusterSnapshot {
            members,
            ..ClusterSnapshot::default()
        };
        snapshot.settle_leader();
        snapshot
    }

    #[test]
    fn a_killed_leader_gives_unreachable_then_a_new_leader_with_its_term() {
        let before = snapshot(vec![
            member("a", "m1", true, "a", 2),
            member("b", "m2", true, "a", 2),
            member("c", "m3", true, "a", 2),
        ]);
        assert_eq!(before.leader.as_deref(), Some("a"));
        assert!(cluster_events(&before, &before).is_empty());
        let after = snapshot(vec![
            member("a", "m1", false, "", 0),
            member("b", "m2", true, "c", 3),
            member("c", "m3", true, "c", 3),
        ]);
        let events = cluster_events(&before, &after);
        let kinds: Vec<EventType> = events.iter().map(|event| event.kind).collect();
        assert_eq!(
            kinds,
            vec![EventType::LeaderElected, EventType::MemberUnreachable]
        );
        assert_eq!(events[0].subject, "m3");
        assert!(events[0].message.contains("term 3") && events[0].message.contains("was m1"));
        assert!(events[0]
            .fields
            .contains(&("term".to_string(), "3".to_string())));
        assert_eq!(events[1].subject, "m1");
    }

    #[test]
    fn membership_and_alarms_are_judged_only_between_listed_snapshots() {
        let before = snapshot(vec![member("a", "m1", true, "a", 2)]);
        let mut after = snapshot(vec![
            member("a", "m1", true, "a", 2),
            member("d", "m4", true, "a", 2),
        ]);
        after.members[0].alarms.push("NOSPACE".into());
        let kinds: Vec<EventType> = cluster_events(&before, &after)
            .iter()
            .map(|event| event.kind)
            .collect();
        assert_eq!(kinds, vec![EventType::MemberAdded, EventType::AlarmRaised]);
        let mut unlisted = after.clone();
        unlisted.error = Some("no member answered".into());
        unlisted.members.clear();
        assert!(cluster_events(&after, &unlisted).is_empty());
        let kinds: Vec<EventType> = cluster_events(&after, &before)
            .iter()
            .map(|event| event.kind)
            .collect();
        assert_eq!(
            kinds,
            vec![EventType::MemberRemoved, EventType::AlarmCleared]
        );
    }

    #[test]
    fn expositions_give_requests_and_fsync_quantiles() {
        let text = "# TYPE grpc_server_handled counter\n\
            grpc_server_handled_total{grpc_type=\"unary\",grpc_method=\"Put\",grpc_code=\"OK\"} 10\n\
            grpc_server_handled_total{grpc_type=\"unary\",grpc_method=\"Range\",grpc_code=\"OK\"} 5\n\
            etcd_disk_wal_fsync_duration_seconds_sum 0.5\n\
            etcd_disk_wal_fsync_duration_seconds_count 100\n\
            etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.001\"} 50\n\
            etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.002\"} 100\n\
            etcd_disk_wal_fsync_duration_seconds_bucket{le=\"+Inf\"} 100\n# EOF\n";
        let scrape = parse_exposition(text);
        assert_eq!(scrape.requests_handled, 15.0);
        assert_eq!(scrape.fsync_buckets.len(), 3);
        let p99 = quantile(&scrape.fsync_buckets, 0.99).unwrap();
        assert!((p99 - 0.00198).abs() < 1e-9, "{p99}");

        let mut sampler = Sampler::default();
        let mut later = scrape.clone();
        later.requests_handled += 40.0;
        later.fsync_count += 10.0;
        later.fsync_sum += 0.1;
        for bucket in &mut later.fsync_buckets {
            bucket.1 += 10.0;
        }
        sampler.record(1_000, 100, BTreeMap::from([("a".into(), scrape)]), None);
        sampler.record(
            3_000,
            120,
            BTreeMap::from([("a".into(), later)]),
            Some(0.002),
        );
        let samples = sampler.samples();
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].requests_per_second, 20.0);
        assert_eq!(samples[0].commits_per_second, 10.0);
        assert!((samples[0].fsync_mean_seconds.unwrap() - 0.01).abs() < 1e-9);
        assert!(samples[0].fsync_p99_seconds.unwrap() <= 0.001);
    }
}
