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
-- Commit a message and one queued delivery per recipient in one statement ($12: how the
-- body is stored, mta.queue.body_codec).
WITH message AS (
    INSERT INTO messages (id, mail_from, size_bytes, trace_headers, body, client_address,
                          helo_name, auth_user, message_id_header, body_encoding)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $12)
    RETURNING id
)
INSERT INTO deliveries (message_id, recipient, next_hop)
SELECT message.id, rcpt.recipient, rcpt.next_hop
FROM message, unnest($10::text[], $11::text[]) AS rcpt (recipient, next_hop);

-- name: deliveries_insert_for_message
-- One queued delivery per recipient $2 (at next hop $3) of message $1, whose row was
-- streamed in by COPY in the same transaction (large bodies, Store.enqueue).
INSERT INTO deliveries (message_id, recipient, next_hop)
SELECT $1, rcpt.recipient, rcpt.next_hop
FROM unnest($2::text[], $3::text[]) AS rcpt (recipient, next_hop);

-- name: message_get
-- One message's envelope and metadata, without its body.
SELECT id, mail_from, size_bytes, client_address, helo_name, auth_user,
       message_id_header, received_at, done_at, origin_node, origin_message
FROM messages WHERE id = $1;

-- name: message_content
-- One message's added trace headers and stored body, read only right before it is sent.
SELECT trace_headers, body, body_encoding FROM messages WHERE id = $1;

-- name: message_head
-- One message's added trace headers and the first $2 bytes of its body (for a DSN); a
-- compressed body comes whole (under 2 MiB), to be decoded by the caller.
SELECT trace_headers, body_encoding,
       CASE WHEN body_encoding = 'identity' THEN substring(body FROM 1 FOR $2) ELSE body END
           AS head
FROM messages WHERE id = $1;

-- name: message_count
-- How many messages the store holds.
SELECT count(*) FROM messages;

-- name: message_queued_bytes
-- Bytes of messages that still have work to do (admission control).
SELECT coalesce(sum(size_bytes), 0)::bigint FROM messages WHERE done_at IS NULL;

