//! Model registry and staged rollouts end to end: real server, real agents
//! (downloading, verifying, checking and activating models), the real CLI.

mod support;

use std::time::Duration;

use edgefleet_test_support::{eventually, fixture_model, padded_mlp, testdata};
use serde_json::Value;
use support::*;

const FAST: &[&str] = &[
    "--telemetry-interval",
    "1s",
    "--telemetry-upload-interval",
    "1s",
];

struct Fleet {
    _dir: tempfile::TempDir,
    _schema: Option<PgSchema>,
    server: Server,
    agents: Vec<Agent>,
    devices: Vec<String>,
}

/// A server and `runtimes.len()` enrolled, running agents labelled region=eu.
fn fleet(db: Db, runtimes: &[&str]) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let (schema, server) = start_server(db, dir.path(), FAST);
    let token = server.join_token(&[
        "--labels",
        "region=eu",
        "--uses",
        &runtimes.len().to_string(),
    ]);
    let mut agents = Vec::new();
    let mut devices = Vec::new();
    for (i, runtime) in runtimes.iter().enumerate() {
        let state = dir.path().join(format!("agent{i}"));
        devices.push(enroll_ok(&server, &token, &state));
        agents.push(Agent::run_with(
            &state,
            &["--runtime", runtime, "--reconnect-max-delay", "2s"],
        ));
    }
    for device in &devices {
        eventually(Duration::from_secs(30), "agents online", || {
            (server.device(device)["status"] == "online").then_some(())
        });
    }
    Fleet {
        _dir: dir,
        _schema: schema,
        server,
        agents,
        devices,
    }
}

fn fixture(name: &str) -> String {
    fixture_model(name).to_string_lossy().to_string()
}

fn push(server: &Server, file: &str, name: &str, version: u64) -> Value {
    server.cli_json(&[
        "models",
        "push",
        file,
        "--name",
        name,
        "--version",
        &version.to_string(),
    ])
}

fn rollout(server: &Server, args: &[&str]) -> Value {
    let mut all = vec!["rollouts", "create"];
    all.extend(args);
    server.cli_json(&all)
}

fn wait_state(server: &Server, id: &str, state: &str, timeout: Duration) -> Value {
    eventually(timeout, &format!("rollout {id} {state}"), || {
        let r = server.cli_json(&["rollouts", "get", id]);
        (r["state"] == state).then_some(r)
    })
}

