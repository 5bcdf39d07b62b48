//! One Raft round in `core` with no I/O: three in-memory `Node`s, a client write proposed
//! to the leader, until the leader has committed and applied it and produced the reply.
//!
//! The benchmark is the shell: it carries out each node's outputs in the Ready order (see
//! `keel_core::node`) and hands every message to its addressee at once. Nothing is
//! persisted: a node already holds its log in memory, and the disk is measured on its own
//! by `keel-storage`'s `wal_append`. What is left is the CPU cost of consensus and apply:
//! raft-rs's bookkeeping, encoding the log request, the followers' appends and responses,
//! and the leader's apply and reply. Work that can only follow the reply (the followers
//! learning the new commit index and applying) is done after each round, not measured.
//!
//! Two cases: one write per round, and 64 writes proposed together, as the member loop
//! proposes every input that queued during the previous fsync (throughput in writes).
//!
//! Run with `cargo bench -p keel-core --bench raft_round`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keel_core::eraftpb::Message;
use keel_core::{bootstrap_snapshot, Event, Node, NodeConfig, Output, Recovered, Response};
use keel_types::etcdserverpb::{CompactionRequest, PutRequest};
use keel_types::keelpb::MemberRecord;

/// Members of the cluster; their ids are 1 to this.
const MEMBER_COUNT: u64 = 3;

/// The member made leader before measuring.
const LEADER_ID: u64 = 1;

/// Any cluster id will do; this one spells "keel".
const CLUSTER_ID: u64 = 0x6b65_656c;

/// Writes proposed together in the batched case.
const BATCH_WRITES: u64 = 64;

/// Distinct keys the writes cycle through, so the key space stays small and each write is
/// an overwrite (the cost of a put into a large key space is `mvcc`'s benchmark).
const KEY_COUNT: u64 = 1_000;

/// Bytes in every value.
const VALUE_BYTES: usize = 128;

/// Writes between two compactions of the key space (proposed through the log, outside the
/// measurement). Without them every key's history grows for the whole run, and each put's
/// search of it gets slower as the run goes on: the benchmark would drift instead of
/// measuring one steady state, that of a cluster with auto-compaction on.
const COMPACTION_INTERVAL_WRITES: u64 = 10_000;

/// Readies taken from one node in a row, and message hops in one round, past which the
/// cluster is taken to be looping for ever: a panic says so, where a hang would not.
const READY_ROUNDS_MAX: usize = 10_000;

/// Three nodes and the messages between them.
struct Cluster {
    /// Indexed by member id - 1.
    nodes: Vec<Node>,
    /// Messages sent and not yet delivered, oldest first.
    messages: VecDeque<Message>,
    /// Tokens of the writes answered.
    replies: Vec<u64>,
    /// Writes proposed so far; the next write's token and key.
    write_count: u64,
    /// `write_count` at the last compaction.
    compacted_at_write_count: u64,
}

impl Cluster {
    /// Starts three founding members and elects member 1, then lets everything settle.
    fn elected() -> Cluster {
        let members = (1..=MEMBER_COUNT)
            .map(|id| MemberRecord {
                id,
                name: format!("member-{id}"),
                peer_urls: vec![format!("bench://member-{id}")],
                ..MemberRecord::default()
            })
            .collect::<Vec<_>>();
        // raft-rs logs through slog; discard it, so that formatting is not measured.
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let nodes = (1..=MEMBER_COUNT)
            .map(|id| {
                let mut config = NodeConfig::with_member_id(id);
                // No snapshots during the run: encoding the whole state machine every
                // 100k entries would show up as outliers, and is not part of a round.
                config.snapshot_entries_interval = 1 << 40;
                let recovered = Recovered {
                    snapshot: bootstrap_snapshot(members.clone(), CLUSTER_ID),
                    hard_state: None,
                    entries: Vec::new(),
                };
                Node::new(config, recovered, &logger).expect("starting a node")
            })
            .collect();
        let mut cluster = Cluster {
            nodes,
            messages: VecDeque::new(),
            replies: Vec::new(),
            write_count: 0,
            compacted_at_write_count: 0,
        };
        cluster.node(LEADER_ID).campaign();
        cluster.settle();
        let status = cluster.node(LEADER_ID).status();
        assert!(status.is_leader, "member {LEADER_ID} won its election");
        assert_eq!(
            status.applied_index, status.commit_index,
            "the leader applied its own empty entry"
        );
        cluster
    }

