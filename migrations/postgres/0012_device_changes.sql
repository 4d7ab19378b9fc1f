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
-- changes hundreds): a transaction-local setting notes that it counted.
-- search_path as the migration ran: the schema of this database's tables.
CREATE FUNCTION count_device_change() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF coalesce(current_setting('edgefleet.device_change_counted', true), '') <> 'yes' THEN
        PERFORM set_config('edgefleet.device_change_counted', 'yes', true);
        UPDATE device_changes SET version = version + 1;
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
