//! The CLI's own behaviour without a server: help, bad arguments, its
//! config file, clear errors and non-zero exits.

use std::path::Path;
use std::process::Command;

/// The CLI with no settings from the environment and no config file.
fn command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edgefleet"));
    for name in [
        "EDGEFLEET_SERVER",
        "EDGEFLEET_TOKEN",
        "EDGEFLEET_CA_CERT",
        "EDGEFLEET_OUTPUT",
        "EDGEFLEET_CONFIG",
    ] {
        command.env_remove(name);
    }
    command
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .env("HOME", "/nonexistent");
    command
}

fn edgefleet(args: &[&str]) -> std::process::Output {
    command().args(args).output().unwrap()
}

#[test]
fn help_lists_the_commands() {
    let output = edgefleet(&["--help"]);
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    for command in ["join-token", "devices", "models", "rollouts"] {
        assert!(text.contains(command), "{text}");
    }
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let output = edgefleet(&["join-token", "create", "--expires", "soon", "--token", "t"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--expires"));

    let output = edgefleet(&["join-token", "create", "--uses", "0", "--token", "t"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--uses"));

    let output = edgefleet(&["devices", "list", "--server", "ftp://x", "--token", "t"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid server URL"));

    let output = edgefleet(&[
        "devices",
        "list",
        "--server",
        "https://127.0.0.1:1",
        "--token",
        "t",
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--ca-cert"));
}

/// The operator token never goes in plaintext off this machine: http:// is
/// refused for any host but a loopback one (where the server listens
/// without TLS), before anything is sent.
#[test]
fn plaintext_is_refused_for_a_server_off_this_machine() {
    for server in [
        "http://192.0.2.1:7444",
        "http://fleet.example:7444",
        "http://[2001:db8::1]:7444",
    ] {
        let output = edgefleet(&["devices", "list", "--server", server, "--token", "t"]);
        assert!(!output.status.success(), "{server}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("refusing to send the operator token in plaintext"),
            "{server}: {stderr}"
        );
    }
    // Loopback is allowed: it fails only because nothing listens there.
    for server in [
        "http://127.0.0.1:1",
        "http://localhost:1",
        "http://LOCALHOST.:1",
        "http://[::1]:1",
        "http://[::ffff:127.0.0.1]:1",
    ] {
        let output = edgefleet(&["devices", "list", "--server", server, "--token", "t"]);
        assert!(!output.status.success(), "{server}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("plaintext"), "{server}: {stderr}");
        assert!(stderr.contains("cannot connect"), "{server}: {stderr}");
    }
}

/// Writes a config file with this mode, creating its directory.
fn write_config(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The single line the CLI printed on stderr, after a failure.
fn error_line(output: &std::process::Output) -> String {
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr
}

/// An error is one line that names each of its causes once: hyper calls a
/// refused connection "tcp connect error" at two levels of its chain, which
/// the line says once.
#[test]
fn a_refused_connection_names_each_cause_once() {
    let output = command()
        .args([
            "--server",
            "http://127.0.0.1:1",
            "--token",
            "t",
            "devices",
            "list",
        ])
        .output()
        .unwrap();
    let line = error_line(&output);
    let line = line.trim_end();
    assert!(
        line.starts_with("edgefleet: cannot connect to http://127.0.0.1:1: "),
        "{line}"
    );
    assert!(line.contains("Connection refused"), "{line}");
    let causes: Vec<&str> = line.split(": ").collect();
    for (i, cause) in causes.iter().enumerate() {
        assert!(
            !causes[i + 1..].contains(cause),
            "{cause:?} twice in {line}"
        );
    }
}

/// Settings come from flags, then the environment, then the config file
/// (`$XDG_CONFIG_HOME/edgefleet/config.toml`, else
/// `~/.config/edgefleet/config.toml`, or the one `--config` or
/// `EDGEFLEET_CONFIG` names), then defaults. Which server the CLI tries to
/// reach (nothing listens there) shows where its setting came from.
#[test]
fn settings_come_from_flags_then_environment_then_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let xdg = dir.path().join("xdg");
    let named = dir.path().join("named.toml");
    write_config(
        &home.join(".config/edgefleet/config.toml"),
        "server = \"http://127.0.0.1:1\"\ntoken = \"from-home\"\n",
        0o600,
    );
    write_config(
        &xdg.join("edgefleet/config.toml"),
        "server = \"http://127.0.0.1:2\"\ntoken = \"from-xdg\"\n",
        0o600,
    );
    write_config(&named, "server = \"http://127.0.0.1:3\"\n", 0o644);
    let reaches = |args: &[&str], env: &[(&str, &Path)]| -> String {
        let mut command = command();
        command.env("HOME", &home).env_remove("XDG_CONFIG_HOME");
        command.envs(env.iter().copied());
        let output = command
            .args(args)
            .args(["join-token", "create"])
            .output()
            .unwrap();
        let stderr = error_line(&output);
        let start = stderr
            .find("cannot connect to ")
            .unwrap_or_else(|| panic!("{args:?} {env:?}: {stderr}"));
        stderr[start + "cannot connect to ".len()..]
            .split(':')
            .take(3)
            .collect::<Vec<_>>()
            .join(":")
    };
    // The file's token was taken too: without one, the CLI stops before connecting.
    assert_eq!(reaches(&[], &[]), "http://127.0.0.1:1");
    assert_eq!(
        reaches(&[], &[("XDG_CONFIG_HOME", &xdg)]),
        "http://127.0.0.1:2"
    );
    let server_env = Path::new("http://127.0.0.1:4");
    assert_eq!(
        reaches(&[], &[("EDGEFLEET_SERVER", server_env)]),
        "http://127.0.0.1:4"
    );
    assert_eq!(
        reaches(
            &["--server", "http://127.0.0.1:5"],
            &[("EDGEFLEET_SERVER", server_env)]
        ),
        "http://127.0.0.1:5"
    );
    // A named file replaces the default one (its token with it).
    let named_arg = named.to_str().unwrap();
    let output = command()
        .env("HOME", &home)
        .args(["--config", named_arg, "join-token", "create"])
        .output()
        .unwrap();
    assert!(error_line(&output).contains("--token"), "{output:?}");
    assert_eq!(
        reaches(&["--config", named_arg, "--token", "t"], &[]),
        "http://127.0.0.1:3"
    );
    assert_eq!(
        reaches(&["--token", "t"], &[("EDGEFLEET_CONFIG", &named)]),
        "http://127.0.0.1:3"
    );
    // Without any file: the default server, over TLS.
    let output = command()
        .args(["--token", "t", "join-token", "create"])
        .output()
        .unwrap();
    assert!(
        error_line(&output).contains(
            "--ca-cert (or EDGEFLEET_CA_CERT, or ca_cert in the config file) is required to trust https://127.0.0.1:7444"
        ),
        "{output:?}"
    );
}

/// A relative `ca_cert` in the file is relative to the file.
#[test]
fn a_relative_ca_cert_in_the_config_file_is_next_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    write_config(
        &config,
        "server = \"https://127.0.0.1:1\"\nca_cert = \"fleet-ca.crt\"\noutput = \"json\"\n",
        0o644,
    );
    let output = command()
        .args(["--config", config.to_str().unwrap(), "--token", "t"])
        .args(["devices", "list"])
        .output()
        .unwrap();
    let expected = format!(
        "cannot read CA certificate {}",
        dir.path().join("fleet-ca.crt").display()
    );
    assert!(error_line(&output).contains(&expected), "{output:?}");
}

/// A config file with a key the CLI does not know (a typo), or a bad value,
/// is an error on one line naming the file, the line and the column.
#[test]
fn an_unknown_key_or_bad_value_in_the_config_file_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    for (text, expected) in [
        (
            "server = \"http://127.0.0.1:1\"\nsevrer = \"x\"\n",
            "line 2, column 1: unknown field `sevrer`",
        ),
        (
            "output = \"xml\"\n",
            "line 1, column 10: unknown variant `xml`",
        ),
    ] {
        write_config(&config, text, 0o600);
        let output = command()
            .args(["--config", config.to_str().unwrap(), "devices", "list"])
            .output()
            .unwrap();
        let line = error_line(&output);
        assert!(
            line.starts_with(&format!(
                "edgefleet: invalid config file {}: ",
                config.display()
            )),
            "{line}"
        );
        assert!(line.contains(expected), "{line}");
    }
}

/// Like ssh with a private key: a config file holding the operator token
/// that group or others can read is refused, and the error says how to
/// fix it. Without a token, the file may be readable.
#[test]
fn a_config_file_with_a_token_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edgefleet/config.toml");
    for mode in [0o644, 0o640, 0o604, 0o620] {
        write_config(
            &config,
            "server = \"http://127.0.0.1:1\"\ntoken = \"secret\"\n",
            mode,
        );
        let output = command()
            .env("XDG_CONFIG_HOME", dir.path())
            .args(["devices", "list"])
            .output()
            .unwrap();
        let line = error_line(&output);
        assert!(
            line.contains(&format!("run chmod 600 {}", config.display())),
            "{line}"
        );
        assert!(line.contains("holds a token"), "{line}");
        assert!(!line.contains("secret"), "{line}");
    }
    // Private, or without a token: it is used.
    for (text, mode) in [
        (
            "server = \"http://127.0.0.1:1\"\ntoken = \"secret\"\n",
            0o600,
        ),
        ("server = \"http://127.0.0.1:1\"\n", 0o644),
    ] {
        write_config(&config, text, mode);
        let output = command()
            .env("XDG_CONFIG_HOME", dir.path())
            .args(["--token", "t", "devices", "list"])
            .output()
            .unwrap();
        assert!(
            error_line(&output).contains("cannot connect to http://127.0.0.1:1"),
            "{output:?}"
        );
    }
}

/// A config file named with `--config` or `EDGEFLEET_CONFIG` must exist
/// (only the default one is optional).
#[test]
fn a_named_config_file_that_does_not_exist_is_an_error() {
    let missing = "/nonexistent/edgefleet.toml";
    let by_flag = command()
        .args(["--config", missing, "devices", "list"])
        .output()
        .unwrap();
    let by_env = command()
        .env("EDGEFLEET_CONFIG", missing)
        .args(["devices", "list"])
        .output()
        .unwrap();
    for output in [by_flag, by_env] {
        let line = error_line(&output);
        assert!(
            line.starts_with(&format!("edgefleet: cannot read config file {missing}: ")),
            "{line}"
        );
    }
}
