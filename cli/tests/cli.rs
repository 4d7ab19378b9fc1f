//! The CLI's own behaviour without a server: help, bad arguments, clear
//! errors and non-zero exits.

use std::process::Command;

fn edgefleet(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edgefleet"))
        .args(args)
        .env_remove("EDGEFLEET_SERVER")
        .env_remove("EDGEFLEET_TOKEN")
        .output()
        .unwrap()
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
