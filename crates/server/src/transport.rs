//! Peer transport: Raft messages between members over TCP.
//!
//! Each member keeps one outgoing connection per peer, fed by a bounded queue,
//! and accepts incoming connections on its peer address. A frame is
//! `[u32 length][u32 crc32c][u8 kind][payload]`, the checksum covering kind and
//! payload. Most frames carry one protobuf-encoded raft Message. Raft tolerates
//! lost messages, so a full queue or a broken connection drops messages instead
//! of blocking the member loop; a dropped snapshot is reported back, because
//! raft-rs waits for that report before trying again.
//!
//! A snapshot travels as a header frame (the raft Message without its data, and
//! the data's length) followed by chunks of at most [`SNAPSHOT_CHUNK_BYTES`],
//! written straight from the image the member already holds (a shared `Bytes`,
//! never copied or encoded whole). Other messages to the same peer go out between
//! chunks, so heartbeats keep flowing during a long transfer. The receiver
//! appends chunks into one buffer sized from the header (at most
//! `snapshot_bytes_max`) and hands the completed message to the member loop
//! without another copy. So sending costs the leader one chunk per transfer on
//! top of the image it keeps anyway, whatever the number of followers.
//!
//! Every connection starts with a hello naming the cluster and the sender, so a
//! member of another cluster that dials the wrong port is refused rather than
//! trusted. The decoder (rust-protobuf 2, advisory RUSTSEC-2024-0437) only ever
//! sees bytes from such a peer, and a decoding error closes the connection.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use keel_core::eraftpb::{Message, MessageType};
use protobuf::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::config::parse_url_address;
use crate::member::Input;
use crate::metrics::{member_label, MemberMetrics, PeerMetrics};
use keel_types::keelpb::MemberRecord;

const HELLO_MAGIC: &[u8; 4] = b"KEEL";
/// Version 2 added the frame kind byte and chunked snapshots.
const PROTOCOL_VERSION: u32 = 2;

/// A frame holding one whole raft Message.
const FRAME_MESSAGE: u8 = 0;
/// A frame opening a snapshot: `[u64 data length][raft Message without data]`.
const FRAME_SNAPSHOT_HEADER: u8 = 1;
/// A frame holding the next bytes of the snapshot being received.
const FRAME_SNAPSHOT_CHUNK: u8 = 2;
/// Snapshot data per chunk frame: large enough that framing costs nothing,
/// small enough that heartbeats wait at most a millisecond or so behind one.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;
/// Queued messages sent between two snapshot chunks at most, so a busy queue
/// cannot starve a transfer (nor a transfer the queue).
const MESSAGES_BETWEEN_CHUNKS_MAX: usize = 256;

/// Answers to a hello, sent back as one byte before any frame.
const HELLO_ACCEPTED: u8 = 0;
/// The sender is not (or no longer) a member: it was removed.
const HELLO_REFUSED_NOT_MEMBER: u8 = 1;
/// The sender belongs to another cluster.
const HELLO_REFUSED_OTHER_CLUSTER: u8 = 2;
/// Answer to a join query: followed by `[u32 length][StateMachineSnapshot]`
/// holding only the cluster id and the members.
const HELLO_MEMBERSHIP: u8 = 3;
/// Largest membership answer accepted by a joining member.
const MEMBERSHIP_ANSWER_BYTES_MAX: usize = 16 * 1024 * 1024;

/// The members allowed to send us messages, shared between the member loop
/// (which updates it as membership changes) and the peer listeners.
pub type AllowedPeers = Arc<RwLock<BTreeSet<u64>>>;

/// Outgoing connections to every peer, by member id; follows membership.
pub struct PeerSenders {
    runtime: tokio::runtime::Handle,
    cluster_id: u64,
    own_id: u64,
    queue_messages_max: usize,
    input: SyncSender<Input>,
    senders: BTreeMap<u64, (SocketAddr, mpsc::Sender<Message>, Arc<PeerMetrics>)>,
    metrics: Arc<MemberMetrics>,
}

