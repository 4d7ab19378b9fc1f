//! `edgefleet-server backup`: taken from a running server, a backup is a
//! data dir that another server starts from with the whole fleet in it; a
//! backup that cannot be whole leaves nothing behind.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use edgefleet_test_support::{eventually, fixture_model};
use support::*;

fn backup(data_dir: &Path, dest: &Path) -> Output {
    Command::new(binary("edgefleet-server"))
        .arg("backup")
        .arg(dest)
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("EDGEFLEET_SERVER_DATA_DIR")
        .env_remove("EDGEFLEET_SERVER_DATABASE_URL")
        .env_remove("EDGEFLEET_SERVER_CONFIG")
        .output()
        .unwrap()
}

/// A server on `data_dir` with the `mlp` fixture pushed as mlp@1, and the
/// model file's SHA-256.
fn server_with_mlp(data_dir: &Path, database_url: Option<&str>) -> (Server, String) {
    let server = Server::start(data_dir, database_url, &[]);
    let mlp = fixture_model("mlp");
    let pushed = server.cli_json(&["models", "push", mlp.to_str().unwrap(), "--name", "mlp"]);
    let sha256 = pushed["sha256"].as_str().unwrap().to_string();
    (server, sha256)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn ids(list: &serde_json::Value, key: &str) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|item| item[key].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_backup_of_a_running_server_starts_a_server_with_its_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (server, sha256) = server_with_mlp(&data_dir, None);
    let mlp = fixture_model("mlp");
    let token = server.join_token(&["--labels", "site=paris", "--uses", "2"]);
    let device = enroll_ok(&server, &token, &dir.path().join("device"));

    // Taken while the server runs.
    let dest = dir.path().join("backup");
    let output = backup(&data_dir, &dest);
    assert!(output.status.success(), "{}", stderr(&output));
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("model files: 1 "), "{said}");
    assert_eq!(mode(&dest), 0o700);
    for secret in ["ca.key", "release.key", "admin.token", "edgefleet.db"] {
        assert_eq!(mode(&dest.join(secret)), 0o600, "{secret}");
    }
    for same in ["ca.crt", "ca.key", "release.key", "admin.token"] {
        assert_eq!(
            std::fs::read(dest.join(same)).unwrap(),
            std::fs::read(data_dir.join(same)).unwrap(),
            "{same}"
        );
    }
    let blob = dest.join("blobs/sha256").join(&sha256[..2]).join(&sha256);
    assert_eq!(std::fs::read(blob).unwrap(), std::fs::read(&mlp).unwrap());

    // Changes after the backup are not in it.
    server.cli_json(&["models", "push", mlp.to_str().unwrap(), "--name", "later"]);

    // A server started on the backup has the devices, models and tokens, the
    // same CA (devices enrolled with the first still connect) and admin token.
    let restored = Server::start(&dest, None, &[]);
    assert_eq!(restored.admin_token(), server.admin_token());
    assert_eq!(
        ids(&restored.cli_json(&["devices", "list"]), "id"),
        std::slice::from_ref(&device)
    );
    let models = restored.cli_json(&["models", "list"]);
    assert_eq!(ids(&models, "name"), ["mlp"]);
    assert_eq!(models[0]["sha256"], sha256.as_str());
    let tokens = restored.cli_json(&["join-token", "list"]);
    assert_eq!(tokens[0]["uses_left"], 1);
    let second = enroll_ok(&restored, &token, &dir.path().join("device2"));
    assert_ne!(second, device);
}

#[test]
fn a_backup_never_overwrites_and_one_that_fails_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (server, sha256) = server_with_mlp(&data_dir, None);

    // An existing directory is not written into.
    let existing = dir.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    std::fs::write(existing.join("keep"), "mine").unwrap();
    let output = backup(&data_dir, &existing);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("File exists"),
        "{}",
        stderr(&output)
    );
    let left: Vec<_> = std::fs::read_dir(&existing).unwrap().collect();
    assert_eq!(left.len(), 1);

    // A directory that is not a control plane's data dir.
    let dest = dir.path().join("backup");
    let output = backup(dir.path(), &dest);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("is not a control plane's data dir"),
        "{}",
        stderr(&output)
    );
    assert!(!dest.exists());

    // A model file whose bytes no longer match its digest: the backup
    // fails saying which, and removes what it had copied.
    let blob = data_dir
        .join("blobs/sha256")
        .join(&sha256[..2])
        .join(&sha256);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let output = backup(&data_dir, &dest);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains(&format!("{sha256} is corrupt")),
        "{}",
        stderr(&output)
    );
    assert!(!dest.exists(), "a failed backup is removed");
    drop(server);
}

/// On PostgreSQL the database is not in the data dir: the backup copies the
/// CA, keys and every model file, and says the database is pg_dump's to copy.
#[test]
fn a_backup_on_postgres_copies_the_files_and_says_the_database_is_not_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let schema = PgSchema::create();
    let (server, sha256) = server_with_mlp(&data_dir, Some(&schema.url));
    let mlp = fixture_model("mlp");

    let dest = dir.path().join("backup");
    let output = Command::new(binary("edgefleet-server"))
        .arg("backup")
        .arg(&dest)
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--database-url", &schema.url])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("pg_dump"), "{said}");
    assert!(!dest.join("edgefleet.db").exists());
    assert_eq!(mode(&dest.join("ca.key")), 0o600);
    let blob = dest.join("blobs/sha256").join(&sha256[..2]).join(&sha256);
    assert_eq!(std::fs::read(blob).unwrap(), std::fs::read(&mlp).unwrap());
    drop(server);
}

/// A device whose desired state changed after the backup (here: a rollout
/// of v2) holds a newer desired-state generation than the backup's
/// database, and ignores desired states older than its own: it says which
/// it holds in its Hello, the restored server moves its own past it, and
/// the device returns to what the restored fleet says it serves (v1).
#[test]
fn devices_follow_a_server_restored_from_a_backup_older_than_their_state() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut server = Server::start(&data_dir, None, &[]);
    let mlp = fixture_model("mlp");
    let mlp = mlp.to_str().unwrap();
    for version in ["1", "2"] {
        server.cli_json(&["models", "push", mlp, "--name", "mlp", "--version", version]);
    }
    let token = server.join_token(&[]);
    let state = dir.path().join("device");
    enroll_ok(&server, &token, &state);
    let agent = Agent::run_with(
        &state,
        &["--runtime", "tract", "--reconnect-max-delay", "1s"],
    );
    let roll_out = |server: &Server, version: &str| {
        let model = format!("mlp@{version}");
        let output = server.cli(&["rollouts", "create", "--model", &model, "--watch"]);
        assert!(output.status.success(), "{}", stderr(&output));
    };
    roll_out(&server, "1");
    eventually(Duration::from_secs(30), "v1 served", || {
        (agent.served_versions("mlp") == [1]).then_some(())
    });

    let dest = dir.path().join("backup");
    let output = backup(&data_dir, &dest);
    assert!(output.status.success(), "{}", stderr(&output));
    roll_out(&server, "2");
    eventually(Duration::from_secs(30), "v2 served", || {
        (agent.served_versions("mlp") == [2]).then_some(())
    });

    // The server is lost; one started from the backup takes its place.
    let listen = Listen {
        agent: server.agent_addr,
        api: server.api_addr,
        http: server.http_addr,
    };
    server.process.kill();
    let restored = Server::start_on(&dest, None, &[], listen);
    eventually(Duration::from_secs(60), "back on v1, as restored", || {
        (agent.served_versions("mlp") == [1]).then_some(())
    });
    drop(restored);
}
