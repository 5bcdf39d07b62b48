//! The README's commands, run as a newcomer types them, so the README cannot
//! drift from the code again (issue 10: `cargo run --release -- dev` once
//! failed on every fresh clone and no test noticed, because tests start the
//! built binary instead of running the README).
//!
//! Everything is read from README.md itself, nothing is copied here:
//! - the main-job command is the first line of the first `sh` block under
//!   "The two commands"; it runs through `bash` at the repository's root, as
//!   typed (so it may build the release binary first, which is slow on a cold
//!   checkout: the waits below allow for that);
//! - every `sh` block under "A short tour" is run line by line against that
//!   cluster. Comment lines under a command are what it must print (`…`
//!   matches anything, runs of spaces compare equal); a command whose own
//!   comment says "in another terminal" runs in the background beside the
//!   rest, and what it printed first is compared at the end; a command whose
//!   comment says "within a few seconds" (discovery converging) is run again
//!   until it prints what the README shows, for at most
//!   `EVENTUALLY_TIMEOUT`; `<lease-id>` and
//!   `<member-id>` are filled in from what earlier commands printed, as a
//!   reader would.
//!
//! The cluster uses the README's ports (2379, 12379, 22379 and their peers),
//! which no other test uses. Processes run in their own process group and are
//! killed by that group if the test fails; files the README's commands create
//! (`keel-data`, `backup.db`) are removed afterwards unless they were there
//! before.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The README, as built into this test (a README change rebuilds the test).
const README: &str = include_str!("../../../README.md");
/// How long the main-job command may take to print its leader: a cold release
/// build of the workspace takes about three minutes on CI's two cores, more
/// while other tests run.
const FIRST_START_TIMEOUT: Duration = Duration::from_secs(25 * 60);
/// How long a restart (binary already built) may take to elect a leader.
const RESTART_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one command of the tour may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a command marked "within a few seconds" may take to print what
/// the README shows.
const EVENTUALLY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the cluster may take to stop after Ctrl-C.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn readme_commands_work_as_written() {
    let root = repository_root();
    let cleanup = Cleanup::new(&root, &["keel-data", "backup.db"]);
    let main_command = first_line_of_first_block("The two commands");
    let scratch = tempfile::tempdir().expect("a scratch directory");

    // The main job, exactly as the README shows it.
    let mut cluster = Background::start(&main_command, &root, scratch.path(), "dev");
    let printed = cluster.wait_for_output("Ctrl-C stops", FIRST_START_TIMEOUT);
    let endpoints = printed_endpoints(&printed);
    run_checked(
        &format!("etcdctl --endpoints={endpoints} put readme-check yes"),
        &root,
        &[],
        &["OK"],
    );
    run_checked(
        &format!("etcdctl --endpoints={endpoints} get readme-check --print-value-only"),
        &root,
        &[],
        &["yes"],
    );

    // A second one while the first runs: refused clearly, first one intact.
    let second = run(&main_command, &root, &[]);
    assert!(
        !second.status.success(),
        "a second `{main_command}` while one runs must fail; it printed:\n{}{}",
        second.stdout,
        second.stderr
    );
    assert!(
        second.stderr.contains("in use"),
        "a second `{main_command}` must say what is in use; it printed:\n{}",
        second.stderr
    );

    // Every command of the tour, in order, against that cluster.
    let mut exports = Vec::new();
    let mut placeholders = Placeholders::default();
    let mut background = Vec::new();
    for block in blocks_of_section("A short tour") {
        for step in steps(&block) {
            let command = placeholders.fill(&step.command);
            if step.background {
                let name = format!("tour-{}", background.len());
                let script = format!("{}\n{command}", exports.join("\n"));
                let process = Background::start(&script, &root, scratch.path(), &name);
                // A command started "in another terminal" is running before
                // the reader types the next one.
                std::thread::sleep(Duration::from_millis(500));
                background.push((process, step));
                continue;
            }
            let started = Instant::now();
            let output = loop {
                let output = run(&command, &root, &exports);
                let settled = !step.eventually
                    || (output.status.success() && prints(&output.stdout, &step.expected))
                    || started.elapsed() > EVENTUALLY_TIMEOUT;
                if settled {
                    break output;
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            assert!(
                output.status.success(),
                "README command `{command}` failed ({}):\n{}{}",
                output.status,
                output.stdout,
                output.stderr
            );
            if !step.expected.is_empty() {
                assert_prints(&command, &output.stdout, &step.expected);
            }
            placeholders.learn(&output.stdout);
            if command.starts_with("export ") {
                exports.push(command);
            }
        }
    }
    for (mut process, step) in background {
        let expected: Vec<&str> = step.expected.iter().map(String::as_str).collect();
        let printed = process.wait_for_lines(&expected, COMMAND_TIMEOUT);
        // A watch goes on printing (the lease may expire meanwhile): what the
        // README shows must be what it printed first.
        let first: Vec<&str> = printed_lines(&printed)
            .into_iter()
            .take(expected.len())
            .collect();
        assert_prints(&step.command, &first.join("\n"), &step.expected);
        process.kill();
    }

    // Ctrl-C: status 0, and nothing left of the process group.
    cluster.interrupt();
    let status = cluster.wait(STOP_TIMEOUT);
    assert!(status.success(), "`{main_command}` after Ctrl-C: {status}");
    cluster.assert_group_gone(STOP_TIMEOUT);

    // "Run it again to resume the same data."
    let mut cluster = Background::start(&main_command, &root, scratch.path(), "dev-again");
    cluster.wait_for_output("Ctrl-C stops", RESTART_TIMEOUT);
    run_checked(
        &format!("etcdctl --endpoints={endpoints} get greeting --print-value-only"),
        &root,
        &[],
        &["hola"],
    );
    cluster.interrupt();
    let status = cluster.wait(STOP_TIMEOUT);
    assert!(status.success(), "`{main_command}` after Ctrl-C: {status}");
    cluster.assert_group_gone(STOP_TIMEOUT);
    drop(cleanup);
}

fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

/// The `sh` blocks of the README section whose heading starts with `title`.
fn blocks_of_section(title: &str) -> Vec<Vec<String>> {
    let heading = format!("## {title}");
    let start = README
        .find(&heading)
        .unwrap_or_else(|| panic!("README.md has no section {heading:?}"));
    let section = &README[start + heading.len()..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in section.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.push(current.take().expect("inside a block")),
            (Some(block), line) => block.push(line.to_string()),
            (None, _) => {}
        }
    }
    assert!(
        current.is_none(),
        "README section {title:?}: unclosed block"
    );
    assert!(
        !blocks.is_empty(),
        "README section {title:?} has no sh block"
    );
    blocks
}

fn first_line_of_first_block(title: &str) -> String {
    blocks_of_section(title)[0]
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("README section {title:?}: empty first block"))
}

