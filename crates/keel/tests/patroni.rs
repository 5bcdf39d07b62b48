//! Patroni keeping PostgreSQL highly available on keel (real processes).
//!
//! Debian's Patroni talks to etcd v3 only through the JSON gateway, so this
//! is the gateway (and keel's leases, watches and transactions under it)
//! carrying a real system through the failure it exists for: a 3-member keel
//! cluster, two PostgreSQL instances under Patroni, the primary's Patroni and
//! PostgreSQL killed with SIGKILL, the replica promoted within `ttl` +
//! `loop_wait`, the old primary rejoining as a replica, and then keel's own
//! leader killed without PostgreSQL failing over. Throughout, both instances'
//! `pg_is_in_recovery()` is polled: never may both accept writes.
//!
//! PostgreSQL refuses to run as root; when the test runs as root (as CI does)
//! Patroni runs as the `postgres` user (`setpriv`) on directories it owns.
//! Ports: keel 27200-27205, Patroni's REST API 27210-27211, PostgreSQL
//! 27220-27221.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Cluster;

const KEEL_PORT_BASE: u16 = 27200;
const REST_PORT_BASE: u16 = 27210;
const POSTGRES_PORT_BASE: u16 = 27220;
const SCOPE: &str = "keel-test";
/// Patroni's leader key TTL and HA loop interval; Patroni wants
/// `loop_wait + 2 * retry_timeout <= ttl`.
const TTL_SECONDS: u64 = 10;
const LOOP_WAIT_SECONDS: u64 = 2;
const RETRY_TIMEOUT_SECONDS: u64 = 4;
/// Bootstrap (initdb, a base backup for the replica) on a busy machine.
const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(120);
/// How often both instances are asked whether they are in recovery.
const MONITOR_INTERVAL: Duration = Duration::from_millis(100);

/// One Patroni process (and, under it, one PostgreSQL), killed on drop.
struct PatroniNode {
    name: String,
    directory: PathBuf,
    rest_port: u16,
    postgres_port: u16,
    process: Option<Child>,
}

impl PatroniNode {
    fn new(root: &Path, index: usize, keel_hosts: &str) -> PatroniNode {
        let name = format!("pg{}", index + 1);
        let directory = root.join(&name);
        std::fs::create_dir_all(&directory).expect("Patroni's directory");
        let node = PatroniNode {
            name,
            directory,
            rest_port: REST_PORT_BASE + index as u16,
            postgres_port: POSTGRES_PORT_BASE + index as u16,
            process: None,
        };
        std::fs::write(node.directory.join("patroni.yml"), node.config(keel_hosts))
            .expect("Patroni's configuration");
        give_to_postgres(&node.directory);
        node
    }

    /// The same configuration scripts/patroni-demo writes.
    fn config(&self, keel_hosts: &str) -> String {
        let directory = self.directory.display();
        format!(
            "scope: {SCOPE}
namespace: /service/
name: {name}
restapi:
  listen: 127.0.0.1:{rest}
  connect_address: 127.0.0.1:{rest}
etcd3:
  hosts: {keel_hosts}
bootstrap:
  dcs:
    ttl: {TTL_SECONDS}
    loop_wait: {LOOP_WAIT_SECONDS}
    retry_timeout: {RETRY_TIMEOUT_SECONDS}
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      parameters:
        wal_level: replica
        hot_standby: \"on\"
        wal_log_hints: \"on\"
        max_wal_senders: 5
        max_replication_slots: 5
  initdb:
  - encoding: UTF8
  - data-checksums
  pg_hba:
  - local all all trust
  - host replication replicator 127.0.0.1/32 trust
  - host all all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:{port}
  connect_address: 127.0.0.1:{port}
  data_dir: {directory}/data
  bin_dir: {bin_dir}
  pgpass: {directory}/pgpass
  authentication:
    superuser: {{username: postgres, password: test-superuser}}
    replication: {{username: replicator, password: test-replicator}}
    rewind: {{username: rewinder, password: test-rewinder}}
  parameters:
    unix_socket_directories: {directory}
",
            name = self.name,
            rest = self.rest_port,
            port = self.postgres_port,
            bin_dir = postgres_bin_dir().display(),
        )
    }

