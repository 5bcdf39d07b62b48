//! Fault injection for operators' chaos experiments (`keel chaos`), off unless the member
//! runs with `--experimental-enable-fault-injection`.
//!
//! A [`FaultInjector`] holds the faults active on this member, each with an expiry on the
//! member's own monotonic clock, so a fault heals by itself even if whoever injected it
//! dies. The places that can misbehave ask it, and only when a fault is active do they
//! pay more than one atomic load:
//! - the peer transport, for every message sent or received ([`FaultInjector::peer_verdict`]):
//!   partitions (one-way or both), a fraction dropped, delay with jitter;
//! - the member loop's tick clock ([`TickClock`]): ticks come `rate` times as often, so a
//!   slow clock lengthens elections and lease TTLs, as a slow timer would;
//! - the disk layer ([`keel_storage::DiskFaults`]): fsync errors (which stop the member, as
//!   the storage invariant requires), slow fsyncs, write errors;
//! - the process itself: SIGKILL and restart, or SIGSTOP with a helper process that
//!   sends SIGCONT after the duration (a stopped process cannot wake itself). Before the
//!   SIGKILL, a detached helper (`/bin/sh`) is started that sleeps for the duration and
//!   then `exec`s this same executable with this process's arguments, working directory
//!   and environment, writing to the same standard output and error: the member comes
//!   back on its data directory, with its member id and data, as a supervisor would
//!   bring it back, even if the injector is gone by then. (`keel chaos run` does not use
//!   this: it kills and restarts the member processes it started itself.)
//!
//! Every injection and every heal (by request or by expiry) is a log line at WARN.
//! The admin API ([`ChaosService`], gRPC on the client port) answers callers on the
//! loopback interface (an experiment run from the member's own machine) and, when the
//! member was given a token (`--experimental-fault-injection-token-file`), callers
//! elsewhere that present it as `authorization: Bearer <token>`: injecting a fault is
//! as dangerous as a root shell, so a remote caller must prove it may.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_types::keelchaospb::{
    disk_fault, fault, process_fault, ActiveFault, Fault, HealRequest, HealResponse, InjectRequest,
    InjectResponse, ListRequest, ListResponse,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Faults active at once on one member.
pub const ACTIVE_FAULTS_MAX: usize = 64;
/// The longest a fault may last: experiments are short, and a forgotten fault must end.
pub const FAULT_DURATION_MAX: Duration = Duration::from_secs(3_600);
/// The longest injected message delay (plus jitter) or fsync delay.
pub const INJECTED_DELAY_MAX: Duration = Duration::from_secs(30);
/// Messages held back by a delay fault at once; beyond it they are dropped, as a
/// full queue drops them.
pub const DELAYED_MESSAGES_MAX: usize = 100_000;
/// How often expired faults are removed (and their heal logged) when nothing asks.
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// Tick clock rates accepted: a hundredfold either way.
const CLOCK_RATE_RANGE: std::ops::RangeInclusive<f64> = 0.01..=100.0;

/// Which way a peer message travels, seen from this member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// This member sends it.
    Outgoing,
    /// This member receives it.
    Incoming,
}

/// What the transport must do with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerVerdict {
    /// Send or deliver it now.
    Deliver,
    /// Lose it.
    Drop,
    /// Send it after this long.
    Delay(Duration),
}

/// Why an injection was refused; becomes a gRPC InvalidArgument or ResourceExhausted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FaultError {
    /// The request describes no usable fault.
    #[error("{0}")]
    Invalid(String),
    /// [`ACTIVE_FAULTS_MAX`] faults are active.
    #[error("{ACTIVE_FAULTS_MAX} faults are already active on this member; heal some first")]
    TooMany,
}

struct Active {
    id: u64,
    fault: Fault,
    expires_at: Instant,
    description: String,
}

struct Faults {
    next_id: u64,
    active: Vec<Active>,
    random: StdRng,
}

