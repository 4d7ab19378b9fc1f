//! SQLite store: one file, WAL journal. SQLite has one writer at a time, so
//! writes go through a one-connection pool and start with `BEGIN IMMEDIATE`
//! (they queue in-process instead of failing with SQLITE_BUSY, and take the
//! write lock up front against other processes, waiting up to the busy
//! timeout); reads use a separate small pool that WAL lets run alongside.
//!
//! Telemetry for a device that does not exist is skipped (reported as not
//! stored), so one stale device cannot fail a whole group commit.

mod registry;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use prost::Message;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row, Sqlite, Transaction};

use super::common::{
    self, BatchSamplesRow, DEVICE_COLUMNS, DeviceRow, EventRow, HOUR_MS, JOIN_TOKEN_COLUMNS,
    JoinTokenRow, JoinTokenStateRow, LegacySampleRow, Merger, OperatorTokenRow, PointRow,
    ROLLOUT_TARGET_COLUMNS, RolloutTargetRow, RollupKey, from_db, hour_ceil, hour_of, to_db,
    to_json,
};
use super::{
    CertificateRenewal, Device, EventRecord, HelloRecord, JoinToken, JoinTokenRefusal, Labels,
    ModelPoint, NewDevice, OperatorToken, Resolution, RolloutTarget, RollupReport, Store,
    StoreError, TelemetryRecord,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// WAL pages (4 KiB) written before a commit copies them back into the
/// database file (a checkpoint, with an fsync). SQLite's default of 1,000
/// checkpoints after nearly every telemetry group commit, each rewriting the
/// same index pages; at 16,384 (64 MiB) a page rewritten by many commits is
/// copied back once.
const WAL_AUTOCHECKPOINT_PAGES: &str = "16384";
/// What the WAL file is truncated to after a checkpoint, so a burst does not
/// leave a large file behind.
const JOURNAL_SIZE_LIMIT_BYTES: &str = "67108864";
const READ_CONNECTIONS: u32 = 4;

/// Opens (creating if missing) the SQLite database file at `path`.
pub async fn open_file(path: &Path) -> Result<Arc<dyn Store>, StoreError> {
    Ok(Arc::new(SqliteStore::open(path).await?))
}

/// Opens a `sqlite://PATH` URL (query parameters are ignored; in-memory
/// databases are refused: the store needs a file shared by its pools).
pub async fn open_url(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| StoreError::Connect(format!("not a sqlite:// URL: {url:?}")))?;
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Err(StoreError::Connect(format!(
            "{url:?} names no database file: use sqlite://PATH"
        )));
    }
    open_file(Path::new(path)).await
}

