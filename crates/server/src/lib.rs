//! keel's tokio shell: everything that touches the world.
//!
//! `server` opens the data directory (write-ahead log and snapshots), recovers
//! the core `Node` from it, runs the member loop on its own thread, connects to
//! peers over TCP and serves etcd's v3 gRPC API to clients. The core decides;
//! this crate only carries out its decisions and feeds it what happens.

pub mod config;
pub mod election;
pub mod grpc;
pub mod lease;
pub mod lock;
pub mod member;
pub mod transport;
pub mod watch;

/// Generated gRPC services and clients for etcd's v3 API.
#[allow(missing_docs, clippy::all)]
pub mod api {
    /// etcd's KV, Watch, Lease, Cluster, Maintenance and Auth services.
    pub mod etcdserverpb {
        include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
    }
    /// etcd's Lock service.
    pub mod v3lockpb {
        include!(concat!(env!("OUT_DIR"), "/v3lockpb.rs"));
    }
    /// etcd's Election service.
    pub mod v3electionpb {
        include!(concat!(env!("OUT_DIR"), "/v3electionpb.rs"));
    }
}

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc;

use keel_core::{DurableError, DurableState, Node, NodeConfig};
use keel_storage::FileDisk;
use tokio::net::TcpListener;

pub use config::{InitialClusterState, ServerConfig};

use crate::config::{cluster_id, parse_url_address};
use crate::member::Input;

