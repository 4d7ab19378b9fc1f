//! The fleet end to end, with real processes: `edgefleet-server`,
//! `edgefleet-agent` and the `edgefleet` CLI, real TLS, SQLite files and
//! PostgreSQL schemas; servers and agents SIGKILLed and restarted.

mod support;

use std::time::{Duration, Instant};

use edgefleet_test_support::{eventually, output_within, reflected_services, sigterm_and_wait};
use serde_json::Value;
use support::*;

/// The server hands these intervals to agents, so tests see batches quickly
/// (uploaded grouped, one group a second).
const FAST: &[&str] = &[
    "--telemetry-interval",
    "1s",
    "--telemetry-upload-interval",
    "1s",
];

struct Fixture {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    _schema: Option<PgSchema>,
    url: Option<String>,
}

impl Fixture {
    fn new(db: Db) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let schema = (db == Db::Postgres).then(PgSchema::create);
        let url = schema.as_ref().map(|s| s.url.clone());
        Fixture {
            _dir: dir,
            root,
            _schema: schema,
            url,
        }
    }

    fn server(&self, extra: &[&str]) -> Server {
        Server::start(&self.root.join("server"), self.url.as_deref(), extra)
    }

    fn state_dir(&self, name: &str) -> std::path::PathBuf {
        self.root.join(name)
    }
}

fn device_sequences(server: &Server, device: &str) -> Vec<u64> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = open_store(&runtime, server);
    runtime.block_on(store.telemetry_sequences(device)).unwrap()
}

/// Asserts the stored sequences of a device are exactly 1..=n (no gap, no
/// duplicate) and returns n.
fn assert_contiguous(server: &Server, device: &str) -> u64 {
    let sequences = device_sequences(server, device);
    let n = sequences.len() as u64;
    let expected: Vec<u64> = (1..=n).collect();
    assert_eq!(
        sequences, expected,
        "device {device}: sequences with gaps or duplicates"
    );
    n
}

fn telemetry_sequence(server: &Server, device: &str) -> u64 {
    server.device(device)["telemetry_sequence"]
        .as_u64()
        .unwrap()
}

