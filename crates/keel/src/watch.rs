//! `keel watch` (being written).

/// Options of `keel watch`.
#[derive(Debug, clap::Args)]
pub struct WatchArguments {
    /// The key (or prefix, with --prefix) to watch.
    key: String,
}

/// Runs `keel watch`.
pub async fn run(arguments: WatchArguments) -> anyhow::Result<()> {
    anyhow::bail!("keel watch {} is not written yet", arguments.key)
}
