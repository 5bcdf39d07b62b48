//! Fault injection on agents and the tasks they supervise (`keel agent
//! --enable-chaos`, off by default), for `keel chaos inject kill|pause`.
//!
//! The agent on the target machine carries the fault out, as a member does
//! for its own faults: it SIGKILLs itself and comes back after the duration
//! (an agent crash and its restart: its tasks go on, orphaned, as they
//! would, and the restarted agent ends them and starts its allocations
//! afresh), SIGSTOPs itself for a while (a stall: its node lease is not
//! renewed, gossip stops), or SIGKILLs / SIGSTOPs the process group of a
//! supervised task (the supervisor then restarts it by its `restart` block,
//! or its liveness check sees it hang). A pause is ended by a detached
//! helper process that sends SIGCONT after the duration; a kill, by a
//! detached helper started just before it that sleeps for the duration and
//! then `exec`s this executable again with the agent's arguments, working
//! directory, environment, standard output and error. Either heals by itself
//! even if the injector, or the agent, is gone.
//!
//! The routes (`GET /v1/chaos`, `POST /v1/chaos/inject`, `POST
//! /v1/chaos/heal`) answer callers on the loopback interface and, when the
//! agent has a token (`--chaos-token-file`), remote callers presenting it as
//! `Authorization: Bearer <token>`. Every fault and heal is an event in the
//! events log (`fault.injected`, `fault.healed`) and a WARN log line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use keel_client::Client;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::events::{self, Event, EventType};

/// Faults active at once on one agent.
pub const ACTIVE_FAULTS_MAX: usize = 64;
/// The longest a fault may last: a forgotten pause must end.
pub const FAULT_DURATION_MAX: Duration = Duration::from_secs(3_600);
/// Shortest token accepted.
pub const TOKEN_CHARACTERS_MIN: usize = 16;
/// How long the agent waits after answering before it kills or stops
/// itself, so that the answer leaves first.
const SELF_FAULT_DELAY: Duration = Duration::from_millis(200);
/// How long recording the event may hold the answer up.
const EVENT_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Where a task's process ids are read from (written by the supervisor).
const ALLOCATION_STATUS_PREFIX: &str = "/keel/alloc-status/";

/// Fault injection's settings (`--enable-chaos`, `--chaos-token-file`).
#[derive(Clone, Debug, Default)]
pub struct ChaosConfig {
    /// Whether the routes inject anything at all.
    pub enabled: bool,
    /// The token remote callers must present; `None`: loopback only.
    pub token: Option<String>,
}

/// What to do to the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultKind {
    /// SIGKILL; an agent restarts itself after the duration, a task is
    /// restarted by its supervisor.
    Kill,
    /// SIGSTOP, then SIGCONT after the duration.
    Pause,
}

/// `POST /v1/chaos/inject`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InjectRequest {
    /// Kill or pause.
    pub kind: FaultKind,
    /// `agent` (this agent), or `<allocation id>` (every task of it), or
    /// `<allocation id>/<task>`.
    pub target: String,
    /// How long a pause lasts, or how long after a kill of the agent it
    /// restarts, in milliseconds (a killed task's supervisor restarts it by
    /// its `restart` block instead).
    #[serde(default)]
    pub duration_milliseconds: u64,
}

/// The answer to an injection.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InjectResponse {
    /// The fault's id on this agent (for heal).
    pub fault_id: u64,
    /// The node that carries it out.
    pub node: String,
    /// What was done, in words.
    pub description: String,
}

/// `POST /v1/chaos/heal`: one fault, or all of them (`fault_id` 0 or absent).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HealRequest {
    /// The fault to heal; 0 heals every fault.
    #[serde(default)]
    pub fault_id: u64,
}

/// One fault still in force (a pause), as `GET /v1/chaos` lists it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ActiveFault {
    /// Its id.
    pub fault_id: u64,
    /// What it does.
    pub description: String,
    /// Until it heals by itself.
    pub remaining_milliseconds: u64,
}

/// The process groups a fault acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Victim {
    /// This agent's own process.
    Agent,
    /// Process groups of supervised tasks, by `<allocation>/<task>`.
    Tasks(Vec<(String, i32)>),
}

struct Paused {
    description: String,
    victim: Victim,
    until: Instant,
}

