//! `keel chaos inject` against real member processes: each fault kind has an effect a
//! client can observe, and each heals (by itself after `--for`, or by `keel chaos heal`).
//! Ports 28000–28099.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{block_on, connect, Cluster};
use keel_server::api::etcdserverpb::kv_client::KvClient;
use keel_server::api::etcdserverpb::lease_client::LeaseClient;
use keel_types::etcdserverpb::{LeaseGrantRequest, LeaseTimeToLiveRequest, PutRequest};

const FAULT_INJECTION: &[&str] = &["--experimental-enable-fault-injection"];
const WAIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `keel chaos ARGUMENTS --endpoints …`; returns (success, stdout, stderr).
fn keel_chaos(cluster: &Cluster, arguments: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("chaos")
        .args(arguments)
        .args(["--endpoints", &cluster.endpoints()])
        .output()
        .expect("keel chaos runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn inject(cluster: &Cluster, arguments: &[&str]) -> String {
    let mut all = vec!["inject"];
    all.extend_from_slice(arguments);
    let (success, stdout, stderr) = keel_chaos(cluster, &all);
    assert!(success, "keel chaos {all:?} failed: {stderr}");
    stdout
}

/// Starts a cluster and waits until every member has published its client URL, which
/// `keel chaos` needs to reach it.
fn start(size: usize, port_base: u16, arguments: &[&str]) -> Cluster {
    let cluster = Cluster::start_with(size, port_base, arguments);
    wait_until("every member has published its client URL", || {
        let (_, _, stderr) = keel_chaos(&cluster, &["list"]);
        !stderr.contains("published no client URL")
    });
    cluster
}

/// Polls `condition` every 50 ms until it holds or `WAIT_TIMEOUT` passes.
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_TIMEOUT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn member_id(cluster: &Cluster, index: usize) -> u64 {
    cluster
        .status(index)
        .and_then(|status| status.header)
        .map(|header| header.member_id)
        .expect("the member answers")
}

/// The leader the given members agree on, if they all answer and agree.
fn agreed_leader(cluster: &Cluster, indexes: &[usize]) -> Option<u64> {
    let leaders: Vec<u64> = indexes
        .iter()
        .map(|&index| cluster.status(index).map(|status| status.leader))
        .collect::<Option<_>>()?;
    (leaders[0] != 0 && leaders.iter().all(|&leader| leader == leaders[0])).then_some(leaders[0])
}

/// Puts one key through member `index`; returns the latency if acknowledged within 5 s.
fn put(cluster: &Cluster, index: usize, key: &str) -> Option<Duration> {
    let url = cluster.members[index].url();
    block_on(async move {
        let mut client = KvClient::new(connect(&url).await.ok()?);
        let started = Instant::now();
        let request = PutRequest {
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        };
        tokio::time::timeout(Duration::from_secs(5), client.put(request))
            .await
            .ok()?
            .ok()?;
        Some(started.elapsed())
    })
}

fn median_put_latency(cluster: &Cluster, index: usize, prefix: &str) -> Duration {
    let mut latencies: Vec<Duration> = (0..15)
        .map(|count| put(cluster, index, &format!("{prefix}/{count}")).expect("put acknowledged"))
        .collect();
    latencies.sort();
    latencies[latencies.len() / 2]
}

#[test]
fn partition_of_the_leader_elects_a_new_leader_on_the_majority_side_and_heals() {
    let cluster = start(3, 28000, FAULT_INJECTION);
    let leader = cluster.wait_for_leader();
    let leader_id = member_id(&cluster, leader);
    let majority: Vec<usize> = (0..3).filter(|&index| index != leader).collect();
    let leader_name = cluster.members[leader].name.clone();
    let injected = inject(
        &cluster,
        &["partition", "--target", &leader_name, "--for", "8s"],
    );
    assert!(injected.contains("fault 1 injected"), "{injected}");

    wait_until("the majority elects a new leader", || {
        agreed_leader(&cluster, &majority).is_some_and(|leader| leader != leader_id)
    });
    assert!(
        put(&cluster, majority[0], "during-partition").is_some(),
        "the majority side accepts writes"
    );
    let (_, listed, _) = keel_chaos(&cluster, &["list", "--target", &leader_name]);
    assert!(listed.contains("partition from"), "{listed}");

    // The partition heals by itself: every member agrees on one leader again.
    wait_until("the old leader rejoins after the partition expires", || {
        agreed_leader(&cluster, &[0, 1, 2]).is_some()
    });
    let log = cluster.log(leader);
    assert!(
        log.contains("fault injected") && log.contains("fault healed: its duration ended"),
        "{log}"
    );
}

#[test]
fn slow_clock_delays_lease_expiry() {
    let cluster = start(3, 28010, FAULT_INJECTION);
    let leader = cluster.wait_for_leader();
    let leader_name = cluster.members[leader].name.clone();
    let url = cluster.members[leader].url();
    // A quarter-speed tick clock on the leader, whose lessor counts lease time in ticks.
    inject(
        &cluster,
        &[
            "clock",
            "--rate",
            "0.25",
            "--target",
            &leader_name,
            "--for",
            "60s",
        ],
    );
    let (lease, granted_at) = block_on(async {
        let mut client = LeaseClient::new(connect(&url).await.expect("connect"));
        let response = client
            .lease_grant(LeaseGrantRequest { ttl: 2, id: 0 })
            .await
            .expect("grant")
            .into_inner();
        (response.id, Instant::now())
    });
    let time_to_live = || {
        block_on(async {
            let mut client = LeaseClient::new(connect(&url).await.ok()?);
            client
                .lease_time_to_live(LeaseTimeToLiveRequest {
                    id: lease,
                    keys: false,
                })
                .await
                .ok()
                .map(|response| response.into_inner().ttl)
        })
    };
    // At real clock speed a 2 s lease is gone within 3 s; at a quarter it lasts ~8 s.
    std::thread::sleep(Duration::from_secs(5).saturating_sub(granted_at.elapsed()));
    let remaining = time_to_live();
    assert!(
        remaining.is_some_and(|ttl| ttl >= 0),
        "the lease must outlive 5 s of real time at a quarter-speed clock (-1: gone): {remaining:?}"
    );
    // Healing restores the real rate: the lease expires soon after.
    let (healed, stdout, stderr) = keel_chaos(&cluster, &["heal", "--target", &leader_name]);
    assert!(
        healed && stdout.contains("1 fault(s) healed"),
        "{stdout} {stderr}"
    );
    wait_until("the lease expires once the clock is healed", || {
        time_to_live() == Some(-1)
    });
    assert!(cluster.log(leader).contains("fault healed on request"));
}

#[test]
fn fsync_errors_stop_the_member_and_the_cluster_goes_on() {
    let mut cluster = start(3, 28020, FAULT_INJECTION);
    let leader = cluster.wait_for_leader();
    let follower = (leader + 1) % 3;
    let follower_name = cluster.members[follower].name.clone();
    inject(
        &cluster,
        &["fsync-error", "--target", &follower_name, "--for", "60s"],
    );
    // Writes make the follower append and fsync; the first fsync fails and stops it.
    assert!(put(&cluster, leader, "after-fsync-fault").is_some());
    wait_until("the member with failing fsyncs exits", || {
        cluster.members[follower]
            .process
            .as_mut()
            .is_some_and(|child| child.try_wait().expect("try_wait").is_some())
    });
    let status = cluster.members[follower]
        .process
        .as_mut()
        .and_then(|child| child.try_wait().ok().flatten())
        .expect("exited");
    assert!(
        !status.success(),
        "a storage failure is a failed exit: {status}"
    );
    let log = cluster.log(follower);
    assert!(log.contains("injected fsync error"), "{log}");
    // Two of three still make a quorum.
    assert!(put(&cluster, leader, "with-two-members").is_some());
    // The fault lived in the dead process's memory: restarted, the member rejoins.
    cluster.members[follower].process = None;
    cluster.start_member(follower);
    cluster.wait_for_leader();
}

#[test]
fn delay_shows_in_write_latency_and_full_drop_deposes_the_leader() {
    let cluster = start(3, 28030, FAULT_INJECTION);
    let leader = cluster.wait_for_leader();
    let leader_id = member_id(&cluster, leader);
    let leader_name = cluster.members[leader].name.clone();
    let before = median_put_latency(&cluster, leader, "before");
    inject(
        &cluster,
        &[
            "delay",
            "--delay",
            "300ms",
            "--jitter",
            "50ms",
            "--target",
            &leader_name,
            "--for",
            "20s",
        ],
    );
    let delayed = median_put_latency(&cluster, leader, "delayed");
    // A write needs the leader's append to reach a follower: at least one delay.
    assert!(
        delayed >= Duration::from_millis(300) && delayed > before,
        "median put latency {before:?} before, {delayed:?} with a 300 ms delay"
    );
    keel_chaos(&cluster, &["heal"]);
    let after = median_put_latency(&cluster, leader, "after");
    assert!(
        after < Duration::from_millis(300),
        "latency after healing: {after:?}"
    );

    // Every message the leader sends lost: followers stop hearing it and elect another.
    inject(
        &cluster,
        &[
            "drop",
            "--fraction",
            "1",
            "--target",
            &leader_name,
            "--for",
            "5s",
        ],
    );
    let others: Vec<usize> = (0..3).filter(|&index| index != leader).collect();
    wait_until("the followers elect a new leader", || {
        agreed_leader(&cluster, &others).is_some_and(|leader| leader != leader_id)
    });
    wait_until("all agree after the drop expires", || {
        agreed_leader(&cluster, &[0, 1, 2]).is_some()
    });
}

#[test]
fn pause_stops_answering_for_its_duration_and_kill_restarts_the_process() {
    let mut cluster = start(3, 28040, FAULT_INJECTION);
    let leader = cluster.wait_for_leader();
    let paused = (leader + 1) % 3;
    let paused_name = cluster.members[paused].name.clone();
    let injected_at = Instant::now();
    inject(
        &cluster,
        &["pause", "--target", &paused_name, "--for", "3s"],
    );
    wait_until("the paused member stops answering", || {
        cluster.status(paused).is_none()
    });
    wait_until("the paused member answers again", || {
        cluster.status(paused).is_some()
    });
    assert!(
        injected_at.elapsed() >= Duration::from_millis(2_500),
        "answered again {:?} after a 3 s pause was injected",
        injected_at.elapsed()
    );

    // A kill: SIGKILL, then the member runs again after --for, by itself, with
    // its member id and its data.
    let killed = (leader + 2) % 3;
    let killed_name = cluster.members[killed].name.clone();
    let killed_id = member_id(&cluster, killed);
    assert!(put(&cluster, leader, "before-kill").is_some());
    let holds_the_key = |cluster: &Cluster| {
        cluster
            .local_range(
                killed,
                keel_types::etcdserverpb::RangeRequest {
                    key: b"before-kill".to_vec(),
                    ..Default::default()
                },
            )
            .is_some_and(|response| response.kvs.len() == 1)
    };
    wait_until("the member to be killed holds the key", || {
        holds_the_key(&cluster)
    });
    let old_pid = cluster.members[killed].pid().expect("runs");
    let killed_at = Instant::now();
    inject(&cluster, &["kill", "--target", &killed_name, "--for", "2s"]);
    wait_until("the killed member exits", || {
        cluster.members[killed]
            .process
            .as_mut()
            .is_some_and(|child| child.try_wait().expect("try_wait").is_some())
    });
    let status = cluster.members[killed]
        .process
        .take()
        .and_then(|mut child| child.try_wait().ok().flatten())
        .expect("exited");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status}");
    // From here the member is no child of this test: the cluster's drop finds
    // it (and its restart helper) by its data directory and kills it by pid.
    wait_until("the killed member answers again", || {
        cluster.status(killed).is_some()
    });
    assert!(
        killed_at.elapsed() >= Duration::from_millis(1_800),
        "answered again {:?} after a kill restarting after 2 s",
        killed_at.elapsed()
    );
    assert_eq!(member_id(&cluster, killed), killed_id, "the same member");
    assert!(holds_the_key(&cluster), "the restarted member has its data");
    let restarted = common::processes_naming(&cluster.members[killed].data_dir);
    assert_eq!(restarted.len(), 1, "one process: {restarted:?}");
    assert_ne!(restarted[0], old_pid);
    let log = cluster.log(killed);
    assert!(
        log.contains(&format!(
            "keel chaos: restarting the killed process as pid {}",
            restarted[0]
        )),
        "{log}"
    );
    wait_until("all three agree on a leader again", || {
        agreed_leader(&cluster, &[0, 1, 2]).is_some()
    });
    // Dropping the cluster ends the restarted member too.
    let data_dir = cluster.members[killed].data_dir.clone();
    drop(cluster);
    wait_until("the restarted member is gone", || {
        common::processes_naming(&data_dir).is_empty()
    });
}

#[test]
fn injection_is_refused_when_off_and_bad_requests_are_named() {
    let cluster = start(1, 28050, &[]);
    let (success, _, stderr) = keel_chaos(
        &cluster,
        &["inject", "clock", "--target", "m1", "--for", "1s"],
    );
    assert!(!success);
    assert!(
        stderr.contains("--experimental-enable-fault-injection"),
        "{stderr}"
    );
    let (success, _, stderr) = keel_chaos(
        &cluster,
        &["inject", "clock", "--target", "m9", "--for", "1s"],
    );
    assert!(!success);
    assert!(
        stderr.contains("no member, node or allocation is named \"m9\""),
        "{stderr}"
    );
    let (success, _, stderr) = keel_chaos(
        &cluster,
        &["inject", "partition", "--target", "m1", "--for", "1s"],
    );
    assert!(!success);
    assert!(stderr.contains("other side"), "{stderr}");
}
