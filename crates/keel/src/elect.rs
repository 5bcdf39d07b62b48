//! `keel elect` (being written).

/// Options of this command.
#[derive(Debug, clap::Args)]
pub struct Arguments {
    /// Arguments, parsed once the command is written.
    rest: Vec<String>,
}

/// Runs the command.
pub async fn run(arguments: Arguments) -> anyhow::Result<()> {
    anyhow::bail!("not written yet: {:?}", arguments.rest)
}