fn enrollment_end_to_end(db: Db) {
    let fx = Fixture::new(db);
    let server = fx.server(FAST);
    let token = server.join_token(&["--labels", "region=eu,class=cam", "--uses", "2"]);
    let state = fx.state_dir("agent");
    let device = enroll_ok(&server, &token, &state);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.join("identity/device.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the device key must be 0600");
        let mode = std::fs::metadata(server.data_dir.join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the CA key must be 0600");
    }
    install_fixture(&state, "mlp");
    let agent = Agent::run(&state, &[]);
    eventually(Duration::from_secs(30), "the model to load", || {
        agent.infer_mlp().then_some(())
    });
    for _ in 0..9 {
        assert!(agent.infer_mlp());
    }
    let shown = eventually(Duration::from_secs(30), "telemetry of 10 requests", || {
        let d = server.device(&device);
        (d["requests_total"].as_u64() == Some(10)).then_some(d)
    });
    assert_eq!(shown["status"], "online");
    assert_eq!(shown["labels"]["region"], "eu");
    assert_eq!(shown["labels"]["class"], "cam");
    assert!(shown["inventory"]["cpu_cores"].as_u64().unwrap() > 0);
    assert!(shown["inventory"]["memory_bytes"].as_u64().unwrap() > 0);
    assert!(!shown["inventory"]["arch"].as_str().unwrap().is_empty());
    assert!(
        shown["inventory"]["runtimes"]
            .as_array()
            .unwrap()
            .contains(&Value::from("tract"))
    );
    assert_eq!(shown["runtime"], "tract");
    assert!(
        shown["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "mlp" && m["version"] == 1),
        "models: {}",
        shown["models"]
    );
    assert!(shown["health"]["memory_total_bytes"].as_u64().unwrap() > 0);

    let listed = server.cli_json(&["devices", "list", "--selector", "region=eu"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let none = server.cli_json(&["devices", "list", "--selector", "region=us"]);
    assert!(none.as_array().unwrap().is_empty());
    let table = server.cli(&["devices", "list"]);
    assert!(table.status.success());
    assert!(String::from_utf8_lossy(&table.stdout).contains(&device));
    for output in ["table", "json"] {
        let piped = server.cli_into_closed_pipe(&["devices", "get", &device, "--output", output]);
        assert!(
            piped.status.success() && piped.stderr.is_empty(),
            "a closed stdout must end the CLI quietly ({output}): {:?} {}",
            piped.status,
            String::from_utf8_lossy(&piped.stderr)
        );
    }
    assert_contiguous(&server, &device);
}

#[test]
fn enrollment_end_to_end_sqlite() {
    enrollment_end_to_end(Db::Sqlite);
}

#[test]
fn enrollment_end_to_end_postgres() {
    enrollment_end_to_end(Db::Postgres);
}

#[test]
fn join_tokens_are_refused_when_used_up_expired_unknown_or_for_another_fleet() {
    let fx = Fixture::new(Db::Sqlite);
    let server = fx.server(&[]);

    let once = server.join_token(&["--uses", "1"]);
    enroll_ok(&server, &once, &fx.state_dir("a"));
    let used_up = enroll(&server.agent_url, &once, &fx.state_dir("b"));
    assert!(!used_up.status.success());
    assert!(stderr(&used_up).contains("used up"), "{}", stderr(&used_up));

    let short = server.join_token(&["--expires", "1s"]);
    std::thread::sleep(Duration::from_millis(1500));
    let expired = enroll(&server.agent_url, &short, &fx.state_dir("c"));
    assert!(!expired.status.success());
    assert!(stderr(&expired).contains("expired"), "{}", stderr(&expired));

    let good = server.join_token(&[]);
    let parts: Vec<&str> = good.split('.').collect();
    let unknown_id = format!("{}.{}.{}", "0".repeat(parts[0].len()), parts[1], parts[2]);
    let unknown = enroll(&server.agent_url, &unknown_id, &fx.state_dir("d"));
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("unknown join token"),
        "{}",
        stderr(&unknown)
    );
    let wrong_secret = format!("{}.{}.{}", parts[0], "0".repeat(parts[1].len()), parts[2]);
    let refused = enroll(&server.agent_url, &wrong_secret, &fx.state_dir("d"));
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("unknown join token"),
        "{}",
        stderr(&refused)
    );

    // A token naming another CA: the agent refuses the server itself.
    let other_fleet = format!("{}.{}.{}", parts[0], parts[1], "ab".repeat(32));
    let pinned = enroll(&server.agent_url, &other_fleet, &fx.state_dir("e"));
    assert!(!pinned.status.success());
    assert!(
        stderr(&pinned).contains("fingerprint"),
        "{}",
        stderr(&pinned)
    );

    let malformed = enroll(&server.agent_url, "not-a-token", &fx.state_dir("f"));
    assert!(!malformed.status.success());
    assert!(
        stderr(&malformed).contains("join token"),
        "{}",
        stderr(&malformed)
    );

    // Nothing was stored for the refused ones, and the good token still works.
    assert_eq!(
        server
            .cli_json(&["devices", "list"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    enroll_ok(&server, &good, &fx.state_dir("g"));
    let again = enroll(&server.agent_url, &good, &fx.state_dir("g"));
    assert!(
        stderr(&again).contains("already enrolled"),
        "{}",
        stderr(&again)
    );
}

/// An operator lists join tokens and revokes one (`join-token list`,
/// `join-token revoke`): enrollment with it is refused, saying so; the
/// device it enrolled keeps working; on both stores.
fn join_tokens_are_listed_and_revoked(db: Db) {
    let fx = Fixture::new(db);
    let server = fx.server(&[]);
    let token = server.join_token(&["--uses", "3", "--labels", "site=paris"]);
    let id = token.split('.').next().unwrap().to_string();
    let other = server.join_token(&[]);
    let first = enroll_ok(&server, &token, &fx.state_dir("a"));

    let listed = server.cli_json(&["join-token", "list"]);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{db:?}: {listed:?}");
    // Newest first.
    assert_eq!(listed[0]["id"], other.split('.').next().unwrap(), "{db:?}");
    assert_eq!(listed[1]["id"], id.as_str(), "{db:?}");
    assert_eq!(listed[1]["state"], "active", "{db:?}");
    assert_eq!(listed[1]["uses_left"], 2, "{db:?}");
    assert_eq!(listed[1]["labels"]["site"], "paris", "{db:?}");
    assert_eq!(listed[1]["revoked_unix_ms"], 0, "{db:?}");
    let text = serde_json::to_string(&listed).unwrap();
    let secret = token.split('.').nth(1).unwrap();
    assert!(!text.contains(secret), "{db:?}: a secret was listed");
    // A page at a time, the same list.
    let paged = server.cli_json(&["join-token", "list", "--page-size", "1"]);
    assert_eq!(paged.as_array().unwrap(), listed, "{db:?}");

    let revoked = server.cli_json(&["join-token", "revoke", &id]);
    assert_eq!(revoked["state"], "revoked", "{db:?}");
    let revoked_at = revoked["revoked_unix_ms"].as_u64().unwrap();
    assert!(revoked_at > 0, "{db:?}");
    let refused = enroll(&server.agent_url, &token, &fx.state_dir("b"));
    assert!(!refused.status.success(), "{db:?}");
    assert!(
        stderr(&refused).contains("revoked"),
        "{db:?}: {}",
        stderr(&refused)
    );
    assert!(
        server
            .metrics()
            .contains("edgefleet_server_enrollments_refused_total{reason=\"revoked_token\"} 1"),
        "{db:?}"
    );
    // Revoking again changes nothing; an unknown id is an error.
    let again = server.cli_json(&["join-token", "revoke", &id]);
    assert_eq!(
        again["revoked_unix_ms"].as_u64(),
        Some(revoked_at),
        "{db:?}"
    );
    let unknown = server.cli(&["join-token", "revoke", "jt-nope"]);
    assert!(!unknown.status.success(), "{db:?}");
    assert!(
        stderr(&unknown).contains("no join token"),
        "{db:?}: {}",
        stderr(&unknown)
    );
    let table = server.cli(&["join-token", "list"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("revoked") && table.contains("active"),
        "{db:?}: {table}"
    );

    // The device it enrolled stays; the other token still enrolls.
    let devices = server.cli_json(&["devices", "list"]);
    assert_eq!(devices.as_array().unwrap().len(), 1, "{db:?}");
    assert_eq!(devices[0]["id"], first.as_str(), "{db:?}");
    assert_ne!(devices[0]["status"], "revoked", "{db:?}");
    enroll_ok(&server, &other, &fx.state_dir("c"));
}

#[test]
fn join_tokens_are_listed_and_revoked_sqlite() {
    join_tokens_are_listed_and_revoked(Db::Sqlite);
}

#[test]
fn join_tokens_are_listed_and_revoked_postgres() {
    join_tokens_are_listed_and_revoked(Db::Postgres);
}

#[test]
fn the_operator_api_needs_a_valid_token_and_well_formed_requests() {
    let fx = Fixture::new(Db::Sqlite);
    let server = fx.server(&[]);
    let no_token = std::process::Command::new(binary("edgefleet"))
        .args(["--server", &server.api_url, "devices", "list"])
        .arg("--ca-cert")
        .arg(server.ca_cert())
        .env_remove("EDGEFLEET_TOKEN")
        .env_remove("EDGEFLEET_CONFIG")
        .env("XDG_CONFIG_HOME", &server.data_dir)
        .output()
        .unwrap();
    assert!(!no_token.status.success());
    assert!(stderr(&no_token).contains("--token"));
    let bad_token = std::process::Command::new(binary("edgefleet"))
        .args([
            "--server",
            &server.api_url,
            "--token",
            "efo_nope",
            "devices",
            "list",
        ])
        .arg("--ca-cert")
        .arg(server.ca_cert())
        .output()
        .unwrap();
    assert!(!bad_token.status.success());
    assert!(
        stderr(&bad_token).contains("not authorized"),
        "{}",
        stderr(&bad_token)
    );
    let missing = server.cli(&["devices", "get", "dev-0000"]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("no device"),
        "{}",
        stderr(&missing)
    );
    let bad_selector = server.cli(&["devices", "list", "--selector", "nolabel"]);
    assert!(!bad_selector.status.success());
    let bad_labels = server.cli(&["join-token", "create", "--labels", "bad key=1"]);
    assert!(!bad_labels.status.success());
    assert!(
        stderr(&bad_labels).contains("label key"),
        "{}",
        stderr(&bad_labels)
    );
    let unreachable = std::process::Command::new(binary("edgefleet"))
        .args([
            "--server",
            "http://127.0.0.1:1",
            "--token",
            "x",
            "devices",
            "list",
        ])
        .output()
        .unwrap();
    assert!(!unreachable.status.success());
    assert!(
        stderr(&unreachable).contains("cannot connect"),
        "{}",
        stderr(&unreachable)
    );
}

/// design.md: plaintext "only on loopback, and only when asked for". On
/// loopback addresses the operator API and the HTTP listener serve TLS with
/// a certificate from the fleet CA, and a plaintext client gets nothing
/// from them; `--plaintext-on-loopback` makes both plaintext (the agent
/// listener stays TLS), and a TLS client gets nothing then. The CLI says
/// which to use when its scheme is not the server's.
#[test]
fn operators_get_tls_on_loopback_unless_plaintext_is_asked_for() {
    for plaintext in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let args: &[&str] = if plaintext {
            &["--plaintext-on-loopback"]
        } else {
            &[]
        };
        let server = Server::start(dir.path(), None, args);
        let (scheme, other) = if plaintext {
            ("http", "https")
        } else {
            ("https", "http")
        };
        assert!(server.agent_url.starts_with("https://127.0.0.1:"));
        // The first start says how operators' clients trust it.
        let printed = server
            .process
            .stdout
            .wait_for("--ca-cert", Duration::from_secs(10));
        assert!(
            printed.ends_with(&format!(
                "edgefleet --ca-cert {} (or EDGEFLEET_CA_CERT)",
                server.ca_cert().display()
            )),
            "{printed}"
        );
        for url in [&server.api_url, &server.http_url] {
            assert!(
                url.starts_with(&format!("{scheme}://127.0.0.1:")),
                "plaintext {plaintext}: {url}"
            );
        }
        // Served on its own scheme: the CLI, gRPC health, /healthz.
        assert_eq!(server.cli_json(&["devices", "list"]), Value::Array(vec![]));
        let (status, body) = server.request("GET", "/healthz", None).unwrap();
        assert_eq!(
            (status, body.as_str()),
            (200, "ok\n"),
            "plaintext {plaintext}"
        );
        // Nothing on the other one.
        let wrong = if plaintext {
            let tcp = std::net::TcpStream::connect(server.http_addr).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut tls = tls_client(tcp, &server.ca_cert());
            use std::io::{Read, Write};
            let wrote = tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: cp\r\n\r\n");
            let mut answer = Vec::new();
            wrote
                .and_then(|()| tls.read_to_end(&mut answer))
                .map(|_| answer)
        } else {
            http(server.http_addr, "GET", "/healthz", None)
                .map(|answer| answer.1.into_bytes())
                .ok_or(std::io::ErrorKind::InvalidData.into())
        };
        assert!(
            wrong.as_ref().is_err() || wrong.as_ref().is_ok_and(Vec::is_empty),
            "plaintext {plaintext}: {other} answered {wrong:?}"
        );
        if !plaintext {
            // Another fleet's CA: said so, naming the file.
            let (other, _) = edgefleet_pki::CertificateAuthority::generate().unwrap();
            let other_ca = dir.path().join("other-ca.crt");
            std::fs::write(&other_ca, other.certificate_pem()).unwrap();
            let output = std::process::Command::new(binary("edgefleet"))
                .args(["--server", &server.api_url])
                .arg("--ca-cert")
                .arg(&other_ca)
                .args(["--token", &server.admin_token(), "devices", "list"])
                .env("XDG_CONFIG_HOME", &server.data_dir)
                .output()
                .unwrap();
            assert!(!output.status.success());
            assert!(
                stderr(&output).contains(&format!(
                    "is not from the CA this client trusts (BadSignature): --ca-cert {} is not this server's DATA_DIR/ca.crt",
                    other_ca.display()
                )),
                "{}",
                stderr(&output)
            );
        }
        let port = server.api_addr.port();
        let output = std::process::Command::new(binary("edgefleet"))
            .args(["--server", &format!("{other}://127.0.0.1:{port}")])
            .arg("--ca-cert")
            .arg(server.ca_cert())
            .args(["--token", &server.admin_token(), "devices", "list"])
            .env("XDG_CONFIG_HOME", &server.data_dir)
            .output()
            .unwrap();
        assert!(!output.status.success());
        let hint = if plaintext {
            "answered with something other than TLS"
        } else {
            "--plaintext-on-loopback"
        };
        assert!(
            stderr(&output).contains(hint),
            "plaintext {plaintext}: {}",
            stderr(&output)
        );
    }
}

/// `run`'s own durations are checked before the agent loads or connects:
/// one that cannot be used (zero, or text that is no duration, from a flag,
/// the environment or the config file) stops it with a clear line, non-zero.
#[test]
fn run_refuses_unusable_durations_before_it_starts() {
    let fx = Fixture::new(Db::Sqlite);
    let server = fx.server(FAST);
    let state = fx.state_dir("agent");
    enroll_ok(&server, &server.join_token(&[]), &state);
    let config = fx.root.join("agent.toml");
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = std::process::Command::new(binary("edgefleet-agent"));
        command
            .arg("run")
            .arg("--state-dir")
            .arg(&state)
            .args(["--runtime", "tract", "--grpc-addr", "127.0.0.1:0"])
            .args(["--http-addr", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied());
        let Some(output) = output_within(command, Duration::from_secs(30)) else {
            panic!("{args:?} {env:?}: the agent started instead of refusing the setting");
        };
        assert!(!output.status.success(), "{args:?} {env:?} should fail");
        stderr(&output)
    };
    let message = run(&["--download-stall-timeout", "0s"], &[]);
    assert!(
        message.contains("the download stall timeout must be longer than zero"),
        "{message}"
    );
    let message = run(&["--telemetry-interval", "0s"], &[]);
    assert!(
        message.contains("the telemetry interval must be longer than zero"),
        "{message}"
    );
    let message = run(&[], &[("EDGEFLEET_AGENT_DOWNLOAD_STALL_TIMEOUT", "soon")]);
    assert!(
        message.contains("invalid value 'soon' for '--download-stall-timeout <DURATION>'"),
        "{message}"
    );
    std::fs::write(&config, "download_stall_timeout = \"soon\"\n").unwrap();
    let message = run(&["--config", config.to_str().unwrap()], &[]);
    assert!(
        message.contains("download_stall_timeout = \"soon\""),
        "{message}"
    );
    // The flag wins over the file, as every setting's does.
    let agent = Agent::run(
        &state,
        &[
            "--config",
            config.to_str().unwrap(),
            "--download-stall-timeout",
            "5m",
        ],
    );
    drop(agent);
}

#[test]
fn revoking_a_device_ends_its_session_within_seconds_and_refuses_reconnects() {
    let fx = Fixture::new(Db::Sqlite);
    let server = fx.server(FAST);
    let state = fx.state_dir("agent");
    let device = enroll_ok(&server, &server.join_token(&[]), &state);
    let agent = Agent::run(&state, &["--reconnect-max-delay", "2s"]);
    eventually(Duration::from_secs(20), "the device online", || {
        (server.device(&device)["status"] == "online").then_some(())
    });
    let revoked = server.cli(&["devices", "revoke", &device]);
    assert!(revoked.status.success(), "{}", stderr(&revoked));
    let started = Instant::now();
    eventually(Duration::from_secs(10), "the session to end", || {
        (server.device(&device)["status"] == "revoked").then_some(())
    });
    agent
        .process
        .stderr
        .wait_for("has been revoked", Duration::from_secs(10));
    assert!(started.elapsed() < Duration::from_secs(10));
    // Every reconnect is refused from now on.
    let before = agent.process.stderr.count("has been revoked");
    eventually(Duration::from_secs(15), "a refused reconnect", || {
        (agent.process.stderr.count("has been revoked") > before).then_some(())
    });
    assert_eq!(server.device(&device)["status"], "revoked");
}

/// A revocation that lands stamped earlier than one the replica has seen
/// (a replica whose commit came late, or whose clock is behind) still ends
/// the device's session.
#[test]
fn a_revocation_stamped_before_the_latest_seen_still_ends_its_session() {
    let fx = Fixture::new(Db::Sqlite);
    let server = fx.server(FAST);
    let token = server.join_token(&["--uses", "2"]);
    let (first_state, late_state) = (fx.state_dir("first"), fx.state_dir("late"));
    let first = enroll_ok(&server, &token, &first_state);
    let late = enroll_ok(&server, &token, &late_state);
    let first_agent = Agent::run(&first_state, &["--reconnect-max-delay", "2s"]);
    let late_agent = Agent::run(&late_state, &["--reconnect-max-delay", "2s"]);
    eventually(Duration::from_secs(20), "both devices online", || {
        [&first, &late]
            .iter()
            .all(|device| server.device(device)["status"] == "online")
            .then_some(())
    });
    let revoked = server.cli(&["devices", "revoke", &first]);
    assert!(revoked.status.success(), "{}", stderr(&revoked));
    first_agent
        .process
        .stderr
        .wait_for("has been revoked", Duration::from_secs(10));
    // Two revocation polls (every 2 s) have seen it.
    std::thread::sleep(Duration::from_secs(5));

    // `late` revoked straight in the database, stamped a second before.
    let database = server.data_dir.join("edgefleet.db");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        use sqlx::Connection;
        let url = format!("sqlite://{}", database.display());
        let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let first_at: i64 = sqlx::query_scalar("SELECT revoked_at FROM devices WHERE id = ?")
            .bind(&first)
            .fetch_one(&mut db)
            .await
            .unwrap();
        sqlx::query("UPDATE devices SET status = 'revoked', revoked_at = ? WHERE id = ?")
            .bind(first_at - 1_000)
            .bind(&late)
            .execute(&mut db)
            .await
            .unwrap();
    });
    late_agent
        .process
        .stderr
        .wait_for("has been revoked", Duration::from_secs(15));
}

fn server_sigkill_keeps_telemetry_exactly_once(db: Db) {
    let fx = Fixture::new(db);
    let mut server = fx.server(FAST);
    let token = server.join_token(&["--uses", "3"]);
    let mut devices = Vec::new();
    let mut agents = Vec::new();
    for i in 0..3 {
        let state = fx.state_dir(&format!("agent{i}"));
        devices.push(enroll_ok(&server, &token, &state));
        agents.push(Agent::run(&state, &["--reconnect-max-delay", "2s"]));
    }
    for device in &devices {
        eventually(Duration::from_secs(30), "telemetry to flow", || {
            (telemetry_sequence(&server, device) >= 3).then_some(())
        });
    }
    server.process.kill();
    std::thread::sleep(Duration::from_secs(3));
    server.restart();
    let after: Vec<u64> = devices
        .iter()
        .map(|d| telemetry_sequence(&server, d))
        .collect();
    for (device, seen) in devices.iter().zip(&after) {
        eventually(Duration::from_secs(40), "the backlog to arrive", || {
            (telemetry_sequence(&server, device) >= seen + 5).then_some(())
        });
    }
    for device in &devices {
        let n = assert_contiguous(&server, device);
        assert!(n >= 8, "{device}: only {n} batches");
    }
    drop(agents);
}

#[test]
fn server_sigkill_keeps_telemetry_exactly_once_sqlite() {
    server_sigkill_keeps_telemetry_exactly_once(Db::Sqlite);
}

#[test]
fn server_sigkill_keeps_telemetry_exactly_once_postgres() {
    server_sigkill_keeps_telemetry_exactly_once(Db::Postgres);
}

fn agent_cut_off_keeps_serving_and_delivers_the_backlog(db: Db) {
    let fx = Fixture::new(db);
    let mut server = fx.server(FAST);
    let state = fx.state_dir("agent");
    let device = enroll_ok(&server, &server.join_token(&[]), &state);
    install_fixture(&state, "mlp");
    let agent = Agent::run(&state, &["--reconnect-max-delay", "2s"]);
    eventually(Duration::from_secs(30), "the model to serve", || {
        agent.infer_mlp().then_some(())
    });
    eventually(Duration::from_secs(20), "the first request counted", || {
        (server.device(&device)["requests_total"].as_u64() == Some(1)).then_some(())
    });
    server.process.kill();
    // Cut off: inference goes on, every request succeeds.
    let mut sent = 1;
    let cut_off = Instant::now();
    while cut_off.elapsed() < Duration::from_secs(5) {
        assert!(
            agent.infer_mlp(),
            "inference failed while the control plane was away"
        );
        sent += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    server.restart();
    eventually(Duration::from_secs(40), "every request counted", || {
        let total = server.device(&device)["requests_total"].as_u64().unwrap();
        assert!(
            total <= sent,
            "counted {total} requests, sent {sent}: duplicates"
        );
        (total == sent).then_some(())
    });
    assert_contiguous(&server, &device);
}

#[test]
fn agent_cut_off_keeps_serving_and_delivers_the_backlog_sqlite() {
    agent_cut_off_keeps_serving_and_delivers_the_backlog(Db::Sqlite);
}

#[test]
fn agent_cut_off_keeps_serving_and_delivers_the_backlog_postgres() {
    agent_cut_off_keeps_serving_and_delivers_the_backlog(Db::Postgres);
}

/// The highest sequence in the agent's on-disk queue.
fn queued_sequences(state: &std::path::Path) -> Vec<u64> {
    let mut sequences: Vec<u64> = std::fs::read_dir(state.join("telemetry"))
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".batch")?.parse().ok()
        })
        .collect();
    sequences.sort_unstable();
    sequences
}