-- name: queue_stats
-- Deliveries with work left per state (each count walks its state's partial index),
-- leases past their expiry (a live process that stopped renewing them), how long the most
-- overdue due delivery has waited, the oldest unfinished message, and the deliveries
-- made, rerouted off this store and rerouted onto it in the last minute.
SELECT
    (SELECT count(*) FROM deliveries WHERE state = 'queued') AS queued,
    (SELECT count(*) FROM deliveries WHERE state = 'deferred') AS deferred,
    (SELECT count(*) FROM deliveries WHERE state = 'leased') AS leased,
    (SELECT count(*) FROM deliveries WHERE state = 'uncertain') AS uncertain,
    (SELECT count(*) FROM deliveries WHERE state = 'held') AS held,
    (SELECT count(*) FROM deliveries
     WHERE state = 'leased' AND lease_expires_at < now()) AS expired_leases,
    coalesce((SELECT extract(epoch FROM now() - next_attempt_at)::float8 FROM deliveries
              WHERE state IN ('queued', 'deferred') AND next_attempt_at <= now()
              ORDER BY next_attempt_at LIMIT 1), 0) AS due_lag_s,
    coalesce((SELECT extract(epoch FROM now() - received_at)::float8 FROM messages
              WHERE done_at IS NULL ORDER BY received_at LIMIT 1), 0) AS oldest_message_s,
    (SELECT count(*) FROM deliveries
     WHERE state = 'delivered' AND finished_at > now() - interval '60 seconds')
        AS delivered_last_minute,
    (SELECT count(*) FROM deliveries
     WHERE state = 'rerouted' AND updated_at > now() - interval '60 seconds')
        AS rerouted_out_last_minute,
    (SELECT count(*) FROM deliveries
     WHERE origin_delivery IS NOT NULL AND created_at > now() - interval '60 seconds')
        AS rerouted_in_last_minute;

-- name: queue_by_destination
-- Deliveries with work left per next hop and state, the $1 largest groups first.
SELECT next_hop, state, count(*) AS count
FROM deliveries
WHERE state IN ('queued', 'deferred', 'leased', 'uncertain', 'held')
GROUP BY next_hop, state
ORDER BY count(*) DESC, next_hop, state
LIMIT $1;

-- name: delivery_list_for_message
-- Every delivery of one message.
SELECT id, recipient, next_hop, state, attempts, next_attempt_at, lease_owner,
       lease_expires_at, last_reply_code, last_reply, possible_duplicate, hold_reason,
       reroute_target, rerouted_to_message
FROM deliveries WHERE message_id = $1 ORDER BY id;

-- name: delivery_claim_due
-- Lease to owner $1 for $3 seconds the first $2 due deliveries, oldest due first, skipping
-- locked rows, with at most $5 more messages' worth for each next hop in $4 (the room the
-- owner has left for it: 0 skips it); with them, every other due delivery of the same
-- message and next hop, so one SMTP transaction carries all of a message's recipients at
-- a destination. Each row comes with its message's envelope.
WITH room AS (
    SELECT hop, messages FROM unnest($4::text[], $5::int[]) AS room(hop, messages)
), candidates AS (
    SELECT id, message_id, next_hop, next_attempt_at FROM deliveries
    WHERE state IN ('queued', 'deferred') AND next_attempt_at <= now()
      AND next_hop <> ALL(ARRAY(SELECT hop FROM room WHERE messages <= 0))
    ORDER BY next_attempt_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), ranked AS (
    -- The candidates' messages in turn per next hop (at most $2 rows: a small sort).
    SELECT message_id, next_hop,
           row_number() OVER (PARTITION BY next_hop
                              ORDER BY min(next_attempt_at), message_id) AS place
    FROM candidates GROUP BY message_id, next_hop
), first AS (
    SELECT c.id, c.message_id, c.next_hop FROM candidates AS c
    JOIN ranked AS r USING (message_id, next_hop)
    WHERE r.place <= coalesce(
        (SELECT messages FROM room WHERE room.hop = c.next_hop), $2)
), siblings AS (
    -- A lateral lookup per claimed row, so the plan is an index probe by message
    -- whatever the statistics say, never a hash join over every due delivery. The due
    -- test is inside a CASE so that it matches no index: written plainly, it lets the
    -- planner walk every due entry of deliveries_due per claimed row instead.
    SELECT sibling.id FROM first
    CROSS JOIN LATERAL (
        SELECT d.id FROM deliveries AS d
        WHERE d.message_id = first.message_id AND d.next_hop = first.next_hop
          AND CASE WHEN d.state IN ('queued', 'deferred')
                   THEN d.next_attempt_at <= now() ELSE false END
        FOR UPDATE SKIP LOCKED
    ) AS sibling
)
UPDATE deliveries AS d
SET state = 'leased', lease_owner = $1,
    lease_expires_at = now() + make_interval(secs => $3), updated_at = now()
FROM messages AS m
WHERE d.id = ANY(ARRAY(SELECT id FROM first UNION SELECT id FROM siblings))
  AND m.id = d.message_id
RETURNING d.id, d.message_id, d.recipient, d.next_hop, d.attempts,
          m.mail_from, m.received_at, m.message_id_header, m.size_bytes;