#[derive(Debug)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteStore {
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before it is acknowledged. NORMAL in
            // WAL mode may lose the last commits on a power loss: telemetry
            // the agent deleted after its ack, enrollments, desired-state
            // generations (which would then go backwards).
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            .pragma("temp_store", "memory")
            .pragma("cache_size", "-32768")
            .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)
            .pragma("journal_size_limit", JOURNAL_SIZE_LIMIT_BYTES)
            .statement_cache_capacity(256);
        let connect_error =
            |e: sqlx::Error| StoreError::Connect(format!("SQLite {}: {e}", path.display()));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(60))
            // A connection to a local file does not go stale: no ping (a
            // round trip to its thread) before each use; sqlx still pings
            // it when it is released.
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await
            .map_err(connect_error)?;
        let known = common::known_version(&MIGRATOR);
        MIGRATOR
            .run(&writer)
            .await
            .map_err(|e| common::migrate_error(e, known))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS)
            .test_before_acquire(false)
            .connect_with(options.pragma("query_only", "ON"))
            .await
            .map_err(connect_error)?;
        let store = SqliteStore { writer, reader };
        store.convert_legacy_samples().await?;
        Ok(store)
    }

    async fn write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Moves model samples stored before migration 0003 (rows of
    /// `model_samples`) into their batches' `models` column, a step of
    /// batches per transaction. Nothing to do on a database created since.
    async fn convert_legacy_samples(&self) -> Result<(), StoreError> {
        loop {
            let mut tx = self.write().await?;
            let rows = sqlx::query_as::<_, LegacySampleRow>(
                "SELECT batch_id, model, version, requests, errors, local, offloaded, latency_us, \
                 batch_size, max_queue_depth FROM model_samples WHERE batch_id <= (SELECT max(batch_id) \
                 FROM (SELECT DISTINCT batch_id FROM model_samples ORDER BY batch_id LIMIT ?)) \
                 ORDER BY batch_id, model, version",
            )
            .bind(common::LEGACY_BATCHES_PER_STEP)
            .fetch_all(&mut *tx)
            .await?;
            let Some(last) = rows.last().map(|r| r.batch_id) else {
                tx.commit().await?;
                return Ok(());
            };
            for (id, models) in common::convert_legacy_samples(rows)? {
                sqlx::query("UPDATE telemetry_batches SET models = ? WHERE id = ?")
                    .bind(models)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query("DELETE FROM model_samples WHERE batch_id <= ?")
                .bind(last)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
    }
}

/// Row counts a multi-row statement is split into: a few fixed sizes, so the
/// prepared statements are reused.
fn chunk_sizes(mut n: usize) -> Vec<usize> {
    let mut out = Vec::new();
    for size in [128, 32, 8, 1] {
        while n >= size {
            out.push(size);
            n -= size;
        }
    }
    out
}

/// `(?, ?, ?), (?, ?, ?)` for `rows` rows of `cols` values.
fn placeholders(rows: usize, cols: usize) -> String {
    let row = format!("({})", vec!["?"; cols].join(", "));
    vec![row; rows].join(", ")
}

type SqliteQuery<'a> = sqlx::query::Query<'a, Sqlite, <Sqlite as sqlx::Database>::Arguments>;

/// Executes `sql(n)`, a statement over `n` rows, once per chunk of `rows`
/// ([`chunk_sizes`]), `bind` binding each row of the chunk in turn: a round
/// trip to SQLite's thread per chunk, not per row. SQLite applies a
/// statement's rows one after the other, so each meets the ones before it
/// as it would written alone.
async fn execute_chunked<'a, T>(
    tx: &mut Transaction<'static, Sqlite>,
    rows: &'a [T],
    sql: impl Fn(usize) -> String,
    bind: impl Fn(SqliteQuery<'a>, &'a T) -> SqliteQuery<'a>,
) -> Result<(), StoreError> {
    let mut rest = rows;
    for size in chunk_sizes(rows.len()) {
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        let mut query = sqlx::query(AssertSqlSafe(sql(size)));
        for row in chunk {
            query = bind(query, row);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// `UPDATE devices SET {set} FROM (VALUES …) AS v WHERE devices.id =
/// v.column1` over `rows`, at most one per device, a statement per chunk
/// ([`execute_chunked`]). `bind` binds a row's `cols` values, its device id
/// first.
async fn update_devices<'a, T>(
    tx: &mut Transaction<'static, Sqlite>,
    set: &'static str,
    cols: usize,
    rows: &'a [T],
    bind: impl Fn(SqliteQuery<'a>, &'a T) -> SqliteQuery<'a>,
) -> Result<(), StoreError> {
    let sql = |size| {
        format!(
            "UPDATE devices SET {set} FROM (VALUES {}) AS v WHERE devices.id = v.column1",
            placeholders(size, cols)
        )
    };
    execute_chunked(tx, rows, sql, bind).await
}

async fn device_in(
    tx: &mut Transaction<'static, Sqlite>,
    id: &str,
) -> Result<Option<Device>, StoreError> {
    let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?");
    sqlx::query_as::<_, DeviceRow>(AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?
        .map(Device::try_from)
        .transpose()
}

/// Devices carrying every label of the selector bound first (a JSON
/// object), matched by the database: the filter of [`Store::devices`] and
/// [`Store::devices_after`]. The empty selector takes every device without
/// reading its labels (nothing is wanted).
const SELECTED: &str = "NOT EXISTS ( \
     SELECT 1 FROM json_each(?1) AS wanted WHERE NOT EXISTS ( \
       SELECT 1 FROM json_each(devices.labels) AS have \
       WHERE have.key = wanted.key AND have.value = wanted.value))";

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn insert_operator_token(&self, token: &OperatorToken) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO operator_tokens (id, name, secret_hash, role, created_at, revoked_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&token.id)
        .bind(&token.name)
        .bind(&token.secret_hash)
        .bind(&token.role)
        .bind(token.created_at)
        .bind(token.revoked_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn operator_token_by_hash(
        &self,
        secret_hash: &str,
    ) -> Result<Option<OperatorToken>, StoreError> {
        let row = sqlx::query_as::<_, OperatorTokenRow>(
            "SELECT id, name, secret_hash, role, created_at, revoked_at FROM operator_tokens \
             WHERE secret_hash = ? AND revoked_at IS NULL",
        )
        .bind(secret_hash)
        .fetch_optional(&self.reader)
        .await?;
        Ok(row.map(OperatorToken::from))
    }

    async fn count_operator_tokens(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM operator_tokens")
            .fetch_one(&self.reader)
            .await?;
        Ok(from_db(n))
    }

    async fn insert_first_operator_token(&self, token: &OperatorToken) -> Result<bool, StoreError> {
        // The write transaction holds SQLite's write lock from its start.
        let mut tx = self.write().await?;
        let inserted = sqlx::query(
            "INSERT INTO operator_tokens (id, name, secret_hash, role, created_at, revoked_at) \
             SELECT ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM operator_tokens)",
        )
        .bind(&token.id)
        .bind(&token.name)
        .bind(&token.secret_hash)
        .bind(&token.role)
        .bind(token.created_at)
        .bind(token.revoked_at)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        tx.commit().await?;
        Ok(inserted)
    }

    async fn insert_join_token(&self, token: &JoinToken) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO join_tokens (id, secret_hash, labels, created_at, expires_at, uses_left, created_by, revoked_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&token.id)
        .bind(&token.secret_hash)
        .bind(common::join_token_labels(token))
        .bind(token.created_at)
        .bind(token.expires_at)
        .bind(i64::from(token.uses_left))
        .bind(&token.created_by)
        .bind(token.revoked_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn join_tokens(
        &self,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<JoinToken>, StoreError> {
        let sql = format!(
            "SELECT {JOIN_TOKEN_COLUMNS} FROM join_tokens \
             WHERE ?1 IS NULL OR (created_at, id) < (?1, ?2) \
             ORDER BY created_at DESC, id DESC LIMIT ?3"
        );
        let rows = sqlx::query_as::<_, JoinTokenRow>(AssertSqlSafe(sql))
            .bind(after.map(|(created_at, _)| created_at))
            .bind(after.map(|(_, id)| id))
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        rows.into_iter().map(JoinToken::try_from).collect()
    }

    async fn revoke_join_token(&self, id: &str, at: i64) -> Result<Option<JoinToken>, StoreError> {
        let mut tx = self.write().await?;
        let sql = format!(
            "UPDATE join_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ? \
             RETURNING {JOIN_TOKEN_COLUMNS}"
        );
        let row = sqlx::query_as::<_, JoinTokenRow>(AssertSqlSafe(sql))
            .bind(at)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        row.map(JoinToken::try_from).transpose()
    }

    async fn check_join_token(
        &self,
        token_id: &str,
        secret_hash: &str,
        at: i64,
    ) -> Result<Result<(), JoinTokenRefusal>, StoreError> {
        let sql = format!(
            "SELECT {} FROM join_tokens WHERE id = ?",
            JoinTokenStateRow::COLUMNS
        );
        let row = sqlx::query_as::<_, JoinTokenStateRow>(AssertSqlSafe(sql))
            .bind(token_id)
            .fetch_optional(&self.reader)
            .await?;
        Ok(JoinTokenStateRow::check(row.as_ref(), secret_hash, at))
    }

    async fn enroll_device(
        &self,
        token_id: &str,
        secret_hash: &str,
        device: &NewDevice,
    ) -> Result<Result<Device, JoinTokenRefusal>, StoreError> {
        let mut tx = self.write().await?;
        let labels: Option<String> = sqlx::query_scalar(
            "UPDATE join_tokens SET uses_left = uses_left - 1 \
             WHERE id = ? AND secret_hash = ? AND uses_left > 0 AND expires_at > ? \
             AND revoked_at IS NULL RETURNING labels",
        )
        .bind(token_id)
        .bind(secret_hash)
        .bind(device.enrolled_at)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(labels) = labels else {
            let sql = format!(
                "SELECT {} FROM join_tokens WHERE id = ?",
                JoinTokenStateRow::COLUMNS
            );
            let row = sqlx::query_as::<_, JoinTokenStateRow>(AssertSqlSafe(sql))
                .bind(token_id)
                .fetch_optional(&mut *tx)
                .await?;
            return Ok(Err(JoinTokenStateRow::refusal(
                row,
                secret_hash,
                device.enrolled_at,
            )));
        };
        // Validate the token's labels before they become the device's.
        common::from_json::<Labels>("labels", &format!("join token {token_id:?}"), &labels)?;
        sqlx::query(
            "INSERT INTO devices (id, labels, inventory, status, enrolled_at, join_token_id, \
             certificate_serial, certificate_expires_at) VALUES (?, ?, ?, 'enrolled', ?, ?, ?, ?)",
        )
        .bind(&device.id)
        .bind(&labels)
        .bind(to_json(&device.inventory))
        .bind(device.enrolled_at)
        .bind(token_id)
        .bind(&device.certificate_serial)
        .bind(device.certificate_expires_at)
        .execute(&mut *tx)
        .await?;
        let stored = device_in(&mut tx, &device.id)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("device {:?} vanished", device.id)))?;
        tx.commit().await?;
        Ok(Ok(stored))
    }

    async fn device(&self, id: &str) -> Result<Option<Device>, StoreError> {
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?");
        sqlx::query_as::<_, DeviceRow>(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .map(Device::try_from)
            .transpose()
    }

    async fn devices(&self, selector: &Labels) -> Result<Vec<Device>, StoreError> {
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE {SELECTED} ORDER BY id");
        let rows = sqlx::query_as::<_, DeviceRow>(AssertSqlSafe(sql))
            .bind(common::to_json(selector))
            .fetch_all(&self.reader)
            .await?;
        rows.into_iter().map(Device::try_from).collect()
    }

    async fn rollout_targets(&self, selector: &Labels) -> Result<Vec<RolloutTarget>, StoreError> {
        let sql =
            format!("SELECT {ROLLOUT_TARGET_COLUMNS} FROM devices WHERE {SELECTED} ORDER BY id");
        let rows = sqlx::query_as::<_, RolloutTargetRow>(AssertSqlSafe(sql))
            .bind(common::to_json(selector))
            .fetch_all(&self.reader)
            .await?;
        rows.into_iter().map(RolloutTarget::try_from).collect()
    }

    async fn device_changes(&self) -> Result<u64, StoreError> {
        let version: i64 = sqlx::query_scalar("SELECT version FROM device_changes")
            .fetch_one(&self.reader)
            .await?;
        Ok(from_db(version))
    }

    async fn devices_after(
        &self,
        selector: &Labels,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Device>, StoreError> {
        let sql = format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE {SELECTED} AND (?2 IS NULL OR id > ?2) ORDER BY id LIMIT ?3"
        );
        let rows = sqlx::query_as::<_, DeviceRow>(AssertSqlSafe(sql))
            .bind(common::to_json(selector))
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        rows.into_iter().map(Device::try_from).collect()
    }

    async fn revoke_device(&self, id: &str, at: i64) -> Result<Option<Device>, StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE devices SET status = 'revoked', revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
        )
        .bind(at)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let device = device_in(&mut tx, id).await?;
        tx.commit().await?;
        Ok(device)
    }

    async fn set_device_labels(
        &self,
        id: &str,
        labels: &Labels,
    ) -> Result<Option<Device>, StoreError> {
        let json = serde_json::to_string(labels)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode labels: {e}")))?;
        let mut tx = self.write().await?;
        sqlx::query("UPDATE devices SET labels = ? WHERE id = ?")
            .bind(json)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        let device = device_in(&mut tx, id).await?;
        tx.commit().await?;
        Ok(device)
    }

    async fn revocations_since(&self, since: i64) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, revoked_at FROM devices WHERE revoked_at >= ? ORDER BY revoked_at, id",
        )
        .bind(since)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("revoked_at")?)))
            .collect()
    }

    async fn set_device_certificate(
        &self,
        id: &str,
        serial: &str,
        expires_at: i64,
        presented: &str,
    ) -> Result<CertificateRenewal, StoreError> {
        let mut tx = self.write().await?;
        let updated = sqlx::query(
            "UPDATE devices SET certificate_serial = ?1, certificate_expires_at = ?2, \
             previous_certificate_serial = ?3 \
             WHERE id = ?4 AND status <> 'revoked' \
             AND (certificate_serial = ?3 OR previous_certificate_serial = ?3)",
        )
        .bind(serial)
        .bind(expires_at)
        .bind(presented)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let renewal = if updated > 0 {
            CertificateRenewal::Recorded
        } else {
            let status: Option<String> =
                sqlx::query_scalar("SELECT status FROM devices WHERE id = ?")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
            common::refused_renewal(status.as_deref())
        };
        tx.commit().await?;
        Ok(renewal)
    }

    async fn retire_previous_certificate(
        &self,
        id: &str,
        serial: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let updated = sqlx::query(
            "UPDATE devices SET previous_certificate_serial = NULL \
             WHERE id = ? AND certificate_serial = ? AND previous_certificate_serial IS NOT NULL",
        )
        .bind(id)
        .bind(serial)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(updated > 0)
    }

    async fn record_hellos(&self, hellos: &[HelloRecord]) -> Result<(), StoreError> {
        let hellos = common::latest_hellos(hellos);
        if hellos.is_empty() {
            return Ok(());
        }
        let mut tx = self.write().await?;
        update_devices(
            &mut tx,
            "inventory = v.column2, models = v.column3, runtime = v.column4, \
             last_seen = max(devices.last_seen, v.column5)",
            5,
            &hellos,
            |q, (hello, at)| {
                q.bind(&hello.device_id)
                    .bind(to_json(&hello.inventory))
                    .bind(to_json(&hello.models))
                    .bind(&hello.runtime)
                    .bind(*at)
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn touch_devices(&self, touches: &[(String, i64)]) -> Result<(), StoreError> {
        let touches = common::latest_touches(touches);
        if touches.is_empty() {
            return Ok(());
        }
        let mut tx = self.write().await?;
        update_devices(
            &mut tx,
            "last_seen = max(devices.last_seen, v.column2)",
            2,
            &touches,
            |q, (id, at)| q.bind(*id).bind(*at),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn ingest_telemetry(&self, batches: &[TelemetryRecord]) -> Result<Vec<bool>, StoreError> {
        if batches.is_empty() {
            return Ok(Vec::new());
        }
        // Only the first occurrence of a (device, sequence) in the call can be new.
        let mut seen = HashSet::with_capacity(batches.len());
        let candidates: Vec<usize> = (0..batches.len())
            .filter(|&i| seen.insert((batches[i].device_id.as_str(), batches[i].sequence)))
            .collect();

        let mut tx = self.write().await?;

        // Batches: insert those of known devices, learn which were new.
        let mut inserted: HashMap<(String, i64), i64> = HashMap::with_capacity(candidates.len());
        let mut rest = &candidates[..];
        for size in chunk_sizes(candidates.len()) {
            let (chunk, tail) = rest.split_at(size);
            rest = tail;
            let sql = format!(
                "INSERT INTO telemetry_batches (device_id, sequence, received_at, start_at, end_at, hour, device, models, \
                   server_end_at) \
                 SELECT v.column1, v.column2, v.column3, v.column4, v.column5, v.column6, v.column7, v.column8, v.column9 \
                 FROM (VALUES {}) AS v WHERE EXISTS (SELECT 1 FROM devices d WHERE d.id = v.column1) \
                 ON CONFLICT DO NOTHING RETURNING id, device_id, sequence",
                placeholders(size, 9)
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for &i in chunk {
                let b = &batches[i];
                q = q
                    .bind(&b.device_id)
                    .bind(to_db(b.sequence))
                    .bind(b.received_at)
                    .bind(b.start_at)
                    .bind(b.end_at)
                    .bind(hour_of(b.start_at))
                    .bind(b.device.as_ref().map(|d| d.encode_to_vec()))
                    .bind(common::encode_samples(b))
                    .bind(b.server_end_at);
            }
            let mut rows = q.fetch(&mut *tx);
            while let Some(row) = rows.try_next().await? {
                inserted.insert((row.try_get(1)?, row.try_get(2)?), row.try_get(0)?);
            }
        }
        let mut stored = vec![false; batches.len()];
        let mut new_batches: Vec<(i64, &TelemetryRecord)> = Vec::with_capacity(inserted.len());
        for &i in &candidates {
            let b = &batches[i];
            if let Some(&id) = inserted.get(&(b.device_id.clone(), to_db(b.sequence))) {
                stored[i] = true;
                new_batches.push((id, b));
            }
        }
        if new_batches.len() < candidates.len() {
            let unknown: HashSet<&str> = candidates
                .iter()
                .filter(|&&i| !stored[i])
                .map(|&i| batches[i].device_id.as_str())
                .collect();
            tracing::debug!(
                skipped = candidates.len() - new_batches.len(),
                devices = ?unknown,
                "telemetry batches already stored or of unknown devices"
            );
        }

        // Events.
        let events: Vec<(i64, &TelemetryRecord, usize, &EventRecord)> = new_batches
            .iter()
            .flat_map(|&(id, b)| b.events.iter().enumerate().map(move |(k, e)| (id, b, k, e)))
            .collect();
        let mut rest = &events[..];
        for size in chunk_sizes(events.len()) {
            let (chunk, tail) = rest.split_at(size);
            rest = tail;
            let sql = format!(
                "INSERT INTO events (batch_id, idx, device_id, at, kind, model, version, message) VALUES {}",
                placeholders(size, 8)
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for (id, b, k, e) in chunk {
                q = q
                    .bind(*id)
                    .bind(*k as i64)
                    .bind(&b.device_id)
                    .bind(e.at)
                    .bind(&e.kind)
                    .bind(&e.model)
                    .bind(to_db(e.version))
                    .bind(&e.message);
            }
            q.execute(&mut *tx).await?;
        }

        // Devices: one multi-row UPDATE … FROM (VALUES …) per chunk.
        let deltas: Vec<_> = common::device_deltas(new_batches.iter().map(|&(_, b)| b))
            .into_iter()
            .collect();
        let mut rest = &deltas[..];
        for size in chunk_sizes(deltas.len()) {
            let (chunk, tail) = rest.split_at(size);
            rest = tail;
            let sql = format!(
                "UPDATE devices SET last_sequence = max(last_sequence, u.column2), \
                 last_seen = max(last_seen, u.column3), \
                 requests_total = requests_total + min(u.column4, 9223372036854775807 - requests_total), \
                 errors_total = errors_total + min(u.column5, 9223372036854775807 - errors_total), \
                 offloaded_total = offloaded_total + min(u.column6, 9223372036854775807 - offloaded_total), \
                 dropped_batches_total = max(dropped_batches_total, u.column7), \
                 health = CASE WHEN u.column8 > health_sequence THEN u.column9 ELSE health END, \
                 health_sequence = CASE WHEN u.column8 > health_sequence THEN u.column8 ELSE health_sequence END \
                 FROM (VALUES {}) AS u WHERE devices.id = u.column1",
                placeholders(size, 9)
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for (id, d) in chunk {
                let (health_seq, health) = match &d.health {
                    Some((s, bytes)) => (Some(*s), Some(bytes.clone())),
                    None => (None, None),
                };
                q = q
                    .bind(*id)
                    .bind(d.last_sequence)
                    .bind(d.last_seen)
                    .bind(common::increment_to_db(d.requests))
                    .bind(common::increment_to_db(d.errors))
                    .bind(common::increment_to_db(d.offloaded))
                    .bind(d.dropped)
                    .bind(health_seq)
                    .bind(health);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(stored)
    }

    async fn last_sequence(&self, device_id: &str) -> Result<u64, StoreError> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT last_sequence FROM devices WHERE id = ?")
            .bind(device_id)
            .fetch_optional(&self.reader)
            .await?;
        Ok(seq.map(from_db).unwrap_or(0))
    }

    async fn telemetry_sequences(&self, device_id: &str) -> Result<Vec<u64>, StoreError> {
        let seqs: Vec<i64> = sqlx::query_scalar(
            "SELECT sequence FROM telemetry_batches WHERE device_id = ? ORDER BY sequence",
        )
        .bind(device_id)
        .fetch_all(&self.reader)
        .await?;
        Ok(seqs.into_iter().map(from_db).collect())
    }

    async fn model_series(
        &self,
        device_id: &str,
        from: i64,
        until: i64,
        resolution: Resolution,
    ) -> Result<Vec<ModelPoint>, StoreError> {
        match resolution {
            Resolution::Raw => {
                let rows = sqlx::query_as::<_, BatchSamplesRow>(
                    "SELECT device_id, start_at AS at, end_at AS until, sequence, models \
                     FROM telemetry_batches WHERE device_id = ? AND end_at >= ? AND end_at < ? \
                     ORDER BY start_at, sequence",
                )
                .bind(device_id)
                .bind(from)
                .bind(until)
                .fetch_all(&self.reader)
                .await?;
                common::raw_points(rows)
            }
            Resolution::Hourly => {
                let mut tx = self.reader.begin().await?;
                let rollups = sqlx::query_as::<_, PointRow>(
                    "SELECT device_id, hour AS at, hour + 3600000 AS until, model, version, requests, \
                     errors, local, offloaded, latency_us, batch_size, max_queue_depth \
                     FROM model_rollups_hourly WHERE device_id = ? AND hour > ? AND hour < ?",
                )
                .bind(device_id)
                .bind(from - HOUR_MS)
                .bind(until)
                .fetch_all(&mut *tx)
                .await?;
                let raw = sqlx::query_as::<_, BatchSamplesRow>(
                    "SELECT device_id, hour AS at, hour + 3600000 AS until, sequence, models \
                     FROM telemetry_batches WHERE device_id = ? AND rolled_up = 0 AND hour > ? AND hour < ?",
                )
                .bind(device_id)
                .bind(from - HOUR_MS)
                .bind(until)
                .fetch_all(&mut *tx)
                .await?;
                tx.commit().await?;
                common::merge_points(rollups, raw, |p| (p.at, p.name.clone(), p.version))
            }
        }
    }

    async fn received_model_series(
        &self,
        device_ids: &[String],
        made_since: i64,
        received: std::ops::Range<i64>,
    ) -> Result<Vec<(String, ModelPoint)>, StoreError> {
        // Found by index (device_id, received_at), migration 0009, one range per
        // device. A batch that ended before `made_since` is left out, by when
        // it ended in server time as reckoned at receipt (`server_end_at`,
        // 0010). Rows stored before 0010 have none and are reckoned as they
        // were then: the batches of one upload share their device and
        // received_at, and the newest of them ended just before the upload
        // was sent, so a batch ended (newest end - its end) before the upload
        // arrived, a difference of two times on the same device clock, whose
        // skew cancels out.
        let ids = serde_json::to_string(device_ids)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode device ids: {e}")))?;
        let rows = sqlx::query_as::<_, BatchSamplesRow>(
            "SELECT device_id, at, until, sequence, models FROM ( \
               SELECT device_id, start_at AS at, end_at AS until, sequence, models, received_at, server_end_at, \
                 MAX(end_at) OVER (PARTITION BY device_id, received_at) AS newest \
               FROM telemetry_batches WHERE device_id IN (SELECT value FROM json_each(?1)) AND received_at >= ?2 AND received_at < ?3) AS b \
             WHERE COALESCE(server_end_at, received_at - (newest - until)) >= ?4",
        )
        .bind(ids)
        .bind(received.start)
        .bind(received.end)
        .bind(made_since)
        .fetch_all(&self.reader)
        .await?;
        common::raw_points_by_device(rows)
    }

    async fn device_series(
        &self,
        device_id: &str,
        from: i64,
        until: i64,
    ) -> Result<Vec<(i64, edgefleet_proto::edgefleet::v1::DeviceTelemetry)>, StoreError> {
        let rows = sqlx::query(
            "SELECT end_at, device FROM telemetry_batches \
             WHERE device_id = ? AND end_at >= ? AND end_at < ? AND device IS NOT NULL \
             ORDER BY end_at, sequence",
        )
        .bind(device_id)
        .bind(from)
        .bind(until)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                let end: i64 = r.try_get(0)?;
                let bytes: Vec<u8> = r.try_get(1)?;
                let owner = format!("device {device_id:?} at {end}");
                Ok((end, common::decode_telemetry(&owner, &bytes)?))
            })
            .collect()
    }

    async fn fleet_model_totals(
        &self,
        from: i64,
        until: i64,
    ) -> Result<Vec<ModelPoint>, StoreError> {
        // Whole hours inside the range come from rollups plus raw data not
        // rolled up yet; partial hours at the edges from raw data.
        let lo = hour_ceil(from);
        let hi = hour_of(until).max(lo);
        let mut tx = self.reader.begin().await?;
        let rollups = sqlx::query_as::<_, PointRow>(
            "SELECT device_id, hour AS at, hour + 3600000 AS until, model, version, requests, \
             errors, local, offloaded, latency_us, batch_size, max_queue_depth \
             FROM model_rollups_hourly WHERE hour >= ? AND hour < ?",
        )
        .bind(lo)
        .bind(hi)
        .fetch_all(&mut *tx)
        .await?;
        let raw = sqlx::query_as::<_, BatchSamplesRow>(
            "SELECT device_id, start_at AS at, end_at AS until, sequence, models FROM telemetry_batches \
             WHERE (rolled_up = 0 AND hour >= ?1 AND hour < ?2) \
                OR ((hour < ?1 OR hour >= ?2) AND start_at >= ?3 AND start_at < ?4)",
        )
        .bind(lo)
        .bind(hi)
        .bind(from)
        .bind(until)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        // Each point covers the whole window.
        common::merge_points(rollups, raw, |p| {
            p.at = from;
            p.until = until;
            (p.name.clone(), p.version)
        })
    }

    async fn events(
        &self,
        device_id: &str,
        from: i64,
        until: i64,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let rows = sqlx::query_as::<_, EventRow>(
            "SELECT at, kind, model, version, message FROM events \
             WHERE device_id = ? AND at >= ? AND at < ? ORDER BY at, batch_id, idx",
        )
        .bind(device_id)
        .bind(from)
        .bind(until)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.into_iter().map(EventRecord::from).collect())
    }

    async fn rollup_and_prune(
        &self,
        now: i64,
        retention_ms: i64,
        rollup_retention_ms: i64,
    ) -> Result<RollupReport, StoreError> {
        let current_hour = hour_of(now);
        let mut tx = self.write().await?;
        // New raw samples of complete hours, merged per (device, hour, model, version).
        let mut merger: Merger<RollupKey> = Merger::default();
        {
            let mut rows = sqlx::query_as::<_, BatchSamplesRow>(
                "SELECT device_id, hour AS at, hour + 3600000 AS until, sequence, models \
                 FROM telemetry_batches WHERE rolled_up = 0 AND hour < ?",
            )
            .bind(current_hour)
            .fetch(&mut *tx);
            while let Some(row) = rows.try_next().await? {
                let device = row.device_id.clone();
                for p in row.into_points()? {
                    merger.add((device.clone(), p.at, p.name.clone(), to_db(p.version)), p);
                }
            }
        }
        sqlx::query("UPDATE telemetry_batches SET rolled_up = 1 WHERE rolled_up = 0 AND hour < ?")
            .bind(current_hour)
            .execute(&mut *tx)
            .await?;
        let hours_rolled_up = merger.groups.len() as u64;
        for ((device, hour, model, version), mut point) in merger.groups {
            let existing = sqlx::query_as::<_, PointRow>(
                "SELECT device_id, hour AS at, hour + 3600000 AS until, model, version, requests, \
                 errors, local, offloaded, latency_us, batch_size, max_queue_depth \
                 FROM model_rollups_hourly WHERE device_id = ? AND hour = ? AND model = ? AND version = ?",
            )
            .bind(&device)
            .bind(hour)
            .bind(&model)
            .bind(version)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = existing {
                common::accumulate(&mut point, &row.into_point()?);
            }
            sqlx::query(
                "INSERT OR REPLACE INTO model_rollups_hourly (device_id, hour, model, version, requests, \
                 errors, local, offloaded, latency_us, batch_size, max_queue_depth) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&device)
            .bind(hour)
            .bind(&model)
            .bind(version)
            .bind(to_db(point.requests))
            .bind(to_db(point.errors))
            .bind(to_db(point.local))
            .bind(to_db(point.offloaded))
            .bind(point.latency_us.encode_to_vec())
            .bind(point.batch_size.encode_to_vec())
            .bind(i64::from(point.max_queue_depth))
            .execute(&mut *tx)
            .await?;
        }
        let pruned =
            sqlx::query("DELETE FROM telemetry_batches WHERE rolled_up = 1 AND end_at < ?")
                .bind(now.saturating_sub(retention_ms))
                .execute(&mut *tx)
                .await?
                .rows_affected();
        // Hours that ended before the rollup retention (`hour + 1h <= cutoff`,
        // written so that no hour overflows).
        let rollups_pruned = sqlx::query("DELETE FROM model_rollups_hourly WHERE hour <= ?")
            .bind(
                now.saturating_sub(rollup_retention_ms)
                    .saturating_sub(HOUR_MS),
            )
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(RollupReport {
            hours_rolled_up,
            batches_pruned: pruned,
            rollups_pruned,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commits_are_durable_before_they_are_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("edgefleet.db"))
            .await
            .unwrap();
        for pool in [&store.writer, &store.reader] {
            let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(pool)
                .await
                .unwrap();
            assert_eq!(synchronous, 2, "PRAGMA synchronous = FULL");
        }
    }
}
