//! A cluster of real `keel server` processes for integration tests.
//!
//! Each test picks its own port base, so tests can run in parallel without
//! sharing a port. Every wait is for a condition with a bounded timeout; every
//! process is killed when the `Cluster` is dropped, even if the test panics,
//! including a member that restarted itself after `keel chaos inject kill`
//! (not a child of the test: found by its data directory in its command line).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_server::api::etcdserverpb::kv_client::KvClient;
use keel_server::api::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_types::etcdserverpb::{RangeRequest, StatusRequest, StatusResponse};
use tonic::transport::Channel;

/// How long a cluster gets to elect a leader or catch up.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// One member process.
pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    pub process: Option<Child>,
}

impl Member {
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }
}

/// A cluster of member processes with data in a temporary directory.
pub struct Cluster {
    pub members: Vec<Member>,
    pub directory: tempfile::TempDir,
    initial_cluster: String,
    extra_arguments: Vec<String>,
}

impl Cluster {
    /// Starts `size` members with client ports `port_base + 2 * i` and peer
    /// ports `port_base + 2 * i + 1`, and waits for a leader.
    pub fn start(size: usize, port_base: u16) -> Cluster {
        Cluster::start_with(size, port_base, &[])
    }

    /// As [`Cluster::start`], with extra `keel server` flags for every member.
    pub fn start_with(size: usize, port_base: u16, extra_arguments: &[&str]) -> Cluster {
        let mut cluster = Cluster::unstarted(size, port_base);
        cluster.extra_arguments = extra_arguments.iter().map(|s| s.to_string()).collect();
        for index in 0..size {
            cluster.start_member(index);
        }
        cluster.wait_for_leader();
        cluster
    }

    /// Starts (or restarts) member `index` on its data directory.
    pub fn start_member(&mut self, index: usize) {
        self.start_member_with(index, &[]);
    }

