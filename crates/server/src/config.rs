//! A member's configuration, in etcd's terms: the same flag names and meanings,
//! so a script that starts etcd can start keel by changing the binary name.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use keel_types::keelpb::MemberRecord;

/// Whether this member founds a new cluster or joins an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialClusterState {
    /// All members in `initial_cluster` start together and form a new cluster.
    New,
    /// The cluster exists; this member was added to it with MemberAdd.
    Existing,
}

/// How old revisions are compacted away automatically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCompaction {
    /// Never: history grows until a client compacts.
    Off,
    /// Keep this much time of history (etcd's periodic mode).
    Periodic(Duration),
    /// Keep this many revisions of history (etcd's revision mode).
    Revision(u64),
}

/// A configuration value that cannot be used, with a message naming it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Everything a member needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// This member's human-readable name (etcd's `--name`).
    pub name: String,
    /// Where the write-ahead log and snapshots live (`--data-dir`).
    pub data_dir: PathBuf,
    /// Addresses to serve clients on (`--listen-client-urls`).
    pub listen_client_addresses: Vec<SocketAddr>,
    /// URLs clients are told to use (`--advertise-client-urls`).
    pub advertise_client_urls: Vec<String>,
    /// Addresses to serve `/metrics`, `/health`, `/livez` and `/readyz` on,
    /// over plain HTTP (`--listen-metrics-urls`); none by default, as etcd.
    pub listen_metrics_addresses: Vec<SocketAddr>,
    /// Addresses to serve peers on (`--listen-peer-urls`).
    pub listen_peer_addresses: Vec<SocketAddr>,
    /// URLs peers use to reach this member (`--initial-advertise-peer-urls`).
    pub initial_advertise_peer_urls: Vec<String>,
    /// The founding members: name and peer URLs (`--initial-cluster`).
    pub initial_cluster: Vec<(String, Vec<String>)>,
    /// `--initial-cluster-state`.
    pub initial_cluster_state: InitialClusterState,
    /// `--initial-cluster-token`: distinguishes clusters built from the same URLs.
    pub initial_cluster_token: String,
    /// Time between heartbeats, the length of one tick (`--heartbeat-interval`).
    pub heartbeat_interval: Duration,
    /// Time without a leader before an election (`--election-timeout`).
    pub election_timeout: Duration,
    /// Applied entries between snapshots (`--snapshot-count`).
    pub snapshot_count: u64,
    /// Entries kept behind a snapshot for slow followers
    /// (`--experimental-snapshot-catchup-entries`).
    pub snapshot_catch_up_entries: u64,
    /// How often the leader checkpoints remaining lease TTLs
    /// (`--experimental-lease-checkpoint-interval`).
    pub lease_checkpoint_interval: Duration,
    /// Time between the leader's comparisons of every member's HashKV
    /// (`--experimental-corrupt-check-time`); `None` turns the check off.
    pub corruption_check_interval: Option<Duration>,
    /// Fault injection for tests: apply a wrong value for puts of this key.
    pub corrupt_values_of_key: Option<Vec<u8>>,
    /// Space quota in bytes (`--quota-backend-bytes`).
    pub quota_bytes: u64,
    /// Automatic compaction of old revisions (`--auto-compaction-mode`, `--auto-compaction-retention`).
    pub auto_compaction: AutoCompaction,
    /// Largest client request in bytes (`--max-request-bytes`).
    pub request_bytes_max: usize,
    /// Operations per transaction (`--max-txn-ops`).
    pub txn_operations_max: usize,
    /// Inputs (client requests and peer messages) queued for the member loop.
    pub input_queue_max: usize,
    /// Messages queued for one peer before new ones are dropped (Raft retries).
    pub peer_queue_messages_max: usize,
    /// Largest peer frame accepted, in bytes: one raft Message (snapshots travel in chunks).
    pub peer_frame_bytes_max: usize,
    /// Largest snapshot a peer may send us, in bytes (the storage's own limit).
    pub peer_snapshot_bytes_max: u64,
    /// Serve `keel chaos` fault injection to loopback callers
    /// (`--experimental-enable-fault-injection`); off by default.
    pub enable_fault_injection: bool,
    /// The token a non-loopback caller must present to the fault-injection admin API
    /// (`--experimental-fault-injection-token-file`); without one, only loopback callers.
    pub fault_injection_token: Option<String>,
    /// BROKEN ON PURPOSE, for the fault suite's self-test: write-ahead log bytes are
    /// written one sync late, so writes are acknowledged before they are durable.
    pub unsafe_acknowledge_before_fsync: bool,
}

