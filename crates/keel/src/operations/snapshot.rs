//! `keel snapshot save|status|restore`: backups, as etcdctl and etcdutl make
//! and use them.
//!
//! `save` streams Maintenance.Snapshot from one member into `FILE.part`, checks
//! the received backup (its SHA-256 and that it decodes), fsyncs it and only
//! then renames it to `FILE`, so `FILE` is never a partial or damaged backup.
//! `status` summarises a backup file. `restore` builds a new member's data
//! directory from a backup under a new membership (a new cluster, as etcdutl's
//! restore makes); the backup is checked completely before anything is
//! written, so a damaged backup leaves no half-built data directory behind.
//!
//! The file format is keel's (see `keel_core::backup`); `etcdctl snapshot
//! save` against keel writes the same bytes, so its files work here too.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use keel_core::backup::BackupStatus;
use keel_server::api::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_server::config::{parse_initial_cluster, parse_url_address, parse_url_list, ServerConfig};
use keel_types::etcdserverpb::SnapshotRequest;
use tokio::io::AsyncWriteExt;

use super::{human_bytes, member_id_hex, print_table, shell_word, ClientOptions, Output};

/// How long the stream may go without delivering a chunk before `save` gives
/// up: the member takes its image at once, so a longer silence means it or
/// the network is stuck, not busy.
const SNAPSHOT_CHUNK_TIMEOUT: Duration = Duration::from_secs(30);
/// The least time between two progress updates on a terminal, so a fast local
/// stream does not spend its time redrawing.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Options of `keel snapshot`.
#[derive(Debug, clap::Args)]
pub struct Arguments {
    #[command(flatten)]
    client: ClientOptions,
    #[command(subcommand)]
    command: SnapshotCommand,
}

#[derive(Debug, clap::Subcommand)]
enum SnapshotCommand {
    /// Stream a backup of the whole key space from a member into FILE.
    Save {
        /// Where to write the backup (replaced if it exists, only once the
        /// new backup is complete and checked).
        file: PathBuf,
    },
    /// Show a backup's hash, revision, key count and size.
    Status {
        /// The backup file.
        file: PathBuf,
    },
    /// Build a new member's data directory from a backup.
    ///
    /// Restore every member of the new cluster from the same file with the
    /// same --initial-cluster, then start each with `keel server` and the
    /// same flags (and --initial-cluster-state new).
    Restore(RestoreArguments),
}

/// The member flags `restore` needs, with `keel server`'s names and defaults.
#[derive(Debug, clap::Args)]
struct RestoreArguments {
    /// The backup file.
    file: PathBuf,
    /// The restored member's name.
    #[arg(long, default_value = "default")]
    name: String,
    /// The data directory to create (default: NAME.etcd, as etcd); it must
    /// not hold a member yet.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The new cluster's members: name=peer-url,…
    #[arg(long, default_value = "default=http://localhost:2380")]
    initial_cluster: String,
    /// This member's peer URLs, as listed for it in --initial-cluster.
    #[arg(long, default_value = "http://localhost:2380")]
    initial_advertise_peer_urls: String,
    /// Token of the new cluster (member ids are derived from it).
    #[arg(long, default_value = "etcd-cluster")]
    initial_cluster_token: String,
}

/// Runs one `keel snapshot` command.
pub async fn run(arguments: Arguments) -> anyhow::Result<()> {
    let output = arguments.client.output;
    match arguments.command {
        SnapshotCommand::Save { file } => save(&arguments.client, &file).await,
        SnapshotCommand::Status { file } => {
            let status = read_backup(&file)?;
            print_backup_status(output, &status);
            Ok(())
        }
        // Restoring is a few file writes: it runs on this thread, as nothing
        // else is running.
        SnapshotCommand::Restore(restore_arguments) => restore(output, &restore_arguments),
    }
}

/// Reads and checks a backup file completely.
fn read_backup(file: &Path) -> anyhow::Result<BackupStatus> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    keel_core::backup::status(&bytes)
        .with_context(|| format!("{} is not a usable keel backup", file.display()))
}

