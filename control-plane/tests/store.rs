//! The storage suite: every test runs against SQLite (a temporary file) and
//! PostgreSQL (`EDGEFLEET_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`, one fresh schema per test,
//! dropped afterwards).

mod support;

use std::path::PathBuf;
use std::sync::Arc;

use edgefleet_control_plane::store::{
    self, CertificateRenewal, Device, DeviceModel, DeviceStatus, EventRecord, HelloRecord,
    Inventory, JoinToken, JoinTokenRefusal, Labels, ModelPoint, ModelSample, NewDevice,
    OperatorToken, Resolution, RolloutTarget, Store, StoreError, TelemetryRecord,
};
use edgefleet_proto::edgefleet::v1::{DeviceTelemetry, LogHistogram};
use sqlx::{AssertSqlSafe, Connection, Executor};
use support::postgres_base_url;

const HOUR: i64 = 3_600_000;
/// 2025-01-01 00:00 UTC, an hour boundary.
const T0: i64 = 1_735_689_600_000;

enum Backend {
    Sqlite { dir: tempfile::TempDir },
    Postgres { schema: String },
}

/// A store under test and what is needed to reopen it and to poke at its
/// tables directly.
struct Db {
    store: Arc<dyn Store>,
    backend: Backend,
}

impl Db {
    async fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let store = store::sqlite::open_file(&dir.path().join("edgefleet.db"))
            .await
            .unwrap();
        Db {
            store,
            backend: Backend::Sqlite { dir },
        }
    }

    async fn postgres() -> Db {
        let backend = Backend::fresh_postgres_schema().await;
        let store = store::postgres::open(&backend.url()).await.unwrap();
        Db { store, backend }
    }

    /// Opens the same database again (a new pool, migrations re-checked).
    async fn reopen(&self) -> Result<Arc<dyn Store>, StoreError> {
        match &self.backend {
            Backend::Sqlite { dir } => {
                store::sqlite::open_file(&dir.path().join("edgefleet.db")).await
            }
            Backend::Postgres { .. } => store::postgres::open(&self.backend.url()).await,
        }
    }

    /// A BLOB/BYTEA literal of hex bytes in this backend's dialect.
    fn bytes(&self, hex: &str) -> String {
        match self.backend {
            Backend::Sqlite { .. } => format!("x'{hex}'"),
            Backend::Postgres { .. } => format!("'\\x{hex}'::bytea"),
        }
    }

    /// Runs SQL directly on the database, behind the store's back.
    async fn raw(&self, sql: &str) {
        let sql = sql.to_string();
        match &self.backend {
            Backend::Sqlite { dir } => {
                let mut conn = sqlx::SqliteConnection::connect(&format!(
                    "sqlite://{}",
                    dir.path().join("edgefleet.db").display()
                ))
                .await
                .unwrap();
                conn.execute(AssertSqlSafe(sql)).await.unwrap();
                conn.close().await.unwrap();
            }
            Backend::Postgres { .. } => {
                let mut conn = sqlx::PgConnection::connect(&self.backend.url())
                    .await
                    .unwrap();
                conn.execute(AssertSqlSafe(sql)).await.unwrap();
                conn.close().await.unwrap();
            }
        }
    }

    /// Whether another connection could take, right now, the lock under
    /// which the store does a blob digest's file work (see
    /// `store::registry::BlobWork`): PostgreSQL's advisory lock of the
    /// digest, SQLite's write lock. Taken and released at once if free.
    async fn blob_lock_free(&self, sha256: &str) -> bool {
        match &self.backend {
            Backend::Sqlite { .. } => {
                use std::str::FromStr;
                let options = sqlx::sqlite::SqliteConnectOptions::from_str(&self.backend.url())
                    .unwrap()
                    .busy_timeout(std::time::Duration::ZERO);
                let mut conn = sqlx::SqliteConnection::connect_with(&options)
                    .await
                    .unwrap();
                let free = match conn.execute("BEGIN IMMEDIATE").await {
                    Ok(_) => {
                        conn.execute("ROLLBACK").await.unwrap();
                        true
                    }
                    Err(err) => {
                        assert!(err.to_string().contains("locked"), "{err}");
                        false
                    }
                };
                conn.close().await.unwrap();
                free
            }
            Backend::Postgres { .. } => {
                let mut conn = sqlx::PgConnection::connect(&self.backend.url())
                    .await
                    .unwrap();
                let key = "hashtextextended(current_schema() || '.edgefleet.blob.' || $1, 0)";
                let free: bool = sqlx::query_scalar(AssertSqlSafe(format!(
                    "SELECT pg_try_advisory_lock({key})"
                )))
                .bind(sha256)
                .fetch_one(&mut conn)
                .await
                .unwrap();
                conn.close().await.unwrap();
                free
            }
        }
    }

    /// The plan of a query, one line per step (SQLite's EXPLAIN QUERY PLAN
    /// details, PostgreSQL's EXPLAIN text with sequential scans disabled:
    /// the test tables are too small for the planner to bother otherwise).
    async fn query_plan(&self, sql: &str) -> Vec<String> {
        use sqlx::Row;
        match &self.backend {
            Backend::Sqlite { .. } => {
                let mut conn = sqlx::SqliteConnection::connect(&self.backend.url())
                    .await
                    .unwrap();
                let rows = sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
                    .fetch_all(&mut conn)
                    .await
                    .unwrap();
                conn.close().await.unwrap();
                rows.iter().map(|r| r.get::<String, _>("detail")).collect()
            }
            Backend::Postgres { .. } => {
                let mut conn = sqlx::PgConnection::connect(&self.backend.url())
                    .await
                    .unwrap();
                conn.execute("SET enable_seqscan = off").await.unwrap();
                let rows = sqlx::query(AssertSqlSafe(format!("EXPLAIN {sql}")))
                    .fetch_all(&mut conn)
                    .await
                    .unwrap();
                conn.close().await.unwrap();
                rows.iter().map(|r| r.get::<String, _>(0)).collect()
            }
        }
    }
}

impl Backend {
    /// A new, empty schema of the test database (dropped with the value).
    async fn fresh_postgres_schema() -> Backend {
        let schema = format!("t_{:016x}", rand::random::<u64>());
        let mut conn = sqlx::PgConnection::connect(&postgres_base_url())
            .await
            .expect("PostgreSQL for the store tests (EDGEFLEET_TEST_POSTGRES_URL)");
        conn.execute(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .await
            .unwrap();
        conn.close().await.unwrap();
        Backend::Postgres { schema }
    }

    fn url(&self) -> String {
        match self {
            Backend::Sqlite { dir } => {
                format!("sqlite://{}", dir.path().join("edgefleet.db").display())
            }
            Backend::Postgres { schema } => {
                let base = postgres_base_url();
                let sep = if base.contains('?') { '&' } else { '?' };
                format!("{base}{sep}options=-c%20search_path%3D{schema}")
            }
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Backend::Postgres { schema } = self {
            let schema = schema.clone();
            // Async work in Drop: a thread with its own runtime (runs after a
            // failed test too).
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&postgres_base_url()).await {
                        let _ = conn
                            .execute(AssertSqlSafe(format!(
                                "DROP SCHEMA IF EXISTS {schema} CASCADE"
                            )))
                            .await;
                        let _ = conn.close().await;
                    }
                });
            })
            .join();
        }
    }
}

/// Generates one test per backend for each async fn taking `&Db`.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = super::Db::sqlite().await;
                    super::$name(&db).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = super::Db::postgres().await;
                    super::$name(&db).await;
                }
            )*
        }
    };
}

suite!(
    operator_tokens_roundtrip,
    the_first_operator_token_is_stored_once,
    enrollment_takes_a_use_and_copies_labels,
    enrollment_refusals,
    failed_device_insert_keeps_the_use,
    join_tokens_are_revoked_and_listed,
    concurrent_enrollments_never_exceed_uses,
    devices_by_selector,
    devices_by_selector_with_any_label_text,
    rollout_targets_are_the_devices_rows,
    device_changes_move_with_what_a_rollout_reads,
    concurrent_device_changes_each_move_the_counter,
    devices_paged_by_selector,
    revoke_and_revocations_since,
    labels_are_replaced_and_selected_on,
    hello_certificate_and_touch,
    touches_in_one_call_keep_each_devices_latest,
    hellos_in_one_call_keep_each_devices_last,
    renewal_retires_the_old_certificate_once_the_new_one_is_used,
    join_tokens_are_checked_without_taking_a_use,
    ingest_dedupes,
    ingest_skips_unknown_devices,
    concurrent_ingests_store_each_batch_once,
    concurrent_ingests_of_new_batches_add_up,
    health_comes_from_the_highest_sequence,
    totals_accumulate,
    absurd_counts_saturate_totals_and_spoil_nothing,
    raw_series,
    rollup_merges_histograms_and_prune_keeps_unrolled,
    late_data_rewrites_its_hour,
    fleet_totals_count_each_hour_once,
    events_roundtrip,
    schema_too_new_is_refused,
    reopening_keeps_data,
    corrupt_protobuf_is_an_error,
    samples_stored_before_migration_3_are_converted,
    received_series_of_a_device_finds_its_window_by_index,
    received_series_is_by_the_servers_clock,
    received_series_of_several_devices_reckons_each_upload_on_its_own,
    received_series_leaves_out_batches_made_before_the_window,
    received_series_leaves_out_a_backlog_upload_of_batches_made_before_the_window,
    received_series_reckons_an_unstamped_upload_from_its_newest_batch,
    batches_from_a_clock_far_ahead_are_rolled_up_and_pruned,
    rollups_past_their_retention_are_deleted,
    batches_stored_far_ahead_before_the_clamp_are_clamped,
);

/// PostgreSQL only: a database whose device change counter was one row
/// (migration 0012) keeps its count when 0013 splits it into slots, and a
/// replica still without 0013 fails to read it (its rollout engine's passes
/// fail) instead of reading one slot as the whole count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_counter_slots_keep_the_count_and_fail_older_readers() {
    let backend = Backend::fresh_postgres_schema().await;
    let mut conn = sqlx::PgConnection::connect(&backend.url()).await.unwrap();
    sqlx::migrate!("../migrations/postgres")
        .run_to(12, &mut conn)
        .await
        .unwrap();
    conn.execute("UPDATE device_changes SET version = 41")
        .await
        .unwrap();
    conn.close().await.unwrap();

    let store = store::postgres::open(&backend.url()).await.unwrap();
    assert_eq!(store.device_changes().await.unwrap(), 41, "the count kept");
    let db = Db { store, backend };
    enroll(&db, &["a"], Labels::new()).await;
    assert_eq!(db.store.device_changes().await.unwrap(), 42);

    // What a replica without 0013 reads the counter with.
    let mut conn = sqlx::PgConnection::connect(&db.backend.url())
        .await
        .unwrap();
    let older = sqlx::query_scalar::<_, i64>("SELECT version FROM device_changes")
        .fetch_one(&mut conn)
        .await;
    assert!(older.is_err(), "an older replica read {older:?}");
    conn.close().await.unwrap();
}

/// PostgreSQL only: a database error reads as PostgreSQL says it, with its
/// detail, hint and SQLSTATE, and not with sqlx's " at line N" (N a line of
/// PostgreSQL's own C source, which an operator would take for one of
/// theirs): opening the store as a role that does not exist, and statements
/// that fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_errors_give_their_sqlstate_not_a_line_of_postgres_source() {
    let base = postgres_base_url();
    let (_, rest) = base.split_once("://").unwrap();
    let host_and_db = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let no_such_role = format!("postgres://edgefleet_no_such_role@{host_and_db}");
    let Err(err) = store::postgres::open(&no_such_role).await else {
        panic!("opened the store as a role that does not exist");
    };
    assert_eq!(
        edgefleet_pki::error_chain(&err),
        "cannot open the database: PostgreSQL: error returned from database: \
         role \"edgefleet_no_such_role\" does not exist [SQLSTATE 28000]"
    );

    let mut conn = sqlx::PgConnection::connect(&base).await.unwrap();
    conn.execute("CREATE TEMPORARY TABLE once (id integer PRIMARY KEY)")
        .await
        .unwrap();
    async fn failed(conn: &mut sqlx::PgConnection, sql: &'static str) -> String {
        let err = conn.execute(sql).await.expect_err(sql);
        // As the server's last error line and the log write it: the error
        // and its causes.
        edgefleet_pki::error_chain(&StoreError::from(err))
    }
    conn.execute("INSERT INTO once VALUES (1)").await.unwrap();
    assert_eq!(
        failed(&mut conn, "INSERT INTO once VALUES (1)").await,
        "database error: error returned from database: duplicate key value violates \
         unique constraint \"once_pkey\" (Key (id)=(1) already exists.) [SQLSTATE 23505]"
    );
    let text = failed(&mut conn, "SELECT edgefleet_no_such_function(1)").await;
    assert!(
        text.starts_with(
            "database error: error returned from database: function \
             edgefleet_no_such_function(integer) does not exist; hint: No function matches"
        ) && text.ends_with(" [SQLSTATE 42883]"),
        "{text}"
    );
    conn.close().await.unwrap();
}

// ---------------------------------------------------------------- helpers

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn join_token(id: &str, uses: u32, expires_at: i64, l: Labels) -> JoinToken {
    JoinToken {
        id: id.into(),
        secret_hash: format!("hash-of-{id}"),
        labels: l,
        created_at: T0,
        expires_at,
        uses_left: uses,
        created_by: "op1".into(),
        revoked_at: None,
    }
}

fn new_device(id: &str, at: i64) -> NewDevice {
    NewDevice {
        id: id.into(),
        inventory: Inventory {
            cpu_model: "Cortex-A72".into(),
            cpu_cores: 4,
            memory_bytes: 4 << 30,
            arch: "aarch64".into(),
            os: "linux".into(),
            accelerators: vec![],
            agent_version: "0.1.0".into(),
            runtimes: vec!["tract".into()],
            hostname: format!("{id}.local"),
        },
        enrolled_at: at,
        certificate_serial: format!("serial-{id}"),
        certificate_expires_at: at + 30 * 24 * HOUR,
    }
}

/// Enrolls devices `ids` through a fresh join token carrying `l`.
async fn enroll(db: &Db, ids: &[&str], l: Labels) -> Vec<Device> {
    let token = join_token(
        &format!("jt-{}", ids.join("-")),
        ids.len() as u32,
        T0 + 24 * HOUR,
        l,
    );
    db.store.insert_join_token(&token).await.unwrap();
    let mut out = Vec::new();
    for id in ids {
        out.push(
            db.store
                .enroll_device(&token.id, &token.secret_hash, &new_device(id, T0))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    out
}

fn hist(values: &[u64]) -> LogHistogram {
    let mut h = LogHistogram::default();
    for &v in values {
        h.record(v);
    }
    h
}

fn sample(name: &str, requests: u64, latencies: &[u64], depth: u32) -> ModelSample {
    ModelSample {
        name: name.into(),
        version: 1,
        requests,
        errors: requests / 10,
        local: requests - requests / 4,
        offloaded: requests / 4,
        latency_us: hist(latencies),
        batch_size: hist(&[1, 2, 4]),
        max_queue_depth: depth,
    }
}

fn telemetry(cpu: u32) -> DeviceTelemetry {
    DeviceTelemetry {
        cpu_permille: cpu,
        memory_used_bytes: 1 << 30,
        memory_total_bytes: 4 << 30,
        temperature_millicelsius: Some(51_000),
        runtime: "tract".into(),
        ..Default::default()
    }
}

/// A 10 s batch starting at `start`.
fn batch(device: &str, sequence: u64, start: i64, models: Vec<ModelSample>) -> TelemetryRecord {
    TelemetryRecord {
        device_id: device.into(),
        sequence,
        received_at: start + 10_500,
        start_at: start,
        end_at: start + 10_000,
        // As a batch stored before migration 0010 (the queries reckon it).
        server_end_at: None,
        models,
        device: Some(telemetry(sequence as u32)),
        events: vec![],
        dropped_batches_total: 0,
    }
}

// ---------------------------------------------------------------- tests

async fn operator_tokens_roundtrip(db: &Db) {
    assert_eq!(db.store.count_operator_tokens().await.unwrap(), 0);
    let live = OperatorToken {
        id: "op1".into(),
        name: "admin".into(),
        secret_hash: "aa".repeat(32),
        role: "admin".into(),
        created_at: T0,
        revoked_at: None,
    };
    let revoked = OperatorToken {
        id: "op2".into(),
        name: "old".into(),
        secret_hash: "bb".repeat(32),
        role: "admin".into(),
        created_at: T0,
        revoked_at: Some(T0 + 5),
    };
    db.store.insert_operator_token(&live).await.unwrap();
    db.store.insert_operator_token(&revoked).await.unwrap();
    assert_eq!(
        db.store
            .operator_token_by_hash(&live.secret_hash)
            .await
            .unwrap(),
        Some(live.clone())
    );
    assert_eq!(
        db.store
            .operator_token_by_hash(&revoked.secret_hash)
            .await
            .unwrap(),
        None
    );
    assert_eq!(db.store.operator_token_by_hash("cc").await.unwrap(), None);
    assert_eq!(db.store.count_operator_tokens().await.unwrap(), 2);
    // Same id again: an error, not a silent overwrite.
    assert!(db.store.insert_operator_token(&live).await.is_err());
}

/// Servers starting together each try to store a first admin token: the
/// database takes exactly one, through separate stores (pools) as separate
/// processes would.
async fn the_first_operator_token_is_stored_once(db: &Db) {
    let token = |i: usize| OperatorToken {
        id: format!("first{i}"),
        name: "admin".into(),
        secret_hash: format!("{i:064x}"),
        role: "admin".into(),
        created_at: T0,
        revoked_at: None,
    };
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = db.reopen().await.unwrap();
        let token = token(i);
        tasks.push(tokio::spawn(async move {
            store.insert_first_operator_token(&token).await.unwrap()
        }));
    }
    let mut inserted = 0;
    for task in tasks {
        inserted += usize::from(task.await.unwrap());
    }
    assert_eq!(inserted, 1);
    assert_eq!(db.store.count_operator_tokens().await.unwrap(), 1);
    assert!(
        !db.store
            .insert_first_operator_token(&token(9))
            .await
            .unwrap()
    );
}

async fn enrollment_takes_a_use_and_copies_labels(db: &Db) {
    assert_eq!(
        db.store.kind(),
        if matches!(db.backend, Backend::Sqlite { .. }) {
            "sqlite"
        } else {
            "postgres"
        }
    );
    let l = labels(&[("site", "paris"), ("tier", "edge")]);
    let token = join_token("jt1", 2, T0 + HOUR, l.clone());
    db.store.insert_join_token(&token).await.unwrap();
    let nd = new_device("dev-a", T0 + 10);
    let device = db
        .store
        .enroll_device("jt1", &token.secret_hash, &nd)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(device.id, "dev-a");
    assert_eq!(device.labels, l);
    assert_eq!(device.inventory, nd.inventory);
    assert_eq!(device.status, DeviceStatus::Enrolled);
    assert_eq!(device.enrolled_at, T0 + 10);
    assert_eq!(device.revoked_at, None);
    assert_eq!(device.certificate_serial, "serial-dev-a");
    assert_eq!(device.certificate_expires_at, nd.certificate_expires_at);
    assert_eq!(device.last_seen, 0);
    assert_eq!(device.last_sequence, 0);
    assert_eq!(device.health, None);
    assert!(device.models.is_empty());
    assert_eq!(db.store.device("dev-a").await.unwrap(), Some(device));
    assert_eq!(db.store.device("nope").await.unwrap(), None);
    // One use left, then none.
    db.store
        .enroll_device("jt1", &token.secret_hash, &new_device("dev-b", T0 + 20))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        db.store
            .enroll_device("jt1", &token.secret_hash, &new_device("dev-c", T0 + 30))
            .await
            .unwrap(),
        Err(JoinTokenRefusal::UsedUp)
    );
    assert_eq!(db.store.device("dev-c").await.unwrap(), None);
}