impl PeerSenders {
    /// No peers yet; call [`PeerSenders::follow_membership`].
    pub fn new(
        runtime: tokio::runtime::Handle,
        cluster_id: u64,
        own_id: u64,
        queue_messages_max: usize,
        input: SyncSender<Input>,
        metrics: Arc<MemberMetrics>,
    ) -> Self {
        PeerSenders {
            runtime,
            cluster_id,
            own_id,
            queue_messages_max,
            input,
            senders: BTreeMap::new(),
            metrics,
        }
    }

    /// Starts a sender for every new member (or changed address) and drops
    /// those of removed members (their tasks end when the queue closes).
    pub fn follow_membership(&mut self, members: &[MemberRecord]) {
        let mut wanted = BTreeMap::new();
        for member in members {
            if member.id == self.own_id {
                continue;
            }
            let Some(address) = member
                .peer_urls
                .first()
                .and_then(|url| parse_url_address(url).ok())
            else {
                tracing::warn!(
                    member = format!("{:x}", member.id),
                    "member has no usable peer URL"
                );
                continue;
            };
            wanted.insert(member.id, address);
        }
        self.senders
            .retain(|id, (address, _, _)| wanted.get(id) == Some(address));
        for (id, address) in wanted {
            if self.senders.contains_key(&id) {
                continue;
            }
            let (sender, receiver) = mpsc::channel(self.queue_messages_max);
            let peer = self.metrics.peer(id);
            self.runtime.spawn(run_sender(
                self.cluster_id,
                self.own_id,
                id,
                address,
                receiver,
                self.input.clone(),
                peer.clone(),
            ));
            self.senders.insert(id, (address, sender, peer));
        }
    }

    /// Queues a message for its recipient, reporting what could not be queued.
    pub fn send(&self, message: Message, input: &SyncSender<Input>) {
        let to = message.to;
        let is_snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
        let Some((_, sender, peer)) = self.senders.get(&to) else {
            tracing::debug!(to, "message for an unknown peer dropped");
            if is_snapshot {
                let _ = input.try_send(Input::SnapshotFailed(to));
            }
            return;
        };
        if sender.try_send(message).is_err() {
            peer.sent_failures.inc();
            let _ = input.try_send(Input::Unreachable(to));
            if is_snapshot {
                let _ = input.try_send(Input::SnapshotFailed(to));
            }
        }
    }
}

fn hello(cluster_id: u64, sender_id: u64) -> Vec<u8> {
    let mut hello = Vec::with_capacity(24);
    hello.extend_from_slice(HELLO_MAGIC);
    hello.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    hello.extend_from_slice(&cluster_id.to_le_bytes());
    hello.extend_from_slice(&sender_id.to_le_bytes());
    hello
}

/// Asks a member at `address` for the cluster's id and membership, as a new
/// member does before its first start (etcd asks its peers the same way).
pub async fn query_membership(
    address: SocketAddr,
) -> Result<keel_types::keelpb::StateMachineSnapshot, String> {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(address))
        .await
        .map_err(|_| format!("{address}: connection timed out"))?
        .map_err(|error| format!("{address}: {error}"))?;
    stream
        .write_all(&hello(0, 0))
        .await
        .map_err(|error| format!("{address}: {error}"))?;
    let read = async {
        let status = stream.read_u8().await?;
        if status != HELLO_MEMBERSHIP {
            return Err(std::io::Error::other(format!("answered {status}")));
        }
        let length = stream.read_u32_le().await? as usize;
        if length > MEMBERSHIP_ANSWER_BYTES_MAX {
            return Err(std::io::Error::other("membership answer too large"));
        }
        let mut bytes = vec![0; length];
        stream.read_exact(&mut bytes).await?;
        Ok(bytes)
    };
    let bytes = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| format!("{address}: no answer"))?
        .map_err(|error| format!("{address}: {error}"))?;
    prost::Message::decode(bytes.as_slice()).map_err(|error| format!("{address}: {error}"))
}