fn rollout_to_success(db: Db, agents: usize) {
    let runtimes = vec!["tract"; agents];
    let fleet = fleet(db, &runtimes);
    let server = &fleet.server;
    push(server, &fixture("mlp"), "mlp", 1);
    // No rollout yet: the table says so with its header, not with nothing.
    let empty = server.cli(&["rollouts", "list", "--output", "table"]);
    assert!(empty.status.success(), "{}", stderr(&empty));
    let empty = String::from_utf8_lossy(&empty.stdout).into_owned();
    assert!(
        empty.contains("MODEL") && !empty.contains("mlp@1"),
        "{empty}"
    );
    // --watch: exits 0 only when the rollout succeeds.
    let output = server.cli(&[
        "rollouts",
        "create",
        "--model",
        "mlp@1",
        "--selector",
        "region=eu",
        "--waves",
        "5%,25%,100%",
        "--max-failed",
        "1",
        "--activation-timeout",
        "1h",
        "--watch",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let list = server.cli_json(&["rollouts", "list"]);
    let r = &list[0];
    assert_eq!(r["state"], "succeeded");
    assert_eq!(r["activation_timeout_seconds"], 3600);
    assert_eq!(r["counts"]["active"], agents);
    let table = server.cli(&["rollouts", "list", "--output", "table"]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    let row = table
        .lines()
        .find(|line| line.contains(r["id"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("no row for the rollout in {table}"));
    let cells: Vec<&str> = row.split('┆').map(|c| c.trim_matches(['│', ' '])).collect();
    assert_eq!(
        cells[1..5],
        ["mlp@1", "succeeded", "3/3", &agents.to_string()],
        "{row}"
    );
    let full = server.cli_json(&["rollouts", "get", r["id"].as_str().unwrap()]);
    // The list counts in the database what the rollout's view counts.
    assert_eq!(r["counts"], full["counts"]);
    let actions: Vec<&str> = full["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "created",
            "started",
            "wave_started",
            "wave_started",
            "succeeded"
        ]
    );
    assert!(
        full["events"][0]["actor"]
            .as_str()
            .unwrap()
            .starts_with("operator:")
    );
    for agent in &fleet.agents {
        eventually(Duration::from_secs(20), "v1 served", || {
            agent.infer_mlp().then_some(())
        });
    }
    // The first rollout is over, so a new one of the same version is allowed;
    // every device already serves it.
    let again = rollout(server, &["--model", "mlp@1", "--selector", "region=eu"]);
    wait_state(
        server,
        again["id"].as_str().unwrap(),
        "succeeded",
        Duration::from_secs(30),
    );
}

#[test]
fn rollout_to_success_sqlite() {
    rollout_to_success(Db::Sqlite, 20);
}

#[test]
fn rollout_to_success_postgres() {
    rollout_to_success(Db::Postgres, 4);
}

/// After a rollout, `devices get` lists the model with the digest of the
/// pushed file, which is what the device serves. When that version's file
/// then changes to bytes that do not load, the device serves on from the
/// file it loaded, and keeps listing the version once, "ready", with the
/// digest of what it serves (not also as "failed").
fn a_device_lists_the_digest_it_serves_and_a_failed_reload_keeps_it_listed_once_as_ready(db: Db) {
    let fleet = fleet(db, &["tract"]);
    let server = &fleet.server;
    let (agent, device) = (&fleet.agents[0], &fleet.devices[0]);
    let pushed = push(server, &fixture("mlp"), "mlp", 1);
    let sha256 = pushed["sha256"].as_str().unwrap();
    assert_eq!(sha256.len(), 64, "{pushed}");
    let first = rollout(server, &["--model", "mlp@1", "--selector", "region=eu"]);
    wait_state(
        server,
        first["id"].as_str().unwrap(),
        "succeeded",
        Duration::from_secs(60),
    );
    let listed = serde_json::json!([
        { "name": "mlp", "version": 1, "sha256": sha256, "state": "ready" }
    ]);
    eventually(
        Duration::from_secs(20),
        "mlp@1 listed with its digest",
        || (server.device(device)["models"] == listed).then_some(()),
    );

    let installed = agent.state_dir.join("models/mlp/1/model.onnx");
    std::fs::write(&installed, b"not an onnx model").unwrap();
    eventually(Duration::from_secs(30), "the reload failed", || {
        http(agent.http_addr, "GET", "/metrics", None)
            .filter(|(_, body)| {
                body.contains("edgefleet_model_load_failures_total{model=\"mlp\"} 1")
            })
            .map(|_| ())
    });
    // Two telemetry batches made after the failure reach the server: the
    // agent sends a changed model list before the batch that follows it.
    let sequence = |d: &Value| d["telemetry_sequence"].as_u64().unwrap();
    let before = sequence(&server.device(device));
    let shown = eventually(
        Duration::from_secs(30),
        "telemetry after the failure",
        || {
            let shown = server.device(device);
            (sequence(&shown) >= before + 2).then_some(shown)
        },
    );
    assert_eq!(shown["models"], listed);
    assert!(agent.infer_mlp(), "v1 serves on");
}

#[test]
fn a_device_lists_the_digest_it_serves_and_a_failed_reload_keeps_it_listed_once_as_ready_sqlite() {
    a_device_lists_the_digest_it_serves_and_a_failed_reload_keeps_it_listed_once_as_ready(
        Db::Sqlite,
    );
}

#[test]
fn a_device_lists_the_digest_it_serves_and_a_failed_reload_keeps_it_listed_once_as_ready_postgres()
{
    a_device_lists_the_digest_it_serves_and_a_failed_reload_keeps_it_listed_once_as_ready(
        Db::Postgres,
    );
}

/// Puts `fixture` in place of the agent's `name` `version` model file the
/// way a local edit would: written beside it, then renamed over it.
fn replace_installed(agent: &Agent, name: &str, version: u64, fixture: &str) {
    let dir = agent
        .state_dir
        .join("models")
        .join(name)
        .join(version.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    let tmp = dir.join("model.onnx.edit");
    std::fs::copy(fixture_model(fixture), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("model.onnx")).unwrap();
}

/// A device that lists a version with bytes other than the registry's for
/// it (here copied in by hand: no desired state names it, so the agent
/// does not repair it) is marked by `devices get` and `devices list`
/// (`expected_sha256`, and "digest mismatch" in the tables), and the server
/// warns once per change: not again when the agent reconnects listing the
/// same, again when the bytes change once more.
fn a_device_serving_other_bytes_than_the_registrys_for_a_version_is_marked(db: Db) {
    let mut fleet = fleet(db, &["tract"]);
    let device = fleet.devices[0].clone();
    let server = &fleet.server;
    let sha = |pushed: Value| pushed["sha256"].as_str().unwrap().to_string();
    let expected = sha(push(server, &fixture("mlp"), "mlp", 1));
    // The digests of the other files, as the registry computes them.
    let conv = sha(push(server, &fixture("conv"), "conv", 1));
    let dynamic = sha(push(server, &fixture("dynamic"), "dynamic", 1));
    let warning = "the device lists a model version with bytes other than the registry's";

    replace_installed(&fleet.agents[0], "mlp", 1, "conv");
    let marked = |found: &str| {
        serde_json::json!([{
            "name": "mlp", "version": 1, "sha256": found, "state": "ready",
            "expected_sha256": expected,
        }])
    };
    eventually(Duration::from_secs(30), "mlp@1 marked", || {
        (server.device(&device)["models"] == marked(&conv)).then_some(())
    });
    let listed = server.cli_json(&["devices", "list"]);
    assert_eq!(listed[0]["models"], marked(&conv), "{listed}");
    let table = server.cli(&["devices", "get", &device]);
    assert!(table.status.success(), "{}", stderr(&table));
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(table.contains("mlp@1 (digest mismatch)"), "{table}");
    assert!(
        table.contains(&format!(
            "mlp@1: device {}…, registry {}…",
            &conv[..12],
            &expected[..12]
        )),
        "{table}"
    );
    let line = server
        .process
        .stderr
        .wait_for(warning, Duration::from_secs(10));
    assert!(line.contains(&expected) && line.contains(&conv), "{line}");

    // A reconnect lists the same: no second warning.
    let opened = "agent session opened";
    assert_eq!(server.process.stderr.count(opened), 1);
    fleet.agents[0].restart();
    let server = &fleet.server;
    eventually(Duration::from_secs(30), "a second session", || {
        (server.process.stderr.count(opened) == 2).then_some(())
    });
    // Listed by the new session (its Hello, or a ModelsChanged once the
    // agent has loaded it), checked before it is recorded.
    eventually(Duration::from_secs(30), "mlp@1 listed again", || {
        (server.device(&device)["models"] == marked(&conv)).then_some(())
    });
    assert_eq!(server.process.stderr.count(warning), 1);

    // Other bytes again: a new warning, and the mark names them.
    replace_installed(&fleet.agents[0], "mlp", 1, "dynamic");
    eventually(Duration::from_secs(30), "the second change marked", || {
        (server.device(&device)["models"] == marked(&dynamic)).then_some(())
    });
    eventually(Duration::from_secs(10), "a second warning", || {
        (server.process.stderr.count(warning) == 2).then_some(())
    });
}

#[test]
fn a_device_serving_other_bytes_than_the_registrys_for_a_version_is_marked_sqlite() {
    a_device_serving_other_bytes_than_the_registrys_for_a_version_is_marked(Db::Sqlite);
}

#[test]
fn a_device_serving_other_bytes_than_the_registrys_for_a_version_is_marked_postgres() {
    a_device_serving_other_bytes_than_the_registrys_for_a_version_is_marked(Db::Postgres);
}

fn a_model_failing_its_check_on_some_devices_is_rolled_back(db: Db) {
    // tract lacks the operator `unsupported_op` uses: activation fails there.
    let fleet = fleet(db, &["onnxruntime", "onnxruntime", "tract", "tract"]);
    let server = &fleet.server;
    push(server, &fixture("mlp"), "mlp", 1);
    let first = rollout(server, &["--model", "mlp@1", "--selector", "region=eu"]);
    wait_state(
        server,
        first["id"].as_str().unwrap(),
        "succeeded",
        Duration::from_secs(60),
    );
    push(server, &fixture("unsupported_op"), "mlp", 2);
    let output = server.cli(&[
        "rollouts",
        "create",
        "--model",
        "mlp@2",
        "--selector",
        "region=eu",
        "--max-failed",
        "1",
        "--watch",
    ]);
    assert!(
        !output.status.success(),
        "a failed rollout must exit non-zero"
    );
    let list = server.cli_json(&["rollouts", "list", "--model", "mlp"]);
    let failed = server.cli_json(&["rollouts", "get", list[0]["id"].as_str().unwrap()]);
    assert_eq!(failed["state"], "rolled_back");
    assert_eq!(list[0]["counts"], failed["counts"]);
    let reason = failed["reason"].as_str().unwrap();
    assert!(reason.contains("failed-activations gate"), "{reason}");
    for device in &fleet.devices[2..] {
        assert!(
            reason.contains(device.as_str()),
            "{reason} should name {device}"
        );
    }
    // Every device serves v1 again (the mlp input works), none serves v2.
    for agent in &fleet.agents {
        eventually(Duration::from_secs(30), "back on v1", || {
            (agent.served_versions("mlp") == vec![1] && agent.infer_mlp()).then_some(())
        });
    }
}

#[test]
fn a_model_failing_its_check_on_some_devices_is_rolled_back_sqlite() {
    a_model_failing_its_check_on_some_devices_is_rolled_back(Db::Sqlite);
}

#[test]
fn a_model_failing_its_check_on_some_devices_is_rolled_back_postgres() {
    a_model_failing_its_check_on_some_devices_is_rolled_back(Db::Postgres);
}

fn operators_pause_resume_and_roll_back_by_hand_and_restarts_resume(db: Db) {
    let mut fleet = fleet(db, &["tract", "tract", "tract"]);
    push(&fleet.server, &fixture("mlp"), "mlp", 1);
    let first = rollout(&fleet.server, &["--model", "mlp@1"]);
    wait_state(
        &fleet.server,
        first["id"].as_str().unwrap(),
        "succeeded",
        Duration::from_secs(60),
    );
    push(&fleet.server, &fixture("dynamic"), "mlp", 2);
    // Wave 1 (one device), then a long soak.
    let second = rollout(
        &fleet.server,
        &["--model", "mlp@2", "--waves", "1,100%", "--soak", "1h"],
    );
    let id = second["id"].as_str().unwrap().to_string();
    let in_soak = eventually(Duration::from_secs(60), "wave 1 active", || {
        let r = fleet.server.cli_json(&["rollouts", "get", &id]);
        (r["counts"]["active"] == 1).then_some(r)
    });
    assert_eq!(in_soak["state"], "running");
    assert_eq!(in_soak["counts"]["waiting"], 2);

    // The control plane dies mid-rollout and comes back: same state.
    fleet.server.process.kill();
    fleet.server.restart();
    let after = fleet.server.cli_json(&["rollouts", "get", &id]);
    assert_eq!(after["state"], "running");
    assert_eq!(after["counts"]["active"], 1);

    let paused = fleet.server.cli_json(&["rollouts", "pause", &id]);
    assert_eq!(paused["state"], "paused");
    // An action answers with the rollout's counts, not each of its devices.
    assert_eq!(paused["counts"]["active"], 1);
    assert_eq!(paused["devices"], serde_json::json!([]), "{paused}");
    let again = fleet.server.cli(&["rollouts", "pause", &id]);
    assert!(!again.status.success(), "pausing twice must be refused");
    let resumed = fleet.server.cli_json(&["rollouts", "resume", &id]);
    assert_eq!(resumed["state"], "running");
    // A conflicting rollout of the same model is refused with the reason.
    let conflict = fleet
        .server
        .cli(&["rollouts", "create", "--model", "mlp@1"]);
    assert!(!conflict.status.success());
    assert!(
        stderr(&conflict).contains("already in rollout"),
        "{}",
        stderr(&conflict)
    );

    let rolled = fleet.server.cli_json(&["rollouts", "rollback", &id]);
    assert_eq!(rolled["state"], "rolled_back");
    for agent in &fleet.agents {
        eventually(Duration::from_secs(30), "back on v1", || {
            (agent.served_versions("mlp") == vec![1]).then_some(())
        });
    }
    let events = fleet.server.cli_json(&["rollouts", "get", &id])["events"].clone();
    let actions: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for action in ["pause", "resume", "rollback"] {
        assert!(actions.contains(&action), "{actions:?}");
    }

    // Abort stops where it is.
    let third = rollout(
        &fleet.server,
        &["--model", "mlp@2", "--waves", "1,100%", "--soak", "1h"],
    );
    let id3 = third["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(60), "wave 1 active", || {
        let r = fleet.server.cli_json(&["rollouts", "get", &id3]);
        (r["counts"]["active"] == 1).then_some(())
    });
    let aborted = fleet.server.cli_json(&["rollouts", "abort", &id3]);
    assert_eq!(aborted["state"], "aborted");
    let served: Vec<Vec<u64>> = fleet
        .agents
        .iter()
        .map(|a| a.served_versions("mlp"))
        .collect();
    assert_eq!(
        served.iter().filter(|v| v.contains(&2)).count(),
        1,
        "{served:?}"
    );
    let _ = &mut fleet.agents;
}

#[test]
fn operators_pause_resume_and_roll_back_by_hand_and_restarts_resume_sqlite() {
    operators_pause_resume_and_roll_back_by_hand_and_restarts_resume(Db::Sqlite);
}

#[test]
fn operators_pause_resume_and_roll_back_by_hand_and_restarts_resume_postgres() {
    operators_pause_resume_and_roll_back_by_hand_and_restarts_resume(Db::Postgres);
}

fn an_offline_agent_converges_when_it_comes_back(db: Db) {
    let mut fleet = fleet(db, &["tract", "tract"]);
    fleet.agents[1].process.kill();
    push(&fleet.server, &fixture("mlp"), "mlp", 1);
    let r = rollout(&fleet.server, &["--model", "mlp@1"]);
    let id = r["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(60), "the online device active", || {
        let r = fleet.server.cli_json(&["rollouts", "get", &id]);
        (r["counts"]["active"] == 1).then_some(())
    });
    assert_eq!(
        fleet.server.cli_json(&["rollouts", "get", &id])["state"],
        "running"
    );
    fleet.agents[1].restart();
    wait_state(&fleet.server, &id, "succeeded", Duration::from_secs(60));
    assert!(fleet.agents[1].infer_mlp());
}

#[test]
fn an_offline_agent_converges_when_it_comes_back_sqlite() {
    an_offline_agent_converges_when_it_comes_back(Db::Sqlite);
}

#[test]
fn an_offline_agent_converges_when_it_comes_back_postgres() {
    an_offline_agent_converges_when_it_comes_back(Db::Postgres);
}

fn the_registry_rejects_what_is_not_onnx(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let (_schema, server) = start_server(db, dir.path(), &[]);
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"definitely not a protobuf model").unwrap();
    let output = server.cli(&["models", "push", junk.to_str().unwrap(), "--name", "junk"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).to_lowercase().contains("onnx"),
        "{}",
        stderr(&output)
    );
    let list = server.cli_json(&["models", "list"]);
    assert!(list.as_array().unwrap().is_empty());
    let missing = server.cli(&["rollouts", "create", "--model", "nope@1"]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("no model"),
        "{}",
        stderr(&missing)
    );
}

#[test]
fn the_registry_rejects_what_is_not_onnx_sqlite() {
    the_registry_rejects_what_is_not_onnx(Db::Sqlite);
}

#[test]
fn the_registry_rejects_what_is_not_onnx_postgres() {
    the_registry_rejects_what_is_not_onnx(Db::Postgres);
}

fn a_python_script_creates_and_watches_a_rollout(db: Db) {
    let fleet = fleet(db, &["tract"]);
    push(&fleet.server, &fixture("mlp"), "mlp", 1);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/rollout.py");
    let output = std::process::Command::new("python3")
        .arg(script)
        .args(["--server", &fleet.server.api_addr.to_string()])
        .arg("--ca-cert")
        .arg(fleet.server.ca_cert())
        .args([
            "--model",
            "mlp@1",
            "--selector",
            "region=eu",
            "--waves",
            "100%",
        ])
        .env("EDGEFLEET_TOKEN", fleet.server.admin_token())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "rollout.py failed: {stdout}\n{}",
        stderr(&output)
    );
    assert!(stdout.contains("created ro-"), "{stdout}");
    assert!(
        stdout.lines().last().unwrap().starts_with("succeeded"),
        "{stdout}"
    );
    assert!(fleet.agents[0].infer_mlp());
}

#[test]
fn a_python_script_creates_and_watches_a_rollout_sqlite() {
    a_python_script_creates_and_watches_a_rollout(Db::Sqlite);
}

#[test]
fn a_python_script_creates_and_watches_a_rollout_postgres() {
    a_python_script_creates_and_watches_a_rollout(Db::Postgres);
}

/// The script, like the CLI, sends the operator token in plaintext only
/// to a server on this machine: to any other address it refuses before
/// connecting (10.255.255.1 is never reached: the refusal is immediate).
/// Over TLS (any address without `http://`) it needs the fleet CA.
#[test]
fn the_python_script_refuses_to_send_the_token_in_plaintext_off_loopback() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/rollout.py");
    let output = std::process::Command::new("python3")
        .arg(&script)
        .args(["--server", "10.255.255.1:7444", "--model", "mlp@1"])
        .env("EDGEFLEET_TOKEN", "secret-token")
        .env_remove("EDGEFLEET_CA_CERT")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("--ca-cert (or EDGEFLEET_CA_CERT) is required to trust"),
        "{}",
        stderr(&output)
    );
    for server in ["http://10.255.255.1:7444", "http://edgefleet.example:7444"] {
        let output = std::process::Command::new("python3")
            .arg(&script)
            .args(["--server", server, "--model", "mlp@1"])
            .env("EDGEFLEET_TOKEN", "secret-token")
            .env_remove("EDGEFLEET_CA_CERT")
            .output()
            .unwrap();
        let stderr = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{server}: {stderr}");
        assert!(
            stderr.contains("refusing to send the operator token in plaintext"),
            "{server}: {stderr}"
        );
        assert!(!stderr.contains("secret-token"), "{stderr}");
    }
}

