-- Claims skip destinations a process already has enough of in hand: the due index
-- carries next_hop, so that filter is read from the index, not from the table.
DROP INDEX deliveries_due;
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) INCLUDE (next_hop)
    WHERE state IN ('queued', 'deferred');
