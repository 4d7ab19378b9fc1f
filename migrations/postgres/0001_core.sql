-- Core schema of the control plane (PostgreSQL). Times are Unix milliseconds;
-- u64 figures are stored bit-for-bit in BIGINT (i64) columns; labels,
-- inventories and model lists are JSON text; histograms and device samples
-- are protobuf bytes.

CREATE TABLE operator_tokens (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);

CREATE TABLE join_tokens (
    id          TEXT PRIMARY KEY NOT NULL,
    secret_hash TEXT NOT NULL,
    labels      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    uses_left   BIGINT NOT NULL CHECK (uses_left >= 0),
    created_by  TEXT NOT NULL
);

CREATE TABLE devices (
    id                     TEXT PRIMARY KEY NOT NULL,
    labels                 TEXT NOT NULL,
    inventory              TEXT NOT NULL,
    status                 TEXT NOT NULL CHECK (status IN ('enrolled', 'revoked')),
    enrolled_at            BIGINT NOT NULL,
    revoked_at             BIGINT,
    join_token_id          TEXT,
    certificate_serial     TEXT NOT NULL,
    certificate_expires_at BIGINT NOT NULL,
    last_seen              BIGINT NOT NULL DEFAULT 0,
    models                 TEXT NOT NULL DEFAULT '[]',
    runtime                TEXT NOT NULL DEFAULT '',
    -- DeviceTelemetry of the batch with sequence health_sequence.
    health                 BYTEA,
    health_sequence        BIGINT NOT NULL DEFAULT 0,
    last_sequence          BIGINT NOT NULL DEFAULT 0,
    requests_total         BIGINT NOT NULL DEFAULT 0,
    errors_total           BIGINT NOT NULL DEFAULT 0,
    offloaded_total        BIGINT NOT NULL DEFAULT 0,
    dropped_batches_total  BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX devices_revoked_at ON devices (revoked_at) WHERE revoked_at IS NOT NULL;

-- One row per stored telemetry batch. `id` grows with insertion, so the big
-- tables below (keyed by batch id) are appended to, not written all over.
-- `hour` is the start of the hour holding start_at; rolled_up says its model
-- samples are merged into model_rollups_hourly. No foreign keys on the
-- telemetry tables (per-row triggers on the hot path): ingest only inserts
-- for devices it has locked, and prune deletes samples and events with their
-- batches.
CREATE TABLE telemetry_batches (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id   TEXT NOT NULL,
    sequence    BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    start_at    BIGINT NOT NULL,
    end_at      BIGINT NOT NULL,
    hour        BIGINT NOT NULL,
    rolled_up   BOOLEAN NOT NULL DEFAULT FALSE,
    device      BYTEA,
    UNIQUE (device_id, sequence)
);
CREATE INDEX telemetry_batches_end ON telemetry_batches (end_at);
CREATE INDEX telemetry_batches_unrolled ON telemetry_batches (hour) WHERE NOT rolled_up;

CREATE TABLE model_samples (
    batch_id        BIGINT NOT NULL,
    model           TEXT NOT NULL,
    version         BIGINT NOT NULL,
    requests        BIGINT NOT NULL,
    errors          BIGINT NOT NULL,
    local           BIGINT NOT NULL,
    offloaded       BIGINT NOT NULL,
    latency_us      BYTEA NOT NULL,
    batch_size      BYTEA NOT NULL,
    max_queue_depth BIGINT NOT NULL,
    PRIMARY KEY (batch_id, model, version)
);

CREATE TABLE events (
    batch_id  BIGINT NOT NULL,
    idx       BIGINT NOT NULL,
    device_id TEXT NOT NULL,
    at        BIGINT NOT NULL,
    kind      TEXT NOT NULL,
    model     TEXT NOT NULL,
    version   BIGINT NOT NULL,
    message   TEXT NOT NULL,
    PRIMARY KEY (batch_id, idx)
);
CREATE INDEX events_device_at ON events (device_id, at);

CREATE TABLE model_rollups_hourly (
    device_id       TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    hour            BIGINT NOT NULL,
    model           TEXT NOT NULL,
    version         BIGINT NOT NULL,
    requests        BIGINT NOT NULL,
    errors          BIGINT NOT NULL,
    local           BIGINT NOT NULL,
    offloaded       BIGINT NOT NULL,
    latency_us      BYTEA NOT NULL,
    batch_size      BYTEA NOT NULL,
    max_queue_depth BIGINT NOT NULL,
    PRIMARY KEY (device_id, hour, model, version)
);
CREATE INDEX model_rollups_hourly_hour ON model_rollups_hourly (hour);