#[test]
fn agent_sigkill_with_an_unacknowledged_backlog_loses_nothing() {
    let fx = Fixture::new(Db::Sqlite);
    let mut server = fx.server(FAST);
    let state = fx.state_dir("agent");
    let device = enroll_ok(&server, &server.join_token(&[]), &state);
    let mut agent = Agent::run(&state, &["--reconnect-max-delay", "1s"]);
    eventually(Duration::from_secs(20), "telemetry to flow", || {
        (telemetry_sequence(&server, &device) >= 2).then_some(())
    });
    server.process.kill();
    let queued = eventually(Duration::from_secs(20), "a backlog on disk", || {
        let q = queued_sequences(&state);
        (q.len() >= 4).then_some(q)
    });
    agent.process.kill();
    let highest = *queued.last().unwrap();
    agent.restart();
    std::thread::sleep(Duration::from_secs(2));
    server.restart();
    eventually(Duration::from_secs(40), "the backlog to arrive", || {
        (telemetry_sequence(&server, &device) > highest + 1).then_some(())
    });
    let n = assert_contiguous(&server, &device);
    assert!(n > highest);
}

#[test]
fn agents_reconnect_spread_out_within_a_minute_after_an_outage() {
    let fx = Fixture::new(Db::Sqlite);
    let mut server = fx.server(&[]);
    let count = 8;
    let token = server.join_token(&["--uses", &count.to_string()]);
    let mut agents = Vec::new();
    let mut devices = Vec::new();
    for i in 0..count {
        let state = fx.state_dir(&format!("agent{i}"));
        devices.push(enroll_ok(&server, &token, &state));
        agents.push(Agent::run(&state, &["--reconnect-max-delay", "8s"]));
    }
    // Online devices with the server's time of their session's Hello (its
    // last_seen while nothing else arrived): when they reconnected, however
    // slowly the server started or this loop polls.
    let online = |server: &Server| -> Vec<(String, u64)> {
        server
            .cli_json(&["devices", "list"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["status"] == "online")
            .map(|d| {
                (
                    d["id"].as_str().unwrap().to_string(),
                    d["last_seen_unix_ms"]
                        .as_u64()
                        .expect("an online device has last_seen_unix_ms"),
                )
            })
            .collect()
    };
    eventually(Duration::from_secs(30), "every agent online", || {
        (online(&server).len() == count).then_some(())
    });
    server.process.kill();
    // Long enough for every agent's backoff to reach its 8 s ceiling.
    std::thread::sleep(Duration::from_secs(12));
    server.restart();
    let restarted = Instant::now();
    let mut first_seen = std::collections::BTreeMap::new();
    while first_seen.len() < count {
        assert!(
            restarted.elapsed() < Duration::from_secs(60),
            "only {} of {count} agents reconnected within a minute",
            first_seen.len()
        );
        for (id, hello_ms) in online(&server) {
            first_seen.entry(id).or_insert(hello_ms);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let first = *first_seen.values().min().unwrap();
    let times: Vec<f64> = first_seen
        .values()
        .map(|ms| (ms - first) as f64 / 1000.0)
        .collect();
    let spread = times.iter().cloned().fold(f64::MIN, f64::max);
    eprintln!("reconnect times after the first (s): {times:?}, spread {spread:.2} s");
    assert!(
        spread >= 1.0,
        "agents reconnected within {spread:.2} s of each other: a thundering herd"
    );
    drop(agents);
}

#[test]
fn certificates_are_renewed_over_the_session_before_they_expire() {
    let fx = Fixture::new(Db::Sqlite);
    let mut server = fx.server(&["--device-certificate-validity", "15s"]);
    let state = fx.state_dir("agent");
    let device = enroll_ok(&server, &server.join_token(&[]), &state);
    let first = std::fs::read_to_string(state.join("identity/device.crt")).unwrap();
    let first_info = edgefleet_pki::certificate_info_pem(&first).unwrap();
    let _agent = Agent::run(&state, &["--reconnect-max-delay", "1s"]);
    let renewed = eventually(Duration::from_secs(30), "a renewed certificate", || {
        let now = std::fs::read_to_string(state.join("identity/device.crt")).ok()?;
        let info = edgefleet_pki::certificate_info_pem(&now).ok()?;
        (info.serial_hex != first_info.serial_hex).then_some(info)
    });
    assert_eq!(renewed.common_name, device);
    assert!(renewed.not_after_unix_ms > first_info.not_after_unix_ms);
    let renewals: u64 = server
        .metrics()
        .lines()
        .find_map(|l| l.strip_prefix("edgefleet_server_certificates_renewed_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(renewals >= 1, "the server counted no renewal");
    // Once the first certificate has expired, a reconnect uses the new one.
    let expiry = first_info.not_after_unix_ms;
    while (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64)
        < expiry + 500
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    server.restart();
    eventually(Duration::from_secs(20), "the device back online", || {
        (server.device(&device)["status"] == "online").then_some(())
    });
}

/// The certificate `addr` presents to a client that trusts the fleet CA
/// (`ca_cert`) and offers ALPN `h2`, which all three listeners speak; an
/// error if the handshake fails (an expired certificate, say).
fn presented_certificate(
    addr: std::net::SocketAddr,
    ca_cert: &std::path::Path,
) -> Result<edgefleet_pki::CertificateInfo, String> {
    let ca_pem = std::fs::read_to_string(ca_cert).unwrap();
    let mut config = (*edgefleet_pki::ca_client_tls_config(&ca_pem).unwrap()).clone();
    config.alpn_protocols = vec![edgefleet_pki::ALPN_H2.to_vec()];
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut connection = rustls::ClientConnection::new(config.into(), name).unwrap();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    while connection.is_handshaking() {
        connection
            .complete_io(&mut tcp)
            .map_err(|err| format!("handshake with {addr}: {err}"))?;
    }
    let leaf = connection.peer_certificates().unwrap()[0].clone();
    Ok(edgefleet_pki::certificate_info_der(&leaf).unwrap())
}

/// The server certificate is renewed while the server runs, before it
/// expires: once the one issued at start has expired, every listener
/// presents a newer one that clients trusting the fleet CA accept (a bare
/// handshake, the CLI, `/healthz`, an agent's session). Without the renewal
/// they would all be handed the expired one and refuse it.
#[test]
fn the_server_certificate_is_renewed_while_the_server_runs() {
    let fx = Fixture::new(Db::Sqlite);
    let server = fx.server(&["--server-certificate-validity", "6s"]);
    let ca_cert = server.ca_cert();
    let listeners = [server.agent_addr, server.api_addr, server.http_addr];
    let first = presented_certificate(server.agent_addr, &ca_cert).unwrap();
    for addr in listeners {
        let info = presented_certificate(addr, &ca_cert).unwrap();
        assert_eq!(info.serial_hex, first.serial_hex, "{addr}: one certificate");
    }
    // Prometheus can alert on both expiries.
    let expiration = |name: &str| -> i64 {
        let text = server.metrics();
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .parse()
            .unwrap()
    };
    const SERVER_EXPIRATION: &str = "edgefleet_server_certificate_expiration_timestamp_seconds";
    // The first certificate's expiry, or a renewal's if one came already
    // (on a slow machine: they come every 4 s here).
    let gauge = expiration(SERVER_EXPIRATION);
    let latest = presented_certificate(server.api_addr, &ca_cert).unwrap();
    assert!(
        gauge >= first.not_after_unix_ms / 1000 && gauge <= latest.not_after_unix_ms / 1000,
        "gauge {gauge}, first certificate's expiry {}",
        first.not_after_unix_ms / 1000
    );
    let ca =
        edgefleet_pki::certificate_info_pem(&std::fs::read_to_string(&ca_cert).unwrap()).unwrap();
    assert_eq!(
        expiration("edgefleet_server_ca_certificate_expiration_timestamp_seconds"),
        ca.not_after_unix_ms / 1000
    );
    let state = fx.state_dir("agent");
    let device = enroll_ok(&server, &server.join_token(&[]), &state);
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    while now_ms() < first.not_after_unix_ms + 1000 {
        std::thread::sleep(Duration::from_millis(200));
    }
    for addr in listeners {
        let renewed = presented_certificate(addr, &ca_cert)
            .unwrap_or_else(|err| panic!("after the first certificate expired: {err}"));
        assert_ne!(renewed.serial_hex, first.serial_hex, "{addr}");
        assert!(
            renewed.not_after_unix_ms > now_ms(),
            "{addr} presents an expired certificate"
        );
    }
    // The gauge follows: it gives the presented certificate's expiry, or a
    // later one's (renewals come every 4 s here).
    let renewed = presented_certificate(server.api_addr, &ca_cert).unwrap();
    let gauge = expiration(SERVER_EXPIRATION);
    assert!(
        gauge >= renewed.not_after_unix_ms / 1000 && gauge <= now_ms() / 1000 + 6,
        "gauge {gauge}, presented certificate's expiry {}",
        renewed.not_after_unix_ms / 1000
    );
    server
        .process
        .stderr
        .wait_for("renewed the server certificate", Duration::from_secs(10));
    assert_eq!(
        server.cli_json(&["devices", "list"])[0]["id"],
        Value::String(device.clone())
    );
    let (status, _) = server.request("GET", "/healthz", None).unwrap();
    assert_eq!(status, 200);
    // An agent connecting now (its first session) trusts the renewed one,
    // and one enrolling now (pinning the CA by the token's fingerprint)
    // finds the CA in its chain.
    let _agent = Agent::run(&state, &[]);
    eventually(Duration::from_secs(20), "the device online", || {
        (server.device(&device)["status"] == "online").then_some(())
    });
    let second = enroll_ok(&server, &server.join_token(&[]), &fx.state_dir("second"));
    assert_ne!(second, device);
}

/// SIGHUP renews the server certificate at once, as daemons take the signal
/// (`systemctl reload`), and the server keeps serving (the signal's default
/// is to end the process).
#[test]
fn sighup_renews_the_server_certificate_and_leaves_the_server_serving() {
    let fx = Fixture::new(Db::Sqlite);
    let mut server = fx.server(&[]);
    let ca_cert = server.ca_cert();
    let first = presented_certificate(server.api_addr, &ca_cert).unwrap();
    let pid = server.process.child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    server.process.stderr.wait_for(
        "SIGHUP: renewing the server certificate now",
        Duration::from_secs(10),
    );
    server
        .process
        .stderr
        .wait_for("renewed the server certificate", Duration::from_secs(10));
    assert!(
        server.process.child.try_wait().unwrap().is_none(),
        "the server exited on SIGHUP"
    );
    for addr in [server.agent_addr, server.api_addr, server.http_addr] {
        let renewed = presented_certificate(addr, &ca_cert).unwrap();
        assert_ne!(renewed.serial_hex, first.serial_hex, "{addr}");
    }
    assert_eq!(server.cli_json(&["devices", "list"]), Value::Array(vec![]));
    let status = server.process.terminate();
    assert!(status.is_some_and(|status| status.success()), "{status:?}");
}

#[test]
fn device_health_comes_from_sysfs_a_hot_zone_and_a_low_battery() {
    let fx = Fixture::new(Db::Sqlite);
    let server = fx.server(FAST);
    let state = fx.state_dir("agent");
    let device = enroll_ok(&server, &server.join_token(&[]), &state);
    let root = fx.root.join("fake-root");
    for (path, text) in [
        ("sys/class/thermal/thermal_zone0/temp", "41000\n"),
        ("sys/class/thermal/thermal_zone1/temp", "87500\n"),
        ("sys/class/power_supply/BAT0/type", "Battery\n"),
        ("sys/class/power_supply/BAT0/capacity", "7\n"),
        ("sys/class/power_supply/BAT0/status", "Discharging\n"),
        ("sys/class/power_supply/AC/type", "Mains\n"),
    ] {
        let file = root.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, text).unwrap();
    }
    std::fs::create_dir_all(root.join("proc")).unwrap();
    for name in ["meminfo", "stat", "uptime"] {
        std::fs::copy(format!("/proc/{name}"), root.join("proc").join(name)).unwrap();
    }
    let _agent = Agent::run(&state, &["--sysfs-root", root.to_str().unwrap()]);
    let health = eventually(Duration::from_secs(20), "a health sample", || {
        let d = server.device(&device);
        (!d["health"].is_null()).then(|| d["health"].clone())
    });
    assert_eq!(health["temperature_millicelsius"], 87500, "{health}");
    assert_eq!(health["battery_percent"], 7, "{health}");
    assert_eq!(health["charging"], false, "{health}");
    assert!(health["memory_total_bytes"].as_u64().unwrap() > 0);
    assert!(health["agent_rss_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn a_full_telemetry_queue_drops_the_oldest_batches_and_reports_it() {
    let fx = Fixture::new(Db::Sqlite);
    let mut server = fx.server(FAST);
    let state = fx.state_dir("agent");
    let device = enroll_ok(&server, &server.join_token(&[]), &state);
    // Room for a few batches only.
    let _agent = Agent::run(
        &state,
        &[
            "--telemetry-queue-bytes",
            "400",
            "--reconnect-max-delay",
            "1s",
        ],
    );
    eventually(Duration::from_secs(20), "telemetry to flow", || {
        (telemetry_sequence(&server, &device) >= 1).then_some(())
    });
    server.process.kill();
    // Twelve batches made while the queue holds two or three: most are
    // dropped without ever being sent.
    std::thread::sleep(Duration::from_secs(12));
    server.restart();
    // The backlog that survived, the newest batches, arrives after the
    // gap the drops left.
    let (missing, dropped) = eventually(Duration::from_secs(40), "batches past the gap", || {
        // Sequences first, the count after: the count only grows, and the
        // batch stamped with a drop is stored in the same transaction as the
        // count, so every gap below the highest stored sequence is counted.
        let sequences = device_sequences(&server, &device);
        let dropped = server.device(&device)["dropped_batches_total"]
            .as_u64()
            .unwrap();
        let highest = *sequences.last().unwrap();
        let missing = highest - sequences.len() as u64;
        (missing > 0).then_some((missing, dropped))
    });
    // Every sequence up to the highest stored is either stored or counted as
    // dropped: nothing went missing uncounted. The count may exceed the gaps:
    // a batch dropped after it was sent, before its acknowledgement came
    // (the control plane killed, or slow to answer while new batches fill
    // the queue), may have been stored all the same.
    assert!(
        missing <= dropped,
        "{missing} sequences missing but only {dropped} batches counted as dropped"
    );
}

#[test]
fn sigterm_stops_server_and_agent_promptly_with_a_session_open() {
    let fx = Fixture::new(Db::Sqlite);
    let mut server = fx.server(FAST);
    let state = fx.state_dir("agent");
    let device = enroll_ok(&server, &server.join_token(&[]), &state);
    let mut agent = Agent::run(&state, &[]);
    eventually(Duration::from_secs(20), "the device online", || {
        (server.device(&device)["status"] == "online").then_some(())
    });
    let started = Instant::now();
    let server_exit = server.process.terminate();
    assert!(
        server_exit.is_some_and(|status| status.success()),
        "the server did not exit cleanly on SIGTERM: {server_exit:?}"
    );
    let server_took = started.elapsed();
    let started = Instant::now();
    let agent_exit = agent.process.terminate();
    assert!(
        agent_exit.is_some_and(|status| status.success()),
        "the agent did not exit cleanly on SIGTERM: {agent_exit:?}"
    );
    // `terminate` SIGKILLs after 10 s, so finishing well before proves SIGTERM worked.
    assert!(
        server_took < Duration::from_secs(9),
        "server took {server_took:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "agent took {:?}",
        started.elapsed()
    );
}

/// Whoever reads the server's log may go away (a log collector restarting):
/// log lines are then dropped, and SIGTERM still stops the server cleanly
/// (a line that could not be written used to panic the task writing it,
/// the one handling SIGTERM included).
#[test]
fn sigterm_stops_the_server_cleanly_after_the_reader_of_its_log_has_gone() {
    let data_dir = tempfile::tempdir().unwrap();
    let (mut child, log) = server_until_listening(data_dir.path());
    // The pipe's only reader closes: every later write to stderr fails.
    drop(log);
    let status = sigterm_and_wait(&mut child, Duration::from_secs(10));
    assert!(
        status.is_some_and(|status| status.success()),
        "the server should exit with success on SIGTERM, got {status:?}"
    );
}

/// A SIGTERM while the server is still starting (here waiting for a
/// PostgreSQL that accepts the connection and never answers) stops it
/// cleanly: it is neither killed by the signal's default action nor left
/// waiting until start-up gives up.
#[test]
fn sigterm_while_the_server_waits_for_its_database_stops_it_cleanly() {
    let silent_database = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    silent_database.set_nonblocking(true).unwrap();
    let url = format!(
        "postgres://postgres@{}/test",
        silent_database.local_addr().unwrap()
    );
    let data_dir = tempfile::tempdir().unwrap();
    let mut child = ephemeral_server_command(data_dir.path(), Some(&url))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Connecting to its database means the server is starting.
    let deadline = Instant::now() + Duration::from_secs(20);
    let _connection = loop {
        match silent_database.accept() {
            Ok((connection, _)) => break connection,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "the server exited before connecting to its database"
                );
                assert!(
                    Instant::now() < deadline,
                    "the server never connected to its database"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(err) => panic!("accept: {err}"),
        }
    };
    let status = sigterm_and_wait(&mut child, Duration::from_secs(10));
    assert!(
        status.is_some_and(|status| status.success()),
        "the server should exit with success on SIGTERM while starting, got {status:?}"
    );
}

/// A first start whose stdout nobody reads (closed before the admin token is
/// printed) still serves: the token is in DATA_DIR/admin.token.
#[test]
fn a_first_start_with_stdout_closed_serves_and_keeps_the_admin_token_in_its_file() {
    let data_dir = tempfile::tempdir().unwrap();
    let (mut child, _log) = server_until_listening(data_dir.path());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the server exited after printing to a closed stdout"
    );
    let token = std::fs::read_to_string(data_dir.path().join("admin.token")).unwrap();
    assert!(!token.trim().is_empty(), "admin.token is empty");
    let status = sigterm_and_wait(&mut child, Duration::from_secs(10));
    assert!(
        status.is_some_and(|status| status.success()),
        "the server should exit with success on SIGTERM, got {status:?}"
    );
}

/// `edgefleet-server serve` on free ports, its stdout closed at once; returns
/// once it logs that it listens, with the rest of its log still to read.
/// `edgefleet-server serve` on ephemeral ports, not yet spawned.
fn ephemeral_server_command(
    data_dir: &std::path::Path,
    database_url: Option<&str>,
) -> std::process::Command {
    Server::command(data_dir, database_url, &[], Listen::ephemeral())
}

fn server_until_listening(
    data_dir: &std::path::Path,
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStderr>,
) {
    use std::io::BufRead;
    let mut child = ephemeral_server_command(data_dir, None)
        .env("EDGEFLEET_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut log = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("edgefleet-server listening") {
        line.clear();
        let read = log.read_line(&mut line).unwrap();
        assert!(read > 0, "the server exited before listening");
    }
    (child, log)
}

#[test]
fn telemetry_waits_for_the_upload_interval_but_urgent_events_go_at_once() {
    let fx = Fixture::new(Db::Sqlite);
    let server = fx.server(&[
        "--telemetry-interval",
        "1s",
        "--telemetry-upload-interval",
        "60s",
    ]);
    let state = fx.state_dir("agent");
    let device = enroll_ok(&server, &server.join_token(&[]), &state);
    let _agent = Agent::run(&state, &["--repository-poll-interval", "1s"]);
    eventually(Duration::from_secs(20), "the device online", || {
        (server.device(&device)["status"] == "online").then_some(())
    });
    // Batches are made every second, and wait in the queue for the upload
    // (with FAST's 1 s upload interval they would not pile up).
    let queued = eventually(Duration::from_secs(30), "batches waiting", || {
        let stored = telemetry_sequence(&server, &device);
        let queued = *queued_sequences(&state).last()?;
        (queued >= stored + 4).then_some(queued)
    });
    // A model failing to load is urgent: everything queued goes at once.
    let started = Instant::now();
    let broken = state.join("models/broken/1");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("model.onnx"), b"not an onnx model").unwrap();
    eventually(Duration::from_secs(20), "the failure uploaded", || {
        (telemetry_sequence(&server, &device) > queued).then_some(())
    });
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the urgent upload took {:?}",
        started.elapsed()
    );
    assert_contiguous(&server, &device);
}

/// Asserts gRPC health reports every service of `services` as SERVING.
async fn assert_serving(channel: tonic::transport::Channel, services: &[String]) {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in services {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.clone(),
            })
            .await
            .unwrap_or_else(|status| panic!("Health/Check {service}: {status:?}"))
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }
}

/// Each gRPC listener's reflection lists exactly the services it serves
/// (plus health and reflection), and health reports each of them SERVING.
#[test]
fn each_grpc_listener_reflects_and_reports_the_health_of_exactly_its_services() {
    let fx = Fixture::new(Db::Sqlite);
    let server = fx.server(&[]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let ca_pem = std::fs::read_to_string(server.data_dir.join("ca.crt")).unwrap();
        let tls = edgefleet_pki::ca_client_tls_config(&ca_pem).unwrap();
        let agents = edgefleet_pki::connect_tls(&server.agent_url, tls, Duration::from_secs(5))
            .await
            .unwrap();
        let operators = server.operator_channel().await;
        for (channel, served) in [
            (agents, &["edgefleet.v1.AgentService"][..]),
            (
                operators,
                &[
                    "edgefleet.v1.ModelService",
                    "edgefleet.v1.OperatorService",
                    "edgefleet.v1.RolloutService",
                ][..],
            ),
        ] {
            let services = reflected_services(channel.clone()).await;
            let mut expected: Vec<&str> = served.to_vec();
            expected.extend([
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
            ]);
            expected.sort();
            assert_eq!(services, expected);
            let served: Vec<String> = served.iter().map(|s| s.to_string()).collect();
            assert_serving(channel, &served).await;
        }
    });
}

