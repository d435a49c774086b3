-- How a message's body is stored (issue 13): as received ('identity'), or compressed
-- by the node with zstd ('zstd'). Rows from before keep 'identity'; a constant default
-- adds the column without rewriting the table.
ALTER TABLE messages ADD COLUMN body_encoding text NOT NULL DEFAULT 'identity'
    CHECK (body_encoding IN ('identity', 'zstd'));