/// The agent's fault injector: its settings and the pauses in force.
pub struct AgentChaos {
    config: ChaosConfig,
    node: String,
    client: Client,
    next_id: Mutex<u64>,
    paused: Mutex<BTreeMap<u64, Paused>>,
}

impl AgentChaos {
    /// An injector for the agent of `node`, reading task process ids and
    /// recording events through `client`.
    pub fn new(config: ChaosConfig, node: impl Into<String>, client: Client) -> Arc<AgentChaos> {
        Arc::new(AgentChaos {
            config,
            node: node.into(),
            client,
            next_id: Mutex::new(0),
            paused: Mutex::new(BTreeMap::new()),
        })
    }

    /// Whether the caller may inject: enabled, and on loopback or holding the token.
    fn authorize(&self, caller: SocketAddr, headers: &HeaderMap) -> Result<(), Refusal> {
        if !self.config.enabled {
            return Err(Refusal(
                StatusCode::FORBIDDEN,
                "fault injection is off on this agent; start it with --enable-chaos".into(),
            ));
        }
        if caller.ip().is_loopback() || caller.ip().to_canonical().is_loopback() {
            return Ok(());
        }
        let Some(token) = &self.config.token else {
            return Err(Refusal(
                StatusCode::FORBIDDEN,
                format!(
                    "fault injection is answered only on the loopback interface, not to \
                     {caller}, unless the agent was started with --chaos-token-file"
                ),
            ));
        };
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        match presented {
            Some(presented) if tokens_equal(presented, token) => Ok(()),
            Some(_) => Err(Refusal(
                StatusCode::UNAUTHORIZED,
                format!("the fault-injection token presented by {caller} is wrong"),
            )),
            None => Err(Refusal(
                StatusCode::UNAUTHORIZED,
                format!(
                    "fault injection from {caller} needs `Authorization: Bearer <token>` \
                     (keel chaos --token-file)"
                ),
            )),
        }
    }

