-- Fleet-wide de-duplication of client retries (issue 11): one key per (Message-ID,
-- envelope sender, recipient), in the fleet database's schema mta_fleet, shared by every
-- node. mta/queue/dedup.py is the only caller. The table is created by the first node
-- that connects (it is the only one of its kind: no migration ledger needed yet).

-- name: dedup_create
CREATE SCHEMA IF NOT EXISTS mta_fleet;
CREATE TABLE IF NOT EXISTS mta_fleet.dedup_keys (
    key      bytea       PRIMARY KEY,
    queue_id text        NOT NULL,
    node     text        NOT NULL,
    seen_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS dedup_keys_seen_at ON mta_fleet.dedup_keys (seen_at);

-- name: dedup_create_lock
-- Serialise the table's creation when several nodes start at once.
SELECT pg_advisory_xact_lock(71231606);

-- name: dedup_seen
-- The keys of $1 recorded within the last $2 seconds, with the queue id that took them.
SELECT key, queue_id FROM mta_fleet.dedup_keys
WHERE key = ANY($1::bytea[]) AND seen_at > now() - make_interval(secs => $2);

-- name: dedup_record
-- Record keys $1 as taken by queue id $2 on node $3 (a key already there keeps its
-- first owner, unless that one is past the window $4).
INSERT INTO mta_fleet.dedup_keys (key, queue_id, node)
SELECT key, $2, $3 FROM unnest($1::bytea[]) AS key
ON CONFLICT (key) DO UPDATE
SET queue_id = EXCLUDED.queue_id, node = EXCLUDED.node, seen_at = now()
WHERE dedup_keys.seen_at <= now() - make_interval(secs => $4);

-- name: dedup_purge
-- Delete up to $2 keys older than the window $1.
DELETE FROM mta_fleet.dedup_keys
WHERE key IN (SELECT key FROM mta_fleet.dedup_keys
              WHERE seen_at <= now() - make_interval(secs => $1) LIMIT $2);
