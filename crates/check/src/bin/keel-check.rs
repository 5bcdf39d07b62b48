//! `keel-check`: re-checks a key-value history dumped as JSON by a test.
//!
//! Multi-process fault tests write their histories with `History::write_json`; this tool runs
//! every checker on such a file later, for example after changing the checker or to read a
//! failure's explanation at leisure. Arguments are parsed by hand because the crate keeps its
//! dependencies to serde and thiserror.

use std::fs::File;
use std::io::{self, BufReader};
use std::process::ExitCode;
use std::time::Duration;

use keel_check::{check_history, CheckOptions, History, KeyValueModel, OPERATIONS_MAX_DEFAULT};

const USAGE: &str = "\
usage: keel-check [--global] [--timeout-seconds N] [--operations-max N] HISTORY.json

Checks a recorded key-value history (\"-\" reads standard input): linearizability with the
per-key model (or, with --global, the whole-history model that checks exact revisions and needs
every write in the history), revision invariants and serializable reads.

Exit status: 0 all checks passed, 1 a violation was found, 2 the search was undecided (time or
cache limit), 3 bad arguments or an unreadable history.";

/// The exit status when a violation is found.
const EXIT_VIOLATION: u8 = 1;
/// The exit status when the search was undecided.
const EXIT_UNDECIDED: u8 = 2;
/// The exit status for bad arguments or an unreadable history.
const EXIT_USAGE: u8 = 3;

struct Arguments {
    model: KeyValueModel,
    options: CheckOptions,
    path: String,
}

fn parse_arguments(mut arguments: impl Iterator<Item = String>) -> Result<Arguments, String> {
    let mut model = KeyValueModel::per_key();
    let mut options = CheckOptions {
        operations_max: OPERATIONS_MAX_DEFAULT,
        ..CheckOptions::default()
    };
    let mut path = None;
    while let Some(argument) = arguments.next() {
        let mut number = |name: &str| -> Result<u64, String> {
            let text = arguments
                .next()
                .ok_or_else(|| format!("{name} needs a number"))?;
            text.parse()
                .map_err(|_| format!("{name} needs a number, not {text:?}"))
        };
        match argument.as_str() {
            "--global" => model = KeyValueModel::global(),
            "--timeout-seconds" => {
                options.timeout = Duration::from_secs(number("--timeout-seconds")?)
            }
            "--operations-max" => {
                let operations_max = number("--operations-max")?;
                options.operations_max = usize::try_from(operations_max)
                    .map_err(|_| format!("--operations-max {operations_max} is too large"))?;
            }
            "-h" | "--help" => return Err(String::new()),
            _ if path.is_none() && (argument == "-" || !argument.starts_with('-')) => {
                path = Some(argument)
            }
            _ => return Err(format!("unexpected argument {argument:?}")),
        }
    }
    let path = path.ok_or_else(|| "missing HISTORY.json".to_string())?;
    Ok(Arguments {
        model,
        options,
        path,
    })
}

fn read_history(arguments: &Arguments) -> Result<History, String> {
    let history = if arguments.path == "-" {
        History::read_json(io::stdin().lock(), arguments.options.operations_max)
    } else {
        let file = File::open(&arguments.path)
            .map_err(|error| format!("cannot open {}: {error}", arguments.path))?;
        History::read_json(BufReader::new(file), arguments.options.operations_max)
    };
    history.map_err(|error| format!("{}: {error}", arguments.path))
}

fn main() -> ExitCode {
    let arguments = match parse_arguments(std::env::args().skip(1)) {
        Ok(arguments) => arguments,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("keel-check: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let report = read_history(&arguments).and_then(|history| {
        check_history(&history.operations, &arguments.model, &arguments.options)
            .map_err(|error| format!("{}: {error}", arguments.path))
    });
    match report {
        Ok(report) => {
            println!("{report}");
            if report.has_violation() {
                ExitCode::from(EXIT_VIOLATION)
            } else if !report.is_ok() {
                ExitCode::from(EXIT_UNDECIDED)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(message) => {
            eprintln!("keel-check: {message}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}