    /// Finds the process groups the target names.
    async fn victim(&self, target: &str) -> Result<Victim, Refusal> {
        if target == "agent" || target == self.node {
            return Ok(Victim::Agent);
        }
        let (allocation, task) = match target.split_once('/') {
            Some((allocation, task)) => (allocation, Some(task)),
            None => (target, None),
        };
        let key = format!("{ALLOCATION_STATUS_PREFIX}{allocation}");
        let record = self
            .client
            .get(key.clone())
            .await
            .map_err(|error| {
                Refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("reading {key}: {error}"),
                )
            })?
            .ok_or_else(|| {
                Refusal(
                    StatusCode::NOT_FOUND,
                    format!("no allocation {allocation:?} has a status (expected {key})"),
                )
            })?;
        let status: AllocationProcesses =
            serde_json::from_slice(&record.value).map_err(|error| {
                Refusal(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the status of allocation {allocation} is unreadable: {error}"),
                )
            })?;
        if status.node != self.node {
            return Err(Refusal(
                StatusCode::BAD_REQUEST,
                format!(
                    "allocation {allocation} runs on node {}, not on {}: ask that node's agent",
                    status.node, self.node
                ),
            ));
        }
        let groups: Vec<(String, i32)> = status
            .tasks
            .iter()
            .filter(|(name, _)| task.is_none_or(|task| task == name.as_str()))
            .filter_map(|(name, task)| task.pid.map(|pid| (format!("{allocation}/{name}"), pid)))
            .filter(|(_, pid)| *pid > 1)
            .collect();
        if groups.is_empty() {
            return Err(Refusal(
                StatusCode::CONFLICT,
                match task {
                    Some(task) => {
                        format!("task {task:?} of allocation {allocation} is not running")
                    }
                    None => format!("no task of allocation {allocation} is running"),
                },
            ));
        }
        Ok(Victim::Tasks(groups))
    }

    async fn inject(self: &Arc<Self>, request: InjectRequest) -> Result<InjectResponse, Refusal> {
        let duration = Duration::from_millis(request.duration_milliseconds);
        let victim = self.victim(&request.target).await?;
        let timed = request.kind == FaultKind::Pause || victim == Victim::Agent;
        if timed && (duration.is_zero() || duration > FAULT_DURATION_MAX) {
            return Err(Refusal(
                StatusCode::BAD_REQUEST,
                format!(
                    "a pause, or a kill of the agent (restarted after it), must last more \
                     than 0 and at most {} s (duration_milliseconds)",
                    FAULT_DURATION_MAX.as_secs()
                ),
            ));
        }
        let description = describe(request.kind, &victim, duration);
        let fault_id = {
            let mut next_id = self.next_id.lock().expect("not poisoned");
            let mut paused = self.paused.lock().expect("not poisoned");
            paused.retain(|_, pause| pause.until > Instant::now());
            if request.kind == FaultKind::Pause && paused.len() >= ACTIVE_FAULTS_MAX {
                return Err(Refusal(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("{ACTIVE_FAULTS_MAX} faults are already active on this agent"),
                ));
            }
            *next_id += 1;
            if request.kind == FaultKind::Pause {
                paused.insert(
                    *next_id,
                    Paused {
                        description: description.clone(),
                        victim: victim.clone(),
                        until: Instant::now() + duration,
                    },
                );
            }
            *next_id
        };
        tracing::warn!(fault_id, %description, "fault injected");
        let mut fields = vec![
            ("fault_id".to_owned(), fault_id.to_string()),
            (
                "kind".to_owned(),
                format!("{:?}", request.kind).to_lowercase(),
            ),
        ];
        if timed {
            fields.push((
                "expires_unix_ms".to_owned(),
                (events::now_unix_ms() + duration.as_millis() as u64).to_string(),
            ));
        }
        // Recorded before the fault, so a killed or stopped agent still leaves it.
        let subject = match &victim {
            Victim::Agent => self.node.as_str(),
            Victim::Tasks(_) => request.target.as_str(),
        };
        self.record(EventType::FaultInjected, subject, &description, fields)
            .await;
        if request.kind == FaultKind::Pause {
            // Records the end; a paused agent records its own once it runs again.
            let chaos = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(duration).await;
                let expired = chaos.paused.lock().expect("not poisoned").remove(&fault_id);
                if let Some(pause) = expired {
                    chaos.healed(fault_id, pause, "expired").await;
                }
            });
        }
        match (&victim, request.kind) {
            (Victim::Agent, kind) => signal_self_later(kind, duration),
            (Victim::Tasks(groups), FaultKind::Kill) => {
                for (_, group) in groups {
                    signal_group(*group, Signal::SIGKILL);
                }
            }
            (Victim::Tasks(groups), FaultKind::Pause) => {
                for (_, group) in groups {
                    signal_group(*group, Signal::SIGSTOP);
                    continue_group_later(*group, duration);
                }
            }
        }
        Ok(InjectResponse {
            fault_id,
            node: self.node.clone(),
            description,
        })
    }

    async fn heal(&self, request: HealRequest) -> usize {
        let healed: Vec<(u64, Paused)> = {
            let mut paused = self.paused.lock().expect("not poisoned");
            let ids: Vec<u64> = paused
                .keys()
                .copied()
                .filter(|id| request.fault_id == 0 || *id == request.fault_id)
                .collect();
            ids.into_iter()
                .filter_map(|id| paused.remove(&id).map(|pause| (id, pause)))
                .collect()
        };
        let count = healed.len();
        for (fault_id, pause) in healed {
            if let Victim::Tasks(groups) = &pause.victim {
                for (_, group) in groups {
                    signal_group(*group, Signal::SIGCONT);
                }
            }
            self.healed(fault_id, pause, "healed").await;
        }
        count
    }

    async fn healed(&self, fault_id: u64, pause: Paused, how: &str) {
        tracing::warn!(fault_id, description = %pause.description, how, "fault healed");
        let subject = match &pause.victim {
            Victim::Agent => self.node.clone(),
            Victim::Tasks(groups) => groups
                .iter()
                .map(|(name, _)| name.as_str())
                .collect::<Vec<_>>()
                .join(","),
        };
        self.record(
            EventType::FaultHealed,
            &subject,
            &format!("{how}: {}", pause.description),
            vec![("fault_id".to_owned(), fault_id.to_string())],
        )
        .await;
    }

    fn list(&self) -> Vec<ActiveFault> {
        let now = Instant::now();
        self.paused
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|(_, pause)| pause.until > now)
            .map(|(id, pause)| ActiveFault {
                fault_id: *id,
                description: pause.description.clone(),
                remaining_milliseconds: pause.until.duration_since(now).as_millis() as u64,
            })
            .collect()
    }

    async fn record(
        &self,
        kind: EventType,
        subject: &str,
        message: &str,
        fields: Vec<(String, String)>,
    ) {
        let event = Event::now(&self.node, kind, subject, message, fields);
        let write = events::write(&self.client, &event);
        match tokio::time::timeout(EVENT_WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "recording a fault event"),
            Err(_) => tracing::warn!("recording a fault event: no answer in time"),
        }
    }
}

