//! The agent driven by the Python client libraries its users already have:
//! NVIDIA's `tritonclient` and KServe's `kserve`, what the README and
//! design promise ("any existing client (tritonclient, kserve, curl) works
//! unchanged"), checked with the real libraries over both protocols, every
//! fixture case compared with onnxruntime (Python). The scripts are in
//! `tests/python/` (`tritonclient_conformance.py`, `kserve_conformance.py`,
//! sharing `cases.py`); `scripts/test.sh` installs the clients
//! (scripts/requirements-client.txt).

mod support;

use std::path::Path;

use edgefleet_agent::runtime::RuntimeChoice;
use edgefleet_test_support::testdata;
use support::*;

/// Runs `script` against an agent serving every fixture model (ONNX
/// Runtime) and returns its output, asserting it succeeded. The agent
/// compresses HTTP answers for clients that ask (`--compress-http-answers`),
/// so the clients' decompression is checked too: tritonclient's when the
/// script asks (`response_compression_algorithm`), and httpx's, under
/// KServe's client, which asks on every call (answers of 1 KiB and more
/// come compressed).
async fn run_client_script(script: &str) -> String {
    let repo = Repo::new();
    let models = fixture_names();
    for name in &models {
        repo.add(name, 1, name);
    }
    let agent = agent(repo.path(), RuntimeChoice::Onnxruntime)
        .compress_http_answers()
        .start()
        .await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
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
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} failed:\n{stdout}\n{stderr}",
        script.display()
    );
    agent.stop().await;
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_runs_every_fixture_over_http_and_grpc() {
    let stdout = run_client_script("tritonclient_conformance.py").await;
    let models = fixture_names();
    // Every case of every model, over HTTP twice (binary data and JSON) and
    // gRPC twice (one call each, and all on one stream): none skipped.
    let inferences: usize = models.iter().map(|model| cases(model).len() * 4).sum();
    assert!(
        stdout.contains(&format!("checked {inferences} inferences")),
        "{stdout}"
    );
    assert!(
        stdout.contains("checked non-finite values over JSON"),
        "{stdout}"
    );
    assert!(stdout.contains("checked gzip over gRPC"), "{stdout}");
    assert!(stdout.contains("checked compression over HTTP"), "{stdout}");
    for protocol in ["HTTP", "gRPC"] {
        assert!(
            stdout.contains(&format!("ok repository index over {protocol}\n")),
            "{stdout}"
        );
    }
    // Triton's statistics agree with what was served, over both protocols.
    for model in &models {
        assert!(
            stdout.contains(&format!("ok statistics {model}\n")),
            "{stdout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_runs_every_fixture_over_http_and_grpc() {
    let stdout = run_client_script("kserve_conformance.py").await;
    // Every case of every model over HTTP (binary data and JSON) and gRPC
    // (raw and typed contents); a case with an FP16 input only as bytes
    // (kserve cannot write FP16 as JSON, nor the protocol as typed contents).
    let inferences: usize = fixture_names()
        .iter()
        .flat_map(|model| cases(model))
        .map(|case| {
            let inputs = case["inputs"].as_array().unwrap();
            if inputs.iter().any(|input| input["datatype"] == "FP16") {
                2
            } else {
                4
            }
        })
        .sum();
    assert!(
        stdout.contains(&format!("checked {inferences} inferences")),
        "{stdout}"
    );
}
