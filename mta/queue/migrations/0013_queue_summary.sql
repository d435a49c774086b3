-- The queue tools (issue 12): `mta queue summary` reads only deliveries with work left
-- and never reads delivered or failed deliveries. The index is partial on
-- the pending rows and covers what the summary needs, so it is an index-only scan
-- whatever the share of history (a plain partial index loses to a sequential scan of
-- the whole table once the due rows are a large part of it).
CREATE INDEX deliveries_pending_shape ON deliveries (state, next_hop) INCLUDE (message_id)
    WHERE state IN ('queued', 'deferred', 'leased', 'uncertain', 'held');
