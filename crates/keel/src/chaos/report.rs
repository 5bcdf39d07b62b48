//! The judgement of a `keel chaos run`: availability per second (the fraction of 100 ms
//! windows in which a write was acknowledged), errors by kind, write latency over time,
//! lost acknowledged writes, the linearizability verdict, the hypothesis, (for random
//! failures) the availability model's prediction beside the measurement, and (with a
//! job on agents) the job's instances serving over time, how long each node fault kept
//! them below the job's count, and the most allocations ever wanted running at once.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::nodes::AllocationHistory;
use super::run::{FaultSpan, HistoryOperation, HistoryOutput};
use super::scenario::Scenario;

/// The window of the availability measure.
pub const WINDOW_MILLISECONDS: u64 = 100;
/// Batches for the confidence interval of a measured availability (batch means).
const BATCHES: usize = 10;
/// Student's t for a two-sided 95% interval with BATCHES − 1 = 9 degrees of freedom.
const T_95_NINE_DEGREES: f64 = 2.262;

#[derive(Debug, Clone, Serialize)]
pub struct Second {
    pub second: u64,
    /// Fraction of this second's 100 ms windows with an acknowledged write.
    pub availability: f64,
    pub writes_acknowledged: u64,
    pub write_latency_p50_milliseconds: Option<f64>,
    pub write_latency_p99_milliseconds: Option<f64>,
    /// With a job: the fewest of its instances serving in this second's samples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances_serving_min: Option<usize>,
}

/// What the runner observed of the scenario's job.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    pub name: String,
    pub count: usize,
    /// (seconds since the workload started, instances serving), oldest first; goes on
    /// past the run while the runner waits for the job to serve its count again.
    pub samples: Vec<(f64, usize)>,
    pub history: Result<AllocationHistory, String>,
}

/// What the runner found after the run, beside the history.
#[derive(Debug, Clone)]
pub struct Judged {
    /// Acknowledged writes missing when read back at their revisions.
    pub acknowledged_writes_lost: u64,
    /// keel-check's verdict on the history.
    pub linearizability: String,
    /// The job's observation, with agents and a job.
    pub job: Option<JobOutcome>,
}

/// How long one fault on nodes kept the job below its count.
#[derive(Debug, Clone, Serialize)]
pub struct Recovery {
    pub kind: String,
    pub targets: Vec<String>,
    pub start_seconds: f64,
    /// From the fault's start until the job served its count again and kept it (until
    /// the next fault on nodes, or the end): 0 if it never went below; none if it never
    /// came back.
    pub serving_again_after_seconds: Option<f64>,
}

/// The job's part of the report.
#[derive(Debug, Clone, Serialize)]
pub struct JobReport {
    pub name: String,
    pub count: usize,
    /// Instances serving in the last sample, once the runner healed everything.
    pub serving_at_end: usize,
    pub fewest_serving: usize,
    pub allocation_history: Option<AllocationHistory>,
    pub allocation_history_error: Option<String>,
    pub recoveries: Vec<Recovery>,
}

