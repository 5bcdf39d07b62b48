//! Maintenance on real processes with etcdctl: the space quota and the NOSPACE
//! alarm (raise, refuse writes, keep reads and deletes, recover after
//! compaction, defragmentation and disarm), move-leader, hash and hashkv.

mod common;

use common::{etcdctl, run_etcdctl, Cluster};

#[test]
fn nospace_alarm_refuses_writes_until_space_is_freed_and_it_is_disarmed() {
    let cluster = Cluster::start_with(3, 24400, &["--quota-backend-bytes", "65536"]);
    let endpoints = cluster.endpoints();
    let value = "x".repeat(4096);
    let mut refused_at = None;
    for sequence in 0..64 {
        let key = format!("fill/{sequence:03}");
        let (code, _, error) = run_etcdctl(&endpoints, &["put", &key, &value], None);
        if code != 0 {
            assert!(
                error.contains("Error: etcdserver: mvcc: database space exceeded"),
                "{error}"
            );
            refused_at = Some(sequence);
            break;
        }
    }
    let refused_at = refused_at.expect("the quota was never reached");
    assert!(refused_at > 5, "refused too early, after {refused_at} puts");

    // Every member lists the alarm; reads and deletes still work.
    let alarms = etcdctl(&endpoints, &["alarm", "list"]);
    assert!(alarms.contains("alarm:NOSPACE"), "{alarms}");
    assert_eq!(alarms.lines().count(), 1, "{alarms}");
    let status = etcdctl(&endpoints, &["endpoint", "status"]);
    assert_eq!(
        status.matches("alarm:NOSPACE").count(),
        3,
        "every member reports the alarm: {status}"
    );
    assert!(etcdctl(&endpoints, &["get", "fill/000"]).starts_with("fill/000\n"));
    let (code, _, error) = run_etcdctl(&endpoints, &["put", "small", "v"], None);
    assert_eq!(code, 1, "a write while NOSPACE is raised must fail");
    assert!(error.contains("database space exceeded"), "{error}");
    let deleted = etcdctl(&endpoints, &["del", "--prefix", "fill/"]);
    assert_eq!(deleted.trim(), refused_at.to_string());

    // Free the space, defragment, disarm: writes work again.
    let revision: i64 = etcdctl(&endpoints, &["get", "small", "-w", "json"])
        .split("\"revision\":")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse().ok())
        .expect("a revision in the header");
    let compacted = etcdctl(&endpoints, &["compaction", &revision.to_string()]);
    assert_eq!(compacted, format!("compacted revision {revision}\n"));
    let defragmented = etcdctl(&endpoints, &["defrag"]);
    assert_eq!(
        defragmented.lines().count(),
        3,
        "one line per endpoint: {defragmented}"
    );
    assert!(defragmented.starts_with("Finished defragmenting etcd member["));
    let disarmed = etcdctl(&endpoints, &["alarm", "disarm"]);
    assert!(disarmed.contains("alarm:NOSPACE"), "{disarmed}");
    assert_eq!(etcdctl(&endpoints, &["alarm", "list"]), "");
    assert_eq!(etcdctl(&endpoints, &["put", "small", "v"]), "OK\n");
}

#[test]
fn move_leader_hands_leadership_to_the_named_member() {
    let cluster = Cluster::start(3, 24410);
    let leader = cluster.wait_for_leader();
    let target = (leader + 1) % 3;
    let target_id = cluster
        .status(target)
        .and_then(|status| status.header)
        .expect("status")
        .member_id;
    let endpoints = cluster.endpoints();
    let moved = etcdctl(&endpoints, &["move-leader", &format!("{target_id:x}")]);
    assert!(
        moved.starts_with("Leadership transferred from ")
            && moved.trim_end().ends_with(&format!(" to {target_id:x}")),
        "{moved}"
    );
    assert_eq!(cluster.wait_for_leader(), target);
    // A member that is not in the cluster is refused.
    let (code, _, error) = run_etcdctl(&endpoints, &["move-leader", "123456"], None);
    assert_ne!(code, 0);
    assert!(error.contains("Error:"), "{error}");
}

#[test]
fn hash_and_hashkv_agree_across_members() {
    let cluster = Cluster::start(3, 24420);
    let endpoints = cluster.endpoints();
    for sequence in 0..20 {
        etcdctl(&endpoints, &["put", &format!("hash/{sequence}"), "v"]);
    }
    let leader = cluster.wait_for_leader();
    cluster.wait_for_applied(cluster.status(leader).expect("status").raft_index);
    let output = etcdctl(&endpoints, &["endpoint", "hashkv"]);
    let hashes: Vec<&str> = output
        .lines()
        .map(|line| line.rsplit(", ").next().expect("hash column"))
        .collect();
    assert_eq!(hashes.len(), 3, "{output}");
    assert!(hashes.windows(2).all(|pair| pair[0] == pair[1]), "{output}");
}

#[test]
fn corruption_check_raises_corrupt_and_the_corrupt_leader_steps_down_and_stops_serving() {
    let mut cluster = Cluster::start_with(3, 24430, &["--experimental-corrupt-check-time", "1s"]);
    // m3 silently stores a wrong value for one key, as a lying disk would.
    // Make it the leader too: the check must trust the majority, not the leader.
    cluster.stop(2);
    cluster.start_member_with(2, &["--unsafe-fault-corrupt-values-of-key", "victim"]);
    cluster.wait_for_leader();
    let m3_id = cluster
        .status(2)
        .and_then(|status| status.header)
        .expect("m3 answers")
        .member_id;
    etcdctl(
        &cluster.endpoints(),
        &["move-leader", &format!("{m3_id:x}")],
    );
    assert_eq!(cluster.wait_for_leader(), 2);
    let endpoints = cluster.endpoints_of(&[0, 1]);
    assert_eq!(
        etcdctl(&endpoints, &["put", "victim", "true value"]),
        "OK\n"
    );
    let corrupt_id = cluster
        .status(2)
        .and_then(|status| status.header)
        .expect("m3 answers before the check runs")
        .member_id;
    let expected = format!("memberID:{corrupt_id} alarm:CORRUPT");
    let deadline = std::time::Instant::now() + common::CONVERGE_TIMEOUT;
    loop {
        let alarms = etcdctl(&endpoints, &["alarm", "list"]);
        if alarms.contains(&expected) {
            assert_eq!(alarms.lines().count(), 1, "only m3 is named: {alarms}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no CORRUPT alarm for m3; alarms: {alarms:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // m3 led; a corrupt member must not go on leading: it hands over.
    let deadline = std::time::Instant::now() + common::CONVERGE_TIMEOUT;
    while cluster.wait_for_leader() == 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the corrupt member kept leading"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(etcdctl(&endpoints, &["put", "after", "handover"]), "OK\n");
    // m3 refuses clients; the healthy members keep serving.
    let deadline = std::time::Instant::now() + common::CONVERGE_TIMEOUT;
    loop {
        let (code, _, error) = run_etcdctl(
            &cluster.members[2].endpoint(),
            &["get", "victim", "--consistency=s"],
            None,
        );
        if code != 0 {
            assert!(error.contains("corrupt cluster"), "{error}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "m3 kept serving");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        etcdctl(&endpoints, &["get", "victim", "--print-value-only"]),
        "true value\n"
    );
}
