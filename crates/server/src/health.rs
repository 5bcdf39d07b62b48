//! Health checks in etcd's shapes: `/health` (JSON, `{"health":"true","reason":""}`),
//! `/livez` and `/readyz` (text, one `[+]check ok` or `[-]check failed: why`
//! line per check, 503 when any fails), with etcd's query parameters
//! (`/health?serializable=true&exclude=NOSPACE`, `/readyz?exclude=…&verbose`).
//!
//! Live means the member loop answers: a serializable read comes back.
//! Ready means the member can serve linearizable requests now:
//! - `leader`: it knows a leader;
//! - `data_corruption`: no CORRUPT alarm is raised;
//! - `no_space`: no NOSPACE alarm is raised (writes would fail);
//! - `serializable_read`: the member loop answers a local read;
//! - `linearizable_read`: the member has **caught up**. Caught up means its
//!   applied index has reached the leader's commit index as of a moment after
//!   the probe began, which is exactly what a linearizable read (one ReadIndex
//!   round, then waiting for the local state machine to apply that index)
//!   establishes. A member restarting behind the others, or receiving a
//!   snapshot, fails it until it has replayed what the cluster committed;
//!   a member cut off from a quorum fails it (and `leader`) because no
//!   ReadIndex round can complete.

use std::time::Duration;

use keel_core::NodeStatus;
use keel_types::etcdserverpb::{AlarmType, RangeRequest};
use keel_types::keelpb::MemberRecord;

use crate::api::etcdserverpb::kv_server::Kv;
use crate::grpc::Services;

/// How long a probe waits for the member to answer one check. Short enough
/// for a Kubernetes probe's default timeouts, long enough for a ReadIndex
/// round on a loaded member.
pub const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// etcd's `/health` answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Health {
    /// "true" or "false", a string as etcd writes it.
    pub health: String,
    /// Why not healthy; empty when healthy.
    pub reason: String,
}

impl Health {
    fn healthy() -> Health {
        Health {
            health: "true".into(),
            reason: String::new(),
        }
    }

    fn unhealthy(reason: String) -> Health {
        Health {
            health: "false".into(),
            reason,
        }
    }

    /// True when healthy.
    pub fn is_healthy(&self) -> bool {
        self.health == "true"
    }
}

/// The checks of `/livez`, in the order they are reported.
pub const LIVEZ_CHECKS: &[&str] = &["serializable_read"];
/// The checks of `/readyz`, in the order they are reported.
pub const READYZ_CHECKS: &[&str] = &[
    "leader",
    "data_corruption",
    "no_space",
    "serializable_read",
    "linearizable_read",
];

/// The outcome of a set of checks: (name, `Err(why)` if it failed).
#[derive(Debug)]
pub struct CheckReport {
    /// Each check run, in order.
    pub results: Vec<(&'static str, Result<(), String>)>,
}

impl CheckReport {
    /// True when every check passed.
    pub fn passed(&self) -> bool {
        self.results.iter().all(|(_, result)| result.is_ok())
    }

    /// etcd's text: one line per check.
    pub fn lines(&self) -> String {
        let mut text = String::new();
        for (name, result) in &self.results {
            match result {
                Ok(()) => text.push_str(&format!("[+]{name} ok\n")),
                Err(why) => text.push_str(&format!("[-]{name} failed: {why}\n")),
            }
        }
        text
    }
}

/// The member's status from its loop, or why it could not be had.
async fn member_status(services: &Services) -> Result<(NodeStatus, Vec<MemberRecord>), String> {
    match tokio::time::timeout(HEALTH_CHECK_TIMEOUT, services.status()).await {
        Ok(Ok(status)) => Ok(status),
        Ok(Err(status)) => Err(status.message().to_string()),
        Err(_) => Err(format!(
            "the member loop did not answer within {HEALTH_CHECK_TIMEOUT:?}"
        )),
    }
}

/// A one-key read through the member, as etcd's health check makes it.
async fn read(services: &Services, serializable: bool) -> Result<(), String> {
    let request = RangeRequest {
        key: b"health".to_vec(),
        keys_only: true,
        limit: 1,
        serializable,
        ..Default::default()
    };
    match tokio::time::timeout(
        HEALTH_CHECK_TIMEOUT,
        Kv::range(services, tonic::Request::new(request)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(status.message().to_string()),
        Err(_) => Err(format!("no answer within {HEALTH_CHECK_TIMEOUT:?}")),
    }
}

fn alarm_raised(status: &NodeStatus, alarm: AlarmType) -> Option<String> {
    status
        .alarms
        .iter()
        .find(|raised| raised.alarm == alarm as i32)
        .map(|raised| {
            format!(
                "alarm activated: {} (member {:x})",
                alarm.as_str_name(),
                raised.member_id
            )
        })
}

/// Runs `checks` (names from [`LIVEZ_CHECKS`] or [`READYZ_CHECKS`]) except
/// those in `excluded`.
pub async fn run_checks(
    services: &Services,
    checks: &[&'static str],
    excluded: &[String],
) -> CheckReport {
    let status = member_status(services).await;
    let mut results = Vec::new();
    for &name in checks {
        if excluded.iter().any(|excluded| excluded == name) {
            continue;
        }
        let result = match (name, &status) {
            (_, Err(why)) => Err(why.clone()),
            ("leader", Ok((status, _))) => {
                if status.leader_id == 0 {
                    Err("no leader".into())
                } else {
                    Ok(())
                }
            }
            ("data_corruption", Ok((status, _))) => {
                alarm_raised(status, AlarmType::Corrupt).map_or(Ok(()), Err)
            }
            ("no_space", Ok((status, _))) => {
                alarm_raised(status, AlarmType::Nospace).map_or(Ok(()), Err)
            }
            ("serializable_read", Ok(_)) => read(services, true).await,
            ("linearizable_read", Ok((status, _))) => {
                // Without a leader no ReadIndex round can complete: say so at
                // once instead of waiting out the timeout.
                if status.leader_id == 0 {
                    Err("no leader to confirm a read index with".into())
                } else {
                    read(services, false).await
                }
            }
            (other, Ok(_)) => Err(format!("unknown check {other:?}")),
        };
        results.push((name, result));
    }
    CheckReport { results }
}

/// etcd's `/health`: alarms (but those in `excluded_alarms`, by etcd's names
/// such as `NOSPACE`), then a leader (unless `serializable`), then a read.
pub async fn health(services: &Services, excluded_alarms: &[String], serializable: bool) -> Health {
    let status = match member_status(services).await {
        Ok((status, _)) => status,
        Err(why) => return Health::unhealthy(format!("RANGE ERROR:{why}")),
    };
    for alarm in &status.alarms {
        let name = AlarmType::try_from(alarm.alarm).map_or("UNKNOWN", |kind| kind.as_str_name());
        if excluded_alarms.iter().any(|excluded| excluded == name) {
            continue;
        }
        return Health::unhealthy(format!("ALARM {name}"));
    }
    if !serializable && status.leader_id == 0 {
        return Health::unhealthy("RAFT NO LEADER".into());
    }
    match read(services, serializable).await {
        Ok(()) => Health::healthy(),
        Err(why) => Health::unhealthy(format!("RANGE ERROR:{why}")),
    }
}
