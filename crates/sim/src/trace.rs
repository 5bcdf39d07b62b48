//! The run's trace: a digest of every event, to prove that a seed replays the same run,
//! and a bounded ring of the most recent events, printed when a run fails.
//!
//! Events are kept as small structured values and formatted only when a failure is
//! printed: formatting every event would cost more than simulating it. Ticks and
//! heartbeats are folded into the digest but kept out of the ring, where they would push
//! out the events that explain a failure.

use std::collections::VecDeque;
use std::fmt;

use keel_core::eraftpb::{Message, MessageType};

use crate::config::MILLISECOND_NS;

/// How many recent events the ring keeps for a failure report.
pub const TRACE_EVENTS_MAX: usize = 64;

/// A Raft message reduced to the fields that explain what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageSummary {
    /// raft-rs's message type.
    pub message_type: MessageType,
    /// The sender.
    pub from: u64,
    /// The recipient.
    pub to: u64,
    /// The sender's term.
    pub term: u64,
    /// The term of the entry at `index` (appends, votes).
    pub log_term: u64,
    /// The log index the message is about.
    pub index: u64,
    /// The sender's commit index.
    pub commit: u64,
    /// How many entries it carries.
    pub entry_count: u64,
    /// Whether it is a rejection.
    pub reject: bool,
    /// The index of the snapshot it carries, if any.
    pub snapshot_index: u64,
}

impl MessageSummary {
    /// Summarises `message`.
    pub fn of(message: &Message) -> MessageSummary {
        MessageSummary {
            message_type: message.get_msg_type(),
            from: message.from,
            to: message.to,
            term: message.term,
            log_term: message.log_term,
            index: message.index,
            commit: message.commit,
            entry_count: message.entries.len() as u64,
            reject: message.reject,
            snapshot_index: message.get_snapshot().get_metadata().index,
        }
    }

    fn is_heartbeat(&self) -> bool {
        matches!(
            self.message_type,
            MessageType::MsgHeartbeat | MessageType::MsgHeartbeatResponse
        )
    }

    fn digest_into(&self, digest: &mut Digest) {
        digest.write(self.message_type as u64);
        digest.write(self.from);
        digest.write(self.to);
        digest.write(self.term);
        digest.write(self.log_term);
        digest.write(self.index);
        digest.write(self.commit);
        digest.write(self.entry_count);
        digest.write(u64::from(self.reject));
        digest.write(self.snapshot_index);
    }
}

impl fmt::Display for MessageSummary {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "{:?} {}→{} term {} index {} log_term {} commit {}",
            self.message_type,
            self.from,
            self.to,
            self.term,
            self.index,
            self.log_term,
            self.commit
        )?;
        if self.entry_count > 0 {
            write!(formatter, " entries {}", self.entry_count)?;
        }
        if self.reject {
            formatter.write_str(" REJECT")?;
        }
        if self.snapshot_index > 0 {
            write!(formatter, " snapshot@{}", self.snapshot_index)?;
        }
        Ok(())
    }
}

/// What the transport tells a member about a message it sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportReport {
    /// The connection to the peer failed: the message did not arrive.
    Unreachable,
    /// The connection failed and the message was a snapshot: the peer did not get it.
    SnapshotLost,
    /// A snapshot was written to the peer's connection. (What the member does with
    /// this is explained in `shell.rs`.)
    SnapshotSent,
}

