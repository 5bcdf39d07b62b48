//! Debian's `etcdctl` against a three-member keel cluster, with every output
//! compared to what a real etcd (Debian's etcd-server) prints for the same
//! commands in the same order. Both stores start empty, so revisions match too;
//! only identities (cluster id, member id, raft term) are normalised away.

mod common;

use common::{normalise_etcdctl_output as normalise, run_etcdctl as run, Cluster, ReferenceEtcd};

#[test]
fn etcdctl_sees_what_it_sees_on_etcd() {
    let keel = Cluster::start(3, 23300);
    let etcd = ReferenceEtcd::start(23390);
    let keel_endpoints = keel.endpoints();

    let txn_script = "value(\"zoo\") = \"val\"\n\nput zoo new\n\nput zoo old\n\n";
    let failing_txn_script = "value(\"zoo\") = \"nope\"\n\nput zoo never\n\nget zoo\n\n";
    // Limits: etcd's defaults are 1.5 MiB per request and 128 operations per txn.
    let big_value = "x".repeat(1_600_000);
    let many_puts: String = (0..129).map(|i| format!("put many{i} v\n")).collect();
    let too_many_ops_script = format!("\n{many_puts}\n\n");
    let steps: Vec<(Vec<&str>, Option<&str>)> = vec![
        (vec!["put", "foo", "bar"], None),
        (vec!["put", "foo1", "bar1"], None),
        (vec!["put", "foo2", "bar2"], None),
        (vec!["put", "zoo", "val"], None),
        (vec!["put", "foo", "bar-again", "--prev-kv"], None),
        (vec!["get", "foo"], None),
        (vec!["get", "--prefix", "foo"], None),
        (vec!["get", "foo", "foo2"], None),
        (vec!["get", "--prefix", "foo", "--limit", "2"], None),
        (vec!["get", "foo", "--rev", "2"], None),
        (vec!["get", "--prefix", "foo", "-w", "json"], None),
        (vec!["get", "--from-key", "foo1"], None),
        (vec!["get", "--prefix", "", "--keys-only"], None),
        (
            vec!["get", "--prefix", "foo", "--count-only", "-w", "json"],
            None,
        ),
        (
            vec![
                "get",
                "--prefix",
                "foo",
                "--sort-by",
                "MODIFY",
                "--order",
                "DESCEND",
            ],
            None,
        ),
        (vec!["get", "foo", "--rev", "100"], None),
        (vec!["get", "missing"], None),
        (vec!["txn"], Some(txn_script)),
        (vec!["txn", "-w", "json"], Some(failing_txn_script)),
        (vec!["get", "zoo", "-w", "json"], None),
        (vec!["del", "foo1"], None),
        (vec!["del", "--prev-kv", "--prefix", "foo"], None),
        (vec!["del", "nothing-here"], None),
        (vec!["compaction", "3"], None),
        (vec!["get", "zoo", "--rev", "2"], None),
        (vec!["compaction", "2"], None),
        (vec!["get", "zoo", "--rev", "3"], None),
        (vec!["get", "--prefix", "", "-w", "json"], None),
        (vec!["put", "big"], Some(big_value.as_str())),
        (vec!["txn"], Some(too_many_ops_script.as_str())),
        (vec!["put", "", "empty-key"], None),
        (
            vec!["get", "--prefix", "", "--rev", "0", "-w", "json"],
            None,
        ),
    ];
    for (arguments, input) in &steps {
        let (keel_code, keel_out, keel_err) = run(&keel_endpoints, arguments, *input);
        let (etcd_code, etcd_out, etcd_err) = run(&etcd.endpoint, arguments, *input);
        assert_eq!(
            (keel_code, normalise(&keel_out)),
            (etcd_code, normalise(&etcd_out)),
            "etcdctl {arguments:?}: keel printed {keel_out:?} / {keel_err:?}, etcd printed {etcd_out:?} / {etcd_err:?}"
        );
        assert_eq!(
            normalise(&keel_err),
            normalise(&etcd_err),
            "etcdctl {arguments:?}: error output differs"
        );
    }

    // Status and membership print identities that differ by design; compare
    // their shape and the facts keel must report.
    let (code, status, error) = run(&keel_endpoints, &["endpoint", "status", "-w", "json"], None);
    assert_eq!(code, 0, "{error}");
    assert_eq!(status.matches("\"leader\":").count(), 3, "{status}");
    assert!(status.contains("\"version\":\"3.5.0\""), "{status}");
    let (code, table, _) = run(&keel_endpoints, &["endpoint", "status"], None);
    assert_eq!(code, 0);
    assert_eq!(table.lines().count(), 3, "{table}");
    assert_eq!(
        table
            .lines()
            .filter(|line| line.contains(", true, "))
            .count(),
        1,
        "exactly one member reports being the leader: {table}"
    );
    // Endpoints written with their scheme, and --cluster (which uses the
    // members' client URLs): etcd 3.4 then sends `:authority: http://...` on
    // these calls, which a strict HTTP/2 server refuses.
    let keel_urls = keel
        .members
        .iter()
        .map(|member| member.url())
        .collect::<Vec<_>>()
        .join(",");
    for arguments in [
        &["endpoint", "status"][..],
        &["endpoint", "hashkv"],
        &["endpoint", "status", "--cluster"],
        &["endpoint", "health", "--cluster"],
    ] {
        let (code, output, error) = run(&keel_urls, arguments, None);
        assert_eq!(code, 0, "etcdctl {arguments:?} with URLs: {error}");
        // `endpoint health` reports on stderr.
        let reported = format!("{output}{error}");
        assert_eq!(
            reported
                .lines()
                .filter(|line| line.contains("127.0.0.1"))
                .count(),
            3,
            "{arguments:?}: {reported}"
        );
        let etcd_url = format!("http://{}", etcd.endpoint);
        let (code, _, error) = run(&etcd_url, arguments, None);
        assert_eq!(code, 0, "etcd: etcdctl {arguments:?}: {error}");
    }
    let (code, members, _) = run(&keel_endpoints, &["member", "list"], None);
    assert_eq!(code, 0);
    assert_eq!(members.lines().count(), 3, "{members}");
    for member in &keel.members {
        assert!(
            members.contains(&format!("http://127.0.0.1:{}", member.peer_port)),
            "{members}"
        );
        assert!(members.contains(&member.name), "{members}");
    }
    let (code, etcd_members, _) = run(&etcd.endpoint, &["member", "list"], None);
    assert_eq!(code, 0);
    let fields = |line: &str| line.split(", ").count();
    assert_eq!(
        fields(members.lines().next().unwrap()),
        fields(etcd_members.lines().next().unwrap()),
        "member list columns differ: {members} vs {etcd_members}"
    );
}