impl ServerConfig {
    /// A configuration for one member with etcd's defaults, serving on the given
    /// addresses; used by tests and `keel dev`.
    pub fn single(name: &str, data_dir: PathBuf, client: SocketAddr, peer: SocketAddr) -> Self {
        let peer_url = format!("http://{peer}");
        ServerConfig {
            name: name.to_string(),
            data_dir,
            listen_client_addresses: vec![client],
            advertise_client_urls: vec![format!("http://{client}")],
            listen_metrics_addresses: Vec::new(),
            listen_peer_addresses: vec![peer],
            initial_advertise_peer_urls: vec![peer_url.clone()],
            initial_cluster: vec![(name.to_string(), vec![peer_url])],
            initial_cluster_state: InitialClusterState::New,
            initial_cluster_token: "keel-cluster".to_string(),
            heartbeat_interval: Duration::from_millis(100),
            election_timeout: Duration::from_millis(1000),
            snapshot_count: 100_000,
            snapshot_catch_up_entries: 5_000,
            lease_checkpoint_interval: Duration::from_secs(5),
            quota_bytes: 2 * 1024 * 1024 * 1024,
            corruption_check_interval: Some(Duration::from_secs(60)),
            corrupt_values_of_key: None,
            auto_compaction: AutoCompaction::Periodic(Duration::from_secs(3600)),
            request_bytes_max: 1536 * 1024,
            txn_operations_max: 128,
            input_queue_max: 65_536,
            peer_queue_messages_max: 4_096,
            peer_frame_bytes_max: 1 << 30,
            peer_snapshot_bytes_max: 8 * 1024 * 1024 * 1024,
            enable_fault_injection: false,
            fault_injection_token: None,
            unsafe_acknowledge_before_fsync: false,
        }
    }

    /// Checks values that do not parse-fail but cannot work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError("--name must not be empty".into()));
        }
        if self.heartbeat_interval.is_zero() {
            return Err(ConfigError("--heartbeat-interval must be positive".into()));
        }
        if self.election_timeout < self.heartbeat_interval * 5 {
            return Err(ConfigError(format!(
                "--election-timeout ({} ms) must be at least 5 times --heartbeat-interval ({} ms)",
                self.election_timeout.as_millis(),
                self.heartbeat_interval.as_millis()
            )));
        }
        if self.snapshot_count == 0 {
            return Err(ConfigError("--snapshot-count must be positive".into()));
        }
        if self.listen_client_addresses.is_empty() {
            return Err(ConfigError(
                "--listen-client-urls must name at least one URL".into(),
            ));
        }
        if self.listen_peer_addresses.is_empty() {
            return Err(ConfigError(
                "--listen-peer-urls must name at least one URL".into(),
            ));
        }
        let own = self
            .initial_cluster
            .iter()
            .find(|(name, _)| name == &self.name);
        match own {
            None => {
                return Err(ConfigError(format!(
                    "--initial-cluster has no member named {:?} (this member's --name)",
                    self.name
                )))
            }
            Some((_, urls)) => {
                let mut listed = urls.clone();
                let mut advertised = self.initial_advertise_peer_urls.clone();
                listed.sort();
                advertised.sort();
                if listed != advertised {
                    return Err(ConfigError(format!(
                        "--initial-cluster lists {:?} for {:?} but --initial-advertise-peer-urls is {:?}",
                        urls, self.name, self.initial_advertise_peer_urls
                    )));
                }
            }
        }
        Ok(())
    }

    /// The founding members with their ids, sorted by id.
    pub fn initial_members(&self) -> Vec<MemberRecord> {
        let mut members: Vec<MemberRecord> = self
            .initial_cluster
            .iter()
            .map(|(name, peer_urls)| MemberRecord {
                id: member_id(peer_urls, &self.initial_cluster_token),
                name: name.clone(),
                peer_urls: peer_urls.clone(),
                // Every founding member must build the same initial state, and
                // none knows the others' client URLs: each announces its own
                // through the log once it runs (see `publish_attributes`).
                client_urls: Vec::new(),
                is_learner: false,
            })
            .collect();
        members.sort_by_key(|member| member.id);
        members
    }

    /// This member's id.
    pub fn member_id(&self) -> u64 {
        member_id(
            &self.initial_advertise_peer_urls,
            &self.initial_cluster_token,
        )
    }

    /// Heartbeat and election timeout in ticks of one heartbeat interval.
    pub fn election_ticks(&self) -> usize {
        (self.election_timeout.as_millis() / self.heartbeat_interval.as_millis().max(1)) as usize
    }
}

