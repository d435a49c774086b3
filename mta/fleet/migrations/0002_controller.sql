-- The fleet controller (issue 11): one row of shared state. term counts leaderships
-- (each new leader takes the next one: its fencing token); paused stops every
-- controller's actions fleet-wide until resumed (both audited in fleet_audit).
CREATE TABLE controller_state (
    id            boolean     PRIMARY KEY DEFAULT true CHECK (id),
    term          bigint      NOT NULL DEFAULT 0,
    leader        text,
    leader_since  timestamptz,
    paused        boolean     NOT NULL DEFAULT false,
    paused_reason text,
    paused_by     text,
    paused_at     timestamptz
);
INSERT INTO controller_state DEFAULT VALUES;
