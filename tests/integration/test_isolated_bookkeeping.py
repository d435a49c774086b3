"""An isolated node sends nothing, but still writes down what already happened: leases a
claim left behind while the store failed go back to the queue (nothing was sent for
them), so that a reroute can move them (found by the seed-1 drill)."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from mta.config import Settings
from tests.support.fleet import enqueue_tagged
from tests.support.intake import running_node, store_of
from tests.support.nodes import free_port, wait_for


async def test_an_isolated_node_releases_leases_a_failed_claim_left(
    make_settings: Callable[..., Settings], db_dsn: str,
) -> None:
    settings = make_settings(delivery={
        "enabled": True, "poll_interval": 0.1,
        "routes": [{"domain": "*", "host": "127.0.0.1", "port": free_port(), "tls": "none"}]})
    async with running_node(settings) as node:
        store = store_of(node)
        await store.set_node_mode(settings.node.name, "isolated", "drill", "alice")
        await wait_for(lambda: node.node.modes.mode == "isolated", timeout=10)
        deliverer = node.node.deliverer
        assert deliverer is not None
        await enqueue_tagged(store, ["orphan"])  # an isolated node takes no new mail
        (listing,) = await store.deliveries_in_state("queued")
        message = listing.message_id
        (delivery,) = await store.deliveries(message)
        conn = await asyncpg.connect(db_dsn)
        try:  # a claim that committed while its answer was lost: the process never knew
            await conn.execute("UPDATE deliveries SET state = 'leased', lease_owner = $1, "
                               "lease_expires_at = now() + interval '1 hour' WHERE id = $2",
                               deliverer.owner, delivery.id)
        finally:
            await conn.close()
        deliverer.settler.orphans_possible = True

        async def released() -> bool:
            (now,) = await store.deliveries(message)
            return now.state == "deferred"

        await wait_for(released, timeout=10)
        assert node.node.modes.mode == "isolated"