async fn run_sender(
    cluster_id: u64,
    own_id: u64,
    peer_id: u64,
    address: SocketAddr,
    mut receiver: mpsc::Receiver<Message>,
    input: SyncSender<Input>,
    peer: Arc<PeerMetrics>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        // Wait for something to send before dialling, so an idle or dead peer
        // costs nothing.
        let Some(first) = receiver.recv().await else {
            return;
        };
        let stream = match TcpStream::connect(address).await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(peer_id, %address, %error, "peer unreachable");
                report_lost(&first, &input);
                peer.sent_failures.inc();
                let _ = input.try_send(Input::Unreachable(peer_id));
                // Drop what queued up meanwhile: Raft will resend what matters.
                while let Ok(message) = receiver.try_recv() {
                    report_lost(&message, &input);
                    peer.sent_failures.inc();
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let _ = stream.set_nodelay(true);
        let mut stream = stream;
        if stream.write_all(&hello(cluster_id, own_id)).await.is_err() {
            report_lost(&first, &input);
            continue;
        }
        match tokio::time::timeout(Duration::from_secs(5), stream.read_u8()).await {
            Ok(Ok(HELLO_ACCEPTED)) => {}
            Ok(Ok(HELLO_REFUSED_NOT_MEMBER)) => {
                tracing::error!(
                    peer = format!("{peer_id:x}"),
                    "peer refused us: this member has been removed from the cluster"
                );
                let _ = input.try_send(Input::RemovedFromCluster);
                return;
            }
            answer => {
                tracing::warn!(
                    peer = format!("{peer_id:x}"),
                    ?answer,
                    "peer refused the connection"
                );
                report_lost(&first, &input);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        }
        let mut writer = BufWriter::with_capacity(64 * 1024, stream);
        let mut next = Some(first);
        let mut snapshot: Option<OutgoingSnapshot> = None;
        let mut messages_since_chunk = 0;
        let connection_lost = loop {
            let chunk_due =
                snapshot.is_some() && messages_since_chunk >= MESSAGES_BETWEEN_CHUNKS_MAX;
            let message = match next.take() {
                Some(message) => Some(message),
                None if chunk_due => None,
                None => match receiver.try_recv() {
                    Ok(message) => Some(message),
                    Err(mpsc::error::TryRecvError::Empty) if snapshot.is_some() => None,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        // Flush only when the queue is empty: many messages share
                        // one system call under load.
                        if writer.flush().await.is_err() {
                            break true;
                        }
                        match receiver.recv().await {
                            Some(message) => Some(message),
                            None => break false,
                        }
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break false,
                },
            };
            let Some(message) = message else {
                // A chunk of the snapshot in flight.
                let outgoing = snapshot
                    .as_mut()
                    .expect("a chunk is due only during a transfer");
                let end = (outgoing.sent_bytes + SNAPSHOT_CHUNK_BYTES).min(outgoing.data.len());
                let chunk = outgoing.data.slice(outgoing.sent_bytes..end);
                if write_frame(&mut writer, FRAME_SNAPSHOT_CHUNK, &[&chunk], &peer)
                    .await
                    .is_err()
                {
                    break true;
                }
                outgoing.sent_bytes = end;
                messages_since_chunk = 0;
                if outgoing.sent_bytes == outgoing.data.len() {
                    if writer.flush().await.is_err() {
                        break true;
                    }
                    peer.snapshot_sends.inc();
                    tracing::info!(
                        member = %member_label(own_id),
                        term = outgoing.term,
                        peer = %member_label(peer_id),
                        index = outgoing.index,
                        bytes = outgoing.data.len(),
                        "snapshot sent"
                    );
                    snapshot = None;
                    report_snapshot_sent(peer_id, &input);
                }
                continue;
            };
            messages_since_chunk += 1;
            if message.get_msg_type() != MessageType::MsgSnapshot {
                let bytes = message
                    .write_to_bytes()
                    .expect("encoding a raft message cannot fail");
                if write_frame(&mut writer, FRAME_MESSAGE, &[&bytes], &peer)
                    .await
                    .is_err()
                {
                    report_lost(&message, &input);
                    break true;
                }
                if message.get_msg_type() == MessageType::MsgHeartbeat {
                    peer.heartbeat_sent();
                }
                continue;
            }
            if snapshot.is_some() {
                // raft-rs sends one snapshot per peer and waits for its report; a
                // second one means the first is stale: drop the newcomer, Raft retries.
                report_lost(&message, &input);
                continue;
            }
            let mut header = message;
            let data = std::mem::take(&mut header.mut_snapshot().data);
            let header_bytes = header
                .write_to_bytes()
                .expect("encoding a raft message cannot fail");
            let data_length = (data.len() as u64).to_le_bytes();
            if write_frame(
                &mut writer,
                FRAME_SNAPSHOT_HEADER,
                &[&data_length, &header_bytes],
                &peer,
            )
            .await
            .is_err()
            {
                report_lost(&header, &input);
                break true;
            }
            let index = header.get_snapshot().get_metadata().index;
            tracing::info!(
                member = %member_label(own_id),
                term = header.term,
                peer = %member_label(peer_id),
                index,
                bytes = data.len(),
                "sending a snapshot"
            );
            if data.is_empty() {
                if writer.flush().await.is_err() {
                    break true;
                }
                peer.snapshot_sends.inc();
                report_snapshot_sent(peer_id, &input);
            } else {
                snapshot = Some(OutgoingSnapshot {
                    data,
                    sent_bytes: 0,
                    term: header.term,
                    index,
                });
            }
        };
        if snapshot.is_some() {
            let _ = input.try_send(Input::SnapshotFailed(peer_id));
        }
        if !connection_lost {
            // The queue closed: the peer left the membership.
            return;
        }
        let _ = input.try_send(Input::Unreachable(peer_id));
    }
}

/// The snapshot a sender is streaming to its peer, chunk by chunk.
struct OutgoingSnapshot {
    /// The image, shared with the member's log store rather than copied.
    data: bytes::Bytes,
    /// How much of `data` is on the wire.
    sent_bytes: usize,
    /// The sender's term and the snapshot's index, for the log.
    term: u64,
    index: u64,
}

/// Writes one frame whose payload is the concatenation of `parts`, counted
/// in the peer's sent bytes.
async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut W,
    kind: u8,
    parts: &[&[u8]],
    peer: &PeerMetrics,
) -> std::io::Result<()> {
    let length = 1 + parts.iter().map(|part| part.len()).sum::<usize>();
    let length = u32::try_from(length).map_err(|_| std::io::Error::other("frame too large"))?;
    let checksum = parts
        .iter()
        .fold(crc32c::crc32c(&[kind]), |checksum, part| {
            crc32c::crc32c_append(checksum, part)
        });
    writer.write_all(&length.to_le_bytes()).await?;
    writer.write_all(&checksum.to_le_bytes()).await?;
    writer.write_u8(kind).await?;
    for part in parts {
        writer.write_all(part).await?;
    }
    peer.sent_bytes
        .inc_by(u64::from(length) + FRAME_HEADER_BYTES as u64);
    Ok(())
}