    fn node(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    /// Carries out one output, as the member loop does, less the disk.
    fn carry_out(&mut self, output: Output) {
        self.messages.extend(output.messages);
        // `output.persist` needs no action: the node keeps its log in memory itself.
        self.messages.extend(output.messages_after_persist);
        for reply in output.replies {
            assert!(
                matches!(reply.result, Ok(Response::Write(_))),
                "write {} failed: {:?}",
                reply.token,
                reply.result
            );
            self.replies.push(reply.token);
        }
        assert!(
            output.snapshot_capture.is_none(),
            "snapshots are off in this benchmark"
        );
    }

    /// Takes every node's Readies (and their advances) until none has work.
    fn drain_readies(&mut self) {
        for index in 0..self.nodes.len() {
            for _ in 0..READY_ROUNDS_MAX {
                if !self.nodes[index].has_ready() {
                    break;
                }
                let output = self.nodes[index].ready();
                self.carry_out(output);
                let output = self.nodes[index].advance();
                self.carry_out(output);
            }
        }
    }

    /// Hands every message sent so far to its addressee.
    fn deliver_messages(&mut self) {
        for message in std::mem::take(&mut self.messages) {
            let to = message.to;
            self.node(to).step(Event::Message(Box::new(message)));
        }
    }

    /// Runs until no node has work and no message is in flight.
    fn settle(&mut self) {
        for _ in 0..READY_ROUNDS_MAX {
            self.drain_readies();
            if self.messages.is_empty() {
                return;
            }
            self.deliver_messages();
        }
        panic!("the cluster did not settle in {READY_ROUNDS_MAX} rounds");
    }

    /// The next `count` writes, built before measuring.
    fn next_writes(&mut self, count: u64) -> Vec<Event> {
        (0..count)
            .map(|_| {
                let token = self.write_count;
                self.write_count += 1;
                let key = format!("key/{:04}", token % KEY_COUNT).into_bytes();
                Event::Write {
                    token,
                    request: keel_core::WriteRequest::Put(PutRequest {
                        key,
                        value: vec![b'v'; VALUE_BYTES],
                        ..PutRequest::default()
                    }),
                }
            })
            .collect()
    }

    /// Proposes `writes` to the leader and shuttles messages until the leader has answered
    /// all of them. Returns how long that took; the rest of the round is then settled.
    fn round(&mut self, writes: Vec<Event>) -> Duration {
        let write_count = writes.len();
        self.replies.clear();
        let start = Instant::now();
        for write in writes {
            self.node(LEADER_ID).step(write);
        }
        for _ in 0..READY_ROUNDS_MAX {
            self.drain_readies();
            if self.replies.len() == write_count {
                break;
            }
            self.deliver_messages();
        }
        let elapsed = start.elapsed();
        assert_eq!(self.replies.len(), write_count, "every write was answered");
        self.settle();
        if self.write_count - self.compacted_at_write_count >= COMPACTION_INTERVAL_WRITES {
            self.compact();
        }
        elapsed
    }

    /// Compacts the key space at its current revision, through the log as a client would.
    fn compact(&mut self) {
        let revision = self.node(LEADER_ID).status().revision;
        let token = self.write_count;
        self.write_count += 1;
        self.compacted_at_write_count = self.write_count;
        self.node(LEADER_ID).step(Event::Write {
            token,
            request: keel_core::WriteRequest::Compaction(CompactionRequest {
                revision,
                physical: false,
            }),
        });
        self.settle();
        assert_eq!(
            self.replies.last(),
            Some(&token),
            "the compaction was answered"
        );
    }
}

fn raft_round(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("raft_round");
    for writes_per_round in [1, BATCH_WRITES] {
        // A fresh cluster per case, so the second does not start with the first's log.
        let mut cluster = Cluster::elected();
        group.throughput(Throughput::Elements(writes_per_round));
        group.bench_function(BenchmarkId::new("writes", writes_per_round), |bencher| {
            bencher.iter_custom(|iterations| {
                (0..iterations)
                    .map(|_| {
                        let writes = cluster.next_writes(writes_per_round);
                        cluster.round(writes)
                    })
                    .sum()
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // A round takes microseconds (a batch, hundreds): twenty samples in two seconds are
    // plenty, and keep the run short on a shared machine.
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = raft_round
}
criterion_main!(benches);
