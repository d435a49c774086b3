-- The remote host each attempt talked to (issue 12): on the delivery (the last one) and
-- on each evidence event, so mta queue show and uncertain can name it.
ALTER TABLE deliveries ADD COLUMN last_host text;
ALTER TABLE delivery_events ADD COLUMN host text;
