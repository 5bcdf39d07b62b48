//! Peer transport: Raft messages between members over TCP.
//!
//! Each member keeps one outgoing connection per peer, fed by a bounded queue,
//! and accepts incoming connections on its peer address. A frame is
//! `[u32 length][u32 crc32c][protobuf-encoded raft Message]`. Raft tolerates
//! lost messages, so a full queue or a broken connection drops messages instead
//! of blocking the member loop; a dropped snapshot is reported back, because
//! raft-rs waits for that report before trying again.
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
use keel_types::keelpb::MemberRecord;

const HELLO_MAGIC: &[u8; 4] = b"KEEL";
const PROTOCOL_VERSION: u32 = 1;

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
    senders: BTreeMap<u64, (SocketAddr, mpsc::Sender<Message>)>,
}

impl PeerSenders {
    /// No peers yet; call [`PeerSenders::follow_membership`].
    pub fn new(
        runtime: tokio::runtime::Handle,
        cluster_id: u64,
        own_id: u64,
        queue_messages_max: usize,
        input: SyncSender<Input>,
    ) -> Self {
        PeerSenders {
            runtime,
            cluster_id,
            own_id,
            queue_messages_max,
            input,
            senders: BTreeMap::new(),
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
            .retain(|id, (address, _)| wanted.get(id) == Some(address));
        for (id, address) in wanted {
            if self.senders.contains_key(&id) {
                continue;
            }
            let (sender, receiver) = mpsc::channel(self.queue_messages_max);
            self.runtime.spawn(run_sender(
                self.cluster_id,
                self.own_id,
                id,
                address,
                receiver,
                self.input.clone(),
            ));
            self.senders.insert(id, (address, sender));
        }
    }

    /// Queues a message for its recipient, reporting what could not be queued.
    pub fn send(&self, message: Message, input: &SyncSender<Input>) {
        let to = message.to;
        let is_snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
        let Some((_, sender)) = self.senders.get(&to) else {
            tracing::debug!(to, "message for an unknown peer dropped");
            if is_snapshot {
                let _ = input.try_send(Input::SnapshotFailed(to));
            }
            return;
        };
        if sender.try_send(message).is_err() {
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
                let _ = input.try_send(Input::Unreachable(peer_id));
                // Drop what queued up meanwhile: Raft will resend what matters.
                while let Ok(message) = receiver.try_recv() {
                    report_lost(&message, &input);
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
        loop {
            let message = match next.take() {
                Some(message) => message,
                None => match receiver.try_recv() {
                    Ok(message) => message,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        // Flush only when the queue is empty: many messages share
                        // one system call under load.
                        if writer.flush().await.is_err() {
                            break;
                        }
                        match receiver.recv().await {
                            Some(message) => message,
                            None => return,
                        }
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                },
            };
            let is_snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
            let bytes = message
                .write_to_bytes()
                .expect("encoding a raft message cannot fail");
            let checksum = crc32c::crc32c(&bytes);
            let written = async {
                writer
                    .write_all(&(bytes.len() as u32).to_le_bytes())
                    .await?;
                writer.write_all(&checksum.to_le_bytes()).await?;
                writer.write_all(&bytes).await
            }
            .await;
            if written.is_err() {
                report_lost(&message, &input);
                let _ = input.try_send(Input::Unreachable(peer_id));
                break;
            }
            if is_snapshot {
                // raft-rs sends this peer nothing until it hears the snapshot's fate;
                // report it once it is on the wire, as etcd's transport does, so that a
                // peer that got it but stopped before installing it is probed again.
                if writer.flush().await.is_err() {
                    report_lost(&message, &input);
                    let _ = input.try_send(Input::Unreachable(peer_id));
                    break;
                }
                let _ = input.try_send(Input::SnapshotSent(peer_id));
            }
        }
    }
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
    frame_bytes_max: usize,
    input: SyncSender<Input>,
    allowed: AllowedPeers,
    membership: Arc<RwLock<keel_types::keelpb::StateMachineSnapshot>>,
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
        tokio::spawn(async move {
            if let Err(reason) = receive_from_peer(
                stream,
                cluster_id,
                frame_bytes_max,
                input,
                allowed,
                membership,
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
    frame_bytes_max: usize,
    input: SyncSender<Input>,
    allowed: AllowedPeers,
    membership: Arc<RwLock<keel_types::keelpb::StateMachineSnapshot>>,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let mut hello = [0u8; 24];
    stream
        .read_exact(&mut hello)
        .await
        .map_err(|error| format!("no hello: {error}"))?;
    let sender = check_hello(&hello, cluster_id, &mut stream, &allowed, &membership).await?;
    let mut reader = tokio::io::BufReader::with_capacity(64 * 1024, stream);
    let mut header = [0u8; 8];
    let mut buffer = Vec::new();
    loop {
        if reader.read_exact(&mut header).await.is_err() {
            return Ok(());
        }
        let length = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        let checksum = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        if length > frame_bytes_max {
            return Err(format!(
                "frame of {length} bytes exceeds the limit of {frame_bytes_max}"
            ));
        }
        buffer.resize(length, 0);
        reader
            .read_exact(&mut buffer)
            .await
            .map_err(|error| format!("truncated frame: {error}"))?;
        if crc32c::crc32c(&buffer) != checksum {
            return Err("frame checksum mismatch".into());
        }
        let message = Message::parse_from_bytes(&buffer)
            .map_err(|error| format!("undecodable raft message: {error}"))?;
        if message.from != sender {
            return Err(format!(
                "message claims to be from {:x} on a connection from {sender:x}",
                message.from
            ));
        }
        // A full input queue means the member is overloaded: drop, Raft resends.
        let _ = input.try_send(Input::Peer(Box::new(message)));
    }
}