-- name: delivery_claim_suspect
-- Lease to owner $1 for $2 seconds one queued or deferred suspect of the crash-loop
-- breaker (in flight at $3 or more process deaths within the last $4 seconds), alone:
-- without its siblings. Its message's envelope comes with it.
WITH suspect AS (
    SELECT id FROM deliveries
    WHERE crash_count >= $3 AND last_crash_at > now() - make_interval(secs => $4)
      AND crash_count > 0 AND state IN ('queued', 'deferred')
    ORDER BY last_crash_at, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE deliveries AS d
SET state = 'leased', lease_owner = $1,
    lease_expires_at = now() + make_interval(secs => $2), updated_at = now()
FROM messages AS m
WHERE d.id = (SELECT id FROM suspect) AND m.id = d.message_id
RETURNING d.id, d.message_id, d.recipient, d.next_hop, d.attempts,
          m.mail_from, m.received_at, m.message_id_header, m.size_bytes;

-- name: delivery_exonerate
-- A suspect whose attempt ran alone without the process dying is no suspect any more.
UPDATE deliveries SET crash_count = 0 WHERE id = $1;

-- name: server_limits
-- The server's connection limits, connections in use, and durability settings.
SELECT current_setting('max_connections')::int AS max_connections,
       current_setting('superuser_reserved_connections')::int AS superuser_reserved,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int
           AS in_use,
       current_setting('fsync') AS fsync,
       current_setting('synchronous_commit') AS synchronous_commit;

-- name: fault_sleep
-- A slow store for fault tests (mta.faults.fault_delay): hold the connection $1 seconds.
SELECT pg_sleep($1);

-- name: ping
-- A round trip that proves the server answers.
SELECT 1;

-- Statements on the leases one owner holds match `lease_owner = $1` alone: the table's
-- CHECK makes a non-null owner mean `state = 'leased'`, and leaving the state out keeps
-- the planner on the primary key. With it, the partial index deliveries_lease_expiry
-- matches; PostgreSQL then bitmap-scans it, and it holds a dead entry for every lease
-- since the last vacuum (leasing is never a HOT update), so each call grew with the
-- deliveries handled.

-- name: delivery_renew_leases
-- Extend the leases owner $1 holds on deliveries $2 by $3 seconds (a long send).
UPDATE deliveries
SET lease_expires_at = now() + make_interval(secs => $3), updated_at = now()
WHERE id = ANY($2::bigint[]) AND lease_owner = $1
RETURNING id;

-- name: delivery_record_outcomes
-- Apply attempt outcomes to deliveries leased to owner $1, each with its evidence event
-- and the remote host it talked to ($8, null when none was reached), with the unix times
-- the attempt started ($9), wrote the final dot ($10) and lost the reply ($11), each null
-- when unknown or when it did not happen.
WITH outcome AS (
    SELECT *
    FROM unnest($2::bigint[], $3::text[], $4::integer[], $5::text[], $6::float8[],
                $7::boolean[], $8::text[], $9::float8[], $10::float8[], $11::float8[])
        AS o (id, state, reply_code, reply, retry_in_s, possible_duplicate, host,
              started_at, dot_at, reply_lost_at)
    WHERE o.state IN ('delivered', 'deferred', 'failed', 'uncertain', 'held')
), changed AS (
    UPDATE deliveries AS d
    SET state = o.state,
        hold_reason = CASE WHEN o.state = 'held' THEN o.reply END,
        last_reply_code = o.reply_code,
        last_reply = o.reply,
        attempts = d.attempts + 1,
        last_attempt_at = now(),
        next_attempt_at = CASE WHEN o.state = 'deferred'
                               THEN now() + make_interval(secs => o.retry_in_s)
                               ELSE d.next_attempt_at END,
        finished_at = CASE WHEN o.state IN ('delivered', 'failed') THEN now() END,
        possible_duplicate = d.possible_duplicate OR o.possible_duplicate,
        last_host = coalesce(o.host, d.last_host),
        last_attempt_started_at = to_timestamp(o.started_at),
        last_dot_at = to_timestamp(o.dot_at),
        last_reply_lost_at = to_timestamp(o.reply_lost_at),
        lease_owner = NULL,
        lease_expires_at = NULL,
        updated_at = now()
    FROM outcome AS o
    WHERE d.id = o.id AND d.lease_owner = $1
    RETURNING d.id, d.message_id, d.state, d.last_reply_code, d.last_reply, o.host
), events AS (
    INSERT INTO delivery_events (delivery_id, state, reply_code, detail, actor, host)
    SELECT id, state, last_reply_code, coalesce(last_reply, ''), $1, host FROM changed
), done AS (
    -- A message whose every delivery is now final, as this statement sees it. A sibling
    -- finished by a concurrent statement looks unfinished here: the caller then runs
    -- message_mark_done after committing, which sees it.
    UPDATE messages AS m
    SET done_at = now()
    WHERE m.id IN (SELECT message_id FROM changed) AND m.done_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM changed AS c
                      WHERE c.message_id = m.id AND c.state NOT IN ('delivered', 'failed'))
      AND NOT EXISTS (SELECT 1 FROM deliveries AS d
                      WHERE d.message_id = m.id
                        AND d.state NOT IN ('delivered', 'failed', 'rerouted')
                        AND d.id NOT IN (SELECT id FROM changed))
    RETURNING m.id
)
SELECT c.id AS delivery_id, c.message_id IN (SELECT id FROM done) AS message_done
FROM changed AS c;

