-- Each lease owner's journal (DESIGN.md I3, missing evidence is uncertain): the identity
-- of the journal directory it writes to, recorded before it claims anything. Recovery
-- trusts "no dot pending" only from that same journal; a lease whose owner's journal is
-- gone or another one becomes uncertain.
CREATE TABLE journal_owners (
    owner         text        PRIMARY KEY,
    journal_id    text        NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX journal_owners_registered ON journal_owners (registered_at);
