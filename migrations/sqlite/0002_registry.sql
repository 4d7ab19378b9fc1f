-- Model registry, staged rollouts and each device's desired state (SQLite).
-- Times are Unix milliseconds; u64 figures are stored bit-for-bit in INTEGER
-- columns; tensor lists, labels, selectors and rollout specs are JSON text.

CREATE TABLE models (
    name                   TEXT NOT NULL,
    version                INTEGER NOT NULL,
    sha256                 TEXT NOT NULL,
    size_bytes             INTEGER NOT NULL,
    opset                  INTEGER NOT NULL,
    inputs                 TEXT NOT NULL,
    outputs                TEXT NOT NULL,
    labels                 TEXT NOT NULL,
    private                INTEGER NOT NULL,
    signature              BLOB NOT NULL,
    signed_by              TEXT NOT NULL,
    signature_public_key   BLOB NOT NULL,
    created_at             INTEGER NOT NULL,
    created_by             TEXT NOT NULL,
    estimated_memory_bytes INTEGER NOT NULL,
    PRIMARY KEY (name, version)
) WITHOUT ROWID;
CREATE INDEX models_sha256 ON models (sha256);

-- Ordered by (created_at, rowid): rowid is the insertion order.
CREATE TABLE rollouts (
    id           TEXT PRIMARY KEY NOT NULL,
    model        TEXT NOT NULL,
    version      INTEGER NOT NULL,
    selector     TEXT NOT NULL,
    spec         TEXT NOT NULL,
    state        TEXT NOT NULL,
    current_wave INTEGER NOT NULL,
    wave_done_at INTEGER NOT NULL,
    reason       TEXT NOT NULL,
    created_by   TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);
CREATE INDEX rollouts_model ON rollouts (model, created_at);
CREATE INDEX rollouts_active ON rollouts (created_at)
    WHERE state IN ('pending', 'running', 'paused');

CREATE TABLE rollout_devices (
    rollout_id       TEXT NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    device_id        TEXT NOT NULL,
    wave             INTEGER NOT NULL,
    state            TEXT NOT NULL,
    previous_version INTEGER NOT NULL,
    reason           TEXT NOT NULL,
    updated_at       INTEGER NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
) WITHOUT ROWID;
CREATE INDEX rollout_devices_device ON rollout_devices (device_id);

-- seq is the insertion order.
CREATE TABLE rollout_events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id TEXT NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    at         INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    message    TEXT NOT NULL
);
CREATE INDEX rollout_events_rollout ON rollout_events (rollout_id, seq);

-- What each device should serve, one row per (device, model name).
CREATE TABLE device_desired (
    device_id  TEXT NOT NULL,
    name       TEXT NOT NULL,
    version    INTEGER NOT NULL,
    sha256     TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    signature  BLOB NOT NULL,
    private    INTEGER NOT NULL,
    PRIMARY KEY (device_id, name)
) WITHOUT ROWID;
CREATE INDEX device_desired_model ON device_desired (name, version);

-- Bumped whenever a device's desired state changes (absent: 0).
CREATE TABLE device_generations (
    device_id  TEXT PRIMARY KEY NOT NULL,
    generation INTEGER NOT NULL
) WITHOUT ROWID;

-- The latest activation step per device and model version.
CREATE TABLE activations (
    device_id TEXT NOT NULL,
    name      TEXT NOT NULL,
    version   INTEGER NOT NULL,
    stage     TEXT NOT NULL,
    reason    TEXT NOT NULL,
    at        INTEGER NOT NULL,
    PRIMARY KEY (device_id, name, version)
) WITHOUT ROWID;
CREATE INDEX activations_model ON activations (name, version);
