//! The events log: what happened in the cluster, in words a person reads
//! (a leader change, a node going down, a check turning critical, an
//! allocation placed, restarted or moved, a fault injected). Every event is
//! one JSON record under `/keel/events/<id>`, where the id starts with the
//! wall-clock time in milliseconds, zero-padded, so the keys sort by time and
//! one range read gives the timeline.
//!
//! Whoever sees something happen records it through an [`EventRecorder`]:
//! recording never blocks and never fails the caller (a coordination system
//! must not stop placing work because its diary is full). The recorder's
//! task writes the queue to the store, retrying while the store is away, and
//! keeps the log bounded: events older than [`EVENT_RETENTION`] or beyond the
//! newest [`EVENTS_RETAINED_MAX`] are deleted by range, so the store never
//! grows because of the log. Several recorders trimming at once is harmless:
//! deleting a range twice deletes nothing the second time.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_client::keel_types::etcdserverpb::{DeleteRangeRequest, RangeRequest};
use keel_client::{Client, ClientError};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Where the events live in the store.
pub const PREFIX: &str = "/keel/events/";
/// Events kept, at most (the newest win).
pub const EVENTS_RETAINED_MAX: u64 = 10_000;
/// Events older than this are deleted.
pub const EVENT_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);
/// Events waiting in one recorder's queue; more are dropped (and counted).
pub const RECORDER_QUEUE_MAX: usize = 1024;
/// Longest message kept; a longer one is cut at a character boundary.
pub const MESSAGE_BYTES_MAX: usize = 1024;
/// Fields kept per event.
pub const FIELDS_MAX: usize = 16;
/// How often a recorder trims the log to its bounds.
const TRIM_INTERVAL: Duration = Duration::from_secs(60);
/// Longest pause between two attempts at an unreachable store.
const STORE_RETRY_MAX: Duration = Duration::from_secs(2);

/// What kind of thing happened. The names are the `--type` values of
/// `keel events` and the `type` field of the JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EventType {
    /// A member became the Raft leader (the first, or a new one).
    #[serde(rename = "leader.elected")]
    LeaderElected,
    /// A member joined the cluster.
    #[serde(rename = "member.added")]
    MemberAdded,
    /// A member left the cluster.
    #[serde(rename = "member.removed")]
    MemberRemoved,
    /// A member stopped answering.
    #[serde(rename = "member.unreachable")]
    MemberUnreachable,
    /// A member answers again.
    #[serde(rename = "member.reachable")]
    MemberReachable,
    /// An alarm (NOSPACE, CORRUPT) was raised.
    #[serde(rename = "alarm.raised")]
    AlarmRaised,
    /// An alarm was cleared.
    #[serde(rename = "alarm.cleared")]
    AlarmCleared,
    /// A leader sent a snapshot to a member that fell behind.
    #[serde(rename = "snapshot.sent")]
    SnapshotSent,
    /// Gossip suspects a node (phi over the threshold); nothing moves yet.
    #[serde(rename = "node.suspect")]
    NodeSuspect,
    /// A node's lease expired: it is down.
    #[serde(rename = "node.down")]
    NodeDown,
    /// A node is alive (registered, or no longer suspect).
    #[serde(rename = "node.alive")]
    NodeAlive,
    /// A node was drained, or its eligibility changed.
    #[serde(rename = "node.drain")]
    NodeDrain,
    /// A health check changed status.
    #[serde(rename = "check.status")]
    CheckStatus,
    /// A job was registered, updated, scaled, reverted or stopped.
    #[serde(rename = "job.updated")]
    JobUpdated,
    /// The controller placed an allocation on a node.
    #[serde(rename = "allocation.placed")]
    AllocationPlaced,
    /// An allocation's tasks started.
    #[serde(rename = "allocation.started")]
    AllocationStarted,
    /// A task of an allocation was restarted on its node.
    #[serde(rename = "allocation.restarted")]
    AllocationRestarted,
    /// An allocation failed (its restart policy gave up).
    #[serde(rename = "allocation.failed")]
    AllocationFailed,
    /// An allocation was replaced on another node after failing.
    #[serde(rename = "allocation.rescheduled")]
    AllocationRescheduled,
    /// An allocation's node went down: it is lost and replaced.
    #[serde(rename = "allocation.lost")]
    AllocationLost,
    /// An allocation was stopped (job stopped, scaled down, replaced, drained).
    #[serde(rename = "allocation.stopped")]
    AllocationStopped,
    /// An agent took over the controller.
    #[serde(rename = "controller.elected")]
    ControllerElected,
    /// A fault was injected (`keel chaos`).
    #[serde(rename = "fault.injected")]
    FaultInjected,
    /// A fault was healed, or expired.
    #[serde(rename = "fault.healed")]
    FaultHealed,
}

