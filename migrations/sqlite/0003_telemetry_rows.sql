-- Cheaper telemetry rows: the hot path of the control plane.
--
-- A batch's model samples move into its row: `models` holds them as one
-- protobuf message (StoredSamples in control-plane/src/store/common.rs), so a
-- group commit inserts one row per batch instead of one more per model. The
-- server converts rows left in model_samples at start and the table stays
-- empty; a later migration drops it.
ALTER TABLE telemetry_batches ADD COLUMN models BLOB;
