//! [`RegistryStore`] on PostgreSQL. The read-check-write sequences (model
//! conflicts, rollout device conflicts, delete checks, desired-state writes)
//! first take a transaction-scoped advisory lock per model name (in name
//! order, so they cannot deadlock): under READ COMMITTED each statement after
//! the lock sees everything the previous holder committed, so two racing
//! rollouts of a model cannot both pass the device check, and a model version
//! cannot be deleted while a rollout or desired state naming it commits.
//! Generations are bumped in device id order. A blob digest has its own
//! advisory lock (see `BlobWork`), taken after a model's, never before.

use sqlx::{AssertSqlSafe, Postgres, Transaction};

use super::PgStore;
use crate::store::common::{
    self, ActivationRow, DEVICE_COLUMNS, DesiredRow, DeviceDownloadRow, MODEL_COLUMNS, ModelRow,
    ROLLOUT_COLUMNS, RolloutDeviceRow, RolloutEventRow, RolloutRow, to_db, to_json,
};
use crate::store::registry::*;
use crate::store::{Device, StoreError};

/// Rollout states that still own their devices.
const ACTIVE_STATES: &str = "('pending', 'running', 'paused')";

async fn insert_event(
    tx: &mut Transaction<'static, Postgres>,
    event: &RolloutEventRecord,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO rollout_events (rollout_id, at, actor, action, message) VALUES ($1, $2, $3, $4, $5)",
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

/// Inserts or updates rollout members, all in one statement (a rollout's
/// first step writes every device of it: one round trip each would hold
/// the transaction for seconds at 10,000 devices). Each (rollout, device)
/// at most once.
async fn upsert_devices(
    tx: &mut Transaction<'static, Postgres>,
    devices: &[RolloutDeviceRecord],
) -> Result<(), StoreError> {
    if devices.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&RolloutDeviceRecord) -> String| devices.iter().map(f).collect::<Vec<_>>();
    let waves: Vec<i64> = devices.iter().map(|d| i64::from(d.wave)).collect();
    let previous: Vec<i64> = devices.iter().map(|d| to_db(d.previous_version)).collect();
    let updated: Vec<i64> = devices.iter().map(|d| d.updated_at).collect();
    sqlx::query(
        "INSERT INTO rollout_devices (rollout_id, device_id, wave, state, previous_version, reason, updated_at) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[], $6::text[], $7::bigint[]) \
         ON CONFLICT (rollout_id, device_id) DO UPDATE SET wave = excluded.wave, state = excluded.state, \
         previous_version = excluded.previous_version, reason = excluded.reason, \
         updated_at = excluded.updated_at",
    )
    .bind(column(|d| d.rollout_id.clone()))
    .bind(column(|d| d.device_id.clone()))
    .bind(waves)
    .bind(column(|d| d.state.clone()))
    .bind(previous)
    .bind(column(|d| d.reason.clone()))
    .bind(updated)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Applies desired-state changes in a few statements
/// ([`common::last_desired`]).
async fn apply_desired(
    tx: &mut Transaction<'static, Postgres>,
    desired: &[DesiredChange],
) -> Result<(), StoreError> {
    let common::LastDesired { sets, clears } = common::last_desired(desired);
    if !sets.is_empty() {
        let text = |f: fn(&DesiredModel) -> &String| {
            sets.iter().map(|(_, m)| f(m).clone()).collect::<Vec<_>>()
        };
        let number =
            |f: fn(&DesiredModel) -> u64| sets.iter().map(|(_, m)| to_db(f(m))).collect::<Vec<_>>();
        let devices: Vec<&str> = sets.iter().map(|(d, _)| *d).collect();
        let signatures: Vec<Vec<u8>> = sets.iter().map(|(_, m)| m.signature.clone()).collect();
        let private: Vec<bool> = sets.iter().map(|(_, m)| m.private).collect();
        sqlx::query(
            "INSERT INTO device_desired (device_id, name, version, sha256, size_bytes, signature, private) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[], $6::bytea[], $7::bool[]) \
             ON CONFLICT (device_id, name) DO UPDATE SET version = excluded.version, \
             sha256 = excluded.sha256, size_bytes = excluded.size_bytes, \
             signature = excluded.signature, private = excluded.private",
        )
        .bind(devices)
        .bind(text(|m| &m.name))
        .bind(number(|m| m.version))
        .bind(text(|m| &m.sha256))
        .bind(number(|m| m.size_bytes))
        .bind(signatures)
        .bind(private)
        .execute(&mut **tx)
        .await?;
    }
    if !clears.is_empty() {
        let (devices, names): (Vec<&str>, Vec<&str>) = clears.into_iter().unzip();
        sqlx::query(
            "DELETE FROM device_desired WHERE (device_id, name) IN \
             (SELECT * FROM UNNEST($1::text[], $2::text[]))",
        )
        .bind(devices)
        .bind(names)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Takes the advisory locks of the given models (sorted, each once) until
/// the transaction ends.
async fn lock_models(
    tx: &mut Transaction<'static, Postgres>,
    names: &[&str],
) -> Result<(), StoreError> {
    let mut names = names.to_vec();
    names.sort_unstable();
    names.dedup();
    for name in names {
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.edgefleet.model.' || $1))",
        )
        .bind(name)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Takes the advisory lock of a blob digest until the transaction ends (see
/// `BlobWork`): a 64-bit key from the digest, within this schema (replicas
/// of one fleet share it; other fleets or tests on the server do not).
async fn lock_blob(
    tx: &mut Transaction<'static, Postgres>,
    sha256: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || '.edgefleet.blob.' || $1, 0))",
    )
    .bind(sha256)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The first of `devices` (and the rollout holding it) that another active
/// rollout of the same model has: a device is in one at a time. Run after
/// [`lock_models`] on the model, so it sees every committed membership.
async fn owned_elsewhere(
    tx: &mut Transaction<'static, Postgres>,
    rollout: &RolloutRecord,
    devices: &[RolloutDeviceRecord],
) -> Result<Option<(String, String)>, StoreError> {
    if devices.is_empty() {
        return Ok(None);
    }
    let ids: Vec<&str> = devices.iter().map(|d| d.device_id.as_str()).collect();
    Ok(sqlx::query_as(AssertSqlSafe(format!(
        "SELECT d.device_id, r.id FROM rollout_devices d JOIN rollouts r ON r.id = d.rollout_id \
         WHERE r.model = $1 AND r.id <> $2 AND r.state IN {ACTIVE_STATES} \
         AND d.device_id = ANY($3) \
         ORDER BY d.device_id, r.created_at, r.seq LIMIT 1"
    )))
    .bind(&rollout.model)
    .bind(&rollout.id)
    .bind(&ids)
    .fetch_optional(&mut **tx)
    .await?)
}

async fn insert_model_row(
    tx: &mut Transaction<'static, Postgres>,
    m: &ModelRecord,
) -> Result<(), StoreError> {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO models ({MODEL_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
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
impl RegistryStore for PgStore {
    async fn insert_model_with_blob(
        &self,
        m: &ModelRecord,
        place_blob: BlobWork<'_>,
    ) -> Result<Result<(), ModelConflict>, StoreError> {
        let mut tx = self.pool.begin().await?;
        lock_models(&mut tx, &[&m.name]).await?;
        let existing: Option<String> =
            sqlx::query_scalar("SELECT sha256 FROM models WHERE name = $1 AND version = $2")
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
        lock_blob(&mut tx, &m.sha256).await?;
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
                "SELECT {MODEL_COLUMNS} FROM models WHERE name = $1 AND version = $2"
            )))
            .bind(name)
            .bind(to_db(v)),
            None => sqlx::query_as::<_, ModelRow>(AssertSqlSafe(format!(
                "SELECT {MODEL_COLUMNS} FROM models WHERE name = $1 ORDER BY version DESC LIMIT 1"
            )))
            .bind(name),
        };
        q.fetch_optional(&self.pool)
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
            "SELECT {MODEL_COLUMNS} FROM models WHERE ($1::text IS NULL OR name = $1) \
             AND ($2::text IS NULL OR (name, version) > ($2, $3::bigint)) \
             ORDER BY name, version LIMIT $4"
        )))
        .bind(name)
        .bind(after.map(|(name, _)| name))
        .bind(after.map(|(_, version)| to_db(version)))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(ModelRecord::try_from).collect()
    }

    async fn delete_model(
        &self,
        name: &str,
        version: u64,
    ) -> Result<Result<bool, String>, StoreError> {
        let mut tx = self.pool.begin().await?;
        lock_models(&mut tx, &[name]).await?;
        let rollout: Option<(String, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT id, state FROM rollouts WHERE model = $1 AND version = $2 \
             AND state IN {ACTIVE_STATES} ORDER BY created_at, seq LIMIT 1"
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
             WHERE r.model = $1 AND d.previous_version = $2 AND r.state IN {ACTIVE_STATES} \
             ORDER BY r.created_at, r.seq, d.device_id LIMIT 1"
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
            "SELECT device_id FROM device_desired WHERE name = $1 AND version = $2 \
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
        let deleted = sqlx::query("DELETE FROM models WHERE name = $1 AND version = $2")
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
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM models WHERE sha256 = $1)")
                .bind(sha256)
                .fetch_one(&self.pool)
                .await?;
        Ok(found)
    }

    async fn drop_blob_if_unreferenced(
        &self,
        sha256: &str,
        remove: BlobWork<'_>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        lock_blob(&mut tx, sha256).await?;
        let used: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM models WHERE sha256 = $1)")
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
        let mut tx = self.pool.begin().await?;
        lock_models(&mut tx, &[&rollout.model]).await?;
        // The model may have been deleted since the caller read it.
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM models WHERE name = $1 AND version = $2)",
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
            "INSERT INTO rollouts ({ROLLOUT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
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
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
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
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE ($1::text IS NULL OR model = $1) \
             AND ($2::text IS NULL OR (created_at, seq) < \
                  (SELECT created_at, seq FROM rollouts WHERE id = $2)) \
             ORDER BY created_at DESC, seq DESC LIMIT $3"
        )))
        .bind(model)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rollouts_from(rows)
    }

    async fn rollout_device_states(
        &self,
        rollout_ids: &[String],
    ) -> Result<Vec<(String, String, u64)>, StoreError> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT rollout_id, state, count(*) FROM rollout_devices \
             WHERE rollout_id = ANY($1) GROUP BY rollout_id, state",
        )
        .bind(rollout_ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, state, devices)| (id, state, common::from_db(devices)))
            .collect())
    }

    async fn active_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        let rows = sqlx::query_as::<_, RolloutRow>(AssertSqlSafe(format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE state IN {ACTIVE_STATES} \
             ORDER BY created_at, seq"
        )))
        .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        let mut models = vec![rollout.model.as_str()];
        models.extend(desired.iter().filter_map(|c| match c {
            DesiredChange::Set { model, .. } => Some(model.name.as_str()),
            DesiredChange::Clear { .. } => None,
        }));
        lock_models(&mut tx, &models).await?;
        let updated = sqlx::query(
            "UPDATE rollouts SET selector = $1, spec = $2, state = $3, current_wave = $4, \
             wave_done_at = $5, reason = $6, updated_at = $7, revision = revision + 1 \
             WHERE id = $8 AND revision = $9",
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
                sqlx::query_scalar("SELECT revision FROM rollouts WHERE id = $1")
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
        // Each changed device's desired-state generation moves on, and its
        // member row notes from which generation its reports answer this
        // change.
        let changed: Vec<&str> = common::changed_devices(desired);
        if !changed.is_empty() {
            let generations: Vec<(String, i64)> = sqlx::query_as(
                "INSERT INTO device_generations (device_id, generation) SELECT unnest($1::text[]), 1 \
                 ON CONFLICT (device_id) DO UPDATE SET generation = device_generations.generation + 1 \
                 RETURNING device_id, generation",
            )
            .bind(&changed)
            .fetch_all(&mut *tx)
            .await?;
            let (ids, numbers): (Vec<String>, Vec<i64>) = generations.into_iter().unzip();
            sqlx::query(
                "UPDATE rollout_devices SET generation = g.generation \
                 FROM UNNEST($1::text[], $2::bigint[]) AS g(device_id, generation) \
                 WHERE rollout_devices.rollout_id = $3 AND rollout_devices.device_id = g.device_id",
            )
            .bind(ids)
            .bind(numbers)
            .bind(&rollout.id)
            .execute(&mut *tx)
            .await?;
        }
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
             generation FROM rollout_devices WHERE rollout_id = $1 ORDER BY device_id",
        )
        .bind(id)
        .fetch_all(&self.pool)
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
             generation FROM rollout_devices WHERE rollout_id = $1 \
             AND ($2::text IS NULL OR state = $2::text) AND device_id > $3 \
             ORDER BY device_id LIMIT $4",
        )
        .bind(id)
        .bind(state)
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(RolloutDeviceRecord::try_from)
            .collect()
    }

    async fn rollout_events(&self, id: &str) -> Result<Vec<RolloutEventRecord>, StoreError> {
        let rows = sqlx::query_as::<_, RolloutEventRow>(
            "SELECT rollout_id, at, actor, action, message FROM rollout_events \
             WHERE rollout_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(RolloutEventRecord::from).collect())
    }

    async fn desired_generations(
        &self,
        device_ids: &[String],
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT device_id, generation FROM device_generations WHERE device_id = ANY($1)",
        )
        .bind(device_ids)
        .fetch_all(&self.pool)
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
        let moved = sqlx::query(
            "INSERT INTO device_generations (device_id, generation) VALUES ($1, $2 + 1) \
             ON CONFLICT (device_id) DO UPDATE SET generation = excluded.generation \
             WHERE device_generations.generation < $2",
        )
        .bind(device_id)
        .bind(to_db(held))
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0;
        Ok(moved)
    }

    async fn desired_state(&self, device_id: &str) -> Result<(u64, Vec<DesiredModel>), StoreError> {
        // One read transaction: the generation and the models of one snapshot.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await?;
        let generation: Option<i64> =
            sqlx::query_scalar("SELECT generation FROM device_generations WHERE device_id = $1")
                .bind(device_id)
                .fetch_optional(&mut *tx)
                .await?;
        let rows = sqlx::query_as::<_, DesiredRow>(
            "SELECT name, version, sha256, size_bytes, signature, private FROM device_desired \
             WHERE device_id = $1 ORDER BY name",
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
             WHERE d.device_id = devices.id AND lower(d.sha256) = lower($1)) AS blob_desired \
             FROM devices WHERE id = $2"
        );
        sqlx::query_as::<_, DeviceDownloadRow>(AssertSqlSafe(sql))
            .bind(sha256)
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| Ok((Device::try_from(row.device)?, row.blob_desired)))
            .transpose()
    }

    async fn record_activations(&self, records: &[ActivationRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        // One statement per round, not per report: a round trip each.
        for round in common::activation_rounds(records) {
            // A late retry of an older step does not replace a newer one.
            // Static text: the shared clause is a constant.
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO activations (device_id, name, version, stage, reason, at, generation, reported_ms) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], \
                 $6::int8[], $7::int8[], $8::int8[]) \
                 ON CONFLICT (device_id, name, version) DO UPDATE SET stage = excluded.stage, \
                 reason = excluded.reason, at = excluded.at, generation = excluded.generation, \
                 reported_ms = excluded.reported_ms WHERE {}",
                common::ACTIVATION_REPLACES
            )))
            .bind(round.iter().map(|r| r.device_id.as_str()).collect::<Vec<_>>())
            .bind(round.iter().map(|r| r.name.as_str()).collect::<Vec<_>>())
            .bind(round.iter().map(|r| to_db(r.version)).collect::<Vec<_>>())
            .bind(round.iter().map(|r| r.stage.as_str()).collect::<Vec<_>>())
            .bind(round.iter().map(|r| r.reason.as_str()).collect::<Vec<_>>())
            .bind(round.iter().map(|r| r.at).collect::<Vec<_>>())
            .bind(round.iter().map(|r| to_db(r.generation)).collect::<Vec<_>>())
            .bind(round.iter().map(|r| r.reported_ms).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
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
             WHERE name = $1 AND version = $2 ORDER BY device_id",
        )
        .bind(name)
        .bind(to_db(version))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(ActivationRecord::from).collect())
    }
}
