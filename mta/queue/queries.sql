-- Every statement the store runs, each under a "-- name: <name>" header with a
-- one-line description. mta/queue/sql.py parses this file once.

-- name: migrations_create_table
-- The ledger of applied schema migrations.
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: migrations_lock
-- Serialise migrations across processes that start at once (released at commit).
SELECT pg_advisory_xact_lock(7123160301);

-- name: migrations_applied
-- Versions already applied.
SELECT version FROM schema_migrations ORDER BY version;

-- name: migrations_record
-- Record one applied migration.
INSERT INTO schema_migrations (version, name) VALUES ($1, $2);

-- name: message_insert
-- Commit a message and one queued delivery per recipient in one statement.
WITH message AS (
    INSERT INTO messages (id, mail_from, size_bytes, trace_headers, body, client_address,
                          helo_name, auth_user, message_id_header)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
    RETURNING id
)
INSERT INTO deliveries (message_id, recipient, next_hop)
SELECT message.id, rcpt.recipient, rcpt.next_hop
FROM message, unnest($10::text[], $11::text[]) AS rcpt (recipient, next_hop);

-- name: message_get
-- One message's envelope and metadata, without its body.
SELECT id, mail_from, size_bytes, client_address, helo_name, auth_user,
       message_id_header, received_at, done_at
FROM messages WHERE id = $1;

-- name: message_content
-- One message's added trace headers and body, read only right before it is sent.
SELECT trace_headers, body FROM messages WHERE id = $1;

-- name: message_count
-- How many messages the store holds.
SELECT count(*) FROM messages;

-- name: message_ids
-- Ids of every message, oldest first (for reconciliation and tests).
SELECT id FROM messages ORDER BY received_at, id;

-- name: message_queued_bytes
-- Bytes of messages that still have work to do (admission control).
SELECT coalesce(sum(size_bytes), 0)::bigint FROM messages WHERE done_at IS NULL;

-- name: delivery_list_for_message
-- Every delivery of one message.
SELECT id, recipient, next_hop, state, attempts, next_attempt_at, lease_owner,
       lease_expires_at, last_reply_code, last_reply
FROM deliveries WHERE message_id = $1 ORDER BY id;

-- name: delivery_claim_due
-- Lease up to $2 due deliveries to owner $1 for $3 seconds, skipping locked rows.
WITH due AS (
    SELECT id FROM deliveries
    WHERE state IN ('queued', 'deferred') AND next_attempt_at <= now()
    ORDER BY next_attempt_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE deliveries AS d
SET state = 'leased', lease_owner = $1,
    lease_expires_at = now() + make_interval(secs => $3), updated_at = now()
FROM due
WHERE d.id = due.id
RETURNING d.id, d.message_id, d.recipient, d.next_hop, d.attempts;

-- name: server_limits
-- The server's connection limits, connections in use, and durability settings.
SELECT current_setting('max_connections')::int AS max_connections,
       current_setting('superuser_reserved_connections')::int AS superuser_reserved,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int
           AS in_use,
       current_setting('fsync') AS fsync,
       current_setting('synchronous_commit') AS synchronous_commit;

-- name: ping
-- A round trip that proves the server answers.
SELECT 1;
