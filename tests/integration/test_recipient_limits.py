"""Recipients per transaction (issue 13): a message to many recipients at one destination
goes out in transactions of at most ``recipients_per_transaction`` RCPTs, and a ``452``
to RCPT (too many recipients) sends the rest in the next transaction on the same
connection at once, against a real sink that limits recipients."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from mta.config import Settings
from mta.queue import Store
from tests.support.delivery import submit_tagged
from tests.support.intake import store_of
from tests.support.nodes import NodeHandle, start_node, wait_for
from tests.support.sink import Faults, Sink, running_sink


def to_sink(make_settings: Callable[..., Settings], sink: Sink, **route: Any) -> Settings:
    return make_settings(delivery={
        "enabled": True, "poll_interval": 60.0,
        "routes": [{"domain": "*", "host": "127.0.0.1", "port": sink.port, "tls": "none",
                    **route}],
    })


async def _all_delivered(store: Store, message_id: uuid.UUID) -> bool:
    return {d.state for d in await store.deliveries(message_id)} == {"delivered"}


async def _send(node: NodeHandle, sink: Sink, tag: str, count: int, *,
                domains: int = 1) -> list[str]:
    recipients = [f"r{n}@d{n % domains}.bulk.example" for n in range(count)]
    message_id = await submit_tagged(node.port, tag, recipients=recipients)
    await wait_for(lambda: _all_delivered(store_of(node), message_id), timeout=20)
    deliveries = await store_of(node).deliveries(message_id)
    assert {d.attempts for d in deliveries} == {1}, "each went out on its first attempt"
    assert not sink.duplicates() and not sink.missing(
        (f"{tag}@test", rcpt) for rcpt in recipients)
    return recipients


async def test_a_message_to_120_recipients_goes_out_in_transactions_of_50(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_sink() as sink:
        node = await start_node(to_sink(make_settings, sink))
        try:
            await _send(node, sink, "wide", 120)
        finally:
            await node.stop()
    assert sorted(len(t.recipients) for t in sink.transactions) == [20, 50, 50]
    assert sink.connections == 1, "one session carries the transactions"


async def test_a_route_sets_its_own_recipients_per_transaction(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_sink() as sink:
        node = await start_node(to_sink(make_settings, sink, recipients_per_transaction=7))
        try:
            await _send(node, sink, "narrow", 30)
        finally:
            await node.stop()
    assert sorted(len(t.recipients) for t in sink.transactions) == [2, 7, 7, 7, 7]


async def test_a_smarthost_carries_recipients_of_many_domains_in_one_transaction(
    make_settings: Callable[..., Settings],
) -> None:
    """Grouping follows the route, as Postfix's queue per next hop does: 120 recipients
    over 6 domains, all through the ``*`` route, are 50 + 50 + 20 RCPTs, not 6 of 20."""
    async with running_sink() as sink:
        node = await start_node(to_sink(make_settings, sink))
        try:
            await _send(node, sink, "mixed", 120, domains=6)
        finally:
            await node.stop()
    assert sorted(len(t.recipients) for t in sink.transactions) == [20, 50, 50]


async def test_domains_with_routes_of_their_own_get_transactions_of_their_own(
    make_settings: Callable[..., Settings],
) -> None:
    """Two routes to the same host stay apart: each route's own settings (here its
    recipients per transaction) apply to its recipients only."""
    async with running_sink() as sink:
        routes = [{"domain": f"d{n}.bulk.example", "host": "127.0.0.1", "port": sink.port,
                   "tls": "none", "recipients_per_transaction": 50 - 20 * n}
                  for n in range(2)]
        node = await start_node(make_settings(delivery={
            "enabled": True, "poll_interval": 60.0, "routes": routes}))
        try:
            await _send(node, sink, "apart", 80, domains=2)
        finally:
            await node.stop()
    per_domain = sorted((t.recipients[0].split("@")[1], len(t.recipients))
                        for t in sink.transactions)
    assert per_domain == [("d0.bulk.example", 40), ("d1.bulk.example", 10),
                          ("d1.bulk.example", 30)], per_domain
    assert all(len({r.split("@")[1] for r in t.recipients}) == 1 for t in sink.transactions)


async def test_a_452_to_rcpt_sends_the_rest_in_the_next_transaction_at_once(
    make_settings: Callable[..., Settings],
) -> None:
    """The sink takes 30 recipients per transaction and the node offers 100: it answers
    452 4.5.3 past 30, and the node sends those next, on the same connection, with no
    deferral (each delivery is delivered on its first attempt)."""
    async with running_sink(faults=Faults(max_recipients=30)) as sink:
        node = await start_node(to_sink(make_settings, sink,
                                        recipients_per_transaction=100))
        try:
            await _send(node, sink, "limited", 100)
        finally:
            await node.stop()
    assert [len(t.recipients) for t in sink.transactions] == [30, 30, 30, 10]
    assert sink.connections == 1


async def test_a_452_to_every_rcpt_defers_as_a_4xx(
    make_settings: Callable[..., Settings],
) -> None:
    """With no recipient taken, 452 is the server's trouble (storage), not a limit: the
    deliveries are deferred with the reply as evidence, not retried in a loop."""
    async with running_sink(faults=Faults(max_recipients=0)) as sink:
        node = await start_node(to_sink(make_settings, sink))
        try:
            message_id = await submit_tagged(
                node.port, "full", recipients=[f"r{n}@bulk.example" for n in range(3)])

            async def deferred() -> bool:
                states = {d.state for d in await store_of(node).deliveries(message_id)}
                return states == {"deferred"}

            await wait_for(deferred, timeout=20)
            deliveries = await store_of(node).deliveries(message_id)
        finally:
            await node.stop()
    assert all("452 4.5.3" in (d.last_reply or "") for d in deliveries)
    assert {d.attempts for d in deliveries} == {1}
    assert not sink.transactions
