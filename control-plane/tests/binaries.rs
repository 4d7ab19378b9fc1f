//! What every binary promises on its command line (/work/shared/design.md):
//! its own environment variables, and bad arguments reported on one line.
//! Runs the real `edgefleet-agent`, `edgefleet-server` and `edgefleet`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Output};

use support::binary;

/// Runs `name` with `args`, outside any environment that would configure it.
fn run(name: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(binary(name));
    command.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("EDGEFLEET_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    // No user config file for the CLI.
    command.env("XDG_CONFIG_HOME", "/nonexistent");
    command.output().unwrap()
}

/// The long help of `name` and each of its (visible) subcommands, by path.
fn helps(name: &str) -> BTreeMap<String, String> {
    let mut helps = BTreeMap::new();
    let mut pending = vec![Vec::<String>::new()];
    while let Some(path) = pending.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let output = run(name, &args, &[]);
        assert!(output.status.success(), "{name} {args:?}: {output:?}");
        let text = String::from_utf8(output.stdout).unwrap();
        // "Commands:" then one "  NAME  description" line each (a long
        // description continues on more indented lines) up to a blank line.
        let commands = text
            .lines()
            .skip_while(|line| *line != "Commands:")
            .skip(1)
            .take_while(|line| !line.trim().is_empty());
        for line in commands {
            let Some(sub) = line.strip_prefix("  ") else {
                continue;
            };
            if let Some(sub) = sub.split_whitespace().next()
                && !sub.starts_with('-')
                && !line.starts_with("   ")
                && sub != "help"
            {
                let mut sub_path = path.clone();
                sub_path.push(sub.to_string());
                pending.push(sub_path);
            }
        }
        helps.insert(
            format!("{name} {}", path.join(" ")).trim().to_string(),
            text,
        );
    }
    helps
}

/// The `[env: NAME=]` (or `[env: NAME]`, value hidden) names in a help,
/// each with the long flag whose description holds it.
fn env_names(help: &str) -> Vec<(String, String)> {
    // One block per option: its "  -h, --help" or "      --grpc-addr <ADDR>"
    // line and the description after it (on the same line or more indented
    // ones, a tag possibly wrapped over two), up to the next option or section.
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if indent <= 6 && trimmed.starts_with('-') {
            // `--compress-http-answers[=<BOOL>]`: an optional value.
            let flag = trimmed
                .split([' ', ',', '['])
                .find_map(|word| word.strip_prefix("--"))
                .unwrap_or_default();
            blocks.push((flag.to_string(), String::new()));
        } else if indent == 0 && !trimmed.is_empty() {
            blocks.push((String::new(), String::new()));
        }
        if let Some((_, text)) = blocks.last_mut() {
            text.push(' ');
            text.push_str(trimmed);
        }
    }
    let mut names = Vec::new();
    for (flag, text) in blocks {
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for tag in text.split("[env: ").skip(1) {
            let name = tag.split(['=', ']']).next().unwrap().to_string();
            assert!(!flag.is_empty(), "{name} belongs to no flag: {help}");
            names.push((flag.clone(), name));
        }
    }
    names
}

/// Each binary reads its own environment variables: the agent's are all
/// `EDGEFLEET_AGENT_<FLAG>`, the server's `EDGEFLEET_SERVER_<FLAG>`, the
/// operator CLI's short names of neither namespace; none (but the log
/// filter) is read by two binaries, so configuring one never reconfigures
/// another on the same host.
#[test]
fn every_binary_reads_environment_variables_of_its_own() {
    let mut read_by: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for (binary, prefix, a_subcommand) in [
        (
            "edgefleet-agent",
            Some("EDGEFLEET_AGENT_"),
            "edgefleet-agent run",
        ),
        (
            "edgefleet-server",
            Some("EDGEFLEET_SERVER_"),
            "edgefleet-server serve",
        ),
        ("edgefleet", None, "edgefleet rollouts create"),
    ] {
        let helps = helps(binary);
        assert!(helps.contains_key(a_subcommand), "{:?}", helps.keys());
        let mut count = 0;
        for (command, help) in &helps {
            for (flag, name) in env_names(help) {
                count += 1;
                if name == "EDGEFLEET_LOG" {
                    continue;
                }
                match prefix {
                    Some(prefix) => {
                        let expected = format!("{prefix}{}", flag.to_uppercase().replace('-', "_"));
                        assert_eq!(name, expected, "{command} --{flag}");
                    }
                    None => assert!(
                        name.starts_with("EDGEFLEET_")
                            && !name.starts_with("EDGEFLEET_AGENT_")
                            && !name.starts_with("EDGEFLEET_SERVER_"),
                        "{command} --{flag}: {name}"
                    ),
                }
                read_by.entry(name).or_default().insert(binary);
            }
        }
        assert!(
            count >= 3,
            "{binary}: no environment variables found in {helps:?}"
        );
    }
    let shared: Vec<_> = read_by
        .iter()
        .filter(|(_, binaries)| binaries.len() > 1)
        .collect();
    assert!(
        shared.is_empty(),
        "read by more than one binary: {shared:?}"
    );
    // The operator CLI's names.
    for name in [
        "EDGEFLEET_SERVER",
        "EDGEFLEET_TOKEN",
        "EDGEFLEET_CA_CERT",
        "EDGEFLEET_OUTPUT",
        "EDGEFLEET_CONFIG",
    ] {
        assert_eq!(
            read_by
                .get(name)
                .map(|b| b.iter().copied().collect::<Vec<_>>()),
            Some(vec!["edgefleet"]),
            "{name}"
        );
    }
}

