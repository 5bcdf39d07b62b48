//! `keel dev`: a local three-member cluster, three real processes of this
//! binary on 127.0.0.1, with data under `./keel-data`. Ctrl-C reaches the whole
//! process group, so each member stops itself cleanly; this process waits for
//! them. Running it again resumes the same data.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use keel_server::api::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_types::etcdserverpb::StatusRequest;
use tokio::process::{Child, Command};

/// Options of `keel dev`.
#[derive(Debug, clap::Args)]
pub struct DevArguments {
    /// Where the members keep their data (one folder each).
    #[arg(long, default_value = "keel-data")]
    data_dir: PathBuf,
    /// Client port of the first member; the others use +10000 and +20000, as
    /// etcd's own Procfile does (2379, 12379, 22379).
    #[arg(long, default_value_t = 2379)]
    base_port: u16,
    /// Also run the demo job (examples/jobs/web.toml: three Python HTTP
    /// servers registered as service `web`) once the agents are up, to watch
    /// it fail over when an agent is killed.
    #[arg(long)]
    demo: bool,
    /// --log-level and --log-format, for this command and its members.
    #[command(flatten)]
    log: crate::logging::LogArguments,
}

/// How long to wait for the cluster to elect a leader before giving up.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long members get to stop after Ctrl-C before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

struct DevMember {
    name: String,
    client_url: String,
    metrics_url: String,
    child: Child,
}

