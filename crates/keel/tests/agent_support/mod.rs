//! Real `keel agent` processes beside a real cluster, for the agent tests:
//! agents killed by PID on drop, small HTTP services whose health endpoint a
//! test can make fail, a tiny blocking HTTP client for the agents' API (it
//! needs the response headers), `dig` for DNS, and bounded waits.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// One agent process and its ports.
pub struct Agent {
    pub name: String,
    pub http_port: u16,
    pub dns_port: u16,
    pub gossip_port: u16,
    pub data_dir: PathBuf,
    pub config_dir: PathBuf,
    pub log_path: PathBuf,
    pub process: Option<Child>,
    /// The `keel` arguments it starts with (a test may add flags before starting).
    pub arguments: Vec<String>,
}

impl Agent {
    pub fn http_addr(&self) -> String {
        format!("127.0.0.1:{}", self.http_port)
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().expect("agent runs").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

/// Agents with ports `port_base + 3 * i` (HTTP), `+1` (DNS), `+2` (gossip),
/// each joining the others' gossip, killed on drop.
pub struct Agents {
    pub agents: Vec<Agent>,
    pub directory: tempfile::TempDir,
}

impl Agents {
    /// Lays out `count` agents (not started) for the members at `endpoints`.
    pub fn new(count: usize, port_base: u16, endpoints: &str, node_ttl: &str) -> Agents {
        let directory = tempfile::tempdir().expect("temporary directory");
        let gossip: Vec<String> = (0..count)
            .map(|index| format!("127.0.0.1:{}", port_base + 3 * index as u16 + 2))
            .collect();
        let agents = (0..count)
            .map(|index| {
                let name = format!("node{}", index + 1);
                let http_port = port_base + 3 * index as u16;
                let config_dir = directory.path().join(format!("{name}.d"));
                std::fs::create_dir_all(&config_dir).expect("config dir");
                let join: Vec<&str> = gossip
                    .iter()
                    .enumerate()
                    .filter(|(other, _)| *other != index)
                    .map(|(_, address)| address.as_str())
                    .collect();
                let arguments = vec![
                    "agent".to_string(),
                    "--name".into(),
                    name.clone(),
                    "--endpoints".into(),
                    endpoints.into(),
                    "--data-dir".into(),
                    directory.path().join(&name).display().to_string(),
                    "--http-addr".into(),
                    format!("127.0.0.1:{http_port}"),
                    "--dns-addr".into(),
                    format!("127.0.0.1:{}", http_port + 1),
                    "--gossip-addr".into(),
                    gossip[index].clone(),
                    "--join".into(),
                    join.join(","),
                    "--node-ttl".into(),
                    node_ttl.into(),
                    "--labels".into(),
                    format!("rack=r{},role=test", index + 1),
                    "--config-dir".into(),
                    config_dir.display().to_string(),
                ];
                Agent {
                    data_dir: directory.path().join(&name),
                    log_path: directory.path().join(format!("{name}.log")),
                    config_dir,
                    name,
                    http_port,
                    dns_port: http_port + 1,
                    gossip_port: http_port + 2,
                    process: None,
                    arguments,
                }
            })
            .collect();
        Agents { agents, directory }
    }

    /// Adds `keel agent` flags for agent `index` (before it starts).
    pub fn add_arguments(&mut self, index: usize, arguments: &[&str]) {
        self.agents[index]
            .arguments
            .extend(arguments.iter().map(|argument| argument.to_string()));
    }

    /// Starts (or restarts) agent `index` and waits until its API answers.
    pub fn start(&mut self, index: usize) {
        let agent = &mut self.agents[index];
        assert!(agent.process.is_none(), "{} already runs", agent.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&agent.log_path)
            .expect("agent log");
        let child = Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(&agent.arguments)
            .env("RUST_LOG", "info,hickory_server=warn,chitchat=warn,h2=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting keel agent");
        agent.process = Some(child);
        let address = agent.http_addr();
        wait_until(Duration::from_secs(20), "the agent's API answers", || {
            get(&address, "/v1/agent/self").ok()
        });
    }

    pub fn start_all(&mut self) {
        for index in 0..self.agents.len() {
            self.start(index);
        }
    }

    /// SIGKILLs agent `index` and reaps it.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.agents[index].process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal (STOP, CONT, TERM) to agent `index`.
    pub fn signal(&self, index: usize, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.agents[index].pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    pub fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|agent| format!("--- {} ---\n{}", agent.name, agent.log()))
            .collect()
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for index in 0..self.agents.len() {
            if let Some(child) = self.agents[index].process.as_ref() {
                // A stopped process must be continued to die of SIGKILL promptly.
                let _ = Command::new("kill")
                    .args(["-CONT", &child.id().to_string()])
                    .status();
            }
            self.kill(index);
        }
        // An agent that restarted itself after `keel chaos inject kill` is no
        // child of the test: found by its data directory, before its tasks
        // are reaped (else it could start them again).
        for agent in &self.agents {
            crate::common::kill_processes_naming(&agent.data_dir);
        }
        // Killed agents leave their supervised tasks running (as a real
        // agent crash does): end every process group they recorded.
        for agent in &self.agents {
            reap_tasks(&agent.data_dir);
        }
    }
}

/// SIGKILLs every task process group an agent recorded in
/// `<data-dir>/allocs/<id>/pids`.
pub fn reap_tasks(data_dir: &std::path::Path) {
    let Ok(allocations) = std::fs::read_dir(data_dir.join("allocs")) else {
        return;
    };
    for allocation in allocations.flatten() {
        let Ok(text) = std::fs::read_to_string(allocation.path().join("pids")) else {
            continue;
        };
        let Ok(recorded) = serde_json::from_str::<std::collections::BTreeMap<String, Value>>(&text)
        else {
            continue;
        };
        for process in recorded.values() {
            if let Some(pid) = process["pid"].as_u64() {
                // Most are gone already (stopped by their agent): say nothing.
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// Polls `probe` every 50 ms until it returns `Some`, for at most `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An HTTP response: status, headers (lower-case names), body.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|error| {
            panic!("not JSON ({error}): {}", self.body);
        })
    }

    /// `X-Consul-Index`.
    pub fn index(&self) -> u64 {
        self.header("x-consul-index")
            .and_then(|value| value.parse().ok())
            .expect("X-Consul-Index")
    }
}

/// One HTTP/1.1 request with `Connection: close`.
pub fn request(
    address: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(timeout))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_lowercase(), value.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(name, value)| name == "transfer-encoding" && value.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut text: &str) -> String {
    let mut body = String::new();
    while let Some((size, rest)) = text.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        body.push_str(&rest[..size]);
        text = rest[size..].trim_start_matches("\r\n");
    }
    body
}

