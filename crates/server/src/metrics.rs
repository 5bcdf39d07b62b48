//! A member's Prometheus metrics, with etcd's names and meanings so that the
//! dashboards and alerts operators already keep for etcd work on keel unchanged.
//!
//! One [`MemberMetrics`] per member (one registry, no globals), shared by the
//! member loop, the peer transport, the gRPC layer and the disk. Everything on
//! a request's path is an atomic add on a handle resolved once beforehand: no
//! lock, no allocation, no label lookup per request. The member loop publishes
//! its figures (leader, term, commit and applied index, key space size) as
//! gauges once per batch, rather than counting per entry. Histograms take an
//! uncontended lock per observation, so they are used only where observations
//! are per batch or per heartbeat (fsync, backend commit, round trip), never
//! per request.
//!
//! Naming: etcd's counters end in `_total` once; prometheus-client appends the
//! suffix to counters itself, so they are registered without it. A few of
//! etcd's *gauges* are named `…_total` (`etcd_server_proposals_committed_total`
//! is the commit index) and are registered with the suffix, as etcd does.
//! What etcd has no name for is `keel_*`. The exposition is OpenMetrics text
//! ([`CONTENT_TYPE`]), which Prometheus 2.x negotiates and parses.

pub mod disk;
pub mod grpc;
pub mod process;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The content type of [`MemberMetrics::encode`]'s output, as Prometheus asks
/// for it in its scrape `Accept` header.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// etcd's threshold for a slow apply (`warnApplyDuration`): a Ready batch
/// whose apply takes longer counts in `etcd_server_slow_apply_total`.
pub const SLOW_APPLY_THRESHOLD: Duration = Duration::from_millis(100);

// etcd's per-peer label names are capitalised (`To`, `From`); the derive
// takes field names as they are, so these structs spell them that way.
#[allow(non_snake_case)]
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ToLabel {
    To: String,
}