    fn start(&mut self) {
        assert!(self.process.is_none(), "{} already runs", self.name);
        let log_path = self.directory.join("patroni.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("Patroni's log");
        give_to_postgres(&log_path);
        let config = self.directory.join("patroni.yml");
        // setpriv execs Patroni in its own process, so the child's PID is
        // Patroni's and SIGKILL reaches it.
        let mut command = if running_as_root() {
            let mut command = Command::new("setpriv");
            command.args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "patroni",
            ]);
            command
        } else {
            Command::new("patroni")
        };
        let child = command
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("patroni is installed (scripts/test installs Debian's patroni)");
        self.process = Some(child);
    }

    /// The postmaster's PID, from its data directory.
    fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.directory.join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// SIGKILL to Patroni and to its PostgreSQL.
    fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(pid) = self.postmaster_pid() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }

    /// `select …` on this instance: its single value, or None if it does not
    /// answer.
    fn query(&self, sql: &str) -> Option<String> {
        let output = Command::new("psql")
            .env("PGCONNECT_TIMEOUT", "2")
            .args(["-X", "-q", "-A", "-t", "-h", "127.0.0.1", "-U", "postgres"])
            .args(["-d", "postgres", "-p", &self.postgres_port.to_string()])
            .args(["-c", sql])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// Whether PostgreSQL is in recovery (a replica); None if it is down.
    fn in_recovery(&self) -> Option<bool> {
        match self.query("select pg_is_in_recovery()")?.as_str() {
            "t" => Some(true),
            "f" => Some(false),
            _ => None,
        }
    }

    /// Replicas streaming from this instance.
    fn streaming_replicas(&self) -> usize {
        self.query("select count(*) from pg_stat_replication where state = 'streaming'")
            .and_then(|count| count.parse().ok())
            .unwrap_or(0)
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.directory.join("patroni.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for PatroniNode {
    fn drop(&mut self) {
        self.kill();
    }
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|metadata| metadata.uid() == 0)
        .unwrap_or(false)
}

/// Hands a path to the `postgres` user when the test runs as root.
fn give_to_postgres(path: &Path) {
    if !running_as_root() {
        return;
    }
    let id = |flag: &str| -> u32 {
        let output = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("id runs");
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("the postgres user exists (Debian's postgresql creates it)")
    };
    std::os::unix::fs::chown(path, Some(id("-u")), Some(id("-g"))).expect("chown to postgres");
}

fn postgres_bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (scripts/test installs Debian's postgresql)")
        .filter_map(|entry| entry.ok().map(|entry| entry.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort_by_key(|bin| {
        bin.parent()
            .and_then(|version| version.file_name())
            .and_then(|version| version.to_str())
            .and_then(|version| version.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions
        .pop()
        .expect("a PostgreSQL server version is installed")
}

/// Waits for `condition`, bounded; panics with `what` and the logs.
fn wait_until(
    what: &str,
    timeout: Duration,
    nodes: &[PatroniNode],
    mut condition: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() >= deadline {
            let logs: Vec<String> = nodes
                .iter()
                .map(|node| format!("--- {} ---\n{}", node.name, node.log()))
                .collect();
            panic!("{what}: not within {timeout:?}\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls both instances' `pg_is_in_recovery()` until stopped, recording
/// every instant at which both accepted writes.
struct SplitBrainMonitor {
    stop: Arc<AtomicBool>,
    both_primary: Arc<Mutex<Vec<Duration>>>,
    polls: Arc<Mutex<u64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SplitBrainMonitor {
    fn start(ports: [u16; 2]) -> SplitBrainMonitor {
        let stop = Arc::new(AtomicBool::new(false));
        let both_primary = Arc::new(Mutex::new(Vec::new()));
        let polls = Arc::new(Mutex::new(0));
        let thread = {
            let stop = stop.clone();
            let both_primary = both_primary.clone();
            let polls = polls.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let probes: Vec<PatroniNode> = ports
                    .iter()
                    .map(|&port| PatroniNode {
                        name: format!("probe-{port}"),
                        directory: PathBuf::new(),
                        rest_port: 0,
                        postgres_port: port,
                        process: None,
                    })
                    .collect();
                while !stop.load(Ordering::Relaxed) {
                    // Both asked at once, so one poll is one instant as
                    // nearly as two psql processes allow.
                    let (first, second) = std::thread::scope(|scope| {
                        let first = scope.spawn(|| probes[0].in_recovery());
                        let second = probes[1].in_recovery();
                        (first.join().expect("probe thread"), second)
                    });
                    if first == Some(false) && second == Some(false) {
                        both_primary
                            .lock()
                            .expect("not poisoned")
                            .push(started.elapsed());
                    }
                    *polls.lock().expect("not poisoned") += 1;
                    std::thread::sleep(MONITOR_INTERVAL);
                }
            })
        };
        SplitBrainMonitor {
            stop,
            both_primary,
            polls,
            thread: Some(thread),
        }
    }

    /// Stops polling; returns (polls, instants with two primaries).
    fn finish(mut self) -> (u64, Vec<Duration>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("monitor thread");
        }
        let polls = *self.polls.lock().expect("not poisoned");
        let both = self.both_primary.lock().expect("not poisoned").clone();
        (polls, both)
    }
}

impl Drop for SplitBrainMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Patroni's leader key as keel holds it: the primary's name.
fn leader_key(cluster: &Cluster) -> String {
    cluster
        .etcdctl(&[
            "get",
            &format!("/service/{SCOPE}/leader"),
            "--print-value-only",
        ])
        .trim()
        .to_string()
}

/// Index (0 or 1) of the instance that is primary with the other streaming
/// from it, once that holds.
fn wait_for_primary_and_replica(nodes: &[PatroniNode], timeout: Duration) -> usize {
    let mut primary = None;
    wait_until(
        "one primary and one streaming replica",
        timeout,
        nodes,
        || {
            let recovery = [nodes[0].in_recovery(), nodes[1].in_recovery()];
            primary = match recovery {
                [Some(false), Some(true)] => Some(0),
                [Some(true), Some(false)] => Some(1),
                _ => None,
            };
            primary.is_some_and(|primary| nodes[primary].streaming_replicas() == 1)
        },
    );
    primary.expect("found")
}

#[test]
fn patroni_fails_over_on_keel_and_survives_a_keel_leader_failure() {
    let mut cluster = Cluster::start(3, KEEL_PORT_BASE);
    let keel_hosts = cluster
        .members
        .iter()
        .map(|member| member.endpoint())
        .collect::<Vec<_>>()
        .join(",");
    let root = tempfile::tempdir().expect("temporary directory");
    // PostgreSQL (as postgres) must reach its data directory under here.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut nodes = vec![
        PatroniNode::new(root.path(), 0, &keel_hosts),
        PatroniNode::new(root.path(), 1, &keel_hosts),
    ];
    for node in &mut nodes {
        node.start();
    }

    // Bootstrap: one primary, one streaming replica, the leader key in keel.
    let primary = wait_for_primary_and_replica(&nodes, BOOTSTRAP_TIMEOUT);
    let replica = 1 - primary;
    assert_eq!(leader_key(&cluster), nodes[primary].name);
    assert_eq!(
        nodes[primary].query(
            "create table failover_witness (note text); \
             insert into failover_witness values ('written before the failure'); \
             select count(*) from failover_witness"
        ),
        Some("1".to_string())
    );
    let monitor = SplitBrainMonitor::start([nodes[0].postgres_port, nodes[1].postgres_port]);

    // The primary's Patroni and PostgreSQL die at once.
    nodes[primary].kill();
    let killed_at = Instant::now();
    wait_until(
        "the replica promoted",
        Duration::from_secs(TTL_SECONDS + LOOP_WAIT_SECONDS) * 3,
        &nodes,
        || nodes[replica].in_recovery() == Some(false),
    );
    let promotion = killed_at.elapsed();
    eprintln!(
        "promotion took {:.1} s after kill -9 of the primary (ttl {TTL_SECONDS} s, loop_wait {LOOP_WAIT_SECONDS} s)",
        promotion.as_secs_f64()
    );
    assert!(
        promotion <= Duration::from_secs(TTL_SECONDS + LOOP_WAIT_SECONDS),
        "promoted after {promotion:?}, more than ttl + loop_wait"
    );
    wait_until(
        "the leader key names the promoted replica",
        Duration::from_secs(TTL_SECONDS),
        &nodes,
        || leader_key(&cluster) == nodes[replica].name,
    );
    assert_eq!(
        nodes[replica].query("select note from failover_witness"),
        Some("written before the failure".to_string()),
        "the row written before the failure is readable on the new primary"
    );

    // The old primary comes back as a replica of the new one.
    nodes[primary].start();
    let new_primary = wait_for_primary_and_replica(&nodes, BOOTSTRAP_TIMEOUT);
    assert_eq!(new_primary, replica, "the old primary rejoined as primary");
    wait_until(
        "the rejoined replica has the row",
        BOOTSTRAP_TIMEOUT,
        &nodes,
        || {
            nodes[primary].query("select note from failover_witness")
                == Some("written before the failure".to_string())
        },
    );

    // keel's leader dies while Patroni runs: no failover of PostgreSQL.
    let timeline_before = nodes[replica].query("select timeline_id from pg_control_checkpoint()");
    let keel_leader = cluster.wait_for_leader();
    cluster.kill(keel_leader);
    let keel_killed_at = Instant::now();
    cluster.wait_for_leader();
    // Watch for longer than Patroni would take to fail over.
    let watch_window = Duration::from_secs(TTL_SECONDS + 2 * LOOP_WAIT_SECONDS);
    while keel_killed_at.elapsed() < watch_window {
        assert_eq!(
            nodes[primary].in_recovery(),
            Some(true),
            "the replica left recovery after keel's leader died"
        );
        assert_eq!(
            nodes[replica].in_recovery(),
            Some(false),
            "the primary stopped being primary after keel's leader died:\n{}",
            nodes[replica].log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        leader_key(&cluster),
        nodes[replica].name,
        "Patroni lost its leader key when keel's leader died"
    );
    assert_eq!(
        nodes[replica].query("select timeline_id from pg_control_checkpoint()"),
        timeline_before,
        "PostgreSQL changed timeline: a failover happened"
    );
    assert_eq!(nodes[replica].streaming_replicas(), 1);

    let (polls, both_primary) = monitor.finish();
    // Each poll runs psql twice (slow when an instance is down); the run
    // lasts about a minute, so this only says the monitor kept polling.
    assert!(polls >= 20, "the monitor polled only {polls} times");
    eprintln!("pg_is_in_recovery() polled {polls} times on both instances");
    assert!(
        both_primary.is_empty(),
        "both PostgreSQL instances accepted writes at {both_primary:?} into the run"
    );
}
