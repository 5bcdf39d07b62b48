//! keel's tokio shell: everything that touches the world.
//!
//! `server` opens the data directory (write-ahead log and snapshots), recovers
//! the core `Node` from it, runs the member loop on its own thread, connects to
//! peers over TCP and serves etcd's v3 gRPC API to clients, and its JSON
//! gateway over HTTP/1.1 on the same port. The core decides;
//! this crate only carries out its decisions and feeds it what happens.

pub mod auth;
pub mod authority_repair;
pub mod config;
pub mod corruption;
pub mod election;
pub mod fault_injection;
pub mod gateway;
pub mod grpc;
pub mod health;
pub mod lease;
pub mod lock;
pub mod loop_timing;
pub mod member;
pub mod member_observer;
pub mod metrics;
pub mod observability;
pub mod read_view;
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
    /// keel's fault-injection admin service (`keel chaos`).
    pub mod keelchaospb {
        include!(concat!(env!("OUT_DIR"), "/keelchaospb.rs"));
    }
}

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{mpsc, Arc};

use keel_core::{DurableError, DurableState, Node, NodeConfig};
use keel_storage::FileDisk;
use tokio::net::TcpListener;

pub use config::{InitialClusterState, ServerConfig};

use crate::config::{cluster_id, parse_url_address};
use crate::member::Input;
pub use crate::member::StopReason;

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
    /// Another process holds the data directory's lock: two members on one
    /// write-ahead log would truncate and overwrite each other's records.
    #[error("data directory {path} is in use by another keel process (it holds {path}/{DATA_DIRECTORY_LOCK_FILE}); stop it, or choose another --data-dir")]
    DataDirectoryInUse {
        /// The data directory.
        path: String,
    },
    /// The gRPC server failed.
    #[error("serving clients: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A running member.
pub struct Server {
    input: mpsc::SyncSender<Input>,
    member_thread: Option<std::thread::JoinHandle<Result<StopReason, DurableError>>>,
    client_addresses: Vec<SocketAddr>,
    metrics_addresses: Vec<SocketAddr>,
    serve_tasks: Vec<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
    peer_task: Vec<tokio::task::JoinHandle<()>>,
    http_tasks: Vec<tokio::task::JoinHandle<()>>,
    member_stopped: tokio::sync::watch::Receiver<Option<StopReason>>,
    /// Held (an exclusive advisory lock) for as long as the member runs; the
    /// operating system releases it when the process exits, even on kill -9.
    _data_directory_lock: std::fs::File,
}

/// The file in a data directory whose lock says a process is using it.
pub const DATA_DIRECTORY_LOCK_FILE: &str = "lock";

