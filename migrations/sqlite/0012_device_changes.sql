-- A counter that moves whenever a device is enrolled or removed, or its
-- status, labels, inventory or models change: what a rollout reads of the
-- devices its selector matches. The rollout engine reads that again only
-- when the counter moved (Store::device_changes). Triggers keep it, so no
-- writer of `devices` can forget to.
CREATE TABLE device_changes (
    id      INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT INTO device_changes (id, version) VALUES (1, 0);

CREATE TRIGGER device_added AFTER INSERT ON devices
BEGIN
    UPDATE device_changes SET version = version + 1;
END;

CREATE TRIGGER device_removed AFTER DELETE ON devices
BEGIN
    UPDATE device_changes SET version = version + 1;
END;

CREATE TRIGGER device_changed AFTER UPDATE OF status, labels, inventory, models ON devices
WHEN old.status IS NOT new.status OR old.labels IS NOT new.labels
    OR old.inventory IS NOT new.inventory OR old.models IS NOT new.models
BEGIN
    UPDATE device_changes SET version = version + 1;
END;
