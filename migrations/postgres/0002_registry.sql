-- Model registry, staged rollouts and each device's desired state (PostgreSQL).
-- Times are Unix milliseconds; u64 figures are stored bit-for-bit in BIGINT
-- columns; tensor lists, labels, selectors and rollout specs are JSON text.

CREATE TABLE models (
    name                   TEXT NOT NULL,
    version                BIGINT NOT NULL,
    sha256                 TEXT NOT NULL,
    size_bytes             BIGINT NOT NULL,
    opset                  BIGINT NOT NULL,
    inputs                 TEXT NOT NULL,
    outputs                TEXT NOT NULL,
    labels                 TEXT NOT NULL,
    private                BOOLEAN NOT NULL,
    signature              BYTEA NOT NULL,
    signed_by              TEXT NOT NULL,
    signature_public_key   BYTEA NOT NULL,
    created_at             BIGINT NOT NULL,
    created_by             TEXT NOT NULL,
    estimated_memory_bytes BIGINT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE INDEX models_sha256 ON models (sha256);

-- Ordered by (created_at, seq): seq is the insertion order.
CREATE TABLE rollouts (
    id           TEXT PRIMARY KEY NOT NULL,
    model        TEXT NOT NULL,
    version      BIGINT NOT NULL,
    selector     TEXT NOT NULL,
    spec         TEXT NOT NULL,
    state        TEXT NOT NULL,
    current_wave BIGINT NOT NULL,
    wave_done_at BIGINT NOT NULL,
    reason       TEXT NOT NULL,
    created_by   TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    seq          BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE
);
CREATE INDEX rollouts_model ON rollouts (model, created_at);
CREATE INDEX rollouts_active ON rollouts (created_at)
    WHERE state IN ('pending', 'running', 'paused');

CREATE TABLE rollout_devices (
    rollout_id       TEXT NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    device_id        TEXT NOT NULL,
    wave             BIGINT NOT NULL,
    state            TEXT NOT NULL,
    previous_version BIGINT NOT NULL,
    reason           TEXT NOT NULL,
    updated_at       BIGINT NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX rollout_devices_device ON rollout_devices (device_id);

-- seq is the insertion order.
CREATE TABLE rollout_events (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rollout_id TEXT NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    at         BIGINT NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    message    TEXT NOT NULL
);
CREATE INDEX rollout_events_rollout ON rollout_events (rollout_id, seq);

-- What each device should serve, one row per (device, model name).
CREATE TABLE device_desired (
    device_id  TEXT NOT NULL,
    name       TEXT NOT NULL,
    version    BIGINT NOT NULL,
    sha256     TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    signature  BYTEA NOT NULL,
    private    BOOLEAN NOT NULL,
    PRIMARY KEY (device_id, name)
);
CREATE INDEX device_desired_model ON device_desired (name, version);

-- Bumped whenever a device's desired state changes (absent: 0).
CREATE TABLE device_generations (
    device_id  TEXT PRIMARY KEY NOT NULL,
    generation BIGINT NOT NULL
);

-- The latest activation step per device and model version.
CREATE TABLE activations (
    device_id TEXT NOT NULL,
    name      TEXT NOT NULL,
    version   BIGINT NOT NULL,
    stage     TEXT NOT NULL,
    reason    TEXT NOT NULL,
    at        BIGINT NOT NULL,
    PRIMARY KEY (device_id, name, version)
);
CREATE INDEX activations_model ON activations (name, version);