/// One command of the tour and what the README says it prints.
#[derive(Debug)]
struct Step {
    command: String,
    expected: Vec<String>,
    background: bool,
    eventually: bool,
}

/// Splits a block into commands (a heredoc stays with its command) and the
/// comment lines that follow each one.
fn steps(block: &[String]) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut lines = block.iter();
    while let Some(line) = lines.next() {
        if let Some(comment) = line.strip_prefix('#') {
            let step = steps
                .last_mut()
                .unwrap_or_else(|| panic!("README: output line {line:?} before any command"));
            step.expected
                .push(comment.strip_prefix(' ').unwrap_or(comment).to_string());
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let (command, comment) = match line.find("  #") {
            Some(at) => (line[..at].trim_end(), line[at..].trim()),
            None => (line.as_str(), ""),
        };
        let mut command = command.to_string();
        if let Some(at) = command.find("<<'") {
            let delimiter = command[at + 3..]
                .split('\'')
                .next()
                .expect("a heredoc delimiter")
                .to_string();
            for body in lines.by_ref() {
                command.push('\n');
                command.push_str(body);
                if body == &delimiter {
                    break;
                }
            }
        }
        steps.push(Step {
            command,
            expected: Vec::new(),
            background: comment.contains("in another terminal"),
            eventually: comment.contains("within a few seconds"),
        });
    }
    steps
}

/// Ids the README asks the reader to copy from an earlier command's output.
#[derive(Default)]
struct Placeholders {
    lease_id: Option<String>,
    member_id: Option<String>,
}