async fn enrollment_refusals(db: &Db) {
    let token = join_token("jt1", 3, T0 + HOUR, Labels::new());
    db.store.insert_join_token(&token).await.unwrap();
    let refuse = |id: &'static str, hash: String, at: i64| {
        let store = db.store.clone();
        async move {
            store
                .enroll_device(id, &hash, &new_device("dev-x", at))
                .await
                .unwrap()
                .unwrap_err()
        }
    };
    assert_eq!(
        refuse("nope", token.secret_hash.clone(), T0).await,
        JoinTokenRefusal::Unknown
    );
    assert_eq!(
        refuse("jt1", "wrong".into(), T0).await,
        JoinTokenRefusal::Unknown
    );
    // Expired exactly at expires_at.
    assert_eq!(
        refuse("jt1", token.secret_hash.clone(), T0 + HOUR).await,
        JoinTokenRefusal::Expired
    );
    assert_eq!(db.store.device("dev-x").await.unwrap(), None);
    // None of the refusals took a use: three enrollments still work.
    for id in ["d1", "d2", "d3"] {
        db.store
            .enroll_device("jt1", &token.secret_hash, &new_device(id, T0))
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(
        refuse("jt1", token.secret_hash.clone(), T0).await,
        JoinTokenRefusal::UsedUp
    );
    // An expired, used-up token says expired.
    assert_eq!(
        refuse("jt1", token.secret_hash.clone(), T0 + 2 * HOUR).await,
        JoinTokenRefusal::Expired
    );
}

/// `RevokeJoinToken` and `ListJoinTokens`: a revoked token enrolls no
/// device (the refusal says so only to a caller holding its secret) and
/// takes no use; the first revocation time stays; tokens list newest
/// first, a page at a time.
async fn join_tokens_are_revoked_and_listed(db: &Db) {
    let mut older = join_token("jt-a", 2, T0 + HOUR, Labels::new());
    older.created_at = T0 - 10;
    let tied_low = join_token("jt-b", 2, T0 + HOUR, labels(&[("site", "paris")]));
    let tied_high = join_token("jt-c", 1, T0 + HOUR, Labels::new());
    for token in [&tied_low, &older, &tied_high] {
        db.store.insert_join_token(token).await.unwrap();
    }
    let ids = |tokens: Vec<JoinToken>| tokens.into_iter().map(|t| t.id).collect::<Vec<_>>();
    let page = |after: Option<(i64, &'static str)>, limit| async move {
        ids(db.store.join_tokens(after, limit).await.unwrap())
    };
    // Newest first; created in the same millisecond, by id descending.
    assert_eq!(page(None, 10).await, ["jt-c", "jt-b", "jt-a"]);
    assert_eq!(page(None, 1).await, ["jt-c"]);
    assert_eq!(page(Some((T0, "jt-c")), 1).await, ["jt-b"]);
    assert_eq!(page(Some((T0, "jt-b")), 5).await, ["jt-a"]);
    assert!(page(Some((T0 - 10, "jt-a")), 5).await.is_empty());

    db.store
        .enroll_device("jt-b", &tied_low.secret_hash, &new_device("d1", T0))
        .await
        .unwrap()
        .unwrap();
    let revoked = db
        .store
        .revoke_join_token("jt-b", T0 + 5)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revoked.revoked_at, Some(T0 + 5));
    assert_eq!(revoked.uses_left, 1);
    assert_eq!(revoked.labels, tied_low.labels);
    assert_eq!(revoked.state(T0 + 6), "revoked");
    // Again: the first revocation time stays.
    let again = db.store.revoke_join_token("jt-b", T0 + 50).await.unwrap();
    assert_eq!(again.unwrap().revoked_at, Some(T0 + 5));
    assert_eq!(db.store.revoke_join_token("nope", T0).await.unwrap(), None);

    assert_eq!(
        db.store
            .check_join_token("jt-b", &tied_low.secret_hash, T0 + 6)
            .await
            .unwrap(),
        Err(JoinTokenRefusal::Revoked)
    );
    assert_eq!(
        db.store
            .enroll_device("jt-b", &tied_low.secret_hash, &new_device("d2", T0 + 6))
            .await
            .unwrap(),
        Err(JoinTokenRefusal::Revoked)
    );
    // Without its secret, a revoked token is as unknown as any other.
    assert_eq!(
        db.store
            .enroll_device("jt-b", "wrong", &new_device("d2", T0 + 6))
            .await
            .unwrap(),
        Err(JoinTokenRefusal::Unknown)
    );
    assert_eq!(db.store.device("d2").await.unwrap(), None);
    // The device it enrolled stays; the refusals took no use; the other
    // tokens are untouched.
    assert!(db.store.device("d1").await.unwrap().is_some());
    let listed = db.store.join_tokens(None, 10).await.unwrap();
    assert_eq!(listed[1].uses_left, 1);
    assert_eq!(listed[1].revoked_at, Some(T0 + 5));
    assert_eq!(listed[0].revoked_at, None);
    assert_eq!(listed[0].state(T0), "active");
    assert_eq!(listed[2].state(T0 + HOUR), "expired");
    db.store
        .enroll_device("jt-c", &tied_high.secret_hash, &new_device("d3", T0))
        .await
        .unwrap()
        .unwrap();
    let used_up = db.store.join_tokens(None, 1).await.unwrap();
    assert_eq!(used_up[0].state(T0), "used_up");
}

async fn failed_device_insert_keeps_the_use(db: &Db) {
    let token = join_token("jt1", 2, T0 + HOUR, Labels::new());
    db.store.insert_join_token(&token).await.unwrap();
    db.store
        .enroll_device("jt1", &token.secret_hash, &new_device("dup", T0))
        .await
        .unwrap()
        .unwrap();
    // The same device id again fails as a whole: the use is not taken.
    assert!(
        db.store
            .enroll_device("jt1", &token.secret_hash, &new_device("dup", T0))
            .await
            .is_err()
    );
    db.store
        .enroll_device("jt1", &token.secret_hash, &new_device("other", T0))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        db.store
            .enroll_device("jt1", &token.secret_hash, &new_device("third", T0))
            .await
            .unwrap(),
        Err(JoinTokenRefusal::UsedUp)
    );
}

async fn concurrent_enrollments_never_exceed_uses(db: &Db) {
    let token = join_token("jt1", 5, T0 + HOUR, labels(&[("a", "b")]));
    db.store.insert_join_token(&token).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = db.store.clone();
        let hash = token.secret_hash.clone();
        tasks.push(tokio::spawn(async move {
            store
                .enroll_device("jt1", &hash, &new_device(&format!("dev-{i:02}"), T0))
                .await
        }));
    }
    let (mut ok, mut used_up) = (0, 0);
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Ok(_) => ok += 1,
            Err(JoinTokenRefusal::UsedUp) => used_up += 1,
            Err(other) => panic!("unexpected refusal {other:?}"),
        }
    }
    assert_eq!((ok, used_up), (5, 15));
    assert_eq!(db.store.devices(&Labels::new()).await.unwrap().len(), 5);
}

/// Devices a to d: a and c in paris at the edge, b in paris, d in lyon at
/// the edge.
async fn enroll_four_labelled(db: &Db) {
    enroll(
        db,
        &["c", "a"],
        labels(&[("site", "paris"), ("tier", "edge")]),
    )
    .await;
    enroll(db, &["b"], labels(&[("site", "paris")])).await;
    enroll(db, &["d"], labels(&[("site", "lyon"), ("tier", "edge")])).await;
}

async fn devices_by_selector(db: &Db) {
    enroll_four_labelled(db).await;
    let ids = |devices: Vec<Device>| devices.into_iter().map(|d| d.id).collect::<Vec<_>>();
    assert_eq!(
        ids(db.store.devices(&Labels::new()).await.unwrap()),
        ["a", "b", "c", "d"]
    );
    assert_eq!(
        ids(db
            .store
            .devices(&labels(&[("site", "paris")]))
            .await
            .unwrap()),
        ["a", "b", "c"]
    );
    assert_eq!(
        ids(db
            .store
            .devices(&labels(&[("site", "paris"), ("tier", "edge")]))
            .await
            .unwrap()),
        ["a", "c"]
    );
    assert_eq!(
        ids(db
            .store
            .devices(&labels(&[("tier", "edge")]))
            .await
            .unwrap()),
        ["a", "c", "d"]
    );
    assert!(
        db.store
            .devices(&labels(&[("site", "nice")]))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        db.store
            .devices(&labels(&[("tier", "paris")]))
            .await
            .unwrap()
            .is_empty()
    );
}

/// The selector is matched by the database: keys with dots and slashes,
/// values with quotes, spaces, '=' and non-ASCII characters match only
/// themselves; a key that is a prefix of another, or a value that is
/// another's prefix, does not match; the empty value is a value.
async fn devices_by_selector_with_any_label_text(db: &Db) {
    enroll(
        db,
        &["a"],
        labels(&[
            ("topology.example.com/zone", "eu-west \"3\" = é"),
            ("tier", ""),
        ]),
    )
    .await;
    enroll(
        db,
        &["b"],
        labels(&[("topology.example.com/zone-b", "eu-west \"3\" = é")]),
    )
    .await;
    enroll(
        db,
        &["c"],
        labels(&[("topology.example.com/zone", "eu-west")]),
    )
    .await;
    let found = |selector: &[(&str, &str)]| {
        let selector = labels(selector);
        async move {
            let devices = db.store.devices(&selector).await.unwrap();
            let ids: Vec<String> = devices.into_iter().map(|d| d.id).collect();
            // A rollout's targets are matched alike.
            let targets = db.store.rollout_targets(&selector).await.unwrap();
            let target_ids: Vec<String> = targets.into_iter().map(|t| t.id).collect();
            assert_eq!(target_ids, ids, "rollout targets of {selector:?}");
            ids
        }
    };
    let zone = "topology.example.com/zone";
    assert_eq!(found(&[(zone, "eu-west \"3\" = é")]).await, ["a"]);
    assert_eq!(found(&[(zone, "eu-west")]).await, ["c"]);
    assert_eq!(found(&[("tier", "")]).await, ["a"]);
    assert_eq!(
        found(&[(zone, "eu-west"), ("tier", "")]).await,
        Vec::<String>::new()
    );
    assert!(
        found(&[("topology.example.com", "eu-west")])
            .await
            .is_empty()
    );
    assert!(found(&[(zone, "eu")]).await.is_empty());
    assert_eq!(found(&[]).await, ["a", "b", "c"]);
}

/// Pages of devices (ListDevices): up to `limit` matching devices after an
/// id, and whether more follow, however the matches fall in the scan.
async fn devices_paged_by_selector(db: &Db) {
    enroll_four_labelled(db).await;
    let page = |selector: Labels, after: Option<&'static str>, limit| async move {
        let (devices, more) = store::devices_page(db.store.as_ref(), &selector, after, limit)
            .await
            .unwrap();
        (devices.into_iter().map(|d| d.id).collect::<Vec<_>>(), more)
    };
    let all = Labels::new;
    assert_eq!(
        page(all(), None, 2).await,
        (vec!["a".into(), "b".into()], true)
    );
    assert_eq!(
        page(all(), Some("b"), 2).await,
        (vec!["c".into(), "d".into()], false)
    );
    assert!(!page(all(), None, 4).await.1);
    assert_eq!(page(all(), Some("d"), 2).await, (vec![], false));
    // An id that is no device's still places the page.
    assert_eq!(page(all(), Some("bb"), 1).await, (vec!["c".into()], true));
    let edge = || labels(&[("tier", "edge")]);
    assert_eq!(page(edge(), None, 1).await, (vec!["a".into()], true));
    // "b" does not match: the scan passes it to find the next that does.
    assert_eq!(page(edge(), Some("a"), 1).await, (vec!["c".into()], true));
    assert_eq!(page(edge(), Some("c"), 1).await, (vec!["d".into()], false));
    let lyon = || labels(&[("site", "lyon")]);
    assert_eq!(page(lyon(), None, 1).await, (vec!["d".into()], false));
    assert_eq!(
        page(labels(&[("site", "nice")]), None, 3).await,
        (vec![], false)
    );
}

async fn labels_are_replaced_and_selected_on(db: &Db) {
    enroll(db, &["a", "b"], Labels::new()).await;
    let labels: Labels = [("region".to_string(), "eu".to_string())].into();
    let device = db
        .store
        .set_device_labels("a", &labels)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(device.labels, labels);
    let selected: Vec<String> = db
        .store
        .devices(&labels)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(selected, ["a"]);
    let cleared = db
        .store
        .set_device_labels("a", &Labels::new())
        .await
        .unwrap()
        .unwrap();
    assert!(cleared.labels.is_empty());
    assert!(db.store.devices(&labels).await.unwrap().is_empty());
    assert_eq!(
        db.store.set_device_labels("nope", &labels).await.unwrap(),
        None
    );
}

async fn revoke_and_revocations_since(db: &Db) {
    enroll(db, &["a", "b", "c"], Labels::new()).await;
    let revoked = db
        .store
        .revoke_device("b", T0 + 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revoked.status, DeviceStatus::Revoked);
    assert_eq!(revoked.revoked_at, Some(T0 + 100));
    // The first revocation time stays.
    let again = db
        .store
        .revoke_device("b", T0 + 500)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.revoked_at, Some(T0 + 100));
    db.store
        .revoke_device("c", T0 + 200)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(db.store.revoke_device("nope", T0).await.unwrap(), None);
    assert_eq!(
        db.store.revocations_since(T0 + 100).await.unwrap(),
        vec![("b".to_string(), T0 + 100), ("c".to_string(), T0 + 200)]
    );
    assert_eq!(
        db.store.revocations_since(T0 + 101).await.unwrap(),
        vec![("c".to_string(), T0 + 200)]
    );
    assert!(
        db.store
            .revocations_since(T0 + 201)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        db.store.device("a").await.unwrap().unwrap().status,
        DeviceStatus::Enrolled
    );
}

/// Last-seen times stored together (the control plane's group commit):
/// each device's latest, never backwards, a device listed twice or not
/// enrolled at all changing nothing else.
async fn touches_in_one_call_keep_each_devices_latest(db: &Db) {
    enroll(db, &["a", "b", "c"], Labels::new()).await;
    let seen =
        |id: &'static str| async move { db.store.device(id).await.unwrap().unwrap().last_seen };
    let c_before = seen("c").await;
    db.store
        .touch_devices(&[
            ("b".into(), T0 + 300),
            ("a".into(), T0 + 200),
            ("nobody".into(), T0 + 900),
            ("a".into(), T0 + 100),
        ])
        .await
        .unwrap();
    assert_eq!(seen("a").await, T0 + 200);
    assert_eq!(seen("b").await, T0 + 300);
    assert_eq!(seen("c").await, c_before);
    db.store
        .touch_devices(&[("a".into(), T0 + 150), ("b".into(), T0 + 400)])
        .await
        .unwrap();
    assert_eq!(seen("a").await, T0 + 200);
    assert_eq!(seen("b").await, T0 + 400);
    db.store.touch_devices(&[]).await.unwrap();
    assert!(db.store.device("nobody").await.unwrap().is_none());
}

fn hello(
    device_id: &str,
    inventory: &Inventory,
    models: &[DeviceModel],
    runtime: &str,
    at: i64,
) -> HelloRecord {
    HelloRecord {
        device_id: device_id.into(),
        inventory: inventory.clone(),
        models: models.to_vec(),
        runtime: runtime.into(),
        at,
    }
}

/// Hellos stored together (the control plane's group commit): each
/// device's last Hello, its latest time as last seen (never backwards), a
/// device listed twice or not enrolled at all changing nothing else.
async fn hellos_in_one_call_keep_each_devices_last(db: &Db) {
    enroll(db, &["a", "b", "c"], Labels::new()).await;
    db.store.touch_device("b", T0 + 5000).await.unwrap();
    let c_before = db.store.device("c").await.unwrap().unwrap();
    let inventory = |cores: u32| Inventory {
        cpu_cores: cores,
        ..new_device("x", T0).inventory
    };
    let model = |version: u64| DeviceModel {
        name: "m".into(),
        version,
        sha256: "ab".repeat(32),
        state: "ready".into(),
    };
    db.store
        .record_hellos(&[
            hello("a", &inventory(2), &[model(1)], "tract", T0 + 300),
            hello("b", &inventory(3), &[model(2)], "onnxruntime", T0 + 100),
            hello("nobody", &inventory(9), &[], "tract", T0 + 900),
            // a's models changed, in a message stamped before its Hello's
            // (clocks): its last one is what it serves.
            hello("a", &inventory(2), &[model(1), model(3)], "tract", T0 + 200),
        ])
        .await
        .unwrap();
    let a = db.store.device("a").await.unwrap().unwrap();
    assert_eq!(a.models, [model(1), model(3)]);
    assert_eq!(a.inventory.cpu_cores, 2);
    assert_eq!(a.runtime, "tract");
    assert_eq!(a.last_seen, T0 + 300);
    let b = db.store.device("b").await.unwrap().unwrap();
    assert_eq!(b.models, [model(2)]);
    assert_eq!(b.inventory.cpu_cores, 3);
    assert_eq!(b.runtime, "onnxruntime");
    assert_eq!(b.last_seen, T0 + 5000);
    assert_eq!(db.store.device("c").await.unwrap().unwrap(), c_before);
    assert!(db.store.device("nobody").await.unwrap().is_none());
    db.store.record_hellos(&[]).await.unwrap();
    assert_eq!(db.store.device("a").await.unwrap().unwrap(), a);
}