-- name: set_aside_record
-- Keep outcomes the store refused (source $1, owner $2, attempt $3, deliveries $4,
-- reason $5, raw evidence $6) and make the deliveries owner $2 still leases uncertain:
-- their evidence is in the kept record, not in the store. Returns the record's id.
WITH kept AS (
    INSERT INTO set_aside (source, owner, attempt_id, delivery_ids, reason, raw)
    VALUES ($1, $2, $3, $4, $5, $6)
    RETURNING id
), changed AS (
    UPDATE deliveries AS d
    SET state = 'uncertain',
        last_reply_code = NULL,
        last_reply = 'the outcome could not be recorded; its evidence is set aside as #'
                     || kept.id || ' (mta queue set-aside): ' || $5,
        attempts = d.attempts + 1,
        last_attempt_at = now(),
        lease_owner = NULL,
        lease_expires_at = NULL,
        updated_at = now()
    FROM kept
    WHERE d.id = ANY($4::bigint[]) AND d.lease_owner = $2
    RETURNING d.id, d.last_reply
), events AS (
    INSERT INTO delivery_events (delivery_id, state, reply_code, detail, actor)
    SELECT id, 'uncertain', NULL, last_reply, $2 FROM changed
)
SELECT id FROM kept;

-- name: set_aside_list
-- The records set aside, newest first.
SELECT id, at, source, owner, attempt_id, delivery_ids, reason, raw
FROM set_aside ORDER BY id DESC LIMIT $1;

-- name: delivery_give_back
-- Return owner $1's leases on deliveries $2, unattempted (a graceful stop), due as they
-- were. Not an attempt: no evidence event, no attempt counted, no crash counted.
UPDATE deliveries
SET state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END,
    lease_owner = NULL,
    lease_expires_at = NULL,
    updated_at = now()
WHERE id = ANY($2::bigint[]) AND lease_owner = $1
RETURNING id;

-- name: delivery_release_unsent
-- Requeue deliveries leased to dead owner $1 ($2) that were certainly not sent ($3: why).
-- Each counts as a crash in flight; the $4th within $5 seconds holds it ('crash-loop'),
-- but only when it was alone in flight ($6): a death is pinned on it, not on whatever
-- happened to be in flight beside it.
WITH counted AS (
    SELECT id,
           CASE WHEN last_crash_at > now() - make_interval(secs => $5)
                THEN crash_count + 1 ELSE 1 END AS crashes
    FROM deliveries
    WHERE id = ANY($2::bigint[]) AND lease_owner = $1
    FOR UPDATE
), changed AS (
    UPDATE deliveries AS d
    SET state = CASE WHEN c.crashes >= $4 AND $6 THEN 'held' ELSE 'queued' END,
        hold_reason = CASE WHEN c.crashes >= $4 AND $6 THEN 'crash-loop' END,
        crash_count = c.crashes,
        last_crash_at = now(),
        lease_owner = NULL, lease_expires_at = NULL,
        next_attempt_at = now(), updated_at = now()
    FROM counted AS c
    WHERE d.id = c.id
    RETURNING d.id, d.state, d.crash_count
)
INSERT INTO delivery_events (delivery_id, state, detail, actor)
SELECT id, state,
       CASE WHEN state = 'held'
            THEN format('crash-loop: %s deaths with this delivery in flight, alone at the '
                        'last; %s', crash_count, $3::text)
            ELSE $3::text END,
       $1
FROM changed
RETURNING delivery_id;

-- name: delivery_operator_transition
-- An operator ($4, reason $5) moves deliveries $1 from any of states $2 to state $3, as
-- action $6 of node $7, with evidence $8 (the reason when null; it also becomes the last
-- reply): in the deliveries' timelines, and in the audit trail with what changed.
WITH changed AS (
    UPDATE deliveries
    SET state = $3,
        next_attempt_at = CASE WHEN $3 = 'queued' THEN now() ELSE next_attempt_at END,
        finished_at = CASE WHEN $3 IN ('delivered', 'failed') THEN now() END,
        possible_duplicate = possible_duplicate OR (state = 'uncertain' AND $3 = 'queued'),
        hold_reason = CASE WHEN $3 = 'held' THEN $5 END,
        last_reply = CASE WHEN $8::text IS NULL THEN last_reply ELSE $8::text END,
        last_reply_code = CASE WHEN $8::text IS NULL THEN last_reply_code END,
        updated_at = now()
    WHERE id = ANY($1::bigint[]) AND state = ANY($2::text[])
    RETURNING id, state
), events AS (
    INSERT INTO delivery_events (delivery_id, state, detail, actor)
    SELECT id, state, coalesce($8::text, $5), $4 FROM changed
), audited AS (
    INSERT INTO audit (node, operator, action, reason, requested, changed)
    SELECT $7, $4, $6, $5, $1::bigint[], coalesce(array_agg(id ORDER BY id), '{}')
    FROM changed
)
SELECT id AS delivery_id FROM changed;