fn a_slower_model_trips_the_latency_gate_and_is_rolled_back(db: Db) {
    let fleet = fleet(db, &["tract", "tract"]);
    let server = &fleet.server;
    // v1: the small MLP; v2: the same inputs and outputs, ~3000x the work
    // (so the gate trips however loaded the machine running the test is).
    push(server, &fixture("mlp"), "net", 1);
    let slow = testdata().join("rollout-models/slow_mlp/1/model.onnx");
    push(server, slow.to_str().unwrap(), "net", 2);
    let first = rollout(server, &["--model", "net@1"]);
    wait_state(
        server,
        first["id"].as_str().unwrap(),
        "succeeded",
        Duration::from_secs(60),
    );
    // A baseline of v1 latency on every device, stored before the rollout.
    for agent in &fleet.agents {
        for _ in 0..40 {
            assert!(agent.infer_zeros("net"));
        }
    }
    for device in &fleet.devices {
        eventually(Duration::from_secs(20), "the baseline stored", || {
            (server.device(device)["requests_total"].as_u64().unwrap() >= 40).then_some(())
        });
    }
    let second = rollout(
        server,
        &[
            "--model",
            "net@2",
            "--max-p95-regression",
            "1.0",
            "--min-devices",
            "2",
            // Metric gates are judged while a wave soaks.
            "--soak",
            "60s",
        ],
    );
    let id = second["id"].as_str().unwrap().to_string();
    // Traffic keeps flowing to whatever each device serves.
    let rolled_back = eventually(Duration::from_secs(90), "the latency gate", || {
        for agent in &fleet.agents {
            for _ in 0..10 {
                agent.infer_zeros("net");
            }
        }
        let r = server.cli_json(&["rollouts", "get", &id]);
        (r["state"] != "running" && r["state"] != "pending").then_some(r)
    });
    if rolled_back["state"] != "rolled_back" {
        // Enough to tell why from a CI log.
        let warnings: Vec<String> = server
            .process
            .stderr
            .lines()
            .into_iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        let devices: Vec<Value> = fleet.devices.iter().map(|d| server.device(d)).collect();
        let infer: Vec<bool> = fleet.agents.iter().map(|a| a.infer_zeros("net")).collect();
        let served: Vec<Vec<u64>> = fleet
            .agents
            .iter()
            .map(|a| a.served_versions("net"))
            .collect();
        panic!(
            "the latency gate did not trip: {rolled_back}\nserved {served:?}, infer ok {infer:?}\ndevices {devices:?}\nserver warnings {warnings:#?}"
        );
    }
    let reason = rolled_back["reason"].as_str().unwrap();
    assert!(reason.starts_with("latency gate: p95"), "{reason}");
    for agent in &fleet.agents {
        eventually(Duration::from_secs(30), "back on v1", || {
            (agent.served_versions("net") == vec![1]).then_some(())
        });
    }
}

