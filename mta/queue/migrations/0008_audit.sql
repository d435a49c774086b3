-- The node's own audit trail (DESIGN.md, Audit): every operator action on this store,
-- append-only. No foreign key: message retention never cascades into it; records go
-- only after retention.audit_after.
CREATE TABLE audit (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    node        text        NOT NULL,
    operator    text        NOT NULL,
    action      text        NOT NULL,
    reason      text        NOT NULL,
    -- What the action asked for, and what it changed.
    requested   bigint[]    NOT NULL,
    changed     bigint[]    NOT NULL
);
CREATE INDEX audit_at ON audit (at);