#[allow(non_snake_case)]
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FromLabel {
    From: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    server_version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerIdLabel {
    server_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlarmLabels {
    server_id: String,
    alarm_type: String,
}

/// What one peer connection touches, resolved once per peer so that sending
/// and receiving cost atomic adds only.
#[derive(Debug)]
pub struct PeerMetrics {
    /// `etcd_network_peer_sent_bytes_total{To}`.
    pub sent_bytes: Counter,
    /// `etcd_network_peer_received_bytes_total{From}`.
    pub received_bytes: Counter,
    /// `etcd_network_peer_sent_failures_total{To}`: messages dropped because
    /// the peer's queue was full or its connection failed.
    pub sent_failures: Counter,
    /// `etcd_network_snapshot_send_success{To}`.
    pub snapshot_sends: Counter,
    /// `etcd_network_snapshot_receive_success{From}`.
    pub snapshot_receives: Counter,
    round_trip_time: Histogram,
    /// When the newest heartbeat to this peer was written, in nanoseconds
    /// since [`MemberMetrics`]' epoch; 0 when its response has been seen.
    heartbeat_sent_nanoseconds: AtomicU64,
    epoch: Instant,
}

impl PeerMetrics {
    /// Notes that a heartbeat to this peer was just written.
    pub fn heartbeat_sent(&self) {
        let nanoseconds = self.epoch.elapsed().as_nanos().max(1) as u64;
        self.heartbeat_sent_nanoseconds
            .store(nanoseconds, Ordering::Relaxed);
    }

    /// A heartbeat response from this peer arrived: observes the round trip
    /// since the newest heartbeat (etcd probes its peers on a separate stream;
    /// keel's leader times its heartbeats, which follow the same path as every
    /// Raft message, so only a leader reports round trips). A response to an
    /// older heartbeat than the newest is timed from the newest, which can
    /// only understate a round trip longer than a heartbeat interval.
    pub fn heartbeat_response_received(&self) {
        let sent = self.heartbeat_sent_nanoseconds.swap(0, Ordering::Relaxed);
        if sent == 0 {
            return;
        }
        let now = self.epoch.elapsed().as_nanos() as u64;
        self.round_trip_time
            .observe(now.saturating_sub(sent) as f64 / 1e9);
    }
}

/// A member's metrics; see the module documentation.
#[derive(Debug)]
pub struct MemberMetrics {
    registry: Registry,
    /// Known once the member has recovered its identity from its data.
    member_id: AtomicU64,
    server_id: Family<ServerIdLabel, Gauge>,
    epoch: Instant,
    /// `etcd_server_has_leader`.
    pub has_leader: Gauge,
    /// `etcd_server_is_leader`.
    pub is_leader: Gauge,
    /// `etcd_server_is_learner`.
    pub is_learner: Gauge,
    /// `etcd_server_leader_changes_seen_total`.
    pub leader_changes_seen: Counter,
    /// `etcd_server_proposals_committed_total` (a gauge: the commit index).
    pub proposals_committed: Gauge,
    /// `etcd_server_proposals_applied_total` (a gauge: the applied index).
    pub proposals_applied: Gauge,
    /// `etcd_server_proposals_pending`: this member's proposals not yet answered.
    pub proposals_pending: Gauge,
    /// `etcd_server_proposals_failed_total`.
    pub proposals_failed: Counter,
    /// `etcd_server_slow_apply_total`.
    pub slow_apply: Counter,
    /// `etcd_server_quota_backend_bytes`.
    pub quota_backend_bytes: Gauge,
    /// `etcd_disk_wal_fsync_duration_seconds`.
    pub wal_fsync_duration: Histogram,
    /// `etcd_disk_wal_write_bytes_total`.
    pub wal_write_bytes: Counter,
    /// `etcd_disk_backend_commit_duration_seconds`.
    pub backend_commit_duration: Histogram,
    /// `etcd_mvcc_db_total_size_in_bytes`.
    pub db_total_size: Gauge,
    /// `etcd_debugging_mvcc_keys_total` (a gauge: keys that exist now).
    pub keys_total: Gauge,
    /// `etcd_debugging_mvcc_current_revision`.
    pub current_revision: Gauge,
    /// `etcd_debugging_mvcc_compact_revision`.
    pub compact_revision: Gauge,
    /// `keel_raft_term`.
    pub raft_term: Gauge,
    /// `keel_member_batch_inputs`: inputs the member loop took in one batch
    /// (its group commit at work).
    pub batch_inputs: Histogram,
    /// `keel_member_ready_duration_seconds`: one Ready carried out, from
    /// taking it to advancing (apply, fsync, sends).
    pub ready_duration: Histogram,
    alarms: Family<AlarmLabels, Gauge>,
    sent_bytes: Family<ToLabel, Counter>,
    received_bytes: Family<FromLabel, Counter>,
    sent_failures: Family<ToLabel, Counter>,
    snapshot_sends: Family<ToLabel, Counter>,
    snapshot_receives: Family<FromLabel, Counter>,
    round_trip_time: Family<ToLabel, Histogram, fn() -> Histogram>,
    peers: RwLock<BTreeMap<u64, Arc<PeerMetrics>>>,
    /// The gRPC server's counters, for [`grpc::GrpcMetricsLayer`].
    pub grpc: Arc<grpc::GrpcMetrics>,
}

/// etcd's buckets for disk latencies: 1 ms to 8 s, doubling.
fn disk_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 14)
}

/// etcd's buckets for peer round trips: 100 µs to 3.3 s, doubling.
fn round_trip_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// A member id as etcd writes it in labels: lowercase hexadecimal.
pub fn member_label(id: u64) -> String {
    format!("{id:x}")
}