/// A bad config is reported in exactly one line on stderr: every problem on
/// it, and a file that does not parse as TOML by its message and place
/// (not the parser's multi-line snippet).
#[test]
fn a_bad_config_is_reported_in_exactly_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    let one_line = |extra: &[&str], words: &[&str]| {
        let output = Server::command(&dir.path().join("data"), None, extra, Listen::ephemeral())
            .env("EDGEFLEET_LOG", "info")
            .output()
            .unwrap();
        assert!(!output.status.success(), "{extra:?} should fail");
        let stderr = stderr(&output);
        assert_eq!(
            stderr.lines().count(),
            1,
            "{extra:?}: not one line:\n{stderr}"
        );
        assert!(stderr.starts_with("edgefleet-server: "), "{stderr}");
        for words in words {
            assert!(
                stderr.contains(words),
                "{extra:?}: missing '{words}' in:\n{stderr}"
            );
        }
    };
    let path = config.to_str().unwrap();
    std::fs::write(&config, "api_addr = \"127.0.0.1:0\"\nhttp_addr = = 3\n").unwrap();
    one_line(
        &["--config", path],
        &[
            "invalid config file",
            "server.toml",
            "toml: line 2, column 13: ",
        ],
    );
    std::fs::write(&config, "port = 3\n").unwrap();
    one_line(
        &["--config", path],
        &["toml: line 1, column 1: unknown field `port`"],
    );
    one_line(
        &["--telemetry-interval", "0s", "--max-model-bytes", "0"],
        &["invalid configuration: telemetry_interval must be longer than zero; max_model_bytes"],
    );
}