-- name: node_mode_get
-- Node $1's mode, if one was ever set.
SELECT mode, reason, changed_by, changed_at, term FROM node_mode WHERE node = $1;

-- name: node_mode_set
-- Set node $1's mode to $2 (by $4, reason $3), audited as action 'mode:' || $2; the
-- node's processes hear of it on the mta_node_mode channel. A controller's change
-- carries its term $5 and is refused (no row) when the node accepted a newer term; an
-- operator's ($5 null) is always taken and leaves the stored term as it is.
WITH changed AS (
    INSERT INTO node_mode (node, mode, reason, changed_by, term) VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (node) DO UPDATE
    SET mode = EXCLUDED.mode, reason = EXCLUDED.reason, changed_by = EXCLUDED.changed_by,
        changed_at = now(), term = coalesce(EXCLUDED.term, node_mode.term)
    WHERE EXCLUDED.term IS NULL OR node_mode.term IS NULL OR node_mode.term <= EXCLUDED.term
    RETURNING mode, reason, changed_by, changed_at, term
), audited AS (
    INSERT INTO audit (node, operator, action, reason, requested, changed)
    SELECT $1, $4, 'mode:' || $2, $3, '{}', '{}' FROM changed
)
SELECT mode, reason, changed_by, changed_at, term
FROM changed, (SELECT pg_notify('mta_node_mode', $1)) AS notified;

-- name: audit_list
-- The node's audit trail, newest first, at most $1 records since $2.
SELECT id, at, node, operator, action, reason, requested, changed, result, counts::text
FROM audit WHERE at >= $2 ORDER BY id DESC LIMIT $1;

-- name: audit_insert
-- Record action $3 on node $1 by $2 (reason $4): its result $5 and counts $6 (JSON).
INSERT INTO audit (node, operator, action, reason, requested, changed, result, counts)
VALUES ($1, $2, $3, $4, '{}', '{}', $5, $6::jsonb);

-- name: audit_purge
-- Delete up to $2 audit records older than $1 seconds (retention.audit_after).
DELETE FROM audit
WHERE id IN (SELECT id FROM audit WHERE at < now() - make_interval(secs => $1)
             ORDER BY at LIMIT $2);

-- name: delivery_list_in_state
-- Deliveries in state $1 (oldest change first, at most $2), with their message's envelope.
SELECT d.id, d.message_id, m.mail_from, d.recipient, d.next_hop, d.state, d.attempts,
       d.last_reply_code, d.last_reply, d.possible_duplicate, d.hold_reason, d.updated_at
FROM deliveries AS d JOIN messages AS m ON m.id = d.message_id
WHERE d.state = $1
ORDER BY d.updated_at, d.id
LIMIT $2;

-- name: delivery_events_list
-- The evidence timeline of one delivery, oldest first.
SELECT at, state, reply_code, detail, actor, host
FROM delivery_events WHERE delivery_id = $1 ORDER BY id;

-- name: delivery_lease_owners
-- Owners (matching LIKE pattern $1) that hold leases now, with the ids they hold.
SELECT lease_owner, array_agg(id ORDER BY id) AS ids
FROM deliveries
WHERE state = 'leased' AND lease_owner LIKE $1
GROUP BY lease_owner;

-- name: journal_owner_register
-- Record that owner $1 writes its journal to the journal directory with identity $2.
INSERT INTO journal_owners (owner, journal_id) VALUES ($1, $2)
ON CONFLICT (owner) DO NOTHING;

-- name: journal_owners_get
-- The journal identities of the owners in $1 that registered one.
SELECT owner, journal_id FROM journal_owners WHERE owner = ANY($1::text[]);

-- name: journal_owner_purge
-- Forget up to $2 owners registered more than $1 seconds ago that hold no lease.
DELETE FROM journal_owners
WHERE owner IN (SELECT o.owner FROM journal_owners AS o
                WHERE o.registered_at < now() - make_interval(secs => $1)
                  AND NOT EXISTS (SELECT 1 FROM deliveries AS d
                                  WHERE d.state = 'leased' AND d.lease_owner = o.owner)
                ORDER BY o.registered_at LIMIT $2);

-- name: message_mark_done
-- Mark the messages of deliveries $1 done once every delivery of theirs is final here
-- (delivered, failed, or rerouted to another node).
UPDATE messages AS m
SET done_at = now()
WHERE m.id IN (SELECT message_id FROM deliveries WHERE id = ANY($1::bigint[]))
  AND m.done_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM deliveries AS d
                  WHERE d.message_id = m.id
                    AND d.state NOT IN ('delivered', 'failed', 'rerouted'));