/// The faults active on this member; shared by the transport, the member loop, the
/// disk and the admin service.
pub struct FaultInjector {
    /// Set once recovery has found it (0 until then).
    member_id: std::sync::atomic::AtomicU64,
    member_name: String,
    /// Mirrors `faults.active.len()`, so the common case (no fault) takes no lock.
    active_count: AtomicUsize,
    /// Messages currently held back by delay faults, against [`DELAYED_MESSAGES_MAX`].
    delayed_messages: AtomicUsize,
    faults: Mutex<Faults>,
}

impl std::fmt::Debug for FaultInjector {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("FaultInjector")
            .field("member_id", &self.member_id.load(Ordering::Relaxed))
            .field("active_count", &self.active_count.load(Ordering::Relaxed))
            .finish()
    }
}

impl FaultInjector {
    /// An injector with no active fault.
    pub fn new(member_id: u64, member_name: &str) -> Arc<FaultInjector> {
        Arc::new(FaultInjector {
            member_id: std::sync::atomic::AtomicU64::new(member_id),
            member_name: member_name.to_owned(),
            active_count: AtomicUsize::new(0),
            delayed_messages: AtomicUsize::new(0),
            faults: Mutex::new(Faults {
                next_id: 1,
                active: Vec::new(),
                random: StdRng::from_entropy(),
            }),
        })
    }