/// A rollout's targets carry what the devices' rows say: status, the
/// memory the device reported and the models it serves, for the devices the
/// selector picks, in id order.
async fn rollout_targets_are_the_devices_rows(db: &Db) {
    enroll(db, &["b", "a", "c"], labels(&[("site", "paris")])).await;
    enroll(db, &["x"], labels(&[("site", "lyon")])).await;
    let mut inventory = new_device("a", T0).inventory;
    inventory.memory_bytes = 2 << 30;
    let models = vec![DeviceModel {
        name: "m".into(),
        version: 3,
        sha256: "ab".repeat(32),
        state: "ready".into(),
    }];
    db.store
        .record_hello(hello("a", &inventory, &models, "tract", T0 + 1000))
        .await
        .unwrap();
    db.store.revoke_device("c", T0 + 2000).await.unwrap();
    let targets = db
        .store
        .rollout_targets(&labels(&[("site", "paris")]))
        .await
        .unwrap();
    let devices = db
        .store
        .devices(&labels(&[("site", "paris")]))
        .await
        .unwrap();
    let expected: Vec<RolloutTarget> = devices
        .into_iter()
        .map(|d| RolloutTarget {
            id: d.id,
            status: d.status,
            memory_bytes: d.inventory.memory_bytes,
            models: d.models,
        })
        .collect();
    assert_eq!(targets, expected);
    assert_eq!(
        targets.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    assert_eq!(targets[0].memory_bytes, 2 << 30);
    assert_eq!(targets[0].models, models);
    assert_eq!(targets[2].status, DeviceStatus::Revoked);
}

/// The counter the rollout engine checks before reading a rollout's
/// targets again moves with every write that changes what that read returns
/// (an enrollment, a Hello with other models or memory, new labels, a
/// revocation), and stands still through the writes every device makes all
/// the time (last seen, telemetry, certificates, a Hello that says what the
/// row already holds).
async fn device_changes_move_with_what_a_rollout_reads(db: &Db) {
    let changes = || async { db.store.device_changes().await.unwrap() };
    let paris = labels(&[("site", "paris")]);
    let targets = || async { db.store.rollout_targets(&paris).await.unwrap() };
    let mut seen = changes().await;
    let mut read = targets().await;
    // Each step: whether the targets changed, and the counter must agree.
    let mut check = async |what: &str| {
        let (now, now_read) = (changes().await, targets().await);
        assert_eq!(
            now != seen,
            now_read != read,
            "{what}: counter {seen} -> {now}, targets changed: {}",
            now_read != read
        );
        assert!(now >= seen, "{what}: the counter went back");
        (seen, read) = (now, now_read);
    };

    enroll(db, &["a", "b"], labels(&[("site", "paris")])).await;
    check("enrollment").await;
    db.store.touch_device("a", T0 + 1000).await.unwrap();
    check("last seen").await;
    db.store
        .ingest_telemetry(&[batch("a", 1, T0, vec![sample("m", 10, &[100], 1)])])
        .await
        .unwrap();
    check("telemetry").await;
    db.store
        .set_device_certificate("a", "serial-2", T0 + 99 * HOUR, "serial-a")
        .await
        .unwrap();
    check("certificate").await;
    let inventory = new_device("a", T0).inventory;
    db.store
        .record_hello(hello("a", &inventory, &[], "tract", T0 + 2000))
        .await
        .unwrap();
    check("a Hello saying what the row holds").await;
    let models = [DeviceModel {
        name: "m".into(),
        version: 1,
        sha256: "ab".repeat(32),
        state: "ready".into(),
    }];
    db.store
        .record_hellos(&[hello("a", &inventory, &models, "tract", T0 + 3000)])
        .await
        .unwrap();
    check("a Hello with a new model").await;
    let bigger = Inventory {
        memory_bytes: 8 << 30,
        ..inventory.clone()
    };
    db.store
        .record_hello(hello("a", &bigger, &models, "tract", T0 + 4000))
        .await
        .unwrap();
    check("a Hello with more memory").await;
    db.store
        .set_device_labels("b", &labels(&[("site", "lyon")]))
        .await
        .unwrap();
    check("new labels (b leaves the selector)").await;
    db.store
        .set_device_labels("b", &labels(&[("site", "lyon")]))
        .await
        .unwrap();
    check("the same labels again").await;
    db.store.revoke_device("a", T0 + 5000).await.unwrap();
    check("revocation").await;
}

/// Device changes committed at once (a fleet's label changes, another
/// replica's revocations) each add one to the counter, whatever slot of it
/// they take: none is lost, so the engine cannot keep targets read before
/// one of them.
async fn concurrent_device_changes_each_move_the_counter(db: &Db) {
    const DEVICES: usize = 40;
    let ids: Vec<String> = (0..DEVICES).map(|i| format!("dev-{i:02}")).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    enroll(db, &id_refs, labels(&[("site", "paris")])).await;
    let before = db.store.device_changes().await.unwrap();
    let mut changes = tokio::task::JoinSet::new();
    for id in ids.clone() {
        let store = db.store.clone();
        changes.spawn(async move {
            store
                .set_device_labels(&id, &labels(&[("site", "lyon")]))
                .await
        });
    }
    while let Some(done) = changes.join_next().await {
        done.unwrap().unwrap();
    }
    let after = db.store.device_changes().await.unwrap();
    assert_eq!(
        after - before,
        DEVICES as u64,
        "{DEVICES} transactions, each changing one device's labels"
    );
    let lyon = db
        .store
        .rollout_targets(&labels(&[("site", "lyon")]))
        .await
        .unwrap();
    assert_eq!(lyon.len(), DEVICES);
}

async fn hello_certificate_and_touch(db: &Db) {
    enroll(db, &["a"], Labels::new()).await;
    let mut inventory = new_device("a", T0).inventory;
    inventory.cpu_cores = 8;
    inventory.accelerators = vec!["npu".into()];
    let models = vec![
        DeviceModel {
            name: "resnet".into(),
            version: 3,
            sha256: "ab".repeat(32),
            state: "LOADED".into(),
        },
        DeviceModel {
            name: "yolo".into(),
            version: 1,
            sha256: "cd".repeat(32),
            state: "FAILED".into(),
        },
    ];
    db.store
        .record_hello(hello("a", &inventory, &models, "onnxruntime", T0 + 1000))
        .await
        .unwrap();
    let d = db.store.device("a").await.unwrap().unwrap();
    assert_eq!(d.inventory, inventory);
    assert_eq!(d.models, models);
    assert_eq!(d.runtime, "onnxruntime");
    assert_eq!(d.last_seen, T0 + 1000);
    // last_seen never moves backwards.
    db.store.touch_device("a", T0 + 500).await.unwrap();
    assert_eq!(
        db.store.device("a").await.unwrap().unwrap().last_seen,
        T0 + 1000
    );
    db.store.touch_device("a", T0 + 2000).await.unwrap();
    assert_eq!(
        db.store.device("a").await.unwrap().unwrap().last_seen,
        T0 + 2000
    );
    db.store
        .record_hello(hello("a", &inventory, &[], "tract", T0 + 1500))
        .await
        .unwrap();
    let d = db.store.device("a").await.unwrap().unwrap();
    assert_eq!(d.last_seen, T0 + 2000);
    assert!(d.models.is_empty());
    assert_eq!(d.runtime, "tract");
    assert_eq!(
        db.store
            .set_device_certificate("a", "serial-2", T0 + 99 * HOUR, "serial-a")
            .await
            .unwrap(),
        CertificateRenewal::Recorded
    );
    let d = db.store.device("a").await.unwrap().unwrap();
    assert_eq!(
        (d.certificate_serial.as_str(), d.certificate_expires_at),
        ("serial-2", T0 + 99 * HOUR)
    );
    // A revoked device gets no new certificate on record; nor does a stranger.
    db.store.revoke_device("a", T0 + 3000).await.unwrap();
    assert_eq!(
        db.store
            .set_device_certificate("a", "serial-3", T0 + 199 * HOUR, "serial-2")
            .await
            .unwrap(),
        CertificateRenewal::Revoked
    );
    assert_eq!(
        db.store
            .device("a")
            .await
            .unwrap()
            .unwrap()
            .certificate_serial,
        "serial-2"
    );
    assert_eq!(
        db.store
            .set_device_certificate("nobody", "serial-4", T0, "serial-nobody")
            .await
            .unwrap(),
        CertificateRenewal::Revoked
    );
}

/// A renewal keeps the certificate it came over accepted (the device may
/// not have installed the new one yet) until the device uses the new one;
/// from then on only the new one is, and a renewal over the old one is
/// refused.
async fn renewal_retires_the_old_certificate_once_the_new_one_is_used(db: &Db) {
    enroll(db, &["a"], Labels::new()).await;
    let serials = |d: Device| (d.certificate_serial, d.previous_certificate_serial);
    let device = move || async move { db.store.device("a").await.unwrap().unwrap() };
    assert_eq!(serials(device().await), ("serial-a".into(), None));
    // Nothing to retire yet.
    assert!(
        !db.store
            .retire_previous_certificate("a", "serial-a")
            .await
            .unwrap()
    );
    let renew = |serial: &'static str, presented: &'static str| {
        let store = db.store.clone();
        async move {
            store
                .set_device_certificate("a", serial, T0 + 99 * HOUR, presented)
                .await
                .unwrap()
        }
    };
    assert_eq!(renew("s1", "serial-a").await, CertificateRenewal::Recorded);
    assert_eq!(
        serials(device().await),
        ("s1".into(), Some("serial-a".into()))
    );
    // The agent never got s1 (its session was lost) and renews again over
    // its old certificate: that one stays the fallback, s1 is forgotten.
    assert_eq!(renew("s2", "serial-a").await, CertificateRenewal::Recorded);
    assert_eq!(
        serials(device().await),
        ("s2".into(), Some("serial-a".into()))
    );
    // Neither a never-installed certificate nor a stranger's renews.
    assert_eq!(renew("s3", "s1").await, CertificateRenewal::Retired);
    assert_eq!(renew("s3", "bogus").await, CertificateRenewal::Retired);
    // Retiring needs the current serial.
    assert!(
        !db.store
            .retire_previous_certificate("a", "serial-a")
            .await
            .unwrap()
    );
    assert!(
        db.store
            .retire_previous_certificate("a", "s2")
            .await
            .unwrap()
    );
    assert_eq!(serials(device().await), ("s2".into(), None));
    assert!(
        !db.store
            .retire_previous_certificate("a", "s2")
            .await
            .unwrap()
    );
    // The retired certificate renews nothing; the current one does.
    assert_eq!(renew("s4", "serial-a").await, CertificateRenewal::Retired);
    assert_eq!(serials(device().await), ("s2".into(), None));
    assert_eq!(renew("s4", "s2").await, CertificateRenewal::Recorded);
    assert_eq!(serials(device().await), ("s4".into(), Some("s2".into())));
    assert_eq!(device().await.certificate_expires_at, T0 + 99 * HOUR);
}

/// The read-only check of a join token agrees with the atomic take, and
/// takes no use.
async fn join_tokens_are_checked_without_taking_a_use(db: &Db) {
    let token = join_token("jt1", 1, T0 + HOUR, Labels::new());
    db.store.insert_join_token(&token).await.unwrap();
    let check = |id: &'static str, hash: String, at: i64| {
        let store = db.store.clone();
        async move { store.check_join_token(id, &hash, at).await.unwrap() }
    };
    for _ in 0..3 {
        assert_eq!(check("jt1", token.secret_hash.clone(), T0).await, Ok(()));
    }
    assert_eq!(
        check("nope", token.secret_hash.clone(), T0).await,
        Err(JoinTokenRefusal::Unknown)
    );
    assert_eq!(
        check("jt1", "wrong".into(), T0).await,
        Err(JoinTokenRefusal::Unknown)
    );
    assert_eq!(
        check("jt1", token.secret_hash.clone(), T0 + HOUR).await,
        Err(JoinTokenRefusal::Expired)
    );
    // The checks took no use: the one use is still there.
    db.store
        .enroll_device("jt1", &token.secret_hash, &new_device("d1", T0))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        check("jt1", token.secret_hash.clone(), T0).await,
        Err(JoinTokenRefusal::UsedUp)
    );
    assert_eq!(
        check("jt1", token.secret_hash.clone(), T0 + 2 * HOUR).await,
        Err(JoinTokenRefusal::Expired)
    );
}

async fn ingest_dedupes(db: &Db) {
    enroll(db, &["a", "b"], Labels::new()).await;
    let b1 = batch("a", 1, T0, vec![sample("m", 10, &[100, 200], 2)]);
    let b2 = batch("a", 2, T0 + 10_000, vec![sample("m", 5, &[300], 1)]);
    let c1 = batch("b", 1, T0, vec![sample("m", 7, &[50], 1)]);
    assert_eq!(
        db.store
            .ingest_telemetry(&[b1.clone(), c1.clone()])
            .await
            .unwrap(),
        [true, true]
    );
    // The same batch again, and twice in one call.
    assert_eq!(
        db.store
            .ingest_telemetry(&[b1.clone(), b2.clone(), b2.clone(), c1.clone()])
            .await
            .unwrap(),
        [false, true, false, false]
    );
    assert_eq!(
        db.store.ingest_telemetry(&[]).await.unwrap(),
        Vec::<bool>::new()
    );
    assert_eq!(db.store.telemetry_sequences("a").await.unwrap(), [1, 2]);
    assert_eq!(db.store.telemetry_sequences("b").await.unwrap(), [1]);
    let series = db
        .store
        .model_series("a", T0, T0 + HOUR, Resolution::Raw)
        .await
        .unwrap();
    assert_eq!(series.len(), 2, "no duplicate samples: {series:?}");
    let a = db.store.device("a").await.unwrap().unwrap();
    assert_eq!(a.requests_total, 15, "duplicates are not counted");
    assert_eq!(
        db.store.device("b").await.unwrap().unwrap().requests_total,
        7
    );
}

