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
    for command in ["join-token", "devices"] {
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
