//! Operations commands (being written): `keel status`, `keel member …`,
//! `keel snapshot …`, `keel defrag`, `keel alarm …`, `keel move-leader`.

/// Arguments of one operations command, parsed once the commands are written.
#[derive(Debug, clap::Args)]
pub struct Arguments {
    /// Arguments.
    rest: Vec<String>,
}

/// Runs an operations command.
pub async fn run(command: &str, arguments: Arguments) -> anyhow::Result<()> {
    anyhow::bail!("keel {command} is not written yet: {:?}", arguments.rest)
}