/// Bytes of a frame before its kind byte (length and checksum); the length
/// counts the kind byte and the payload.
const FRAME_HEADER_BYTES: usize = 8;

/// raft-rs sends this peer nothing more until it hears the snapshot's fate;
/// report it once all of it is on the wire, as etcd's transport does, so that a
/// peer that got it but stopped before installing it is probed again.
fn report_snapshot_sent(peer_id: u64, input: &SyncSender<Input>) {
    let _ = input.try_send(Input::SnapshotSent(peer_id));
}

/// Checks a connection's hello and answers it: accepted, refused, or (for a
/// joining member's query) the membership. Returns the sender's id.
async fn check_hello(
    hello: &[u8; 24],
    cluster_id: u64,
    stream: &mut TcpStream,
    allowed: &AllowedPeers,
    membership: &Arc<RwLock<keel_types::keelpb::StateMachineSnapshot>>,
) -> Result<u64, String> {
    if &hello[0..4] != HELLO_MAGIC {
        return Err("not a keel peer (bad hello)".into());
    }
    let version = u32::from_le_bytes(hello[4..8].try_into().expect("4 bytes"));
    let their_cluster = u64::from_le_bytes(hello[8..16].try_into().expect("8 bytes"));
    let sender = u64::from_le_bytes(hello[16..24].try_into().expect("8 bytes"));
    if version != PROTOCOL_VERSION {
        return Err(format!(
            "peer {sender:x} speaks protocol {version}, we speak {PROTOCOL_VERSION}"
        ));
    }
    if their_cluster == 0 && sender == 0 {
        let answer = prost::Message::encode_to_vec(&*membership.read().expect("not poisoned"));
        let mut bytes = vec![HELLO_MEMBERSHIP];
        bytes.extend_from_slice(&(answer.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&answer);
        let _ = stream.write_all(&bytes).await;
        return Err("answered a membership query".into());
    }
    if their_cluster != cluster_id {
        tracing::warn!(
            sender = format!("{sender:x}"),
            their_cluster = format!("{their_cluster:x}"),
            our_cluster = format!("{cluster_id:x}"),
            "refusing a peer from another cluster"
        );
        let _ = stream.write_u8(HELLO_REFUSED_OTHER_CLUSTER).await;
        return Err("cluster id mismatch".into());
    }
    if !allowed.read().expect("not poisoned").contains(&sender) {
        tracing::warn!(
            sender = format!("{sender:x}"),
            "refusing messages from a member that is not in the cluster (removed)"
        );
        let _ = stream.write_u8(HELLO_REFUSED_NOT_MEMBER).await;
        return Err("not a member".into());
    }
    stream
        .write_u8(HELLO_ACCEPTED)
        .await
        .map_err(|error| format!("answering the hello: {error}"))?;
    Ok(sender)
}

fn report_lost(message: &Message, input: &SyncSender<Input>) {
    if message.get_msg_type() == MessageType::MsgSnapshot {
        let _ = input.try_send(Input::SnapshotFailed(message.to));
    }
}

/// Accepts peer connections and passes their messages to the member loop.
/// Only current members may send; a removed member is told so and refused.
pub async fn serve_peers(
    listener: TcpListener,
    cluster_id: u64,
    limits: PeerReceiveLimits,
    input: SyncSender<Input>,
    allowed: AllowedPeers,
    membership: Arc<RwLock<keel_types::keelpb::StateMachineSnapshot>>,
    metrics: Arc<MemberMetrics>,
) {
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accepting a peer connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let input = input.clone();
        let allowed = allowed.clone();
        let membership = membership.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(reason) = receive_from_peer(
                stream, cluster_id, limits, input, allowed, membership, &metrics,
            )
            .await
            {
                tracing::debug!(%remote, %reason, "peer connection closed");
            }
        });
    }
}

