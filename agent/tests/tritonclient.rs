//! The agent driven by NVIDIA's own Python client, `tritonclient`: what the
//! README promises its users ("tritonclient ... work unchanged"), checked
//! with the real client library over both protocols, every fixture case
//! compared with onnxruntime (Python). The script is
//! `tests/python/tritonclient_conformance.py`; `scripts/test.sh` installs
//! the client (scripts/requirements-client.txt).

mod support;

use std::path::Path;

use edgefleet_agent::runtime::RuntimeChoice;
use edgefleet_test_support::testdata;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_runs_every_fixture_over_http_and_grpc() {
    let repo = Repo::new();
    let models = fixture_names();
    for name in &models {
        repo.add(name, 1, name);
    }
    let agent = agent(repo.path(), RuntimeChoice::Onnxruntime).start().await;
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/tritonclient_conformance.py");
    let mut command = std::process::Command::new("python3");
    command
        .arg(&script)
        .args(["--http", &agent.http_addr.to_string()])
        .args(["--grpc", &agent.grpc_addr.to_string()])
        .arg("--cases")
        .arg(testdata().join("cases"))
        .args(["--models", &models.join(",")]);
    // Off the runtime's threads: the agent serves on them meanwhile.
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the tritonclient script failed:\n{stdout}\n{stderr}"
    );
    // Every case of every model, over HTTP twice (binary data and JSON) and
    // gRPC once: none skipped.
    let inferences: usize = models.iter().map(|model| cases(model).len() * 3).sum();
    assert!(
        stdout.contains(&format!("checked {inferences} inferences")),
        "{stdout}"
    );
    assert!(
        stdout.contains("checked non-finite values over JSON"),
        "{stdout}"
    );
    assert!(stdout.contains("checked gzip over gRPC"), "{stdout}");
    // Triton's statistics agree with what was served, over both protocols.
    for model in &models {
        assert!(
            stdout.contains(&format!("ok statistics {model}\n")),
            "{stdout}"
        );
    }
    agent.stop().await;
}
