//! Routes raft-rs's `slog` records into `tracing`, so a member has one log
//! stream. Formatting happens only when tracing wants the record: raft-rs logs
//! whole messages at debug level on every step, and formatting one that carries
//! a large snapshot took the member loop seconds (found by the 100 MB learner
//! test, where it cost the leader its leadership).

use slog::{Drain, Level, OwnedKVList, Record};

/// A `slog` drain that re-emits each record as a `tracing` event.
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingDrain;

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, _values: &OwnedKVList) -> Result<(), slog::Never> {
        let wanted = match record.level() {
            Level::Critical | Level::Error => {
                tracing::enabled!(target: "raft", tracing::Level::ERROR)
            }
            Level::Warning => tracing::enabled!(target: "raft", tracing::Level::WARN),
            Level::Info => tracing::enabled!(target: "raft", tracing::Level::INFO),
            Level::Debug => tracing::enabled!(target: "raft", tracing::Level::DEBUG),
            Level::Trace => tracing::enabled!(target: "raft", tracing::Level::TRACE),
        };
        if !wanted {
            return Ok(());
        }
        let mut fields = String::new();
        let mut serializer = FieldCollector(&mut fields);
        // Key-values attached to the record itself (raft-rs puts the useful
        // detail there: term, index, from, to).
        let _ = slog::KV::serialize(&record.kv(), record, &mut serializer);
        match record.level() {
            Level::Critical | Level::Error => {
                tracing::error!(target: "raft", "{}{}", record.msg(), fields)
            }
            Level::Warning => tracing::warn!(target: "raft", "{}{}", record.msg(), fields),
            Level::Info => tracing::info!(target: "raft", "{}{}", record.msg(), fields),
            Level::Debug => tracing::debug!(target: "raft", "{}{}", record.msg(), fields),
            Level::Trace => tracing::trace!(target: "raft", "{}{}", record.msg(), fields),
        }
        Ok(())
    }
}

struct FieldCollector<'a>(&'a mut String);

impl slog::Serializer for FieldCollector<'_> {
    fn emit_arguments(&mut self, key: slog::Key, value: &std::fmt::Arguments<'_>) -> slog::Result {
        use std::fmt::Write;
        let _ = write!(self.0, " {key}={value}");
        Ok(())
    }
}

/// A logger for raft-rs that forwards to `tracing`, tagged with the member id.
pub fn raft_logger(member_id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!("member" => member_id))
}