-- name: message_purge_bodies
-- Drop the bodies of up to $2 messages done for more than $1 seconds (metadata stays).
UPDATE messages
SET body = ''::bytea, body_encoding = 'identity', trace_headers = ''::bytea,
    body_purged_at = now()
WHERE id IN (SELECT id FROM messages
             WHERE done_at IS NOT NULL AND body_purged_at IS NULL
               AND done_at < now() - make_interval(secs => $1)
             ORDER BY done_at LIMIT $2);

-- name: message_purge
-- Delete up to $2 messages done for more than $1 seconds, with their deliveries and events.
DELETE FROM messages
WHERE id IN (SELECT id FROM messages
             WHERE done_at IS NOT NULL AND done_at < now() - make_interval(secs => $1)
             ORDER BY done_at LIMIT $2);

-- name: deliveries_notify
-- Tell listening delivery workers (on any process or node of this store) there is work.
SELECT pg_notify('mta_new_work', $1);

-- Reroute (DESIGN.md, "Reroute is a handoff with receipts"). On the source: a run holds
-- the source's reroute lock for as long as it works, so the handoffs of any other run
-- it finds are a dead run's, to finish. A handoff is a lease whose owner is the run
-- ('reroute:<run id>') and whose reroute_target names where the copy goes; delivery
-- recovery matches only its node's own owner prefix and never touches it.

-- name: reroute_lock
-- Take the source node $1's reroute lock for this session, if no other run holds it.
SELECT pg_try_advisory_lock(71231603, hashtext($1));

