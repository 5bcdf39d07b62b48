//! `keel status`: one row per member of the cluster, asked directly.
//!
//! etcdctl's `endpoint status` reports only the endpoints it was given; an
//! operator usually wants the whole cluster, so this command reads the
//! membership from any endpoint and then asks every member at its own client
//! URL, all at once. A member that does not answer in time is shown as
//! unreachable rather than failing the command: a status table is most needed
//! exactly when something is down.

use std::time::Duration;

use keel_server::api::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_types::etcdserverpb::{Member, StatusRequest, StatusResponse};
use serde::Serialize;

use super::{
    answer, connect_url, human_bytes, member_id_hex, print_table, request, ClientOptions, Output,
};

/// How long one member gets to accept a connection and answer, so that a
/// dead or partitioned member delays the table by at most this much.
const MEMBER_STATUS_TIMEOUT: Duration = Duration::from_secs(3);

/// Options of `keel status`.
#[derive(Debug, clap::Args)]
pub struct Arguments {
    #[command(flatten)]
    client: ClientOptions,
}

/// What one member reported, or why it could not.
#[derive(Debug, Serialize)]
struct MemberStatus {
    name: String,
    id: u64,
    id_hex: String,
    /// The client URL that answered (or the first one tried).
    endpoint: Option<String>,
    learner: bool,
    reachable: bool,
    leader: Option<bool>,
    term: Option<u64>,
    raft_index: Option<u64>,
    applied_index: Option<u64>,
    revision: Option<i64>,
    db_size_bytes: Option<i64>,
    /// Raised alarms, as the member lists them.
    errors: Vec<String>,
    /// Why the member did not answer.
    unreachable_reason: Option<String>,
}

/// Asks one member for its status at each of its client URLs in turn.
async fn member_status(member: Member) -> MemberStatus {
    let mut status = MemberStatus {
        name: member.name.clone(),
        id: member.id,
        id_hex: member_id_hex(member.id),
        endpoint: member.client_ur_ls.first().cloned(),
        learner: member.is_learner,
        reachable: false,
        leader: None,
        term: None,
        raft_index: None,
        applied_index: None,
        revision: None,
        db_size_bytes: None,
        errors: Vec::new(),
        unreachable_reason: None,
    };
    if member.client_ur_ls.is_empty() {
        // A member that was added but has not started yet has announced no
        // client URL (etcdctl calls it "unstarted").
        status.unreachable_reason = Some("unstarted: no client URL announced yet".to_string());
        return status;
    }
    let mut reasons = Vec::new();
    let several_urls = member.client_ur_ls.len() > 1;
    for url in &member.client_ur_ls {
        let reason = match tokio::time::timeout(MEMBER_STATUS_TIMEOUT, ask(url)).await {
            Ok(Ok(response)) => {
                let header = response.header.unwrap_or_default();
                status.endpoint = Some(url.clone());
                status.reachable = true;
                status.leader = Some(response.leader != 0 && response.leader == member.id);
                status.term = Some(response.raft_term);
                status.raft_index = Some(response.raft_index);
                status.applied_index = Some(response.raft_applied_index);
                status.revision = Some(header.revision);
                status.db_size_bytes = Some(response.db_size);
                status.learner = response.is_learner;
                status.errors = response
                    .errors
                    .iter()
                    .map(|error| error.trim().to_string())
                    .collect();
                if response.leader == 0 {
                    status.errors.push("no leader".to_string());
                }
                return status;
            }
            Ok(Err(error)) => format!("{error:#}"),
            Err(_) => format!("no answer within {} s", MEMBER_STATUS_TIMEOUT.as_secs()),
        };
        reasons.push(if several_urls {
            format!("{url}: {reason}")
        } else {
            reason
        });
    }
    status.unreachable_reason = Some(reasons.join("; "));
    status
}

async fn ask(url: &str) -> anyhow::Result<StatusResponse> {
    let mut client = MaintenanceClient::new(connect_url(url).await?);
    request(client.status(StatusRequest {})).await
}

/// Runs `keel status`.
pub async fn run(arguments: Arguments) -> anyhow::Result<()> {
    // The membership comes from any member (keel-client fails over); each
    // member's status then from that member itself.
    let client = arguments.client.client().await?;
    let members = answer(client.member_list(false).await)?.members;
    // Every member is asked at once, so the table takes as long as the
    // slowest member rather than the sum of all of them.
    let tasks: Vec<_> = members
        .into_iter()
        .map(|member| tokio::spawn(member_status(member)))
        .collect();
    let mut statuses = Vec::with_capacity(tasks.len());
    for task in tasks {
        statuses.push(task.await?);
    }
    match arguments.client.output {
        Output::Json => println!("{}", serde_json::json!({ "members": statuses })),
        Output::Table => print_statuses(&statuses),
    }
    Ok(())
}

fn print_statuses(statuses: &[MemberStatus]) {
    let unknown = || "-".to_string();
    let yes_no = |value: bool| if value { "yes" } else { "no" }.to_string();
    let rows: Vec<Vec<String>> = statuses
        .iter()
        .map(|status| {
            let errors = match &status.unreachable_reason {
                Some(reason) if status.endpoint.is_some() => format!("unreachable: {reason}"),
                Some(reason) => reason.clone(),
                None => status.errors.join("; "),
            };
            vec![
                if status.name.is_empty() {
                    unknown()
                } else {
                    status.name.clone()
                },
                status.id_hex.clone(),
                status.endpoint.clone().unwrap_or_else(unknown),
                status.leader.map_or_else(unknown, yes_no),
                status.term.map_or_else(unknown, |term| term.to_string()),
                status
                    .raft_index
                    .map_or_else(unknown, |index| index.to_string()),
                status
                    .applied_index
                    .map_or_else(unknown, |index| index.to_string()),
                status
                    .revision
                    .map_or_else(unknown, |revision| revision.to_string()),
                status
                    .db_size_bytes
                    .map_or_else(unknown, |bytes| human_bytes(bytes.max(0) as u64)),
                yes_no(status.learner),
                errors,
            ]
        })
        .collect();
    print_table(
        &[
            "NAME",
            "ID",
            "ENDPOINT",
            "LEADER",
            "TERM",
            "RAFT INDEX",
            "APPLIED INDEX",
            "REVISION",
            "DB SIZE",
            "LEARNER",
            "ERRORS",
        ],
        &rows,
    );
}