/// Something that happened in the simulated world.
#[derive(Debug, Clone, PartialEq)]
pub enum TraceEvent {
    /// A member's clock ticked.
    Tick {
        /// The member.
        member: u64,
    },
    /// A message reached its recipient.
    Deliver(MessageSummary),
    /// A message was lost, with why.
    Drop(MessageSummary, &'static str),
    /// The transport told a member about a message it sent.
    Report {
        /// The member told.
        member: u64,
        /// The peer.
        peer: u64,
        /// What it was told.
        report: TransportReport,
    },
    /// A member saw itself become leader.
    Leader {
        /// The member.
        member: u64,
        /// Its term.
        term: u64,
    },
    /// A member stopped.
    Stop {
        /// The member.
        member: u64,
        /// How (a process kill keeps the page cache, a power loss does not).
        how: &'static str,
    },
    /// A member started again from its disk.
    Restart {
        /// The member.
        member: u64,
        /// Its boot counter.
        incarnation: u64,
        /// The snapshot it recovered.
        snapshot_index: u64,
        /// The last log index it recovered.
        last_index: u64,
    },
    /// A member's write to its disk failed (an fsync error).
    PersistFailed {
        /// The member.
        member: u64,
    },
    /// The nemesis did something to the world (partition, heal, clock, pause, …).
    Fault(String),
    /// A client sent a request.
    ClientCall {
        /// The client.
        client: u64,
        /// The member it went to.
        member: u64,
        /// The request, as the history records it.
        input: keel_check::Input,
    },
    /// A follower could not answer a client's keep-alive; its server forwards it to the
    /// leader it knows of.
    ClientForwarded {
        /// The client.
        client: u64,
        /// The leader the request goes to.
        leader: u64,
    },
    /// A client got an answer.
    ClientReturn {
        /// The client.
        client: u64,
        /// The answer, as the history records it.
        output: keel_check::Output,
    },
    /// A client's request failed without effect, or with an unknown outcome.
    ClientFailed {
        /// The client.
        client: u64,
        /// Why.
        reason: String,
        /// Whether the request may still take effect.
        unknown_outcome: bool,
    },
    /// The run moved to another phase.
    Phase(&'static str),
}

impl TraceEvent {
    /// Whether the event is too frequent to be worth keeping in the ring (ticks, heartbeats).
    pub fn is_noise(&self) -> bool {
        match self {
            TraceEvent::Tick { .. } => true,
            TraceEvent::Deliver(summary) => summary.is_heartbeat(),
            _ => false,
        }
    }

    fn digest_into(&self, digest: &mut Digest) {
        match self {
            TraceEvent::Tick { member } => {
                digest.write(1);
                digest.write(*member);
            }
            TraceEvent::Deliver(summary) => {
                digest.write(2);
                summary.digest_into(digest);
            }
            TraceEvent::Drop(summary, reason) => {
                digest.write(3);
                summary.digest_into(digest);
                digest.write_bytes(reason.as_bytes());
            }
            TraceEvent::Report {
                member,
                peer,
                report,
            } => {
                digest.write(4);
                digest.write(*member);
                digest.write(*peer);
                digest.write(*report as u64);
            }
            TraceEvent::Leader { member, term } => {
                digest.write(5);
                digest.write(*member);
                digest.write(*term);
            }
            TraceEvent::Stop { member, how } => {
                digest.write(6);
                digest.write(*member);
                digest.write_bytes(how.as_bytes());
            }
            TraceEvent::Restart {
                member,
                incarnation,
                snapshot_index,
                last_index,
            } => {
                digest.write(7);
                digest.write(*member);
                digest.write(*incarnation);
                digest.write(*snapshot_index);
                digest.write(*last_index);
            }
            TraceEvent::PersistFailed { member } => {
                digest.write(8);
                digest.write(*member);
            }
            TraceEvent::Fault(description) => {
                digest.write(9);
                digest.write_bytes(description.as_bytes());
            }
            TraceEvent::ClientCall {
                client,
                member,
                input,
            } => {
                digest.write(10);
                digest.write(*client);
                digest.write(*member);
                digest.write_bytes(input.kind().as_bytes());
                digest.write_bytes(input.key().map_or(&[][..], |key| key.as_slice()));
                digest.write(input.lease_id().unwrap_or(0) as u64);
            }
            TraceEvent::ClientReturn { client, output } => {
                digest.write(11);
                digest.write(*client);
                digest.write_bytes(output.kind().as_bytes());
                digest.write(output.revision().unwrap_or(0));
            }
            TraceEvent::ClientFailed {
                client,
                reason,
                unknown_outcome,
            } => {
                digest.write(12);
                digest.write(*client);
                digest.write_bytes(reason.as_bytes());
                digest.write(u64::from(*unknown_outcome));
            }
            TraceEvent::Phase(name) => {
                digest.write(13);
                digest.write_bytes(name.as_bytes());
            }
            TraceEvent::ClientForwarded { client, leader } => {
                digest.write(14);
                digest.write(*client);
                digest.write(*leader);
            }
        }
    }
}

impl fmt::Display for TraceEvent {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TraceEvent::Tick { member } => write!(formatter, "member {member} ticks"),
            TraceEvent::Deliver(summary) => write!(formatter, "deliver {summary}"),
            TraceEvent::Drop(summary, reason) => write!(formatter, "drop ({reason}) {summary}"),
            TraceEvent::Report {
                member,
                peer,
                report,
            } => {
                let what = match report {
                    TransportReport::Unreachable => "unreachable",
                    TransportReport::SnapshotLost => "unreachable, snapshot lost",
                    TransportReport::SnapshotSent => "snapshot sent",
                };
                write!(formatter, "member {member} told: peer {peer} {what}")
            }
            TraceEvent::Leader { member, term } => {
                write!(formatter, "member {member} is leader of term {term}")
            }
            TraceEvent::Stop { member, how } => write!(formatter, "member {member} stops: {how}"),
            TraceEvent::Restart {
                member,
                incarnation,
                snapshot_index,
                last_index,
            } => write!(
                formatter,
                "member {member} restarts (boot {incarnation}): snapshot@{snapshot_index}, \
                 log to {last_index}"
            ),
            TraceEvent::PersistFailed { member } => {
                write!(formatter, "member {member}: persist failed (fsync error)")
            }
            TraceEvent::Fault(description) => write!(formatter, "nemesis: {description}"),
            TraceEvent::ClientCall {
                client,
                member,
                input,
            } => write!(formatter, "client {client} → member {member}: {input:?}"),
            TraceEvent::ClientReturn { client, output } => {
                write!(formatter, "client {client} ← {output:?}")
            }
            TraceEvent::ClientFailed {
                client,
                reason,
                unknown_outcome,
            } => {
                let outcome = if *unknown_outcome {
                    "outcome unknown"
                } else {
                    "no effect"
                };
                write!(formatter, "client {client} ← {reason} ({outcome})")
            }
            TraceEvent::Phase(name) => write!(formatter, "=== {name} ==="),
            TraceEvent::ClientForwarded { client, leader } => {
                write!(
                    formatter,
                    "client {client}'s request forwarded to leader {leader}"
                )
            }
        }
    }
}