#[test]
fn a_slower_model_trips_the_latency_gate_and_is_rolled_back_sqlite() {
    a_slower_model_trips_the_latency_gate_and_is_rolled_back(Db::Sqlite);
}

#[test]
fn a_slower_model_trips_the_latency_gate_and_is_rolled_back_postgres() {
    a_slower_model_trips_the_latency_gate_and_is_rolled_back(Db::Postgres);
}

fn devices_join_and_leave_a_rollout_as_their_labels_change(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let (_schema, server) = start_server(db, dir.path(), FAST);
    let eu = server.join_token(&["--labels", "region=eu", "--uses", "2"]);
    let us = server.join_token(&["--labels", "region=us"]);
    let mut agents = Vec::new();
    let mut devices = Vec::new();
    for (i, token) in [&eu, &eu, &us].into_iter().enumerate() {
        let state = dir.path().join(format!("agent{i}"));
        devices.push(enroll_ok(&server, token, &state));
        agents.push(Agent::run(&state, &["--reconnect-max-delay", "2s"]));
    }
    push(&server, &fixture("mlp"), "mlp", 1);
    // A long soak keeps the rollout running, so membership can change.
    let r = rollout(
        &server,
        &[
            "--model",
            "mlp@1",
            "--selector",
            "region=eu",
            "--soak",
            "1h",
        ],
    );
    let id = r["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(60), "the eu devices active", || {
        let r = server.cli_json(&["rollouts", "get", &id]);
        (r["counts"]["active"] == 2).then_some(())
    });
    assert!(
        !agents[2].infer_mlp(),
        "the us device is not in the rollout yet"
    );

    // The us device moves to eu: it joins and gets the model.
    let moved = server.cli_json(&["devices", "label", &devices[2], "region=eu"]);
    assert_eq!(moved["labels"]["region"], "eu");
    eventually(Duration::from_secs(60), "the newcomer active", || {
        let r = server.cli_json(&["rollouts", "get", &id]);
        (r["counts"]["active"] == 3).then_some(())
    });
    eventually(Duration::from_secs(20), "the newcomer serving", || {
        agents[2].infer_mlp().then_some(())
    });

    // An eu device drops the label: it leaves the rollout.
    server.cli_json(&["devices", "label", &devices[0], "--remove", "region"]);
    let left = eventually(Duration::from_secs(30), "the device gone", || {
        let r = server.cli_json(&["rollouts", "get", &id]);
        r["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device_id"] == devices[0].as_str() && d["state"] == "left")
            .cloned()
    });
    assert_eq!(left["reason"], "no longer matches the selector");
    let events = server.cli_json(&["rollouts", "get", &id])["events"].to_string();
    assert!(
        events.contains("device_joined") && events.contains("device_left"),
        "{events}"
    );
}