/// A bad flag or value (on the command line or in an environment variable),
/// or a missing subcommand: one line on stderr naming the `--help` to read,
/// exit code 2, nothing on stdout.
#[test]
fn bad_arguments_are_one_line_and_exit_code_2() {
    // Binary, arguments, environment, the line expected.
    type Case<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (
            "edgefleet-agent",
            &["serve", "--bogus"],
            &[],
            "error: unexpected argument '--bogus' found (see 'edgefleet-agent serve --help')",
        ),
        (
            "edgefleet-agent",
            &["serve", "--grpc-addr", "nowhere"],
            &[],
            "error: invalid value 'nowhere' for '--grpc-addr <ADDR>': invalid socket address syntax (see 'edgefleet-agent serve --help')",
        ),
        (
            "edgefleet-agent",
            &["run"],
            &[("EDGEFLEET_AGENT_TELEMETRY_INTERVAL", "soon")],
            "error: invalid value 'soon' for '--telemetry-interval <DURATION>': expected number at 0 (see 'edgefleet-agent run --help')",
        ),
        (
            "edgefleet-agent",
            &[],
            &[],
            "error: 'edgefleet-agent' requires a subcommand but one was not provided [subcommands: serve, enroll, run] (see 'edgefleet-agent --help')",
        ),
        (
            "edgefleet-server",
            &["serve", "--bogus"],
            &[],
            "error: unexpected argument '--bogus' found (see 'edgefleet-server serve --help')",
        ),
        (
            "edgefleet-server",
            &["serve", "--max-model-bytes", "lots"],
            &[],
            "error: invalid value 'lots' for '--max-model-bytes <BYTES>': invalid digit found in string (see 'edgefleet-server serve --help')",
        ),
        (
            "edgefleet",
            &["devices", "list", "--bogus"],
            &[],
            "error: unexpected argument '--bogus' found (see 'edgefleet devices list --help')",
        ),
        (
            "edgefleet",
            &["--output", "xml", "devices", "list"],
            &[],
            "error: invalid value 'xml' for '--output <OUTPUT>' [possible values: table, json] (see 'edgefleet devices list --help')",
        ),
        (
            "edgefleet",
            &["devices"],
            &[],
            "error: 'edgefleet devices' requires a subcommand but one was not provided [subcommands: list, get, revoke, label] (see 'edgefleet devices --help')",
        ),
    ];
    for (binary, args, env, expected) in cases {
        let output = run(binary, args, env);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{binary} {args:?}: {stderr}");
        assert_eq!(stderr, format!("{expected}\n"), "{binary} {args:?}");
        assert!(output.stdout.is_empty(), "{binary} {args:?}");
    }
}

/// `--help` and `--version` are clap's: on stdout, exit 0.
#[test]
fn help_and_version_print_on_stdout_and_exit_0() {
    for binary in ["edgefleet-agent", "edgefleet-server", "edgefleet"] {
        let output = run(binary, &["--version"], &[]);
        assert!(output.status.success(), "{binary}: {output:?}");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            format!("{binary} {}\n", env!("CARGO_PKG_VERSION"))
        );
        assert!(output.stderr.is_empty(), "{binary}");
        let output = run(binary, &["--help"], &[]);
        assert!(output.status.success(), "{binary}: {output:?}");
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("Usage:"),
            "{binary}"
        );
        assert!(output.stderr.is_empty(), "{binary}");
    }
}

/// The operator CLI against a real server: its token and output format
/// from its config file, the environment over the file, flags over both.
#[test]
fn the_cli_config_file_gives_way_to_the_environment_and_flags() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let server = support::Server::start(&dir.path().join("server"), None, &[]);
    let token = server.admin_token();
    let config = dir.path().join("edgefleet.toml");
    std::fs::write(
        &config,
        format!(
            "server = \"{}\"\nca_cert = \"{}\"\ntoken = \"{token}\"\noutput = \"json\"\n",
            server.api_url,
            server.ca_cert().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = config.to_str().unwrap();
    let devices = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = vec!["--config", config];
        all.extend(args);
        all.extend(["devices", "list"]);
        run("edgefleet", &all, env)
    };
    let is_json = |output: &Output| {
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice::<serde_json::Value>(&output.stdout).is_ok()
    };
    assert!(is_json(&devices(&[], &[])));
    assert!(!is_json(&devices(&[], &[("EDGEFLEET_OUTPUT", "table")])));
    assert!(is_json(&devices(
        &["--output", "json"],
        &[("EDGEFLEET_OUTPUT", "table")]
    )));
    let bad_token = devices(&[], &[("EDGEFLEET_TOKEN", "efo_nope")]);
    assert!(!bad_token.status.success());
    assert!(
        String::from_utf8_lossy(&bad_token.stderr).contains("not authorized"),
        "{bad_token:?}"
    );
    assert!(is_json(&devices(
        &["--token", &token],
        &[("EDGEFLEET_TOKEN", "efo_nope")]
    )));
}
