-- Fencing for the fleet controller (issue 11): the last controller term a node's mode
-- accepted. A controller's change with an older term is refused; an operator's change
-- carries no term and leaves it as it is.
ALTER TABLE node_mode ADD COLUMN term bigint;