/// Without `--data-dir` the server picks one as a Linux daemon does; for a
/// user other than root, `$XDG_DATA_HOME/edgefleet-server`, else
/// `~/.local/share/edgefleet-server`. It creates the dir (0700), says which
/// it uses, and keeps its database there. (Run by root, the test runs the
/// server as `nobody`, whose default is under HOME; root's,
/// /var/lib/edgefleet-server, is for the unit test.)
#[test]
fn without_a_data_dir_the_server_keeps_its_data_in_the_users_data_home() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    let home = tempfile::tempdir().unwrap();
    let as_root = home.path().metadata().unwrap().uid() == 0;
    let server_binary = if as_root {
        // Where the unprivileged user can run it whatever the permissions
        // of the build directory.
        let copy = home.path().join("edgefleet-server");
        std::fs::copy(binary("edgefleet-server"), &copy).unwrap();
        std::os::unix::fs::chown(home.path(), Some(65534), Some(65534)).unwrap();
        copy
    } else {
        binary("edgefleet-server")
    };
    let xdg = home.path().join("xdg");
    for (xdg_data_home, data_dir) in [
        (Some(&xdg), xdg.join("edgefleet-server")),
        (None, home.path().join(".local/share/edgefleet-server")),
    ] {
        let mut command = std::process::Command::new(&server_binary);
        command
            .arg("serve")
            .args(["--agent-addr", "127.0.0.1:0"])
            .args(["--api-addr", "127.0.0.1:0"])
            .args(["--http-addr", "127.0.0.1:0"])
            .env("HOME", home.path())
            .env_remove("XDG_DATA_HOME")
            .env_remove("EDGEFLEET_SERVER_DATA_DIR")
            .env_remove("EDGEFLEET_SERVER_DATABASE_URL")
            .env_remove("EDGEFLEET_SERVER_CONFIG");
        if let Some(dir) = xdg_data_home {
            command.env("XDG_DATA_HOME", dir);
        }
        if as_root {
            command.uid(65534).gid(65534);
        }
        let mut server = Process::spawn(command, "server");
        let listening =
            server.wait_for_stderr("edgefleet-server listening", Duration::from_secs(60));
        let used = server.stderr.wait_for("using the data dir", Duration::ZERO);
        assert!(
            used.contains(data_dir.to_str().unwrap()),
            "{xdg_data_home:?}: {used}"
        );
        assert!(data_dir.join("edgefleet.db").is_file(), "{data_dir:?}");
        let mode = data_dir.metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{data_dir:?}");
        // It serves: the CLI lists its (no) devices with the token it made.
        let token = std::fs::read_to_string(data_dir.join("admin.token")).unwrap();
        let api_url = field(&listening, "api");
        let listed = std::process::Command::new(support::binary("edgefleet"))
            .args(["--server", &api_url, "--token", token.trim()])
            .arg("--ca-cert")
            .arg(data_dir.join("ca.crt"))
            .args(["devices", "list", "--output", "json"])
            .output()
            .unwrap();
        assert!(listed.status.success(), "{}", stderr(&listed));
        assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), "[]");
        server.kill();
    }
}
