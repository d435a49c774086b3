-- Records that could not be applied (DESIGN.md I3b): an attempt's outcomes the store
-- refused, kept with their raw evidence for the operator and never retried. Their
-- deliveries become uncertain. No foreign key: message retention never removes them.
CREATE TABLE set_aside (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    source       text        NOT NULL CHECK (source IN ('settlement', 'replay')),
    owner        text        NOT NULL,
    attempt_id   text        NOT NULL,
    delivery_ids bigint[]    NOT NULL,
    reason       text        NOT NULL,
    raw          bytea       NOT NULL
);
CREATE INDEX set_aside_at ON set_aside (at);
