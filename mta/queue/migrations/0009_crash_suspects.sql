-- The crash-loop breaker works through suspects (deliveries in flight at several process
-- deaths) one at a time at start: find them without scanning the table.
CREATE INDEX deliveries_crash_suspects ON deliveries (last_crash_at)
    WHERE crash_count > 0;
