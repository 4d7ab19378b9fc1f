-- Activation reports are matched and ordered by what the device says, not
-- by the clock of the replica that received them (replicas' clocks differ):
-- the desired-state generation a report works towards, then the device's
-- own time. A rollout remembers the generation its last change to a
-- device's desired state made; reports for an older one do not count.
ALTER TABLE activations ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;
ALTER TABLE activations ADD COLUMN reported_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE rollout_devices ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;
