//! `keel events`: the cluster's events log through an agent's HTTP API
//! (`--agent-addr`, as `keel service`): the retained events, filtered by
//! type (`--type node --type leader.elected`) and age (`--since 10m`), and
//! with `--follow` every new one as it is recorded (server-sent events from
//! `/v1/events/stream`).

use anyhow::Context;
use keel_agent::api_client::ApiClient;
use keel_agent::events::{Event, EventType};

/// `keel events`.
#[derive(Debug, clap::Args)]
pub struct Arguments {
    /// The agent's HTTP address (host:port).
    #[arg(long, env = "KEEL_AGENT_ADDR", default_value = "127.0.0.1:8500")]
    agent_addr: String,
    /// Keep printing new events as they are recorded (until Ctrl-C).
    #[arg(short, long)]
    follow: bool,
    /// Only events of this type or family (`node.down`, `node`, `allocation`); repeatable.
    #[arg(long = "type", value_name = "TYPE")]
    types: Vec<String>,
    /// Only events recorded within this long (`90s`, `10m`, `2h`).
    #[arg(long)]
    since: Option<String>,
    /// At most this many past events (the newest).
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    /// Output format: table, or json (one event per line).
    #[arg(short = 'o', long, default_value = "table")]
    output: String,
}

pub async fn run(arguments: Arguments) -> anyhow::Result<()> {
    let json = match arguments.output.as_str() {
        "json" => true,
        "table" => false,
        other => anyhow::bail!("-o: {other:?} is not table or json"),
    };
    for filter in &arguments.types {
        anyhow::ensure!(
            EventType::ALL.iter().any(|kind| kind.matches(filter)),
            "--type: {filter:?} is no event type or family (one of: {})",
            EventType::ALL.map(EventType::as_str).join(", ")
        );
    }
    let mut query = vec![format!("limit={}", arguments.limit)];
    for filter in &arguments.types {
        query.push(format!("type={}", encode(filter)));
    }
    if let Some(since) = &arguments.since {
        query.push(format!("since={}", encode(since)));
    }
    let query = query.join("&");
    let client = ApiClient::new(&arguments.agent_addr);
    if !json {
        println!(
            "{:<23}  {:<22}  {:<16}  MESSAGE",
            "TIME (UTC)", "TYPE", "SUBJECT"
        );
    }
    if !arguments.follow {
        let answer = client.get(&format!("/v1/events?{query}")).await?;
        let events: Vec<Event> =
            serde_json::from_value(answer).context("the agent's events are not valid")?;
        for event in &events {
            print_event(event, json)?;
        }
        return Ok(());
    }
    let mut stream = client
        .stream_lines(&format!("/v1/events/stream?{query}"))
        .await?;
    let mut kind = String::new();
    while let Some(line) = stream.next_line().await? {
        if let Some(name) = line.strip_prefix("event:") {
            kind = name.trim().to_string();
        } else if let Some(data) = line.strip_prefix("data:") {
            let data = data.strip_prefix(' ').unwrap_or(data);
            if kind.is_empty() || kind == "message" {
                let event: Event = serde_json::from_str(data).with_context(|| {
                    format!("the agent sent an event that is not valid: {data}")
                })?;
                print_event(&event, json)?;
            } else {
                eprintln!("{kind}: {data}");
            }
        } else if line.is_empty() {
            kind.clear();
        }
    }
    anyhow::bail!(
        "the agent at {} closed the event stream",
        arguments.agent_addr
    )
}

fn print_event(event: &Event, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(event)?);
    } else {
        println!(
            "{:<23}  {:<22}  {:<16}  {}",
            utc_time(event.time_unix_ms),
            event.kind.as_str(),
            event.subject,
            event.message
        );
    }
    Ok(())
}

/// Percent-encodes a query value.
fn encode(text: &str) -> String {
    let mut encoded = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// `YYYY-MM-DD HH:MM:SS.mmm` in UTC (the civil-from-days conversion of
/// Howard Hinnant's date algorithms).
fn utc_time(unix_ms: u64) -> String {
    let seconds = unix_ms / 1000;
    let days = (seconds / 86_400) as i64;
    let second_of_day = seconds % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60,
        unix_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times_are_civil_dates() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00.000");
        // 2026-12-02T07:00:11.250Z
        assert_eq!(utc_time(1_796_194_811_250), "2026-12-02 07:00:11.250");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29 00:00:00.000");
    }
}
