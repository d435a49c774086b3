-- A node's operating mode (DESIGN.md, Node modes; I8): active, draining or isolated. The
-- store is authoritative; the node mirrors it in a state file in its data directory.
CREATE TABLE node_mode (
    node       text        PRIMARY KEY,
    mode       text        NOT NULL CHECK (mode IN ('active', 'draining', 'isolated')),
    reason     text        NOT NULL,
    changed_by text        NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);
