-- A claim brings each claimed delivery's due siblings at the same next hop: with the
-- next hop in the message index, that lookup reads the siblings alone, not every
-- recipient of the message (a newsletter to 100 domains read 100 entries per claimed
-- row). Lookups by message alone use the leading column as before.
DROP INDEX deliveries_message;
CREATE INDEX deliveries_message ON deliveries (message_id, next_hop);
