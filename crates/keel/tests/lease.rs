//! Leases on real processes: etcdctl's lease commands compared with etcd's
//! output, expiry that removes every attached key at one revision on every
//! member, and a leader kill that neither expires a lease early nor resets it
//! to its full TTL.

mod common;

use std::time::{Duration, Instant};

use common::{block_on, connect, run_etcdctl, Cluster, ReferenceEtcd};
use keel_server::api::etcdserverpb::kv_client::KvClient;
use keel_server::api::etcdserverpb::lease_client::LeaseClient;
use keel_types::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseTimeToLiveRequest, PutRequest, RangeRequest,
};

fn grant(url: &str, ttl: i64) -> i64 {
    block_on(async {
        let mut client = LeaseClient::new(connect(url).await.expect("connect"));
        client
            .lease_grant(LeaseGrantRequest { ttl, id: 0 })
            .await
            .expect("grant")
            .into_inner()
            .id
    })
}

fn put_with_lease(url: &str, key: &str, lease: i64) {
    block_on(async {
        let mut client = KvClient::new(connect(url).await.expect("connect"));
        client
            .put(PutRequest {
                key: key.as_bytes().to_vec(),
                value: b"leased".to_vec(),
                lease,
                ..Default::default()
            })
            .await
            .expect("put");
    });
}

fn keep_alive(url: &str, id: i64) -> i64 {
    block_on(async {
        let mut client = LeaseClient::new(connect(url).await.expect("connect"));
        let mut responses = client
            .lease_keep_alive(tokio_stream::once(LeaseKeepAliveRequest { id }))
            .await
            .expect("keep-alive stream")
            .into_inner();
        responses
            .message()
            .await
            .expect("keep-alive response")
            .expect("one response")
            .ttl
    })
}

fn time_to_live(url: &str, id: i64) -> Option<i64> {
    block_on(async {
        let mut client = LeaseClient::new(connect(url).await.ok()?);
        client
            .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: false })
            .await
            .ok()
            .map(|response| response.into_inner().ttl)
    })
}

fn count_keys(cluster: &Cluster, index: usize, prefix: &str, revision: i64) -> Option<i64> {
    cluster
        .local_range(
            index,
            RangeRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: common_prefix_end(prefix),
                revision,
                count_only: true,
                ..Default::default()
            },
        )
        .map(|response| response.count)
}

fn common_prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("non-empty prefix") += 1;
    end
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

/// Also hides the remaining seconds, which depend on timing.
fn normalise(text: &str) -> String {
    let text = normalise_ids(text);
    match text.find("remaining(") {
        Some(start) => {
            let end = text[start..]
                .find(')')
                .map_or(text.len(), |end| start + end);
            format!("{}remaining(N{}", &text[..start], &text[end..])
        }
        None => text,
    }
}

#[test]
fn etcdctl_lease_commands_print_what_etcd_prints() {
    let cluster = Cluster::start(3, 24100);
    let etcd = ReferenceEtcd::start(24190);
    let keel_endpoints = cluster.endpoints();
    let mut lease_ids = Vec::new();
    for endpoints in [keel_endpoints.as_str(), etcd.endpoint.as_str()] {
        let (code, granted, error) = run_etcdctl(endpoints, &["lease", "grant", "60"], None);
        assert_eq!(code, 0, "{error}");
        lease_ids.push(
            granted
                .split_whitespace()
                .nth(1)
                .expect("lease id")
                .to_string(),
        );
    }
    let steps: &[&[&str]] = &[
        &["put", "--lease", "{id}", "held", "v"],
        &["lease", "timetolive", "{id}", "--keys"],
        &["lease", "keep-alive", "--once", "{id}"],
        &["lease", "list"],
        &["lease", "revoke", "{id}"],
        &["get", "held"],
        &["lease", "timetolive", "{id}"],
        &["lease", "revoke", "{id}"],
        &["lease", "grant", "1"],
        &["put", "--lease", "123456789", "orphan", "v"],
    ];
    for step in steps {
        let mut outputs = Vec::new();
        for (endpoints, id) in [
            (&keel_endpoints, &lease_ids[0]),
            (&etcd.endpoint, &lease_ids[1]),
        ] {
            let arguments: Vec<&str> = step
                .iter()
                .map(|argument| {
                    if *argument == "{id}" {
                        id.as_str()
                    } else {
                        argument
                    }
                })
                .collect();
            let (code, out, error) = run_etcdctl(endpoints, &arguments, None);
            let error_line = error
                .lines()
                .filter(|line| line.starts_with("Error:"))
                .collect::<Vec<_>>()
                .join("\n");
            outputs.push((code, normalise(&out), normalise(&error_line)));
        }
        assert_eq!(outputs[0], outputs[1], "etcdctl {step:?}: keel vs etcd");
    }
}

