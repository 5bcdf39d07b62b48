//! The progress line on stderr while a benchmark runs: operations done (of
//! the total, or time elapsed of `--duration`), the mean rate so far and the
//! time elapsed, rewritten in place with `\r` a few times a second.
//!
//! Hand-written because it is one line of text: a progress-bar crate would
//! bring terminal handling the bench does not need. It goes to stderr so
//! that stdout stays the report alone (`-o json | jq` works while it runs).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// How often the line is rewritten: often enough to look alive, rarely
/// enough to cost nothing.
const REFRESH_INTERVAL: Duration = Duration::from_millis(250);

/// When a run ends.
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    /// After this many operations.
    Operations(u64),
    /// After this long.
    Duration(Duration),
}

/// A running progress line; [`Progress::finish`] ends it.
pub struct Progress {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// Starts rewriting the line from `completed` (operations finished, with
    /// or without error) until [`Progress::finish`].
    pub fn start(
        workload: &'static str,
        completed: Arc<AtomicU64>,
        goal: Goal,
        start: Instant,
    ) -> Progress {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut width: usize = 0;
            loop {
                let finished = tokio::select! {
                    _ = &mut stopped => true,
                    () = tokio::time::sleep(REFRESH_INTERVAL) => false,
                };
                let text = line(
                    workload,
                    completed.load(Ordering::Relaxed),
                    goal,
                    start.elapsed(),
                );
                // Pad over the rest of a longer previous line.
                let padding = width.saturating_sub(text.len());
                width = text.len();
                let mut stderr = std::io::stderr().lock();
                let _ = write!(stderr, "\r{text}{:padding$}", "");
                if finished {
                    let _ = writeln!(stderr);
                }
                let _ = stderr.flush();
                if finished {
                    return;
                }
            }
        });
        Progress { stop, task }
    }

    /// Writes the final state of the line and ends it with a newline.
    pub async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// The text of the progress line.
fn line(workload: &str, completed: u64, goal: Goal, elapsed: Duration) -> String {
    let seconds = elapsed.as_secs_f64();
    let rate = if seconds > 0.0 {
        completed as f64 / seconds
    } else {
        0.0
    };
    match goal {
        Goal::Operations(total) => {
            // A total of zero is all done.
            let percent = completed
                .saturating_mul(100)
                .checked_div(total)
                .unwrap_or(100);
            format!(
                "{workload}: {completed}/{total} operations ({percent}%), \
                 {rate:.0} operations/s, {seconds:.1} s elapsed"
            )
        }
        Goal::Duration(duration) => format!(
            "{workload}: {completed} operations, {rate:.0} operations/s, \
             {seconds:.1} s of {:.1} s",
            duration.as_secs_f64()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_of_a_run_with_a_total() {
        assert_eq!(
            line(
                "put",
                250,
                Goal::Operations(1_000),
                Duration::from_millis(500)
            ),
            "put: 250/1000 operations (25%), 500 operations/s, 0.5 s elapsed"
        );
    }

    #[test]
    fn line_of_a_run_with_a_duration() {
        assert_eq!(
            line(
                "txn",
                3_000,
                Goal::Duration(Duration::from_secs(10)),
                Duration::from_secs(2)
            ),
            "txn: 3000 operations, 1500 operations/s, 2.0 s of 10.0 s"
        );
    }

    #[test]
    fn line_at_the_very_start() {
        assert_eq!(
            line("lease", 0, Goal::Operations(0), Duration::ZERO),
            "lease: 0/0 operations (100%), 0 operations/s, 0.0 s elapsed"
        );
    }
}
