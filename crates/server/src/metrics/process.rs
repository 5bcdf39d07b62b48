//! The standard `process_*` metrics every Prometheus client library exports
//! (resident memory, CPU time, open file descriptors, start time),
//! read from the operating system at scrape time with `sysinfo`.

use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// Reads this process's figures on each scrape.
#[derive(Debug)]
pub struct ProcessCollector {
    pid: Pid,
    /// sysinfo keeps per-process state between refreshes; one scrape at a time.
    system: Mutex<System>,
}

impl ProcessCollector {
    /// A collector for the running process.
    pub fn new() -> ProcessCollector {
        ProcessCollector {
            pid: Pid::from_u32(std::process::id()),
            system: Mutex::new(System::new()),
        }
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        ProcessCollector::new()
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    let metric_encoder = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
    gauge.encode(metric_encoder)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut system = self.system.lock().expect("not poisoned");
        system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[self.pid]),
            true,
            ProcessRefreshKind::nothing().with_memory().with_cpu(),
        );
        let Some(process) = system.process(self.pid) else {
            // Not readable (no /proc): export nothing rather than zeros.
            return Ok(());
        };
        let cpu = ConstCounter::new(process.accumulated_cpu_time() as f64 / 1000.0);
        let metric_encoder = encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            cpu.metric_type(),
        )?;
        cpu.encode(metric_encoder)?;
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            process.memory() as f64,
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            process.virtual_memory() as f64,
        )?;
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            process.start_time() as f64,
        )?;
        if let Some(open) = process.open_files() {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors.",
                open as f64,
            )?;
        }
        if let Some(limit) = process.open_files_limit() {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors.",
                limit as f64,
            )?;
        }
        Ok(())
    }
}
