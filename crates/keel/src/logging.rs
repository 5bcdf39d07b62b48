//! Logging for keel's long-running commands (`keel server`, `keel dev`, and
//! the agent): `--log-level` and `--log-format text|json`, one line per event
//! on stderr. JSON lines are flat (`{"timestamp":…,"level":…,"message":…,
//! "member":…,"term":…}`) so that log shippers index the fields as they do
//! etcd's zap lines.

use anyhow::Context;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured only on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// The logging flags every long-running command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArguments {
    /// Log level: error, warn, info, debug or trace (or a tracing filter such
    /// as `info,keel_server::transport=debug`). RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl LogArguments {
    /// The flags to give a child process so that it logs the same way.
    pub fn to_flags(&self) -> Vec<String> {
        let format = match self.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        vec![
            "--log-level".into(),
            self.log_level.clone(),
            "--log-format".into(),
            format.into(),
        ]
    }
}

/// Installs the global subscriber; call once, first thing in the command.
pub fn init(arguments: &LogArguments) -> anyhow::Result<()> {
    // raft-rs, h2 and friends are chatty at info; what they say that matters
    // reaches us as warnings or through keel's own lines.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| {
            tracing_subscriber::EnvFilter::try_new(format!(
                "{},raft=warn,h2=warn,tower=warn,hyper=warn",
                arguments.log_level
            ))
        })
        .with_context(|| format!("--log-level {:?}", arguments.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match arguments.log_format {
        LogFormat::Text => builder
            // Colour codes only for a person watching; a log file stays greppable.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    result.map_err(|error| anyhow::anyhow!("installing the logger: {error}"))
}