    /// Records this member's id once recovery has found it.
    pub fn set_member_id(&self, member_id: u64) {
        self.member_id.store(member_id, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts a fault for `duration`. Process faults are carried out at once (the
    /// process is killed or stopped shortly after this returns, so the answer gets out).
    pub fn inject(&self, fault: Fault, duration: Duration) -> Result<u64, FaultError> {
        if duration.is_zero() || duration > FAULT_DURATION_MAX {
            return Err(FaultError::Invalid(format!(
                "the duration must be above zero and at most {} s",
                FAULT_DURATION_MAX.as_secs()
            )));
        }
        let description = describe(&fault)?;
        let process = match &fault.kind {
            Some(fault::Kind::Process(process)) => Some(process.kind()),
            _ => None,
        };
        let id = {
            let mut faults = self.lock();
            self.expire_locked(&mut faults, Instant::now());
            if faults.active.len() >= ACTIVE_FAULTS_MAX {
                return Err(FaultError::TooMany);
            }
            let id = faults.next_id;
            faults.next_id += 1;
            faults.active.push(Active {
                id,
                fault,
                expires_at: Instant::now() + duration,
                description: description.clone(),
            });
            self.active_count
                .store(faults.active.len(), Ordering::Release);
            id
        };
        tracing::warn!(
            fault_id = id,
            fault = %description,
            duration_milliseconds = duration.as_millis() as u64,
            "fault injected"
        );
        if let Some(kind) = process {
            carry_out_process_fault(kind, duration);
        }
        Ok(id)
    }

    /// Ends fault `id`, or every fault for id 0; returns how many ended.
    pub fn heal(&self, id: u64) -> usize {
        let mut faults = self.lock();
        let mut healed = 0;
        faults.active.retain(|active| {
            let ends = id == 0 || active.id == id;
            if ends {
                healed += 1;
                tracing::warn!(
                    fault_id = active.id,
                    fault = %active.description,
                    "fault healed on request"
                );
            }
            !ends
        });
        self.active_count
            .store(faults.active.len(), Ordering::Release);
        healed
    }

    /// The active faults with the time each has left.
    pub fn list(&self) -> ListResponse {
        let now = Instant::now();
        let mut faults = self.lock();
        self.expire_locked(&mut faults, now);
        ListResponse {
            member_id: self.member_id.load(Ordering::Relaxed),
            member_name: self.member_name.clone(),
            faults: faults
                .active
                .iter()
                .map(|active| ActiveFault {
                    fault_id: active.id,
                    fault: Some(active.fault.clone()),
                    remaining_milliseconds: active
                        .expires_at
                        .saturating_duration_since(now)
                        .as_millis() as u64,
                    description: active.description.clone(),
                })
                .collect(),
        }
    }

    fn expire_locked(&self, faults: &mut Faults, now: Instant) {
        faults.active.retain(|active| {
            let expired = active.expires_at <= now;
            if expired {
                tracing::warn!(
                    fault_id = active.id,
                    fault = %active.description,
                    "fault healed: its duration ended"
                );
            }
            !expired
        });
        self.active_count
            .store(faults.active.len(), Ordering::Release);
    }

    /// Removes expired faults every [`EXPIRY_CHECK_INTERVAL`], so a heal is logged on
    /// time even when no message or tick asks.
    pub async fn expire_periodically(self: Arc<Self>) {
        let mut interval = tokio::time::interval(EXPIRY_CHECK_INTERVAL);
        loop {
            interval.tick().await;
            if self.active_count.load(Ordering::Acquire) > 0 {
                let mut faults = self.lock();
                self.expire_locked(&mut faults, Instant::now());
            }
        }
    }

    /// Calls `visit` on every active, unexpired fault; nothing when none is active.
    fn with_active<T>(&self, visit: impl FnOnce(&[Active], &mut StdRng) -> T) -> Option<T> {
        if self.active_count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let now = Instant::now();
        let mut faults = self.lock();
        self.expire_locked(&mut faults, now);
        let Faults { active, random, .. } = &mut *faults;
        Some(visit(active, random))
    }

    /// What to do with a message to or from `peer_id`.
    pub fn peer_verdict(&self, peer_id: u64, direction: Direction) -> PeerVerdict {
        self.with_active(|active, random| {
            let mut delay = Duration::ZERO;
            for fault in active {
                match &fault.fault.kind {
                    Some(fault::Kind::Partition(partition)) => {
                        let cut = match direction {
                            Direction::Outgoing => partition.outgoing,
                            Direction::Incoming => partition.incoming,
                        };
                        if cut && partition.peer_ids.contains(&peer_id) {
                            return PeerVerdict::Drop;
                        }
                    }
                    Some(fault::Kind::DropMessages(drop)) if direction == Direction::Outgoing => {
                        let applies = drop.peer_ids.is_empty() || drop.peer_ids.contains(&peer_id);
                        if applies && random.gen::<f64>() < drop.fraction {
                            return PeerVerdict::Drop;
                        }
                    }
                    Some(fault::Kind::DelayMessages(delayed))
                        if direction == Direction::Outgoing =>
                    {
                        let applies =
                            delayed.peer_ids.is_empty() || delayed.peer_ids.contains(&peer_id);
                        if applies {
                            let jitter = if delayed.jitter_milliseconds > 0 {
                                random.gen_range(0..=delayed.jitter_milliseconds)
                            } else {
                                0
                            };
                            delay += Duration::from_millis(delayed.delay_milliseconds + jitter);
                        }
                    }
                    _ => {}
                }
            }
            if delay.is_zero() {
                PeerVerdict::Deliver
            } else {
                PeerVerdict::Delay(delay)
            }
        })
        .unwrap_or(PeerVerdict::Deliver)
    }

    /// Claims a slot for a delayed message; false when [`DELAYED_MESSAGES_MAX`] are held.
    pub fn claim_delay_slot(&self) -> bool {
        self.delayed_messages
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < DELAYED_MESSAGES_MAX).then_some(held + 1)
            })
            .is_ok()
    }

    /// Returns a slot claimed with [`FaultInjector::claim_delay_slot`].
    pub fn release_delay_slot(&self) {
        self.delayed_messages.fetch_sub(1, Ordering::AcqRel);
    }

