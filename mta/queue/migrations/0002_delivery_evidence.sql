-- Evidence for every delivery state (I2): the outcome columns on the delivery, and an
-- append-only timeline of what happened to it and who did it.

ALTER TABLE deliveries
    ADD COLUMN possible_duplicate boolean     NOT NULL DEFAULT false,
    ADD COLUMN hold_reason        text,
    ADD COLUMN last_attempt_at    timestamptz,
    ADD COLUMN finished_at        timestamptz;

CREATE TABLE delivery_events (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id bigint      NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    at          timestamptz NOT NULL DEFAULT now(),
    state       text        NOT NULL,     -- the state this event left the delivery in
    reply_code  integer,                  -- the remote reply's code, if any
    detail      text        NOT NULL,     -- the remote reply, the error, or the reason
    actor       text        NOT NULL      -- the lease owner, or the operator
);
CREATE INDEX delivery_events_delivery ON delivery_events (delivery_id, id);
-- Operators list these states; the index keeps that cheap at any queue length.
CREATE INDEX deliveries_needs_operator ON deliveries (updated_at)
    WHERE state IN ('uncertain', 'held');
