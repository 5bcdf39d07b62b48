//! `keel member list|add|remove|update|promote`: etcd's Cluster service from
//! the command line, as `etcdctl member` offers it.
//!
//! After `add`, the command prints the `keel server` flags the new member must
//! start with, as etcdctl prints `ETCD_*` variables: the new member learns the
//! cluster from the peers in `--initial-cluster` and must be started with
//! `--initial-cluster-state existing`.

use keel_types::etcdserverpb::{Member, ResponseHeader};
use serde::Serialize;

use super::{
    answer, member_id_hex, parse_member_id, print_table, shell_word, ClientOptions, Output,
};

/// Options of `keel member`.
#[derive(Debug, clap::Args)]
pub struct Arguments {
    #[command(flatten)]
    client: ClientOptions,
    #[command(subcommand)]
    command: MemberCommand,
}

#[derive(Debug, clap::Subcommand)]
enum MemberCommand {
    /// List every member.
    List,
    /// Add a member (as a voter, or as a learner with --learner), then print
    /// the flags to start it with.
    Add {
        /// The new member's name (its --name).
        name: String,
        /// The new member's peer URLs, comma-separated.
        #[arg(long)]
        peer_urls: String,
        /// Add it as a learner: it receives the log but does not vote until promoted.
        #[arg(long)]
        learner: bool,
    },
    /// Remove a member.
    Remove {
        /// The member's id, in hexadecimal.
        id: String,
    },
    /// Change a member's peer URLs.
    Update {
        /// The member's id, in hexadecimal.
        id: String,
        /// The new peer URLs, comma-separated.
        #[arg(long)]
        peer_urls: String,
    },
    /// Promote a learner to a voting member (refused until it has caught up).
    Promote {
        /// The learner's id, in hexadecimal.
        id: String,
    },
}

/// A member as the JSON output shows it.
#[derive(Debug, Serialize)]
struct JsonMember {
    id: u64,
    id_hex: String,
    name: String,
    /// False until the member has started and announced its name and client URLs.
    started: bool,
    peer_urls: Vec<String>,
    client_urls: Vec<String>,
    learner: bool,
}

impl From<&Member> for JsonMember {
    fn from(member: &Member) -> Self {
        JsonMember {
            id: member.id,
            id_hex: member_id_hex(member.id),
            name: member.name.clone(),
            started: !member.name.is_empty(),
            peer_urls: member.peer_ur_ls.clone(),
            client_urls: member.client_ur_ls.clone(),
            learner: member.is_learner,
        }
    }
}

fn cluster_id(header: Option<ResponseHeader>) -> u64 {
    header.map_or(0, |header| header.cluster_id)
}

/// Runs one `keel member` command.
pub async fn run(arguments: Arguments) -> anyhow::Result<()> {
    let output = arguments.client.output;
    let client = arguments.client.client().await?;
    match arguments.command {
        MemberCommand::List => {
            let response = answer(client.member_list(false).await)?;
            print_members(output, cluster_id(response.header), &response.members);
        }
        MemberCommand::Add {
            name,
            peer_urls,
            learner,
        } => {
            let peer_urls = keel_server::config::parse_url_list("peer-urls", &peer_urls)?;
            let response = answer(client.member_add(peer_urls, learner).await)?;
            let added = response
                .member
                .ok_or_else(|| anyhow::anyhow!("the server did not return the added member"))?;
            let server_arguments = start_arguments(&name, &added, &response.members);
            let cluster_id = cluster_id(response.header);
            match output {
                Output::Table => {
                    let as_learner = if added.is_learner { " as learner" } else { "" };
                    println!(
                        "Member {} added{as_learner} to cluster {}",
                        member_id_hex(added.id),
                        member_id_hex(cluster_id)
                    );
                    println!();
                    println!("Start it with its own --data-dir and client URLs, and:");
                    let words: Vec<String> = server_arguments
                        .iter()
                        .map(|word| shell_word(word))
                        .collect();
                    println!("keel {}", words.join(" "));
                }
                Output::Json => {
                    let members: Vec<JsonMember> =
                        response.members.iter().map(JsonMember::from).collect();
                    println!(
                        "{}",
                        serde_json::json!({
                            "cluster_id": cluster_id,
                            "member": JsonMember::from(&added),
                            "members": members,
                            "start_arguments": server_arguments,
                        })
                    );
                }
            }
        }
        MemberCommand::Remove { id } => {
            let id = parse_member_id(&id)?;
            let response = answer(client.member_remove(id).await)?;
            print_changed(output, ("removed", "from"), id, cluster_id(response.header));
        }
        MemberCommand::Update { id, peer_urls } => {
            let id = parse_member_id(&id)?;
            let peer_urls = keel_server::config::parse_url_list("peer-urls", &peer_urls)?;
            let response = answer(client.member_update(id, peer_urls).await)?;
            print_changed(output, ("updated", "in"), id, cluster_id(response.header));
        }
        MemberCommand::Promote { id } => {
            let id = parse_member_id(&id)?;
            let response = answer(client.member_promote(id).await)?;
            print_changed(output, ("promoted", "in"), id, cluster_id(response.header));
        }
    }
    Ok(())
}

/// The `keel server` arguments a newly added member starts with: its name,
/// every started member's peer URLs (the new member asks them for the
/// membership), its own peer URLs, and `--initial-cluster-state existing`.
fn start_arguments(name: &str, added: &Member, members: &[Member]) -> Vec<String> {
    let mut initial_cluster = Vec::new();
    for member in members {
        let member_name = if member.id == added.id {
            name
        } else {
            &member.name
        };
        // Another member that has not started yet cannot answer the new
        // member, and its empty name would not parse: leave it out.
        if member_name.is_empty() {
            continue;
        }
        for url in &member.peer_ur_ls {
            initial_cluster.push(format!("{member_name}={url}"));
        }
    }
    let peer_urls = added.peer_ur_ls.join(",");
    [
        "server",
        "--name",
        name,
        "--initial-cluster",
        &initial_cluster.join(","),
        "--initial-advertise-peer-urls",
        &peer_urls,
        "--listen-peer-urls",
        &peer_urls,
        "--initial-cluster-state",
        "existing",
    ]
    .map(str::to_string)
    .to_vec()
}

fn print_members(output: Output, cluster_id: u64, members: &[Member]) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "cluster_id": cluster_id,
                "members": members.iter().map(JsonMember::from).collect::<Vec<_>>(),
            })
        ),
        Output::Table => {
            let rows: Vec<Vec<String>> = members
                .iter()
                .map(|member| {
                    let started = !member.name.is_empty();
                    vec![
                        member_id_hex(member.id),
                        if started { "started" } else { "unstarted" }.to_string(),
                        member.name.clone(),
                        member.peer_ur_ls.join(","),
                        member.client_ur_ls.join(","),
                        if member.is_learner { "yes" } else { "no" }.to_string(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "ID",
                    "STATUS",
                    "NAME",
                    "PEER URLS",
                    "CLIENT URLS",
                    "LEARNER",
                ],
                &rows,
            );
        }
    }
}

/// Prints etcdctl's confirmation: "Member … removed from cluster …"; the
/// change is a verb and its preposition.
fn print_changed(output: Output, (change, preposition): (&str, &str), id: u64, cluster_id: u64) {
    match output {
        Output::Table => println!(
            "Member {} {change} {preposition} cluster {}",
            member_id_hex(id),
            member_id_hex(cluster_id)
        ),
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "id": id,
                "id_hex": member_id_hex(id),
                "cluster_id": cluster_id,
                "change": change,
            })
        ),
    }
}