impl MemberMetrics {
    /// A member's metrics, registered and at their initial values. The
    /// disk is timed from the start, before the member knows its id: call
    /// [`MemberMetrics::identify`] once it does.
    pub fn new(server_version: &str) -> MemberMetrics {
        let mut registry = Registry::default();
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let has_leader = gauge(
            &mut registry,
            "etcd_server_has_leader",
            "Whether or not a leader exists. 1 is existence, 0 is not",
        );
        let is_leader = gauge(
            &mut registry,
            "etcd_server_is_leader",
            "Whether or not this member is a leader. 1 if is, 0 otherwise",
        );
        let is_learner = gauge(
            &mut registry,
            "etcd_server_is_learner",
            "Whether or not this member is a learner. 1 if is, 0 otherwise",
        );
        let leader_changes_seen = counter(
            &mut registry,
            "etcd_server_leader_changes_seen",
            "The number of leader changes seen",
        );
        let proposals_committed = gauge(
            &mut registry,
            "etcd_server_proposals_committed_total",
            "The total number of consensus proposals committed",
        );
        let proposals_applied = gauge(
            &mut registry,
            "etcd_server_proposals_applied_total",
            "The total number of consensus proposals applied",
        );
        let proposals_pending = gauge(
            &mut registry,
            "etcd_server_proposals_pending",
            "The current number of pending proposals to commit",
        );
        let proposals_failed = counter(
            &mut registry,
            "etcd_server_proposals_failed",
            "The total number of failed proposals seen",
        );
        let slow_apply = counter(
            &mut registry,
            "etcd_server_slow_apply",
            "The total number of slow apply requests (likely overloaded from slow disk)",
        );
        let quota_backend_bytes = gauge(
            &mut registry,
            "etcd_server_quota_backend_bytes",
            "Current backend storage quota size in bytes",
        );
        let version = Family::<VersionLabel, Gauge>::default();
        version
            .get_or_create(&VersionLabel {
                server_version: server_version.to_string(),
            })
            .set(1);
        registry.register(
            "etcd_server_version",
            "Which version is running. 1 for 'server_version' label with current version",
            version,
        );
        let server_id = Family::<ServerIdLabel, Gauge>::default();
        registry.register(
            "etcd_server_id",
            "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID",
            server_id.clone(),
        );
        let alarms = Family::<AlarmLabels, Gauge>::default();
        registry.register(
            "etcd_debugging_server_alarms",
            "Alarms for every member in cluster. 1 for 'server_id' label with current ID. \
             2 for 'alarm_type' label with type of this alarm",
            alarms.clone(),
        );

        let wal_fsync_duration = Histogram::new(disk_buckets());
        registry.register(
            "etcd_disk_wal_fsync_duration_seconds",
            "The latency distributions of fsync called by WAL",
            wal_fsync_duration.clone(),
        );
        let wal_write_bytes = counter(
            &mut registry,
            "etcd_disk_wal_write_bytes",
            "Total number of bytes written in WAL",
        );
        let backend_commit_duration = Histogram::new(disk_buckets());
        registry.register(
            "etcd_disk_backend_commit_duration_seconds",
            "The latency distributions of commit called by backend (keel: writing a \
             snapshot of the key space durably)",
            backend_commit_duration.clone(),
        );

        let db_total_size = gauge(
            &mut registry,
            "etcd_mvcc_db_total_size_in_bytes",
            "Total size of the underlying database physically allocated in bytes",
        );
        let keys_total = gauge(
            &mut registry,
            "etcd_debugging_mvcc_keys_total",
            "Total number of keys",
        );
        let current_revision = gauge(
            &mut registry,
            "etcd_debugging_mvcc_current_revision",
            "The current revision of store",
        );
        let compact_revision = gauge(
            &mut registry,
            "etcd_debugging_mvcc_compact_revision",
            "The revision of the last compaction in store",
        );

        let sent_bytes = Family::<ToLabel, Counter>::default();
        registry.register(
            "etcd_network_peer_sent_bytes",
            "The total number of bytes sent to peers",
            sent_bytes.clone(),
        );
        let received_bytes = Family::<FromLabel, Counter>::default();
        registry.register(
            "etcd_network_peer_received_bytes",
            "The total number of bytes received from peers",
            received_bytes.clone(),
        );
        let sent_failures = Family::<ToLabel, Counter>::default();
        registry.register(
            "etcd_network_peer_sent_failures",
            "The total number of send failures from peers",
            sent_failures.clone(),
        );
        let snapshot_sends = Family::<ToLabel, Counter>::default();
        registry.register(
            "etcd_network_snapshot_send_success",
            "Total number of successful snapshot sends",
            snapshot_sends.clone(),
        );
        let snapshot_receives = Family::<FromLabel, Counter>::default();
        registry.register(
            "etcd_network_snapshot_receive_success",
            "Total number of successful snapshot receives",
            snapshot_receives.clone(),
        );
        let round_trip_time = Family::<ToLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            round_trip_histogram,
        );
        registry.register(
            "etcd_network_peer_round_trip_time_seconds",
            "Round-Trip-Time histogram between peers (keel: leader heartbeat to response)",
            round_trip_time.clone(),
        );

        let raft_term = gauge(
            &mut registry,
            "keel_raft_term",
            "The Raft term this member is in",
        );
        let batch_inputs = Histogram::new(exponential_buckets(1.0, 4.0, 8));
        registry.register(
            "keel_member_batch_inputs",
            "Inputs (client requests and peer messages) the member loop took in one batch",
            batch_inputs.clone(),
        );
        let ready_duration = Histogram::new(disk_buckets());
        registry.register(
            "keel_member_ready_duration_seconds",
            "Time to carry out one Ready: apply, persist with its fsync, send",
            ready_duration.clone(),
        );

        let grpc = Arc::new(grpc::GrpcMetrics::new(&mut registry));
        registry.register_collector(Box::new(process::ProcessCollector::new()));