async fn receive_from_peer(
    mut stream: TcpStream,
    cluster_id: u64,
    limits: PeerReceiveLimits,
    input: SyncSender<Input>,
    allowed: AllowedPeers,
    membership: Arc<RwLock<keel_types::keelpb::StateMachineSnapshot>>,
    metrics: &MemberMetrics,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let mut hello = [0u8; 24];
    stream
        .read_exact(&mut hello)
        .await
        .map_err(|error| format!("no hello: {error}"))?;
    let sender = check_hello(&hello, cluster_id, &mut stream, &allowed, &membership).await?;
    let peer = metrics.peer(sender);
    let mut reader = tokio::io::BufReader::with_capacity(64 * 1024, stream);
    let mut header = [0u8; 9];
    let mut buffer = Vec::new();
    let mut incoming: Option<IncomingSnapshot> = None;
    loop {
        if reader.read_exact(&mut header).await.is_err() {
            return Ok(());
        }
        let length = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        let checksum = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let kind = header[8];
        if length == 0 || length > limits.frame_bytes_max {
            return Err(format!(
                "frame of {length} bytes is outside 1..={}",
                limits.frame_bytes_max
            ));
        }
        let payload_length = length - 1;
        peer.received_bytes
            .inc_by((FRAME_HEADER_BYTES + length) as u64);
        if kind == FRAME_SNAPSHOT_CHUNK {
            // Read straight into the snapshot's buffer: no second copy.
            let Some(snapshot) = incoming.as_mut() else {
                return Err("snapshot chunk without a snapshot header".into());
            };
            let start = snapshot.data.len();
            if start + payload_length > snapshot.expected_bytes {
                return Err(format!(
                    "snapshot chunk overruns the announced {} bytes",
                    snapshot.expected_bytes
                ));
            }
            snapshot.data.resize(start + payload_length, 0);
            reader
                .read_exact(&mut snapshot.data[start..])
                .await
                .map_err(|error| format!("truncated snapshot chunk: {error}"))?;
            if crc32c::crc32c_append(crc32c::crc32c(&[kind]), &snapshot.data[start..]) != checksum {
                return Err("snapshot chunk checksum mismatch".into());
            }
            if snapshot.data.len() == snapshot.expected_bytes {
                let snapshot = incoming.take().expect("checked above");
                log_snapshot_received(metrics, &peer, &snapshot.message, snapshot.expected_bytes);
                deliver_snapshot(snapshot.message, snapshot.data.freeze(), &input);
            }
            continue;
        }
        buffer.resize(payload_length, 0);
        reader
            .read_exact(&mut buffer)
            .await
            .map_err(|error| format!("truncated frame: {error}"))?;
        if crc32c::crc32c_append(crc32c::crc32c(&[kind]), &buffer) != checksum {
            return Err("frame checksum mismatch".into());
        }
        match kind {
            FRAME_MESSAGE => {
                let message = decode_message(&buffer, sender)?;
                if message.get_msg_type() == MessageType::MsgHeartbeatResponse {
                    peer.heartbeat_response_received();
                }
                // A full input queue means the member is overloaded: drop, Raft resends.
                let _ = input.try_send(Input::Peer(Box::new(message)));
            }
            FRAME_SNAPSHOT_HEADER => {
                if incoming.is_some() {
                    return Err("a snapshot header inside another snapshot".into());
                }
                if buffer.len() < 8 {
                    return Err("snapshot header too short".into());
                }
                let expected_bytes = u64::from_le_bytes(buffer[0..8].try_into().expect("8 bytes"));
                if expected_bytes > limits.snapshot_bytes_max {
                    return Err(format!(
                        "snapshot of {expected_bytes} bytes exceeds the limit of {}",
                        limits.snapshot_bytes_max
                    ));
                }
                let message = decode_message(&buffer[8..], sender)?;
                if message.get_msg_type() != MessageType::MsgSnapshot {
                    return Err(format!(
                        "snapshot header holds a {:?}",
                        message.get_msg_type()
                    ));
                }
                let expected_bytes = expected_bytes as usize;
                tracing::info!(
                    member = %member_label(metrics.member_id()),
                    term = message.term,
                    sender = %member_label(sender),
                    index = message.get_snapshot().get_metadata().index,
                    bytes = expected_bytes,
                    "receiving a snapshot"
                );
                if expected_bytes == 0 {
                    log_snapshot_received(metrics, &peer, &message, 0);
                    deliver_snapshot(message, bytes::Bytes::new(), &input);
                } else {
                    incoming = Some(IncomingSnapshot {
                        message,
                        data: bytes::BytesMut::with_capacity(expected_bytes),
                        expected_bytes,
                    });
                }
            }
            unknown => return Err(format!("unknown frame kind {unknown}")),
        }
    }
}