/// A member id derived from its peer URLs and the cluster token, like etcd's, so
/// every founding member computes the same ids without talking.
pub fn member_id(peer_urls: &[String], cluster_token: &str) -> u64 {
    let mut sorted = peer_urls.to_vec();
    sorted.sort();
    let mut hash = Fnv64::new();
    for url in &sorted {
        hash.write(url.as_bytes());
    }
    hash.write(cluster_token.as_bytes());
    // Zero means "no member" to Raft.
    hash.finish().max(1)
}

/// The cluster id: a hash of the founding member ids.
pub fn cluster_id(members: &[MemberRecord]) -> u64 {
    let mut ids: Vec<u64> = members.iter().map(|member| member.id).collect();
    ids.sort();
    let mut hash = Fnv64::new();
    for id in ids {
        hash.write(&id.to_be_bytes());
    }
    hash.finish().max(1)
}

/// FNV-1a, 64 bits: stable across versions and platforms, which std's hasher is not.
struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so ["ab","c"] and ["a","bc"] hash differently.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// Parses `http://host:port` (or `https://`, or a bare `host:port`) into a socket address.
pub fn parse_url_address(url: &str) -> Result<SocketAddr, ConfigError> {
    let without_scheme = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url);
    let host_port = without_scheme.trim_end_matches('/');
    let host_port = host_port.replace("localhost", "127.0.0.1");
    host_port.parse().map_err(|_| {
        ConfigError(format!(
            "{url:?} is not a URL of the form http://IP:PORT (host names other than localhost are not supported)"
        ))
    })
}

/// Parses a comma-separated list of URLs given to the flag `--{flag}`, each of
/// the form `http://IP:PORT`; an empty list is refused.
pub fn parse_url_list(flag: &str, text: &str) -> Result<Vec<String>, ConfigError> {
    let urls: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::to_string)
        .collect();
    if urls.is_empty() {
        return Err(ConfigError(format!("--{flag} must name at least one URL")));
    }
    for url in &urls {
        parse_url_address(url).map_err(|error| ConfigError(format!("--{flag}: {error}")))?;
    }
    Ok(urls)
}

/// Parses etcd's `name1=url1,name2=url2` into (name, urls) pairs, grouping
/// repeated names.
pub fn parse_initial_cluster(text: &str) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
    let mut members: Vec<(String, Vec<String>)> = Vec::new();
    for part in text
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        let (name, url) = part.split_once('=').ok_or_else(|| {
            ConfigError(format!(
                "--initial-cluster entry {part:?} is not of the form name=http://IP:PORT"
            ))
        })?;
        parse_url_address(url)?;
        match members.iter_mut().find(|(known, _)| known == name) {
            Some((_, urls)) => urls.push(url.to_string()),
            None => members.push((name.to_string(), vec![url.to_string()])),
        }
    }
    if members.is_empty() {
        return Err(ConfigError("--initial-cluster is empty".into()));
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_cluster_parses_and_groups() {
        let parsed =
            parse_initial_cluster("a=http://127.0.0.1:1,b=http://127.0.0.1:2,a=http://127.0.0.1:3")
                .unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].1.len(), 2);
        assert!(parse_initial_cluster("a:http://x").is_err());
        assert!(parse_initial_cluster("a=http://nohost:1").is_err());
    }

    #[test]
    fn member_ids_are_stable_and_distinct() {
        let a = member_id(&["http://127.0.0.1:2380".into()], "t");
        let b = member_id(&["http://127.0.0.1:2381".into()], "t");
        let c = member_id(&["http://127.0.0.1:2380".into()], "other");
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, member_id(&["http://127.0.0.1:2380".into()], "t"));
    }

    #[test]
    fn validation_names_the_flag() {
        let mut config = ServerConfig::single(
            "one",
            "/tmp/x".into(),
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        assert!(config.validate().is_ok());
        config.election_timeout = Duration::from_millis(200);
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("--election-timeout"), "{error}");
        config.election_timeout = Duration::from_millis(1000);
        config.name = "two".into();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("--initial-cluster"), "{error}");
    }
}
