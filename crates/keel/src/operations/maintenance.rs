//! `keel defrag`, `keel alarm list|disarm` and `keel move-leader`: the rest
//! of etcd's Maintenance service, with etcdctl's behaviour and messages.

use keel_client::Client;
use keel_server::api::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_types::etcdserverpb::alarm_request::AlarmAction;
use keel_types::etcdserverpb::{
    AlarmMember, AlarmRequest, AlarmType, DefragmentRequest, MoveLeaderRequest,
};
use serde::Serialize;

use super::{answer, connect_url, member_id_hex, parse_member_id, request, ClientOptions, Output};

/// Options of `keel defrag`.
#[derive(Debug, clap::Args)]
pub struct DefragArguments {
    #[command(flatten)]
    client: ClientOptions,
    /// Defragment every member in the membership list, not only --endpoints.
    #[arg(long)]
    cluster: bool,
}

/// Options of `keel alarm`.
#[derive(Debug, clap::Args)]
pub struct AlarmArguments {
    #[command(flatten)]
    client: ClientOptions,
    #[command(subcommand)]
    command: AlarmCommand,
}

#[derive(Debug, clap::Subcommand)]
enum AlarmCommand {
    /// List raised alarms.
    List,
    /// Disarm every raised alarm.
    Disarm,
}

/// Options of `keel move-leader`.
#[derive(Debug, clap::Args)]
pub struct MoveLeaderArguments {
    #[command(flatten)]
    client: ClientOptions,
    /// The member to hand leadership to: its id, in hexadecimal.
    target: String,
}

/// The outcome for one member in `keel defrag -o json`.
#[derive(Debug, Serialize)]
struct DefragOutcome {
    endpoint: String,
    error: Option<String>,
}

/// Client URLs of every member, for `--cluster`.
async fn cluster_endpoints(client: &Client) -> anyhow::Result<Vec<String>> {
    let members = answer(client.member_list(false).await)?.members;
    Ok(members
        .into_iter()
        .filter_map(|member| member.client_ur_ls.into_iter().next())
        .collect())
}

/// Runs `keel defrag`: one member at a time, as etcdctl does, so that at most
/// one member is busy with it at any moment.
pub async fn defrag(arguments: DefragArguments) -> anyhow::Result<()> {
    let endpoints = if arguments.cluster {
        cluster_endpoints(&arguments.client.client().await?).await?
    } else {
        arguments.client.endpoint_list()
    };
    let mut outcomes = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        let result = async {
            let channel = crate::kv::connect(&endpoint).await?;
            request(MaintenanceClient::new(channel).defragment(DefragmentRequest {})).await
        }
        .await;
        // Each line is printed as its member finishes: on a large cluster
        // these lines are the progress.
        let error = result.err().map(|error| format!("{error:#}"));
        if arguments.client.output == Output::Table {
            match &error {
                None => println!("Finished defragmenting member[{endpoint}]"),
                Some(error) => eprintln!("Failed to defragment member[{endpoint}] ({error})"),
            }
        }
        outcomes.push(DefragOutcome { endpoint, error });
    }
    if arguments.client.output == Output::Json {
        println!("{}", serde_json::json!({ "members": outcomes }));
    }
    let failed = outcomes
        .iter()
        .filter(|outcome| outcome.error.is_some())
        .count();
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} members were not defragmented",
            outcomes.len()
        );
    }
    Ok(())
}

/// An alarm as every keel command prints it: etcdctl's words, with the member
/// id in hexadecimal like everywhere else in keel.
fn alarm_text(alarm: &AlarmMember) -> String {
    format!(
        "memberID:{} alarm:{}",
        member_id_hex(alarm.member_id),
        alarm_name(alarm.alarm)
    )
}

fn alarm_name(alarm: i32) -> &'static str {
    AlarmType::try_from(alarm).map_or("UNKNOWN", |alarm_type| alarm_type.as_str_name())
}

fn print_alarms(output: Output, alarms: &[AlarmMember]) {
    match output {
        Output::Table if alarms.is_empty() => println!("(no alarms)"),
        Output::Table => {
            for alarm in alarms {
                println!("{}", alarm_text(alarm));
            }
        }
        Output::Json => {
            let alarms: Vec<serde_json::Value> = alarms
                .iter()
                .map(|alarm| {
                    serde_json::json!({
                        "member_id": alarm.member_id,
                        "member_id_hex": member_id_hex(alarm.member_id),
                        "alarm": alarm_name(alarm.alarm),
                    })
                })
                .collect();
            println!("{}", serde_json::json!({ "alarms": alarms }));
        }
    }
}

/// Runs `keel alarm list|disarm`.
pub async fn alarm(arguments: AlarmArguments) -> anyhow::Result<()> {
    let client = arguments.client.client().await?;
    let raised = answer(
        client
            .alarm(AlarmRequest {
                action: AlarmAction::Get as i32,
                member_id: 0,
                alarm: AlarmType::None as i32,
            })
            .await,
    )?
    .alarms;
    match arguments.command {
        AlarmCommand::List => print_alarms(arguments.client.output, &raised),
        AlarmCommand::Disarm => {
            // Each alarm is disarmed by name, as etcd's client does, so an
            // alarm raised after the list was read stays raised (and visible).
            let mut disarmed = Vec::with_capacity(raised.len());
            for alarm in raised {
                answer(
                    client
                        .alarm(AlarmRequest {
                            action: AlarmAction::Deactivate as i32,
                            member_id: alarm.member_id,
                            alarm: alarm.alarm,
                        })
                        .await,
                )?;
                disarmed.push(alarm);
            }
            print_alarms(arguments.client.output, &disarmed);
        }
    }
    Ok(())
}

/// Runs `keel move-leader`: finds the leader and asks it to hand over, as
/// only the leader can (etcdctl does the same).
pub async fn move_leader(arguments: MoveLeaderArguments) -> anyhow::Result<()> {
    let target = parse_member_id(&arguments.target)?;
    let client = arguments.client.client().await?;
    let members = answer(client.member_list(false).await)?.members;
    if !members.iter().any(|member| member.id == target) {
        anyhow::bail!("no member has ID {}", member_id_hex(target));
    }
    let leader = answer(client.status().await)?.leader;
    if leader == 0 {
        anyhow::bail!("the cluster has no leader now; try again after an election");
    }
    let leader_urls = members
        .iter()
        .find(|member| member.id == leader)
        .map(|member| member.client_ur_ls.clone())
        .unwrap_or_default();
    let mut leader_channel = None;
    let mut errors = Vec::new();
    for url in &leader_urls {
        match connect_url(url).await {
            Ok(channel) => {
                leader_channel = Some(channel);
                break;
            }
            Err(error) => errors.push(format!("{url}: {error:#}")),
        }
    }
    let leader_channel = leader_channel.ok_or_else(|| {
        anyhow::anyhow!(
            "cannot reach the leader {} at its client URLs {leader_urls:?}: {}",
            member_id_hex(leader),
            errors.join("; ")
        )
    })?;
    request(
        MaintenanceClient::new(leader_channel).move_leader(MoveLeaderRequest { target_id: target }),
    )
    .await?;
    match arguments.client.output {
        Output::Table => println!(
            "Leadership transferred from {} to {}",
            member_id_hex(leader),
            member_id_hex(target)
        ),
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "from": leader,
                "from_hex": member_id_hex(leader),
                "to": target,
                "to_hex": member_id_hex(target),
            })
        ),
    }
    Ok(())
}