/// A 64-bit digest of a sequence of words, stable across platforms and Rust versions
/// (unlike `DefaultHasher`), built from SplitMix64's finaliser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    state: u64,
}

impl Default for Digest {
    fn default() -> Digest {
        Digest {
            state: 0x6B65_656C_2D73_696D,
        }
    }
}

impl Digest {
    /// Folds one word in.
    pub fn write(&mut self, word: u64) {
        let mut mixed = (self.state ^ word).wrapping_add(0x9E37_79B9_7F4A_7C15);
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        self.state = mixed ^ (mixed >> 31);
    }

    /// Folds bytes in, with their length so that concatenations differ.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        self.write(bytes.len() as u64);
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write(u64::from_le_bytes(word));
        }
    }

    /// The digest so far.
    pub fn value(&self) -> u64 {
        self.state
    }
}

/// The digest of every event and the ring of recent ones.
#[derive(Debug, Default)]
pub struct Trace {
    digest: Digest,
    recent: VecDeque<(u64, TraceEvent)>,
    event_count: u64,
}

impl Trace {
    /// Records `event` at simulated time `time_ns`.
    pub fn record(&mut self, time_ns: u64, event: TraceEvent) {
        self.event_count += 1;
        self.digest.write(time_ns);
        event.digest_into(&mut self.digest);
        if event.is_noise() {
            return;
        }
        if self.recent.len() == TRACE_EVENTS_MAX {
            self.recent.pop_front();
        }
        self.recent.push_back((time_ns, event));
    }

    /// The digest of every event recorded so far.
    pub fn digest(&self) -> u64 {
        self.digest.value()
    }

    /// How many events were recorded.
    pub fn event_count(&self) -> u64 {
        self.event_count
    }

    /// The most recent events, oldest first, one line each.
    pub fn recent_lines(&self) -> Vec<String> {
        self.recent
            .iter()
            .map(|(time_ns, event)| {
                format!(
                    "{:>6}.{:03} ms  {event}",
                    time_ns / MILLISECOND_NS,
                    time_ns % MILLISECOND_NS / 1_000
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_events_and_skips_noise() {
        let mut trace = Trace::default();
        for index in 0..(TRACE_EVENTS_MAX as u64 + 10) {
            trace.record(index, TraceEvent::Fault(format!("fault {index}")));
            trace.record(index, TraceEvent::Tick { member: 1 });
        }
        let lines = trace.recent_lines();
        assert_eq!(lines.len(), TRACE_EVENTS_MAX);
        assert!(lines[0].ends_with("nemesis: fault 10"), "{}", lines[0]);
        assert_eq!(trace.event_count(), 2 * (TRACE_EVENTS_MAX as u64 + 10));
    }

    #[test]
    fn the_digest_depends_on_order_and_content() {
        let mut first = Digest::default();
        first.write(1);
        first.write(2);
        let mut second = Digest::default();
        second.write(2);
        second.write(1);
        assert_ne!(first.value(), second.value());
        let mut third = Digest::default();
        third.write_bytes(b"ab");
        let mut fourth = Digest::default();
        fourth.write_bytes(b"a");
        fourth.write_bytes(b"b");
        assert_ne!(third.value(), fourth.value());
    }
}