impl EventType {
    /// Every type, in declaration order.
    pub const ALL: [EventType; 24] = [
        EventType::LeaderElected,
        EventType::MemberAdded,
        EventType::MemberRemoved,
        EventType::MemberUnreachable,
        EventType::MemberReachable,
        EventType::AlarmRaised,
        EventType::AlarmCleared,
        EventType::SnapshotSent,
        EventType::NodeSuspect,
        EventType::NodeDown,
        EventType::NodeAlive,
        EventType::NodeDrain,
        EventType::CheckStatus,
        EventType::JobUpdated,
        EventType::AllocationPlaced,
        EventType::AllocationStarted,
        EventType::AllocationRestarted,
        EventType::AllocationFailed,
        EventType::AllocationRescheduled,
        EventType::AllocationLost,
        EventType::AllocationStopped,
        EventType::ControllerElected,
        EventType::FaultInjected,
        EventType::FaultHealed,
    ];

    /// The type's name, as in the JSON (`node.down`).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::LeaderElected => "leader.elected",
            EventType::MemberAdded => "member.added",
            EventType::MemberRemoved => "member.removed",
            EventType::MemberUnreachable => "member.unreachable",
            EventType::MemberReachable => "member.reachable",
            EventType::AlarmRaised => "alarm.raised",
            EventType::AlarmCleared => "alarm.cleared",
            EventType::SnapshotSent => "snapshot.sent",
            EventType::NodeSuspect => "node.suspect",
            EventType::NodeDown => "node.down",
            EventType::NodeAlive => "node.alive",
            EventType::NodeDrain => "node.drain",
            EventType::CheckStatus => "check.status",
            EventType::JobUpdated => "job.updated",
            EventType::AllocationPlaced => "allocation.placed",
            EventType::AllocationStarted => "allocation.started",
            EventType::AllocationRestarted => "allocation.restarted",
            EventType::AllocationFailed => "allocation.failed",
            EventType::AllocationRescheduled => "allocation.rescheduled",
            EventType::AllocationLost => "allocation.lost",
            EventType::AllocationStopped => "allocation.stopped",
            EventType::ControllerElected => "controller.elected",
            EventType::FaultInjected => "fault.injected",
            EventType::FaultHealed => "fault.healed",
        }
    }

    /// Whether a `--type` filter (`node.down`, or a whole family: `node`,
    /// `allocation`) selects this type.
    pub fn matches(self, filter: &str) -> bool {
        let name = self.as_str();
        name == filter
            || name
                .strip_prefix(filter)
                .is_some_and(|rest| rest.starts_with('.'))
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A name that is no event type.
#[derive(Debug, thiserror::Error)]
#[error("unknown event type {0:?} (one of: {names})", names = EventType::ALL.map(EventType::as_str).join(", "))]
pub struct UnknownEventType(pub String);

impl FromStr for EventType {
    type Err = UnknownEventType;

    fn from_str(name: &str) -> Result<EventType, UnknownEventType> {
        EventType::ALL
            .into_iter()
            .find(|kind| kind.as_str() == name)
            .ok_or_else(|| UnknownEventType(name.to_owned()))
    }
}

/// One thing that happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unique and time-ordered: `<unix ms, 16 digits>-<source>-<sequence>`.
    pub id: String,
    /// When it was recorded, in milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// What kind of thing happened.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The member or node that recorded it.
    pub source: String,
    /// What it is about: a member, node, service instance, allocation or job.
    pub subject: String,
    /// One sentence for a person.
    pub message: String,
    /// Details for tools (`term`, `status`, `exit_code`, …).
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
}

impl Event {
    /// The store key of the event.
    pub fn key(&self) -> String {
        format!("{PREFIX}{}", self.id)
    }

    /// Reads an event back from its stored value.
    pub fn from_json(value: &[u8]) -> Result<Event, serde_json::Error> {
        serde_json::from_slice(value)
    }
}

