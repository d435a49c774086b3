-- The fleet database's statements (mta/fleet/audit.py). Every connection runs with
-- search_path = mta_fleet; the schema's migrations are in mta/fleet/migrations/.

-- name: fleet_schema_lock
-- Serialise the schema's creation when several operators open the fleet database at once.
SELECT pg_advisory_xact_lock(7123160302);

-- name: fleet_schema_create
-- The fleet's own schema: its tables never clash with a node store's in public.
CREATE SCHEMA IF NOT EXISTS mta_fleet;

-- name: fleet_audit_insert
-- Record one fleet action ($8: its record id; a second copy of the same record is a no-op).
INSERT INTO fleet_audit (at, node, operator, action, reason, result, counts, record_id)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8)
ON CONFLICT (record_id) DO NOTHING;

-- name: fleet_audit_list
-- Fleet actions on node $1 (every node when NULL) since $2, newest first, at most $3.
SELECT at, node, operator, action, reason, result, counts::text, record_id
FROM fleet_audit
WHERE ($1::text IS NULL OR node = $1::text) AND at >= $2
ORDER BY at DESC, id DESC
LIMIT $3;
