//! The corruption check: the leader periodically compares every member's
//! HashKV at its own revision. A member whose hash differs at the same
//! compacted revision holds data that Raft did not put there (a disk that lied,
//! a bug): the leader raises the CORRUPT alarm naming it, through the log, and
//! that member stops serving clients. This is etcd's periodic corruption check
//! (`--experimental-corrupt-check-time`).
//!
//! Members that have not applied the leader's revision yet answer "future
//! revision" and are simply compared on a later pass; members that compacted
//! differently are not compared (their hashes legitimately differ).

use std::time::Duration;

use keel_core::WriteRequest;
use keel_types::etcdserverpb::{
    alarm_request::AlarmAction, AlarmRequest, AlarmType, HashKvRequest,
};

use crate::api::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::grpc::Services;

/// How long a peer may take to answer one HashKV.
const HASH_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the check every `interval` while this member leads. Never returns.
pub async fn check_periodically(
    services: Services,
    own_id: u64,
    interval: Duration,
) -> Result<(), tonic::transport::Error> {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if let Err(error) = check_once(&services, own_id).await {
            tracing::debug!(%error, "corruption check pass skipped");
        }
    }
}

/// One pass: gathers every member's HashKV at the leader's revision and
/// raises CORRUPT for each member whose hash differs from the one a majority
/// of the cluster agrees on. Majority, not the leader's own hash, is the
/// reference: a corrupt leader must not accuse its healthy followers. Does
/// nothing on a member that does not lead, or when no majority agrees.
pub async fn check_once(services: &Services, own_id: u64) -> Result<(), tonic::Status> {
    let (status, members) = services.status().await?;
    if !status.is_leader {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let own = services.hash_kv_at(0).await?;
    let revision = own.header.map_or(0, |header| header.revision);
    let mut hashes: Vec<(u64, u32)> = vec![(own_id, own.hash)];
    for member in members.iter().filter(|member| member.id != own_id) {
        if let Some(hash) = member_hash(member, revision, own.compact_revision).await {
            hashes.push((member.id, hash));
        }
    }
    let majority = members.len() / 2 + 1;
    let Some(agreed) = hashes
        .iter()
        .map(|(_, hash)| *hash)
        .find(|candidate| hashes.iter().filter(|(_, hash)| hash == candidate).count() >= majority)
    else {
        if hashes.len() >= majority {
            tracing::warn!(
                revision,
                ?hashes,
                "no majority of members agrees on the key-value hash"
            );
        }
        return Ok(());
    };
    for &(member_id, hash) in hashes.iter().filter(|(_, hash)| *hash != agreed) {
        tracing::error!(
            member = format!("{member_id:x}"),
            revision,
            agreed_hash = agreed,
            member_hash = hash,
            "member's key space differs from the majority's at the same revision: raising CORRUPT"
        );
        services
            .write_raw(WriteRequest::Alarm(AlarmRequest {
                action: AlarmAction::Activate as i32,
                member_id,
                alarm: AlarmType::Corrupt as i32,
            }))
            .await?;
    }
    // As etcd's "finished peer corruption check": an operator (and bench/stalls.sh's
    // soak) can see that the check runs, and how long a pass takes.
    tracing::info!(
        revision,
        members_compared = hashes.len(),
        took_milliseconds = started.elapsed().as_millis() as u64,
        "finished the corruption check"
    );
    Ok(())
}

/// A member's HashKV at `revision`, if it answers and compacted at the same
/// revision as the leader (otherwise the hashes are not comparable).
async fn member_hash(
    member: &keel_types::keelpb::MemberRecord,
    revision: i64,
    compact_revision: i64,
) -> Option<u32> {
    let url = member.client_urls.first()?;
    let channel = tonic::transport::Channel::from_shared(url.clone())
        .ok()?
        .connect_timeout(HASH_TIMEOUT)
        .timeout(HASH_TIMEOUT)
        .connect()
        .await
        .ok()?;
    let response = MaintenanceClient::new(channel)
        .hash_kv(HashKvRequest { revision })
        .await
        .ok()?
        .into_inner();
    (response.compact_revision == compact_revision).then_some(response.hash)
}
