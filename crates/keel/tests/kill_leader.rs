//! Fault tests on real processes: the leader is killed with SIGKILL while
//! clients write; no acknowledged write may be lost, and every member must end
//! with the same data. Also: a whole-cluster restart keeps data and revision.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{block_on, connect, Cluster};
use keel_server::api::etcdserverpb::kv_client::KvClient;
use keel_types::etcdserverpb::{PutRequest, RangeRequest, RangeResponse};

const WRITERS: usize = 4;
const WRITES_PER_WRITER: usize = 150;

/// A client that fails over between endpoints and retries a put until it is
/// acknowledged (a retried put of the same key and value is idempotent in effect).
async fn put_until_acknowledged(
    endpoints: &[String],
    start: &mut usize,
    key: &str,
    value: &str,
) -> Result<i64, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last_error = String::new();
    while Instant::now() < deadline {
        let url = &endpoints[*start % endpoints.len()];
        match connect(url).await {
            Ok(channel) => {
                let mut client = KvClient::new(channel);
                let request = PutRequest {
                    key: key.as_bytes().to_vec(),
                    value: value.as_bytes().to_vec(),
                    ..Default::default()
                };
                match tokio::time::timeout(Duration::from_secs(5), client.put(request)).await {
                    Ok(Ok(response)) => {
                        return Ok(response
                            .into_inner()
                            .header
                            .map_or(0, |header| header.revision))
                    }
                    Ok(Err(status)) => last_error = format!("{url}: {status}"),
                    Err(_) => last_error = format!("{url}: timed out"),
                }
            }
            Err(error) => last_error = format!("{url}: {error}"),
        }
        *start += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!(
        "{key} never acknowledged; last error: {last_error}"
    ))
}

fn all_keys(cluster: &Cluster, index: usize) -> RangeResponse {
    cluster
        .local_range(
            index,
            RangeRequest {
                key: vec![0],
                range_end: vec![0],
                ..Default::default()
            },
        )
        .unwrap_or_else(|| panic!("member {} answers a serializable read", index))
}

#[test]
fn leader_killed_mid_stream_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start(3, 23100);
    let endpoints: Vec<String> = cluster.members.iter().map(|member| member.url()).collect();
    let acknowledged: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let total_acknowledged = Arc::new(AtomicUsize::new(0));
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let first_write_after_kill: Arc<Mutex<Option<Duration>>> = Arc::default();
    let failed = Arc::new(AtomicBool::new(false));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let endpoints = endpoints.clone();
        let acknowledged = acknowledged.clone();
        let total_acknowledged = total_acknowledged.clone();
        let killed_at = killed_at.clone();
        let first_write_after_kill = first_write_after_kill.clone();
        let failed = failed.clone();
        writers.push(runtime.spawn(async move {
            let mut start = writer;
            for sequence in 0..WRITES_PER_WRITER {
                let key = format!("fault/{writer}/{sequence:04}");
                let value = format!("value-{writer}-{sequence}");
                let issued = Instant::now();
                match put_until_acknowledged(&endpoints, &mut start, &key, &value).await {
                    Ok(_) => {
                        acknowledged.lock().unwrap().insert(key, value);
                        total_acknowledged.fetch_add(1, Ordering::SeqCst);
                        let kill = *killed_at.lock().unwrap();
                        if let Some(kill) = kill {
                            if issued >= kill {
                                let mut first = first_write_after_kill.lock().unwrap();
                                if first.is_none() {
                                    *first = Some(kill.elapsed());
                                }
                            }
                        }
                    }
                    Err(error) => {
                        eprintln!("{error}");
                        failed.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            }
        }));
    }

    // Kill the leader once a good part of the stream is acknowledged.
    let deadline = Instant::now() + Duration::from_secs(60);
    while total_acknowledged.load(Ordering::SeqCst) < WRITERS * WRITES_PER_WRITER / 3 {
        assert!(Instant::now() < deadline, "writes did not progress");
        assert!(
            !failed.load(Ordering::SeqCst),
            "a writer failed before the kill"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let leader = cluster.wait_for_leader();
    *killed_at.lock().unwrap() = Some(Instant::now());
    cluster.kill(leader);
    let kill_instant = Instant::now();

    // A new leader among the survivors.
    let new_leader = cluster.wait_for_leader();
    assert_ne!(new_leader, leader);
    let election_time = kill_instant.elapsed();

    for writer in writers {
        runtime.block_on(writer).expect("writer task");
    }
    assert!(
        !failed.load(Ordering::SeqCst),
        "a write was never acknowledged"
    );

    // The killed member restarts and catches up.
    cluster.start_member(leader);
    cluster.wait_for_leader();
    let target = cluster
        .status(new_leader)
        .expect("leader answers")
        .raft_index;
    cluster.wait_for_applied(target);

    let acknowledged = acknowledged.lock().unwrap().clone();
    assert_eq!(acknowledged.len(), WRITERS * WRITES_PER_WRITER);
    let mut reference: Option<RangeResponse> = None;
    for index in 0..3 {
        let response = all_keys(&cluster, index);
        let stored: BTreeMap<String, String> = response
            .kvs
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    String::from_utf8_lossy(&kv.value).into_owned(),
                )
            })
            .collect();
        for (key, value) in &acknowledged {
            assert_eq!(
                stored.get(key),
                Some(value),
                "member {index} lost acknowledged write {key}"
            );
        }
        match &reference {
            None => reference = Some(response),
            Some(reference) => {
                assert_eq!(
                    reference.header.as_ref().unwrap().revision,
                    response.header.as_ref().unwrap().revision,
                    "members disagree on the revision"
                );
                assert_eq!(reference.kvs, response.kvs, "members hold different data");
            }
        }
    }
    let revision = reference
        .as_ref()
        .and_then(|response| response.header.as_ref())
        .map(|header| header.revision)
        .expect("a revision");
    let hash = cluster.hash_kv(0, revision);
    for index in 1..3 {
        assert_eq!(
            cluster.hash_kv(index, revision),
            hash,
            "member {index}'s key-value hash differs"
        );
    }
    eprintln!(
        "kill -9 of the leader: new leader after {:?}, first write issued after the kill acknowledged after {:?}",
        election_time,
        first_write_after_kill.lock().unwrap()
    );
}

#[test]
fn whole_cluster_restart_keeps_data_and_revision() {
    let mut cluster = Cluster::start(3, 23200);
    let endpoints: Vec<String> = cluster.members.iter().map(|member| member.url()).collect();
    let revision = block_on(async {
        let mut start = 0;
        let mut revision = 0;
        for sequence in 0..50 {
            revision = put_until_acknowledged(
                &endpoints,
                &mut start,
                &format!("restart/{sequence:03}"),
                &format!("v{sequence}"),
            )
            .await
            .expect("put acknowledged");
        }
        revision
    });
    let before = all_keys(&cluster, 0);
    for index in 0..3 {
        cluster.stop(index);
    }
    for index in 0..3 {
        cluster.start_member(index);
    }
    cluster.wait_for_leader();
    for index in 0..3 {
        let deadline = Instant::now() + common::CONVERGE_TIMEOUT;
        loop {
            let after = all_keys(&cluster, index);
            if after.header.as_ref().unwrap().revision >= revision {
                assert_eq!(after.header.as_ref().unwrap().revision, revision);
                assert_eq!(after.kvs, before.kvs, "member {index} data changed");
                break;
            }
            assert!(Instant::now() < deadline, "member {index} did not recover");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
