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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::mpsc::SyncSender;
use std::time::Duration;

use keel_core::eraftpb::{Message, MessageType};
use protobuf::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::member::Input;

const HELLO_MAGIC: &[u8; 4] = b"KEEL";
const PROTOCOL_VERSION: u32 = 1;

/// Senders to every peer, by member id.
#[derive(Debug, Clone, Default)]
pub struct PeerSenders {
    senders: BTreeMap<u64, mpsc::Sender<Message>>,
}

impl PeerSenders {
    /// Queues a message for its recipient, reporting what could not be queued.
    pub fn send(&self, message: Message, input: &SyncSender<Input>) {
        let to = message.to;
        let is_snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
        let Some(sender) = self.senders.get(&to) else {
            tracing::debug!(to, "message for an unknown peer dropped");
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

/// Starts one sender task per peer and returns their queues.
pub fn start_senders(
    runtime: &tokio::runtime::Handle,
    cluster_id: u64,
    own_id: u64,
    peers: &BTreeMap<u64, SocketAddr>,
    queue_messages_max: usize,
    input: SyncSender<Input>,
) -> PeerSenders {
    let mut senders = BTreeMap::new();
    for (&peer_id, &address) in peers {
        if peer_id == own_id {
            continue;
        }
        let (sender, receiver) = mpsc::channel(queue_messages_max);
        senders.insert(peer_id, sender);
        runtime.spawn(run_sender(
            cluster_id,
            own_id,
            peer_id,
            address,
            receiver,
            input.clone(),
        ));
    }
    PeerSenders { senders }
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
        let mut writer = BufWriter::with_capacity(64 * 1024, stream);
        let mut hello = Vec::with_capacity(24);
        hello.extend_from_slice(HELLO_MAGIC);
        hello.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        hello.extend_from_slice(&cluster_id.to_le_bytes());
        hello.extend_from_slice(&own_id.to_le_bytes());
        if writer.write_all(&hello).await.is_err() {
            report_lost(&first, &input);
            continue;
        }
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
        }
    }
}

fn report_lost(message: &Message, input: &SyncSender<Input>) {
    if message.get_msg_type() == MessageType::MsgSnapshot {
        let _ = input.try_send(Input::SnapshotFailed(message.to));
    }
}

/// Accepts peer connections and passes their messages to the member loop.
pub async fn serve_peers(
    listener: TcpListener,
    cluster_id: u64,
    frame_bytes_max: usize,
    input: SyncSender<Input>,
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
        tokio::spawn(async move {
            if let Err(reason) = receive_from_peer(stream, cluster_id, frame_bytes_max, input).await
            {
                tracing::debug!(%remote, %reason, "peer connection closed");
            }
        });
    }
}

async fn receive_from_peer(
    stream: TcpStream,
    cluster_id: u64,
    frame_bytes_max: usize,
    input: SyncSender<Input>,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let mut reader = tokio::io::BufReader::with_capacity(64 * 1024, stream);
    let mut hello = [0u8; 24];
    reader
        .read_exact(&mut hello)
        .await
        .map_err(|error| format!("no hello: {error}"))?;
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
    if their_cluster != cluster_id {
        tracing::warn!(
            sender = format!("{sender:x}"),
            their_cluster = format!("{their_cluster:x}"),
            our_cluster = format!("{cluster_id:x}"),
            "refusing a peer from another cluster"
        );
        return Err("cluster id mismatch".into());
    }
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