/// Limits on what one peer connection may make this member hold.
#[derive(Clone, Copy, Debug)]
pub struct PeerReceiveLimits {
    /// Largest frame (one raft Message, or one snapshot chunk), in bytes.
    pub frame_bytes_max: usize,
    /// Largest snapshot image announced by a header, in bytes.
    pub snapshot_bytes_max: u64,
}

/// A snapshot being received: its message, and the data so far.
struct IncomingSnapshot {
    message: Message,
    data: bytes::BytesMut,
    expected_bytes: usize,
}

fn decode_message(bytes: &[u8], sender: u64) -> Result<Message, String> {
    let message = Message::parse_from_bytes(bytes)
        .map_err(|error| format!("undecodable raft message: {error}"))?;
    if message.from != sender {
        return Err(format!(
            "message claims to be from {:x} on a connection from {sender:x}",
            message.from
        ));
    }
    Ok(message)
}

/// One line per snapshot received in full, with member and term.
fn log_snapshot_received(
    metrics: &MemberMetrics,
    peer: &PeerMetrics,
    message: &Message,
    bytes: usize,
) {
    peer.snapshot_receives.inc();
    tracing::info!(
        member = %member_label(metrics.member_id()),
        term = message.term,
        sender = %member_label(message.from),
        index = message.get_snapshot().get_metadata().index,
        bytes,
        "snapshot received"
    );
}

fn deliver_snapshot(mut message: Message, data: bytes::Bytes, input: &SyncSender<Input>) {
    message.mut_snapshot().data = data;
    if input.try_send(Input::Peer(Box::new(message))).is_err() {
        // The leader hears nothing back and sends it again later.
        tracing::warn!("member overloaded: a received snapshot was dropped");
    }
}
