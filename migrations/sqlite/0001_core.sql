-- Core schema of the control plane (SQLite). Times are Unix milliseconds;
-- u64 figures are stored bit-for-bit in INTEGER (i64) columns; labels,
-- inventories and model lists are JSON text; histograms and device samples
-- are protobuf bytes.

CREATE TABLE operator_tokens (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);

CREATE TABLE join_tokens (
    id          TEXT PRIMARY KEY NOT NULL,
    secret_hash TEXT NOT NULL,
    labels      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    uses_left   INTEGER NOT NULL CHECK (uses_left >= 0),
    created_by  TEXT NOT NULL
);

CREATE TABLE devices (
    id                     TEXT PRIMARY KEY NOT NULL,
    labels                 TEXT NOT NULL,
    inventory              TEXT NOT NULL,
    status                 TEXT NOT NULL CHECK (status IN ('enrolled', 'revoked')),
    enrolled_at            INTEGER NOT NULL,
    revoked_at             INTEGER,
    join_token_id          TEXT,
    certificate_serial     TEXT NOT NULL,
    certificate_expires_at INTEGER NOT NULL,
    last_seen              INTEGER NOT NULL DEFAULT 0,
    models                 TEXT NOT NULL DEFAULT '[]',
    runtime                TEXT NOT NULL DEFAULT '',
    -- DeviceTelemetry of the batch with sequence health_sequence.
    health                 BLOB,
    health_sequence        INTEGER NOT NULL DEFAULT 0,
    last_sequence          INTEGER NOT NULL DEFAULT 0,
    requests_total         INTEGER NOT NULL DEFAULT 0,
    errors_total           INTEGER NOT NULL DEFAULT 0,
    offloaded_total        INTEGER NOT NULL DEFAULT 0,
    dropped_batches_total  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX devices_revoked_at ON devices (revoked_at) WHERE revoked_at IS NOT NULL;

-- One row per stored telemetry batch. `id` grows with insertion, so the big
-- tables below (keyed by batch id) are appended to, not written all over.
-- `hour` is the start of the hour holding start_at; rolled_up says its model
-- samples are merged into model_rollups_hourly.
CREATE TABLE telemetry_batches (
    id          INTEGER PRIMARY KEY,
    device_id   TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    sequence    INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    start_at    INTEGER NOT NULL,
    end_at      INTEGER NOT NULL,
    hour        INTEGER NOT NULL,
    rolled_up   INTEGER NOT NULL DEFAULT 0,
    device      BLOB,
    UNIQUE (device_id, sequence)
);
CREATE INDEX telemetry_batches_end ON telemetry_batches (end_at);
CREATE INDEX telemetry_batches_unrolled ON telemetry_batches (hour) WHERE rolled_up = 0;

CREATE TABLE model_samples (
    batch_id        INTEGER NOT NULL REFERENCES telemetry_batches (id) ON DELETE CASCADE,
    model           TEXT NOT NULL,
    version         INTEGER NOT NULL,
    requests        INTEGER NOT NULL,
    errors          INTEGER NOT NULL,
    local           INTEGER NOT NULL,
    offloaded       INTEGER NOT NULL,
    latency_us      BLOB NOT NULL,
    batch_size      BLOB NOT NULL,
    max_queue_depth INTEGER NOT NULL,
    PRIMARY KEY (batch_id, model, version)
) WITHOUT ROWID;

CREATE TABLE events (
    batch_id  INTEGER NOT NULL REFERENCES telemetry_batches (id) ON DELETE CASCADE,
    idx       INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    at        INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    model     TEXT NOT NULL,
    version   INTEGER NOT NULL,
    message   TEXT NOT NULL,
    PRIMARY KEY (batch_id, idx)
) WITHOUT ROWID;
CREATE INDEX events_device_at ON events (device_id, at);

CREATE TABLE model_rollups_hourly (
    device_id       TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    hour            INTEGER NOT NULL,
    model           TEXT NOT NULL,
    version         INTEGER NOT NULL,
    requests        INTEGER NOT NULL,
    errors          INTEGER NOT NULL,
    local           INTEGER NOT NULL,
    offloaded       INTEGER NOT NULL,
    latency_us      BLOB NOT NULL,
    batch_size      BLOB NOT NULL,
    max_queue_depth INTEGER NOT NULL,
    PRIMARY KEY (device_id, hour, model, version)
) WITHOUT ROWID;
CREATE INDEX model_rollups_hourly_hour ON model_rollups_hourly (hour);