/// The part of an allocation's status a fault needs: its node and its
/// tasks' process group leaders.
#[derive(Deserialize)]
struct AllocationProcesses {
    node: String,
    #[serde(default)]
    tasks: BTreeMap<String, TaskProcess>,
}

#[derive(Deserialize)]
struct TaskProcess {
    #[serde(default)]
    pid: Option<i32>,
}

fn describe(kind: FaultKind, victim: &Victim, duration: Duration) -> String {
    let what = match victim {
        Victim::Agent => "the agent".to_owned(),
        Victim::Tasks(groups) => groups
            .iter()
            .map(|(name, group)| format!("task {name} (process group {group})"))
            .collect::<Vec<_>>()
            .join(", "),
    };
    match (kind, victim) {
        (FaultKind::Kill, Victim::Agent) => format!(
            "kill {what} (SIGKILL), restarted after {:.1} s",
            duration.as_secs_f64()
        ),
        (FaultKind::Kill, Victim::Tasks(_)) => format!("kill {what} (SIGKILL)"),
        (FaultKind::Pause, _) => format!(
            "pause {what} for {:.1} s (SIGSTOP, then SIGCONT)",
            duration.as_secs_f64()
        ),
    }
}

fn signal_group(group: i32, signal: Signal) {
    if let Err(error) = signal::killpg(Pid::from_raw(group), signal) {
        tracing::warn!(group, %signal, %error, "signalling a task's process group");
    }
}

/// A detached shell that continues the process group after the duration,
/// even if this agent is gone by then.
fn continue_group_later(group: i32, duration: Duration) {
    spawn_detached(&format!(
        "sleep {:.3}; kill -s CONT -- -{group}",
        duration.as_secs_f64()
    ));
}

/// Kills or stops this agent a moment after the answer left. A killed
/// process cannot restart itself, nor a stopped one wake itself: a detached
/// helper, started first, does it after the duration.
fn signal_self_later(kind: FaultKind, duration: Duration) {
    let pid = std::process::id();
    tokio::spawn(async move {
        tokio::time::sleep(SELF_FAULT_DELAY).await;
        match kind {
            FaultKind::Kill => {
                if let Err(error) = restart_after(duration) {
                    tracing::error!(%error, "cannot start the helper that restarts this agent; killing it anyway");
                }
                if let Err(error) = signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL) {
                    tracing::error!(%error, "cannot kill this agent");
                }
            }
            FaultKind::Pause => spawn_detached(&format!(
                "(sleep {:.3}; kill -CONT {pid}) >/dev/null 2>&1 & kill -STOP {pid}",
                duration.as_secs_f64()
            )),
        }
    });
}

/// What the restart helper runs: `$1` is the delay in seconds, the rest the
/// command. `exec` keeps the helper's process id, so the restarted agent has
/// the pid the line before it logs.
const RESTART_SCRIPT: &str = "sleep \"$1\"; shift; \
     echo \"keel chaos: restarting the killed process as pid $$: $*\" >&2; exec \"$@\"";

/// Starts a detached `/bin/sh` that runs this executable again, with the
/// same arguments, working directory, environment, standard output and
/// error, after `delay`. It is this agent's child only until the kill: then
/// init (or the nearest subreaper) adopts it, and it goes on. Not reaped by
/// a thread as other helpers are: it must outlive this process, and ends
/// only by becoming the restarted agent. Members have the same helper
/// (`keel_server::fault_injection`); the agent keeps its own copy because it
/// is a client of the store and does not depend on the server crate.
fn restart_after(delay: Duration) -> std::io::Result<()> {
    let executable = std::env::current_exe()?;
    // A binary replaced since this process started (a rebuild) is named
    // "<path> (deleted)" by Linux: the path itself is what a restart wants.
    let executable = match executable
        .to_str()
        .and_then(|path| path.strip_suffix(" (deleted)"))
    {
        Some(path) => std::path::PathBuf::from(path),
        None => executable,
    };
    std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(RESTART_SCRIPT)
        .arg("sh")
        .arg(format!("{:.3}", delay.as_secs_f64()))
        .arg(executable)
        .args(std::env::args_os().skip(1))
        .stdin(std::process::Stdio::null())
        .spawn()
        .map(drop)
}

