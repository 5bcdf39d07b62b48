//! Locks and elections on real processes: etcdctl's `lock` and `elect`
//! against a three-member keel cluster compared with a real etcd; the Lock
//! and Election services' semantics through a Rust client (queueing,
//! cancellation, lost sessions, etcd's errors); `keel lease`, `keel lock` and
//! `keel elect` from the command line; and mutual exclusion under faults:
//! contending `keel lock` processes, the holder paused with SIGSTOP past its
//! lease's TTL, and every write guarded by the fencing token.
//!
//! Every wait is for a condition with a bounded timeout, and every process a
//! test starts is killed when the test ends, even when it fails.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{block_on, connect, run_etcdctl, Cluster, ReferenceEtcd};
use keel_server::api::etcdserverpb::cluster_client::ClusterClient;
use keel_server::api::etcdserverpb::kv_client::KvClient;
use keel_server::api::etcdserverpb::lease_client::LeaseClient;
use keel_server::api::v3electionpb::election_client::ElectionClient;
use keel_server::api::v3lockpb::lock_client::LockClient;
use keel_types::etcdserverpb::{
    LeaseGrantRequest, LeaseRevokeRequest, MemberListRequest, RangeRequest,
};
use keel_types::v3electionpb::{
    CampaignRequest, LeaderRequest, LeaderResponse, ProclaimRequest, ResignRequest,
};
use keel_types::v3lockpb::{LockRequest, UnlockRequest};
use tonic::transport::Channel;

/// How long a child process gets to print an expected line.
const LINE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a condition gets to become true.
const CONDITION_TIMEOUT: Duration = Duration::from_secs(30);

/// A child process killed (with its process group) when dropped, whose
/// standard output is read line by line on a thread.
struct Interactive {
    child: Child,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl Interactive {
    /// Starts `command` in its own process group with piped standard output.
    fn start(mut command: Command, what: &str) -> Interactive {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("{what}: {error}"));
        let stdout = child.stdout.take().expect("stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        Interactive {
            child,
            lines,
            what: what.to_string(),
        }
    }