#[test]
fn devices_join_and_leave_a_rollout_as_their_labels_change_sqlite() {
    devices_join_and_leave_a_rollout_as_their_labels_change(Db::Sqlite);
}

#[test]
fn devices_join_and_leave_a_rollout_as_their_labels_change_postgres() {
    devices_join_and_leave_a_rollout_as_their_labels_change(Db::Postgres);
}

fn an_agent_killed_mid_download_resumes_where_it_stopped(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let (_schema, server) = start_server(db, dir.path(), FAST);
    let state = dir.path().join("agent");
    enroll_ok(&server, &server.join_token(&[]), &state);
    let mut agent = Agent::run(&state, &["--reconnect-max-delay", "1s"]);
    let file = dir.path().join("padded.onnx");
    std::fs::write(&file, padded_mlp(96 << 20)).unwrap();
    let pushed = push(&server, file.to_str().unwrap(), "mlp", 1);
    let sha = pushed["sha256"].as_str().unwrap().to_string();
    let r = rollout(&server, &["--model", "mlp@1"]);
    let id = r["id"].as_str().unwrap().to_string();
    let partial = state.join("blobs").join(format!("{sha}.partial"));
    let complete = state.join("blobs").join(&sha);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let size_at_kill = loop {
        assert!(
            !complete.exists(),
            "the download finished before the test could interrupt it"
        );
        let size = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        if size > 0 {
            agent.process.kill();
            break std::fs::metadata(&partial).unwrap().len();
        }
        assert!(std::time::Instant::now() < deadline, "no download started");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        size_at_kill < (96 << 20),
        "killed after the download was complete"
    );
    agent.restart();
    wait_state(&server, &id, "succeeded", Duration::from_secs(120));
    // The second request started where the killed agent had stopped.
    let resumed = server
        .process
        .stderr
        .lines()
        .into_iter()
        .filter(|l| l.contains("blob download") && l.contains(&sha))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("offset="))
                .and_then(|o| o.parse::<u64>().ok())
        })
        .collect::<Vec<_>>();
    assert_eq!(resumed.first(), Some(&0), "downloads: {resumed:?}");
    assert!(
        resumed.iter().any(|&o| o > 0 && o <= size_at_kill),
        "no download resumed from at most {size_at_kill} bytes: {resumed:?}"
    );
    assert!(agent.infer_mlp());
}

