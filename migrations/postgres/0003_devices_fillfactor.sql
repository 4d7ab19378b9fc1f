-- Every telemetry group commit updates the device rows it carries (last
-- sequence, totals, health). With half of each page left free those updates
-- stay on their page (HOT updates: no new index entries, less WAL) instead of
-- moving the row. Applies to pages written from now on.
ALTER TABLE devices SET (fillfactor = 50);