    /// The next line of output, waiting at most [`LINE_TIMEOUT`].
    fn next_line(&mut self) -> String {
        match self.lines.recv_timeout(LINE_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let _ = self.child.kill();
                let mut stderr = String::new();
                if let Some(mut pipe) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
                }
                panic!(
                    "{}: no line within {LINE_TIMEOUT:?}; stderr:\n{stderr}",
                    self.what
                )
            }
        }
    }

    /// Sends `signal` (such as "INT") to the process.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {}", self.what);
    }

    /// Waits (bounded) for the process to exit; returns its exit code.
    fn wait(&mut self) -> Option<i32> {
        let deadline = Instant::now() + CONDITION_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {CONDITION_TIMEOUT:?}",
                self.what
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

fn etcdctl_command(endpoints: &str, arguments: &[&str]) -> Command {
    let mut command = Command::new("etcdctl");
    command
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .args(arguments);
    command
}

fn keel_command(arguments: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
    command.args(arguments);
    command
}

fn keel(arguments: &[&str]) -> std::process::Output {
    keel_command(arguments)
        .stdin(Stdio::null())
        .output()
        .expect("keel runs")
}

/// Replaces 16-digit hexadecimal lease ids, which differ by design.
fn normalise_ids(text: &str) -> String {
    text.split_inclusive(|character: char| !character.is_ascii_hexdigit())
        .map(|word| {
            let digits = word.trim_end_matches(|character: char| !character.is_ascii_hexdigit());
            if digits.len() == 16 {
                word.replacen(digits, "ID", 1)
            } else {
                word.to_string()
            }
        })
        .collect()
}

/// Starts a three-member cluster and waits until every member's client URL is
/// recorded: until then a follower cannot forward lease keep-alives and
/// time-to-live queries to the leader ("leader's client URL is not known yet").
fn start_cluster(port_base: u16) -> Cluster {
    let cluster = Cluster::start(3, port_base);
    for member in &cluster.members {
        let url = member.url();
        block_on(async {
            let mut client = ClusterClient::new(open_channel(&url).await);
            let deadline = Instant::now() + CONDITION_TIMEOUT;
            loop {
                if let Ok(response) = client.member_list(MemberListRequest::default()).await {
                    let members = response.into_inner().members;
                    if members.len() == 3
                        && members.iter().all(|member| !member.client_ur_ls.is_empty())
                    {
                        return;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "members never published their client URLs"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
    cluster
}

/// Waits (bounded) until `length` keys queue under `prefix` (a lock's
/// waiters or an election's candidates), read with etcdctl.
fn wait_for_queue(endpoints: &str, prefix: &str, length: usize) {
    wait_for(&format!("{length} keys under {prefix}"), || {
        let (code, out, _) =
            run_etcdctl(endpoints, &["get", "--prefix", "--keys-only", prefix], None);
        (code == 0 && out.lines().filter(|line| !line.is_empty()).count() == length).then_some(())
    });
}

/// Waits (bounded) until `condition` returns a value.
fn wait_for<T>(what: &str, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + CONDITION_TIMEOUT;
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {CONDITION_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn open_channel(url: &str) -> Channel {
    connect(url).await.expect("connect")
}

async fn grant(channel: &Channel, ttl: i64) -> i64 {
    LeaseClient::new(channel.clone())
        .lease_grant(LeaseGrantRequest { ttl, id: 0 })
        .await
        .expect("grant")
        .into_inner()
        .id
}

async fn revoke(channel: &Channel, id: i64) {
    LeaseClient::new(channel.clone())
        .lease_revoke(LeaseRevokeRequest { id })
        .await
        .expect("revoke");
}

async fn create_revision(channel: &Channel, key: &[u8]) -> Option<i64> {
    KvClient::new(channel.clone())
        .range(RangeRequest {
            key: key.to_vec(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner()
        .kvs
        .first()
        .map(|kv| kv.create_revision)
}

/// The next leader an Observe stream reports, waiting at most [`LINE_TIMEOUT`].
async fn next_observed(
    observed: &mut tonic::Streaming<LeaderResponse>,
) -> keel_types::mvccpb::KeyValue {
    tokio::time::timeout(LINE_TIMEOUT, observed.message())
        .await
        .expect("an observation in time")
        .expect("observe stream")
        .expect("observation")
        .kv
        .expect("kv")
}

/// Waits (bounded) until `key` is gone.
async fn wait_until_deleted(channel: &Channel, key: &[u8]) {
    let deadline = Instant::now() + CONDITION_TIMEOUT;
    while create_revision(channel, key).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "{} still exists",
            String::from_utf8_lossy(key)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn etcdctl_lock_and_elect_print_what_they_print_on_etcd() {
    let cluster = start_cluster(24210);
    let etcd = ReferenceEtcd::start(24290);
    let keel_endpoints = cluster.endpoints();
    let targets = [
        ("keel", keel_endpoints.as_str()),
        ("etcd", etcd.endpoint.as_str()),
    ];

    // A lock around a command: the command's output, and exit code 0.
    let mut outputs = Vec::new();
    for (_, endpoints) in targets {
        let (code, out, error) =
            run_etcdctl(endpoints, &["lock", "ctl-lock", "--", "echo", "hi"], None);
        assert_eq!(code, 0, "{error}");
        outputs.push(out);
    }
    assert_eq!(outputs[0], "hi\n");
    assert_eq!(outputs[0], outputs[1]);

    // An interactive lock prints its key (name/lease id) and an empty value,
    // then holds the lock until interrupted.
    let mut printed = Vec::new();
    for (name, endpoints) in targets {
        let mut lock = Interactive::start(
            etcdctl_command(endpoints, &["lock", "ctl-lock"]),
            &format!("etcdctl lock on {name}"),
        );
        let lines = [lock.next_line(), lock.next_line()];
        printed.push(normalise_ids(&lines.join("\n")));
        lock.signal("INT");
        assert_eq!(lock.wait(), Some(0), "etcdctl lock on {name} after Ctrl-C");
    }
    assert_eq!(printed[0], "ctl-lock/ID\n");
    assert_eq!(printed[0], printed[1]);

    // A contended lock: the waiter (etcdctl's client-side mutex, waiting on a
    // watch) runs its command once the holder is interrupted and unlocks.
    let mut printed = Vec::new();
    for (name, endpoints) in targets {
        let mut holder = Interactive::start(
            etcdctl_command(endpoints, &["lock", "ctl-contended"]),
            &format!("etcdctl lock on {name}"),
        );
        let held = holder.next_line();
        let mut waiter = Interactive::start(
            etcdctl_command(endpoints, &["lock", "ctl-contended", "--", "echo", "next"]),
            &format!("etcdctl lock -- echo on {name}"),
        );
        wait_for_queue(endpoints, "ctl-contended/", 2);
        holder.signal("INT");
        assert_eq!(
            holder.wait(),
            Some(0),
            "etcdctl lock on {name} after Ctrl-C"
        );
        let next = waiter.next_line();
        assert_eq!(waiter.wait(), Some(0), "the waiting etcdctl lock on {name}");
        printed.push(normalise_ids(&format!("{held}\n{next}")));
    }
    assert_eq!(printed[0], "ctl-contended/ID\nnext");
    assert_eq!(printed[0], printed[1]);

    // A campaign prints the leader key and value; an observer prints the
    // same, and the next leader when the first resigns on Ctrl-C.
    let mut printed = Vec::new();
    for (name, endpoints) in targets {
        let mut first = Interactive::start(
            etcdctl_command(endpoints, &["elect", "ctl-election", "first"]),
            &format!("etcdctl elect first on {name}"),
        );
        let elected = [first.next_line(), first.next_line()].join("\n");
        let mut observer = Interactive::start(
            etcdctl_command(endpoints, &["elect", "-l", "ctl-election"]),
            &format!("etcdctl elect -l on {name}"),
        );
        let observed = [observer.next_line(), observer.next_line()].join("\n");
        assert_eq!(
            elected, observed,
            "{name}: the observer sees the first leader"
        );
        let mut second = Interactive::start(
            etcdctl_command(endpoints, &["elect", "ctl-election", "second"]),
            &format!("etcdctl elect second on {name}"),
        );
        wait_for_queue(endpoints, "ctl-election/", 2);
        first.signal("INT");
        assert_eq!(
            first.wait(),
            Some(0),
            "etcdctl elect on {name} after Ctrl-C"
        );
        let next_elected = [second.next_line(), second.next_line()].join("\n");
        let next_observed = [observer.next_line(), observer.next_line()].join("\n");
        assert_eq!(
            next_elected, next_observed,
            "{name}: the observer sees the second leader"
        );
        printed.push(normalise_ids(&format!("{elected}\n{next_elected}")));
    }
    assert_eq!(
        printed[0],
        "ctl-election/ID\nfirst\nctl-election/ID\nsecond"
    );
    assert_eq!(printed[0], printed[1]);

    // etcdctl's client-side mutex and keel's Lock service use the same keys,
    // so they exclude each other: keel lock waits for etcdctl's lock.
    let mut holder = Interactive::start(
        etcdctl_command(&keel_endpoints, &["lock", "shared-lock"]),
        "etcdctl lock shared-lock",
    );
    let held_key = holder.next_line();
    let mut waiter = Interactive::start(
        keel_command(&[
            "lock",
            "--endpoints",
            &keel_endpoints,
            "shared-lock",
            "--",
            "echo",
            "acquired",
        ]),
        "keel lock shared-lock",
    );
    let url = cluster.members[0].url();
    let waiter_key = block_on(async {
        let channel = open_channel(&url).await;
        // The waiter's key joins the queue behind etcdctl's.
        let deadline = Instant::now() + CONDITION_TIMEOUT;
        loop {
            let response = KvClient::new(channel.clone())
                .range(RangeRequest {
                    key: b"shared-lock/".to_vec(),
                    range_end: b"shared-lock0".to_vec(),
                    ..Default::default()
                })
                .await
                .expect("range")
                .into_inner();
            if response.kvs.len() == 2 {
                break response
                    .kvs
                    .into_iter()
                    .find(|kv| kv.key != held_key.as_bytes())
                    .expect("waiter key");
            }
            assert!(Instant::now() < deadline, "keel lock never queued");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    assert!(
        waiter.lines.try_recv().is_err(),
        "keel lock ran its command while etcdctl held the lock"
    );
    holder.signal("INT");
    assert_eq!(holder.wait(), Some(0));
    assert_eq!(waiter.next_line(), "acquired");
    assert_eq!(waiter.wait(), Some(0));
    assert!(!waiter_key.key.is_empty());
}

#[test]
fn lock_service_queues_cancels_and_reports_lost_sessions() {
    let cluster = start_cluster(24220);
    let leader = cluster.wait_for_leader();
    // Talk to a follower: waiting must work on any member.
    let url = cluster.members[(leader + 1) % 3].url();
    block_on(async {
        let channel = open_channel(&url).await;
        let mut lock = LockClient::new(channel.clone());
        let first_lease = grant(&channel, 30).await;
        let second_lease = grant(&channel, 30).await;

        // Uncontended: the answer comes at once, with the key's creation header.
        let first = lock
            .lock(LockRequest {
                name: b"queue".to_vec(),
                lease: first_lease,
            })
            .await
            .expect("first lock")
            .into_inner();
        assert_eq!(first.key, format!("queue/{first_lease:x}").into_bytes());
        let first_token = create_revision(&channel, &first.key)
            .await
            .expect("first key");
        assert_eq!(first.header.expect("header").revision, first_token);

        // Locking again with the same lease re-enters at the same place.
        let again = lock
            .lock(LockRequest {
                name: b"queue".to_vec(),
                lease: first_lease,
            })
            .await
            .expect("lock again")
            .into_inner();
        assert_eq!(again.key, first.key);
        assert_eq!(
            create_revision(&channel, &first.key).await,
            Some(first_token)
        );

        // A waiter whose client gives up leaves the queue.
        let second_key = format!("queue/{second_lease:x}").into_bytes();
        let cancelled = tokio::time::timeout(
            Duration::from_millis(500),
            lock.lock(LockRequest {
                name: b"queue".to_vec(),
                lease: second_lease,
            }),
        )
        .await;
        assert!(cancelled.is_err(), "the second lock must wait");
        wait_until_deleted(&channel, &second_key).await;

        // A waiter whose lease is revoked fails with etcd's session error.
        let mut waiting_lock = lock.clone();
        let waiting = tokio::spawn(async move {
            waiting_lock
                .lock(LockRequest {
                    name: b"queue".to_vec(),
                    lease: second_lease,
                })
                .await
        });
        let deadline = Instant::now() + CONDITION_TIMEOUT;
        while create_revision(&channel, &second_key).await.is_none() {
            assert!(Instant::now() < deadline, "the waiter never queued");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        revoke(&channel, second_lease).await;
        let error = tokio::time::timeout(CONDITION_TIMEOUT, waiting)
            .await
            .expect("the waiter must end")
            .expect("task")
            .expect_err("the waiter's session expired");
        assert_eq!(error.message(), "mutex: session is expired");

        // A waiter gets the lock when the holder unlocks, with a larger token.
        let third_lease = grant(&channel, 30).await;
        let mut waiting_lock = lock.clone();
        let waiting = tokio::spawn(async move {
            waiting_lock
                .lock(LockRequest {
                    name: b"queue".to_vec(),
                    lease: third_lease,
                })
                .await
        });
        let third_key = format!("queue/{third_lease:x}").into_bytes();
        while create_revision(&channel, &third_key).await.is_none() {
            assert!(Instant::now() < deadline, "the third waiter never queued");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !waiting.is_finished(),
            "the third lock must wait for the first"
        );
        lock.unlock(UnlockRequest {
            key: first.key.clone(),
        })
        .await
        .expect("unlock");
        let third = tokio::time::timeout(CONDITION_TIMEOUT, waiting)
            .await
            .expect("the waiter gets the lock")
            .expect("task")
            .expect("third lock")
            .into_inner();
        assert_eq!(third.key, third_key);
        let third_token = create_revision(&channel, &third_key)
            .await
            .expect("third key");
        assert!(third_token > first_token);
        assert!(third.header.expect("header").revision >= third_token);

        // A lease that does not exist: etcd's error and code.
        let error = lock
            .lock(LockRequest {
                name: b"queue".to_vec(),
                lease: 0x1234,
            })
            .await
            .expect_err("no such lease");
        assert_eq!(error.code(), tonic::Code::NotFound);
        assert_eq!(error.message(), "etcdserver: requested lease not found");
    });
}

#[test]
fn election_campaign_leader_observe_proclaim_and_resign() {
    let cluster = start_cluster(24230);
    let leader = cluster.wait_for_leader();
    let url = cluster.members[(leader + 1) % 3].url();
    let other_url = cluster.members[(leader + 2) % 3].url();
    block_on(async {
        let channel = open_channel(&url).await;
        let mut election = ElectionClient::new(channel.clone());
        let mut other_election = ElectionClient::new(open_channel(&other_url).await);

        let error = election
            .leader(LeaderRequest {
                name: b"office".to_vec(),
            })
            .await
            .expect_err("no candidate yet");
        assert_eq!(error.message(), "election: no leader");

        let first_lease = grant(&channel, 30).await;
        let second_lease = grant(&channel, 30).await;
        let first = election
            .campaign(CampaignRequest {
                name: b"office".to_vec(),
                lease: first_lease,
                value: b"one".to_vec(),
            })
            .await
            .expect("first campaign")
            .into_inner()
            .leader
            .expect("leader key");
        assert_eq!(first.key, format!("office/{first_lease:x}").into_bytes());
        assert_eq!(first.lease, first_lease);
        assert_eq!(first.name, b"office");

        let mut observed = election
            .observe(LeaderRequest {
                name: b"office".to_vec(),
            })
            .await
            .expect("observe")
            .into_inner();
        let seen = next_observed(&mut observed).await;
        assert_eq!(
            (seen.key.clone(), seen.value.clone()),
            (first.key.clone(), b"one".to_vec())
        );

        // The second candidate (on another member) waits behind the first.
        let second_campaign = tokio::spawn(async move {
            other_election
                .campaign(CampaignRequest {
                    name: b"office".to_vec(),
                    lease: second_lease,
                    value: b"two".to_vec(),
                })
                .await
        });
        let second_key = format!("office/{second_lease:x}").into_bytes();
        let deadline = Instant::now() + CONDITION_TIMEOUT;
        while create_revision(&channel, &second_key).await.is_none() {
            assert!(
                Instant::now() < deadline,
                "the second candidate never queued"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let current = election
            .leader(LeaderRequest {
                name: b"office".to_vec(),
            })
            .await
            .expect("leader")
            .into_inner()
            .kv
            .expect("kv");
        assert_eq!(current.key, first.key, "the first candidate leads");
        assert!(!second_campaign.is_finished());

        // Proclaim changes the value; observers see it.
        election
            .proclaim(ProclaimRequest {
                leader: Some(first.clone()),
                value: b"uno".to_vec(),
            })
            .await
            .expect("proclaim");
        let seen = next_observed(&mut observed).await;
        assert_eq!(
            (seen.key.clone(), seen.value.clone()),
            (first.key.clone(), b"uno".to_vec())
        );
        let current = election
            .leader(LeaderRequest {
                name: b"office".to_vec(),
            })
            .await
            .expect("leader")
            .into_inner()
            .kv
            .expect("kv");
        assert_eq!(current.value, b"uno");

        // Resigning hands over to the second candidate.
        election
            .resign(ResignRequest {
                leader: Some(first.clone()),
            })
            .await
            .expect("resign");
        let second = tokio::time::timeout(CONDITION_TIMEOUT, second_campaign)
            .await
            .expect("the second candidate is elected")
            .expect("task")
            .expect("second campaign")
            .into_inner()
            .leader
            .expect("leader key");
        assert_eq!(second.key, second_key);
        assert!(second.rev > first.rev, "leader keys' revisions increase");
        let seen = next_observed(&mut observed).await;
        assert_eq!(
            (seen.key.clone(), seen.value.clone()),
            (second_key.clone(), b"two".to_vec())
        );

        // The deposed leader can no longer proclaim; its resignation is a no-op.
        let error = election
            .proclaim(ProclaimRequest {
                leader: Some(first.clone()),
                value: b"usurp".to_vec(),
            })
            .await
            .expect_err("deposed");
        assert_eq!(error.message(), "election: not leader");
        election
            .resign(ResignRequest {
                leader: Some(first.clone()),
            })
            .await
            .expect("a stale resignation is not an error");
        let current = election
            .leader(LeaderRequest {
                name: b"office".to_vec(),
            })
            .await
            .expect("leader")
            .into_inner()
            .kv
            .expect("kv");
        assert_eq!(
            (current.key, current.value),
            (second_key.clone(), b"two".to_vec())
        );

        let error = election
            .proclaim(ProclaimRequest {
                leader: None,
                value: b"x".to_vec(),
            })
            .await
            .expect_err("no leader key");
        assert_eq!(error.message(), "\"leader\" field must be provided");

        // The leader's lease expiring ends its leadership: observers see no
        // more of it, and Leader reports none.
        revoke(&channel, second_lease).await;
        let deadline = Instant::now() + CONDITION_TIMEOUT;
        loop {
            match election
                .leader(LeaderRequest {
                    name: b"office".to_vec(),
                })
                .await
            {
                Err(error) if error.message() == "election: no leader" => break,
                _ => assert!(
                    Instant::now() < deadline,
                    "the leader key outlived its lease"
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

#[test]
fn lease_lock_and_elect_commands() {
    let cluster = start_cluster(24240);
    let endpoints = cluster.endpoints();

    // keel lease, human-readable and JSON.
    let granted = keel(&["lease", "--endpoints", &endpoints, "grant", "60"]);
    assert!(granted.status.success(), "{granted:?}");
    let granted = String::from_utf8_lossy(&granted.stdout).into_owned();
    assert_eq!(normalise_ids(&granted), "lease ID granted with TTL(60s)\n");
    let id = granted
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    let (code, _, error) = run_etcdctl(&endpoints, &["put", "--lease", &id, "leased", "v"], None);
    assert_eq!(code, 0, "{error}");
    let ttl = keel(&["lease", "--endpoints", &endpoints, "ttl", &id, "--keys"]);
    assert!(
        ttl.status.success(),
        "{}",
        String::from_utf8_lossy(&ttl.stderr)
    );
    let ttl = String::from_utf8_lossy(&ttl.stdout).into_owned();
    assert!(
        ttl.starts_with(&format!("lease {id} granted with TTL(60s), remaining("))
            && ttl.ends_with("attached keys(leased)\n"),
        "{ttl}"
    );
    let kept = keel(&[
        "lease",
        "--endpoints",
        &endpoints,
        "keep-alive",
        &id,
        "--once",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&kept.stdout),
        format!("lease {id} keepalived with TTL(60)\n")
    );
    let listed = keel(&["lease", "--endpoints", &endpoints, "-o", "json", "list"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("json");
    assert_eq!(listed["count"], 1);
    assert_eq!(listed["leases_hex"][0], id.as_str());
    let revoked = keel(&["lease", "--endpoints", &endpoints, "revoke", &id]);
    assert_eq!(
        String::from_utf8_lossy(&revoked.stdout),
        format!("lease {id} revoked\n")
    );
    let ttl = keel(&["lease", "--endpoints", &endpoints, "-o", "json", "ttl", &id]);
    let ttl: serde_json::Value = serde_json::from_slice(&ttl.stdout).expect("json");
    assert_eq!(ttl["expired"], true);
    let kept = keel(&[
        "lease",
        "--endpoints",
        &endpoints,
        "keep-alive",
        &id,
        "--once",
    ]);
    assert!(
        !kept.status.success(),
        "keep-alive of a revoked lease must fail"
    );
    let bad = keel(&["lease", "--endpoints", &endpoints, "revoke", "zz"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bad lease ID"));

    // keel lock -- COMMAND: the fencing token and key in the environment, the
    // command's exit code propagated, the lock released after.
    let locked = keel(&[
        "lock",
        "--endpoints",
        &endpoints,
        "cli-lock",
        "--",
        "sh",
        "-c",
        "echo $KEEL_LOCK_REVISION $KEEL_LOCK_KEY",
    ]);
    assert!(locked.status.success(), "{locked:?}");
    let printed = String::from_utf8_lossy(&locked.stdout).into_owned();
    let (token, key) = printed.trim().split_once(' ').expect("token and key");
    let token: i64 = token.parse().expect("a number");
    assert!(token > 0);
    assert_eq!(normalise_ids(key), "cli-lock/ID");
    let failed = keel(&[
        "lock",
        "--endpoints",
        &endpoints,
        "cli-lock",
        "--",
        "sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(failed.status.code(), Some(7));
    let again = keel(&[
        "lock",
        "--endpoints",
        &endpoints,
        "cli-lock",
        "--",
        "sh",
        "-c",
        "echo $KEEL_LOCK_REVISION",
    ]);
    let next_token: i64 = String::from_utf8_lossy(&again.stdout)
        .trim()
        .parse()
        .expect("token");
    assert!(
        next_token > token,
        "tokens increase: {token} then {next_token}"
    );

    // keel lock without a command holds until Ctrl-C, then releases.
    let mut holder = Interactive::start(
        keel_command(&["lock", "--endpoints", &endpoints, "-o", "json", "cli-lock"]),
        "keel lock",
    );
    let locked: serde_json::Value = serde_json::from_str(&holder.next_line()).expect("json");
    assert_eq!(locked["event"], "locked");
    assert!(locked["revision"].as_i64().expect("token") > next_token);
    let held_key = locked["key"].as_str().expect("key").to_string();
    holder.signal("INT");
    let unlocked: serde_json::Value = serde_json::from_str(&holder.next_line()).expect("json");
    assert_eq!(unlocked["event"], "unlocked");
    assert_eq!(holder.wait(), Some(0));
    let url = cluster.members[0].url();
    block_on(async { wait_until_deleted(&open_channel(&url).await, held_key.as_bytes()).await });

    // keel elect: a campaign, an observer, a hand-over on Ctrl-C.
    let mut observer = Interactive::start(
        keel_command(&[
            "elect",
            "--endpoints",
            &endpoints,
            "--listen",
            "cli-election",
        ]),
        "keel elect --listen",
    );
    let mut first = Interactive::start(
        keel_command(&["elect", "--endpoints", &endpoints, "cli-election", "alpha"]),
        "keel elect alpha",
    );
    let elected = first.next_line();
    assert!(
        elected.starts_with("elected cli-election/") && elected.contains(" = alpha "),
        "{elected}"
    );
    let seen = observer.next_line();
    assert!(
        seen.starts_with("leader cli-election/") && seen.contains(" = alpha "),
        "{seen}"
    );
    let mut second = Interactive::start(
        keel_command(&[
            "elect",
            "--endpoints",
            &endpoints,
            "-o",
            "json",
            "cli-election",
            "beta",
        ]),
        "keel elect beta",
    );
    first.signal("INT");
    assert_eq!(first.next_line(), "resigned");
    assert_eq!(first.wait(), Some(0));
    let elected: serde_json::Value = serde_json::from_str(&second.next_line()).expect("json");
    assert_eq!(elected["event"], "elected");
    assert_eq!(elected["value"], "beta");
    let seen = observer.next_line();
    assert!(seen.contains(" = beta "), "{seen}");
    second.signal("TERM");
    assert_eq!(second.wait(), Some(0));
    observer.signal("INT");
    assert_eq!(observer.wait(), Some(0));
}

/// The script each `keel lock` runs while it holds the lock: a write guarded
/// by the fencing token, an announcement, a wait for the test's go-ahead (the
/// moment the test may pause the holder), and a second guarded write. Each
/// guarded write is a Txn that succeeds only while the lock key still has
/// the holder's create revision, and records itself under `log/`.
const HOLDER_SCRIPT: &str = r#"
set -u
directory=$1
endpoints=$2
token=$KEEL_LOCK_REVISION
guarded_write() {
    printf 'create("%s") = "%s"\n\nput resource %s\nput log/%s/%s %s\n\n\n' \
        "$KEEL_LOCK_KEY" "$token" "$token" "$token" "$1" "$token" \
        | ETCDCTL_API=3 etcdctl --endpoints="$endpoints" --command-timeout=10s txn \
        > "$directory/write$1.$token.partial"
    mv "$directory/write$1.$token.partial" "$directory/write$1.$token"
}
guarded_write 1
echo "$$ $PPID" > "$directory/holding.$token.partial"
mv "$directory/holding.$token.partial" "$directory/holding.$token"
waited=0
while [ ! -e "$directory/proceed.$token" ]; do
    sleep 0.02
    waited=$((waited + 1))
    if [ "$waited" -gt 3000 ]; then exit 97; fi
done
guarded_write 2
"#;

/// Tokens announced in `directory` (holders that got the lock), by token, with
/// the pid of the `keel lock` process that holds each.
fn announced_holders(directory: &Path) -> BTreeMap<i64, u32> {
    let mut holders = BTreeMap::new();
    for entry in std::fs::read_dir(directory).expect("read directory") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        let Some(token) = name.strip_prefix("holding.") else {
            continue;
        };
        let Ok(token) = token.parse::<i64>() else {
            continue;
        };
        let text = std::fs::read_to_string(directory.join(&name)).expect("holding file");
        let parent: u32 = text
            .split_whitespace()
            .nth(1)
            .and_then(|pid| pid.parse().ok())
            .expect("the holder's keel pid");
        holders.insert(token, parent);
    }
    holders
}

fn write_result(directory: &Path, write: u32, token: i64) -> Option<String> {
    std::fs::read_to_string(directory.join(format!("write{write}.{token}"))).ok()
}

#[test]
fn fencing_tokens_keep_writes_exclusive_when_the_holder_is_paused_past_its_ttl() {
    const CONTENDERS: usize = 4;
    let cluster = start_cluster(24200);
    let endpoints = cluster.endpoints();
    let state = tempfile::tempdir().expect("temporary directory");
    let directory = state.path().to_path_buf();
    let script = directory.join("holder.sh");
    std::fs::write(&script, HOLDER_SCRIPT).expect("script");
    let directory_text = directory.display().to_string();
    let script_text = script.display().to_string();

    let mut contenders: Vec<Interactive> = (0..CONTENDERS)
        .map(|index| {
            let mut command = keel_command(&[
                "lock",
                "--endpoints",
                &endpoints,
                "--ttl",
                "3",
                "fence",
                "--",
                "sh",
                &script_text,
                &directory_text,
                &endpoints,
            ]);
            command.stderr(Stdio::piped());
            Interactive::start(command, &format!("contender {index}"))
        })
        .collect();
    let contender_of = |contenders: &[Interactive], pid: u32| {
        contenders
            .iter()
            .position(|contender| contender.child.id() == pid)
            .expect("the holder is one of the contenders")
    };

    // The first holder announces itself; pause it (keel lock, the script and
    // its children: the whole process group) so its keep-alives stop.
    let first_holders = wait_for("a first holder", || {
        Some(announced_holders(&directory)).filter(|holders| !holders.is_empty())
    });
    assert_eq!(
        first_holders.len(),
        1,
        "two holders at once: {first_holders:?}"
    );
    let (&paused_token, &paused_pid) = first_holders.iter().next().expect("one");
    let paused = contender_of(&contenders, paused_pid);
    let group = format!("-{paused_pid}");
    assert!(Command::new("kill")
        .args(["-STOP", "--", &group])
        .status()
        .expect("kill")
        .success());
    assert_eq!(
        write_result(&directory, 1, paused_token)
            .as_deref()
            .map(str::trim),
        Some("SUCCESS\n\nOK\n\nOK".trim())
    );

    // Its lease expires; the next contender gets the lock with a larger token.
    let mut order = vec![paused_token];
    let next = wait_for("a holder after the paused one's lease expired", || {
        let holders = announced_holders(&directory);
        (holders.len() > 1).then_some(holders)
    });
    assert_eq!(next.len(), 2, "two new holders at once: {next:?}");
    let (&second_token, _) = next
        .iter()
        .find(|(&token, _)| token != paused_token)
        .expect("second");
    assert!(
        second_token > paused_token,
        "tokens increase: {paused_token} then {second_token}"
    );
    order.push(second_token);

    // Wake the paused holder and let it attempt its late write while the
    // second holds the lock: the fencing token must reject it.
    std::fs::write(directory.join(format!("proceed.{paused_token}")), "").expect("proceed");
    assert!(Command::new("kill")
        .args(["-CONT", "--", &group])
        .status()
        .expect("kill")
        .success());
    let late = wait_for("the paused holder's late write", || {
        write_result(&directory, 2, paused_token)
    });
    assert_eq!(
        late.trim(),
        "FAILURE",
        "the deposed holder's write went through"
    );
    let paused_exit = contenders[paused].wait();
    assert_eq!(
        paused_exit,
        Some(1),
        "keel lock reports the lock lost under its command"
    );

    // The others take the lock one after another; each writes twice.
    let mut current = second_token;
    loop {
        std::fs::write(directory.join(format!("proceed.{current}")), "").expect("proceed");
        wait_for("a holder's second write", || {
            write_result(&directory, 2, current)
        });
        if order.len() == CONTENDERS {
            break;
        }
        let holders = wait_for("the next holder", || {
            let holders = announced_holders(&directory);
            (holders.len() > order.len()).then_some(holders)
        });
        assert_eq!(
            holders.len(),
            order.len() + 1,
            "two new holders at once: {holders:?}"
        );
        let next = *holders
            .keys()
            .find(|token| !order.contains(token))
            .expect("new");
        assert!(next > current, "tokens increase: {current} then {next}");
        order.push(next);
        current = next;
    }
    for (index, contender) in contenders.iter_mut().enumerate() {
        if index != paused {
            assert_eq!(contender.wait(), Some(0), "contender {index}");
        }
    }
    assert_eq!(order.len(), CONTENDERS);

    // The history of guarded writes: every successful write, in revision
    // order, carries a token no smaller than the one before (no interleaving
    // of holders), each holder's writes are contiguous, and only the paused
    // holder's late write was refused.
    let url = cluster.members[0].url();
    let log = block_on(async {
        KvClient::new(open_channel(&url).await)
            .range(RangeRequest {
                key: b"log/".to_vec(),
                range_end: b"log0".to_vec(),
                sort_order: 1,
                sort_target: 3,
                ..Default::default()
            })
            .await
            .expect("range")
            .into_inner()
            .kvs
    });
    let history: Vec<(i64, String)> = log
        .iter()
        .map(|kv| {
            (
                kv.mod_revision,
                String::from_utf8_lossy(&kv.key).into_owned(),
            )
        })
        .collect();
    let tokens: Vec<i64> = log
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.value).parse().expect("token"))
        .collect();
    assert_eq!(tokens.len(), 2 * CONTENDERS - 1, "history: {history:?}");
    assert!(
        tokens.windows(2).all(|pair| pair[0] <= pair[1]),
        "guarded writes of different holders interleave: {history:?}"
    );
    let mut expected = vec![paused_token];
    for &token in &order[1..] {
        expected.extend([token, token]);
    }
    assert_eq!(tokens, expected, "history: {history:?}");
    for &token in &order[1..] {
        assert_eq!(
            write_result(&directory, 2, token).as_deref().map(str::trim),
            Some("SUCCESS\n\nOK\n\nOK")
        );
    }
}
