-- When the last attempt started, when it wrote the final dot of DATA and when it lost
-- the reply (issue 12): mta queue uncertain shows them, so an operator choosing between
-- resend and mark-delivered sees how long the remote had the whole message.
ALTER TABLE deliveries
    ADD COLUMN last_attempt_started_at timestamptz,
    ADD COLUMN last_dot_at timestamptz,
    ADD COLUMN last_reply_lost_at timestamptz;
