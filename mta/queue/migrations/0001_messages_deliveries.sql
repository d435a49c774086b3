-- The pending-message store: a message holds its envelope and body once, a
-- delivery (one per recipient) holds the state of that recipient.

CREATE TABLE messages (
    id                uuid        PRIMARY KEY,
    mail_from         text        NOT NULL,            -- '' is the null sender
    size_bytes        bigint      NOT NULL CHECK (size_bytes >= 0),
    trace_headers     bytea       NOT NULL,            -- Received:/Message-ID: we added
    body              bytea       NOT NULL,            -- exactly as the client sent it
    client_address    text        NOT NULL,
    helo_name         text        NOT NULL,
    auth_user         text,
    message_id_header text,
    received_at       timestamptz NOT NULL DEFAULT now(),
    done_at           timestamptz                       -- every delivery is final
);
-- Bodies are already-encoded mail: compressing them costs CPU for little gain.
ALTER TABLE messages ALTER COLUMN body SET STORAGE EXTERNAL;
-- Queued bytes for admission control come from this index alone.
CREATE INDEX messages_pending ON messages (received_at) INCLUDE (size_bytes)
    WHERE done_at IS NULL;

CREATE TABLE deliveries (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id       uuid        NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    recipient        text        NOT NULL,
    next_hop         text        NOT NULL,
    state            text        NOT NULL DEFAULT 'queued',
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_owner      text,
    lease_expires_at timestamptz,
    last_reply_code  integer,
    last_reply       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT deliveries_state_known CHECK (state IN (
        'queued', 'leased', 'deferred', 'delivered', 'failed', 'uncertain', 'held', 'rerouted')),
    CONSTRAINT deliveries_lease_iff_leased CHECK (
        (state = 'leased') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL))
);
-- Claiming due work walks this index in order: no scan, no sort, at any queue length.
CREATE INDEX deliveries_due ON deliveries (next_attempt_at)
    WHERE state IN ('queued', 'deferred');
CREATE INDEX deliveries_message ON deliveries (message_id);
CREATE INDEX deliveries_lease_expiry ON deliveries (lease_expires_at)
    WHERE state = 'leased';

-- Deliveries churn (every attempt updates a row): vacuum them early and often.
ALTER TABLE deliveries SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02,
    fillfactor = 80
);
ALTER TABLE messages SET (autovacuum_vacuum_scale_factor = 0.05);