/// Starts the three members, waits for a leader, prints how to reach them and
/// runs until Ctrl-C.
pub async fn run(arguments: DevArguments) -> anyhow::Result<()> {
    crate::logging::init(&arguments.log)?;
    let executable = std::env::current_exe().context("finding the keel executable")?;
    std::fs::create_dir_all(&arguments.data_dir)
        .with_context(|| format!("creating {}", arguments.data_dir.display()))?;
    // Held until this process exits: a second `keel dev` on the same data is
    // refused here, before it starts anything.
    let _dev_lock = lock_dev_data(&arguments.data_dir)?;
    let ports: Vec<(String, u16, u16)> = (0..3u16)
        .map(|index| {
            let client = arguments.base_port + index * 10_000;
            (format!("keel{}", index + 1), client, client + 1)
        })
        .collect();
    ensure_ports_free(&ports)?;
    let initial_cluster = ports
        .iter()
        .map(|(name, _, peer)| format!("{name}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut members = Vec::new();
    for (name, client, peer) in &ports {
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        // etcd's habit: metrics on the port after the peer port (2381).
        let metrics_url = format!("http://127.0.0.1:{}", peer + 1);
        let log_path = arguments.data_dir.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let child = Command::new(&executable)
            .arg("server")
            .args(["--name", name])
            .arg("--data-dir")
            .arg(arguments.data_dir.join(name))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-token", "keel-dev"])
            .args(["--listen-metrics-urls", &metrics_url])
            .args(arguments.log.to_flags())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting member {name}"))?;
        members.push(DevMember {
            name: name.clone(),
            client_url,
            metrics_url,
            child,
        });
    }
    let endpoints = ports
        .iter()
        .map(|(_, client, _)| format!("127.0.0.1:{client}"))
        .collect::<Vec<_>>()
        .join(",");
    println!(
        "keel dev: three members, data under {}",
        arguments.data_dir.display()
    );
    for member in &members {
        println!(
            "  {:<6} {}   metrics and health: {}/metrics {}/readyz",
            member.name, member.client_url, member.metrics_url, member.metrics_url
        );
    }
    match wait_for_leader(&mut members, &arguments.data_dir).await {
        Ok(leader) => println!("leader elected: {leader:x}"),
        Err(error) => {
            stop(&mut members).await;
            return Err(error);
        }
    }
    let mut agents =
        match crate::dev_agents::start(&executable, &arguments.data_dir, &endpoints).await {
            Ok(agents) => agents,
            Err(error) => {
                stop(&mut members).await;
                return Err(error);
            }
        };
    crate::dev_agents::print(&agents);
    if arguments.demo {
        if let Err(error) = crate::dev_agents::run_demo(&agents).await {
            crate::dev_agents::stop(&mut agents).await;
            stop(&mut members).await;
            return Err(error);
        }
    }
    println!();
    println!("try:");
    println!("  etcdctl --endpoints={endpoints} put greeting hello");
    println!("  etcdctl --endpoints={endpoints} get greeting");
    println!("  etcdctl --endpoints={endpoints} endpoint status -w table");
    println!(
        "logs: {}/keel*.log and agent*.log; Ctrl-C stops them all",
        arguments.data_dir.display()
    );

    // SIGTERM too (a supervisor or `kill` stopping us): otherwise the members
    // would outlive this process, holding their ports.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut exited = None;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
        status = wait_any(&mut members) => exited = Some(status),
    }
    crate::dev_agents::stop(&mut agents).await;
    if let Some((name, status)) = exited {
        stop(&mut members).await;
        anyhow::bail!("member {name} exited unexpectedly ({status}); see its log");
    }
    println!("\nstopping…");
    stop(&mut members).await;
    println!("stopped");
    Ok(())
}

async fn wait_any(members: &mut [DevMember]) -> (String, String) {
    loop {
        for member in members.iter_mut() {
            if let Ok(Some(status)) = member.child.try_wait() {
                return (member.name.clone(), status.to_string());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The lock file inside the data directory that one `keel dev` holds.
const DEV_LOCK_FILE: &str = "keel-dev.lock";

/// Takes `keel dev`'s exclusive lock on its data directory, or says clearly
/// that another `keel dev` is using it (and which process, when known).
fn lock_dev_data(data_dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = data_dir.join(DEV_LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            // The holder's pid, for the message a second `keel dev` prints.
            file.set_len(0)
                .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            let holder = if holder.is_empty() {
                String::new()
            } else {
                format!(" (process {holder})")
            };
            anyhow::bail!(
                "the data directory {} is in use by another keel dev{holder}; \
                 stop it first, or pass --data-dir to use other data",
                data_dir.display()
            )
        }
        Err(std::fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// Fails, naming the port and its role, when any member or agent port is
/// taken: they would otherwise start, fail one by one and leave a confusing
/// log.
fn ensure_ports_free(ports: &[(String, u16, u16)]) -> anyhow::Result<()> {
    let mut taken = Vec::new();
    for (name, client, peer) in ports {
        for (port, role) in [(client, "client"), (peer, "peer")] {
            if let Err(error) = std::net::TcpListener::bind(("127.0.0.1", *port)) {
                taken.push(format!("{port} ({name}'s {role} port: {error})"));
            }
        }
    }
    for (name, port, role) in crate::dev_agents::ports() {
        // HTTP listens on TCP; DNS on UDP and TCP; gossip on UDP.
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port)).err();
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port)).err();
        let error = match role {
            "HTTP" => tcp,
            "gossip" => udp,
            _ => tcp.or(udp),
        };
        if let Some(error) = error {
            taken.push(format!("{port} ({name}'s {role} port: {error})"));
        }
    }
    if !taken.is_empty() {
        anyhow::bail!(
            "ports in use: {}; is another keel dev or etcd running? \
             Stop it, or pass --base-port",
            taken.join(", ")
        );
    }
    Ok(())
}

/// Waits until some member reports a leader. Fails at once, with the end of
/// its log, when a member exits meanwhile.
async fn wait_for_leader(members: &mut [DevMember], data_dir: &Path) -> anyhow::Result<u64> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        for member in members.iter_mut() {
            if let Ok(Some(status)) = member.child.try_wait() {
                let log_path = data_dir.join(format!("{}.log", member.name));
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                anyhow::bail!(
                    "member {} exited while starting ({status}); the end of {}:\n{}",
                    member.name,
                    log_path.display(),
                    tail.join("\n")
                );
            }
        }
        for member in members.iter() {
            if let Ok(mut client) = MaintenanceClient::connect(member.client_url.clone()).await {
                if let Ok(response) = client.status(StatusRequest {}).await {
                    let leader = response.into_inner().leader;
                    if leader != 0 {
                        return Ok(leader);
                    }
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "no leader after {} s; see the members' logs",
                READY_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for members that received Ctrl-C with us; asks the rest to stop, and
/// kills any that do not within `STOP_TIMEOUT`.
async fn stop(members: &mut [DevMember]) {
    for member in members.iter() {
        if let Some(pid) = member.child.id() {
            // SIGTERM, in case the member did not share our Ctrl-C (a detached terminal).
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for member in members.iter_mut() {
        match tokio::time::timeout(STOP_TIMEOUT, member.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!("member {} did not stop in time; killing it", member.name);
                let _ = member.child.kill().await;
            }
        }
    }
}