/// Why a member could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(#[from] config::ConfigError),
    /// The data directory could not be read or written.
    #[error("storage: {0}")]
    Storage(#[from] DurableError),
    /// The data directory holds something that does not make sense.
    #[error("data directory {path}: {reason}")]
    Recovery {
        /// The data directory.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The core refused the recovered state.
    #[error("starting the member: {0}")]
    Start(#[from] keel_core::StartError),
    /// A listening socket could not be opened.
    #[error("listening on {address}: {source}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("serving clients: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A running member.
pub struct Server {
    input: mpsc::SyncSender<Input>,
    member_thread: Option<std::thread::JoinHandle<Result<(), DurableError>>>,
    client_addresses: Vec<SocketAddr>,
    serve_tasks: Vec<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
    peer_task: Vec<tokio::task::JoinHandle<()>>,
    member_stopped: tokio::sync::watch::Receiver<bool>,
}

impl Server {
    /// Recovers the member from its data directory and starts serving.
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        config.validate()?;
        let member_directory = config.data_dir.join("member");
        std::fs::create_dir_all(&member_directory).map_err(|source| ServerError::Recovery {
            path: config.data_dir.display().to_string(),
            reason: format!("cannot create the data directory: {source}"),
        })?;
        let disk = FileDisk::new(&member_directory);
        let (mut durable, recovered) = DurableState::open(disk)
            .map_err(|error| recovery_error(&member_directory, error.to_string()))?;
        let recovered = match recovered {
            Some(recovered) => recovered,
            None => {
                if config.initial_cluster_state == InitialClusterState::Existing {
                    return Err(recovery_error(
                        &member_directory,
                        "joining an existing cluster (--initial-cluster-state existing) needs \
                         MemberAdd, which this version does not implement yet"
                            .into(),
                    ));
                }
                let members = config.initial_members();
                durable
                    .bootstrap(members.clone(), cluster_id(&members))
                    .map_err(|error| recovery_error(&member_directory, error.to_string()))?
            }
        };
        let member_id = config.member_id();
        let mut node_config = NodeConfig::with_member_id(member_id);
        node_config.election_ticks = config.election_ticks();
        node_config.heartbeat_ticks = 1;
        node_config.snapshot_entries_interval = config.snapshot_count;
        node_config.snapshot_catch_up_entries = config.snapshot_catch_up_entries;
        node_config.request_bytes_max = config.request_bytes_max;
        node_config.txn_operations_max = config.txn_operations_max;
        node_config.random_seed = rand::random();
        node_config.boot_epoch = rand::random();
        // etcd's request timeout: 7 s, in ticks.
        node_config.tick_milliseconds = config.heartbeat_interval.as_millis().max(1) as u64;
        // The checkpoint interval bounds how long a lease can outlive its TTL
        // across a leader change (plus an election); see core's lease module.
        node_config.lease_checkpoint_interval_ticks = (config.lease_checkpoint_interval.as_millis()
            / config.heartbeat_interval.as_millis().max(1))
        .max(1) as u64;
        node_config.request_timeout_ticks =
            (7_000 / config.heartbeat_interval.as_millis().max(1)) as u64;
        let logger = keel_core::raft_logger::raft_logger(member_id);
        let node = Node::new(node_config, recovered, &logger)?;

        let members = node.members().to_vec();
        let cluster = node.status().cluster_id;
        if !members.iter().any(|member| member.id == member_id) {
            return Err(recovery_error(
                &member_directory,
                format!(
                    "this member ({member_id:x}) is not in the cluster's membership; \
                     it was removed or its --initial-advertise-peer-urls changed"
                ),
            ));
        }
        let mut peer_addresses = BTreeMap::new();
        for member in &members {
            if let Some(url) = member.peer_urls.first() {
                peer_addresses.insert(member.id, parse_url_address(url)?);
            }
        }

        let (input, inputs) = mpsc::sync_channel(config.input_queue_max);
        let runtime = tokio::runtime::Handle::current();
        let peers = transport::start_senders(
            &runtime,
            cluster,
            member_id,
            &peer_addresses,
            config.peer_queue_messages_max,
            input.clone(),
        );
        let mut peer_task = Vec::new();
        for &address in &config.listen_peer_addresses {
            let listener = TcpListener::bind(address)
                .await
                .map_err(|source| ServerError::Listen { address, source })?;
            peer_task.push(tokio::spawn(transport::serve_peers(
                listener,
                cluster,
                config.peer_frame_bytes_max,
                input.clone(),
            )));
        }

        let tick_interval = config.heartbeat_interval;
        let loop_input = input.clone();
        let (stopped_sender, member_stopped) = tokio::sync::watch::channel(false);
        let (revision_sender, revision_receiver) = tokio::sync::watch::channel(0i64);
        let member_thread = std::thread::Builder::new()
            .name(format!("keel-member-{}", config.name))
            .spawn(move || {
                let result = member::run(
                    node,
                    durable,
                    inputs,
                    loop_input,
                    peers,
                    tick_interval,
                    revision_sender,
                );
                if let Err(error) = &result {
                    tracing::error!(%error, "member loop stopped: storage failed");
                }
                let _ = stopped_sender.send(true);
                result
            })
            .expect("spawning the member thread");

        let services = grpc::Services::new(input.clone(), revision_receiver.clone());
        let mut serve_tasks = Vec::new();
        let mut client_addresses = Vec::new();
        for &address in &config.listen_client_addresses {
            let listener = TcpListener::bind(address)
                .await
                .map_err(|source| ServerError::Listen { address, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| ServerError::Listen { address, source })?;
            client_addresses.push(bound);
            // Nagle's algorithm would hold a response's second HTTP/2 frame
            // until the client's delayed ACK (40 ms): measured reads took 44 ms.
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            let decoding_limit = config.request_bytes_max + GRPC_OVERHEAD_BYTES;
            let router = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(
                    api::etcdserverpb::kv_server::KvServer::new(services.clone())
                        .max_decoding_message_size(decoding_limit)
                        .max_encoding_message_size(usize::MAX),
                )
                .add_service(
                    api::etcdserverpb::watch_server::WatchServer::new(watch::WatchService::new(
                        services.clone(),
                    ))
                    .max_decoding_message_size(decoding_limit),
                )
                .add_service(
                    api::etcdserverpb::lease_server::LeaseServer::new(lease::LeaseService::new(
                        services.clone(),
                    ))
                    .max_decoding_message_size(decoding_limit),
                )
                .add_service(
                    api::v3lockpb::lock_server::LockServer::new(lock::LockService::new(
                        services.clone(),
                    ))
                    .max_decoding_message_size(decoding_limit),
                )
                .add_service(
                    api::v3electionpb::election_server::ElectionServer::new(
                        election::ElectionService::new(services.clone()),
                    )
                    .max_decoding_message_size(decoding_limit),
                )
                .add_service(
                    api::etcdserverpb::cluster_server::ClusterServer::new(services.clone())
                        .max_decoding_message_size(decoding_limit),
                )
                .add_service(
                    api::etcdserverpb::maintenance_server::MaintenanceServer::new(services.clone())
                        .max_decoding_message_size(decoding_limit),
                );
            serve_tasks.push(tokio::spawn(router.serve_with_incoming(incoming)));
        }
        serve_tasks.push(tokio::spawn(publish_attributes(
            services.clone(),
            keel_types::keelpb::MemberRecord {
                id: member_id,
                name: config.name.clone(),
                client_urls: config.advertise_client_urls.clone(),
                ..Default::default()
            },
        )));
        tracing::info!(
            name = %config.name,
            member_id = format!("{member_id:x}"),
            cluster_id = format!("{cluster:x}"),
            clients = ?client_addresses,
            "member started"
        );
        Ok(Server {
            input,
            member_thread: Some(member_thread),
            client_addresses,
            serve_tasks,
            peer_task,
            member_stopped,
        })
    }

    /// The addresses clients can reach this member on.
    pub fn client_addresses(&self) -> &[SocketAddr] {
        &self.client_addresses
    }

    /// Waits until the member loop stops by itself (a storage failure).
    pub async fn stopped(&mut self) {
        let _ = self.member_stopped.wait_for(|stopped| *stopped).await;
    }

    /// Stops serving and waits for the member loop to finish its current batch.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        for task in self.serve_tasks.drain(..) {
            task.abort();
        }
        for task in self.peer_task.drain(..) {
            task.abort();
        }
        let _ = self.input.try_send(Input::Shutdown);
        let thread = self.member_thread.take().expect("joined once");
        let result = tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("joining the member thread");
        match result {
            Ok(result) => result.map_err(ServerError::from),
            Err(_) => Err(recovery_error(
                Path::new("."),
                "the member thread panicked".into(),
            )),
        }
    }
}

/// Announces this member's name and client URLs through the log until the
/// cluster has recorded them (etcd's "publish"), retrying while there is no
/// leader. Returns once they are recorded.
async fn publish_attributes(
    services: grpc::Services,
    attributes: keel_types::keelpb::MemberRecord,
) -> Result<(), tonic::transport::Error> {
    loop {
        if let Ok((_, members)) = services.status().await {
            let recorded = members.iter().any(|member| {
                member.id == attributes.id
                    && member.name == attributes.name
                    && member.client_urls == attributes.client_urls
            });
            if recorded {
                return Ok(());
            }
            let _ = services
                .write_raw(keel_core::WriteRequest::MemberAttributes(
                    attributes.clone(),
                ))
                .await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Room for gRPC framing on top of the largest request, as etcd allows.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

fn recovery_error(path: &Path, reason: String) -> ServerError {
    ServerError::Recovery {
        path: path.display().to_string(),
        reason,
    }
}