/// Per fault on nodes, how long until the job served its count for good.
fn recoveries(faults: &[FaultSpan], samples: &[(f64, usize)], count: usize) -> Vec<Recovery> {
    let mut node_faults: Vec<&FaultSpan> = faults.iter().filter(|fault| fault.on_nodes).collect();
    node_faults.sort_by(|a, b| a.start_seconds.total_cmp(&b.start_seconds));
    node_faults
        .iter()
        .enumerate()
        .map(|(index, fault)| {
            let window_end = node_faults
                .get(index + 1)
                .map_or(f64::INFINITY, |next| next.start_seconds);
            let window: Vec<&(f64, usize)> = samples
                .iter()
                .filter(|(time, _)| *time >= fault.start_seconds && *time < window_end)
                .collect();
            let last_below = window.iter().rposition(|(_, serving)| *serving < count);
            let serving_again_after_seconds = match last_below {
                None => Some(0.0),
                Some(position) => window
                    .get(position + 1)
                    .map(|(time, _)| time - fault.start_seconds),
            };
            Recovery {
                kind: fault.kind.clone(),
                targets: fault.targets.clone(),
                start_seconds: fault.start_seconds,
                serving_again_after_seconds,
            }
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct HypothesisCheck {
    pub name: String,
    pub required: String,
    pub measured: String,
    pub held: bool,
}

/// The availability model beside the measurement, for a random failure process.
#[derive(Debug, Clone, Serialize)]
pub struct ModelComparison {
    pub members: usize,
    pub quorum: usize,
    pub failure_rate_per_second: f64,
    pub repair_rate_per_second: f64,
    /// The Markov chain's steady-state availability (every member its own repair crew).
    pub modelled_availability: f64,
    /// The fraction of time a quorum of member processes was running, measured.
    pub measured_process_quorum_availability: f64,
    /// Its 95% confidence interval (batch means).
    pub measured_process_quorum_interval: (f64, f64),
    /// The fraction of 100 ms windows with an acknowledged write, measured: lower than the
    /// process figure by the elections after a leader's loss.
    pub measured_write_availability: f64,
    pub measured_write_interval: (f64, f64),
    /// Whether the model's number lies in the process-quorum interval.
    pub model_within_interval: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub duration_seconds: f64,
    pub operations: u64,
    pub writes_attempted: u64,
    pub writes_acknowledged: u64,
    pub write_success_fraction_within_deadline: f64,
    pub write_latency_p99_milliseconds: Option<f64>,
    pub availability: f64,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub acknowledged_writes_lost: u64,
    pub linearizability: String,
    pub hypothesis: Vec<HypothesisCheck>,
    pub model: Option<ModelComparison>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<JobReport>,
    pub faults: Vec<FaultSpan>,
    pub seconds: Vec<Second>,
    pub passed: bool,
}

fn percentile(sorted: &[f64], fraction: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Mean and 95% interval of per-window indicators by batch means.
fn batch_interval(indicators: &[f64]) -> (f64, (f64, f64)) {
    let mean = indicators.iter().sum::<f64>() / indicators.len().max(1) as f64;
    let batch_length = indicators.len() / BATCHES;
    if batch_length == 0 {
        return (mean, (0.0, 1.0));
    }
    let batches: Vec<f64> = indicators
        .chunks(batch_length)
        .take(BATCHES)
        .map(|batch| batch.iter().sum::<f64>() / batch.len() as f64)
        .collect();
    let batch_mean = batches.iter().sum::<f64>() / batches.len() as f64;
    let variance = batches
        .iter()
        .map(|value| (value - batch_mean).powi(2))
        .sum::<f64>()
        / (batches.len() as f64 - 1.0);
    let half_width = T_95_NINE_DEGREES * (variance / batches.len() as f64).sqrt();
    (
        mean,
        ((mean - half_width).max(0.0), (mean + half_width).min(1.0)),
    )
}

pub fn build(
    scenario: &Scenario,
    operations: &[HistoryOperation],
    faults: Vec<FaultSpan>,
    down_intervals: &[(usize, f64, f64)],
    duration_seconds: f64,
    judged: Judged,
) -> Report {
    let Judged {
        acknowledged_writes_lost,
        linearizability,
        job,
    } = judged;
    let window_count = ((duration_seconds * 1_000.0) as u64 / WINDOW_MILLISECONDS).max(1) as usize;
    let mut window_available = vec![false; window_count];
    let mut errors_by_kind = BTreeMap::new();
    let mut latencies_by_second: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    let mut all_latencies = Vec::new();
    let (mut writes_attempted, mut writes_acknowledged, mut writes_in_time) = (0u64, 0u64, 0u64);
    let deadline_milliseconds = scenario.hypothesis.write_within.as_secs_f64() * 1_000.0;
    let mut operation_count = 0u64;
    for operation in operations {
        if let Some(error) = &operation.error {
            *errors_by_kind.entry(error.clone()).or_insert(0) += 1;
        }
        if operation.error.as_deref() == Some("ConnectFailed") {
            continue;
        }
        operation_count += 1;
        if !operation.is_write() {
            continue;
        }
        writes_attempted += 1;
        let Some(return_time) = operation.return_time else {
            continue;
        };
        if matches!(operation.output, HistoryOutput::Unknown) {
            continue;
        }
        writes_acknowledged += 1;
        let latency_milliseconds = (return_time - operation.call_time) as f64 / 1_000.0;
        if latency_milliseconds <= deadline_milliseconds {
            writes_in_time += 1;
        }
        all_latencies.push(latency_milliseconds);
        latencies_by_second
            .entry(operation.call_time / 1_000_000)
            .or_default()
            .push(latency_milliseconds);
        let window = (return_time / 1_000 / WINDOW_MILLISECONDS) as usize;
        if window < window_count {
            window_available[window] = true;
        }
    }
    all_latencies.sort_by(f64::total_cmp);
    let windows_per_second = (1_000 / WINDOW_MILLISECONDS) as usize;
    let seconds: Vec<Second> = window_available
        .chunks(windows_per_second)
        .enumerate()
        .map(|(second, windows)| {
            let mut latencies = latencies_by_second
                .get(&(second as u64))
                .cloned()
                .unwrap_or_default();
            latencies.sort_by(f64::total_cmp);
            Second {
                second: second as u64,
                availability: windows.iter().filter(|&&available| available).count() as f64
                    / windows.len() as f64,
                writes_acknowledged: latencies.len() as u64,
                write_latency_p50_milliseconds: percentile(&latencies, 0.5),
                write_latency_p99_milliseconds: percentile(&latencies, 0.99),
                instances_serving_min: job.as_ref().and_then(|job| {
                    job.samples
                        .iter()
                        .filter(|(time, _)| *time as u64 == second as u64)
                        .map(|(_, serving)| *serving)
                        .min()
                }),
            }
        })
        .collect();
    let window_indicators: Vec<f64> = window_available
        .iter()
        .map(|&available| if available { 1.0 } else { 0.0 })
        .collect();
    let (availability, write_interval) = batch_interval(&window_indicators);
    let write_success_fraction_within_deadline = if writes_attempted == 0 {
        0.0
    } else {
        writes_in_time as f64 / writes_attempted as f64
    };
    let write_latency_p99_milliseconds = percentile(&all_latencies, 0.99);

    let hypothesis_settings = &scenario.hypothesis;
    let mut hypothesis = vec![
        HypothesisCheck {
            name: "acknowledged writes lost".to_owned(),
            required: "0".to_owned(),
            measured: acknowledged_writes_lost.to_string(),
            held: acknowledged_writes_lost == 0,
        },
        HypothesisCheck {
            name: "history linearizable (keel-check)".to_owned(),
            required: "linearizable".to_owned(),
            measured: linearizability.clone(),
            held: linearizability == "linearizable",
        },
        HypothesisCheck {
            name: format!(
                "writes acknowledged within {} ms",
                hypothesis_settings.write_within.as_millis()
            ),
            required: format!("≥ {:.3}", hypothesis_settings.write_success_fraction_min),
            measured: format!("{write_success_fraction_within_deadline:.4}"),
            held: write_success_fraction_within_deadline
                >= hypothesis_settings.write_success_fraction_min,
        },
        HypothesisCheck {
            name: "write latency p99".to_owned(),
            required: format!(
                "≤ {} ms",
                hypothesis_settings.write_latency_p99_max.as_millis()
            ),
            measured: write_latency_p99_milliseconds
                .map_or("no writes".to_owned(), |p99| format!("{p99:.1} ms")),
            held: write_latency_p99_milliseconds.is_some_and(|p99| {
                p99 <= hypothesis_settings.write_latency_p99_max.as_secs_f64() * 1_000.0
            }),
        },
        HypothesisCheck {
            name: "availability (100 ms windows with a write)".to_owned(),
            required: format!("≥ {:.3}", hypothesis_settings.availability_min),
            measured: format!("{availability:.4}"),
            held: availability >= hypothesis_settings.availability_min,
        },
    ];

    let model = scenario
        .faults
        .iter()
        .find_map(|fault| fault.random)
        .map(|rates| {
            let members = scenario.members;
            let quorum = keel_availability::majority_quorum(members);
            let modelled_availability = keel_availability::RepairableQuorum::new(
                members,
                quorum,
                rates.failure_rate_per_second,
                rates.repair_rate_per_second,
                members,
            )
            .and_then(|chain| chain.availability())
            .map(|availability| availability.up)
            .unwrap_or(f64::NAN);
            // Per window: were at least a quorum of member processes running?
            let quorum_indicators: Vec<f64> = (0..window_count)
                .map(|window| {
                    let time = (window as f64 + 0.5) * WINDOW_MILLISECONDS as f64 / 1_000.0;
                    let down = down_intervals
                        .iter()
                        .filter(|(_, start, end)| *start <= time && time < *end)
                        .count();
                    if members - down >= quorum {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect();
            let (measured, interval) = batch_interval(&quorum_indicators);
            ModelComparison {
                members,
                quorum,
                failure_rate_per_second: rates.failure_rate_per_second,
                repair_rate_per_second: rates.repair_rate_per_second,
                modelled_availability,
                measured_process_quorum_availability: measured,
                measured_process_quorum_interval: interval,
                measured_write_availability: availability,
                measured_write_interval: write_interval,
                model_within_interval: interval.0 <= modelled_availability
                    && modelled_availability <= interval.1,
            }
        });
    if let Some(model) = &model {
        hypothesis.push(HypothesisCheck {
            name: "model availability within the measured 95% interval".to_owned(),
            required: format!(
                "[{:.4}, {:.4}]",
                model.measured_process_quorum_interval.0, model.measured_process_quorum_interval.1
            ),
            measured: format!("{:.4}", model.modelled_availability),
            held: model.model_within_interval,
        });
    }
    let job = job.map(|job| {
        let recoveries = recoveries(&faults, &job.samples, job.count);
        let (allocation_history, allocation_history_error) = match job.history {
            Ok(history) => (Some(history), None),
            Err(error) => (None, Some(error)),
        };
        JobReport {
            serving_at_end: job.samples.last().map_or(0, |(_, serving)| *serving),
            fewest_serving: job
                .samples
                .iter()
                .map(|(_, serving)| *serving)
                .min()
                .unwrap_or(0),
            name: job.name,
            count: job.count,
            allocation_history,
            allocation_history_error,
            recoveries,
        }
    });
    if let Some(job) = &job {
        hypothesis.push(
            match (&job.allocation_history, &job.allocation_history_error) {
                (Some(history), _) => HypothesisCheck {
                    name: format!(
                        "allocations of {} wanted running at once (store history, {} revisions)",
                        job.name, history.revisions_checked
                    ),
                    required: format!("≤ {}, no slot or key twice", job.count),
                    measured: format!(
                        "{} at most, {} revisions with a shared slot, {} keys created twice",
                        history.wanted_running_max,
                        history.revisions_with_a_shared_slot,
                        history.keys_created_twice
                    ),
                    held: history.wanted_running_max <= job.count
                        && history.revisions_with_a_shared_slot == 0
                        && history.keys_created_twice == 0
                        && history.revisions_checked > 0,
                },
                (None, error) => HypothesisCheck {
                    name: format!("allocations of {} wanted running at once", job.name),
                    required: format!("≤ {}", job.count),
                    measured: format!("not checked: {}", error.as_deref().unwrap_or("no history")),
                    held: false,
                },
            },
        );
        hypothesis.push(HypothesisCheck {
            name: format!("instances of {} serving after the run", job.name),
            required: job.count.to_string(),
            measured: job.serving_at_end.to_string(),
            held: job.serving_at_end == job.count,
        });
        if let Some(bound) = hypothesis_settings.job_recovery_max {
            for recovery in &job.recoveries {
                hypothesis.push(HypothesisCheck {
                    name: format!(
                        "{} serving {} again after {} of {} at {:.1} s",
                        job.name,
                        job.count,
                        recovery.kind,
                        recovery.targets.join(","),
                        recovery.start_seconds
                    ),
                    required: format!("≤ {:.1} s", bound.as_secs_f64()),
                    measured: recovery
                        .serving_again_after_seconds
                        .map_or("never".to_owned(), |seconds| format!("{seconds:.1} s")),
                    held: recovery
                        .serving_again_after_seconds
                        .is_some_and(|seconds| seconds <= bound.as_secs_f64()),
                });
            }
        }
    }
    let passed = hypothesis.iter().all(|check| check.held);
    Report {
        scenario: scenario.name.clone(),
        seed: scenario.seed,
        duration_seconds,
        operations: operation_count,
        writes_attempted,
        writes_acknowledged,
        write_success_fraction_within_deadline,
        write_latency_p99_milliseconds,
        availability,
        errors_by_kind,
        acknowledged_writes_lost,
        linearizability,
        hypothesis,
        model,
        job,
        faults,
        seconds,
        passed,
    }
}

pub fn print_table(report: &Report) {
    println!(
        "scenario {:?} (seed {}), {:.1} s, {} operations, {} of {} writes acknowledged",
        report.scenario,
        report.seed,
        report.duration_seconds,
        report.operations,
        report.writes_acknowledged,
        report.writes_attempted
    );
    println!();
    println!("faults:");
    for fault in &report.faults {
        println!(
            "  {:>6.1}–{:<6.1} s  {:<12} {}",
            fault.start_seconds,
            fault.end_seconds,
            fault.kind,
            fault.targets.join(",")
        );
    }
    println!();
    let with_job = report.job.is_some();
    println!(
        "second  availability  writes  p50 ms  p99 ms{}",
        if with_job { "  serving" } else { "" }
    );
    for second in &report.seconds {
        let milliseconds =
            |value: Option<f64>| value.map_or("-".to_owned(), |value| format!("{value:.1}"));
        let serving = if with_job {
            format!(
                "  {:>7}",
                second
                    .instances_serving_min
                    .map_or("-".to_owned(), |serving| serving.to_string())
            )
        } else {
            String::new()
        };
        println!(
            "{:>6}  {:>12.1}  {:>6}  {:>6}  {:>6}{serving}",
            second.second,
            second.availability,
            second.writes_acknowledged,
            milliseconds(second.write_latency_p50_milliseconds),
            milliseconds(second.write_latency_p99_milliseconds)
        );
    }
    if let Some(job) = &report.job {
        println!();
        println!(
            "job {} ({} instances): {} serving after the run, {} at the fewest",
            job.name, job.count, job.serving_at_end, job.fewest_serving
        );
        for recovery in &job.recoveries {
            println!(
                "  {} of {} at {:.1} s: serving {} again after {}",
                recovery.kind,
                recovery.targets.join(","),
                recovery.start_seconds,
                job.count,
                recovery
                    .serving_again_after_seconds
                    .map_or("never".to_owned(), |seconds| format!("{seconds:.1} s"))
            );
        }
    }
    println!();
    println!("errors by kind:");
    if report.errors_by_kind.is_empty() {
        println!("  none");
    }
    for (kind, count) in &report.errors_by_kind {
        println!("  {kind:<20} {count}");
    }
    if let Some(model) = &report.model {
        println!();
        println!(
            "availability, {} members (quorum {}), λ = {}/s, μ = {}/s:",
            model.members,
            model.quorum,
            model.failure_rate_per_second,
            model.repair_rate_per_second
        );
        println!(
            "  modelled (Markov, quorum of processes up)   {:.4}",
            model.modelled_availability
        );
        println!(
            "  measured, quorum of processes up            {:.4}  [95% CI {:.4}, {:.4}]",
            model.measured_process_quorum_availability,
            model.measured_process_quorum_interval.0,
            model.measured_process_quorum_interval.1
        );
        println!(
            "  measured, 100 ms windows with a write       {:.4}  [95% CI {:.4}, {:.4}]",
            model.measured_write_availability,
            model.measured_write_interval.0,
            model.measured_write_interval.1
        );
    }
    println!();
    println!("hypothesis:");
    for check in &report.hypothesis {
        println!(
            "  [{}] {}: {} (required {})",
            if check.held { "held" } else { "FAILED" },
            check.name,
            check.measured,
            check.required
        );
    }
    println!();
    println!("{}", if report.passed { "PASSED" } else { "FAILED" });
}

/// A timeline: fault spans as bands, per-second availability as bars, and p99 write
/// latency as a line, over the run's seconds. Hand-written SVG, as in keel-availability.
pub fn timeline_svg(report: &Report) -> String {
    let (width, left, top, plot_width, plot_height) = (960.0, 60.0, 40.0, 860.0, 300.0);
    let seconds = report.duration_seconds.max(1.0);
    let x = |second: f64| left + second / seconds * plot_width;
    let latency_max = report
        .seconds
        .iter()
        .filter_map(|second| second.write_latency_p99_milliseconds)
        .fold(1.0f64, f64::max);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{}" font-family="sans-serif" font-size="12">"#,
        top + plot_height + 60.0 + 14.0 * report.faults.len() as f64
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="20" font-size="15">keel chaos run: {} (seed {}) — bars: availability per second, line: p99 write latency (max {latency_max:.0} ms)</text>"#,
        report.scenario.replace('&', "&amp;").replace('<', "&lt;"),
        report.seed
    );
    for fault in &report.faults {
        let _ = writeln!(
            svg,
            r##"<rect x="{:.1}" y="{top}" width="{:.1}" height="{plot_height}" fill="#d62728" fill-opacity="0.12"/>"##,
            x(fault.start_seconds),
            (x(fault.end_seconds) - x(fault.start_seconds)).max(1.0)
        );
    }
    for second in &report.seconds {
        let height = second.availability * plot_height;
        let _ = writeln!(
            svg,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{height:.1}" fill="#1f77b4" fill-opacity="0.5"/>"##,
            x(second.second as f64),
            top + plot_height - height,
            (plot_width / seconds - 1.0).max(1.0)
        );
    }
    let points: Vec<String> = report
        .seconds
        .iter()
        .filter_map(|second| {
            second.write_latency_p99_milliseconds.map(|p99| {
                format!(
                    "{:.1},{:.1}",
                    x(second.second as f64 + 0.5),
                    top + plot_height - p99 / latency_max * plot_height
                )
            })
        })
        .collect();
    let _ = writeln!(
        svg,
        r#"<polyline fill="none" stroke="black" stroke-width="1.5" points="{}"/>"#,
        points.join(" ")
    );
    let _ = writeln!(
        svg,
        r#"<path d="M{left},{top} V{} H{}" fill="none" stroke="black"/>"#,
        top + plot_height,
        left + plot_width
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="end">{seconds:.0} s</text>"#,
        left + plot_width,
        top + plot_height + 16.0
    );
    for (index, fault) in report.faults.iter().enumerate() {
        let _ = writeln!(
            svg,
            r##"<text x="{left}" y="{:.1}" fill="#d62728">{:.1}–{:.1} s: {} on {}</text>"##,
            top + plot_height + 36.0 + 14.0 * index as f64,
            fault.start_seconds,
            fault.end_seconds,
            fault.kind,
            fault.targets.join(",")
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(kind: &str, start_seconds: f64, end_seconds: f64) -> FaultSpan {
        FaultSpan {
            kind: kind.to_owned(),
            targets: vec!["node1".to_owned()],
            start_seconds,
            end_seconds,
            on_nodes: true,
        }
    }

    #[test]
    fn a_recovery_lasts_until_the_count_serves_for_good() {
        let samples: Vec<(f64, usize)> = vec![
            (0.0, 3),
            (1.0, 3),
            (2.0, 2),
            (3.0, 3),
            (4.0, 2),
            (5.0, 3),
            (6.0, 3),
            (7.0, 3),
            (8.0, 3),
            (9.0, 2),
        ];
        let faults = vec![span("kill", 1.5, 4.5), span("pause", 6.5, 7.0)];
        let found = recoveries(&faults, &samples, 3);
        // Below at 2.0 and again at 4.0: serving for good from 5.0.
        assert_eq!(found[0].serving_again_after_seconds, Some(3.5));
        // Never below after the pause until 9.0, where it stays below: never back.
        assert_eq!(found[1].serving_again_after_seconds, None);
        let found = recoveries(&faults, &samples[..9], 3);
        assert_eq!(found[1].serving_again_after_seconds, Some(0.0));
        // Member faults are not the job's.
        let mut member_fault = span("kill", 0.0, 1.0);
        member_fault.on_nodes = false;
        assert!(recoveries(&[member_fault], &samples, 3).is_empty());
    }
}