/// The first key of the events recorded at or after `time_unix_ms`.
pub fn key_at(time_unix_ms: u64) -> String {
    format!("{PREFIX}{time_unix_ms:016}")
}

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// Records events without blocking: a bounded queue and a task that writes
/// it to the store and trims the log. Cheap to clone; the task ends when the
/// last clone is dropped.
#[derive(Clone)]
pub struct EventRecorder {
    source: Arc<str>,
    sequence: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
    recorded: Arc<AtomicU64>,
    queue: mpsc::Sender<Event>,
}

impl EventRecorder {
    /// Starts the writer task for events recorded by `source` (a node or
    /// member name). Must be called inside a tokio runtime.
    pub fn spawn(client: Client, source: impl Into<String>) -> EventRecorder {
        let (queue, receiver) = mpsc::channel(RECORDER_QUEUE_MAX);
        tokio::spawn(write_events(client, receiver));
        EventRecorder {
            source: source.into().into(),
            sequence: Arc::new(AtomicU64::new(0)),
            dropped: Arc::new(AtomicU64::new(0)),
            recorded: Arc::new(AtomicU64::new(0)),
            queue,
        }
    }

    /// Records one event now. Never blocks: when the queue is full (the
    /// store has been away for long), the event is dropped and counted.
    pub fn record(
        &self,
        kind: EventType,
        subject: impl Into<String>,
        message: impl Into<String>,
        fields: impl IntoIterator<Item = (String, String)>,
    ) {
        let event = self.event(now_unix_ms(), kind, subject, message, fields);
        tracing::info!(event = %event.kind, subject = %event.subject, "{}", event.message);
        if self.queue.try_send(event).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            self.recorded.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Events queued for writing (recorded) since the recorder started.
    pub fn recorded(&self) -> u64 {
        self.recorded.load(Ordering::Relaxed)
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn event(
        &self,
        time_unix_ms: u64,
        kind: EventType,
        subject: impl Into<String>,
        message: impl Into<String>,
        fields: impl IntoIterator<Item = (String, String)>,
    ) -> Event {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        Event::new(
            &self.source,
            time_unix_ms,
            sequence,
            kind,
            subject,
            message,
            fields,
        )
    }
}

impl Event {
    /// An event with its id made of the time, the source and a sequence
    /// number unique within the source; the message and fields bounded.
    pub fn new(
        source: &str,
        time_unix_ms: u64,
        sequence: u64,
        kind: EventType,
        subject: impl Into<String>,
        message: impl Into<String>,
        fields: impl IntoIterator<Item = (String, String)>,
    ) -> Event {
        let mut message = message.into();
        if message.len() > MESSAGE_BYTES_MAX {
            let mut end = MESSAGE_BYTES_MAX;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Event {
            id: format!("{time_unix_ms:016}-{source}-{sequence:08}"),
            time_unix_ms,
            kind,
            source: source.to_owned(),
            subject: subject.into(),
            message,
            fields: fields.into_iter().take(FIELDS_MAX).collect(),
        }
    }

    /// An event happening now, for one-off writers (a CLI command, a fault
    /// that must be on record before the process stops) that have no
    /// [`EventRecorder`]; the sequence is this process's.
    pub fn now(
        source: &str,
        kind: EventType,
        subject: impl Into<String>,
        message: impl Into<String>,
        fields: impl IntoIterator<Item = (String, String)>,
    ) -> Event {
        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        // Distinct from recorders' sequences in the same process.
        let sequence = (1 << 40) + SEQUENCE.fetch_add(1, Ordering::Relaxed);
        Event::new(
            source,
            now_unix_ms(),
            sequence,
            kind,
            subject,
            message,
            fields,
        )
    }
}

/// Writes one event now, waiting for the store (no retries): for writers
/// that must know it is on record.
pub async fn write(client: &Client, event: &Event) -> Result<(), ClientError> {
    let value = serde_json::to_vec(event).expect("events serialize");
    client.put(event.key(), value).await.map(drop)
}

/// The recorder's task: writes each event (retrying while the store is
/// away, so an event is late rather than lost) and trims the log.
async fn write_events(client: Client, mut receiver: mpsc::Receiver<Event>) {
    let mut trim_at = tokio::time::Instant::now();
    loop {
        let event = tokio::select! {
            event = receiver.recv() => match event {
                Some(event) => Some(event),
                None => return,
            },
            () = tokio::time::sleep_until(trim_at) => None,
        };
        if let Some(event) = event {
            let value = serde_json::to_vec(&event).expect("events serialize");
            let mut pause = Duration::from_millis(100);
            while let Err(error) = client.put(event.key(), value.clone()).await {
                tracing::debug!(%error, "recording an event; retrying");
                if receiver.is_closed() {
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(STORE_RETRY_MAX);
            }
        }
        if tokio::time::Instant::now() >= trim_at {
            if let Err(error) = trim(&client, now_unix_ms()).await {
                tracing::debug!(%error, "trimming the events log");
            }
            trim_at = tokio::time::Instant::now() + TRIM_INTERVAL;
        }
    }
}

/// Deletes the events older than [`EVENT_RETENTION`] and the oldest beyond
/// [`EVENTS_RETAINED_MAX`]; returns how many were deleted.
pub async fn trim(client: &Client, now_unix_ms: u64) -> Result<i64, ClientError> {
    let cutoff = now_unix_ms.saturating_sub(EVENT_RETENTION.as_millis() as u64);
    let mut deleted = client
        .delete_range(DeleteRangeRequest {
            key: PREFIX.into(),
            range_end: key_at(cutoff).into(),
            ..DeleteRangeRequest::default()
        })
        .await?
        .deleted;
    let range_end = keel_client::prefix_end(PREFIX.as_bytes());
    let count = client
        .range(RangeRequest {
            key: PREFIX.into(),
            range_end: range_end.clone(),
            count_only: true,
            ..RangeRequest::default()
        })
        .await?
        .count as u64;
    if count > EVENTS_RETAINED_MAX {
        // The newest key to delete is the (count - max)-th oldest.
        let excess = count - EVENTS_RETAINED_MAX;
        let oldest = client
            .range(RangeRequest {
                key: PREFIX.into(),
                range_end,
                limit: excess as i64,
                keys_only: true,
                ..RangeRequest::default()
            })
            .await?;
        if let Some(last) = oldest.kvs.last() {
            let mut end = last.key.clone();
            end.push(0);
            deleted += client
                .delete_range(DeleteRangeRequest {
                    key: PREFIX.into(),
                    range_end: end,
                    ..DeleteRangeRequest::default()
                })
                .await?
                .deleted;
        }
    }
    Ok(deleted)
}

/// The events recorded at or after `since_unix_ms`, oldest first, at most
/// `limit` of them (the newest `limit` when there are more), of the given
/// types (all when `filters` is empty; a filter is a type or a family).
pub async fn list(
    client: &Client,
    since_unix_ms: u64,
    filters: &[String],
    limit: usize,
) -> Result<Vec<Event>, ClientError> {
    let response = client
        .range(RangeRequest {
            key: key_at(since_unix_ms).into(),
            range_end: keel_client::prefix_end(PREFIX.as_bytes()),
            ..RangeRequest::default()
        })
        .await?;
    let mut events: Vec<Event> = response
        .kvs
        .iter()
        .filter_map(|kv| Event::from_json(&kv.value).ok())
        .filter(|event| {
            filters.is_empty() || filters.iter().any(|filter| event.kind.matches(filter))
        })
        .collect();
    if events.len() > limit {
        events.drain(..events.len() - limit);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_json() {
        for kind in EventType::ALL {
            assert_eq!(kind.as_str().parse::<EventType>().unwrap(), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
        }
        let error = "node.gone".parse::<EventType>().unwrap_err().to_string();
        assert!(
            error.contains("node.gone") && error.contains("node.down"),
            "{error}"
        );
    }

    #[test]
    fn a_family_filter_selects_its_types_only() {
        assert!(EventType::NodeDown.matches("node"));
        assert!(EventType::NodeDown.matches("node.down"));
        assert!(!EventType::NodeDown.matches("node.d"));
        assert!(!EventType::NodeDown.matches("allocation"));
    }

    #[test]
    fn ids_sort_by_time_and_messages_are_bounded() {
        let (queue, _receiver) = mpsc::channel(1);
        let recorder = EventRecorder {
            source: "node1".into(),
            sequence: Arc::new(AtomicU64::new(0)),
            dropped: Arc::new(AtomicU64::new(0)),
            recorded: Arc::new(AtomicU64::new(0)),
            queue,
        };
        let early = recorder.event(999, EventType::NodeDown, "n", "x", []);
        let late = recorder.event(1_000, EventType::NodeDown, "n", "é".repeat(600), []);
        assert!(early.key() < late.key());
        assert!(early.key() >= key_at(999) && late.key() < key_at(1_001));
        assert!(late.message.len() <= MESSAGE_BYTES_MAX);
        assert!(late.message.chars().all(|c| c == 'é'));
    }
}
