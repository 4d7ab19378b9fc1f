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
ALTER TABLE device_changes DROP CONSTRAINT device_changes_id_check;
ALTER TABLE device_changes ADD CONSTRAINT device_change_slot CHECK (id BETWEEN 0 AND 63);
INSERT INTO device_changes (id, version)
    SELECT slot, 0 FROM generate_series(0, 63) AS slot WHERE slot <> 1;

CREATE OR REPLACE FUNCTION count_device_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('edgefleet.device_change_counted', true) IS DISTINCT FROM TG_TABLE_SCHEMA THEN
        PERFORM set_config('edgefleet.device_change_counted', TG_TABLE_SCHEMA, true);
        EXECUTE format('UPDATE %I.device_changes SET version = version + 1 WHERE id = $1', TG_TABLE_SCHEMA)
            USING (txid_current() % 64)::integer;
    END IF;
    RETURN NULL;
END
$$;
