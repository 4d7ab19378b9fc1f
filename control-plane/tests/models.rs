//! The model registry end to end: a real `edgefleet-server` and the
//! `edgefleet` CLI pushing, listing, getting and deleting models.
//!
//! Needs the registry store (`RegistryStore` for SQLite/PostgreSQL).

mod support;

use std::path::{Path, PathBuf};

use edgefleet_test_support::{eventually, fixture_model};
use serde_json::Value;
use support::{Db, Server, start_server, stderr};

fn blob_files(data_dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.push(path);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(&data_dir.join("blobs"), &mut out);
    out
}

fn sha256_of(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

fn push_list_get_dedupe_reject_delete(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("server");
    let (_schema, server) = start_server(db, dir.path(), &[]);
    let mlp = fixture_model("mlp");
    let digest = sha256_of(&mlp);

    // Push: checked, stored by digest, signed by the fleet.
    let model = server.cli_json(&[
        "models",
        "push",
        mlp.to_str().unwrap(),
        "--name",
        "mlp",
        "--label",
        "team=vision",
    ]);
    assert_eq!(model["name"], "mlp");
    assert_eq!(model["version"], 1);
    assert_eq!(model["sha256"], digest.as_str());
    assert_eq!(model["size_bytes"], std::fs::metadata(&mlp).unwrap().len());
    assert_eq!(model["signed_by"], "fleet");
    assert_eq!(model["labels"]["team"], "vision");
    assert_eq!(model["inputs"][0]["name"], "input");
    assert_eq!(model["inputs"][0]["datatype"], "FP32");
    assert!(model["opset"].as_i64().unwrap() > 0);
    assert!(model["estimated_memory_bytes"].as_u64().unwrap() >= 32 << 20);
    let signature = hex::decode(model["signature"].as_str().unwrap()).unwrap();
    let public_key = hex::decode(model["signature_public_key"].as_str().unwrap()).unwrap();
    edgefleet_pki::verify_model_signature(&public_key, &digest, &signature).unwrap();

    // List and get.
    let list = server.cli_json(&["models", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["sha256"], digest.as_str());
    let got = server.cli_json(&["models", "get", "mlp@1"]);
    assert_eq!(got, model);
    let latest = server.cli_json(&["models", "get", "mlp"]);
    assert_eq!(latest["version"], 1);
    let table = server.cli(&["models", "list"]);
    assert!(table.status.success(), "{}", stderr(&table));
    assert!(String::from_utf8_lossy(&table.stdout).contains("mlp"));

    // The same file again: as the same version (a no-op), then as the next
    // version; one blob either way.
    let again = server.cli_json(&[
        "models",
        "push",
        mlp.to_str().unwrap(),
        "--name",
        "mlp",
        "--version",
        "1",
        "--label",
        "team=vision",
    ]);
    assert_eq!(again["sha256"], digest.as_str());
    assert_eq!(again["version"], 1);
    let second = server.cli_json(&["models", "push", mlp.to_str().unwrap(), "--name", "mlp"]);
    assert_eq!(second["version"], 2);
    assert_eq!(second["sha256"], digest.as_str());
    assert_eq!(
        blob_files(&data_dir).len(),
        1,
        "{:?}",
        blob_files(&data_dir)
    );
    assert_eq!(
        server
            .cli_json(&["models", "list", "--name", "mlp"])
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Other content under an existing version: ALREADY_EXISTS.
    let conv = fixture_model("conv");
    let clash = server.cli(&[
        "models",
        "push",
        conv.to_str().unwrap(),
        "--name",
        "mlp",
        "--version",
        "1",
    ]);
    assert!(!clash.status.success());
    assert!(
        stderr(&clash).contains("already exists"),
        "{}",
        stderr(&clash)
    );
    assert_eq!(
        blob_files(&data_dir).len(),
        1,
        "{:?}",
        blob_files(&data_dir)
    );

    // Not ONNX, and empty: refused clearly, nothing kept.
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, "this is not an ONNX model\n".repeat(100)).unwrap();
    let refused = server.cli(&["models", "push", junk.to_str().unwrap(), "--name", "junk"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("not a valid ONNX model"),
        "{}",
        stderr(&refused)
    );
    let empty = dir.path().join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    let refused = server.cli(&["models", "push", empty.to_str().unwrap(), "--name", "empty"]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("empty"), "{}", stderr(&refused));
    assert_eq!(
        blob_files(&data_dir).len(),
        1,
        "{:?}",
        blob_files(&data_dir)
    );
    let missing = server.cli(&["models", "get", "junk"]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("NotFound"),
        "{}",
        stderr(&missing)
    );

    // Bad names and references.
    let bad = server.cli(&["models", "push", mlp.to_str().unwrap(), "--name", "a/b"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("model name"), "{}", stderr(&bad));
    let no_version = server.cli(&["models", "delete", "mlp"]);
    assert!(!no_version.status.success());

    // Delete: the blob goes with the last version that uses it.
    let deleted = server.cli(&["models", "delete", "mlp@1"]);
    assert!(deleted.status.success(), "{}", stderr(&deleted));
    assert_eq!(blob_files(&data_dir).len(), 1);
    let gone = server.cli(&["models", "get", "mlp@1"]);
    assert!(!gone.status.success());
    assert!(stderr(&gone).contains("NotFound"), "{}", stderr(&gone));
    let deleted = server.cli(&["models", "delete", "mlp@2"]);
    assert!(deleted.status.success(), "{}", stderr(&deleted));
    assert!(
        blob_files(&data_dir).is_empty(),
        "{:?}",
        blob_files(&data_dir)
    );
    let list: Value = server.cli_json(&["models", "list"]);
    assert!(list.as_array().unwrap().is_empty(), "{list}");
    let again = server.cli(&["models", "delete", "mlp@2"]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("NotFound"), "{}", stderr(&again));
}

#[test]
fn push_list_get_dedupe_reject_delete_sqlite() {
    push_list_get_dedupe_reject_delete(Db::Sqlite);
}

#[test]
fn push_list_get_dedupe_reject_delete_postgres() {
    push_list_get_dedupe_reject_delete(Db::Postgres);
}

fn size_limit_is_enforced(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("server");
    let (_schema, server) = start_server(db, dir.path(), &["--max-model-bytes", "1000"]);
    let conv = fixture_model("conv");
    assert!(std::fs::metadata(&conv).unwrap().len() > 1000);
    let refused = server.cli(&["models", "push", conv.to_str().unwrap(), "--name", "conv"]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("limit"), "{}", stderr(&refused));
    assert!(
        blob_files(&data_dir).is_empty(),
        "{:?}",
        blob_files(&data_dir)
    );
}

#[test]
fn size_limit_is_enforced_sqlite() {
    size_limit_is_enforced(Db::Sqlite);
}

#[test]
fn size_limit_is_enforced_postgres() {
    size_limit_is_enforced(Db::Postgres);
}

fn versions_stop_at_the_largest_a_database_can_order(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let (_schema, server) = start_server(db, dir.path(), &[]);
    let mlp = fixture_model("mlp");
    let mlp = mlp.to_str().unwrap();
    let top = i64::MAX.to_string();
    let over = (i64::MAX as u64 + 1).to_string();
    let refused = server.cli(&["models", "push", mlp, "--name", "m", "--version", &over]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("over the largest"),
        "{}",
        stderr(&refused)
    );
    let pushed = server.cli(&["models", "push", mlp, "--name", "m", "--version", &top]);
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    // No version after it to pick.
    let refused = server.cli(&["models", "push", mlp, "--name", "m"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("largest version"),
        "{}",
        stderr(&refused)
    );
}

#[test]
fn versions_stop_at_the_largest_a_database_can_order_sqlite() {
    versions_stop_at_the_largest_a_database_can_order(Db::Sqlite);
}

#[test]
fn versions_stop_at_the_largest_a_database_can_order_postgres() {
    versions_stop_at_the_largest_a_database_can_order(Db::Postgres);
}

/// Replicas share one PostgreSQL database and one data dir. An operator
/// deletes model `a` (the only version using its content) on one replica
/// while another replica records `b`, a push of the same bytes. The push
/// is held just before it records its version (a third connection holds
/// the advisory lock of model name `b`, the first thing its insert takes),
/// so the delete finds the content unused and removes the file; then the
/// push goes on. `b` must not end up without its file: the push still has
/// its own copy and puts it in place with its version, under the digest's
/// lock (the one the delete held while it checked and removed).
#[test]
fn a_push_racing_a_delete_of_the_same_content_on_another_replica_keeps_its_blob() {
    use sqlx::{Connection, Executor};
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("server");
    let schema = support::PgSchema::create();
    let deleting = Server::start(&data_dir, Some(&schema.url), &[]);
    let pushing = Server::start(&data_dir, Some(&schema.url), &[]);
    let mlp = fixture_model("mlp");
    let mlp = mlp.to_str().unwrap();
    let digest = sha256_of(Path::new(mlp));
    let blob = data_dir
        .join("blobs/sha256")
        .join(&digest[..2])
        .join(&digest);
    deleting.cli_json(&["models", "push", mlp, "--name", "a", "--version", "1"]);
    assert!(blob.exists());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut holder = runtime
        .block_on(sqlx::PgConnection::connect(&schema.url))
        .unwrap();
    let holder_pid: i32 = runtime.block_on(async {
        holder.execute("BEGIN").await.unwrap();
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.edgefleet.model.' || $1))",
        )
        .bind("b")
        .execute(&mut holder)
        .await
        .unwrap();
        sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut holder)
            .await
            .unwrap()
    });
    std::thread::scope(|scope| {
        let push =
            scope.spawn(|| pushing.cli(&["models", "push", mlp, "--name", "b", "--version", "1"]));
        eventually(
            std::time::Duration::from_secs(30),
            "the push of b waits for its model's lock",
            || {
                let waiting: i64 = runtime
                    .block_on(
                        sqlx::query_scalar(
                            "SELECT count(*) FROM pg_stat_activity \
                             WHERE $1 = ANY(pg_blocking_pids(pid))",
                        )
                        .bind(holder_pid)
                        .fetch_one(&mut holder),
                    )
                    .unwrap();
                (waiting > 0).then_some(())
            },
        );
        let deleted = deleting.cli(&["models", "delete", "a@1"]);
        assert!(deleted.status.success(), "{}", stderr(&deleted));
        assert!(!blob.exists(), "a's delete found the content unused");
        runtime.block_on(holder.execute("ROLLBACK")).unwrap();
        let pushed = push.join().unwrap();
        assert!(pushed.status.success(), "{}", stderr(&pushed));
    });
    let b = deleting.cli_json(&["models", "get", "b@1"]);
    assert_eq!(b["sha256"], digest.as_str());
    assert!(blob.exists(), "b@1 is recorded without its blob");
    assert_eq!(sha256_of(&blob), digest);
    // Only the blob is left: no upload's temporary file.
    assert_eq!(blob_files(&data_dir), vec![blob]);
}