#[test]
fn expired_lease_removes_its_keys_at_one_revision_on_every_member() {
    let cluster = Cluster::start(3, 24110);
    let leader = cluster.wait_for_leader();
    let url = cluster.members[leader].url();
    let lease = grant(&url, 2);
    for key in ["expire/a", "expire/b", "expire/c"] {
        put_with_lease(&url, key, lease);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while count_keys(&cluster, leader, "expire/", 0) != Some(0) {
        assert!(Instant::now() < deadline, "lease did not expire");
        std::thread::sleep(Duration::from_millis(50));
    }
    let revision = cluster
        .local_range(
            leader,
            RangeRequest {
                key: b"expire/a".to_vec(),
                ..Default::default()
            },
        )
        .and_then(|response| response.header)
        .expect("header")
        .revision;
    cluster.wait_for_applied(cluster.status(leader).expect("status").raft_index);
    for index in 0..3 {
        assert_eq!(count_keys(&cluster, index, "expire/", revision), Some(0));
        assert_eq!(
            count_keys(&cluster, index, "expire/", revision - 1),
            Some(3),
            "member {index}: the three keys must go at one revision"
        );
    }
}

#[test]
fn leader_kill_neither_expires_a_lease_early_nor_resets_it() {
    let mut cluster = Cluster::start_with(
        3,
        24120,
        &["--experimental-lease-checkpoint-interval", "1s"],
    );
    let leader = cluster.wait_for_leader();
    let survivor = (leader + 1) % 3;
    let lease = grant(&cluster.members[leader].url(), 12);
    put_with_lease(&cluster.members[leader].url(), "held/key", lease);
    let last_keep_alive = Instant::now();
    assert_eq!(keep_alive(&cluster.members[survivor].url(), lease), 12);
    // Let the leader checkpoint the remaining TTL (every second here), then kill it.
    std::thread::sleep(Duration::from_millis(6_500));
    cluster.kill(leader);
    cluster.wait_for_leader();
    let survivor_url = cluster.members[survivor].url();
    let deadline = last_keep_alive + Duration::from_secs(30);
    let expired_at = loop {
        let present = count_keys(&cluster, survivor, "held/", 0) == Some(1);
        let ttl = time_to_live(&survivor_url, lease);
        if !present || ttl == Some(-1) {
            break last_keep_alive.elapsed();
        }
        assert!(Instant::now() < deadline, "the lease never expired");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        expired_at >= Duration::from_secs(12),
        "lease expired early, {expired_at:?} after its last keep-alive"
    );
    // The new leader continues from the last checkpoint (about 5.5 s left at
    // 6.5 s) plus one election timeout: about 15 s. A reset to the full TTL
    // would expire it at about 6.5 + 1.5 (election) + 12 + 1 ≈ 21 s.
    assert!(
        expired_at <= Duration::from_secs(18),
        "lease lived {expired_at:?}: the new leader reset it instead of using the checkpoint"
    );
}