impl Placeholders {
    fn learn(&mut self, printed: &str) {
        for line in printed.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["lease", id, "granted", ..] => self.lease_id = Some(id.to_string()),
                ["Member", id, "added", ..] => self.member_id = Some(id.to_string()),
                _ => {}
            }
        }
    }

    fn fill(&self, command: &str) -> String {
        let mut command = command.to_string();
        for (placeholder, value) in [
            ("<lease-id>", &self.lease_id),
            ("<member-id>", &self.member_id),
        ] {
            if command.contains(placeholder) {
                let value = value.as_ref().unwrap_or_else(|| {
                    panic!("README: {placeholder} in `{command}` before any command printed it")
                });
                command = command.replace(placeholder, value);
            }
        }
        assert!(
            !command.contains("-id>"),
            "README: `{command}` has a placeholder this test does not know"
        );
        command
    }
}

/// The endpoints `keel dev` printed in its `etcdctl --endpoints=…` hint.
fn printed_endpoints(printed: &str) -> String {
    printed
        .split_whitespace()
        .find_map(|word| word.strip_prefix("--endpoints="))
        .unwrap_or_else(|| panic!("the main command printed no endpoints:\n{printed}"))
        .to_string()
}

/// Whether `actual` matches `pattern`, where `…` matches any run of characters
/// and runs of whitespace compare equal.
fn line_matches(pattern: &str, actual: &str) -> bool {
    let pattern = pattern.split_whitespace().collect::<Vec<_>>().join(" ");
    let actual = actual.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut parts = pattern.split('…');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = actual.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    for (index, part) in parts.iter().enumerate() {
        if index + 1 == parts.len() {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

fn printed_lines(printed: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = printed.lines().map(str::trim_end).collect();
    while lines.last() == Some(&"") {
        lines.pop();
    }
    lines
}

/// Whether `printed` is, line for line, what `expected` shows.
fn prints(printed: &str, expected: &[String]) -> bool {
    let lines = printed_lines(printed);
    lines.len() == expected.len()
        && expected
            .iter()
            .zip(&lines)
            .all(|(pattern, line)| line_matches(pattern, line))
}

fn assert_prints(command: &str, printed: &str, expected: &[String]) {
    assert!(
        prints(printed, expected),
        "README command `{command}` printed:\n{printed}\nbut the README shows:\n{}",
        expected.join("\n")
    );
}

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `command` through bash at `directory` after `exports`, as typed into
/// a terminal there, and waits for it (bounded).
fn run(command: &str, directory: &Path, exports: &[String]) -> Output {
    let script = format!("{}\n{command}", exports.join("\n"));
    let mut child = Command::new("bash")
        .args(["-c", &script])
        .current_dir(directory)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("starting bash");
    let started = Instant::now();
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let stdout = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let stderr = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for bash") {
            break status;
        }
        if started.elapsed() > COMMAND_TIMEOUT {
            kill_group(child.id(), "KILL");
            panic!("README command `{command}` still running after {COMMAND_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: stdout.join().expect("reading stdout"),
        stderr: stderr.join().expect("reading stderr"),
    }
}

fn run_checked(command: &str, directory: &Path, exports: &[String], expected: &[&str]) {
    let output = run(command, directory, exports);
    assert!(
        output.status.success(),
        "`{command}` failed ({}):\n{}{}",
        output.status,
        output.stdout,
        output.stderr
    );
    let expected: Vec<String> = expected.iter().map(|line| line.to_string()).collect();
    assert_prints(command, &output.stdout, &expected);
}

/// Sends `signal` to every process of the group led by `leader`.
fn kill_group(leader: u32, signal: &str) -> bool {
    Command::new("kill")
        .args([&format!("-{signal}"), "--", &format!("-{leader}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|status| status.success())
        .unwrap_or(false)
}

/// A command running in its own process group, its output in files; the
/// whole group is killed if it is still there when this is dropped.
struct Background {
    child: Child,
    command: String,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl Background {
    fn start(script: &str, directory: &Path, scratch: &Path, name: &str) -> Background {
        let stdout_path = scratch.join(format!("{name}.stdout"));
        let stderr_path = scratch.join(format!("{name}.stderr"));
        let child = Command::new("bash")
            .args(["-c", script])
            .current_dir(directory)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
            .process_group(0)
            .spawn()
            .expect("starting bash");
        Background {
            child,
            command: script.trim().to_string(),
            stdout_path,
            stderr_path,
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits until stdout contains `text`; fails if the command exits first.
    fn wait_for_output(&mut self, text: &str, timeout: Duration) -> String {
        let started = Instant::now();
        loop {
            let printed = self.stdout();
            if printed.contains(text) {
                return printed;
            }
            if let Some(status) = self.child.try_wait().expect("waiting") {
                panic!(
                    "`{}` exited ({status}) before printing {text:?}:\n{printed}{}",
                    self.command,
                    self.stderr()
                );
            }
            assert!(
                started.elapsed() < timeout,
                "`{}` printed no {text:?} within {timeout:?}:\n{printed}{}",
                self.command,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until stdout matches `expected` line for line (or the timeout),
    /// and returns what it printed.
    fn wait_for_lines(&mut self, expected: &[&str], timeout: Duration) -> String {
        let started = Instant::now();
        loop {
            let printed = self.stdout();
            let lines = printed_lines(&printed);
            let done = lines.len() >= expected.len()
                && expected
                    .iter()
                    .zip(&lines)
                    .all(|(pattern, line)| line_matches(pattern, line));
            if done || started.elapsed() > timeout {
                return printed;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ctrl-C, as a terminal sends it: SIGINT to the foreground group.
    fn interrupt(&self) {
        kill_group(self.child.id(), "INT");
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting") {
                return status;
            }
            assert!(
                started.elapsed() < timeout,
                "`{}` did not exit within {timeout:?} of Ctrl-C:\n{}{}",
                self.command,
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Asserts that no process of the group is left (members included).
    fn assert_group_gone(&self, timeout: Duration) {
        let started = Instant::now();
        while kill_group(self.child.id(), "0") {
            assert!(
                started.elapsed() < timeout,
                "`{}` left processes behind after it exited",
                self.command
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        kill_group(self.child.id(), "KILL");
        let _ = self.child.wait();
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill();
        } else {
            // The leader exited; members of its group may not have.
            kill_group(self.child.id(), "KILL");
        }
    }
}

/// Removes what the README's commands create at the root, unless it was there
/// before the test (a developer's own `keel-data` is left alone).
struct Cleanup {
    created: Vec<PathBuf>,
}

impl Cleanup {
    fn new(root: &Path, names: &[&str]) -> Cleanup {
        Cleanup {
            created: names
                .iter()
                .map(|name| root.join(name))
                .filter(|path| !path.exists())
                .collect(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for path in &self.created {
            let _ = std::fs::remove_dir_all(path);
            let _ = std::fs::remove_file(path);
        }
    }
}

#[test]
fn line_patterns_match_as_the_readme_means() {
    assert!(line_matches("OK", "OK"));
    assert!(!line_matches("OK", "OK then"));
    assert!(line_matches(
        "lease … granted with TTL(30s)",
        "lease 6f3e granted with TTL(30s)"
    ));
    assert!(!line_matches(
        "lease … granted with TTL(30s)",
        "lease 6f3e granted with TTL(5s)"
    ));
    assert!(line_matches("greeting … hola", "greeting        6  hola"));
    assert!(line_matches("…", "anything at all"));
    assert!(!line_matches("a…b…c", "a-b-d"));
    assert!(line_matches("a…b…c", "a-b-c"));
}

#[test]
fn tour_steps_keep_heredocs_outputs_and_background_marks() {
    let block: Vec<String> = [
        "export A=1",
        "echo x  # in another terminal",
        "# x",
        "cat <<'EOF'",
        "one",
        "",
        "EOF",
        "# one",
        "#",
    ]
    .iter()
    .map(|line| line.to_string())
    .collect();
    let steps = steps(&block);
    assert_eq!(steps.len(), 3);
    assert!(steps[1].background);
    assert_eq!(steps[1].command, "echo x");
    assert_eq!(steps[2].command, "cat <<'EOF'\none\n\nEOF");
    assert_eq!(steps[2].expected, ["one", ""]);
}
