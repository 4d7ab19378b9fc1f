-- The device change counter (0012) in 64 slots, its value their sum.
--
-- With one row, every transaction that changed a device took that row's
-- lock at its commit and kept it until the commit was on disk, so such
-- transactions committed one at a time across every connection and
-- replica: each waited for the one before it to be flushed, and none could
-- share a flush with another (PostgreSQL's group commit). Now each bumps
-- the slot its transaction id picks: transactions committing together have
-- nearby ids, so they take different rows and commit together. Every
-- commit that changed a device still adds one to the sum, so the sum moves
-- exactly when the single counter did; it is still taken last, at the
-- commit, one row per transaction, so no two writers deadlock over it.
--
-- A new table, not new rows in the old one: a replica still running a
-- binary without this migration fails to read the counter (its rollout
-- engine's passes fail, and the upgraded replicas step the rollouts),
-- where it would read one slot as the whole and act on stale targets.
CREATE TABLE device_change_slots (
    slot    INTEGER PRIMARY KEY NOT NULL CHECK (slot BETWEEN 0 AND 63),
    changes BIGINT NOT NULL
);
INSERT INTO device_change_slots (slot, changes)
    SELECT slot, CASE WHEN slot = 0 THEN (SELECT version FROM device_changes) ELSE 0 END
    FROM generate_series(0, 63) AS slot;
DROP TABLE device_changes;

CREATE OR REPLACE FUNCTION count_device_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('edgefleet.device_change_counted', true) IS DISTINCT FROM TG_TABLE_SCHEMA THEN
        PERFORM set_config('edgefleet.device_change_counted', TG_TABLE_SCHEMA, true);
        EXECUTE format('UPDATE %I.device_change_slots SET changes = changes + 1 WHERE slot = $1', TG_TABLE_SCHEMA)
            USING (txid_current() % 64)::integer;
    END IF;
    RETURN NULL;
END
$$;