fn print_backup_status(output: Output, status: &BackupStatus) {
    match output {
        Output::Table => print_table(
            &["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE"],
            &[vec![
                format!("{:08x}", status.hash),
                status.revision.to_string(),
                status.key_count.to_string(),
                human_bytes(status.file_bytes as u64),
            ]],
        ),
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "hash": status.hash,
                "revision": status.revision,
                "total_keys": status.key_count,
                "total_bytes": status.file_bytes,
            })
        ),
    }
}

/// `FILE.part`: where `save` writes until the backup is complete.
fn part_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}

/// Removes the partial file when `save` fails at any step, so a failed save
/// leaves nothing that could be mistaken for a backup.
struct PartFile {
    path: PathBuf,
    finished: bool,
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A progress line on standard error, redrawn in place, shown only when
/// standard error is a terminal (a log file wants no carriage returns).
struct Progress {
    enabled: bool,
    last_drawn: Option<Instant>,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            enabled: std::io::stderr().is_terminal(),
            last_drawn: None,
        }
    }

    fn update(&mut self, received_bytes: u64, total_bytes: u64) {
        let due = self
            .last_drawn
            .is_none_or(|drawn| drawn.elapsed() >= PROGRESS_INTERVAL);
        if !self.enabled || !(due || received_bytes == total_bytes) {
            return;
        }
        self.last_drawn = Some(Instant::now());
        let percent = (received_bytes * 100)
            .checked_div(total_bytes)
            .unwrap_or(100);
        eprint!(
            "\rreceived {} of {} ({percent}%)   ",
            human_bytes(received_bytes),
            human_bytes(total_bytes)
        );
    }

    fn finish(&self) {
        if self.enabled && self.last_drawn.is_some() {
            eprintln!();
        }
    }
}

async fn save(client: &ClientOptions, file: &Path) -> anyhow::Result<()> {
    let channel = client.connect().await?;
    let mut stream = super::request(MaintenanceClient::new(channel).snapshot(SnapshotRequest {}))
        .await
        .context("asking for a snapshot")?;
    let mut part = PartFile {
        path: part_path(file),
        finished: false,
    };
    let mut writer = tokio::fs::File::create(&part.path)
        .await
        .with_context(|| format!("creating {}", part.path.display()))?;
    let mut progress = Progress::new();
    let mut received_bytes = 0u64;
    let mut remaining_bytes = None;
    loop {
        let message = tokio::time::timeout(SNAPSHOT_CHUNK_TIMEOUT, stream.message())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the snapshot stream stalled for {} s",
                    SNAPSHOT_CHUNK_TIMEOUT.as_secs()
                )
            })?
            .map_err(|status| anyhow::anyhow!("snapshot stream: {}", status.message()))?;
        let Some(message) = message else { break };
        writer
            .write_all(&message.blob)
            .await
            .with_context(|| format!("writing {}", part.path.display()))?;
        received_bytes += message.blob.len() as u64;
        remaining_bytes = Some(message.remaining_bytes);
        progress.update(received_bytes, received_bytes + message.remaining_bytes);
    }
    progress.finish();
    if remaining_bytes != Some(0) {
        anyhow::bail!(
            "the snapshot stream ended early, after {received_bytes} bytes of the backup"
        );
    }
    writer
        .sync_all()
        .await
        .with_context(|| format!("syncing {}", part.path.display()))?;
    drop(writer);
    // A backup that cannot be restored should be found now, not on the day
    // it is needed.
    let status = read_backup(&part.path).context("the received backup is damaged")?;
    std::fs::rename(&part.path, file)
        .with_context(|| format!("renaming {} to {}", part.path.display(), file.display()))?;
    part.finished = true;
    sync_parent_directory(file)?;
    match client.output {
        Output::Table => println!(
            "Snapshot saved at {} (revision {}, {} keys, {})",
            file.display(),
            status.revision,
            status.key_count,
            human_bytes(status.file_bytes as u64)
        ),
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "file": file.display().to_string(),
                "hash": status.hash,
                "revision": status.revision,
                "total_keys": status.key_count,
                "total_bytes": status.file_bytes,
            })
        ),
    }
    Ok(())
}

