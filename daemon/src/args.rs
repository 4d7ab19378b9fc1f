//! The command line, parsed by clap, its errors on one line.

use std::ffi::OsString;

use clap::error::ErrorKind;

/// Parses the process's arguments (and the environment variables clap reads)
/// into `C`.
///
/// `--help` and `--version` print on stdout and exit 0, as clap does. Any
/// other problem (an unknown flag, a bad value in a flag or its environment
/// variable, a missing argument or subcommand) is one line on stderr naming
/// the `--help` to read, e.g. `error: unexpected argument '--bogus' found
/// (see 'edgefleet-agent serve --help')`, and clap's exit code for usage
/// errors, 2. Clap's own report is several lines (error, usage, hint), which
/// a log collector splits into unrelated records.
pub fn parse_args<C: clap::Parser>() -> C {
    let args: Vec<OsString> = std::env::args_os().collect();
    match C::try_parse_from(&args) {
        Ok(parsed) => parsed,
        Err(err)
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) =>
        {
            err.exit()
        }
        Err(err) => {
            crate::report(format_args!("{}", error_line(&C::command(), &err, &args)));
            std::process::exit(err.exit_code());
        }
    }
}

/// `err`, from parsing `args` for `command`, on one line: its message and
/// notes (possible values, a similar flag) without clap's usage and hint,
/// then the `--help` of the subcommand the arguments got to.
pub fn error_line(command: &clap::Command, err: &clap::Error, args: &[OsString]) -> String {
    // The subcommands named before the error, from a lenient parse.
    let mut path = vec![command.get_name()];
    let mut current = command;
    if let Ok(matches) = command
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(args)
    {
        let mut matches = &matches;
        while let Some((name, sub_matches)) = matches.subcommand() {
            let Some(sub) = current.find_subcommand(name) else {
                break;
            };
            path.push(sub.get_name());
            current = sub;
            matches = sub_matches;
        }
    }
    let path = path.join(" ");
    let message = if err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        // Clap prints the whole help (on stderr) for a missing subcommand:
        // name the subcommands instead.
        let names: Vec<&str> = current
            .get_subcommands()
            .filter(|sub| !sub.is_hide_set())
            .map(|sub| sub.get_name())
            .collect();
        format!(
            "error: '{path}' requires a subcommand but one was not provided [subcommands: {}]",
            names.join(", ")
        )
    } else {
        // Sections are separated by blank lines; the usage and the hint come last.
        let rendered = err.render().to_string();
        let sections: Vec<String> = rendered
            .split("\n\n")
            .map(|section| {
                section
                    .lines()
                    .map(str::trim)
                    .filter(|line| !line.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .filter(|section| !section.is_empty())
            .take_while(|section| {
                !section.starts_with("Usage:") && !section.starts_with("For more information")
            })
            .collect();
        if sections.is_empty() {
            "error: invalid arguments".to_string()
        } else {
            sections.join("; ")
        }
    };
    format!("{message} (see '{path} --help')")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser, Subcommand};

    #[derive(Debug, Parser)]
    #[command(name = "tool", version)]
    struct Cli {
        #[arg(long, global = true, value_enum)]
        output: Option<Output>,
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Debug, Clone, Copy, clap::ValueEnum)]
    enum Output {
        Table,
        Json,
    }

    #[derive(Debug, Subcommand)]
    enum Command {
        Serve {
            #[arg(long)]
            port: Option<u16>,
            #[arg(long)]
            force: bool,
        },
        #[command(subcommand)]
        Devices(Devices),
        #[command(hide = true)]
        Hidden,
    }

    #[derive(Debug, Subcommand)]
    enum Devices {
        List,
        Get { id: String },
    }

    fn line(args: &[&str]) -> String {
        let args: Vec<OsString> = std::iter::once("/some/where/tool")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        let err = Cli::try_parse_from(&args).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{args:?}");
        error_line(&Cli::command(), &err, &args)
    }

    #[test]
    fn argument_errors_are_one_line_naming_the_subcommands_help() {
        let cases = [
            (
                &["serve", "--bogus"][..],
                "error: unexpected argument '--bogus' found (see 'tool serve --help')",
            ),
            (
                &["serve", "--forc"],
                "error: unexpected argument '--forc' found; tip: a similar argument exists: '--force' (see 'tool serve --help')",
            ),
            (
                &["serve", "--port", "x"],
                "error: invalid value 'x' for '--port <PORT>': invalid digit found in string (see 'tool serve --help')",
            ),
            (
                &["--output", "xml", "devices", "list"],
                "error: invalid value 'xml' for '--output <OUTPUT>' [possible values: table, json] (see 'tool devices list --help')",
            ),
            (
                &["devices", "get"],
                "error: the following required arguments were not provided: <ID> (see 'tool devices get --help')",
            ),
            (
                &["devices"],
                "error: 'tool devices' requires a subcommand but one was not provided [subcommands: list, get] (see 'tool devices --help')",
            ),
            (
                &[],
                "error: 'tool' requires a subcommand but one was not provided [subcommands: serve, devices] (see 'tool --help')",
            ),
            (
                &["bogus"],
                "error: unrecognized subcommand 'bogus' (see 'tool --help')",
            ),
        ];
        for (args, expected) in cases {
            assert_eq!(line(args), expected, "{args:?}");
        }
    }
}
