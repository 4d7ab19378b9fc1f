-- A counter that moves whenever a device is enrolled or removed, or its
-- status, labels, inventory or models change: what a rollout reads of the
-- devices its selector matches. The rollout engine reads that again only
-- when the counter moved (Store::device_changes). Triggers keep it, so no
-- writer of `devices` can forget to.
--
-- The triggers are deferred to the commit: a transaction takes the
-- counter's row lock last, after every other lock it needed, and waits for
-- nothing else while it holds it, so no two writers deadlock over it.
CREATE TABLE device_changes (
    id      INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO device_changes (id, version) VALUES (1, 0);

-- Once per transaction, however many rows it changed (a group of Hellos
-- changes hundreds): a transaction-local setting names the schema whose
-- counter it moved. The counter is the one beside the `devices` table
-- that fired, whatever the search_path.
CREATE FUNCTION count_device_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('edgefleet.device_change_counted', true) IS DISTINCT FROM TG_TABLE_SCHEMA THEN
        PERFORM set_config('edgefleet.device_change_counted', TG_TABLE_SCHEMA, true);
        EXECUTE format('UPDATE %I.device_changes SET version = version + 1', TG_TABLE_SCHEMA);
    END IF;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER device_added AFTER INSERT ON devices
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION count_device_change();

CREATE CONSTRAINT TRIGGER device_removed AFTER DELETE ON devices
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION count_device_change();

CREATE CONSTRAINT TRIGGER device_changed AFTER UPDATE OF status, labels, inventory, models ON devices
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN ((OLD.status, OLD.labels, OLD.inventory, OLD.models)
          IS DISTINCT FROM (NEW.status, NEW.labels, NEW.inventory, NEW.models))
    EXECUTE FUNCTION count_device_change();
