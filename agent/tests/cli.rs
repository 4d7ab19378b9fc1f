//! The `edgefleet-agent` binary as users run it: flags, config errors, and a
//! real serving process started and killed.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

fn agent_bin() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"));
    command
        .env_remove("EDGEFLEET_MODEL_REPOSITORY")
        .env("EDGEFLEET_LOG", "info");
    command
}

#[test]
fn help_and_version() {
    let out = agent_bin().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("serve"), "{text}");
    let out = agent_bin().args(["serve", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--model-repository",
        "--grpc-addr",
        "--http-addr",
        "--runtime",
        "--config",
    ] {
        assert!(text.contains(flag), "serve --help lacks {flag}");
    }
    let out = agent_bin().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

fn fails_with(args: &[&str], words: &str) {
    let out = agent_bin().args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(words),
        "{args:?}: stderr should mention '{words}':\n{stderr}"
    );
}

#[test]
fn bad_arguments_and_config_exit_non_zero_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    fails_with(&["serve"], "--model-repository is required");
    fails_with(
        &["serve", "--model-repository", missing.to_str().unwrap()],
        "does not exist",
    );
    fails_with(
        &["serve", "--model-repository", ".", "--runtime", "gpu"],
        "invalid value 'gpu'",
    );
    fails_with(
        &["serve", "--model-repository", ".", "--grpc-addr", "nowhere"],
        "invalid value 'nowhere'",
    );
    fails_with(&["bogus"], "unrecognized subcommand");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "grpc_addr = \"x\"\nrepository_poll_interval = \"soon\"\n",
    )
    .unwrap();
    // Every problem at once.
    let out = agent_bin()
        .args(["serve", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for words in [
        "grpc_addr",
        "repository_poll_interval",
        "--model-repository is required",
    ] {
        assert!(stderr.contains(words), "missing '{words}' in:\n{stderr}");
    }
    std::fs::write(&config, "port = 3\n").unwrap();
    fails_with(
        &["serve", "--config", config.to_str().unwrap()],
        "unknown field `port`",
    );
    // A port already taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    fails_with(
        &[
            "serve",
            "--model-repository",
            ".",
            "--grpc-addr",
            &addr,
            "--http-addr",
            "127.0.0.1:0",
        ],
        "cannot listen",
    );
}

/// The real binary, configured from a TOML file, serves the quickstart model;
/// SIGKILL stops it.
#[tokio::test]
async fn the_binary_serves_from_a_config_file_and_dies_cleanly_on_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    let repository =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/model-repository");
    std::fs::write(
        &config,
        format!(
            "model_repository = \"{}\"\ngrpc_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\nruntime = \"tract\"\n",
            repository.display()
        ),
    )
    .unwrap();
    let mut child = agent_bin()
        .args(["serve", "--config", config.to_str().unwrap()])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut http_addr = None;
    let mut runtime_line = None;
    while http_addr.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("agent logs its addresses");
        if line.contains("runtime selected") {
            runtime_line = Some(line.clone());
        }
        if let Some(start) = line.find("http=") {
            http_addr = Some(
                line[start + 5..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .to_string(),
            );
        }
    }
    assert!(
        runtime_line.unwrap().contains("tract"),
        "the log says which runtime and why"
    );
    let http_addr = http_addr.unwrap();
    let client = reqwest::Client::new();
    assert_eventually(Duration::from_secs(30), || {
        let url = format!("http://{http_addr}/v2/models/iris/ready");
        let client = client.clone();
        async move { matches!(client.get(url).send().await, Ok(r) if r.status() == 200) }
    })
    .await;
    let body: serde_json::Value = client
        .post(format!("http://{http_addr}/v2/models/iris/infer"))
        .json(&serde_json::json!({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let probabilities: Vec<f64> = body["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(probabilities.len(), 3);
    assert!(
        (probabilities.iter().sum::<f64>() - 1.0).abs() < 1e-4,
        "softmax sums to 1: {probabilities:?}"
    );
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(
        client
            .get(format!("http://{http_addr}/v2/health/live"))
            .send()
            .await
            .is_err(),
        "the port is closed"
    );
}
