-- The fleet's audit log (DESIGN.md, Audit; I9): every fleet action, append-only, in the
-- schema mta_fleet (the connection's search path), so a fleet database may share a
-- database with a node store. record_id is the action's own id: a record copied in from
-- an operator's spool twice is stored once.
CREATE TABLE fleet_audit (
    id        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        timestamptz NOT NULL,
    node      text        NOT NULL,
    operator  text        NOT NULL,
    action    text        NOT NULL,
    reason    text        NOT NULL,
    result    text        NOT NULL,
    counts    jsonb       NOT NULL DEFAULT '{}',
    record_id uuid        NOT NULL UNIQUE
);
CREATE INDEX fleet_audit_at ON fleet_audit (at);
CREATE INDEX fleet_audit_node_at ON fleet_audit (node, at);