-- name: reroute_adopt
-- Take over for run $1 (for $3 seconds) up to $2 handoffs that dead runs left, with
-- what a copy needs; each keeps the target it was leased for (a copy may be there).
WITH taken AS (
    SELECT id FROM deliveries
    WHERE state = 'leased' AND reroute_target IS NOT NULL AND lease_owner LIKE 'reroute:%'
      AND lease_owner <> $1
    ORDER BY id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE deliveries AS d
SET lease_owner = $1, lease_expires_at = now() + make_interval(secs => $3), updated_at = now()
FROM taken, messages AS m
WHERE d.id = taken.id AND m.id = d.message_id
RETURNING d.id, d.message_id, d.recipient, d.next_hop, d.attempts, d.last_reply_code,
          d.last_reply, d.possible_duplicate, d.reroute_target, m.size_bytes;

-- name: reroute_lease
-- Lease to run $1 for $3 seconds up to $2 pending deliveries (queued or deferred, due or
-- not), with the other pending deliveries of their messages, so a message moves whole.
-- Each message goes to one of the targets $4, spread by message id. Locked rows (a
-- delivery worker's claim in progress) are skipped: the two never take the same row.
WITH first AS (
    SELECT id, message_id FROM deliveries
    WHERE state IN ('queued', 'deferred')
    ORDER BY next_attempt_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), siblings AS (
    -- A lateral probe by message (see delivery_claim_due for why the CASE).
    SELECT sibling.id FROM first
    CROSS JOIN LATERAL (
        SELECT d.id FROM deliveries AS d
        WHERE d.message_id = first.message_id
          AND CASE WHEN d.state IN ('queued', 'deferred') THEN true ELSE false END
        FOR UPDATE SKIP LOCKED
    ) AS sibling
)
UPDATE deliveries AS d
SET state = 'leased', lease_owner = $1,
    lease_expires_at = now() + make_interval(secs => $3), updated_at = now(),
    reroute_target = ($4::text[])[1 + mod(hashtext(d.message_id::text)::bigint + 2147483648,
                                          cardinality($4::text[]))]
FROM messages AS m
WHERE d.id = ANY(ARRAY(SELECT id FROM first UNION SELECT id FROM siblings))
  AND m.id = d.message_id
RETURNING d.id, d.message_id, d.recipient, d.next_hop, d.attempts, d.last_reply_code,
          d.last_reply, d.possible_duplicate, d.reroute_target, m.size_bytes;

-- name: reroute_contents
-- Messages $1 as a copy needs them: envelope, trace data, body (as stored, with its
-- encoding: a copy keeps it) and arrival time.
SELECT id, mail_from, size_bytes, trace_headers, body, body_encoding, client_address,
       helo_name, auth_user, message_id_header, received_at
FROM messages WHERE id = ANY($1::uuid[]);

-- name: reroute_receipt
-- Run $1's receipts: deliveries $2 have copies in messages $3 of the targets they were
-- leased for. They become 'rerouted', with the receipt in their timelines.
WITH receipt AS (
    SELECT * FROM unnest($2::bigint[], $3::uuid[]) AS r (id, target_message)
), changed AS (
    UPDATE deliveries AS d
    SET state = 'rerouted', rerouted_to_message = r.target_message,
        lease_owner = NULL, lease_expires_at = NULL, finished_at = now(), updated_at = now()
    FROM receipt AS r
    WHERE d.id = r.id AND d.lease_owner = $1
    RETURNING d.id, d.reroute_target, d.rerouted_to_message
), events AS (
    INSERT INTO delivery_events (delivery_id, state, detail, actor)
    SELECT id, 'rerouted', 'rerouted to node ' || reroute_target || ' as message '
                           || rerouted_to_message, $1
    FROM changed
)
SELECT id FROM changed;

-- name: reroute_release
-- Give back run $1's handoffs $2 that no target was ever asked to copy, as they were.
UPDATE deliveries
SET state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END,
    lease_owner = NULL, lease_expires_at = NULL, reroute_target = NULL, updated_at = now()
WHERE id = ANY($2::bigint[]) AND lease_owner = $1
RETURNING id;

-- name: reroute_skipped
-- What a reroute leaves behind on the source, by state: work in flight, an operator's
-- business, and other runs' handoffs.
SELECT
    (SELECT count(*) FROM deliveries
     WHERE state = 'leased' AND reroute_target IS NULL) AS leased,
    (SELECT count(*) FROM deliveries WHERE state = 'uncertain') AS uncertain,
    (SELECT count(*) FROM deliveries WHERE state = 'held') AS held,
    (SELECT count(*) FROM deliveries
     WHERE state = 'leased' AND reroute_target IS NOT NULL) AS in_handoff;

-- On the target: the copies. The unique keys (origin_node, origin_message) and
-- (message_id, origin_delivery) make a second handoff find the first.

-- name: handoff_insert_messages
-- Copies of messages node $1 hands over: new ids $2 for origins $3 with their envelope,
-- trace data, body and arrival time (the lifetime does not restart). A copy an earlier
-- run made is found, not made twice. Returns each origin's copy.
WITH incoming AS (
    SELECT * FROM unnest($2::uuid[], $3::uuid[], $4::text[], $5::bigint[], $6::bytea[],
                         $7::bytea[], $8::text[], $9::text[], $10::text[], $11::text[],
                         $12::timestamptz[], $13::text[])
        AS i (id, origin, mail_from, size_bytes, trace_headers, body, client_address,
              helo_name, auth_user, message_id_header, received_at, body_encoding)
), inserted AS (
    INSERT INTO messages (id, mail_from, size_bytes, trace_headers, body, client_address,
                          helo_name, auth_user, message_id_header, received_at,
                          origin_node, origin_message, body_encoding)
    SELECT id, mail_from, size_bytes, trace_headers, body, client_address, helo_name,
           auth_user, message_id_header, received_at, $1, origin, body_encoding
    FROM incoming
    ON CONFLICT (origin_node, origin_message) WHERE origin_node IS NOT NULL DO NOTHING
    RETURNING id, origin_message
)
SELECT origin_message AS origin, id FROM inserted
UNION ALL
SELECT m.origin_message AS origin, m.id
FROM messages AS m JOIN incoming AS i ON m.origin_node = $1 AND m.origin_message = i.origin;

-- name: handoff_insert_deliveries
-- The deliveries node $1 hands over (origin message $2, origin delivery $3, recipient,
-- next hop, attempts and last evidence so far), under their messages' copies and due at
-- once (the source's backoff described the source's path); run $10 is the actor. One
-- handed over before is not added twice. Returns how many were added.
WITH incoming AS (
    SELECT * FROM unnest($2::uuid[], $3::bigint[], $4::text[], $5::text[], $6::integer[],
                         $7::integer[], $8::text[], $9::boolean[])
        AS i (origin_message, origin_delivery, recipient, next_hop, attempts,
              last_reply_code, last_reply, possible_duplicate)
), added AS (
    INSERT INTO deliveries (message_id, recipient, next_hop, attempts, last_reply_code,
                            last_reply, possible_duplicate, origin_delivery)
    SELECT m.id, i.recipient, i.next_hop, i.attempts, i.last_reply_code, i.last_reply,
           i.possible_duplicate, i.origin_delivery
    FROM incoming AS i
    JOIN messages AS m ON m.origin_node = $1 AND m.origin_message = i.origin_message
    ON CONFLICT (message_id, origin_delivery) WHERE origin_delivery IS NOT NULL DO NOTHING
    RETURNING id, message_id
), events AS (
    INSERT INTO delivery_events (delivery_id, state, detail, actor)
    SELECT id, 'queued', 'rerouted here from node ' || $1, $10 FROM added
), reopened AS (
    UPDATE messages SET done_at = NULL
    WHERE id IN (SELECT message_id FROM added) AND done_at IS NOT NULL
)
SELECT count(*) FROM added;

-- Queue tools (mta queue summary | list | show | retry | hold | release | delete). Every
-- statement on deliveries with work left names its states as constants, so that each
-- walks its state's partial index (deliveries_due, deliveries_lease_expiry,
-- deliveries_needs_operator) and never reads delivered or failed history.

-- name: queue_summary
-- Deliveries with work left by state, next hop and message age bucket (the index of the
-- first bound in minutes $1 the age is below; 0 under the first), with their messages'
-- bytes (a message counts once per delivery). The deliveries side is an index-only scan
-- of the pending rows (deliveries_pending_shape): no delivery history is read.
SELECT d.state, d.next_hop,
       width_bucket(extract(epoch FROM now() - m.received_at)::float8 / 60,
                    $1::float8[]) AS bucket,
       count(*) AS count, sum(m.size_bytes)::bigint AS bytes
FROM deliveries AS d JOIN messages AS m ON m.id = d.message_id
WHERE d.state IN ('queued', 'deferred', 'leased', 'uncertain', 'held')
  AND m.done_at IS NULL
GROUP BY 1, 2, 3;

-- name: delivery_filter
-- Deliveries in state $1 (one state per call: a constant in the plan, so its partial
-- index serves it) at next hop $2 (any when null), of messages received more than $3
-- seconds ago from sender $4 (any when null; case-insensitive), oldest message first,
-- at most $5, with their message's envelope.
SELECT d.id, d.message_id, m.mail_from, d.recipient, d.next_hop, d.state, d.attempts,
       d.last_reply_code, d.last_reply, d.possible_duplicate, d.hold_reason, d.updated_at,
       d.next_attempt_at, d.last_attempt_at, m.received_at, m.size_bytes, d.last_host,
       d.last_attempt_started_at, d.last_dot_at, d.last_reply_lost_at
FROM deliveries AS d JOIN messages AS m ON m.id = d.message_id
WHERE d.state = $1 AND ($2::text IS NULL OR d.next_hop = $2)
  AND m.received_at <= now() - make_interval(secs => $3)
  AND ($4::text IS NULL OR lower(m.mail_from) = lower($4::text))
ORDER BY m.received_at, d.id
LIMIT $5;

-- name: delivery_ids_of_messages
-- The deliveries of messages $1 in any of states $2.
SELECT id FROM deliveries
WHERE message_id = ANY($1::uuid[]) AND state = ANY($2::text[]) ORDER BY id;

-- name: delivery_states_of
-- The state of each of deliveries $1 (those that exist).
SELECT id, state FROM deliveries WHERE id = ANY($1::bigint[]);

-- name: message_of_delivery
-- The message delivery $1 belongs to.
SELECT message_id FROM deliveries WHERE id = $1;

-- name: messages_by_header
-- Messages whose Message-ID header is $1 (angle brackets optional), oldest first. No
-- index: it reads the messages table (an operator's look-up, not a node's).
SELECT id FROM messages
WHERE message_id_header IN ($1, '<' || trim(BOTH '<>' FROM $1) || '>')
ORDER BY received_at, id
LIMIT 100;

-- name: delivery_bounce_sources
-- What a DSN for deliveries $1 needs: each one's recipient and its message's envelope,
-- added trace headers and the first $2 bytes of its body (a compressed body whole, to be
-- decoded by the caller).
SELECT d.id, d.recipient, d.message_id, m.mail_from, m.received_at, m.trace_headers,
       m.body_encoding,
       CASE WHEN m.body_encoding = 'identity' THEN substring(m.body FROM 1 FOR $2)
            ELSE m.body END AS head
FROM deliveries AS d JOIN messages AS m ON m.id = d.message_id
WHERE d.id = ANY($1::bigint[])
ORDER BY d.message_id, d.id;
