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