#[test]
fn an_agent_killed_mid_download_resumes_where_it_stopped_sqlite() {
    an_agent_killed_mid_download_resumes_where_it_stopped(Db::Sqlite);
}

#[test]
fn an_agent_killed_mid_download_resumes_where_it_stopped_postgres() {
    an_agent_killed_mid_download_resumes_where_it_stopped(Db::Postgres);
}

/// A model an operator signed with their own key (`models push
/// --signing-key`) activates on devices when the servers trust that key,
/// and a push signed by a key they do not trust is refused up front, naming
/// the flag that would trust it.
fn a_model_signed_by_a_trusted_operator_key_activates_and_others_are_refused(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let (trusted, _) = edgefleet_pki::ReleaseKey::load_or_create(&keys.join("trusted")).unwrap();
    let trusted_file = keys.join("trusted").join(edgefleet_pki::RELEASE_KEY_FILE);
    edgefleet_pki::ReleaseKey::load_or_create(&keys.join("other")).unwrap();
    let other_file = keys.join("other").join(edgefleet_pki::RELEASE_KEY_FILE);
    let trusted_hex = hex::encode(trusted.public_key());
    let mut args = FAST.to_vec();
    args.extend(["--trusted-signing-key", trusted_hex.as_str()]);
    let (_schema, server) = start_server(db, dir.path(), &args);
    let state = dir.path().join("agent");
    let device = enroll_ok(&server, &server.join_token(&[]), &state);
    let agent = Agent::run(&state, &["--reconnect-max-delay", "2s"]);
    eventually(Duration::from_secs(30), "the agent online", || {
        (server.device(&device)["status"] == "online").then_some(())
    });

    let refused = server.cli(&[
        "models",
        "push",
        &fixture("mlp"),
        "--name",
        "mlp",
        "--version",
        "1",
        "--signing-key",
        other_file.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    let message = stderr(&refused);
    assert!(
        message.contains("does not trust") && message.contains("--trusted-signing-key"),
        "{message}"
    );

    let model = server.cli_json(&[
        "models",
        "push",
        &fixture("mlp"),
        "--name",
        "mlp",
        "--version",
        "1",
        "--signing-key",
        trusted_file.to_str().unwrap(),
    ]);
    assert_eq!(model["signed_by"], "operator");
    assert_eq!(model["signature_public_key"], trusted_hex.as_str());
    let output = server.cli(&["rollouts", "create", "--model", "mlp@1", "--watch"]);
    assert!(output.status.success(), "{}", stderr(&output));
    eventually(Duration::from_secs(30), "the signed model served", || {
        (agent.served_versions("mlp") == vec![1] && agent.infer_mlp()).then_some(())
    });
}

#[test]
fn a_model_signed_by_a_trusted_operator_key_activates_and_others_are_refused_sqlite() {
    a_model_signed_by_a_trusted_operator_key_activates_and_others_are_refused(Db::Sqlite);
}

#[test]
fn a_model_signed_by_a_trusted_operator_key_activates_and_others_are_refused_postgres() {
    a_model_signed_by_a_trusted_operator_key_activates_and_others_are_refused(Db::Postgres);
}

/// With no gate set, a rollout whose devices failed to activate the version
/// runs all its waves but does not end "succeeded": it ends
/// "finished_with_failures", naming the devices, and `watch` exits non-zero.
fn a_rollout_with_failed_devices_and_no_gate_does_not_succeed(db: Db) {
    // tract lacks the operator `unsupported_op` uses: activation fails there.
    let fleet = fleet(db, &["onnxruntime", "tract"]);
    let server = &fleet.server;
    push(server, &fixture("unsupported_op"), "uop", 1);
    let output = server.cli(&[
        "rollouts",
        "create",
        "--model",
        "uop@1",
        "--selector",
        "region=eu",
        "--watch",
    ]);
    assert!(
        !output.status.success(),
        "a rollout with failures must exit non-zero"
    );
    let list = server.cli_json(&["rollouts", "list", "--model", "uop"]);
    let finished = server.cli_json(&["rollouts", "get", list[0]["id"].as_str().unwrap()]);
    assert_eq!(finished["state"], "finished_with_failures");
    assert_eq!(finished["counts"]["active"], 1);
    assert_eq!(finished["counts"]["failed"], 1);
    let reason = finished["reason"].as_str().unwrap();
    assert!(
        reason.contains("1 of 2 devices failed") && reason.contains(fleet.devices[1].as_str()),
        "{reason}"
    );
}

#[test]
fn a_rollout_with_failed_devices_and_no_gate_does_not_succeed_sqlite() {
    a_rollout_with_failed_devices_and_no_gate_does_not_succeed(Db::Sqlite);
}

#[test]
fn a_rollout_with_failed_devices_and_no_gate_does_not_succeed_postgres() {
    a_rollout_with_failed_devices_and_no_gate_does_not_succeed(Db::Postgres);
}

/// `enroll --force` makes a new device of a state dir. The new device takes
/// the desired states it is given, although its generations start again
/// at 1, below the old device's (the old device's persisted desired state
/// is gone, not converged on); and the telemetry the old device queued is
/// deleted, not uploaded as the new device's.
fn a_state_dir_enrolled_again_takes_its_new_devices_desired_states(db: Db) {
    let mut fleet = fleet(db, &["tract"]);
    push(&fleet.server, &fixture("mlp"), "mlp", 1);
    push(&fleet.server, &fixture("dynamic"), "mlp", 2);
    // The old device gets to generation 2.
    for model in ["mlp@1", "mlp@2"] {
        let r = rollout(&fleet.server, &["--model", model]);
        wait_state(
            &fleet.server,
            r["id"].as_str().unwrap(),
            "succeeded",
            Duration::from_secs(60),
        );
    }
    // It queues telemetry with traffic in it while the control plane is away.
    fleet.server.process.kill();
    for _ in 0..5 {
        assert!(fleet.agents[0].infer_zeros("mlp"));
    }
    let state_dir = fleet.agents[0].state_dir.clone();
    // Whole batches: not a `.tmp-*` write in progress, which a SIGKILL may
    // leave behind, and which is deleted, not counted, when the queue opens.
    let queued_batches = || {
        std::fs::read_dir(state_dir.join("telemetry"))
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                let name = name.to_string_lossy();
                name.ends_with(".batch") && !name.starts_with(".tmp-")
            })
            .count()
    };
    // The requests are in the first batch made after them.
    eventually(Duration::from_secs(30), "queued telemetry", || {
        (queued_batches() >= 2).then_some(())
    });
    fleet.agents[0].process.kill();
    let queued = queued_batches();
    assert!(state_dir.join("desired.pb").exists());

    fleet.server.restart();
    let token = fleet.server.join_token(&["--labels", "enrollment=second"]);
    let output = std::process::Command::new(binary("edgefleet-agent"))
        .args([
            "enroll",
            "--server",
            &fleet.server.agent_url,
            "--token",
            &token,
        ])
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--force")
        .env("EDGEFLEET_LOG", "info")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let log = stderr(&output);
    assert!(output.status.success(), "{log}");
    assert!(
        log.contains("deleted the telemetry batches") && log.contains(&format!("dropped={queued}")),
        "{log}"
    );
    assert!(!state_dir.join("desired.pb").exists());
    let enrollment: Value = serde_json::from_str(
        &std::fs::read_to_string(state_dir.join("identity/enrollment.json")).unwrap(),
    )
    .unwrap();
    let device = enrollment["device_id"].as_str().unwrap().to_string();
    assert_ne!(device, fleet.devices[0]);

    fleet.agents[0].restart();
    eventually(Duration::from_secs(30), "the new device online", || {
        (fleet.server.device(&device)["status"] == "online").then_some(())
    });
    // Its first desired state (generation 1) back to v1, which it still
    // has on disk.
    let r = rollout(
        &fleet.server,
        &["--model", "mlp@1", "--selector", "enrollment=second"],
    );
    wait_state(
        &fleet.server,
        r["id"].as_str().unwrap(),
        "succeeded",
        Duration::from_secs(60),
    );
    eventually(Duration::from_secs(20), "v1 served", || {
        (fleet.agents[0].served_versions("mlp") == [1]).then_some(())
    });
    // Its telemetry arrives, and none of it is the old device's traffic.
    let seen = eventually(
        Duration::from_secs(30),
        "the new device's telemetry",
        || {
            let d = fleet.server.device(&device);
            (d["telemetry_sequence"].as_u64().unwrap_or(0) >= 2).then_some(d)
        },
    );
    assert_eq!(seen["requests_total"], 0, "{seen}");
    assert_eq!(seen["dropped_batches_total"], 0, "{seen}");
}

#[test]
fn a_state_dir_enrolled_again_takes_its_new_devices_desired_states_sqlite() {
    a_state_dir_enrolled_again_takes_its_new_devices_desired_states(Db::Sqlite);
}

#[test]
fn a_state_dir_enrolled_again_takes_its_new_devices_desired_states_postgres() {
    a_state_dir_enrolled_again_takes_its_new_devices_desired_states(Db::Postgres);
}