fn spawn_detached(script: &str) {
    let spawned = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    match spawned {
        // Reaped by a thread so it never lingers as a zombie.
        Ok(mut child) => {
            std::thread::spawn(move || child.wait());
        }
        Err(error) => tracing::error!(%error, "cannot start the fault's helper process"),
    }
}

/// Compares a presented token with the expected one in time that does not
/// depend on where they first differ.
fn tokens_equal(presented: &str, expected: &str) -> bool {
    presented.len() == expected.len()
        && presented
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0
}

/// A refusal: an HTTP status and a message naming what is wrong.
#[derive(Debug)]
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

/// The routes of fault injection; the server must provide `ConnectInfo`.
pub fn router(chaos: Arc<AgentChaos>) -> Router {
    Router::new()
        .route("/v1/chaos", get(list_route))
        .route("/v1/chaos/inject", post(inject_route))
        .route("/v1/chaos/heal", post(heal_route))
        .with_state(chaos)
}

type Caller = ConnectInfo<SocketAddr>;

async fn list_route(
    State(chaos): State<Arc<AgentChaos>>,
    ConnectInfo(caller): Caller,
    headers: HeaderMap,
) -> Result<Json<Vec<ActiveFault>>, Refusal> {
    chaos.authorize(caller, &headers)?;
    Ok(Json(chaos.list()))
}

async fn inject_route(
    State(chaos): State<Arc<AgentChaos>>,
    ConnectInfo(caller): Caller,
    headers: HeaderMap,
    request: Result<Json<InjectRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<InjectResponse>, Refusal> {
    chaos.authorize(caller, &headers)?;
    let Json(request) = request.map_err(|rejection| {
        Refusal(
            StatusCode::BAD_REQUEST,
            format!(
                "the injection is not valid JSON of {{kind: kill|pause, target, \
                 duration_milliseconds}}: {}",
                rejection.body_text()
            ),
        )
    })?;
    Ok(Json(chaos.inject(request).await?))
}

async fn heal_route(
    State(chaos): State<Arc<AgentChaos>>,
    ConnectInfo(caller): Caller,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, Refusal> {
    chaos.authorize(caller, &headers)?;
    // No body heals everything, as `keel chaos heal` without --fault-id.
    let request: HealRequest = if body.iter().all(u8::is_ascii_whitespace) {
        HealRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|error| {
            Refusal(
                StatusCode::BAD_REQUEST,
                format!("the heal request is not valid JSON of {{fault_id}}: {error}"),
            )
        })?
    };
    let healed = chaos.heal(request).await;
    Ok(Json(
        serde_json::json!({ "healed": healed, "node": chaos.node }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(tokens_equal("0123456789abcdef", "0123456789abcdef"));
        assert!(!tokens_equal("0123456789abcdeX", "0123456789abcdef"));
        assert!(!tokens_equal("0123456789abcde", "0123456789abcdef"));
        assert!(!tokens_equal("", "0123456789abcdef"));
    }

    #[test]
    fn descriptions_name_the_process_groups() {
        let victim = Victim::Tasks(vec![("a1/server".into(), 4242)]);
        let text = describe(FaultKind::Pause, &victim, Duration::from_secs(3));
        assert_eq!(
            text,
            "pause task a1/server (process group 4242) for 3.0 s (SIGSTOP, then SIGCONT)"
        );
        assert_eq!(
            describe(FaultKind::Kill, &Victim::Agent, Duration::from_secs(2)),
            "kill the agent (SIGKILL), restarted after 2.0 s"
        );
        assert_eq!(
            describe(FaultKind::Kill, &victim, Duration::ZERO),
            "kill task a1/server (process group 4242) (SIGKILL)"
        );
    }
}