/// Creates `data_dir` if needed and takes its exclusive lock, without waiting:
/// a second member (or a restore) on a data directory in use is refused at
/// once, before it reads the write-ahead log, whose torn-tail repair would
/// otherwise cut records the running member is still writing.
pub fn lock_data_directory(data_dir: &Path) -> Result<std::fs::File, ServerError> {
    std::fs::create_dir_all(data_dir).map_err(|source| ServerError::Recovery {
        path: data_dir.display().to_string(),
        reason: format!("cannot create the data directory: {source}"),
    })?;
    let path = data_dir.join(DATA_DIRECTORY_LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| ServerError::Recovery {
            path: path.display().to_string(),
            reason: format!("cannot open the lock file: {source}"),
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(ServerError::DataDirectoryInUse {
            path: data_dir.display().to_string(),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(ServerError::Recovery {
            path: path.display().to_string(),
            reason: format!("cannot lock: {source}"),
        }),
    }
}

impl Server {
    /// Recovers the member from its data directory and starts serving.
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        config.validate()?;
        let data_directory_lock = lock_data_directory(&config.data_dir)?;
        let member_directory = config.data_dir.join("member");
        std::fs::create_dir_all(&member_directory).map_err(|source| ServerError::Recovery {
            path: config.data_dir.display().to_string(),
            reason: format!("cannot create the data directory: {source}"),
        })?;
        let metrics = Arc::new(metrics::MemberMetrics::new(grpc::ETCD_COMPATIBLE_VERSION));
        // The member's id is known only after recovery; the injector learns it below.
        let faults = config
            .enable_fault_injection
            .then(|| fault_injection::FaultInjector::new(0, &config.name));
        let mut file_disk = FileDisk::new(&member_directory);
        if let Some(faults) = &faults {
            tracing::warn!("fault injection is on (--experimental-enable-fault-injection)");
            file_disk = file_disk.with_faults(faults.clone());
        }
        if config.unsafe_acknowledge_before_fsync {
            tracing::error!(
                "--unsafe-fault-acknowledge-before-fsync: writes are acknowledged before they \
                 are durable; this member WILL lose data (test-only switch)"
            );
            file_disk = file_disk.with_unsafe_acknowledge_before_write();
        }
        let disk = metrics::disk::MeteredDisk::new(file_disk, metrics.clone());
        let opening_started = std::time::Instant::now();
        let opening = DurableState::open_snapshot(disk)
            .map_err(|error| recovery_error(&member_directory, error.to_string()))?;
        // Restoring the snapshot's key space and replaying the log are most of a
        // restart at a million keys: they run on two threads at once.
        let restoring = opening.snapshot().and_then(|snapshot| {
            let data = snapshot.data.clone();
            std::thread::Builder::new()
                .name("keel-restore".to_owned())
                .spawn(move || keel_core::StateMachine::decode(&data))
                .ok()
        });
        let (mut durable, recovered) = opening
            .open_log()
            .map_err(|error| recovery_error(&member_directory, error.to_string()))?;
        let recovered = match recovered {
            Some(recovered) => recovered,
            None if config.initial_cluster_state == InitialClusterState::Existing => {
                join_existing_cluster(&config).await?
            }
            None => {
                let members = config.initial_members();
                durable
                    .bootstrap(members.clone(), cluster_id(&members))
                    .map_err(|error| recovery_error(&member_directory, error.to_string()))?
            }
        };
        let member_id = own_member_id(&config, &recovered);
        metrics.identify(member_id);
        if let Some(faults) = &faults {
            faults.set_member_id(member_id);
        }
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
        node_config.quota_bytes = config.quota_bytes;
        node_config.corrupt_values_of_key = config.corrupt_values_of_key.clone();
        node_config.auto_compaction = match config.auto_compaction {
            config::AutoCompaction::Off => keel_core::AutoCompactionPolicy::Off,
            config::AutoCompaction::Revision(keep) => {
                keel_core::AutoCompactionPolicy::KeepRevisions(keep)
            }
            config::AutoCompaction::Periodic(keep) => keel_core::AutoCompactionPolicy::KeepTicks(
                (keep.as_millis() / config.heartbeat_interval.as_millis().max(1)).max(1) as u64,
            ),
        };
        // The checkpoint interval bounds how long a lease can outlive its TTL
        // across a leader change (plus an election); see core's lease module.
        node_config.lease_checkpoint_interval_ticks = (config.lease_checkpoint_interval.as_millis()
            / config.heartbeat_interval.as_millis().max(1))
        .max(1) as u64;
        node_config.request_timeout_ticks =
            (7_000 / config.heartbeat_interval.as_millis().max(1)) as u64;
        let logger = keel_core::raft_logger::raft_logger(member_id);
        let read_milliseconds = opening_started.elapsed().as_millis() as u64;
        let snapshot_bytes = recovered.snapshot.data.len();
        let entry_count = recovered.entries.len();
        // No restoring thread (a new member, or none could be started): the node
        // restores the snapshot itself.
        let node = match restoring {
            Some(restoring) => {
                let state_machine = restoring
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                    .map_err(keel_core::node::StartError::from)?;
                Node::with_state_machine(node_config, recovered, state_machine, &logger)?
            }
            None => Node::new(node_config, recovered, &logger)?,
        };
        // Where a restart's time goes (issue 16's goal: a million keys to serving
        // reads in under 2 s).
        tracing::info!(
            read_milliseconds,
            restore_milliseconds = opening_started.elapsed().as_millis() as u64 - read_milliseconds,
            snapshot_bytes,
            entry_count,
            "recovered the snapshot and the log"
        );

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
        let (input, inputs) = mpsc::sync_channel(config.input_queue_max);
        let runtime = tokio::runtime::Handle::current();
        let peers = transport::PeerSenders::new(
            runtime,
            cluster,
            member_id,
            config.peer_queue_messages_max,
            input.clone(),
            metrics.clone(),
        )
        .with_faults(faults.clone());
        let view = member::MembershipView {
            allowed: Default::default(),
            membership: Default::default(),
            corrupt: Default::default(),
        };
        let corrupt = view.corrupt.clone();
        let allowed = view.allowed.clone();
        let membership = view.membership.clone();
        *allowed.write().expect("not poisoned") = members.iter().map(|member| member.id).collect();
        let mut peer_task = Vec::new();
        for &address in &config.listen_peer_addresses {
            let listener = TcpListener::bind(address)
                .await
                .map_err(|source| ServerError::Listen { address, source })?;
            peer_task.push(tokio::spawn(transport::serve_peers(
                listener,
                transport::PeerReceiver {
                    cluster_id: cluster,
                    limits: transport::PeerReceiveLimits {
                        frame_bytes_max: config.peer_frame_bytes_max,
                        snapshot_bytes_max: config.peer_snapshot_bytes_max,
                    },
                    input: input.clone(),
                    allowed: allowed.clone(),
                    membership: membership.clone(),
                    metrics: metrics.clone(),
                    faults: faults.clone(),
                },
            )));
        }

        let tick_clock = fault_injection::TickClock::new(config.heartbeat_interval, faults.clone());
        let loop_input = input.clone();
        let (stopped_sender, member_stopped) = tokio::sync::watch::channel(None);
        let (revision_sender, revision_receiver) = tokio::sync::watch::channel(0i64);
        let loop_metrics = metrics.clone();
        let read_view = Arc::new(read_view::ReadView::default());
        let loop_read_view = read_view.clone();
        let member_thread = std::thread::Builder::new()
            .name(format!("keel-member-{}", config.name))
            .spawn(move || {
                let result = member::run(
                    node,
                    durable,
                    inputs,
                    loop_input,
                    peers,
                    tick_clock,
                    revision_sender,
                    view,
                    loop_read_view,
                    loop_metrics,
                );
                let reason = match &result {
                    Ok(reason) => *reason,
                    Err(error) => {
                        tracing::error!(%error, "member loop stopped: storage failed");
                        StopReason::StorageFailed
                    }
                };
                let _ = stopped_sender.send(Some(reason));
                result
            })
            .expect("spawning the member thread");

        let services =
            grpc::Services::new(input.clone(), revision_receiver.clone(), corrupt, read_view);
        // One Watch service, and so one event feed, for every listener, with
        // fragments sized from this member's request limit as etcd does.
        let watch_service = watch::WatchService::with_config(
            services.clone(),
            watch::WatchConfig::with_request_bytes_max(config.request_bytes_max),
        );
        let mut serve_tasks = Vec::new();
        if let Some(faults) = &faults {
            tokio::spawn(faults.clone().expire_periodically());
        }
        let chaos_service = fault_injection::ChaosService::new(
            faults.clone(),
            config.fault_injection_token.clone(),
        );
        if let Some(interval) = config.corruption_check_interval {
            serve_tasks.push(tokio::spawn(corruption::check_periodically(
                services.clone(),
                member_id,
                interval,
            )));
        }
        // /metrics, /health, /livez and /readyz: on every client port, as etcd
        // serves them, and on --listen-metrics-urls.
        let observability_router = observability::router(observability::Observability::new(
            metrics.clone(),
            services.clone(),
        ));
        let mut client_addresses = Vec::new();
        for &address in &config.listen_client_addresses {
            let listener = TcpListener::bind(address)
                .await
                .map_err(|source| ServerError::Listen { address, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| ServerError::Listen { address, source })?;
            client_addresses.push(bound);
            let decoding_limit = config.request_bytes_max + GRPC_OVERHEAD_BYTES;
            let router = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .layer(metrics::grpc::GrpcMetricsLayer::new(metrics.grpc.clone()))
                .add_service(
                    api::etcdserverpb::kv_server::KvServer::new(services.clone())
                        .max_decoding_message_size(decoding_limit)
                        .max_encoding_message_size(usize::MAX),
                )
                .add_service(
                    api::etcdserverpb::watch_server::WatchServer::new(watch_service.clone())
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
                )
                .add_service(
                    api::etcdserverpb::auth_server::AuthServer::new(auth::AuthService)
                        .max_decoding_message_size(decoding_limit),
                )
                .add_service(api::keelchaospb::chaos_server::ChaosServer::new(
                    chaos_service.clone(),
                ));
            let http = gateway::http_router(gateway::GatewayServices {
                services: services.clone(),
                lease: lease::LeaseService::new(services.clone()),
                watch: watch_service.clone(),
                auth: auth::AuthService,
                request_body_bytes_max: gateway::request_body_bytes_max(config.request_bytes_max),
            })
            .merge(observability_router.clone());
            serve_tasks.push(tokio::spawn(gateway::multiplex::serve_client_port(
                listener, router, http,
            )));
        }
        let mut metrics_addresses = Vec::new();
        let mut http_tasks = Vec::new();
        for &address in &config.listen_metrics_addresses {
            let listener = observability::bind(address).await?;
            metrics_addresses.push(
                listener
                    .local_addr()
                    .map_err(|source| ServerError::Listen { address, source })?,
            );
            http_tasks.push(tokio::spawn(observability::serve(
                listener,
                observability_router.clone(),
            )));
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
            metrics = ?metrics_addresses,
            "member started"
        );
        Ok(Server {
            input,
            member_thread: Some(member_thread),
            client_addresses,
            metrics_addresses,
            serve_tasks,
            peer_task,
            http_tasks,
            member_stopped,
            _data_directory_lock: data_directory_lock,
        })
    }

    /// The addresses clients can reach this member on.
    pub fn client_addresses(&self) -> &[SocketAddr] {
        &self.client_addresses
    }

    /// The addresses `/metrics` and the health endpoints are served on.
    pub fn metrics_addresses(&self) -> &[SocketAddr] {
        &self.metrics_addresses
    }

    /// Waits until the member loop stops by itself (removal or a storage
    /// failure) and says why.
    pub async fn stopped(&mut self) -> StopReason {
        match self
            .member_stopped
            .wait_for(|stopped| stopped.is_some())
            .await
        {
            Ok(reason) => reason.unwrap_or(StopReason::Shutdown),
            Err(_) => StopReason::Shutdown,
        }
    }

    /// Stops serving and waits for the member loop to finish its current batch.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        for task in self.serve_tasks.drain(..) {
            task.abort();
        }
        for task in self.peer_task.drain(..) {
            task.abort();
        }
        for task in self.http_tasks.drain(..) {
            task.abort();
        }
        let _ = self.input.try_send(Input::Shutdown);
        let thread = self.member_thread.take().expect("joined once");
        let result = tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("joining the member thread");
        match result {
            Ok(result) => result.map(|_| ()).map_err(ServerError::from),
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

/// Builds a new member's data directory from a backup file (`keel snapshot
/// restore`, like etcdutl's): the backup's data under the membership of
/// `config`'s `--initial-cluster`, as a new cluster with a new identity.
/// Refuses to touch a data directory that already holds a member.
pub fn restore_backup(config: &ServerConfig, backup: &[u8]) -> Result<(), ServerError> {
    config.validate()?;
    let _data_directory_lock = lock_data_directory(&config.data_dir)?;
    let member_directory = config.data_dir.join("member");
    if member_directory.exists() {
        return Err(recovery_error(
            &member_directory,
            "already holds a member; restore into an empty --data-dir".into(),
        ));
    }
    std::fs::create_dir_all(&member_directory).map_err(|source| ServerError::Recovery {
        path: member_directory.display().to_string(),
        reason: format!("cannot create the data directory: {source}"),
    })?;
    let members = config.initial_members();
    let snapshot = keel_core::backup::restore(backup, members.clone(), cluster_id(&members))
        .map_err(|error| recovery_error(&member_directory, format!("backup: {error}")))?;
    let (mut durable, _) = DurableState::open(FileDisk::new(&member_directory))?;
    durable.install_restored(&snapshot)?;
    Ok(())
}

/// This member's id: the member whose peer URLs are ours in the recovered
/// membership. Founding members could derive it from the flags, but a member
/// added at run time got its id from MemberAdd, so the data is the authority.
fn own_member_id(config: &ServerConfig, recovered: &keel_core::Recovered) -> u64 {
    let members =
        keel_core::StateMachine::decode_members(&recovered.snapshot.data).unwrap_or_default();
    members
        .iter()
        .find(|member| {
            member
                .peer_urls
                .iter()
                .any(|url| config.initial_advertise_peer_urls.contains(url))
        })
        .map_or_else(|| config.member_id(), |member| member.id)
}

/// Learns the cluster's id and membership from the members listed in
/// `--initial-cluster`, finds this member in it (it must have been added with
/// MemberAdd first), and returns the state a new member starts from: nothing
/// but the membership, with an empty log. The leader then sends a snapshot.
async fn join_existing_cluster(config: &ServerConfig) -> Result<keel_core::Recovered, ServerError> {
    let own_urls: Vec<&String> = config.initial_advertise_peer_urls.iter().collect();
    let mut errors = Vec::new();
    for (name, urls) in &config.initial_cluster {
        if name == &config.name {
            continue;
        }
        for url in urls {
            let address = parse_url_address(url)?;
            match transport::query_membership(address).await {
                Ok(answer) => {
                    let Some(own) = answer
                        .members
                        .iter()
                        .find(|member| member.peer_urls.iter().any(|url| own_urls.contains(&url)))
                    else {
                        return Err(ServerError::Config(config::ConfigError(format!(
                            "the cluster at {url} has no member with peer URLs {:?}; add this \
                             member first (etcdctl member add {} --peer-urls={})",
                            config.initial_advertise_peer_urls,
                            config.name,
                            config.initial_advertise_peer_urls.join(",")
                        ))));
                    };
                    tracing::info!(
                        member_id = format!("{:x}", own.id),
                        cluster_id = format!("{:x}", answer.cluster_id),
                        "joining an existing cluster"
                    );
                    let mut state_machine =
                        keel_core::StateMachine::new(answer.members.clone(), answer.cluster_id);
                    state_machine.set_applied_index(0);
                    let snapshot = keel_core::eraftpb::Snapshot {
                        data: state_machine.encode().into(),
                        ..Default::default()
                    };
                    return Ok(keel_core::Recovered {
                        snapshot,
                        hard_state: None,
                        entries: Vec::new(),
                    });
                }
                Err(error) => errors.push(error),
            }
        }
    }
    Err(ServerError::Config(config::ConfigError(format!(
        "--initial-cluster-state existing: no member of --initial-cluster answered: {}",
        errors.join("; ")
    ))))
}

/// Room for gRPC framing on top of the largest request, as etcd allows.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

fn recovery_error(path: &Path, reason: String) -> ServerError {
    ServerError::Recovery {
        path: path.display().to_string(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_in_use_is_refused_and_free_again_after() {
        let directory = tempfile::tempdir().expect("a temporary directory");
        let held = lock_data_directory(directory.path()).expect("the first lock");
        match lock_data_directory(directory.path()) {
            Err(ServerError::DataDirectoryInUse { path }) => {
                assert_eq!(path, directory.path().display().to_string())
            }
            other => panic!("a second lock must be refused, got {other:?}"),
        }
        drop(held);
        lock_data_directory(directory.path()).expect("free once the holder let go");
    }
}
