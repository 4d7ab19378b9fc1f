//! [`RegistryStore`] on SQLite. Writes go through the one-connection writer
//! pool with `BEGIN IMMEDIATE` (see the parent module), so the read-check-write
//! sequences below (model conflicts, rollout device conflicts, delete checks)
//! cannot interleave with another write; nor can the file work on a blob
//! done inside such a transaction (`BlobWork`), which needs no other lock.

use sqlx::{AssertSqlSafe, Sqlite, Transaction};

use super::SqliteStore;
use crate::store::common::{
    self, ActivationRow, DEVICE_COLUMNS, DesiredRow, DeviceDownloadRow, MODEL_COLUMNS, ModelRow,
    ROLLOUT_COLUMNS, RolloutDeviceRow, RolloutEventRow, RolloutRow, to_db, to_json,
};
use crate::store::registry::*;
use crate::store::{Device, StoreError};

/// Rollout states that still own their devices.
const ACTIVE_STATES: &str = "('pending', 'running', 'paused')";

async fn insert_event(
    tx: &mut Transaction<'static, Sqlite>,
    event: &RolloutEventRecord,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO rollout_events (rollout_id, at, actor, action, message) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(&event.rollout_id)
    .bind(event.at)
    .bind(&event.actor)
    .bind(&event.action)
    .bind(&event.message)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Inserts or updates members by (rollout, device), a statement per chunk.
async fn upsert_devices(
    tx: &mut Transaction<'static, Sqlite>,
    devices: &[RolloutDeviceRecord],
) -> Result<(), StoreError> {
    let sql = |size| {
        format!(
            "INSERT INTO rollout_devices (rollout_id, device_id, wave, state, previous_version, reason, updated_at) \
             VALUES {} \
             ON CONFLICT (rollout_id, device_id) DO UPDATE SET wave = excluded.wave, state = excluded.state, \
             previous_version = excluded.previous_version, reason = excluded.reason, \
             updated_at = excluded.updated_at",
            super::placeholders(size, 7)
        )
    };
    super::execute_chunked(tx, devices, sql, |query, d| {
        query
            .bind(&d.rollout_id)
            .bind(&d.device_id)
            .bind(i64::from(d.wave))
            .bind(&d.state)
            .bind(to_db(d.previous_version))
            .bind(&d.reason)
            .bind(d.updated_at)
    })
    .await
}

/// Applies desired-state changes ([`common::last_desired`]), a statement
/// per chunk.
async fn apply_desired(
    tx: &mut Transaction<'static, Sqlite>,
    desired: &[DesiredChange],
) -> Result<(), StoreError> {
    let common::LastDesired { sets, clears } = common::last_desired(desired);
    let sql = |size| {
        format!(
            "INSERT INTO device_desired (device_id, name, version, sha256, size_bytes, signature, private) \
             VALUES {} \
             ON CONFLICT (device_id, name) DO UPDATE SET version = excluded.version, \
             sha256 = excluded.sha256, size_bytes = excluded.size_bytes, \
             signature = excluded.signature, private = excluded.private",
            super::placeholders(size, 7)
        )
    };
    super::execute_chunked(tx, &sets, sql, |query, (device_id, model)| {
        query
            .bind(*device_id)
            .bind(&model.name)
            .bind(to_db(model.version))
            .bind(&model.sha256)
            .bind(to_db(model.size_bytes))
            .bind(&model.signature)
            .bind(model.private)
    })
    .await?;
    let sql = |size| {
        format!(
            "DELETE FROM device_desired WHERE (device_id, name) IN (VALUES {})",
            super::placeholders(size, 2)
        )
    };
    super::execute_chunked(tx, &clears, sql, |query, (device_id, name)| {
        query.bind(*device_id).bind(*name)
    })
    .await
}

/// Moves each changed device's desired-state generation on, and notes in
/// its member row of `rollout_id` the generation from which its activation
/// reports answer this change: two statements per chunk of devices.
async fn bump_generations(
    tx: &mut Transaction<'static, Sqlite>,
    rollout_id: &str,
    devices: &[&str],
) -> Result<(), StoreError> {
    let sql = |size| {
        format!(
            "INSERT INTO device_generations (device_id, generation) \
             SELECT column1, 1 FROM (VALUES {}) WHERE true \
             ON CONFLICT (device_id) DO UPDATE SET generation = generation + 1",
            super::placeholders(size, 1)
        )
    };
    super::execute_chunked(tx, devices, sql, |query, id| query.bind(*id)).await?;
    let sql = |size| {
        format!(
            "UPDATE rollout_devices SET generation = g.generation \
             FROM (VALUES {}) AS v JOIN device_generations g ON g.device_id = v.column2 \
             WHERE rollout_devices.rollout_id = v.column1 AND rollout_devices.device_id = v.column2",
            super::placeholders(size, 2)
        )
    };
    super::execute_chunked(tx, devices, sql, |query, id| {
        query.bind(rollout_id).bind(*id)
    })
    .await
}

/// The first of `devices` (and the rollout holding it) that another active
/// rollout of the same model has: a device is in one at a time. Run in the
/// write transaction, which the writer connection serializes with every
/// other write.
async fn owned_elsewhere(
    tx: &mut Transaction<'static, Sqlite>,
    rollout: &RolloutRecord,
    devices: &[RolloutDeviceRecord],
) -> Result<Option<(String, String)>, StoreError> {
    if devices.is_empty() {
        return Ok(None);
    }
    let ids: Vec<&str> = devices.iter().map(|d| d.device_id.as_str()).collect();
    Ok(sqlx::query_as(AssertSqlSafe(format!(
        "SELECT d.device_id, r.id FROM rollout_devices d JOIN rollouts r ON r.id = d.rollout_id \
         WHERE r.model = ? AND r.id <> ? AND r.state IN {ACTIVE_STATES} \
         AND d.device_id IN (SELECT value FROM json_each(?)) \
         ORDER BY d.device_id, r.created_at, r.rowid LIMIT 1"
    )))
    .bind(&rollout.model)
    .bind(&rollout.id)
    .bind(to_json(&ids))
    .fetch_optional(&mut **tx)
    .await?)
}

async fn insert_model_row(
    tx: &mut Transaction<'static, Sqlite>,
    m: &ModelRecord,
) -> Result<(), StoreError> {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO models ({MODEL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )))
    .bind(&m.name)
    .bind(to_db(m.version))
    .bind(&m.sha256)
    .bind(to_db(m.size_bytes))
    .bind(m.opset)
    .bind(to_json(&m.inputs))
    .bind(to_json(&m.outputs))
    .bind(to_json(&m.labels))
    .bind(m.private)
    .bind(&m.signature)
    .bind(&m.signed_by)
    .bind(&m.signature_public_key)
    .bind(m.created_at)
    .bind(&m.created_by)
    .bind(to_db(m.estimated_memory_bytes))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn rollouts_from(rows: Vec<RolloutRow>) -> Result<Vec<RolloutRecord>, StoreError> {
    rows.into_iter().map(RolloutRecord::try_from).collect()
}

#[async_trait::async_trait]
impl RegistryStore for SqliteStore {
    async fn insert_model_with_blob(
        &self,
        m: &ModelRecord,
        place_blob: BlobWork<'_>,
    ) -> Result<Result<(), ModelConflict>, StoreError> {
        let mut tx = self.write().await?;
        let existing: Option<String> =
            sqlx::query_scalar("SELECT sha256 FROM models WHERE name = ? AND version = ?")
                .bind(&m.name)
                .bind(to_db(m.version))
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(existing_sha256) = existing {
            if existing_sha256 != m.sha256 {
                tx.rollback().await?;
                return Ok(Err(ModelConflict::Exists {
                    name: m.name.clone(),
                    version: m.version,
                    existing_sha256,
                }));
            }
            // The same version again: nothing to insert, but its blob is put
            // back should it be missing.
        } else {
            insert_model_row(&mut tx, m).await?;
        }
        // The write transaction is the digest's lock (see `BlobWork`).
        place_blob().map_err(StoreError::Blob)?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    async fn model(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<Option<ModelRecord>, StoreError> {
        let q = match version {
            Some(v) => sqlx::query_as::<_, ModelRow>(AssertSqlSafe(format!(
                "SELECT {MODEL_COLUMNS} FROM models WHERE name = ? AND version = ?"
            )))
            .bind(name)
            .bind(to_db(v)),
            None => sqlx::query_as::<_, ModelRow>(AssertSqlSafe(format!(
                "SELECT {MODEL_COLUMNS} FROM models WHERE name = ? ORDER BY version DESC LIMIT 1"
            )))
            .bind(name),
        };
        q.fetch_optional(&self.reader)
            .await?
            .map(ModelRecord::try_from)
            .transpose()
    }

    async fn models(
        &self,
        name: Option<&str>,
        after: Option<(&str, u64)>,
        limit: u32,
    ) -> Result<Vec<ModelRecord>, StoreError> {
        let rows = sqlx::query_as::<_, ModelRow>(AssertSqlSafe(format!(
            "SELECT {MODEL_COLUMNS} FROM models WHERE (?1 IS NULL OR name = ?1) \
             AND (?2 IS NULL OR (name, version) > (?2, ?3)) ORDER BY name, version LIMIT ?4"
        )))
        .bind(name)
        .bind(after.map(|(name, _)| name))
        .bind(after.map(|(_, version)| to_db(version)))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter().map(ModelRecord::try_from).collect()
    }

    async fn delete_model(
        &self,
        name: &str,
        version: u64,
    ) -> Result<Result<bool, String>, StoreError> {
        let mut tx = self.write().await?;
        let rollout: Option<(String, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT id, state FROM rollouts WHERE model = ? AND version = ? \
             AND state IN {ACTIVE_STATES} ORDER BY created_at, rowid LIMIT 1"
        )))
        .bind(name)
        .bind(to_db(version))
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((id, state)) = rollout {
            tx.rollback().await?;
            return Ok(Err(format!(
                "{name}@{version} is the target of rollout {id} ({state})"
            )));
        }
        // Rolling back (by an operator or a failed gate) sends each device
        // back to the version it had: that version must stay.
        let rollback: Option<(String, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT r.id, d.device_id FROM rollout_devices d JOIN rollouts r ON r.id = d.rollout_id \
             WHERE r.model = ? AND d.previous_version = ? AND r.state IN {ACTIVE_STATES} \
             ORDER BY r.created_at, r.rowid, d.device_id LIMIT 1"
        )))
        .bind(name)
        .bind(to_db(version))
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((id, device)) = rollback {
            tx.rollback().await?;
            return Ok(Err(format!(
                "{name}@{version} is what device {device} goes back to if rollout {id} rolls back"
            )));
        }
        let device: Option<String> = sqlx::query_scalar(
            "SELECT device_id FROM device_desired WHERE name = ? AND version = ? \
             ORDER BY device_id LIMIT 1",
        )
        .bind(name)
        .bind(to_db(version))
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(device) = device {
            tx.rollback().await?;
            return Ok(Err(format!(
                "the desired state of device {device} names {name}@{version}"
            )));
        }
        let deleted = sqlx::query("DELETE FROM models WHERE name = ? AND version = ?")
            .bind(name)
            .bind(to_db(version))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(Ok(deleted > 0))
    }

    async fn blob_referenced(&self, sha256: &str) -> Result<bool, StoreError> {
        let found: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM models WHERE sha256 = ?)")
                .bind(sha256)
                .fetch_one(&self.reader)
                .await?;
        Ok(found)
    }

    async fn drop_blob_if_unreferenced(
        &self,
        sha256: &str,
        remove: BlobWork<'_>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        // The write transaction is the digest's lock (see `BlobWork`).
        let used: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM models WHERE sha256 = ?)")
                .bind(sha256)
                .fetch_one(&mut *tx)
                .await?;
        if !used {
            remove().map_err(StoreError::Blob)?;
        }
        tx.commit().await?;
        Ok(!used)
    }

    async fn create_rollout(
        &self,
        rollout: &RolloutRecord,
        devices: &[RolloutDeviceRecord],
        event: &RolloutEventRecord,
    ) -> Result<Result<(), String>, StoreError> {
        let mut tx = self.write().await?;
        // The writer connection serializes this check with every other write.
        // The model may have been deleted since the caller read it.
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM models WHERE name = ? AND version = ?)",
        )
        .bind(&rollout.model)
        .bind(to_db(rollout.version))
        .fetch_one(&mut *tx)
        .await?;
        if !exists {
            tx.rollback().await?;
            return Ok(Err(format!(
                "there is no model {}@{} (deleted meanwhile?)",
                rollout.model, rollout.version
            )));
        }
        if let Some((device, other)) = owned_elsewhere(&mut tx, rollout, devices).await? {
            tx.rollback().await?;
            return Ok(Err(common::rollout_conflict(
                &device,
                &other,
                &rollout.model,
            )));
        }
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO rollouts ({ROLLOUT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )))
        .bind(&rollout.id)
        .bind(&rollout.model)
        .bind(to_db(rollout.version))
        .bind(to_json(&rollout.selector))
        .bind(to_json(&rollout.spec))
        .bind(rollout.state.as_str())
        .bind(i64::from(rollout.current_wave))
        .bind(rollout.wave_done_at)
        .bind(&rollout.reason)
        .bind(&rollout.created_by)
        .bind(rollout.created_at)
        .bind(rollout.updated_at)
        .bind(rollout.revision)
        .execute(&mut *tx)
        .await?;
        upsert_devices(&mut tx, devices).await?;
        insert_event(&mut tx, event).await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    async fn rollout(&self, id: &str) -> Result<Option<RolloutRecord>, StoreError> {
        sqlx::query_as::<_, RolloutRow>(AssertSqlSafe(format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?"
        )))
        .bind(id)
        .fetch_optional(&self.reader)
        .await?
        .map(RolloutRecord::try_from)
        .transpose()
    }

    async fn rollouts(
        &self,
        model: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RolloutRecord>, StoreError> {
        let rows = sqlx::query_as::<_, RolloutRow>(AssertSqlSafe(format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE (?1 IS NULL OR model = ?1) \
             AND (?2 IS NULL OR (created_at, rowid) < \
                  (SELECT created_at, rowid FROM rollouts WHERE id = ?2)) \
             ORDER BY created_at DESC, rowid DESC LIMIT ?3"
        )))
        .bind(model)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rollouts_from(rows)
    }

    async fn rollout_device_states(
        &self,
        rollout_ids: &[String],
    ) -> Result<Vec<(String, String, u64)>, StoreError> {
        let ids = serde_json::to_string(rollout_ids)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode rollout ids: {e}")))?;
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT rollout_id, state, count(*) FROM rollout_devices \
             WHERE rollout_id IN (SELECT value FROM json_each(?1)) \
             GROUP BY rollout_id, state",
        )
        .bind(ids)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, state, devices)| (id, state, common::from_db(devices)))
            .collect())
    }

    async fn active_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        let rows = sqlx::query_as::<_, RolloutRow>(AssertSqlSafe(format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE state IN {ACTIVE_STATES} \
             ORDER BY created_at, rowid"
        )))
        .fetch_all(&self.reader)
        .await?;
        rollouts_from(rows)
    }

    async fn save_rollout_step(
        &self,
        rollout: &mut RolloutRecord,
        devices: &[RolloutDeviceRecord],
        desired: &[DesiredChange],
        events: &[RolloutEventRecord],
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        let updated = sqlx::query(
            "UPDATE rollouts SET selector = ?, spec = ?, state = ?, current_wave = ?, \
             wave_done_at = ?, reason = ?, updated_at = ?, revision = revision + 1 \
             WHERE id = ? AND revision = ?",
        )
        .bind(to_json(&rollout.selector))
        .bind(to_json(&rollout.spec))
        .bind(rollout.state.as_str())
        .bind(i64::from(rollout.current_wave))
        .bind(rollout.wave_done_at)
        .bind(&rollout.reason)
        .bind(rollout.updated_at)
        .bind(&rollout.id)
        .bind(rollout.revision)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated == 0 {
            let stored: Option<i64> =
                sqlx::query_scalar("SELECT revision FROM rollouts WHERE id = ?")
                    .bind(&rollout.id)
                    .fetch_optional(&mut *tx)
                    .await?;
            tx.rollback().await?;
            return Err(common::unsaved_rollout_step(
                &rollout.id,
                rollout.revision,
                stored,
            ));
        }
        // A device the step adds may have joined another active rollout of
        // the model since the step read the memberships (that rollout's
        // engine on another replica, or an operator creating one).
        if rollout.state.is_active()
            && let Some((device, other)) = owned_elsewhere(&mut tx, rollout, devices).await?
        {
            tx.rollback().await?;
            return Err(StoreError::Conflict(common::rollout_conflict(
                &device,
                &other,
                &rollout.model,
            )));
        }
        upsert_devices(&mut tx, devices).await?;
        apply_desired(&mut tx, desired).await?;
        bump_generations(&mut tx, &rollout.id, &common::changed_devices(desired)).await?;
        for event in events {
            insert_event(&mut tx, event).await?;
        }
        tx.commit().await?;
        rollout.revision += 1;
        Ok(())
    }

    async fn rollout_devices(&self, id: &str) -> Result<Vec<RolloutDeviceRecord>, StoreError> {
        let rows = sqlx::query_as::<_, RolloutDeviceRow>(
            "SELECT rollout_id, device_id, wave, state, previous_version, reason, updated_at, \
             generation FROM rollout_devices WHERE rollout_id = ? ORDER BY device_id",
        )
        .bind(id)
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter()
            .map(RolloutDeviceRecord::try_from)
            .collect()
    }

    async fn rollout_devices_page(
        &self,
        id: &str,
        state: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RolloutDeviceRecord>, StoreError> {
        // The primary key (rollout_id, device_id) orders and bounds the page.
        let rows = sqlx::query_as::<_, RolloutDeviceRow>(
            "SELECT rollout_id, device_id, wave, state, previous_version, reason, updated_at, \
             generation FROM rollout_devices WHERE rollout_id = ?1 \
             AND (?2 IS NULL OR state = ?2) AND device_id > ?3 \
             ORDER BY device_id LIMIT ?4",
        )
        .bind(id)
        .bind(state)
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter()
            .map(RolloutDeviceRecord::try_from)
            .collect()
    }

    async fn rollout_events(&self, id: &str) -> Result<Vec<RolloutEventRecord>, StoreError> {
        let rows = sqlx::query_as::<_, RolloutEventRow>(
            "SELECT rollout_id, at, actor, action, message FROM rollout_events \
             WHERE rollout_id = ? ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.into_iter().map(RolloutEventRecord::from).collect())
    }

    async fn desired_generations(
        &self,
        device_ids: &[String],
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let ids = serde_json::to_string(device_ids)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode device ids: {e}")))?;
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT device_id, generation FROM device_generations WHERE device_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(ids)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, generation)| (id, common::from_db(generation)))
            .collect())
    }

    async fn move_generation_past(&self, device_id: &str, held: u64) -> Result<bool, StoreError> {
        if held == 0 {
            return Ok(false);
        }
        // Every Hello asks, and a device is almost never ahead: a read, not
        // a turn at the one writer, decides that.
        let stored: Option<i64> =
            sqlx::query_scalar("SELECT generation FROM device_generations WHERE device_id = ?")
                .bind(device_id)
                .fetch_optional(&self.reader)
                .await?;
        if stored.is_some_and(|stored| common::from_db(stored) >= held) {
            return Ok(false);
        }
        let mut tx = self.write().await?;
        let moved = sqlx::query(
            "INSERT INTO device_generations (device_id, generation) VALUES (?1, ?2 + 1) \
             ON CONFLICT (device_id) DO UPDATE SET generation = excluded.generation \
             WHERE device_generations.generation < ?2",
        )
        .bind(device_id)
        .bind(to_db(held))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        tx.commit().await?;
        Ok(moved)
    }

    async fn desired_state(&self, device_id: &str) -> Result<(u64, Vec<DesiredModel>), StoreError> {
        // One read transaction: the generation and the models of one snapshot.
        let mut tx = self.reader.begin().await?;
        let generation: Option<i64> =
            sqlx::query_scalar("SELECT generation FROM device_generations WHERE device_id = ?")
                .bind(device_id)
                .fetch_optional(&mut *tx)
                .await?;
        let rows = sqlx::query_as::<_, DesiredRow>(
            "SELECT name, version, sha256, size_bytes, signature, private FROM device_desired \
             WHERE device_id = ? ORDER BY name",
        )
        .bind(device_id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((
            common::from_db(generation.unwrap_or(0)),
            rows.into_iter().map(DesiredModel::from).collect(),
        ))
    }

    async fn device_for_download(
        &self,
        device_id: &str,
        sha256: &str,
    ) -> Result<Option<(Device, bool)>, StoreError> {
        // One statement, one snapshot: a download's two checks without a
        // transaction's round trips.
        let sql = format!(
            "SELECT {DEVICE_COLUMNS}, EXISTS (SELECT 1 FROM device_desired d \
             WHERE d.device_id = devices.id AND lower(d.sha256) = lower(?)) AS blob_desired \
             FROM devices WHERE id = ?"
        );
        sqlx::query_as::<_, DeviceDownloadRow>(AssertSqlSafe(sql))
            .bind(sha256)
            .bind(device_id)
            .fetch_optional(&self.reader)
            .await?
            .map(|row| Ok((Device::try_from(row.device)?, row.blob_desired)))
            .transpose()
    }

    async fn record_activations(&self, records: &[ActivationRecord]) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        // A late retry of an older step does not replace a newer one.
        // Static text: the shared clause is a constant.
        let sql = |size| {
            format!(
                "INSERT INTO activations (device_id, name, version, stage, reason, at, generation, reported_ms) \
                 VALUES {} \
                 ON CONFLICT (device_id, name, version) DO UPDATE SET stage = excluded.stage, \
                 reason = excluded.reason, at = excluded.at, generation = excluded.generation, \
                 reported_ms = excluded.reported_ms WHERE {}",
                super::placeholders(size, 8),
                common::ACTIVATION_REPLACES
            )
        };
        super::execute_chunked(&mut tx, records, sql, |query, r| {
            query
                .bind(&r.device_id)
                .bind(&r.name)
                .bind(to_db(r.version))
                .bind(&r.stage)
                .bind(&r.reason)
                .bind(r.at)
                .bind(to_db(r.generation))
                .bind(r.reported_ms)
        })
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn activations(
        &self,
        name: &str,
        version: u64,
    ) -> Result<Vec<ActivationRecord>, StoreError> {
        let rows = sqlx::query_as::<_, ActivationRow>(
            "SELECT device_id, name, version, stage, reason, at, generation, reported_ms \
             FROM activations \
             WHERE name = ? AND version = ? ORDER BY device_id",
        )
        .bind(name)
        .bind(to_db(version))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.into_iter().map(ActivationRecord::from).collect())
    }
}
