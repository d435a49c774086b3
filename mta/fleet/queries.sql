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

-- name: controller_lock
-- Try to become the acting controller: a session lock, held for as long as the leader's
-- dedicated connection lives.
SELECT pg_try_advisory_lock(71231605);

-- name: controller_new_term
-- A new leadership for controller $1: the next term, its fencing token.
UPDATE controller_state SET term = term + 1, leader = $1, leader_since = now()
RETURNING term;

-- name: controller_state_get
-- The shared controller state: term, leader, and whether actions are paused.
SELECT term, leader, leader_since, paused, paused_reason, paused_by, paused_at
FROM controller_state;

-- name: controller_pause_set
-- Pause ($1 true) or resume controllers fleet-wide, by $3 for reason $2.
UPDATE controller_state SET paused = $1, paused_reason = $2, paused_by = $3, paused_at = now();

-- name: controller_ping
-- The leader's connection still answers (else it stops acting).
SELECT 1;