    /// The product of the active clock rates (1 without a clock fault).
    pub fn clock_rate(&self) -> f64 {
        self.with_active(|active, _| {
            active
                .iter()
                .filter_map(|fault| match &fault.fault.kind {
                    Some(fault::Kind::ClockRate(clock)) => Some(clock.rate),
                    _ => None,
                })
                .product::<f64>()
        })
        .unwrap_or(1.0)
    }

    fn disk_faults(&self) -> Vec<(disk_fault::Kind, u64)> {
        self.with_active(|active, _| {
            active
                .iter()
                .filter_map(|fault| match &fault.fault.kind {
                    Some(fault::Kind::Disk(disk)) => Some((disk.kind(), disk.delay_milliseconds)),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
    }
}

impl keel_storage::DiskFaults for FaultInjector {
    fn before_write(&self) -> std::io::Result<()> {
        if self
            .disk_faults()
            .iter()
            .any(|(kind, _)| *kind == disk_fault::Kind::WriteError)
        {
            return Err(std::io::Error::other("injected write error (keel chaos)"));
        }
        Ok(())
    }

    fn before_sync(&self) -> std::io::Result<()> {
        let faults = self.disk_faults();
        if faults
            .iter()
            .any(|(kind, _)| *kind == disk_fault::Kind::FsyncError)
        {
            return Err(std::io::Error::other("injected fsync error (keel chaos)"));
        }
        let slow: u64 = faults
            .iter()
            .filter(|(kind, _)| *kind == disk_fault::Kind::SlowFsync)
            .map(|(_, delay)| *delay)
            .sum();
        if slow > 0 {
            // The member loop (or snapshot writer) waits as it would for a slow device.
            std::thread::sleep(Duration::from_millis(slow));
        }
        Ok(())
    }
}

/// The member loop's tick interval: the configured heartbeat interval divided by the
/// injected clock rate, if any.
#[derive(Debug, Clone)]
pub struct TickClock {
    base: Duration,
    faults: Option<Arc<FaultInjector>>,
}

impl TickClock {
    /// A clock ticking every `base`, at the rate `faults` says.
    pub fn new(base: Duration, faults: Option<Arc<FaultInjector>>) -> TickClock {
        TickClock { base, faults }
    }

    /// Real time until the next tick.
    pub fn interval(&self) -> Duration {
        match &self.faults {
            None => self.base,
            Some(faults) => self.base.div_f64(faults.clock_rate()),
        }
    }
}

/// Checks a fault's parameters and says it in words for the log.
fn describe(fault: &Fault) -> Result<String, FaultError> {
    let invalid = |reason: &str| Err(FaultError::Invalid(reason.to_owned()));
    let peers = |ids: &[u64]| -> String {
        if ids.is_empty() {
            "every peer".to_owned()
        } else {
            ids.iter()
                .map(|id| format!("{id:x}"))
                .collect::<Vec<_>>()
                .join(",")
        }
    };
    match &fault.kind {
        None => invalid("the request names no fault"),
        Some(fault::Kind::Partition(partition)) => {
            if partition.peer_ids.is_empty() {
                return invalid("a partition needs the peers on the other side");
            }
            let direction = match (partition.outgoing, partition.incoming) {
                (true, true) => "both ways",
                (true, false) => "outgoing only",
                (false, true) => "incoming only",
                (false, false) => {
                    return invalid("a partition must cut outgoing, incoming or both")
                }
            };
            Ok(format!(
                "partition from {} ({direction})",
                peers(&partition.peer_ids)
            ))
        }
        Some(fault::Kind::DropMessages(drop)) => {
            if !(drop.fraction > 0.0 && drop.fraction <= 1.0) {
                return invalid("the fraction of messages to drop must be in (0, 1]");
            }
            Ok(format!(
                "drop {:.1}% of messages to {}",
                drop.fraction * 100.0,
                peers(&drop.peer_ids)
            ))
        }
        Some(fault::Kind::DelayMessages(delay)) => {
            let total = delay
                .delay_milliseconds
                .saturating_add(delay.jitter_milliseconds);
            if total == 0 || total > INJECTED_DELAY_MAX.as_millis() as u64 {
                return invalid("delay plus jitter must be above zero and at most 30 s");
            }
            Ok(format!(
                "delay messages to {} by {} ms + up to {} ms jitter",
                peers(&delay.peer_ids),
                delay.delay_milliseconds,
                delay.jitter_milliseconds
            ))
        }
        Some(fault::Kind::ClockRate(clock)) => {
            if !CLOCK_RATE_RANGE.contains(&clock.rate) {
                return invalid("the clock rate must be between 0.01 and 100");
            }
            Ok(format!("tick clock at {}× real time", clock.rate))
        }
        Some(fault::Kind::Disk(disk)) => match disk.kind() {
            disk_fault::Kind::FsyncError => Ok("fsync errors".to_owned()),
            disk_fault::Kind::WriteError => Ok("write errors".to_owned()),
            disk_fault::Kind::SlowFsync => {
                if disk.delay_milliseconds == 0
                    || disk.delay_milliseconds > INJECTED_DELAY_MAX.as_millis() as u64
                {
                    return invalid("a slow fsync's delay must be above zero and at most 30 s");
                }
                Ok(format!("fsync slowed by {} ms", disk.delay_milliseconds))
            }
        },
        Some(fault::Kind::Process(process)) => Ok(match process.kind() {
            process_fault::Kind::Kill => {
                "kill the process (SIGKILL), restarted after the duration".to_owned()
            }
            process_fault::Kind::Pause => "pause the process (SIGSTOP, then SIGCONT)".to_owned(),
        }),
    }
}

/// Kills or stops this process, from a helper thread a moment later so that the answer
/// to the injection leaves first. Signals go through `kill(1)`: the workspace forbids
/// unsafe code, and std has no safe way to signal a process.
fn carry_out_process_fault(kind: process_fault::Kind, duration: Duration) {
    let pid = std::process::id();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        let script = match kind {
            process_fault::Kind::Kill => {
                // Started before the kill, and not killed with this process: it brings
                // the member back after the duration even if nobody else is left to.
                if let Err(error) = restart_after(duration) {
                    tracing::error!(%error, "cannot start the helper that restarts this member; killing it anyway");
                }
                format!("kill -KILL {pid}")
            }
            // The helper outlives the stop, and the injector: it continues the member
            // after the duration even if nobody else is left to do it.
            process_fault::Kind::Pause => format!(
                "(sleep {:.3}; kill -CONT {pid}) >/dev/null 2>&1 & kill -STOP {pid}",
                duration.as_secs_f64()
            ),
        };
        if let Err(error) = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&script)
            .spawn()
        {
            tracing::error!(%error, "cannot signal this process for a process fault");
        }
    });
}

/// What the restart helper runs: `$1` is the delay in seconds, the rest the command.
/// `exec` keeps the helper's process id, so the restarted member has the pid the line
/// before it logs.
const RESTART_SCRIPT: &str = "sleep \"$1\"; shift; \
     echo \"keel chaos: restarting the killed process as pid $$: $*\" >&2; exec \"$@\"";

/// Starts a detached `/bin/sh` that runs this executable again, with the same
/// arguments, working directory, environment, standard output and error, after
/// `delay`. It is a child of this process only until the kill: then it is adopted by
/// init (or the nearest subreaper), and goes on. Agents have the same helper
/// (`keel_agent::chaos`), kept apart because the agent does not depend on this crate.
fn restart_after(delay: Duration) -> std::io::Result<()> {
    let executable = std::env::current_exe()?;
    // When the binary was replaced since this process started (a rebuild), Linux names
    // the old one "<path> (deleted)": the path itself is what a restart wants.
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

/// The gRPC admin service `keelchaospb.Chaos`.
#[derive(Debug, Clone)]
pub struct ChaosService {
    faults: Option<Arc<FaultInjector>>,
    token: Option<Arc<str>>,
}

impl ChaosService {
    /// A service over this member's injector (`None` when fault injection is off),
    /// answering non-loopback callers that present `token`, if there is one.
    pub fn new(faults: Option<Arc<FaultInjector>>, token: Option<String>) -> ChaosService {
        ChaosService {
            faults,
            token: token.map(Into::into),
        }
    }

    fn authorize<T>(
        &self,
        request: &tonic::Request<T>,
    ) -> Result<&Arc<FaultInjector>, tonic::Status> {
        let Some(faults) = &self.faults else {
            return Err(tonic::Status::failed_precondition(
                "fault injection is off on this member; start it with \
                 --experimental-enable-fault-injection",
            ));
        };
        match request.remote_addr() {
            Some(address) if is_loopback(address) => Ok(faults),
            remote => {
                let from =
                    remote.map_or_else(|| "an unknown address".to_owned(), |a| a.to_string());
                let Some(token) = &self.token else {
                    return Err(tonic::Status::permission_denied(format!(
                        "fault injection is answered only on the loopback interface, not to \
                         {from}, unless the member was started with \
                         --experimental-fault-injection-token-file"
                    )));
                };
                let presented = request
                    .metadata()
                    .get("authorization")
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.strip_prefix("Bearer "));
                match presented {
                    Some(presented) if tokens_equal(presented, token) => Ok(faults),
                    Some(_) => Err(tonic::Status::unauthenticated(format!(
                        "the fault-injection token presented by {from} is wrong"
                    ))),
                    None => Err(tonic::Status::unauthenticated(format!(
                        "fault injection from {from} needs `authorization: Bearer <token>` \
                         (keel chaos --token-file)"
                    ))),
                }
            }
        }
    }
}

/// Compares a presented token with the expected one in time that does not depend on
/// where they first differ, so the token cannot be guessed byte by byte from timings.
fn tokens_equal(presented: &str, expected: &str) -> bool {
    presented.len() == expected.len()
        && presented
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0
}

fn is_loopback(address: SocketAddr) -> bool {
    match address {
        SocketAddr::V4(v4) => v4.ip().is_loopback(),
        SocketAddr::V6(v6) => {
            v6.ip().is_loopback() || v6.ip().to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[tonic::async_trait]
impl crate::api::keelchaospb::chaos_server::Chaos for ChaosService {
    async fn inject(
        &self,
        request: tonic::Request<InjectRequest>,
    ) -> Result<tonic::Response<InjectResponse>, tonic::Status> {
        let faults = self.authorize(&request)?.clone();
        let request = request.into_inner();
        let fault = request
            .fault
            .ok_or_else(|| tonic::Status::invalid_argument("the request names no fault"))?;
        let duration = Duration::from_millis(request.duration_milliseconds);
        match faults.inject(fault, duration) {
            Ok(fault_id) => Ok(tonic::Response::new(InjectResponse {
                fault_id,
                member_id: faults.member_id.load(Ordering::Relaxed),
            })),
            Err(error @ FaultError::TooMany) => {
                Err(tonic::Status::resource_exhausted(error.to_string()))
            }
            Err(error) => Err(tonic::Status::invalid_argument(error.to_string())),
        }
    }

    async fn heal(
        &self,
        request: tonic::Request<HealRequest>,
    ) -> Result<tonic::Response<HealResponse>, tonic::Status> {
        let faults = self.authorize(&request)?;
        let healed = faults.heal(request.get_ref().fault_id);
        Ok(tonic::Response::new(HealResponse {
            healed: healed as u32,
        }))
    }

    async fn list(
        &self,
        request: tonic::Request<ListRequest>,
    ) -> Result<tonic::Response<ListResponse>, tonic::Status> {
        let faults = self.authorize(&request)?;
        Ok(tonic::Response::new(faults.list()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_types::keelchaospb::{ClockRate, DiskFault, DropMessages, Partition};

    fn partition(peer_ids: Vec<u64>, outgoing: bool, incoming: bool) -> Fault {
        Fault {
            kind: Some(fault::Kind::Partition(Partition {
                peer_ids,
                outgoing,
                incoming,
            })),
        }
    }

    #[test]
    fn a_one_way_partition_drops_one_direction_until_healed() {
        let injector = FaultInjector::new(1, "one");
        assert_eq!(
            injector.peer_verdict(2, Direction::Outgoing),
            PeerVerdict::Deliver
        );
        let id = injector
            .inject(partition(vec![2], true, false), Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            injector.peer_verdict(2, Direction::Outgoing),
            PeerVerdict::Drop
        );
        assert_eq!(
            injector.peer_verdict(2, Direction::Incoming),
            PeerVerdict::Deliver
        );
        assert_eq!(
            injector.peer_verdict(3, Direction::Outgoing),
            PeerVerdict::Deliver
        );
        assert_eq!(injector.list().faults.len(), 1);
        assert_eq!(injector.heal(id), 1);
        assert_eq!(
            injector.peer_verdict(2, Direction::Outgoing),
            PeerVerdict::Deliver
        );
    }

    #[test]
    fn faults_expire_on_their_own() {
        let injector = FaultInjector::new(1, "one");
        injector
            .inject(
                Fault {
                    kind: Some(fault::Kind::ClockRate(ClockRate { rate: 0.5 })),
                },
                Duration::from_millis(30),
            )
            .unwrap();
        let clock = TickClock::new(Duration::from_millis(100), Some(injector.clone()));
        assert_eq!(clock.interval(), Duration::from_millis(200));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(clock.interval(), Duration::from_millis(100));
        assert!(injector.list().faults.is_empty());
    }

    #[test]
    fn disk_faults_fail_the_disk_operations() {
        use keel_storage::DiskFaults as _;
        let injector = FaultInjector::new(1, "one");
        assert!(injector.before_sync().is_ok());
        injector
            .inject(
                Fault {
                    kind: Some(fault::Kind::Disk(DiskFault {
                        kind: disk_fault::Kind::FsyncError as i32,
                        delay_milliseconds: 0,
                    })),
                },
                Duration::from_secs(60),
            )
            .unwrap();
        assert!(injector.before_sync().is_err());
        assert!(injector.before_write().is_ok());
    }

    #[test]
    fn a_full_drop_drops_everything_sent() {
        let injector = FaultInjector::new(1, "one");
        injector
            .inject(
                Fault {
                    kind: Some(fault::Kind::DropMessages(DropMessages {
                        peer_ids: vec![],
                        fraction: 1.0,
                    })),
                },
                Duration::from_secs(60),
            )
            .unwrap();
        assert_eq!(
            injector.peer_verdict(9, Direction::Outgoing),
            PeerVerdict::Drop
        );
        assert_eq!(
            injector.peer_verdict(9, Direction::Incoming),
            PeerVerdict::Deliver
        );
    }

    #[test]
    fn bad_faults_are_refused_with_a_reason() {
        let injector = FaultInjector::new(1, "one");
        let cases = [
            (Fault { kind: None }, "names no fault"),
            (partition(vec![], true, true), "needs the peers"),
            (partition(vec![2], false, false), "must cut"),
            (
                Fault {
                    kind: Some(fault::Kind::ClockRate(ClockRate { rate: 0.0 })),
                },
                "clock rate",
            ),
        ];
        for (fault, expected) in cases {
            let error = injector.inject(fault, Duration::from_secs(1)).unwrap_err();
            assert!(error.to_string().contains(expected), "{error}");
        }
        let error = injector
            .inject(partition(vec![2], true, true), Duration::ZERO)
            .unwrap_err();
        assert!(error.to_string().contains("duration"));
    }
}