/// Makes a rename durable: the new directory entry is only on disk once the
/// directory itself is synced.
fn sync_parent_directory(file: &Path) -> anyhow::Result<()> {
    let parent = match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)
        .and_then(|directory| directory.sync_all())
        .with_context(|| format!("syncing directory {}", parent.display()))
}

/// The restored member's configuration, as `keel server` would build it from
/// the same flags (only the parts that shape the data directory matter).
fn restore_config(arguments: &RestoreArguments) -> anyhow::Result<ServerConfig> {
    let peer_urls = parse_url_list(
        "initial-advertise-peer-urls",
        &arguments.initial_advertise_peer_urls,
    )?;
    let data_dir = arguments
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.etcd", arguments.name)));
    // Restoring listens on nothing; the addresses only satisfy the type.
    let client_address = parse_url_address("http://127.0.0.1:2379")?;
    let mut config = ServerConfig::single(
        &arguments.name,
        data_dir,
        client_address,
        parse_url_address(&peer_urls[0])?,
    );
    config.initial_advertise_peer_urls = peer_urls;
    config.initial_cluster = parse_initial_cluster(&arguments.initial_cluster)?;
    config.initial_cluster_token = arguments.initial_cluster_token.clone();
    config.validate()?;
    Ok(config)
}

fn restore(output: Output, arguments: &RestoreArguments) -> anyhow::Result<()> {
    let config = restore_config(arguments)?;
    let file = &arguments.file;
    let member_directory = config.data_dir.join("member");
    if member_directory.exists() {
        anyhow::bail!(
            "{} already holds a member; restore into a new --data-dir",
            config.data_dir.display()
        );
    }
    eprintln!("checking backup {}", file.display());
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    // Check everything before creating anything: restore_backup creates the
    // data directory before it decodes the backup.
    let status = keel_core::backup::status(&bytes)
        .with_context(|| format!("{} cannot be restored", file.display()))?;
    eprintln!(
        "backup is sound: revision {}, {} keys, {}; writing {}",
        status.revision,
        status.key_count,
        human_bytes(status.file_bytes as u64),
        config.data_dir.display()
    );
    let data_dir_existed = config.data_dir.exists();
    if let Err(error) = keel_server::restore_backup(&config, &bytes) {
        // Leave the disk as it was: a half-written member directory would be
        // recovered by `keel server` as if it were real.
        let _ = if data_dir_existed {
            std::fs::remove_dir_all(&member_directory)
        } else {
            std::fs::remove_dir_all(&config.data_dir)
        };
        return Err(error).with_context(|| format!("restoring into {}", config.data_dir.display()));
    }
    let member_id = config.member_id();
    let start_arguments: Vec<String> = [
        "server",
        "--name",
        &config.name,
        "--data-dir",
        &config.data_dir.display().to_string(),
        "--initial-cluster",
        &arguments.initial_cluster,
        "--initial-advertise-peer-urls",
        &arguments.initial_advertise_peer_urls,
        "--listen-peer-urls",
        &arguments.initial_advertise_peer_urls,
        "--initial-cluster-token",
        &config.initial_cluster_token,
        "--initial-cluster-state",
        "new",
    ]
    .map(str::to_string)
    .to_vec();
    match output {
        Output::Table => {
            println!(
                "Restored {} into {} as member {} ({}) of a new cluster: revision {}, {} keys",
                file.display(),
                config.data_dir.display(),
                config.name,
                member_id_hex(member_id),
                status.revision,
                status.key_count
            );
            println!();
            println!("Start it with its own client URLs, and:");
            let words: Vec<String> = start_arguments
                .iter()
                .map(|word| shell_word(word))
                .collect();
            println!("keel {}", words.join(" "));
        }
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "file": file.display().to_string(),
                "data_dir": config.data_dir.display().to_string(),
                "name": config.name,
                "id": member_id,
                "id_hex": member_id_hex(member_id),
                "revision": status.revision,
                "total_keys": status.key_count,
                "start_arguments": start_arguments,
            })
        ),
    }
    Ok(())
}
