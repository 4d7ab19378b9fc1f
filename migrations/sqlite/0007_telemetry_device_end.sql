-- The rollout engine judges a wave's metric gates from the raw batches of
-- each of its devices that end in a window (`model_series` at the raw
-- resolution: WHERE device_id = ? AND end_at >= ? AND end_at < ?), every
-- few seconds while a rollout runs. UNIQUE (device_id, sequence) finds the
-- device's batches but not the window: every retained batch of the device
-- was read. This index finds just the window, at the cost of one more index
-- entry per inserted batch.
CREATE INDEX telemetry_batches_device_end ON telemetry_batches (device_id, end_at);
