-- Reroute, a handoff with receipts (DESIGN.md): a copy on the target is keyed by where
-- it came from, so a second insert finds the first; the source's deliveries keep the
-- receipt (the target node and its message id) once they are 'rerouted'.
ALTER TABLE messages
    ADD COLUMN origin_node    text,
    ADD COLUMN origin_message uuid;
CREATE UNIQUE INDEX messages_origin ON messages (origin_node, origin_message)
    WHERE origin_node IS NOT NULL;

ALTER TABLE deliveries
    -- On a target: the source's delivery this one continues.
    ADD COLUMN origin_delivery     bigint,
    -- On a source: where a reroute run is handing this delivery (set with its lease,
    -- before the target holds a copy), then where it went (the receipt).
    ADD COLUMN reroute_target      text,
    ADD COLUMN rerouted_to_message uuid;
CREATE UNIQUE INDEX deliveries_origin ON deliveries (message_id, origin_delivery)
    WHERE origin_delivery IS NOT NULL;
-- A reroute run finds the handoffs a dead run left without a scan.
CREATE INDEX deliveries_reroute_leases ON deliveries (lease_owner)
    WHERE state = 'leased' AND reroute_target IS NOT NULL;

-- The audit trail says how an action ended and what it counted.
ALTER TABLE audit
    ADD COLUMN result text  NOT NULL DEFAULT 'ok',
    ADD COLUMN counts jsonb NOT NULL DEFAULT '{}';

-- Deliveries per minute (mta fleet status) count recent deliveries from this index.
CREATE INDEX deliveries_delivered_at ON deliveries (finished_at) WHERE state = 'delivered';
