//! PostgreSQL store. The hot path (`ingest_telemetry`) sends each table's rows
//! as arrays and inserts them with `UNNEST`: one statement per table per call,
//! whatever the number of batches (a batch is one row, its model samples one
//! column). Concurrent calls are safe: batches are inserted in (device,
//! sequence) order, and only the device-row updates are serialized.
//!
//! Telemetry for a device that does not exist is skipped (reported as not
//! stored), so one stale device cannot fail a whole group commit.

mod registry;

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use prost::Message;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Postgres, Row, Transaction};

use super::common::{
    self, BatchSamplesRow, DEVICE_COLUMNS, DeviceRow, EventRow, HOUR_MS, JOIN_TOKEN_COLUMNS,
    JoinTokenRow, JoinTokenStateRow, LegacySampleRow, Merger, OperatorTokenRow, PointRow,
    ROLLOUT_TARGET_COLUMNS, RolloutTargetRow, RollupKey, from_db, hour_ceil, hour_of, to_db,
    to_json,
};
use super::{
    CertificateRenewal, DatabaseErrorText, Device, EventRecord, HelloRecord, JoinToken,
    JoinTokenRefusal, Labels, ModelPoint, NewDevice, OperatorToken, Resolution, RolloutTarget,
    RollupReport, Store, StoreError, TelemetryRecord,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

const MAX_CONNECTIONS: u32 = 8;

/// Connects to `url` and applies migrations.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    Ok(Arc::new(PgStore::open(url).await?))
}

#[derive(Debug)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Connect(format!("invalid PostgreSQL URL: {e}")))?;
        let connect_error =
            |e: sqlx::Error| StoreError::Connect(format!("PostgreSQL: {}", DatabaseErrorText(&e)));
        // Migrate on a connection of its own, closed afterwards: the migrator
        // holds a session advisory lock it does not release when it fails, and
        // closing the connection releases it.
        let mut conn = options.connect().await.map_err(connect_error)?;
        let known = common::known_version(&MIGRATOR);
        MIGRATOR
            .run(&mut conn)
            .await
            .map_err(|e| common::migrate_error(e, known))?;
        conn.close().await.map_err(connect_error)?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .map_err(connect_error)?;
        let store = PgStore { pool };
        store.convert_legacy_samples().await?;
        Ok(store)
    }

    /// A read-only transaction whose statements all see one snapshot.
    async fn snapshot(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        Ok(self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await?)
    }

    /// Moves model samples stored before migration 0003 (rows of
    /// `model_samples`) into their batches' `models` column, a step of
    /// batches per transaction; replicas starting together take turns.
    /// Nothing to do on a database created since.
    async fn convert_legacy_samples(&self) -> Result<(), StoreError> {
        loop {
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.edgefleet.legacy_samples'))",
            )
            .execute(&mut *tx)
            .await?;
            let rows = sqlx::query_as::<_, LegacySampleRow>(
                "SELECT batch_id, model, version, requests, errors, local, offloaded, latency_us, \
                 batch_size, max_queue_depth FROM model_samples WHERE batch_id <= (SELECT max(batch_id) \
                 FROM (SELECT DISTINCT batch_id FROM model_samples ORDER BY batch_id LIMIT $1) AS first) \
                 ORDER BY batch_id, model, version",
            )
            .bind(common::LEGACY_BATCHES_PER_STEP)
            .fetch_all(&mut *tx)
            .await?;
            let Some(last) = rows.last().map(|r| r.batch_id) else {
                tx.commit().await?;
                return Ok(());
            };
            let (ids, models): (Vec<i64>, Vec<Vec<u8>>) =
                common::convert_legacy_samples(rows)?.into_iter().unzip();
            sqlx::query(
                "UPDATE telemetry_batches b SET models = u.models \
                 FROM UNNEST($1::int8[], $2::bytea[]) AS u(id, models) WHERE b.id = u.id",
            )
            .bind(&ids)
            .bind(&models)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM model_samples WHERE batch_id <= $1")
                .bind(last)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
    }
}

