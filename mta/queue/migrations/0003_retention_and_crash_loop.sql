-- Retention: find finished messages by age without scanning the table.
ALTER TABLE messages ADD COLUMN body_purged_at timestamptz;
CREATE INDEX messages_done ON messages (done_at) WHERE done_at IS NOT NULL;
CREATE INDEX messages_body_to_purge ON messages (done_at)
    WHERE done_at IS NOT NULL AND body_purged_at IS NULL;

-- The crash-loop breaker: how often a process died while this delivery was being sent.
ALTER TABLE deliveries
    ADD COLUMN crash_count   integer     NOT NULL DEFAULT 0,
    ADD COLUMN last_crash_at timestamptz;
