-- The rollout gates judge the batches each device of a wave sent in a
-- window of the server's time (`received_model_series`: WHERE device_id = ?
-- AND received_at >= ? AND received_at < ?), every few seconds while a
-- rollout runs. Until now they took the batches that ended in the window by
-- the device's clock (migration 0007's index), and a device whose clock is
-- off by minutes or hours was judged on the wrong batches, or on none.
CREATE INDEX telemetry_batches_device_received ON telemetry_batches (device_id, received_at);
-- Nothing looks batches up by device and end often any more: only the
-- device's own timeline (`model_series`, `device_series`), read on demand,
-- which finds the device's batches by UNIQUE (device_id, sequence). Dropped,
-- so an inserted batch still costs one index entry more than before 0007,
-- not two.
DROP INDEX telemetry_batches_device_end;