/// GET, expecting 200.
pub fn get(address: &str, path: &str) -> std::io::Result<Response> {
    let response = request(address, "GET", path, None, Duration::from_secs(10))?;
    if response.status != 200 {
        return Err(std::io::Error::other(format!(
            "GET {path}: {} {}",
            response.status, response.body
        )));
    }
    Ok(response)
}

/// PUT; returns the response whatever its status.
pub fn put(address: &str, path: &str, body: Option<&str>) -> Response {
    request(address, "PUT", path, body, Duration::from_secs(10)).expect("agent answers")
}

/// The ids of the instances `health/service/<name>?passing` lists.
pub fn passing_ids(address: &str, service: &str) -> Option<Vec<String>> {
    let response = get(address, &format!("/v1/health/service/{service}?passing")).ok()?;
    let mut ids: Vec<String> = response
        .json()
        .as_array()?
        .iter()
        .map(|entry| {
            format!(
                "{}/{}",
                entry["Node"]["Node"].as_str().unwrap_or_default(),
                entry["Service"]["ID"].as_str().unwrap_or_default()
            )
        })
        .collect();
    ids.sort();
    Some(ids)
}

/// A node's status in `/v1/keel/nodes` as agent `address` sees it.
pub fn node_status(address: &str, node: &str) -> Option<String> {
    let nodes = get(address, "/v1/keel/nodes").ok()?.json();
    nodes
        .as_array()?
        .iter()
        .find(|entry| entry["Node"] == node)
        .and_then(|entry| entry["Status"].as_str().map(str::to_string))
}

/// `dig +short` answers (one per line, sorted) for `name` and `kind`.
pub fn dig(dns_port: u16, name: &str, kind: &str) -> Vec<String> {
    let output = Command::new("dig")
        .args([
            "+short",
            "+time=2",
            "+tries=1",
            "-p",
            &dns_port.to_string(),
            "@127.0.0.1",
            name,
            kind,
        ])
        .output()
        .expect("dig is installed (scripts/test installs Debian's dnsutils)");
    let mut lines: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.starts_with(';') && !line.is_empty())
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

/// What a test HTTP service's health endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ok = 0,
    Fail = 1,
    /// Fails and succeeds in turn, one request each.
    Alternate = 2,
}

/// A small HTTP service on its own thread: `/health` answers 200 or 500 as
/// switched; it counts health requests. Stopped on drop.
pub struct WebService {
    pub port: u16,
    mode: Arc<AtomicU8>,
    pub requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WebService {
    pub fn start(port: u16) -> WebService {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("test service port");
        listener.set_nonblocking(true).expect("nonblocking");
        let mode = Arc::new(AtomicU8::new(Health::Ok as u8));
        let requests = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (mode, requests, stop) = (mode.clone(), requests.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut stream, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buffer = [0u8; 2048];
                    let read = stream.read(&mut buffer).unwrap_or(0);
                    let text = String::from_utf8_lossy(&buffer[..read]);
                    let healthy = if text.contains("/health") {
                        let count = requests.fetch_add(1, Ordering::Relaxed);
                        match mode.load(Ordering::Relaxed) {
                            0 => true,
                            1 => false,
                            _ => count % 2 == 0,
                        }
                    } else {
                        true
                    };
                    let (status, body) = if healthy {
                        ("200 OK", "ok")
                    } else {
                        ("500 Internal Server Error", "failing on purpose")
                    };
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
            })
        };
        WebService {
            port,
            mode,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    pub fn set(&self, health: Health) {
        self.mode.store(health as u8, Ordering::Relaxed);
    }
}

impl Drop for WebService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The registration of instance `id` of `web` on `port`, with an HTTP
/// readiness check (interval 300 ms, critical after 3 failures, passing
/// after 2 successes).
pub fn web_definition(id: &str, port: u16) -> String {
    format!(
        r#"{{"Name": "web", "ID": "{id}", "Port": {port}, "Tags": ["v1"],
            "Check": {{"HTTP": "http://127.0.0.1:{port}/health", "Interval": "300ms",
                      "Timeout": "1s", "SuccessBeforePassing": 2,
                      "FailuresBeforeCritical": 3}}}}"#
    )
}
