-- Cheaper telemetry rows: the hot path of the control plane.
--
-- A batch's model samples move into its row: `models` holds them as one
-- protobuf message (StoredSamples in control-plane/src/store/common.rs), so a
-- group commit inserts one row per batch instead of one more per model. The
-- server converts rows left in model_samples at start and the table stays
-- empty; a later migration drops it.
ALTER TABLE telemetry_batches ADD COLUMN models BYTEA;

-- Every group commit updates the device rows it carries (last sequence,
-- totals, health). With half of each page left free those updates stay on
-- their page (HOT updates: no new index entries, less WAL) instead of moving
-- the row. Applies to pages written from now on.
ALTER TABLE devices SET (fillfactor = 50);

-- Only pruning looks batches up by end, and it prunes rolled-up batches
-- only: index just those. A new batch is not rolled up, so the insert path
-- has one index less to write; the rollup adds the entries.
CREATE INDEX telemetry_batches_rolled_end ON telemetry_batches (end_at) WHERE rolled_up;
DROP INDEX telemetry_batches_end;
