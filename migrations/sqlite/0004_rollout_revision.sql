-- Each saved step of a rollout bumps its revision. A step is computed from
-- what was read and saved only if no other step was saved since (the engine
-- of another replica, or an operator's pause, abort or rollback): a stale
-- step would otherwise undo it.
ALTER TABLE rollouts ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