    /// Starts (or restarts) member `index` with extra flags for it alone.
    pub fn start_member_with(&mut self, index: usize, extra_arguments: &[&str]) {
        let member = &self.members[index];
        assert!(
            member.process.is_none(),
            "member {} already runs",
            member.name
        );
        let client_url = member.url();
        let peer_url = format!("http://127.0.0.1:{}", member.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.log_path)
            .expect("member log file");
        let child = Command::new(env!("CARGO_BIN_EXE_keel"))
            .arg("server")
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(&member.data_dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--log-level", "info"])
            .args(&self.extra_arguments)
            .args(extra_arguments)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting keel server");
        self.members[index].process = Some(child);
    }

    /// Kills member `index` with SIGKILL and reaps it.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops member `index` with SIGTERM and waits (bounded) for it to exit cleanly.
    pub fn stop(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].process.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        assert!(
                            status.success(),
                            "member {} exited with {status} on SIGTERM; log:\n{}",
                            self.members[index].name,
                            self.log(index)
                        );
                        return;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        panic!(
                            "member {} did not stop within 15 s of SIGTERM",
                            self.members[index].name
                        );
                    }
                }
            }
        }
    }

    /// The member's log so far, for failure messages.
    pub fn log(&self, index: usize) -> String {
        std::fs::read_to_string(&self.members[index].log_path).unwrap_or_default()
    }

    /// Client endpoints of the given members, comma-separated, for etcdctl.
    pub fn endpoints_of(&self, indexes: &[usize]) -> String {
        indexes
            .iter()
            .map(|&index| self.members[index].endpoint())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// All client endpoints, comma-separated, for etcdctl.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(Member::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Status of member `index`, if it answers.
    pub fn status(&self, index: usize) -> Option<StatusResponse> {
        let url = self.members[index].url();
        block_on(async move {
            let channel = connect(&url).await.ok()?;
            let mut client = MaintenanceClient::new(channel);
            tokio::time::timeout(Duration::from_secs(2), client.status(StatusRequest {}))
                .await
                .ok()?
                .ok()
                .map(tonic::Response::into_inner)
        })
    }

    /// Waits until every running member agrees on one leader; returns its index.
    pub fn wait_for_leader(&self) -> usize {
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        loop {
            let running: Vec<usize> = (0..self.members.len())
                .filter(|&index| self.members[index].process.is_some())
                .collect();
            let leaders: Vec<u64> = running
                .iter()
                .filter_map(|&index| self.status(index).map(|status| status.leader))
                .collect();
            if leaders.len() == running.len()
                && leaders[0] != 0
                && leaders.iter().all(|&leader| leader == leaders[0])
            {
                let leader_id = leaders[0];
                if let Some(index) = running.iter().copied().find(|&index| {
                    self.status(index)
                        .and_then(|status| status.header)
                        .map(|header| header.member_id)
                        == Some(leader_id)
                }) {
                    return index;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader within {CONVERGE_TIMEOUT:?}; statuses: {leaders:?}; log of m1:\n{}",
                self.log(0)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every running member has applied at least `index`.
    pub fn wait_for_applied(&self, minimum: u64) {
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        loop {
            let behind: Vec<(String, Option<u64>)> = (0..self.members.len())
                .filter(|&index| self.members[index].process.is_some())
                .map(|index| {
                    (
                        self.members[index].name.clone(),
                        self.status(index).map(|status| status.raft_applied_index),
                    )
                })
                .filter(|(_, applied)| applied.is_none_or(|applied| applied < minimum))
                .collect();
            if behind.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "members still behind index {minimum}: {behind:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A serializable range read from member `index` (what that member holds).
    pub fn local_range(
        &self,
        index: usize,
        request: RangeRequest,
    ) -> Option<keel_types::etcdserverpb::RangeResponse> {
        let url = self.members[index].url();
        block_on(async move {
            let channel = connect(&url).await.ok()?;
            let mut client = KvClient::new(channel);
            let request = RangeRequest {
                serializable: true,
                ..request
            };
            client
                .range(request)
                .await
                .ok()
                .map(tonic::Response::into_inner)
        })
    }

    /// HashKV of member `index` at `revision`: (hash, compact revision).
    pub fn hash_kv(&self, index: usize, revision: i64) -> (u32, i64) {
        let url = self.members[index].url();
        block_on(async move {
            let channel = connect(&url).await.expect("connect");
            let mut client = MaintenanceClient::new(channel);
            let response = client
                .hash_kv(keel_types::etcdserverpb::HashKvRequest { revision })
                .await
                .expect("hashkv")
                .into_inner();
            (response.hash, response.compact_revision)
        })
    }

    /// Runs etcdctl against this cluster and returns its stdout; panics on failure.
    pub fn etcdctl(&self, arguments: &[&str]) -> String {
        etcdctl(&self.endpoints(), arguments)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for index in 0..self.members.len() {
            self.kill(index);
            kill_processes_naming(&self.members[index].data_dir);
        }
    }
}

/// The processes (by pid) with `path` as one argument of their command line:
/// for a data directory, the process using it, including one restarted by
/// `keel chaos inject kill` (and the restart helper still waiting to become it).
pub fn processes_naming(path: &std::path::Path) -> Vec<u32> {
    let wanted = path.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let command_line = std::fs::read(entry.path().join("cmdline")).ok()?;
            command_line
                .split(|&byte| byte == 0)
                .any(|argument| argument == wanted)
                .then_some(pid)
        })
        .filter(|&pid| pid != std::process::id())
        .collect()
}

/// The parent's pid of a process, from `/proc/<pid>/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// SIGKILLs every process [`processes_naming`] finds, and their children (a
/// restart helper's `sleep`), by pid.
pub fn kill_processes_naming(path: &std::path::Path) {
    let found = processes_naming(path);
    if found.is_empty() {
        return;
    }
    let children: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| parent_of(pid).is_some_and(|parent| found.contains(&parent)))
        .collect();
    for pid in found.into_iter().chain(children) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// Connects a gRPC channel with a short timeout.
pub async fn connect(url: &str) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(url.to_string())
        .expect("valid url")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// Runs a future on a fresh single-threaded runtime (tests are synchronous).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// Runs etcdctl (API v3) with the given endpoints; panics with its stderr on failure.
pub fn etcdctl(endpoints: &str, arguments: &[&str]) -> String {
    etcdctl_with_input(endpoints, arguments, None)
}

/// Runs etcdctl with text on its standard input (for `txn -i`).
pub fn etcdctl_with_input(endpoints: &str, arguments: &[&str], input: Option<&str>) -> String {
    let (code, stdout, stderr) = run_etcdctl(endpoints, arguments, input);
    assert_eq!(code, 0, "etcdctl {arguments:?} failed: {stderr}");
    stdout
}

/// A single real etcd member, killed on drop.
pub struct ReferenceEtcd {
    process: Child,
    pub endpoint: String,
    _directory: tempfile::TempDir,
}

impl ReferenceEtcd {
    pub fn start(client_port: u16) -> ReferenceEtcd {
        let directory = tempfile::tempdir().expect("temporary directory");
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{}", client_port + 1);
        let process = Command::new("etcd")
            .args(["--name", "reference"])
            .arg("--data-dir")
            .arg(directory.path().join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("reference={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd is installed (scripts/test installs Debian's etcd-server)");
        let etcd = ReferenceEtcd {
            process,
            endpoint: format!("127.0.0.1:{client_port}"),
            _directory: directory,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while run_etcdctl(&etcd.endpoint, &["endpoint", "health"], None).0 != 0 {
            assert!(Instant::now() < deadline, "reference etcd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        etcd
    }
}

impl Drop for ReferenceEtcd {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Runs etcdctl; returns (exit code, stdout, stderr).
pub fn run_etcdctl(
    endpoints: &str,
    arguments: &[&str],
    input: Option<&str>,
) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .arg("--command-timeout=10s")
        .args(arguments)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("etcdctl is installed");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        if let Some(input) = input {
            stdin.write_all(input.as_bytes()).expect("etcdctl input");
        }
    }
    let output = child.wait_with_output().expect("etcdctl runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

impl Cluster {
    /// A cluster laid out as [`Cluster::start`] lays it out (names m1…,
    /// ports, data directories) but with no member started, so a test can
    /// prepare the data directories first, for example by restoring a backup
    /// into them. Start members with [`Cluster::start_member`].
    pub fn unstarted(size: usize, port_base: u16) -> Cluster {
        let directory = tempfile::tempdir().expect("temporary directory");
        let members: Vec<Member> = (0..size)
            .map(|index| {
                let name = format!("m{}", index + 1);
                Member {
                    data_dir: directory.path().join(&name),
                    log_path: directory.path().join(format!("{name}.log")),
                    name,
                    client_port: port_base + 2 * index as u16,
                    peer_port: port_base + 2 * index as u16 + 1,
                    process: None,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|member| format!("{}=http://127.0.0.1:{}", member.name, member.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        Cluster {
            members,
            directory,
            initial_cluster,
            extra_arguments: Vec::new(),
        }
    }

    /// The `--initial-cluster` every member is started with.
    pub fn initial_cluster(&self) -> &str {
        &self.initial_cluster
    }
}

/// Replaces identity fields (which differ by design) in JSON output.
pub fn normalise_etcdctl_output(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    // A tiny scanner: after each identity key, replace the number that follows.
    'outer: while !rest.is_empty() {
        for field in ["\"cluster_id\":", "\"member_id\":", "\"raft_term\":"] {
            if rest.starts_with(field) {
                out.push_str(field);
                rest = &rest[field.len()..];
                let digits = rest
                    .find(|character: char| !character.is_ascii_digit())
                    .unwrap_or(rest.len());
                out.push('N');
                rest = &rest[digits..];
                continue 'outer;
            }
        }
        let character = rest.chars().next().expect("not empty");
        out.push(character);
        rest = &rest[character.len_utf8()..];
    }
    // etcdctl's client logs retries as JSON lines with timestamps and
    // connection ids, and its error lines carry a timestamp: keep only messages.
    out.lines()
        .filter(|line| !line.starts_with("{\"level\":"))
        .map(|line| match line.find("Error:") {
            Some(position) => &line[position..],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}