async fn ingest_skips_unknown_devices(db: &Db) {
    enroll(db, &["a"], Labels::new()).await;
    let stored = db
        .store
        .ingest_telemetry(&[
            batch("ghost", 1, T0, vec![sample("m", 1, &[1], 1)]),
            batch("a", 1, T0, vec![sample("m", 1, &[1], 1)]),
        ])
        .await
        .unwrap();
    assert_eq!(stored, [false, true]);
    assert!(
        db.store
            .telemetry_sequences("ghost")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(db.store.last_sequence("ghost").await.unwrap(), 0);
    assert_eq!(db.store.telemetry_sequences("a").await.unwrap(), [1]);
}

async fn concurrent_ingests_store_each_batch_once(db: &Db) {
    let ids: Vec<String> = (0..20).map(|d| format!("d{d:02}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    enroll(db, &refs, Labels::new()).await;
    // Eight calls at once, each holding every device's batches 1..=5, in
    // different device orders.
    let mut tasks = Vec::new();
    for k in 0..8usize {
        let store = db.store.clone();
        let mut group = Vec::new();
        for d in 0..20usize {
            let dev = &ids[(d * 7 + k * 3) % 20];
            for seq in 1..=5u64 {
                group.push(batch(
                    dev,
                    seq,
                    T0 + seq as i64 * 10_000,
                    vec![sample("m", 1, &[5], 1)],
                ));
            }
        }
        tasks.push(tokio::spawn(
            async move { store.ingest_telemetry(&group).await },
        ));
    }
    let mut stored = 0;
    for t in tasks {
        stored += t.await.unwrap().unwrap().into_iter().filter(|&s| s).count();
    }
    assert_eq!(stored, 20 * 5, "each batch stored exactly once");
    for id in &ids {
        assert_eq!(
            db.store.telemetry_sequences(id).await.unwrap(),
            [1, 2, 3, 4, 5]
        );
        let d = db.store.device(id).await.unwrap().unwrap();
        assert_eq!((d.requests_total, d.last_sequence), (5, 5));
    }
}

async fn concurrent_ingests_of_new_batches_add_up(db: &Db) {
    let ids: Vec<String> = (0..20).map(|d| format!("d{d:02}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    enroll(db, &refs, Labels::new()).await;
    // Eight calls at once sharing every device, each with its own sequence
    // (call k holds sequence k + 1 of every device, in its own device order):
    // every device row is updated by all eight.
    let mut tasks = Vec::new();
    for k in 0..8usize {
        let store = db.store.clone();
        let group: Vec<_> = (0..20usize)
            .map(|d| {
                let seq = k as u64 + 1;
                batch(
                    &ids[(d * 7 + k * 3) % 20],
                    seq,
                    T0 + seq as i64 * 10_000,
                    vec![sample("m", 1 + k as u64, &[5], 1)],
                )
            })
            .collect();
        tasks.push(tokio::spawn(
            async move { store.ingest_telemetry(&group).await },
        ));
    }
    for t in tasks {
        let stored = t.await.unwrap().unwrap();
        assert!(stored.iter().all(|&s| s), "every batch is new");
    }
    for id in &ids {
        assert_eq!(
            db.store.telemetry_sequences(id).await.unwrap(),
            [1, 2, 3, 4, 5, 6, 7, 8]
        );
        let d = db.store.device(id).await.unwrap().unwrap();
        assert_eq!(
            (d.requests_total, d.last_sequence),
            ((1..=8).sum::<u64>(), 8),
            "device {id}"
        );
    }
}

async fn health_comes_from_the_highest_sequence(db: &Db) {
    enroll(db, &["a"], Labels::new()).await;
    assert_eq!(db.store.last_sequence("a").await.unwrap(), 0);
    let mut b5 = batch("a", 5, T0 + 50_000, vec![]);
    b5.device = Some(telemetry(500));
    b5.dropped_batches_total = 3;
    let mut b3 = batch("a", 3, T0 + 30_000, vec![]);
    b3.device = Some(telemetry(300));
    b3.received_at = T0 + 99_000; // arrives last, but is older
    b3.dropped_batches_total = 1;
    db.store.ingest_telemetry(&[b5]).await.unwrap();
    db.store.ingest_telemetry(&[b3]).await.unwrap();
    let d = db.store.device("a").await.unwrap().unwrap();
    assert_eq!(d.health, Some(telemetry(500)));
    assert_eq!(d.last_sequence, 5);
    assert_eq!(d.last_seen, T0 + 99_000);
    assert_eq!(d.dropped_batches_total, 3);
    assert_eq!(db.store.last_sequence("a").await.unwrap(), 5);
    assert_eq!(db.store.telemetry_sequences("a").await.unwrap(), [3, 5]);
    // Out of order inside one call too: 4 and 8 and 6 → 8.
    let mk = |seq: u64| {
        let mut b = batch("a", seq, T0 + seq as i64 * 10_000, vec![]);
        b.device = Some(telemetry(seq as u32 * 100));
        b
    };
    db.store
        .ingest_telemetry(&[mk(4), mk(8), mk(6)])
        .await
        .unwrap();
    let d = db.store.device("a").await.unwrap().unwrap();
    assert_eq!(d.health, Some(telemetry(800)));
    assert_eq!(d.last_sequence, 8);
    // A newer batch without a device sample keeps the last known health.
    let mut b9 = batch("a", 9, T0 + 90_000, vec![]);
    b9.device = None;
    db.store.ingest_telemetry(&[b9]).await.unwrap();
    let d = db.store.device("a").await.unwrap().unwrap();
    assert_eq!(d.health, Some(telemetry(800)));
    assert_eq!(d.last_sequence, 9);
}

async fn totals_accumulate(db: &Db) {
    enroll(db, &["a"], Labels::new()).await;
    let mut batches = Vec::new();
    for seq in 1..=4u64 {
        batches.push(batch(
            "a",
            seq,
            T0 + seq as i64 * 10_000,
            vec![sample("m1", 40, &[10], 1), sample("m2", 8 * seq, &[20], 1)],
        ));
    }
    db.store.ingest_telemetry(&batches[..2]).await.unwrap();
    db.store.ingest_telemetry(&batches[1..]).await.unwrap();
    let d = db.store.device("a").await.unwrap().unwrap();
    let requests: u64 = batches
        .iter()
        .flat_map(|b| &b.models)
        .map(|m| m.requests)
        .sum();
    let errors: u64 = batches
        .iter()
        .flat_map(|b| &b.models)
        .map(|m| m.errors)
        .sum();
    let offloaded: u64 = batches
        .iter()
        .flat_map(|b| &b.models)
        .map(|m| m.offloaded)
        .sum();
    assert_eq!(requests, 160 + 80);
    assert_eq!(
        (d.requests_total, d.errors_total, d.offloaded_total),
        (requests, errors, offloaded)
    );
}

/// A device reporting counts no device could reach (buggy or hostile):
/// its totals stop at the largest figure, its batch and those stored with
/// it are kept, and the devices still read back.
async fn absurd_counts_saturate_totals_and_spoil_nothing(db: &Db) {
    enroll(db, &["a", "b"], Labels::new()).await;
    let mut absurd = sample("m1", u64::MAX, &[10], 1);
    absurd.errors = u64::MAX - 1;
    absurd.offloaded = 1 << 63;
    let mut big = sample("m1", i64::MAX as u64 - 5, &[10], 1);
    big.errors = 3;
    let stored = db
        .store
        .ingest_telemetry(&[
            batch("a", 1, T0, vec![big]),
            batch("b", 1, T0, vec![sample("m1", 7, &[10], 1)]),
            batch("a", 2, T0 + 10_000, vec![absurd.clone()]),
        ])
        .await
        .unwrap();
    assert_eq!(stored, [true, true, true]);
    db.store
        .ingest_telemetry(&[batch("a", 3, T0 + 20_000, vec![absurd])])
        .await
        .unwrap();
    let a = db.store.device("a").await.unwrap().unwrap();
    let max = i64::MAX as u64;
    assert_eq!(
        (a.requests_total, a.errors_total, a.offloaded_total),
        (max, max, max)
    );
    assert_eq!(a.last_sequence, 3);
    let b = db.store.device("b").await.unwrap().unwrap();
    assert_eq!((b.requests_total, b.errors_total), (7, 0));
    assert_eq!(db.store.devices(&Labels::new()).await.unwrap().len(), 2);
}

async fn raw_series(db: &Db) {
    enroll(db, &["a", "b"], Labels::new()).await;
    let b1 = batch(
        "a",
        1,
        T0,
        vec![sample("z", 3, &[100, 900], 4), sample("m", 5, &[7], 1)],
    );
    let b2 = batch("a", 2, T0 + 10_000, vec![sample("m", 2, &[8, 9], 2)]);
    let b3 = batch("a", 3, T0 + 20_000, vec![sample("m", 1, &[1], 1)]);
    let other = batch("b", 1, T0, vec![sample("m", 99, &[1], 1)]);
    // Stored out of order.
    db.store
        .ingest_telemetry(&[b3.clone(), other, b1.clone(), b2.clone()])
        .await
        .unwrap();
    let point = |b: &TelemetryRecord, k: usize| {
        let m = &b.models[k];
        ModelPoint {
            at: b.start_at,
            until: b.end_at,
            name: m.name.clone(),
            version: m.version,
            requests: m.requests,
            errors: m.errors,
            local: m.local,
            offloaded: m.offloaded,
            latency_us: m.latency_us.clone(),
            batch_size: m.batch_size.clone(),
            max_queue_depth: m.max_queue_depth,
        }
    };
    // [from, until) over batch ends: b1 ends at T0+10s, b2 at +20s, b3 at +30s.
    let series = db
        .store
        .model_series("a", T0 + 10_000, T0 + 30_000, Resolution::Raw)
        .await
        .unwrap();
    assert_eq!(series, vec![point(&b1, 1), point(&b1, 0), point(&b2, 0)]);
    let devices = db.store.device_series("a", T0, T0 + HOUR).await.unwrap();
    assert_eq!(
        devices,
        vec![
            (b1.end_at, b1.device.clone().unwrap()),
            (b2.end_at, b2.device.clone().unwrap()),
            (b3.end_at, b3.device.clone().unwrap()),
        ]
    );
    assert_eq!(
        db.store
            .device_series("a", T0 + 20_001, T0 + HOUR)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        db.store
            .model_series("a", T0 + HOUR, T0 + 2 * HOUR, Resolution::Raw)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Batches of device `dev` every 10 min over `hours` hours from `start`,
/// one model "m" with a latency histogram depending on the sequence.
fn hourly_batches(dev: &str, start: i64, hours: i64, first_seq: u64) -> Vec<TelemetryRecord> {
    (0..hours * 6)
        .map(|k| {
            let seq = first_seq + k as u64;
            batch(
                dev,
                seq,
                start + k * 600_000,
                vec![sample(
                    "m",
                    10 + seq,
                    &[seq * 10, 1000 + seq],
                    (seq % 7) as u32,
                )],
            )
        })
        .collect()
}

/// Merges raw samples of `batches` for one hour into the expected rollup point.
fn expected_hour(batches: &[TelemetryRecord], hour: i64) -> ModelPoint {
    let mut p = ModelPoint {
        at: hour,
        until: hour + HOUR,
        name: "m".into(),
        version: 1,
        ..Default::default()
    };
    for b in batches
        .iter()
        .filter(|b| b.start_at.div_euclid(HOUR) * HOUR == hour)
    {
        for m in &b.models {
            p.requests += m.requests;
            p.errors += m.errors;
            p.local += m.local;
            p.offloaded += m.offloaded;
            p.latency_us.merge(&m.latency_us);
            p.batch_size.merge(&m.batch_size);
            p.max_queue_depth = p.max_queue_depth.max(m.max_queue_depth);
        }
    }
    p
}

/// The rollout engine reads the raw batches its active devices sent in a
/// window of the server's time every pass: each device's window is found by
/// an index on (device_id, received_at), not by reading every retained
/// batch of the device (migration 0009).
async fn received_series_of_a_device_finds_its_window_by_index(db: &Db) {
    enroll(db, &["a"], Labels::new()).await;
    db.store
        .ingest_telemetry(&hourly_batches("a", T0, 2, 1))
        .await
        .unwrap();
    // The query of `received_model_series`, for two devices.
    let devices = match db.backend {
        Backend::Sqlite { .. } => "IN (SELECT value FROM json_each('[\"a\",\"b\"]'))",
        Backend::Postgres { .. } => "= ANY(ARRAY['a', 'b'])",
    };
    let plan = db
        .query_plan(&format!(
            "SELECT device_id, at, until, sequence, models FROM ( \
               SELECT device_id, start_at AS at, end_at AS until, sequence, models, received_at, \
                 server_end_at, MAX(end_at) OVER (PARTITION BY device_id, received_at) AS newest \
               FROM telemetry_batches WHERE device_id {devices} AND received_at >= {T0} \
               AND received_at < {}) AS b \
             WHERE COALESCE(server_end_at, received_at - (newest - until)) >= {T0}",
            T0 + HOUR
        ))
        .await;
    let uses_index = match db.backend {
        // SEARCH telemetry_batches USING INDEX telemetry_batches_device_received
        // (device_id=? AND received_at>? AND received_at<?)
        Backend::Sqlite { .. } => plan.iter().any(|step| {
            step.contains("SEARCH telemetry_batches USING INDEX") && step.contains("received_at>")
        }),
        // Index Cond: ((device_id = 'a'::text) AND (received_at >= ..) AND (received_at < ..))
        Backend::Postgres { .. } => plan
            .iter()
            .any(|step| step.contains("Index Cond") && step.contains("received_at")),
    };
    assert!(uses_index, "the window is not found by index: {plan:#?}");
}

/// The gates' series selects batches by when the server received them;
/// the device's timeline (`model_series`) by the times the device stamped.
/// A device whose clock is an hour behind sent a batch at T0 + 2h (server
/// time) that it stamped as ending at T0 + 1h.
async fn received_series_is_by_the_servers_clock(db: &Db) {
    enroll(db, &["a", "b"], Labels::new()).await;
    let mut late = batch("a", 1, T0 + HOUR - 10_000, vec![sample("m", 10, &[5], 1)]);
    late.received_at = T0 + 2 * HOUR;
    let mut other = batch("b", 1, T0 + HOUR - 10_000, vec![sample("m", 99, &[1], 1)]);
    other.received_at = T0 + 2 * HOUR;
    db.store
        .ingest_telemetry(&[late.clone(), other])
        .await
        .unwrap();
    let received = received_series_of_a(db, T0 + 2 * HOUR, T0 + 2 * HOUR + 1).await;
    let by_device_clock = db
        .store
        .model_series("a", T0 + HOUR, T0 + HOUR + 1, Resolution::Raw)
        .await
        .unwrap();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received, by_device_clock, "the same point, as stamped");
    assert_eq!(received[0].at, late.start_at);
    assert_eq!(received[0].until, late.end_at);
    assert_eq!(received[0].requests, 10);
    // [from, until): received at the window's end is outside it; by the
    // device's clock the batch is not in the window it was received in.
    for (from, until) in [
        (T0 + HOUR, T0 + 2 * HOUR),
        (T0 + 2 * HOUR + 1, T0 + 3 * HOUR),
    ] {
        assert!(received_series_of_a(db, from, until).await.is_empty());
    }
    assert!(
        db.store
            .model_series("a", T0 + 2 * HOUR, T0 + 3 * HOUR, Resolution::Raw)
            .await
            .unwrap()
            .is_empty()
    );
}

/// The gates read all their devices in one query, each point with its
/// device. Two devices' uploads arriving in the same millisecond are still
/// two uploads: a batch stored before migration 0010 is reckoned from its
/// own device's newest batch. Here "a"'s clock is two hours behind "b"'s,
/// so against "b"'s newest batch every batch of "a" would look two hours
/// old and be left out.
async fn received_series_of_several_devices_reckons_each_upload_on_its_own(db: &Db) {
    enroll(db, &["a", "b", "c"], Labels::new()).await;
    let arrived = T0 + 3 * HOUR;
    let upload = |device: &str, newest_end: i64, first: u64| -> Vec<TelemetryRecord> {
        [(first, 7 * MINUTE), (first + 1, 4 * MINUTE), (first + 2, 0)]
            .into_iter()
            .map(|(sequence, before_newest)| {
                let requests = sequence * 10;
                let start = newest_end - before_newest - 10_000;
                let mut b = batch(
                    device,
                    sequence,
                    start,
                    vec![sample("m", requests, &[5], 1)],
                );
                b.received_at = arrived;
                b
            })
            .collect()
    };
    let mut both = upload("a", arrived - 2 * HOUR - 10_000, 1);
    both.extend(upload("b", arrived - 10_000, 4));
    both.extend(upload("c", arrived - 10_000, 7));
    db.store.ingest_telemetry(&both).await.unwrap();
    let from = arrived - 5 * MINUTE;
    let ids = ["b".to_string(), "a".to_string()];
    let points = db
        .store
        .received_model_series(&ids, from, from..arrived + 1)
        .await
        .unwrap();
    let found: Vec<(&str, u64)> = points
        .iter()
        .map(|(device, point)| (device.as_str(), point.requests))
        .collect();
    assert_eq!(
        found,
        vec![("a", 20), ("a", 30), ("b", 50), ("b", 60)],
        "by device, each upload reckoned from its own newest batch, \"c\" not asked for"
    );
    assert!(
        db.store
            .received_model_series(&[], from, from..arrived + 1)
            .await
            .unwrap()
            .is_empty()
    );
}

/// An agent uploads the batches it made every few minutes, so an upload
/// received at the window's start carries batches made before it: those are
/// left out. For batches stored before migration 0010 (no `server_end_at`),
/// when each was made is reckoned from the upload's newest batch
/// (made just before the upload) on the device's own clock, here two hours
/// behind the server's: the batches that ended 7 and 6 minutes before the
/// newest one were made before a window that began 5 minutes before the
/// upload arrived, the one that ended 4 minutes before it within it.
async fn received_series_leaves_out_batches_made_before_the_window(db: &Db) {
    enroll(db, &["a"], Labels::new()).await;
    let arrived = T0 + 2 * HOUR;
    let newest_end = T0 - 10_000;
    let upload: Vec<_> = [(1, 7 * MINUTE), (2, 6 * MINUTE), (3, 4 * MINUTE), (4, 0)]
        .into_iter()
        .map(|(sequence, before_newest)| {
            let mut b = batch(
                "a",
                sequence,
                newest_end - before_newest - 10_000,
                vec![sample("m", sequence * 10, &[5], 1)],
            );
            b.received_at = arrived;
            b
        })
        .collect();
    db.store.ingest_telemetry(&upload).await.unwrap();
    let requests = |from: i64| received_requests(db, from, arrived + 1);
    assert_eq!(requests(arrived - 5 * MINUTE).await, vec![30, 40]);
    assert_eq!(requests(arrived).await, vec![40], "the newest batch counts");
    assert_eq!(requests(arrived - 10 * MINUTE).await, vec![10, 20, 30, 40]);
}

const MINUTE: i64 = 60_000;

/// An upload of device "a" as its session receives it: 10 s batches of
/// `sequences` ending at `ends` (device clock), each with `sequence * 10`
/// requests of m@1, stamped as sent at `sent_at_ms` (0: an older agent), and
/// turned into records by the server's ingest conversion.
fn received_upload(
    batches: &[(u64, i64)],
    sent_at_ms: u64,
    received_at: i64,
) -> Vec<TelemetryRecord> {
    use edgefleet_proto::edgefleet::v1 as pb;
    let upload = pb::TelemetryUpload {
        batches: batches
            .iter()
            .map(|&(sequence, end)| support::model_batch(sequence, end as u64))
            .collect(),
        sent_at_ms,
    };
    edgefleet_control_plane::convert::telemetry_upload_from_pb("a", upload, received_at).unwrap()
}

/// The requests of each point of device "a"'s gate series in `[from, until)`.
async fn received_requests(db: &Db, from: i64, until: i64) -> Vec<u64> {
    received_series_of_a(db, from, until)
        .await
        .iter()
        .map(|p| p.requests)
        .collect()
}

/// Device "a"'s gate series: received in `[from, until)` and made since
/// `from`.
async fn received_series_of_a(db: &Db, from: i64, until: i64) -> Vec<ModelPoint> {
    let points = db
        .store
        .received_model_series(&["a".to_string()], from, from..until)
        .await
        .unwrap();
    assert!(points.iter().all(|(device, _)| device == "a"), "{points:?}");
    points.into_iter().map(|(_, point)| point).collect()
}

/// After a disconnect an agent sends its backlog in several uploads, one
/// right after the other. The first holds only batches made before the
/// window (a resume 5 minutes before they arrive), the second the ones made
/// since. Each upload says when the agent sent it, on the device's clock
/// (here two hours behind the server's), so each batch's age at receipt is
/// known: the whole first upload is left out, though nothing in it is recent.
async fn received_series_leaves_out_a_backlog_upload_of_batches_made_before_the_window(db: &Db) {
    enroll(db, &["a"], Labels::new()).await;
    let skew = -2 * HOUR;
    let arrived = T0 + 2 * HOUR;
    let from = arrived - 5 * MINUTE;
    let device = |server_time: i64| server_time + skew;
    let old = received_upload(
        &[
            (1, device(arrived - 30 * MINUTE)),
            (2, device(arrived - 6 * MINUTE)),
        ],
        device(arrived) as u64,
        arrived,
    );
    let recent = received_upload(
        &[
            (3, device(arrived - 4 * MINUTE)),
            (4, device(arrived - 10_000)),
        ],
        device(arrived + 20) as u64,
        arrived + 30,
    );
    db.store.ingest_telemetry(&old).await.unwrap();
    db.store.ingest_telemetry(&recent).await.unwrap();
    assert_eq!(
        received_requests(db, from, arrived + MINUTE).await,
        vec![30, 40],
        "the first upload of the backlog holds nothing made since {from}"
    );
    // Each batch's age at receipt counts, not its upload's: the batch that
    // ended 6 minutes before its upload was sent is in a window that began 7
    // minutes before it arrived.
    assert_eq!(
        received_requests(db, arrived - 7 * MINUTE, arrived + MINUTE).await,
        vec![20, 30, 40]
    );
}

/// From an agent that does not stamp its uploads (`sent_at_ms` 0), when a
/// batch was made is reckoned from its upload's newest batch, as before the
/// stamp: the regular upload's old batches are left out, and in a backlog
/// in two uploads the first upload's newest batch, made before the window,
/// is taken for a recent one (the flaw the stamp removes).
async fn received_series_reckons_an_unstamped_upload_from_its_newest_batch(db: &Db) {
    enroll(db, &["a"], Labels::new()).await;
    let skew = -2 * HOUR;
    let arrived = T0 + 2 * HOUR;
    let from = arrived - 5 * MINUTE;
    let device = |server_time: i64| server_time + skew;
    let newest = device(arrived - 10_000);
    let regular = received_upload(
        &[
            (1, newest - 7 * MINUTE),
            (2, newest - 4 * MINUTE),
            (3, newest),
        ],
        0,
        arrived,
    );
    db.store.ingest_telemetry(&regular).await.unwrap();
    assert_eq!(received_requests(db, from, arrived + 1).await, vec![20, 30]);

    let later = arrived + HOUR;
    let old = received_upload(
        &[
            (4, device(later - 30 * MINUTE)),
            (5, device(later - 6 * MINUTE)),
        ],
        0,
        later,
    );
    let recent = received_upload(&[(6, device(later - 10_000))], 0, later + 30);
    db.store.ingest_telemetry(&old).await.unwrap();
    db.store.ingest_telemetry(&recent).await.unwrap();
    assert_eq!(
        received_requests(db, later - 5 * MINUTE, later + MINUTE).await,
        vec![50, 60]
    );
}

async fn rollup_merges_histograms_and_prune_keeps_unrolled(db: &Db) {
    enroll(db, &["a"], Labels::new()).await;
    // Hours T0, T0+1h, T0+2h; "now" is T0+2h30: the first two are complete.
    let batches = hourly_batches("a", T0, 3, 1);
    db.store.ingest_telemetry(&batches).await.unwrap();
    let now = T0 + 2 * HOUR + 30 * 60_000;
    let hourly_before = db
        .store
        .model_series("a", T0, now, Resolution::Hourly)
        .await
        .unwrap();
    let expected: Vec<ModelPoint> = (0..3)
        .map(|h| expected_hour(&batches, T0 + h * HOUR))
        .collect();
    assert_eq!(
        hourly_before, expected,
        "hourly series from raw data before any rollup"
    );
    assert!(expected[0].latency_us.count() == 12 && expected[0].max_queue_depth > 0);

    // Retention 1h15: raw data ending before T0+1h15 may go, if rolled up.
    let report = db
        .store
        .rollup_and_prune(now, HOUR + 15 * 60_000, i64::MAX)
        .await
        .unwrap();
    assert_eq!(report.hours_rolled_up, 2);
    // Hour 1: the batches starting at T0+1h and T0+1h10 end before T0+1h15.
    assert_eq!(report.batches_pruned, 6 + 2);
    let hourly_after = db
        .store
        .model_series("a", T0, now, Resolution::Hourly)
        .await
        .unwrap();
    assert_eq!(
        hourly_after, expected,
        "rollups hold exactly the merged raw data"
    );
    let remaining = db.store.telemetry_sequences("a").await.unwrap();
    assert_eq!(remaining, (9..=18).collect::<Vec<u64>>());
    // The raw series lost the pruned batches only (9..=15 end before `now`).
    let raw = db
        .store
        .model_series("a", T0, now, Resolution::Raw)
        .await
        .unwrap();
    assert_eq!(raw.len(), 7);
    assert_eq!(raw[0].at, T0 + 80 * 60_000);

    // Idempotent.
    let again = db
        .store
        .rollup_and_prune(now, HOUR + 15 * 60_000, i64::MAX)
        .await
        .unwrap();
    assert_eq!((again.hours_rolled_up, again.batches_pruned), (0, 0));
    assert_eq!(
        db.store
            .model_series("a", T0, now, Resolution::Hourly)
            .await
            .unwrap(),
        expected
    );

    // Retention 0: everything rolled up goes, the current hour stays raw.
    let report = db.store.rollup_and_prune(now, 0, i64::MAX).await.unwrap();
    assert_eq!((report.hours_rolled_up, report.batches_pruned), (0, 4));
    assert_eq!(
        db.store.telemetry_sequences("a").await.unwrap(),
        (13..=18).collect::<Vec<u64>>()
    );
    assert_eq!(
        db.store
            .model_series("a", T0, now, Resolution::Hourly)
            .await
            .unwrap(),
        expected
    );
    // Device totals are not affected by pruning.
    let total: u64 = batches
        .iter()
        .flat_map(|b| &b.models)
        .map(|m| m.requests)
        .sum();
    assert_eq!(
        db.store.device("a").await.unwrap().unwrap().requests_total,
        total
    );
}

/// A batch whose device clock is far ahead (or garbage: u64::MAX) is stored
/// as ending at most a day after it was received, so its hour completes: it
/// is rolled up and, past the retention, pruned like any other (it stayed
/// forever).
async fn batches_from_a_clock_far_ahead_are_rolled_up_and_pruned(db: &Db) {
    enroll(db, &["a"], Labels::new()).await;
    let received_at = T0 + 30 * 60_000;
    let wire = edgefleet_proto::edgefleet::v1::TelemetryBatch {
        sequence: 1,
        device_id: "a".into(),
        start_unix_ms: u64::MAX,
        end_unix_ms: u64::MAX,
        ..Default::default()
    };
    let record =
        edgefleet_control_plane::convert::telemetry_from_pb("a", wire, received_at).unwrap();
    assert_eq!(record.end_at, received_at + 24 * HOUR);
    db.store.ingest_telemetry(&[record]).await.unwrap();
    // Two days later, raw retention one hour.
    let report = db
        .store
        .rollup_and_prune(T0 + 48 * HOUR, HOUR, i64::MAX)
        .await
        .unwrap();
    assert_eq!(report.batches_pruned, 1);
    assert!(db.store.telemetry_sequences("a").await.unwrap().is_empty());
}

/// Batches stored far ahead before the server clamped device times are
/// clamped by migration 0008, then rolled up and pruned like the others.
async fn batches_stored_far_ahead_before_the_clamp_are_clamped(db: &Db) {
    enroll(db, &["a"], Labels::new()).await;
    db.store
        .ingest_telemetry(&hourly_batches("a", T0, 1, 1))
        .await
        .unwrap();
    // As stored before: a device clock at i64::MAX, and one an hour ahead
    // (left alone).
    db.raw(&format!(
        "UPDATE telemetry_batches SET start_at = {max}, end_at = {max}, hour = {max_hour} \
         WHERE sequence = 1; \
         UPDATE telemetry_batches SET start_at = start_at + {HOUR}, end_at = end_at + {HOUR}, \
         hour = hour + {HOUR} WHERE sequence = 2; \
         DELETE FROM _sqlx_migrations WHERE version = 8",
        max = i64::MAX,
        max_hour = i64::MAX / HOUR * HOUR,
    ))
    .await;
    let store = db.reopen().await.unwrap();
    let raw = store
        .model_series("a", 0, i64::MAX, Resolution::Raw)
        .await
        .unwrap();
    let received_at = T0 + 10_500;
    assert!(
        raw.iter().any(|p| p.until == received_at + 24 * HOUR),
        "{raw:#?}"
    );
    assert!(raw.iter().any(|p| p.at == T0 + 600_000 + HOUR), "{raw:#?}");
    let report = store
        .rollup_and_prune(T0 + 48 * HOUR, HOUR, i64::MAX)
        .await
        .unwrap();
    assert_eq!(report.batches_pruned, 6);
    assert!(store.telemetry_sequences("a").await.unwrap().is_empty());
}

/// Hourly rollups are deleted once their hour ended longer ago than the
/// rollup retention (nothing deleted them).
async fn rollups_past_their_retention_are_deleted(db: &Db) {
    enroll(db, &["a"], Labels::new()).await;
    let batches = hourly_batches("a", T0, 3, 1);
    db.store.ingest_telemetry(&batches).await.unwrap();
    let now = T0 + 3 * HOUR + 60_000;
    let report = db
        .store
        .rollup_and_prune(now, 24 * HOUR, i64::MAX)
        .await
        .unwrap();
    assert_eq!((report.hours_rolled_up, report.rollups_pruned), (3, 0));
    // Retention 1h30 at T0+3h01: hour T0 ended (T0+1h) before the cutoff
    // (T0+1h31), hour T0+1h (ends T0+2h) did not.
    let report = db
        .store
        .rollup_and_prune(now, 24 * HOUR, HOUR + 30 * 60_000)
        .await
        .unwrap();
    assert_eq!((report.hours_rolled_up, report.rollups_pruned), (0, 1));
    let report = db
        .store
        .rollup_and_prune(now + HOUR, 24 * HOUR, HOUR + 30 * 60_000)
        .await
        .unwrap();
    assert_eq!(report.rollups_pruned, 1);
    let hourly = db
        .store
        .model_series("a", T0, now, Resolution::Hourly)
        .await
        .unwrap();
    assert_eq!(hourly, vec![expected_hour(&batches, T0 + 2 * HOUR)]);
}

async fn late_data_rewrites_its_hour(db: &Db) {
    enroll(db, &["a"], Labels::new()).await;
    let mut batches = hourly_batches("a", T0, 1, 1);
    db.store.ingest_telemetry(&batches).await.unwrap();
    let now = T0 + HOUR + 60_000;
    let r = db
        .store
        .rollup_and_prune(now, 24 * HOUR, i64::MAX)
        .await
        .unwrap();
    assert_eq!((r.hours_rolled_up, r.batches_pruned), (1, 0));
    // Prune the raw data of that hour, then a late batch arrives for it.
    assert_eq!(
        db.store
            .rollup_and_prune(now, 0, i64::MAX)
            .await
            .unwrap()
            .batches_pruned,
        6
    );
    let late = batch(
        "a",
        100,
        T0 + 30 * 60_000 + 5_000,
        vec![sample("m", 1000, &[77_777], 50)],
    );
    assert_eq!(
        db.store
            .ingest_telemetry(std::slice::from_ref(&late))
            .await
            .unwrap(),
        [true]
    );
    batches.push(late);
    let r = db
        .store
        .rollup_and_prune(now, 24 * HOUR, i64::MAX)
        .await
        .unwrap();
    assert_eq!((r.hours_rolled_up, r.batches_pruned), (1, 0));
    let hourly = db
        .store
        .model_series("a", T0, T0 + HOUR, Resolution::Hourly)
        .await
        .unwrap();
    assert_eq!(hourly, vec![expected_hour(&batches, T0)]);
    assert_eq!(hourly[0].max_queue_depth, 50);
    assert_eq!(hourly[0].latency_us.count(), 13);
}

async fn fleet_totals_count_each_hour_once(db: &Db) {
    enroll(db, &["a", "b"], Labels::new()).await;
    let mut batches = hourly_batches("a", T0, 3, 1);
    batches.extend(hourly_batches("b", T0, 3, 1));
    // A second model on one batch of b.
    batches
        .last_mut()
        .unwrap()
        .models
        .push(sample("n", 4, &[5], 9));
    db.store.ingest_telemetry(&batches).await.unwrap();
    let expect = |batches: &[TelemetryRecord], from: i64, until: i64| {
        let mut by_model: std::collections::BTreeMap<String, ModelPoint> = Default::default();
        for b in batches
            .iter()
            .filter(|b| b.start_at >= from && b.start_at < until)
        {
            for m in &b.models {
                let p = by_model
                    .entry(m.name.clone())
                    .or_insert_with(|| ModelPoint {
                        at: from,
                        until,
                        name: m.name.clone(),
                        version: m.version,
                        ..Default::default()
                    });
                p.requests += m.requests;
                p.errors += m.errors;
                p.local += m.local;
                p.offloaded += m.offloaded;
                p.latency_us.merge(&m.latency_us);
                p.batch_size.merge(&m.batch_size);
                p.max_queue_depth = p.max_queue_depth.max(m.max_queue_depth);
            }
        }
        by_model.into_values().collect::<Vec<_>>()
    };
    let (from, until) = (T0, T0 + 3 * HOUR);
    let all = expect(&batches, from, until);
    assert_eq!(all.len(), 2);
    assert_eq!(db.store.fleet_model_totals(from, until).await.unwrap(), all);
    // Rolled up (raw kept): each hour still counted once.
    let now = T0 + 2 * HOUR + 60_000;
    db.store
        .rollup_and_prune(now, 24 * HOUR, i64::MAX)
        .await
        .unwrap();
    assert_eq!(db.store.fleet_model_totals(from, until).await.unwrap(), all);
    // Raw data of the rolled-up hours pruned: the rollups answer for them.
    db.store.rollup_and_prune(now, 0, i64::MAX).await.unwrap();
    assert_eq!(db.store.fleet_model_totals(from, until).await.unwrap(), all);
    // A single whole hour.
    assert_eq!(
        db.store
            .fleet_model_totals(T0 + HOUR, T0 + 2 * HOUR)
            .await
            .unwrap(),
        expect(&batches, T0 + HOUR, T0 + 2 * HOUR)
    );
    // A partial hour still held raw (the current one).
    assert_eq!(
        db.store
            .fleet_model_totals(T0 + 2 * HOUR + 20 * 60_000, T0 + 3 * HOUR)
            .await
            .unwrap(),
        expect(&batches, T0 + 2 * HOUR + 20 * 60_000, T0 + 3 * HOUR)
    );
    assert!(
        db.store
            .fleet_model_totals(T0 + 5 * HOUR, T0 + 6 * HOUR)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn events_roundtrip(db: &Db) {
    enroll(db, &["a", "b"], Labels::new()).await;
    let ev = |at: i64, kind: &str, msg: &str| EventRecord {
        at,
        kind: kind.into(),
        model: "m".into(),
        version: 2,
        message: msg.into(),
    };
    let mut b1 = batch("a", 1, T0, vec![]);
    b1.events = vec![
        ev(T0 + 5, "MODEL_LOADED", "ok"),
        ev(T0 + 3, "ERROR", "boom"),
    ];
    let mut b2 = batch("a", 2, T0 + 10_000, vec![]);
    b2.events = vec![ev(T0 + 10_001, "OVERLOAD_ENTERED", "")];
    let mut c1 = batch("b", 1, T0, vec![]);
    c1.events = vec![ev(T0 + 4, "MODEL_FAILED", "other device")];
    db.store.ingest_telemetry(&[b1.clone(), c1]).await.unwrap();
    db.store.ingest_telemetry(&[b1.clone(), b2]).await.unwrap(); // b1 again: no duplicate events
    assert_eq!(
        db.store.events("a", T0, T0 + HOUR).await.unwrap(),
        vec![
            ev(T0 + 3, "ERROR", "boom"),
            ev(T0 + 5, "MODEL_LOADED", "ok"),
            ev(T0 + 10_001, "OVERLOAD_ENTERED", "")
        ]
    );
    assert_eq!(
        db.store.events("a", T0 + 4, T0 + 10_001).await.unwrap(),
        vec![ev(T0 + 5, "MODEL_LOADED", "ok")]
    );
    assert_eq!(db.store.events("b", T0, T0 + HOUR).await.unwrap().len(), 1);
    assert!(
        db.store
            .events("nope", T0, T0 + HOUR)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn schema_too_new_is_refused(db: &Db) {
    db.raw(&format!(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from the future', TRUE, {}, 0)",
        db.bytes("00")
    ))
    .await;
    match db.reopen().await {
        Err(StoreError::SchemaTooNew { found, known }) => {
            assert_eq!(found, 9999);
            assert!((1..9999).contains(&known), "known {known}");
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    // Through the generic entry point too.
    let url = db.backend.url();
    let err = store::open(Some(&url), std::path::Path::new("/nonexistent"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 9999, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("9999"));
}

async fn reopening_keeps_data(db: &Db) {
    enroll(db, &["a"], labels(&[("k", "v")])).await;
    db.store
        .ingest_telemetry(&[batch("a", 1, T0, vec![sample("m", 1, &[1], 1)])])
        .await
        .unwrap();
    let before = db.store.device("a").await.unwrap().unwrap();
    let reopened = db.reopen().await.unwrap();
    assert_eq!(reopened.device("a").await.unwrap(), Some(before.clone()));
    assert_eq!(reopened.telemetry_sequences("a").await.unwrap(), [1]);
    // And through store::open with the URL.
    let via_url = store::open(
        Some(&db.backend.url()),
        std::path::Path::new("/nonexistent"),
    )
    .await
    .unwrap();
    assert_eq!(via_url.kind(), db.store.kind());
    assert_eq!(via_url.device("a").await.unwrap(), Some(before));
    if let Backend::Sqlite { dir } = &db.backend {
        // The default location under the data dir.
        let default = store::open(None, dir.path()).await.unwrap();
        assert_eq!(
            default.device("a").await.unwrap().unwrap().labels,
            labels(&[("k", "v")])
        );
        let fresh: PathBuf = dir.path().join("sub");
        std::fs::create_dir(&fresh).unwrap();
        let empty = store::open(None, &fresh).await.unwrap();
        assert!(empty.devices(&Labels::new()).await.unwrap().is_empty());
        assert!(fresh.join("edgefleet.db").exists());
    }
    assert!(matches!(
        store::open(Some("mysql://x"), std::path::Path::new("/nonexistent")).await,
        Err(StoreError::Connect(_))
    ));
}

async fn corrupt_protobuf_is_an_error(db: &Db) {
    enroll(db, &["a"], Labels::new()).await;
    db.store
        .ingest_telemetry(&[batch("a", 1, T0, vec![sample("m", 1, &[1], 1)])])
        .await
        .unwrap();
    db.raw(&format!(
        "UPDATE devices SET health = {}",
        db.bytes("ffffffff")
    ))
    .await;
    db.raw(&format!(
        "UPDATE telemetry_batches SET models = {}",
        db.bytes("0a05ff")
    ))
    .await;
    assert!(matches!(
        db.store.device("a").await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        db.store
            .model_series("a", T0, T0 + HOUR, Resolution::Raw)
            .await,
        Err(StoreError::Corrupt(_))
    ));
    // A rollout's targets are read without their health, but what they are
    // read with is checked as the whole row is.
    db.raw("UPDATE devices SET health = NULL, inventory = 'not json'")
        .await;
    assert!(matches!(
        db.store.rollout_targets(&Labels::new()).await,
        Err(StoreError::Corrupt(_))
    ));
    db.raw(&format!(
        "UPDATE devices SET inventory = '{}'",
        serde_json::to_string(&new_device("a", T0).inventory).unwrap()
    ))
    .await;
    db.raw("UPDATE devices SET labels = 'not json'").await;
    assert!(matches!(
        db.store.devices(&Labels::new()).await,
        Err(StoreError::Corrupt(_))
    ));
    // A selector is matched by the database, which refuses the row too: an
    // error, not a device silently left out.
    let selector = labels(&[("site", "paris")]);
    assert!(db.store.devices(&selector).await.is_err());
    assert!(db.store.rollout_targets(&selector).await.is_err());
    assert!(
        store::devices_page(db.store.as_ref(), &selector, None, 10)
            .await
            .is_err()
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A database written before migration 0003 kept model samples as rows of
/// `model_samples`; opening it moves them into their batches' rows.
async fn samples_stored_before_migration_3_are_converted(db: &Db) {
    use prost::Message;
    enroll(db, &["a"], Labels::new()).await;
    let m = sample("m", 10, &[100, 200], 3);
    let mut n = sample("n", 20, &[7], 1);
    n.version = 2;
    let batches = [
        batch("a", 1, T0, vec![m.clone(), n.clone()]),
        batch("a", 2, T0 + 10_000, vec![n.clone()]),
        batch("a", 3, T0 + 20_000, vec![]),
    ];
    db.store.ingest_telemetry(&batches).await.unwrap();
    let raw = db
        .store
        .model_series("a", T0, T0 + HOUR, Resolution::Raw)
        .await
        .unwrap();
    let hourly = db
        .store
        .model_series("a", T0, T0 + HOUR, Resolution::Hourly)
        .await
        .unwrap();
    assert_eq!(raw.len(), 3);
    // Back to the old layout: samples as rows, no `models` column value.
    for (seq, s) in [(1, &m), (1, &n), (2, &n)] {
        db.raw(&format!(
            "INSERT INTO model_samples (batch_id, model, version, requests, errors, local, offloaded, \
             latency_us, batch_size, max_queue_depth) SELECT id, '{}', {}, {}, {}, {}, {}, {}, {}, {} \
             FROM telemetry_batches WHERE device_id = 'a' AND sequence = {seq}",
            s.name,
            s.version,
            s.requests,
            s.errors,
            s.local,
            s.offloaded,
            db.bytes(&hex(&s.latency_us.encode_to_vec())),
            db.bytes(&hex(&s.batch_size.encode_to_vec())),
            s.max_queue_depth
        ))
        .await;
    }
    db.raw("UPDATE telemetry_batches SET models = NULL").await;
    assert!(
        db.store
            .model_series("a", T0, T0 + HOUR, Resolution::Raw)
            .await
            .unwrap()
            .is_empty(),
        "the old layout is not read"
    );
    let reopened = db.reopen().await.unwrap();
    assert_eq!(
        reopened
            .model_series("a", T0, T0 + HOUR, Resolution::Raw)
            .await
            .unwrap(),
        raw
    );
    assert_eq!(
        reopened
            .model_series("a", T0, T0 + HOUR, Resolution::Hourly)
            .await
            .unwrap(),
        hourly
    );
    // Converted once: the old rows are gone, so clearing the column again
    // and reopening leaves nothing to read.
    db.raw("UPDATE telemetry_batches SET models = NULL").await;
    let again = db.reopen().await.unwrap();
    assert!(
        again
            .model_series("a", T0, T0 + HOUR, Resolution::Raw)
            .await
            .unwrap()
            .is_empty()
    );
}

// ---------------------------------------------------------------- registry

/// The model registry, rollouts and desired state (`RegistryStore`), on both
/// backends.
mod registry {
    use super::*;
    use edgefleet_control_plane::store::registry::{
        ActivationRecord, DesiredChange, DesiredModel, GateSpec, ModelConflict, ModelRecord,
        RolloutDeviceRecord, RolloutEventRecord, RolloutRecord, RolloutSpec, RolloutState,
        TensorInfo, WaveSize,
    };

    suite!(
        models_roundtrip,
        blob_work_goes_with_the_model_insert_and_the_reference_check,
        blob_work_runs_holding_the_digests_lock,
        delete_model_refused_while_in_use,
        rollout_create_and_conflict,
        concurrent_rollout_creates_one_wins,
        rollout_listing_order,
        rollout_device_states_are_counted,
        rollout_devices_come_in_pages,
        save_rollout_step_applies_everything,
        a_step_of_hundreds_of_devices_applies_to_each,
        changes_to_one_device_in_a_step_end_as_applied_in_order,
        a_generation_moves_past_only_one_a_device_holds_ahead_of_it,
        failed_rollout_step_changes_nothing,
        stale_rollout_step_is_refused_and_changes_nothing,
        concurrent_steps_from_one_read_save_once,
        a_step_cannot_add_a_device_another_active_rollout_has,
        a_rollout_of_a_model_deleted_meanwhile_is_refused,
        desired_state_sorted_with_generation,
        desired_generations_of_many_devices,
        device_for_download_reads_the_device_and_its_desired_blob,
        activations_keep_the_latest_per_device,
        activations_recorded_together_keep_the_latest_per_device,
        rollout_events_keep_insertion_order,
        rollout_state_and_spec_round_trip,
        corrupt_registry_rows_are_errors,
    );

    // ------------------------------------------------------------ helpers

    fn model(name: &str, version: u64, sha256: &str) -> ModelRecord {
        ModelRecord {
            name: name.into(),
            version,
            sha256: sha256.into(),
            size_bytes: version.wrapping_add(1_000),
            opset: 17,
            inputs: vec![TensorInfo {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: vec![-1, 3, 224, 224],
            }],
            outputs: vec![TensorInfo {
                name: "logits".into(),
                datatype: "FP32".into(),
                shape: vec![-1, 1000],
            }],
            labels: labels(&[("task", "classify")]),
            private: version.is_multiple_of(2),
            signature: vec![1, 2, 3, version as u8, 0, 255],
            signed_by: "fleet".into(),
            signature_public_key: vec![9; 32],
            created_at: T0.wrapping_add(version as i64),
            created_by: "operator:op1".into(),
            estimated_memory_bytes: u64::MAX - version,
        }
    }

    fn spec() -> RolloutSpec {
        RolloutSpec {
            waves: vec![
                WaveSize::Count(1),
                WaveSize::Percent(25.5),
                WaveSize::Percent(100.0),
            ],
            soak_ms: 60_000,
            max_concurrent: 3,
            gates: GateSpec {
                max_error_rate: 0.05,
                max_p95_latency_regression: 1.25,
                max_failed_activations: 2,
                max_failed_activations_percent: 10.0,
                min_devices_reporting: 1,
            },
            rollback_on_failure: true,
            gates_since_ms: 0,
            activation_timeout_ms: 0,
        }
    }

    fn rollout(id: &str, model: &str, version: u64, created_at: i64) -> RolloutRecord {
        RolloutRecord {
            id: id.into(),
            model: model.into(),
            version,
            selector: labels(&[("site", "berlin")]),
            spec: spec(),
            state: RolloutState::Pending,
            current_wave: 0,
            wave_done_at: 0,
            reason: String::new(),
            created_by: "operator:op1".into(),
            created_at,
            updated_at: created_at,
            revision: 0,
        }
    }

    fn member(rollout_id: &str, device_id: &str, wave: u32) -> RolloutDeviceRecord {
        RolloutDeviceRecord {
            rollout_id: rollout_id.into(),
            device_id: device_id.into(),
            wave,
            state: "waiting".into(),
            previous_version: 1,
            reason: String::new(),
            updated_at: T0,
            generation: 0,
        }
    }

    fn members(rollout_id: &str, device_ids: &[&str]) -> Vec<RolloutDeviceRecord> {
        device_ids
            .iter()
            .enumerate()
            .map(|(i, d)| member(rollout_id, d, i as u32 + 1))
            .collect()
    }

    fn event(rollout_id: &str, at: i64, action: &str) -> RolloutEventRecord {
        RolloutEventRecord {
            rollout_id: rollout_id.into(),
            at,
            actor: "engine".into(),
            action: action.into(),
            message: format!("{action} at {at}"),
        }
    }

    fn desired(name: &str, version: u64) -> DesiredModel {
        DesiredModel {
            name: name.into(),
            version,
            sha256: format!("sha-{name}-{version}"),
            size_bytes: 4096 + version,
            signature: vec![7, version as u8],
            private: version == 2,
        }
    }

    fn set(device_id: &str, name: &str, version: u64) -> DesiredChange {
        DesiredChange::Set {
            device_id: device_id.into(),
            model: desired(name, version),
        }
    }

    fn clear(device_id: &str, name: &str) -> DesiredChange {
        DesiredChange::Clear {
            device_id: device_id.into(),
            name: name.into(),
        }
    }

    /// Creates the rollout (and its model version, if the test has not).
    async fn create(db: &Db, r: &RolloutRecord, devices: &[&str]) -> Result<(), String> {
        ensure_model(db, &r.model, r.version).await;
        db.store
            .create_rollout(
                r,
                &members(&r.id, devices),
                &event(&r.id, r.created_at, "created"),
            )
            .await
            .unwrap()
    }

    async fn ensure_model(db: &Db, name: &str, version: u64) {
        if db.store.model(name, Some(version)).await.unwrap().is_none() {
            let digest = format!("blob-{name}-{version}");
            db.store
                .insert_model(&model(name, version, &digest))
                .await
                .unwrap()
                .unwrap();
        }
    }

    /// Saves a step changing only the rollout's state.
    async fn set_state(db: &Db, r: &mut RolloutRecord, state: RolloutState) {
        r.state = state;
        r.updated_at += 1;
        db.store.save_rollout_step(r, &[], &[], &[]).await.unwrap();
    }

    /// The actions of a rollout's events, in order.
    async fn actions(db: &Db, rollout_id: &str) -> Vec<String> {
        db.store
            .rollout_events(rollout_id)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.action)
            .collect()
    }

    async fn generation(db: &Db, device: &str) -> u64 {
        db.store.desired_state(device).await.unwrap().0
    }

    // ------------------------------------------------------------ tests

    /// A push puts its blob in place in the transaction that records its
    /// version: for a new version and for the same version again (its blob
    /// put back should it be missing), not for a conflicting one; and if
    /// that fails, nothing is recorded. An unused blob is removed only if no
    /// version uses its digest.
    async fn blob_work_goes_with_the_model_insert_and_the_reference_check(db: &Db) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let placed = AtomicUsize::new(0);
        let mut place = || {
            placed.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        let v1 = model("m", 1, "d1");
        let store = &db.store;
        assert_eq!(
            store.insert_model_with_blob(&v1, &mut place).await.unwrap(),
            Ok(())
        );
        assert_eq!(placed.load(Ordering::SeqCst), 1);
        assert_eq!(
            store.insert_model_with_blob(&v1, &mut place).await.unwrap(),
            Ok(())
        );
        assert_eq!(placed.load(Ordering::SeqCst), 2, "the same version again");
        let clash = model("m", 1, "d2");
        assert!(
            store
                .insert_model_with_blob(&clash, &mut place)
                .await
                .unwrap()
                .is_err()
        );
        assert_eq!(placed.load(Ordering::SeqCst), 2, "not for a conflict");

        let mut disk_full = || Err(std::io::Error::other("disk full"));
        let v2 = model("m", 2, "d3");
        let err = store
            .insert_model_with_blob(&v2, &mut disk_full)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Blob(_)), "{err:?}");
        assert_eq!(store.model("m", Some(2)).await.unwrap(), None);
        assert_eq!(store.model("m", None).await.unwrap(), Some(v1));

        let removed = AtomicUsize::new(0);
        let mut remove = || {
            removed.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        assert!(
            !store
                .drop_blob_if_unreferenced("d1", &mut remove)
                .await
                .unwrap()
        );
        assert_eq!(removed.load(Ordering::SeqCst), 0, "m@1 uses d1");
        assert!(
            store
                .drop_blob_if_unreferenced("d3", &mut remove)
                .await
                .unwrap()
        );
        assert_eq!(removed.load(Ordering::SeqCst), 1);
        let mut failing = || Err(std::io::Error::other("read-only file system"));
        let err = store
            .drop_blob_if_unreferenced("d3", &mut failing)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Blob(_)), "{err:?}");
    }

    /// The blob work runs while the digest is locked against every other
    /// connection to the database (other replicas): on PostgreSQL the
    /// digest's advisory lock, on SQLite the write lock. Each callback here
    /// asks, from another connection, whether it could take that lock.
    async fn blob_work_runs_holding_the_digests_lock(db: &Db) {
        let digest = "ab".repeat(32);
        // Asked on another thread: the callbacks are synchronous.
        let lock_free = || {
            std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap()
                            .block_on(db.blob_lock_free(&digest))
                    })
                    .join()
                    .unwrap()
            })
        };
        assert!(lock_free(), "nobody holds it yet");
        let mut free_while_placing = None;
        let mut place = || {
            free_while_placing = Some(lock_free());
            Ok(())
        };
        db.store
            .insert_model_with_blob(&model("m", 1, &digest), &mut place)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(free_while_placing, Some(false));
        db.store.delete_model("m", 1).await.unwrap().unwrap();
        let mut free_while_removing = None;
        let mut remove = || {
            free_while_removing = Some(lock_free());
            Ok(())
        };
        assert!(
            db.store
                .drop_blob_if_unreferenced(&digest, &mut remove)
                .await
                .unwrap()
        );
        assert_eq!(free_while_removing, Some(false));
        assert!(lock_free(), "released with the transaction");
    }

    async fn models_roundtrip(db: &Db) {
        assert_eq!(db.store.model("resnet", None).await.unwrap(), None);
        assert!(db.store.models(None, None, 100).await.unwrap().is_empty());
        let v1 = model("resnet", 1, "aaa");
        let v2 = model("resnet", 2, "bbb");
        let v10 = model("resnet", 10, "ccc");
        let other = model("bert", 3, "ddd");
        for m in [&v2, &v10, &other, &v1] {
            assert_eq!(db.store.insert_model(m).await.unwrap(), Ok(()));
        }
        assert_eq!(
            db.store.model("resnet", Some(2)).await.unwrap(),
            Some(v2.clone())
        );
        assert_eq!(db.store.model("resnet", Some(3)).await.unwrap(), None);
        // Latest is the numerically highest version (10 > 2).
        assert_eq!(
            db.store.model("resnet", None).await.unwrap(),
            Some(v10.clone())
        );
        assert_eq!(
            db.store.model("bert", None).await.unwrap(),
            Some(other.clone())
        );
        assert_eq!(
            db.store.models(None, None, 100).await.unwrap(),
            [other.clone(), v1.clone(), v2.clone(), v10.clone()]
        );
        assert_eq!(
            db.store.models(Some("resnet"), None, 100).await.unwrap(),
            [v1.clone(), v2.clone(), v10.clone()]
        );
        assert!(
            db.store
                .models(Some("nope"), None, 100)
                .await
                .unwrap()
                .is_empty()
        );
        // Pages: up to `limit` versions after (name, version), in the same order.
        let page = |name: Option<&'static str>, after: Option<(&'static str, u64)>, limit| async move {
            db.store.models(name, after, limit).await.unwrap()
        };
        assert_eq!(page(None, None, 2).await, [other.clone(), v1.clone()]);
        assert_eq!(
            page(None, Some(("resnet", 1)), 2).await,
            [v2.clone(), v10.clone()]
        );
        // Version 10 sorts after 2 as a number, not before it as text.
        assert_eq!(
            page(None, Some(("resnet", 2)), 5).await,
            std::slice::from_ref(&v10)
        );
        assert!(page(None, Some(("resnet", 10)), 5).await.is_empty());
        assert_eq!(
            page(None, Some(("bert", 3)), 1).await,
            std::slice::from_ref(&v1)
        );
        // A key that is no version's (deleted since) still places the page.
        assert_eq!(
            page(None, Some(("c", 0)), 5).await,
            [v1.clone(), v2.clone(), v10.clone()]
        );
        assert_eq!(
            page(Some("resnet"), Some(("resnet", 1)), 1).await,
            std::slice::from_ref(&v2)
        );

        // The same name, version and digest again: a no-op, even with other
        // metadata (the first insert wins).
        let mut again = v2.clone();
        again.created_by = "operator:someone-else".into();
        assert_eq!(db.store.insert_model(&again).await.unwrap(), Ok(()));
        assert_eq!(db.store.model("resnet", Some(2)).await.unwrap(), Some(v2));
        // Another digest: refused, naming the stored one.
        let conflict = model("resnet", 2, "zzz");
        assert_eq!(
            db.store.insert_model(&conflict).await.unwrap(),
            Err(ModelConflict::Exists {
                name: "resnet".into(),
                version: 2,
                existing_sha256: "bbb".into(),
            })
        );
        assert_eq!(
            db.store
                .models(Some("resnet"), None, 100)
                .await
                .unwrap()
                .len(),
            3
        );
    }

    async fn delete_model_refused_while_in_use(db: &Db) {
        db.store
            .insert_model(&model("m", 1, "blob1"))
            .await
            .unwrap()
            .unwrap();
        db.store
            .insert_model(&model("m", 2, "blob2"))
            .await
            .unwrap()
            .unwrap();
        // Another model sharing blob2.
        db.store
            .insert_model(&model("copy", 1, "blob2"))
            .await
            .unwrap()
            .unwrap();
        assert!(db.store.blob_referenced("blob1").await.unwrap());
        assert!(!db.store.blob_referenced("blob9").await.unwrap());

        let mut r = rollout("r1", "m", 2, T0);
        create(db, &r, &["a", "b"]).await.unwrap();
        let refused = db.store.delete_model("m", 2).await.unwrap().unwrap_err();
        assert!(refused.contains("r1"), "{refused}");
        // So is the version its devices go back to if it rolls back.
        let refused = db.store.delete_model("m", 1).await.unwrap().unwrap_err();
        assert!(
            refused.contains("device a") && refused.contains("rollout r1 rolls back"),
            "{refused}"
        );
        // Other versions are free.
        db.store
            .insert_model(&model("m", 3, "blob3"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(db.store.delete_model("m", 3).await.unwrap(), Ok(true));
        assert!(!db.store.blob_referenced("blob3").await.unwrap());
        assert_eq!(db.store.delete_model("m", 3).await.unwrap(), Ok(false));

        // Paused still holds it.
        set_state(db, &mut r, RolloutState::Paused).await;
        assert!(db.store.delete_model("m", 2).await.unwrap().is_err());

        // The rollout ends but device a's desired state still names m@2.
        r.state = RolloutState::Succeeded;
        db.store
            .save_rollout_step(&mut r, &[], &[set("a", "m", 2)], &[])
            .await
            .unwrap();
        let refused = db.store.delete_model("m", 2).await.unwrap().unwrap_err();
        assert!(refused.contains("device a"), "{refused}");
        assert!(db.store.model("m", Some(2)).await.unwrap().is_some());

        // Desired state moved elsewhere: allowed.
        db.store
            .save_rollout_step(&mut r, &[], &[clear("a", "m")], &[])
            .await
            .unwrap();
        assert_eq!(db.store.delete_model("m", 2).await.unwrap(), Ok(true));
        assert_eq!(db.store.model("m", Some(2)).await.unwrap(), None);
        // The rollout has ended: nothing goes back to m@1 any more.
        assert_eq!(db.store.delete_model("m", 1).await.unwrap(), Ok(true));
        assert!(!db.store.blob_referenced("blob1").await.unwrap());
        assert_eq!(db.store.model("m", None).await.unwrap(), None);
        // blob2 is still used by copy@1, then by nothing.
        assert!(db.store.blob_referenced("blob2").await.unwrap());
        assert_eq!(db.store.delete_model("copy", 1).await.unwrap(), Ok(true));
        assert!(!db.store.blob_referenced("blob2").await.unwrap());
        assert_eq!(db.store.delete_model("never", 1).await.unwrap(), Ok(false));
    }

    async fn rollout_create_and_conflict(db: &Db) {
        assert_eq!(db.store.rollout("r1").await.unwrap(), None);
        let mut r1 = rollout("r1", "m", 2, T0);
        create(db, &r1, &["a", "b"]).await.unwrap();
        assert_eq!(db.store.rollout("r1").await.unwrap(), Some(r1.clone()));
        assert_eq!(
            db.store.rollout_devices("r1").await.unwrap(),
            members("r1", &["a", "b"])
        );
        assert_eq!(
            db.store.rollout_events("r1").await.unwrap(),
            [event("r1", T0, "created")]
        );

        // Overlapping devices, same model: refused, nothing stored.
        let r2 = rollout("r2", "m", 3, T0 + 1);
        assert_eq!(
            create(db, &r2, &["c", "b"]).await,
            Err("device b is already in rollout r1 of model m".to_string())
        );
        assert_eq!(db.store.rollout("r2").await.unwrap(), None);
        assert!(db.store.rollout_devices("r2").await.unwrap().is_empty());
        assert!(db.store.rollout_events("r2").await.unwrap().is_empty());

        // The same devices for another model are fine, and so are other devices.
        create(db, &rollout("other", "n", 1, T0 + 2), &["a", "b"])
            .await
            .unwrap();
        create(db, &rollout("r3", "m", 3, T0 + 3), &["c"])
            .await
            .unwrap();
        assert!(
            create(db, &rollout("r4", "m", 3, T0 + 4), &["c"])
                .await
                .is_err()
        );

        // Running and paused still own their devices; ended rollouts do not.
        for (state, refused) in [
            (RolloutState::Running, true),
            (RolloutState::Paused, true),
            (RolloutState::Succeeded, false),
            (RolloutState::Aborted, false),
            (RolloutState::RolledBack, false),
        ] {
            set_state(db, &mut r1, state).await;
            assert_eq!(
                create(db, &rollout("r5", "m", 3, T0 + 5), &["b"])
                    .await
                    .is_err(),
                refused,
                "{state:?}"
            );
            if !refused {
                // Clean up for the next state.
                let mut r5 = db.store.rollout("r5").await.unwrap().unwrap();
                set_state(db, &mut r5, RolloutState::Aborted).await;
                db.raw("DELETE FROM rollouts WHERE id = 'r5'").await;
            }
        }
    }

    async fn concurrent_rollout_creates_one_wins(db: &Db) {
        ensure_model(db, "m", 2).await;
        let mut tasks = Vec::new();
        for i in 0..10 {
            let store = db.store.clone();
            tasks.push(tokio::spawn(async move {
                let id = format!("r{i}");
                // Each set overlaps every other one only in "shared".
                let devices = [
                    member(&id, &format!("own-{i}"), 1),
                    member(&id, "shared", 1),
                    member(&id, &format!("own-{i}-b"), 2),
                ];
                store
                    .create_rollout(
                        &rollout(&id, "m", 2, T0 + i),
                        &devices,
                        &event(&id, T0 + i, "created"),
                    )
                    .await
                    .unwrap()
            }));
        }
        let mut won = Vec::new();
        for (i, task) in tasks.into_iter().enumerate() {
            match task.await.unwrap() {
                Ok(()) => won.push(format!("r{i}")),
                Err(message) => assert!(
                    message.starts_with("device shared is already in rollout r"),
                    "{message}"
                ),
            }
        }
        assert_eq!(won.len(), 1, "winners: {won:?}");
        let active = db.store.active_rollouts().await.unwrap();
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].id, won[0]);
        assert_eq!(
            db.store.rollouts(Some("m"), None, 100).await.unwrap().len(),
            1
        );
        assert_eq!(db.store.rollout_devices(&won[0]).await.unwrap().len(), 3);
    }

    async fn rollout_listing_order(db: &Db) {
        let mut old = rollout("old", "m", 1, T0);
        let mid = rollout("mid", "n", 1, T0 + 10);
        let new = rollout("new", "m", 2, T0 + 20);
        // Inserted out of time order.
        create(db, &new, &["a"]).await.unwrap();
        create(db, &old, &["b"]).await.unwrap();
        create(db, &mid, &["c"]).await.unwrap();
        let ids = |rs: Vec<RolloutRecord>| rs.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(
            ids(db.store.rollouts(None, None, 100).await.unwrap()),
            ["new", "mid", "old"]
        );
        assert_eq!(
            ids(db.store.rollouts(Some("m"), None, 100).await.unwrap()),
            ["new", "old"]
        );
        assert!(
            db.store
                .rollouts(Some("zzz"), None, 100)
                .await
                .unwrap()
                .is_empty()
        );
        // Pages: up to `limit` rollouts older than the one named.
        let page = |model: Option<&'static str>, after: Option<&'static str>, limit| async move {
            ids(db.store.rollouts(model, after, limit).await.unwrap())
        };
        assert_eq!(page(None, None, 2).await, ["new", "mid"]);
        assert_eq!(page(None, Some("mid"), 2).await, ["old"]);
        assert_eq!(page(None, Some("new"), 1).await, ["mid"]);
        assert_eq!(page(Some("m"), Some("new"), 5).await, ["old"]);
        assert!(page(None, Some("old"), 5).await.is_empty());
        assert!(page(None, Some("nope"), 5).await.is_empty());
        assert_eq!(
            ids(db.store.active_rollouts().await.unwrap()),
            ["old", "mid", "new"]
        );
        set_state(db, &mut old, RolloutState::Succeeded).await;
        assert_eq!(
            ids(db.store.active_rollouts().await.unwrap()),
            ["mid", "new"]
        );
        assert_eq!(
            ids(db.store.rollouts(Some("m"), None, 100).await.unwrap()),
            ["new", "old"]
        );
        // Created in the same millisecond: the later one first, and a page
        // boundary between them loses neither.
        create(db, &rollout("tie1", "t", 1, T0 + 30), &["d"])
            .await
            .unwrap();
        create(db, &rollout("tie0", "t", 1, T0 + 30), &["e"])
            .await
            .unwrap();
        assert_eq!(page(None, None, 2).await, ["tie0", "tie1"]);
        assert_eq!(page(None, None, 1).await, ["tie0"]);
        assert_eq!(page(None, Some("tie0"), 1).await, ["tie1"]);
        assert_eq!(page(None, Some("tie1"), 1).await, ["new"]);
    }

    /// What a list of rollouts shows: each rollout's devices per state,
    /// counted by the database.
    async fn rollout_device_states_are_counted(db: &Db) {
        let mut r1 = rollout("r1", "m", 1, T0);
        create(db, &r1, &["a", "b", "c", "d"]).await.unwrap();
        let mut b = member("r1", "b", 1);
        b.state = "active".into();
        let mut c = member("r1", "c", 1);
        c.state = "active".into();
        let mut d = member("r1", "d", 1);
        d.state = "failed".into();
        db.store
            .save_rollout_step(&mut r1, &[b, c, d], &[], &[])
            .await
            .unwrap();
        create(db, &rollout("r2", "n", 1, T0 + 10), &["e"])
            .await
            .unwrap();
        create(db, &rollout("r3", "m", 2, T0 + 20), &[])
            .await
            .unwrap();
        let counted = |ids: &'static [&'static str]| async move {
            let ids: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
            let mut rows = db.store.rollout_device_states(&ids).await.unwrap();
            rows.sort();
            rows
        };
        let row = |id: &str, state: &str, n: u64| (id.to_string(), state.to_string(), n);
        assert_eq!(
            counted(&["r1", "r2", "r3"]).await,
            [
                row("r1", "active", 2),
                row("r1", "failed", 1),
                row("r1", "waiting", 1),
                row("r2", "waiting", 1),
            ]
        );
        assert_eq!(
            counted(&["r3", "r1"]).await,
            [
                row("r1", "active", 2),
                row("r1", "failed", 1),
                row("r1", "waiting", 1),
            ]
        );
        assert_eq!(counted(&["r2"]).await, [row("r2", "waiting", 1)]);
        assert!(counted(&["zzz"]).await.is_empty());
        assert!(counted(&[]).await.is_empty());
    }

    /// A rollout's devices by id, a page at a time, all or in one state; the
    /// rows whole, as `rollout_devices` has them.
    async fn rollout_devices_come_in_pages(db: &Db) {
        let mut r1 = rollout("r1", "m", 1, T0);
        create(db, &r1, &["e", "a", "d", "b", "c"]).await.unwrap();
        let mut b = member("r1", "b", 1);
        b.state = "active".into();
        b.reason = "activated".into();
        let mut d = member("r1", "d", 2);
        d.state = "active".into();
        db.store
            .save_rollout_step(&mut r1, &[b, d], &[], &[])
            .await
            .unwrap();
        // Another rollout's devices are not in r1's pages.
        create(db, &rollout("r2", "n", 1, T0 + 10), &["a", "aa", "f"])
            .await
            .unwrap();
        let page = |state: Option<&'static str>, after: Option<&'static str>, limit: u32| async move {
            db.store
                .rollout_devices_page("r1", state, after, limit)
                .await
                .unwrap()
        };
        let ids = |rows: Vec<RolloutDeviceRecord>| -> Vec<String> {
            rows.into_iter().map(|r| r.device_id).collect()
        };
        assert_eq!(
            page(None, None, 10).await,
            db.store.rollout_devices("r1").await.unwrap()
        );
        assert_eq!(ids(page(None, None, 2).await), ["a", "b"]);
        assert_eq!(ids(page(None, Some("b"), 2).await), ["c", "d"]);
        assert_eq!(ids(page(None, Some("d"), 2).await), ["e"]);
        assert!(page(None, Some("e"), 2).await.is_empty());
        // After an id no device has: from the next one up.
        assert_eq!(ids(page(None, Some("bb"), 1).await), ["c"]);
        assert_eq!(ids(page(Some("active"), None, 1).await), ["b"]);
        assert_eq!(ids(page(Some("active"), Some("b"), 5).await), ["d"]);
        assert_eq!(ids(page(Some("waiting"), None, 5).await), ["a", "c", "e"]);
        assert!(page(Some("failed"), None, 5).await.is_empty());
        let active = page(Some("active"), None, 1).await;
        assert_eq!(
            (active[0].state.as_str(), active[0].reason.as_str()),
            ("active", "activated")
        );
        assert!(
            db.store
                .rollout_devices_page("zzz", None, None, 5)
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// Rollout r1 over devices a and b, one step saved: a is to serve m@1.
    async fn rollout_with_m1_desired_on_a(db: &Db) -> RolloutRecord {
        let mut r = rollout("r1", "m", 2, T0);
        create(db, &r, &["a", "b"]).await.unwrap();
        db.store
            .save_rollout_step(&mut r, &[], &[set("a", "m", 1)], &[])
            .await
            .unwrap();
        r
    }

    /// A device says which desired-state generation it holds; the store
    /// moves its own past it only when it is behind (a restored backup),
    /// never on an ordinary reconnect, and keeps the desired state.
    async fn a_generation_moves_past_only_one_a_device_holds_ahead_of_it(db: &Db) {
        let mut r = rollout_with_m1_desired_on_a(db).await;
        let before = db.store.desired_state("a").await.unwrap();
        assert_eq!(before, (1, vec![desired("m", 1)]));
        // Holding what the store gave, or none yet, or less: nothing moves.
        for held in [0, 1] {
            assert!(!db.store.move_generation_past("a", held).await.unwrap());
            assert_eq!(db.store.desired_state("a").await.unwrap(), before);
        }
        // Ahead: the store's generation moves past it, the state unchanged.
        assert!(db.store.move_generation_past("a", 7).await.unwrap());
        assert_eq!(
            db.store.desired_state("a").await.unwrap(),
            (8, vec![desired("m", 1)])
        );
        assert!(!db.store.move_generation_past("a", 8).await.unwrap());
        // A device the store never gave a desired state.
        assert!(db.store.move_generation_past("b", 3).await.unwrap());
        assert_eq!(db.store.desired_state("b").await.unwrap(), (4, vec![]));
        // The next change moves on from there.
        db.store
            .save_rollout_step(&mut r, &[], &[clear("a", "m")], &[])
            .await
            .unwrap();
        assert_eq!(db.store.desired_state("a").await.unwrap(), (9, vec![]));
    }

    /// A step's desired changes end as applying them one after the other
    /// would, though a store may write them together: the last change to a
    /// (device, model) wins, whether a set or a clear, and each device's
    /// generation moves once.
    async fn changes_to_one_device_in_a_step_end_as_applied_in_order(db: &Db) {
        let mut r = rollout("r1", "m", 2, T0);
        create(db, &r, &["a", "b", "c"]).await.unwrap();
        db.store
            .save_rollout_step(&mut r, &[], &[set("c", "m", 1)], &[])
            .await
            .unwrap();
        db.store
            .save_rollout_step(
                &mut r,
                &[],
                &[
                    set("a", "m", 1),
                    clear("a", "m"),
                    clear("b", "m"),
                    set("b", "m", 1),
                    set("b", "m", 2),
                    clear("c", "m"),
                    set("c", "m", 3),
                    clear("c", "m"),
                ],
                &[],
            )
            .await
            .unwrap();
        assert_eq!(db.store.desired_state("a").await.unwrap(), (1, vec![]));
        assert_eq!(
            db.store.desired_state("b").await.unwrap(),
            (1, vec![desired("m", 2)])
        );
        assert_eq!(db.store.desired_state("c").await.unwrap(), (2, vec![]));
        let generations: Vec<u64> = db
            .store
            .rollout_devices("r1")
            .await
            .unwrap()
            .iter()
            .map(|d| d.generation)
            .collect();
        assert_eq!(generations, [1, 1, 2]);
    }

    /// A step that starts hundreds of devices at once (written in chunks of
    /// rows) creates, changes and bumps each of them, and only them.
    async fn a_step_of_hundreds_of_devices_applies_to_each(db: &Db) {
        let ids: Vec<String> = (0..300).map(|i| format!("d{i:03}")).collect();
        let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut r = rollout("r1", "m", 2, T0);
        // d000..d199 are members from the start, d200..d299 join in the step.
        create(db, &r, &id_refs[..200]).await.unwrap();
        // Every other device already had m@1 (generation 1).
        let earlier: Vec<DesiredChange> = ids.iter().step_by(2).map(|d| set(d, "m", 1)).collect();
        db.store
            .save_rollout_step(&mut r, &[], &earlier, &[])
            .await
            .unwrap();
        let started: Vec<RolloutDeviceRecord> = ids
            .iter()
            .map(|d| RolloutDeviceRecord {
                state: "updating".into(),
                updated_at: T0 + 1_000,
                ..member("r1", d, 1)
            })
            .collect();
        // All but the last are set to m@2; the last has m cleared.
        let mut changes: Vec<DesiredChange> = ids[..299].iter().map(|d| set(d, "m", 2)).collect();
        changes.push(clear(&ids[299], "m"));
        db.store
            .save_rollout_step(&mut r, &started, &changes, &[])
            .await
            .unwrap();

        let stored = db.store.rollout_devices("r1").await.unwrap();
        assert_eq!(stored.len(), 300);
        for (i, (device, expected)) in stored.iter().zip(&started).enumerate() {
            let generation = if i % 2 == 0 { 2 } else { 1 };
            assert_eq!(
                device,
                &RolloutDeviceRecord {
                    generation,
                    ..expected.clone()
                }
            );
            let models = if i == 299 {
                vec![]
            } else {
                vec![desired("m", 2)]
            };
            assert_eq!(
                db.store.desired_state(&device.device_id).await.unwrap(),
                (generation, models),
                "{}",
                device.device_id
            );
        }
    }

    async fn save_rollout_step_applies_everything(db: &Db) {
        let mut r = rollout("r1", "m", 2, T0);
        create(db, &r, &["a", "b", "c"]).await.unwrap();
        // Device c already serves m@1 and n@1 through earlier steps.
        db.store
            .save_rollout_step(&mut r, &[], &[set("c", "m", 1), set("c", "n", 1)], &[])
            .await
            .unwrap();
        assert_eq!(generation(db, "c").await, 1);

        r.state = RolloutState::Running;
        r.current_wave = 1;
        r.wave_done_at = T0 + 500;
        r.reason = "wave 1".into();
        r.updated_at = T0 + 1_000;
        let mut a = member("r1", "a", 1);
        a.state = "updating".into();
        a.previous_version = 7;
        a.reason = "sent".into();
        a.updated_at = T0 + 1_000;
        let mut d = member("r1", "d", 3);
        d.state = "active".into();
        let events = [
            event("r1", T0 + 1_000, "wave_started"),
            event("r1", T0 + 1_000, "device_updating"),
        ];
        db.store
            .save_rollout_step(
                &mut r,
                &[a.clone(), d.clone()],
                &[
                    set("a", "m", 2),
                    // Two changes to a in one call: one bump.
                    set("a", "n", 5),
                    set("b", "m", 2),
                    clear("c", "m"),
                ],
                &events,
            )
            .await
            .unwrap();

        assert_eq!(db.store.rollout("r1").await.unwrap(), Some(r.clone()));
        let mut expected = members("r1", &["a", "b", "c"]);
        expected[0] = a;
        expected.push(d);
        // Each member whose desired state the step changed notes the
        // generation it now has (c's second change: 2); d was not changed.
        expected[0].generation = 1;
        expected[1].generation = 1;
        expected[2].generation = 2;
        assert_eq!(db.store.rollout_devices("r1").await.unwrap(), expected);
        assert_eq!(
            db.store.desired_state("a").await.unwrap(),
            (1, vec![desired("m", 2), desired("n", 5)])
        );
        assert_eq!(
            db.store.desired_state("b").await.unwrap(),
            (1, vec![desired("m", 2)])
        );
        // c: m cleared, n left alone; bumped once more.
        assert_eq!(
            db.store.desired_state("c").await.unwrap(),
            (2, vec![desired("n", 1)])
        );
        // d got a device row but no desired change: no generation.
        assert_eq!(db.store.desired_state("d").await.unwrap(), (0, vec![]));
        let mut all_events = vec![event("r1", T0, "created")];
        all_events.extend(events);
        assert_eq!(db.store.rollout_events("r1").await.unwrap(), all_events);

        // A step without desired changes bumps nothing, and saving a member
        // keeps the generation the store noted (the record's is ignored);
        // replacing a version bumps again.
        let mut a_again = expected[0].clone();
        a_again.reason = "again".into();
        a_again.generation = 0;
        db.store
            .save_rollout_step(&mut r, &[a_again.clone()], &[], &[])
            .await
            .unwrap();
        assert_eq!(generation(db, "a").await, 1);
        assert_eq!(
            db.store.rollout_devices("r1").await.unwrap()[0],
            RolloutDeviceRecord {
                generation: 1,
                ..a_again
            }
        );
        db.store
            .save_rollout_step(&mut r, &[], &[set("a", "m", 3)], &[])
            .await
            .unwrap();
        assert_eq!(
            db.store.desired_state("a").await.unwrap(),
            (2, vec![desired("m", 3), desired("n", 5)])
        );
        assert_eq!(generation(db, "b").await, 1);

        // Saving a rollout that does not exist is an error.
        assert!(
            db.store
                .save_rollout_step(
                    &mut rollout("ghost", "m", 1, T0),
                    &[],
                    &[set("a", "m", 1)],
                    &[]
                )
                .await
                .is_err()
        );
        assert_eq!(generation(db, "a").await, 2);
    }

    async fn failed_rollout_step_changes_nothing(db: &Db) {
        let r = rollout_with_m1_desired_on_a(db).await;
        let before_rollout = db.store.rollout("r1").await.unwrap();
        let before_devices = db.store.rollout_devices("r1").await.unwrap();
        let before_events = db.store.rollout_events("r1").await.unwrap();
        let before_a = db.store.desired_state("a").await.unwrap();

        let mut changed = r.clone();
        changed.state = RolloutState::Running;
        changed.current_wave = 1;
        let mut a = member("r1", "a", 1);
        a.state = "updating".into();
        // The last write fails (an event of a rollout that does not exist):
        // everything before it must be undone.
        let result = db
            .store
            .save_rollout_step(
                &mut changed,
                &[a],
                &[set("a", "m", 2), set("b", "m", 2)],
                &[event("r1", T0 + 1, "ok"), event("ghost", T0 + 1, "bad")],
            )
            .await;
        assert!(result.is_err(), "{result:?}");
        assert_eq!(db.store.rollout("r1").await.unwrap(), before_rollout);
        assert_eq!(
            db.store.rollout_devices("r1").await.unwrap(),
            before_devices
        );
        assert_eq!(db.store.rollout_events("r1").await.unwrap(), before_events);
        assert_eq!(db.store.desired_state("a").await.unwrap(), before_a);
        assert_eq!(db.store.desired_state("b").await.unwrap(), (0, vec![]));
        // The store still works afterwards.
        db.store
            .save_rollout_step(&mut changed, &[], &[set("b", "m", 2)], &[])
            .await
            .unwrap();
        assert_eq!(generation(db, "b").await, 1);
    }

    async fn stale_rollout_step_is_refused_and_changes_nothing(db: &Db) {
        let r = rollout("r1", "m", 2, T0);
        create(db, &r, &["a", "b"]).await.unwrap();
        // Two readers of the same revision: an operator pausing, and an
        // engine that computed the next step from the same read.
        let mut paused = db.store.rollout("r1").await.unwrap().unwrap();
        let mut stale = paused.clone();
        assert_eq!(paused.revision, 0);
        paused.state = RolloutState::Paused;
        paused.updated_at = T0 + 1;
        db.store
            .save_rollout_step(&mut paused, &[], &[], &[event("r1", T0 + 1, "pause")])
            .await
            .unwrap();
        assert_eq!(paused.revision, 1);
        assert_eq!(db.store.rollout("r1").await.unwrap(), Some(paused.clone()));

        stale.state = RolloutState::Running;
        stale.current_wave = 1;
        stale.updated_at = T0 + 2;
        let mut a = member("r1", "a", 1);
        a.state = "updating".into();
        let err = db
            .store
            .save_rollout_step(
                &mut stale,
                &[a],
                &[set("a", "m", 2)],
                &[event("r1", T0 + 2, "wave_started")],
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Conflict(message) if message.contains("r1")),
            "{err:?}"
        );
        // Nothing of the stale step was written, and its revision stays.
        assert_eq!(stale.revision, 0);
        assert_eq!(db.store.rollout("r1").await.unwrap(), Some(paused.clone()));
        assert_eq!(
            db.store.rollout_devices("r1").await.unwrap(),
            members("r1", &["a", "b"])
        );
        assert_eq!(db.store.desired_state("a").await.unwrap(), (0, vec![]));
        assert_eq!(actions(db, "r1").await, ["created", "pause"]);

        // Read again, the step saves.
        let mut fresh = db.store.rollout("r1").await.unwrap().unwrap();
        fresh.reason = "resumed later".into();
        db.store
            .save_rollout_step(&mut fresh, &[], &[], &[])
            .await
            .unwrap();
        assert_eq!(fresh.revision, 2);
        // A rollout that does not exist is not a conflict.
        let err = db
            .store
            .save_rollout_step(&mut rollout("ghost", "m", 2, T0), &[], &[], &[])
            .await
            .unwrap_err();
        assert!(!matches!(err, StoreError::Conflict(_)), "{err:?}");
    }

    /// As engines on several replicas do: each computes a step from the same
    /// read and saves it at once. Exactly one is saved.
    async fn concurrent_steps_from_one_read_save_once(db: &Db) {
        let r = rollout("r1", "m", 2, T0);
        create(db, &r, &["a"]).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..8 {
            let store = db.store.clone();
            let mut step = r.clone();
            tasks.push(tokio::spawn(async move {
                step.state = RolloutState::Running;
                step.current_wave = 1;
                let result = store
                    .save_rollout_step(
                        &mut step,
                        &[],
                        &[set("a", "m", 2)],
                        &[event("r1", T0 + 1, &format!("step{i}"))],
                    )
                    .await;
                (i, result)
            }));
        }
        let mut saved = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                (i, Ok(())) => saved.push(format!("step{i}")),
                (_, Err(StoreError::Conflict(_))) => {}
                (_, Err(err)) => panic!("{err:?}"),
            }
        }
        assert_eq!(saved.len(), 1, "saved: {saved:?}");
        assert_eq!(
            actions(db, "r1").await,
            ["created".to_string(), saved[0].clone()]
        );
        assert_eq!(generation(db, "a").await, 1);
        assert_eq!(db.store.rollout("r1").await.unwrap().unwrap().revision, 1);
    }

    /// As the engines of two rollouts of one model do when a device starts
    /// matching both selectors: each reads the memberships, then adds it.
    async fn a_step_cannot_add_a_device_another_active_rollout_has(db: &Db) {
        let r1 = rollout("r1", "m", 2, T0);
        let r2 = rollout("r2", "m", 2, T0 + 1);
        create(db, &r1, &["a"]).await.unwrap();
        create(db, &r2, &["b"]).await.unwrap();
        let mut tasks = Vec::new();
        for r in [r1.clone(), r2.clone()] {
            let store = db.store.clone();
            tasks.push(tokio::spawn(async move {
                let mut step = r.clone();
                step.state = RolloutState::Running;
                let joined = member(&r.id, "new", 1);
                let result = store
                    .save_rollout_step(&mut step, &[joined], &[], &[])
                    .await;
                (r.id, result)
            }));
        }
        let mut joined = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                (id, Ok(())) => joined.push(id),
                (_, Err(StoreError::Conflict(message))) => assert!(
                    message.starts_with("device new is already in rollout r"),
                    "{message}"
                ),
                (_, Err(err)) => panic!("{err:?}"),
            }
        }
        assert_eq!(joined.len(), 1, "{joined:?}");
        let mut holders = Vec::new();
        for id in ["r1", "r2"] {
            let devices = db.store.rollout_devices(id).await.unwrap();
            if devices.iter().any(|d| d.device_id == "new") {
                holders.push(id.to_string());
            }
        }
        assert_eq!(holders, joined);

        // A device the other rollout already has is refused outright, and
        // the refused step changes nothing.
        let mut stale = db.store.rollout("r1").await.unwrap().unwrap();
        let before = stale.clone();
        stale.reason = "taking b".into();
        let err = db
            .store
            .save_rollout_step(&mut stale, &[member("r1", "b", 1)], &[], &[])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
        assert_eq!(db.store.rollout("r1").await.unwrap(), Some(before));
        // Once that rollout has ended, the device is free.
        let mut other = db.store.rollout("r2").await.unwrap().unwrap();
        other.state = RolloutState::Aborted;
        db.store
            .save_rollout_step(&mut other, &[], &[], &[])
            .await
            .unwrap();
        let mut r1 = db.store.rollout("r1").await.unwrap().unwrap();
        db.store
            .save_rollout_step(&mut r1, &[member("r1", "b", 1)], &[], &[])
            .await
            .unwrap();
    }

    /// The API reads the model, then creates the rollout: a delete in
    /// between must not leave a rollout of a model that is gone.
    async fn a_rollout_of_a_model_deleted_meanwhile_is_refused(db: &Db) {
        ensure_model(db, "m", 2).await;
        assert_eq!(db.store.delete_model("m", 2).await.unwrap(), Ok(true));
        let r = rollout("r1", "m", 2, T0);
        let refused = db
            .store
            .create_rollout(&r, &members("r1", &["a"]), &event("r1", T0, "created"))
            .await
            .unwrap()
            .unwrap_err();
        assert!(refused.contains("no model m@2"), "{refused}");
        assert_eq!(db.store.rollout("r1").await.unwrap(), None);
        assert!(db.store.rollout_devices("r1").await.unwrap().is_empty());
    }

    /// Each listed device's generation, as `desired_state` has it; none for
    /// a device never given a desired state or not listed.
    async fn desired_generations_of_many_devices(db: &Db) {
        let ids = |ids: &[&str]| ids.iter().map(|id| id.to_string()).collect::<Vec<_>>();
        assert!(
            db.store
                .desired_generations(&ids(&["a", "b"]))
                .await
                .unwrap()
                .is_empty()
        );
        let mut r = rollout("r1", "m", 2, T0);
        create(db, &r, &["a", "b"]).await.unwrap();
        db.store
            .save_rollout_step(&mut r, &[], &[set("a", "m", 1), set("b", "m", 1)], &[])
            .await
            .unwrap();
        db.store
            .save_rollout_step(&mut r, &[], &[set("a", "m", 2)], &[])
            .await
            .unwrap();
        let mut read = db
            .store
            .desired_generations(&ids(&["a", "b", "c", "a'"]))
            .await
            .unwrap();
        read.sort();
        assert_eq!(read, [("a".to_string(), 2), ("b".to_string(), 1)]);
        assert_eq!(db.store.desired_state("a").await.unwrap().0, 2);
        let only_b = db.store.desired_generations(&ids(&["b"])).await.unwrap();
        assert_eq!(only_b, [("b".to_string(), 1)]);
        assert!(db.store.desired_generations(&[]).await.unwrap().is_empty());
    }

    /// The device as `device` reads it, and whether its own desired state
    /// (not another device's) names the digest, in any case; None for a
    /// device not enrolled.
    async fn device_for_download_reads_the_device_and_its_desired_blob(db: &Db) {
        enroll(db, &["a", "b"], Labels::new()).await;
        let check = async |device: &str, sha256: &str| -> Option<bool> {
            let (d, desired) = db
                .store
                .device_for_download(device, sha256)
                .await
                .unwrap()?;
            assert_eq!(Some(d), db.store.device(device).await.unwrap());
            Some(desired)
        };
        assert_eq!(check("nobody", "sha-m-1").await, None);
        assert_eq!(check("a", "sha-m-1").await, Some(false));
        let mut r = rollout("r1", "m", 2, T0);
        create(db, &r, &["a", "b"]).await.unwrap();
        db.store
            .save_rollout_step(&mut r, &[], &[set("a", "m", 1), set("a", "n", 2)], &[])
            .await
            .unwrap();
        assert_eq!(check("a", "sha-m-1").await, Some(true));
        assert_eq!(check("a", "sha-n-2").await, Some(true));
        assert_eq!(check("a", "SHA-M-1").await, Some(true));
        assert_eq!(check("a", "sha-m-2").await, Some(false));
        assert_eq!(check("a", "sha-m-").await, Some(false));
        assert_eq!(check("b", "sha-m-1").await, Some(false));
        db.store
            .save_rollout_step(&mut r, &[], &[clear("a", "m")], &[])
            .await
            .unwrap();
        assert_eq!(check("a", "sha-m-1").await, Some(false));
        assert_eq!(check("a", "sha-n-2").await, Some(true));
    }

    async fn desired_state_sorted_with_generation(db: &Db) {
        assert_eq!(db.store.desired_state("a").await.unwrap(), (0, vec![]));
        let mut r = rollout("r1", "m", 2, T0);
        create(db, &r, &["a"]).await.unwrap();
        let mut full = desired("zeta", 2);
        full.signature = (0..=255).collect();
        full.size_bytes = u64::MAX;
        db.store
            .save_rollout_step(
                &mut r,
                &[],
                &[
                    DesiredChange::Set {
                        device_id: "a".into(),
                        model: full.clone(),
                    },
                    set("alpha", "x", 1),
                    set("a", "alpha", 1),
                    set("a", "mid", 3),
                ],
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            db.store.desired_state("a").await.unwrap(),
            (1, vec![desired("alpha", 1), desired("mid", 3), full])
        );
        // Device ids are not prefixes of each other's state.
        assert_eq!(
            db.store.desired_state("alpha").await.unwrap(),
            (1, vec![desired("x", 1)])
        );
        // Clearing everything keeps the generation moving.
        db.store
            .save_rollout_step(
                &mut r,
                &[],
                &[clear("a", "alpha"), clear("a", "mid"), clear("a", "zeta")],
                &[],
            )
            .await
            .unwrap();
        assert_eq!(db.store.desired_state("a").await.unwrap(), (2, vec![]));
    }

    /// The latest step per device, model and version, by the device's own
    /// order: its desired-state generation, then its clock. Which replica
    /// received a report, and that replica's clock (`at`), do not matter.
    async fn activations_keep_the_latest_per_device(db: &Db) {
        activations_keep_the_latest(db, false).await;
    }

    /// The same reports stored in one `record_activations` call (as the
    /// control plane's group commit does) keep the same steps.
    async fn activations_recorded_together_keep_the_latest_per_device(db: &Db) {
        activations_keep_the_latest(db, true).await;
    }

    async fn activations_keep_the_latest(db: &Db, together: bool) {
        let report = |device: &str, version: u64, stage: &str, order: (u64, i64), at: i64| {
            ActivationRecord {
                device_id: device.into(),
                name: "m".into(),
                version,
                stage: stage.into(),
                reason: format!("{stage} reason"),
                at,
                generation: order.0,
                reported_ms: order.1,
            }
        };
        assert!(db.store.activations("m", 2).await.unwrap().is_empty());
        let mut other = report("a", 2, "ACTIVE", (1, 109), T0 + 9);
        other.name = "n".into();
        let reports = [
            report("b", 2, "DOWNLOADING", (1, 100), T0),
            report("a", 2, "DOWNLOADING", (1, 100), T0 + 50),
            // Received by a replica whose clock is behind the first one's.
            report("a", 2, "VERIFYING", (1, 101), T0),
            report("a", 2, "ACTIVE", (1, 102), T0 - 10),
            // A late retry of an older step does not replace the newer one,
            // even through a replica whose clock is ahead.
            report("a", 2, "VERIFYING", (1, 101), T0 + 100),
            report("b", 2, "FAILED", (1, 105), T0 + 5),
            // A newer desired state wins even if the device's clock went
            // back; a late report for the older one then does not replace it.
            report("b", 2, "DOWNLOADING", (2, 90), T0 + 6),
            report("b", 2, "FAILED", (1, 106), T0 + 7),
            report("a", 3, "ACTIVE", (1, 109), T0 + 9),
            // The device's clock stepped back between progress and outcome:
            // the outcome still replaces the progress of its generation.
            report("c", 2, "LOADING", (1, 500), T0),
            report("c", 2, "ACTIVE", (1, 400), T0 + 1),
            other.clone(),
        ];
        if together {
            db.store.record_activations(&reports).await.unwrap();
        } else {
            for r in &reports {
                db.store.record_activation(r).await.unwrap();
            }
        }

        assert_eq!(
            db.store.activations("m", 2).await.unwrap(),
            [
                report("a", 2, "ACTIVE", (1, 102), T0 - 10),
                report("b", 2, "DOWNLOADING", (2, 90), T0 + 6),
                report("c", 2, "ACTIVE", (1, 400), T0 + 1)
            ]
        );
        assert_eq!(
            db.store.activations("m", 3).await.unwrap(),
            [report("a", 3, "ACTIVE", (1, 109), T0 + 9)]
        );
        assert_eq!(db.store.activations("n", 2).await.unwrap(), [other]);
        assert!(db.store.activations("m", 1).await.unwrap().is_empty());
        db.store.record_activations(&[]).await.unwrap();
    }

    async fn rollout_events_keep_insertion_order(db: &Db) {
        let mut r = rollout("r1", "m", 2, T0);
        create(db, &r, &["a"]).await.unwrap();
        create(db, &rollout("r2", "n", 1, T0), &["a"])
            .await
            .unwrap();
        // Times going backwards and ties: insertion order wins.
        let batches = [
            vec![event("r1", T0 + 50, "e1"), event("r1", T0 + 10, "e2")],
            vec![event("r1", T0 + 10, "e3")],
            vec![],
            vec![
                event("r1", T0, "e4"),
                event("r1", T0 + 100, "e5"),
                event("r1", T0, "e6"),
            ],
        ];
        for events in &batches {
            db.store
                .save_rollout_step(&mut r, &[], &[], events)
                .await
                .unwrap();
        }
        db.store
            .save_rollout_step(
                &mut rollout("r2", "n", 1, T0),
                &[],
                &[],
                &[event("r2", T0 + 1, "other")],
            )
            .await
            .unwrap();
        assert_eq!(
            actions(db, "r1").await,
            ["created", "e1", "e2", "e3", "e4", "e5", "e6"]
        );
        assert_eq!(
            db.store.rollout_events("r2").await.unwrap(),
            [event("r2", T0, "created"), event("r2", T0 + 1, "other")]
        );
        assert!(db.store.rollout_events("none").await.unwrap().is_empty());
    }

    async fn rollout_state_and_spec_round_trip(db: &Db) {
        let all = [
            RolloutState::Pending,
            RolloutState::Running,
            RolloutState::Paused,
            RolloutState::Succeeded,
            RolloutState::Aborted,
            RolloutState::RolledBack,
        ];
        for s in all {
            assert_eq!(RolloutState::parse(s.as_str()), Some(s));
        }
        assert_eq!(RolloutState::parse("done"), None);
        // The spec's JSON survives serde.
        let json = serde_json::to_string(&spec()).unwrap();
        assert_eq!(serde_json::from_str::<RolloutSpec>(&json).unwrap(), spec());

        let mut r = rollout("r1", "m", u64::MAX, T0);
        r.selector = labels(&[("site", "berlin"), ("tier", "edge \"quoted\"")]);
        r.spec.waves = vec![WaveSize::Percent(0.1), WaveSize::Count(u32::MAX)];
        r.spec.max_concurrent = 0;
        r.spec.rollback_on_failure = false;
        create(db, &r, &["a"]).await.unwrap();
        assert_eq!(db.store.rollout("r1").await.unwrap(), Some(r.clone()));
        for s in all {
            r.state = s;
            r.current_wave = u32::MAX;
            r.wave_done_at = T0 + 7;
            r.reason = format!("now {}", s.as_str());
            r.spec.soak_ms += 1;
            r.selector.insert("step".into(), s.as_str().into());
            db.store
                .save_rollout_step(&mut r, &[], &[], &[])
                .await
                .unwrap();
            assert_eq!(db.store.rollout("r1").await.unwrap(), Some(r.clone()));
            assert_eq!(
                db.store.active_rollouts().await.unwrap().len(),
                usize::from(s.is_active())
            );
        }
        // Model, version and creation are not rewritten by a step.
        let mut renamed = r.clone();
        renamed.model = "other".into();
        renamed.created_at = 1;
        db.store
            .save_rollout_step(&mut renamed, &[], &[], &[])
            .await
            .unwrap();
        // Only the revision moves.
        r.revision += 1;
        assert_eq!(renamed.revision, r.revision);
        assert_eq!(db.store.rollout("r1").await.unwrap(), Some(r));
        let mut m = member("r1", "a", u32::MAX);
        m.previous_version = u64::MAX;
        db.store
            .save_rollout_step(&mut renamed, &[m.clone()], &[], &[])
            .await
            .unwrap();
        assert_eq!(db.store.rollout_devices("r1").await.unwrap(), [m]);
    }

    async fn corrupt_registry_rows_are_errors(db: &Db) {
        db.store
            .insert_model(&model("m", 1, "aaa"))
            .await
            .unwrap()
            .unwrap();
        create(db, &rollout("r1", "m", 1, T0), &["a"])
            .await
            .unwrap();
        db.raw("UPDATE models SET inputs = 'not json'").await;
        assert!(matches!(
            db.store.model("m", Some(1)).await,
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            db.store.models(None, None, 100).await,
            Err(StoreError::Corrupt(_))
        ));
        db.raw("UPDATE rollouts SET state = 'exploded'").await;
        assert!(matches!(
            db.store.rollout("r1").await,
            Err(StoreError::Corrupt(_))
        ));
        db.raw("UPDATE rollouts SET state = 'running', spec = '{\"waves\": 3}'")
            .await;
        assert!(matches!(
            db.store.active_rollouts().await,
            Err(StoreError::Corrupt(_))
        ));
        db.raw(&format!(
            "UPDATE rollouts SET spec = '{}'",
            serde_json::to_string(&spec()).unwrap()
        ))
        .await;
        db.raw("UPDATE rollouts SET current_wave = -1").await;
        assert!(matches!(
            db.store.rollouts(None, None, 100).await,
            Err(StoreError::Corrupt(_))
        ));
        db.raw("UPDATE rollout_devices SET wave = 5000000000").await;
        assert!(matches!(
            db.store.rollout_devices("r1").await,
            Err(StoreError::Corrupt(_))
        ));
    }
}
