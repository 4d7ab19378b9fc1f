-- Cheaper telemetry rows: the hot path of the control plane.
--
-- A batch's model samples move into its row: `models` holds them as one
-- protobuf message (StoredSamples in control-plane/src/store/common.rs), so a
-- group commit inserts one row per batch instead of one more per model. The
-- server converts rows left in model_samples at start and the table stays
-- empty; a later migration drops it.
ALTER TABLE telemetry_batches ADD COLUMN models BLOB;

-- Only pruning looks batches up by end, and it prunes rolled-up batches
-- only: index just those. A new batch is not rolled up, so the insert path
-- has one index less to write; the rollup adds the entries.
CREATE INDEX telemetry_batches_rolled_end ON telemetry_batches (end_at) WHERE rolled_up = 1;
DROP INDEX telemetry_batches_end;
