-- Deliveries rerouted off and onto this store, counted per minute for the node's
-- metrics (issue 12) without reading the rest of the deliveries: rerouted rows are few.
CREATE INDEX deliveries_rerouted_at ON deliveries (updated_at) WHERE state = 'rerouted';
CREATE INDEX deliveries_rerouted_here_at ON deliveries (created_at)
    WHERE origin_delivery IS NOT NULL;
