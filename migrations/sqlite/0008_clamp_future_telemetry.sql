-- Batches stored before the server clamped device times (at most a day
-- after receipt, see `MAX_CLOCK_AHEAD_MS` in control-plane/src/convert.rs):
-- one from a clock far ahead sat in an hour that never completed, never
-- rolled up nor pruned. Clamp them the same way so they are.
UPDATE telemetry_batches
SET start_at = min(start_at, received_at + 86400000),
    end_at = min(end_at, received_at + 86400000),
    hour = (min(start_at, received_at + 86400000) / 3600000) * 3600000
WHERE end_at > received_at + 86400000;