        MemberMetrics {
            registry,
            member_id: AtomicU64::new(0),
            server_id,
            epoch: Instant::now(),
            has_leader,
            is_leader,
            is_learner,
            leader_changes_seen,
            proposals_committed,
            proposals_applied,
            proposals_pending,
            proposals_failed,
            slow_apply,
            quota_backend_bytes,
            wal_fsync_duration,
            wal_write_bytes,
            backend_commit_duration,
            db_total_size,
            keys_total,
            current_revision,
            compact_revision,
            raft_term,
            batch_inputs,
            ready_duration,
            alarms,
            sent_bytes,
            received_bytes,
            sent_failures,
            snapshot_sends,
            snapshot_receives,
            round_trip_time,
            peers: RwLock::default(),
            grpc,
        }
    }

    /// Records which member these metrics describe.
    pub fn identify(&self, member_id: u64) {
        self.member_id.store(member_id, Ordering::Relaxed);
        self.server_id.clear();
        self.server_id
            .get_or_create(&ServerIdLabel {
                server_id: member_label(member_id),
            })
            .set(1);
    }

    /// The member these metrics describe (0 before [`MemberMetrics::identify`]).
    pub fn member_id(&self) -> u64 {
        self.member_id.load(Ordering::Relaxed)
    }

    /// The handles of one peer's metrics, created on first use. Called when a
    /// connection is set up, never per message.
    pub fn peer(&self, peer_id: u64) -> Arc<PeerMetrics> {
        if let Some(peer) = self.peers.read().expect("not poisoned").get(&peer_id) {
            return peer.clone();
        }
        let mut peers = self.peers.write().expect("not poisoned");
        peers
            .entry(peer_id)
            .or_insert_with(|| {
                let to = ToLabel {
                    To: member_label(peer_id),
                };
                let from = FromLabel {
                    From: member_label(peer_id),
                };
                Arc::new(PeerMetrics {
                    sent_bytes: self.sent_bytes.get_or_create_owned(&to),
                    received_bytes: self.received_bytes.get_or_create_owned(&from),
                    sent_failures: self.sent_failures.get_or_create_owned(&to),
                    snapshot_sends: self.snapshot_sends.get_or_create_owned(&to),
                    snapshot_receives: self.snapshot_receives.get_or_create_owned(&from),
                    round_trip_time: self.round_trip_time.get_or_create_owned(&to),
                    heartbeat_sent_nanoseconds: AtomicU64::new(0),
                    epoch: self.epoch,
                })
            })
            .clone()
    }

    /// Publishes the raised alarms (replicated: every member lists the same).
    /// Called by the member loop when the list changes.
    pub fn set_alarms(&self, alarms: &[keel_types::etcdserverpb::AlarmMember]) {
        self.alarms.clear();
        for alarm in alarms {
            let alarm_type = keel_types::etcdserverpb::AlarmType::try_from(alarm.alarm)
                .map_or_else(
                    |_| alarm.alarm.to_string(),
                    |kind| kind.as_str_name().into(),
                );
            self.alarms
                .get_or_create(&AlarmLabels {
                    server_id: member_label(alarm.member_id),
                    alarm_type,
                })
                .set(1);
        }
    }

    /// The exposition of every metric, in OpenMetrics text ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(64 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_total_once_and_types_match_etcd() {
        let metrics = MemberMetrics::new("3.5.0");
        metrics.identify(0xabc);
        metrics.leader_changes_seen.inc();
        metrics.proposals_committed.set(7);
        metrics.wal_fsync_duration.observe(0.003);
        let peer = metrics.peer(0x12);
        peer.sent_bytes.inc_by(10);
        peer.heartbeat_sent();
        peer.heartbeat_response_received();
        let text = metrics.encode();
        for line in [
            "# TYPE etcd_server_leader_changes_seen counter",
            "etcd_server_leader_changes_seen_total 1",
            "# TYPE etcd_server_proposals_committed_total gauge",
            "etcd_server_proposals_committed_total 7",
            "etcd_server_version{server_version=\"3.5.0\"} 1",
            "etcd_server_id{server_id=\"abc\"} 1",
            "etcd_network_peer_sent_bytes_total{To=\"12\"} 10",
            "etcd_network_peer_round_trip_time_seconds_count{To=\"12\"} 1",
            "etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.004\"} 1",
            "etcd_disk_wal_fsync_duration_seconds_bucket{le=\"8.192\"} 1",
            "# EOF",
        ] {
            assert!(text.lines().any(|got| got == line), "{line:?} in\n{text}");
        }
        assert!(!text.contains("_total_total"), "{text}");
    }
}
