//! Durability on real processes: snapshots and log compaction, a follower
//! catching up from a snapshot after the log it needs was compacted, recovery
//! from snapshot plus log, what a member does with a damaged log, and that a
//! member's serializable reads see every write it acknowledged.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{block_on, connect, Cluster};
use keel_server::api::etcdserverpb::kv_client::KvClient;
use keel_types::etcdserverpb::{PutRequest, RangeRequest};

fn put_all(url: &str, prefix: &str, count: usize) {
    block_on(async {
        let mut client = KvClient::new(connect(url).await.expect("connect"));
        for sequence in 0..count {
            client
                .put(PutRequest {
                    key: format!("{prefix}/{sequence:05}").into_bytes(),
                    value: format!("value-{sequence}").into_bytes(),
                    ..Default::default()
                })
                .await
                .expect("put acknowledged");
        }
    });
}

fn files_with_extension(directory: &Path, extension: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(directory)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| path.extension().is_some_and(|e| e == extension))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn follower_behind_compacted_log_catches_up_from_a_snapshot() {
    let mut cluster = Cluster::start_with(
        3,
        23400,
        &[
            "--snapshot-count",
            "25",
            "--experimental-snapshot-catchup-entries",
            "5",
        ],
    );
    let leader = cluster.wait_for_leader();
    let follower = (leader + 1) % 3;
    cluster.kill(follower);
    cluster.wait_for_leader();
    let leader = cluster.wait_for_leader();
    put_all(&cluster.members[leader].url(), "snap", 200);

    // The leader has snapshotted past index 0 and dropped the log behind it.
    let snapshot_directory = cluster.members[leader].data_dir.join("member/snap");
    let snapshots = files_with_extension(&snapshot_directory, "snap");
    assert!(
        snapshots.iter().any(|path| !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .ends_with("0000000000000001.snap")),
        "no snapshot beyond the bootstrap one: {snapshots:?}"
    );

    cluster.start_member(follower);
    cluster.wait_for_leader();
    let target = cluster.status(leader).expect("leader answers").raft_index;
    cluster.wait_for_applied(target);
    let revision = cluster
        .status(leader)
        .and_then(|status| status.header)
        .map(|header| header.revision)
        .expect("revision");
    let reference = cluster.hash_kv(leader, revision);
    for index in 0..3 {
        assert_eq!(
            cluster.hash_kv(index, revision),
            reference,
            "member {index} differs from the leader"
        );
        let keys = cluster
            .local_range(
                index,
                RangeRequest {
                    key: b"snap/".to_vec(),
                    range_end: b"snap0".to_vec(),
                    count_only: true,
                    ..Default::default()
                },
            )
            .expect("range");
        assert_eq!(keys.count, 200, "member {index}");
    }

    // The follower could only have caught up through a snapshot: the leader
    // had compacted the entries it missed.
    let follower_snapshots = files_with_extension(
        &cluster.members[follower].data_dir.join("member/snap"),
        "snap",
    );
    assert!(
        follower_snapshots.iter().any(|path| !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .ends_with("0000000000000001.snap")),
        "the follower holds no snapshot beyond the bootstrap one: {follower_snapshots:?}"
    );

    // Everyone restarts from snapshot plus log, with the same data.
    for index in 0..3 {
        cluster.stop(index);
    }
    for index in 0..3 {
        cluster.start_member(index);
    }
    cluster.wait_for_leader();
    cluster.wait_for_applied(target);
    for index in 0..3 {
        assert_eq!(cluster.hash_kv(index, revision), reference);
    }
}

/// Starts a member on a data directory and expects it to refuse to start.
fn expect_start_failure(cluster: &Cluster, index: usize) -> String {
    let member = &cluster.members[index];
    let client_url = member.url();
    let peer_url = format!("http://127.0.0.1:{}", member.peer_port);
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("server")
        .args(["--name", &member.name])
        .arg("--data-dir")
        .arg(&member.data_dir)
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("{}={peer_url}", member.name)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("keel server starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(
                !status.success(),
                "a member with a damaged log must not start"
            );
            let mut stderr = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            return stderr;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("member with a damaged log kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn corrupt_record_stops_the_member_and_torn_tail_is_truncated() {
    let mut cluster = Cluster::start(1, 23500);
    put_all(&cluster.members[0].url(), "wal", 30);
    cluster.stop(0);
    let wal_directory = cluster.members[0].data_dir.join("member/wal");
    let segments = files_with_extension(&wal_directory, "wal");
    let segment = segments.last().expect("a log segment").clone();
    let original = std::fs::read(&segment).unwrap();

    // A flipped byte in the middle of the log: refuse to start, naming file and offset.
    let mut damaged = original.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x5a;
    std::fs::write(&segment, &damaged).unwrap();
    let stderr = expect_start_failure(&cluster, 0);
    let file_name = segment.file_name().unwrap().to_string_lossy().into_owned();
    assert!(stderr.contains("corrupt"), "{stderr}");
    assert!(stderr.contains(&file_name), "{stderr}");
    assert!(stderr.contains("offset"), "{stderr}");

    // A torn last record (a write cut short by a crash): truncated with a
    // warning, and the member starts with everything before it.
    let mut torn = original.clone();
    torn.truncate(original.len() - 3);
    std::fs::write(&segment, &torn).unwrap();
    cluster.start_member(0);
    cluster.wait_for_leader();
    assert!(
        cluster.log(0).contains("torn"),
        "no warning about the torn tail:\n{}",
        cluster.log(0)
    );
    let keys = cluster
        .local_range(
            0,
            RangeRequest {
                key: b"wal/".to_vec(),
                range_end: b"wal0".to_vec(),
                count_only: true,
                ..Default::default()
            },
        )
        .expect("range");
    assert!(
        keys.count >= 29,
        "lost more than the torn record: {}",
        keys.count
    );
}

/// Serializable single-key reads are answered from a read view the member loop
/// publishes, without a hop to the member thread (`keel_server::read_view`).
/// A write acknowledged by a member must be in that member's next
/// serializable read, on every member (followers answer the writes they
/// propose once they applied them), with reads of a quiet member in between
/// so that views are published, dropped and republished.
#[test]
fn a_members_serializable_read_sees_the_write_it_acknowledged() {
    let cluster = Cluster::start(3, 24700);
    for member in 0..3 {
        let url = cluster.members[member].url();
        block_on(async move {
            let mut client = KvClient::new(connect(&url).await.expect("connect"));
            let read = |key: &str| RangeRequest {
                key: key.as_bytes().to_vec(),
                serializable: true,
                ..Default::default()
            };
            for sequence in 0..200 {
                let value = format!("{member}-{sequence}").into_bytes();
                let put = client
                    .put(PutRequest {
                        key: b"read-your-writes".to_vec(),
                        value: value.clone(),
                        ..Default::default()
                    })
                    .await
                    .expect("put acknowledged")
                    .into_inner();
                let revision = put.header.expect("header").revision;
                // Twice: the first read may publish the view the second uses.
                for _ in 0..2 {
                    let response = client
                        .range(read("read-your-writes"))
                        .await
                        .expect("serializable read")
                        .into_inner();
                    assert_eq!(
                        response.kvs.first().map(|kv| kv.value.clone()),
                        Some(value.clone()),
                        "member {member} lost its own acknowledged write {sequence}"
                    );
                    assert!(response.header.expect("header").revision >= revision);
                }
            }
            let missing = client
                .range(read("never-written"))
                .await
                .expect("serializable read of a missing key")
                .into_inner();
            assert!(missing.kvs.is_empty());
            assert!(missing.header.expect("header").revision > 0);
        });
    }
}