async fn device_in(
    tx: &mut Transaction<'static, Postgres>,
    id: &str,
) -> Result<Option<Device>, StoreError> {
    let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1");
    sqlx::query_as::<_, DeviceRow>(AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?
        .map(Device::try_from)
        .transpose()
}

/// Locks the rows of devices `ids`, one after the other in id order, so two
/// replicas' group writes touching the same devices wait for each other
/// instead of deadlocking, whatever order their UPDATE then takes.
async fn lock_devices(
    tx: &mut Transaction<'static, Postgres>,
    ids: &[&str],
) -> Result<(), StoreError> {
    sqlx::query("SELECT id FROM devices WHERE id = ANY($1) ORDER BY id FOR UPDATE")
        .bind(ids)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

const POINT_FROM_ROLLUPS: &str = "SELECT device_id, hour AS at, hour + 3600000 AS until, model, version, requests, \
     errors, local, offloaded, latency_us, batch_size, max_queue_depth FROM model_rollups_hourly";

/// Devices carrying every label of the selector bound first (a JSON
/// object), matched by the database: the filter of [`Store::devices`] and
/// [`Store::devices_after`]. The empty selector takes every device without
/// reading its labels (a row whose labels are not JSON is then found
/// corrupt as it is decoded, as on SQLite, not refused by the cast).
const SELECTED: &str = "CASE WHEN $1::text = '{}' THEN TRUE ELSE labels::jsonb @> $1::jsonb END";

#[async_trait::async_trait]
impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn insert_operator_token(&self, token: &OperatorToken) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO operator_tokens (id, name, secret_hash, role, created_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&token.id)
        .bind(&token.name)
        .bind(&token.secret_hash)
        .bind(&token.role)
        .bind(token.created_at)
        .bind(token.revoked_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn operator_token_by_hash(
        &self,
        secret_hash: &str,
    ) -> Result<Option<OperatorToken>, StoreError> {
        let row = sqlx::query_as::<_, OperatorTokenRow>(
            "SELECT id, name, secret_hash, role, created_at, revoked_at FROM operator_tokens \
             WHERE secret_hash = $1 AND revoked_at IS NULL",
        )
        .bind(secret_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(OperatorToken::from))
    }

    async fn count_operator_tokens(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM operator_tokens")
            .fetch_one(&self.pool)
            .await?;
        Ok(from_db(n))
    }

    async fn insert_first_operator_token(&self, token: &OperatorToken) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Without the lock, two transactions each see no token (neither sees
        // the other's uncommitted row) and both insert.
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.edgefleet.first_operator_token'))",
        )
        .execute(&mut *tx)
        .await?;
        let inserted = sqlx::query(
            "INSERT INTO operator_tokens (id, name, secret_hash, role, created_at, revoked_at) \
             SELECT $1, $2, $3, $4, $5, $6 WHERE NOT EXISTS (SELECT 1 FROM operator_tokens)",
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
        sqlx::query(
            "INSERT INTO join_tokens (id, secret_hash, labels, created_at, expires_at, uses_left, created_by, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&token.id)
        .bind(&token.secret_hash)
        .bind(common::join_token_labels(token))
        .bind(token.created_at)
        .bind(token.expires_at)
        .bind(i64::from(token.uses_left))
        .bind(&token.created_by)
        .bind(token.revoked_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn join_tokens(
        &self,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<JoinToken>, StoreError> {
        let sql = format!(
            "SELECT {JOIN_TOKEN_COLUMNS} FROM join_tokens \
             WHERE $1::bigint IS NULL OR (created_at, id) < ($1, $2) \
             ORDER BY created_at DESC, id DESC LIMIT $3"
        );
        let rows = sqlx::query_as::<_, JoinTokenRow>(AssertSqlSafe(sql))
            .bind(after.map(|(created_at, _)| created_at))
            .bind(after.map(|(_, id)| id))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(JoinToken::try_from).collect()
    }

    async fn revoke_join_token(&self, id: &str, at: i64) -> Result<Option<JoinToken>, StoreError> {
        let sql = format!(
            "UPDATE join_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2 \
             RETURNING {JOIN_TOKEN_COLUMNS}"
        );
        let row = sqlx::query_as::<_, JoinTokenRow>(AssertSqlSafe(sql))
            .bind(at)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(JoinToken::try_from).transpose()
    }

    async fn check_join_token(
        &self,
        token_id: &str,
        secret_hash: &str,
        at: i64,
    ) -> Result<Result<(), JoinTokenRefusal>, StoreError> {
        let sql = format!(
            "SELECT {} FROM join_tokens WHERE id = $1",
            JoinTokenStateRow::COLUMNS
        );
        let row = sqlx::query_as::<_, JoinTokenStateRow>(AssertSqlSafe(sql))
            .bind(token_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(JoinTokenStateRow::check(row.as_ref(), secret_hash, at))
    }

    async fn enroll_device(
        &self,
        token_id: &str,
        secret_hash: &str,
        device: &NewDevice,
    ) -> Result<Result<Device, JoinTokenRefusal>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The row lock the UPDATE takes serializes concurrent enrollments;
        // each re-checks uses_left > 0 after the previous one committed.
        let labels: Option<String> = sqlx::query_scalar(
            "UPDATE join_tokens SET uses_left = uses_left - 1 \
             WHERE id = $1 AND secret_hash = $2 AND uses_left > 0 AND expires_at > $3 \
             AND revoked_at IS NULL RETURNING labels",
        )
        .bind(token_id)
        .bind(secret_hash)
        .bind(device.enrolled_at)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(labels) = labels else {
            let sql = format!(
                "SELECT {} FROM join_tokens WHERE id = $1",
                JoinTokenStateRow::COLUMNS
            );
            let row = sqlx::query_as::<_, JoinTokenStateRow>(AssertSqlSafe(sql))
                .bind(token_id)
                .fetch_optional(&mut *tx)
                .await?;
            tx.rollback().await?;
            return Ok(Err(JoinTokenStateRow::refusal(
                row,
                secret_hash,
                device.enrolled_at,
            )));
        };
        common::from_json::<Labels>("labels", &format!("join token {token_id:?}"), &labels)?;
        sqlx::query(
            "INSERT INTO devices (id, labels, inventory, status, enrolled_at, join_token_id, \
             certificate_serial, certificate_expires_at) VALUES ($1, $2, $3, 'enrolled', $4, $5, $6, $7)",
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
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1");
        sqlx::query_as::<_, DeviceRow>(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(Device::try_from)
            .transpose()
    }

    async fn devices(&self, selector: &Labels) -> Result<Vec<Device>, StoreError> {
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE {SELECTED} ORDER BY id");
        let rows = sqlx::query_as::<_, DeviceRow>(AssertSqlSafe(sql))
            .bind(common::to_json(selector))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(Device::try_from).collect()
    }

    async fn rollout_targets(&self, selector: &Labels) -> Result<Vec<RolloutTarget>, StoreError> {
        let sql =
            format!("SELECT {ROLLOUT_TARGET_COLUMNS} FROM devices WHERE {SELECTED} ORDER BY id");
        let rows = sqlx::query_as::<_, RolloutTargetRow>(AssertSqlSafe(sql))
            .bind(common::to_json(selector))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(RolloutTarget::try_from).collect()
    }

    async fn device_changes(&self) -> Result<u64, StoreError> {
        // The sum of the counter's slots (migration 0013): each commit that
        // changed a device added one to one of them.
        let version: i64 =
            sqlx::query_scalar("SELECT sum(changes)::bigint FROM device_change_slots")
                .fetch_one(&self.pool)
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
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE {SELECTED} AND ($2::text IS NULL OR id > $2) ORDER BY id LIMIT $3"
        );
        let rows = sqlx::query_as::<_, DeviceRow>(AssertSqlSafe(sql))
            .bind(common::to_json(selector))
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(Device::try_from).collect()
    }

    async fn revoke_device(&self, id: &str, at: i64) -> Result<Option<Device>, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE devices SET status = 'revoked', revoked_at = COALESCE(revoked_at, $1) WHERE id = $2",
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
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE devices SET labels = $1 WHERE id = $2")
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
            "SELECT id, revoked_at FROM devices WHERE revoked_at >= $1 ORDER BY revoked_at, id",
        )
        .bind(since)
        .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE devices SET certificate_serial = $1, certificate_expires_at = $2, \
             previous_certificate_serial = $3 \
             WHERE id = $4 AND status <> 'revoked' \
             AND (certificate_serial = $3 OR previous_certificate_serial = $3)",
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
                sqlx::query_scalar("SELECT status FROM devices WHERE id = $1")
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
        let updated = sqlx::query(
            "UPDATE devices SET previous_certificate_serial = NULL \
             WHERE id = $1 AND certificate_serial = $2 AND previous_certificate_serial IS NOT NULL",
        )
        .bind(id)
        .bind(serial)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(updated > 0)
    }

    async fn record_hellos(&self, hellos: &[HelloRecord]) -> Result<(), StoreError> {
        let hellos = common::latest_hellos(hellos);
        if hellos.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = hellos.iter().map(|(h, _)| h.device_id.as_str()).collect();
        let mut tx = self.pool.begin().await?;
        lock_devices(&mut tx, &ids).await?;
        // One statement for the group, not one per Hello: a round trip each.
        sqlx::query(
            "UPDATE devices AS d SET inventory = h.inventory, models = h.models, runtime = h.runtime, \
             last_seen = GREATEST(d.last_seen, h.at) \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[]) \
               AS h(id, inventory, models, runtime, at) \
             WHERE d.id = h.id",
        )
        .bind(&ids)
        .bind(hellos.iter().map(|(h, _)| to_json(&h.inventory)).collect::<Vec<_>>())
        .bind(hellos.iter().map(|(h, _)| to_json(&h.models)).collect::<Vec<_>>())
        .bind(hellos.iter().map(|(h, _)| h.runtime.as_str()).collect::<Vec<_>>())
        .bind(hellos.iter().map(|(_, at)| *at).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn touch_devices(&self, touches: &[(String, i64)]) -> Result<(), StoreError> {
        let touches = common::latest_touches(touches);
        if touches.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = touches.iter().map(|(id, _)| *id).collect();
        let mut tx = self.pool.begin().await?;
        lock_devices(&mut tx, &ids).await?;
        sqlx::query(
            "UPDATE devices AS d SET last_seen = GREATEST(d.last_seen, t.at) \
             FROM UNNEST($1::text[], $2::int8[]) AS t(id, at) WHERE d.id = t.id",
        )
        .bind(&ids)
        .bind(touches.iter().map(|(_, at)| *at).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn ingest_telemetry(&self, batches: &[TelemetryRecord]) -> Result<Vec<bool>, StoreError> {
        if batches.is_empty() {
            return Ok(Vec::new());
        }
        let mut seen = HashSet::with_capacity(batches.len());
        let mut candidates: Vec<usize> = (0..batches.len())
            .filter(|&i| seen.insert((batches[i].device_id.as_str(), batches[i].sequence)))
            .collect();
        // Inserted in (device, sequence) order, so two concurrent calls
        // holding the same batch wait on each other's uncommitted row in one
        // direction only (no deadlock).
        candidates.sort_unstable_by(|&a, &b| {
            (batches[a].device_id.as_str(), batches[a].sequence)
                .cmp(&(batches[b].device_id.as_str(), batches[b].sequence))
        });

        let mut tx = self.pool.begin().await?;

        let n = candidates.len();
        let mut models = Vec::with_capacity(n);
        let mut server_ends = Vec::with_capacity(n);
        let (mut ids, mut seqs, mut received, mut starts, mut ends, mut hours, mut samples) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for &i in &candidates {
            let b = &batches[i];
            ids.push(b.device_id.as_str());
            seqs.push(to_db(b.sequence));
            received.push(b.received_at);
            starts.push(b.start_at);
            ends.push(b.end_at);
            hours.push(hour_of(b.start_at));
            samples.push(b.device.as_ref().map(|d| d.encode_to_vec()));
            models.push(common::encode_samples(b));
            server_ends.push(b.server_end_at);
        }
        let rows = sqlx::query(
            "INSERT INTO telemetry_batches (device_id, sequence, received_at, start_at, end_at, hour, device, models, \
               server_end_at) \
             SELECT u.device_id, u.sequence, u.received_at, u.start_at, u.end_at, u.hour, u.device, u.models, \
               u.server_end_at \
             FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::bytea[], \
               $8::bytea[], $9::int8[]) WITH ORDINALITY AS u(device_id, sequence, received_at, start_at, end_at, hour, \
               device, models, server_end_at, n) \
             WHERE EXISTS (SELECT 1 FROM devices d WHERE d.id = u.device_id) \
             ORDER BY u.n \
             ON CONFLICT DO NOTHING RETURNING id, device_id, sequence",
        )
        .bind(&ids)
        .bind(&seqs)
        .bind(&received)
        .bind(&starts)
        .bind(&ends)
        .bind(&hours)
        .bind(&samples)
        .bind(&models)
        .bind(&server_ends)
        .fetch_all(&mut *tx)
        .await?;
        let mut inserted: HashMap<(String, i64), i64> = HashMap::with_capacity(rows.len());
        for row in rows {
            inserted.insert((row.try_get(1)?, row.try_get(2)?), row.try_get(0)?);
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
            tracing::debug!(
                skipped = candidates.len() - new_batches.len(),
                "telemetry batches already stored or of unknown devices"
            );
        }

        // Events.
        let mut e_batch_id = Vec::new();
        let mut e_idx = Vec::new();
        let mut e_dev = Vec::new();
        let mut e_at = Vec::new();
        let mut e_kind = Vec::new();
        let mut e_model = Vec::new();
        let mut e_version = Vec::new();
        let mut e_message = Vec::new();
        for &(id, b) in &new_batches {
            for (k, e) in b.events.iter().enumerate() {
                e_batch_id.push(id);
                e_idx.push(k as i64);
                e_dev.push(b.device_id.as_str());
                e_at.push(e.at);
                e_kind.push(e.kind.as_str());
                e_model.push(e.model.as_str());
                e_version.push(to_db(e.version));
                e_message.push(e.message.as_str());
            }
        }
        if !e_dev.is_empty() {
            sqlx::query(
                "INSERT INTO events (batch_id, idx, device_id, at, kind, model, version, message) \
                 SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::text[], $4::int8[], $5::text[], \
                 $6::text[], $7::int8[], $8::text[])",
            )
            .bind(&e_batch_id)
            .bind(&e_idx)
            .bind(&e_dev)
            .bind(&e_at)
            .bind(&e_kind)
            .bind(&e_model)
            .bind(&e_version)
            .bind(&e_message)
            .execute(&mut *tx)
            .await?;
        }

        // Devices. One call at a time from here to its commit: concurrent
        // calls would otherwise lock the same device rows in different orders
        // (deadlocks). Taken this late, a call's inserts above still overlap
        // the previous call's commit.
        let deltas = common::device_deltas(new_batches.iter().map(|&(_, b)| b));
        if !deltas.is_empty() {
            sqlx::query(
                "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.edgefleet.ingest'))",
            )
            .execute(&mut *tx)
            .await?;
            let mut d_id = Vec::new();
            let mut d_seq = Vec::new();
            let mut d_seen = Vec::new();
            let mut d_req = Vec::new();
            let mut d_err = Vec::new();
            let mut d_off = Vec::new();
            let mut d_drop = Vec::new();
            let mut d_hseq = Vec::new();
            let mut d_health = Vec::new();
            for (id, d) in deltas {
                d_id.push(id);
                d_seq.push(d.last_sequence);
                d_seen.push(d.last_seen);
                d_req.push(common::increment_to_db(d.requests));
                d_err.push(common::increment_to_db(d.errors));
                d_off.push(common::increment_to_db(d.offloaded));
                d_drop.push(d.dropped);
                match d.health {
                    Some((s, bytes)) => {
                        d_hseq.push(Some(s));
                        d_health.push(Some(bytes));
                    }
                    None => {
                        d_hseq.push(None);
                        d_health.push(None);
                    }
                }
            }
            sqlx::query(
                "UPDATE devices d SET last_sequence = GREATEST(d.last_sequence, u.last_sequence), \
                 last_seen = GREATEST(d.last_seen, u.last_seen), \
                 requests_total = d.requests_total + LEAST(u.requests, 9223372036854775807 - d.requests_total), \
                 errors_total = d.errors_total + LEAST(u.errors, 9223372036854775807 - d.errors_total), \
                 offloaded_total = d.offloaded_total + LEAST(u.offloaded, 9223372036854775807 - d.offloaded_total), \
                 dropped_batches_total = GREATEST(d.dropped_batches_total, u.dropped), \
                 health = CASE WHEN u.health_seq > d.health_sequence THEN u.health ELSE d.health END, \
                 health_sequence = CASE WHEN u.health_seq > d.health_sequence THEN u.health_seq ELSE d.health_sequence END \
                 FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], \
                   $7::int8[], $8::int8[], $9::bytea[]) \
                   AS u(id, last_sequence, last_seen, requests, errors, offloaded, dropped, health_seq, health) \
                 WHERE d.id = u.id",
            )
            .bind(&d_id)
            .bind(&d_seq)
            .bind(&d_seen)
            .bind(&d_req)
            .bind(&d_err)
            .bind(&d_off)
            .bind(&d_drop)
            .bind(&d_hseq)
            .bind(&d_health)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(stored)
    }

    async fn last_sequence(&self, device_id: &str) -> Result<u64, StoreError> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT last_sequence FROM devices WHERE id = $1")
                .bind(device_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(seq.map(from_db).unwrap_or(0))
    }

    async fn telemetry_sequences(&self, device_id: &str) -> Result<Vec<u64>, StoreError> {
        let seqs: Vec<i64> = sqlx::query_scalar(
            "SELECT sequence FROM telemetry_batches WHERE device_id = $1 ORDER BY sequence",
        )
        .bind(device_id)
        .fetch_all(&self.pool)
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
                     FROM telemetry_batches WHERE device_id = $1 AND end_at >= $2 AND end_at < $3 \
                     ORDER BY start_at, sequence",
                )
                .bind(device_id)
                .bind(from)
                .bind(until)
                .fetch_all(&self.pool)
                .await?;
                common::raw_points(rows)
            }
            Resolution::Hourly => {
                // One snapshot: rollups plus raw data not rolled up yet.
                let mut tx = self.snapshot().await?;
                let sql = format!(
                    "{POINT_FROM_ROLLUPS} WHERE device_id = $1 AND hour > $2 AND hour < $3"
                );
                let rollups = sqlx::query_as::<_, PointRow>(AssertSqlSafe(sql))
                    .bind(device_id)
                    .bind(from - HOUR_MS)
                    .bind(until)
                    .fetch_all(&mut *tx)
                    .await?;
                let raw = sqlx::query_as::<_, BatchSamplesRow>(
                    "SELECT device_id, hour AS at, hour + 3600000 AS until, sequence, models \
                     FROM telemetry_batches WHERE device_id = $1 AND NOT rolled_up AND hour > $2 AND hour < $3",
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
        let rows = sqlx::query_as::<_, BatchSamplesRow>(
            "SELECT device_id, at, until, sequence, models FROM ( \
               SELECT device_id, start_at AS at, end_at AS until, sequence, models, received_at, server_end_at, \
                 MAX(end_at) OVER (PARTITION BY device_id, received_at) AS newest \
               FROM telemetry_batches WHERE device_id = ANY($1) AND received_at >= $2 AND received_at < $3) AS b \
             WHERE COALESCE(server_end_at, received_at - (newest - until)) >= $4",
        )
        .bind(device_ids)
        .bind(received.start)
        .bind(received.end)
        .bind(made_since)
        .fetch_all(&self.pool)
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
             WHERE device_id = $1 AND end_at >= $2 AND end_at < $3 AND device IS NOT NULL \
             ORDER BY end_at, sequence",
        )
        .bind(device_id)
        .bind(from)
        .bind(until)
        .fetch_all(&self.pool)
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
        let lo = hour_ceil(from);
        let hi = hour_of(until).max(lo);
        // One snapshot: whole hours from rollups plus raw data not rolled up
        // yet; partial hours at the edges from raw data.
        let mut tx = self.snapshot().await?;
        let sql = format!("{POINT_FROM_ROLLUPS} WHERE hour >= $1 AND hour < $2");
        let rollups = sqlx::query_as::<_, PointRow>(AssertSqlSafe(sql))
            .bind(lo)
            .bind(hi)
            .fetch_all(&mut *tx)
            .await?;
        let raw = sqlx::query_as::<_, BatchSamplesRow>(
            "SELECT device_id, start_at AS at, end_at AS until, sequence, models FROM telemetry_batches \
             WHERE (NOT rolled_up AND hour >= $1 AND hour < $2) \
                OR ((hour < $1 OR hour >= $2) AND start_at >= $3 AND start_at < $4)",
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
             WHERE device_id = $1 AND at >= $2 AND at < $3 ORDER BY at, batch_id, idx",
        )
        .bind(device_id)
        .bind(from)
        .bind(until)
        .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        // One rollup at a time per schema (the read-merge-write below).
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.edgefleet.rollup'))",
        )
        .execute(&mut *tx)
        .await?;
        // Mark and read in one statement, so a batch inserted concurrently is
        // either both marked and merged, or neither.
        let mut merger: Merger<RollupKey> = Merger::default();
        {
            let mut rows = sqlx::query_as::<_, BatchSamplesRow>(
                "UPDATE telemetry_batches SET rolled_up = TRUE WHERE NOT rolled_up AND hour < $1 \
                 RETURNING device_id, hour AS at, hour + 3600000 AS until, sequence, models",
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
        let hours_rolled_up = merger.groups.len() as u64;
        if !merger.groups.is_empty() {
            let keys: Vec<RollupKey> = merger.groups.keys().cloned().collect();
            let k_dev: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
            let k_hour: Vec<i64> = keys.iter().map(|k| k.1).collect();
            let k_model: Vec<&str> = keys.iter().map(|k| k.2.as_str()).collect();
            let k_version: Vec<i64> = keys.iter().map(|k| k.3).collect();
            let existing = sqlx::query_as::<_, PointRow>(
                "SELECT r.device_id, r.hour AS at, r.hour + 3600000 AS until, r.model, r.version, r.requests, \
                 r.errors, r.local, r.offloaded, r.latency_us, r.batch_size, r.max_queue_depth \
                 FROM model_rollups_hourly r \
                 JOIN UNNEST($1::text[], $2::int8[], $3::text[], $4::int8[]) AS k(device_id, hour, model, version) \
                   ON r.device_id = k.device_id AND r.hour = k.hour AND r.model = k.model AND r.version = k.version",
            )
            .bind(&k_dev)
            .bind(&k_hour)
            .bind(&k_model)
            .bind(&k_version)
            .fetch_all(&mut *tx)
            .await?;
            let mut old = Vec::with_capacity(existing.len());
            for row in existing {
                let device = row.device_id.clone();
                let p = row.into_point()?;
                old.push(((device, p.at, p.name.clone(), to_db(p.version)), p));
            }
            for (key, p) in old {
                merger.add(key, p);
            }
            let n = merger.groups.len();
            let (mut req, mut err, mut loc, mut off, mut lat, mut bsz, mut dep) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for p in merger.groups.values() {
                req.push(to_db(p.requests));
                err.push(to_db(p.errors));
                loc.push(to_db(p.local));
                off.push(to_db(p.offloaded));
                lat.push(p.latency_us.encode_to_vec());
                bsz.push(p.batch_size.encode_to_vec());
                dep.push(i64::from(p.max_queue_depth));
            }
            sqlx::query(
                "INSERT INTO model_rollups_hourly (device_id, hour, model, version, requests, errors, \
                 local, offloaded, latency_us, batch_size, max_queue_depth) \
                 SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::int8[], $5::int8[], \
                 $6::int8[], $7::int8[], $8::int8[], $9::bytea[], $10::bytea[], $11::int8[]) \
                 ON CONFLICT (device_id, hour, model, version) DO UPDATE SET \
                 requests = EXCLUDED.requests, errors = EXCLUDED.errors, local = EXCLUDED.local, \
                 offloaded = EXCLUDED.offloaded, latency_us = EXCLUDED.latency_us, \
                 batch_size = EXCLUDED.batch_size, max_queue_depth = EXCLUDED.max_queue_depth",
            )
            .bind(&k_dev)
            .bind(&k_hour)
            .bind(&k_model)
            .bind(&k_version)
            .bind(&req)
            .bind(&err)
            .bind(&loc)
            .bind(&off)
            .bind(&lat)
            .bind(&bsz)
            .bind(&dep)
            .execute(&mut *tx)
            .await?;
        }
        // No foreign keys on the telemetry tables: events go with their batches here.
        let pruned: i64 = sqlx::query_scalar(
            "WITH gone AS (DELETE FROM telemetry_batches WHERE rolled_up AND end_at < $1 RETURNING id), \
             e AS (DELETE FROM events WHERE batch_id IN (SELECT id FROM gone)) \
             SELECT count(*) FROM gone",
        )
        .bind(now.saturating_sub(retention_ms))
        .fetch_one(&mut *tx)
        .await?;
        let pruned = from_db(pruned);
        // Hours that ended before the rollup retention (`hour + 1h <= cutoff`,
        // written so that no hour overflows).
        let rollups_pruned = sqlx::query("DELETE FROM model_rollups_hourly WHERE hour <= $1")
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
