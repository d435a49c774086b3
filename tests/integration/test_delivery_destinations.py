"""Destinations that misbehave: one that hangs must not starve the others, and one that
fails at random must end with every delivery delivered or uncertain, never silently twice."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from mta.config import Settings
from mta.queue import Store
from tests.support.admin import metric
from tests.support.delivery import only_state, submit_tagged
from tests.support.intake import store_of
from tests.support.nodes import NodeHandle, start_node, wait_for
from tests.support.sink import Faults, Sink, running_sink


async def submit(node: NodeHandle, rcpt: str, tag: str) -> uuid.UUID:
    return await submit_tagged(node.port, tag, recipients=[rcpt])


async def state(node: NodeHandle, message_id: uuid.UUID) -> str:
    return await only_state(store_of(node), message_id)


def next_to_hung(make_settings: Callable[..., Settings], hung: Sink, healthy: Sink,
                 **delivery: Any) -> Settings:
    """Mail for hung.example goes to ``hung``, the rest to ``healthy``; one connection
    per destination, a 60 s poll (only wake-ups deliver in time)."""
    return make_settings(delivery={
        "enabled": True, "poll_interval": 60.0, "max_connections_per_destination": 1,
        "routes": [
            {"domain": "hung.example", "host": "127.0.0.1", "port": hung.port, "tls": "none"},
            {"domain": "*", "host": "127.0.0.1", "port": healthy.port, "tls": "none"},
        ],
        **delivery,
    })


async def test_a_hung_destination_does_not_hold_up_a_healthy_one(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_sink(faults=Faults(hang=True), hang_limit=30) as hung, \
            running_sink() as healthy:
        node = await start_node(next_to_hung(make_settings, hung, healthy,
                                             data_end_timeout=3.0))
        try:
            stuck = [await submit(node, f"u{n}@hung.example", f"h{n}") for n in range(3)]
            await hung.wait_for_count(1, timeout=5)
            fine = [await submit(node, f"u{n}@fine.example", f"f{n}") for n in range(10)]
            await healthy.wait_for_count(10, timeout=5)
            for message_id in fine:
                await wait_for(lambda m=message_id: _is(node, m, "delivered"), timeout=5)
            assert await state(node, stuck[0]) == "leased", \
                "the healthy mail went through while the hung attempt still waited"
            # One connection at a time to the hung destination: its first attempt ends in a
            # timeout, recorded as the evidence; the destination then cools off as dead.
            await wait_for(lambda: _is(node, stuck[0], "uncertain"), timeout=10)
            (evidence,) = await store_of(node).deliveries(stuck[0])
            assert "timeout waiting for reply to end of data" in (evidence.last_reply or "")
            shaped = node.node.deliverer
            assert shaped is not None
            hung_key = f"route:127.0.0.1:{hung.port}/none"
            assert shaped.attempts.shaper.state(hung_key).failures
            hung.release()
        finally:
            await node.stop()


async def _is(node: NodeHandle, message_id: uuid.UUID, wanted: str) -> bool:
    return await state(node, message_id) == wanted


async def test_a_backlog_for_a_hung_destination_does_not_fill_the_workers(
    make_settings: Callable[..., Settings],
) -> None:
    """60 messages for a hung destination are queued before 10 healthy ones, in claims
    of 5: the node keeps only a few groups of the hung one in hand and its claims skip
    the rest, so the healthy mail behind them goes out at once."""
    async with running_sink(faults=Faults(hang=True), hang_limit=30) as hung, \
            running_sink() as healthy:
        node = await start_node(next_to_hung(make_settings, hung, healthy,
                                             data_end_timeout=20.0, batch_size=5))
        try:
            stuck = [await submit(node, f"u{n}@hung.example", f"b{n}") for n in range(60)]
            await hung.wait_for_count(1, timeout=5)
            fine = [await submit(node, f"u{n}@fine.example", f"g{n}") for n in range(10)]
            await healthy.wait_for_count(10, timeout=10)
            for message_id in fine:
                await wait_for(lambda m=message_id: _is(node, m, "delivered"), timeout=5)
            states = [await state(node, m) for m in stuck]
            assert states.count("leased") <= 5, states
            assert states.count("queued") >= 55, "left in the queue, not attempted"
            assert len(hung.transactions) == 1, "one connection: one attempt hangs"
            hung.release()
        finally:
            await node.stop()


async def test_a_flaky_destination_ends_delivered_or_uncertain_never_twice(
    make_settings: Callable[..., Settings],
) -> None:
    faults = Faults(tempfail=0.25, drop_mid_data=0.1, drop_after_dot=0.1)
    async with running_sink(faults=faults, seed=7) as sink:
        node = await start_node(make_settings(delivery={
            "enabled": True, "poll_interval": 0.2, "minimal_backoff": 0.1,
            "maximal_backoff": 0.4,
            "routes": [{"domain": "*", "host": "127.0.0.1", "port": sink.port, "tls": "none"}],
        }))
        try:
            sent = {f"m{n}": await submit(node, f"r{n}@example.com", f"m{n}") for n in range(40)}
            final = {"delivered", "uncertain"}

            async def settled() -> bool:
                return all([await state(node, m) in final for m in sent.values()])

            await wait_for(settled, timeout=60)
            outcome = {tag: await state(node, m) for tag, m in sent.items()}
        finally:
            await node.stop()
    assert sink.duplicates() == {} or not sink.duplicates(), sink.duplicates()
    for n, tag in enumerate(sent):
        received = sink.count(f"{tag}@test", f"r{n}@example.com")
        assert received <= 1, (tag, received)
        if outcome[tag] == "delivered":
            assert received == 1, f"{tag} is delivered but the sink never got it"
        elif received:
            assert outcome[tag] == "uncertain"
    assert "delivered" in outcome.values() and "uncertain" in outcome.values()
    deferred_then_delivered = [tag for tag, m in sent.items() if outcome[tag] == "delivered"]
    assert deferred_then_delivered


async def test_a_flaky_destination_on_a_retry_route_ends_delivered_with_duplicates_marked(
    make_settings: Callable[..., Settings],
) -> None:
    """A route set to ``retry`` resends after a lost reply to the dot: everything ends
    delivered, and every delivery the sink got twice carries ``possible_duplicate``."""
    faults = Faults(tempfail=0.2, drop_mid_data=0.1, drop_after_dot=0.2)
    async with running_sink(faults=faults, seed=11) as sink:
        node = await start_node(make_settings(delivery={
            "enabled": True, "poll_interval": 0.2, "minimal_backoff": 0.1,
            "maximal_backoff": 0.4,
            "routes": [{"domain": "*", "host": "127.0.0.1", "port": sink.port, "tls": "none",
                        "uncertain_mode": "retry"}],
        }))
        try:
            sent = {f"p{n}": await submit(node, f"r{n}@example.com", f"p{n}") for n in range(40)}

            async def settled() -> bool:
                return all([await state(node, m) == "delivered" for m in sent.values()])

            await wait_for(settled, timeout=60)
            marked = {tag: (await store_of(node).deliveries(m))[0].possible_duplicate
                      for tag, m in sent.items()}
            counted = await metric(node.admin_port,
                                   "mta_delivery_possible_duplicates_total"
                                   f'{{destination="route:127.0.0.1:{sink.port}/none"}}')
        finally:
            await node.stop()
    arrivals = {tag: sink.count(f"{tag}@test", f"r{n}@example.com") for n, tag in enumerate(sent)}
    twice = [tag for tag, count in arrivals.items() if count > 1]
    assert twice, "the drops after the dot made some resends arrive twice"
    assert all(count >= 1 for count in arrivals.values()), arrivals
    assert all(marked[tag] for tag in twice), {tag: marked[tag] for tag in twice}
    assert counted >= len(twice)


async def test_a_dead_destination_defers_the_rest_at_once_as_suspended(
    make_settings: Callable[..., Settings],
) -> None:
    """After its window closes, mail for a dead destination is deferred with the failure
    as evidence, without another connection, as Postfix's "delivery temporarily
    suspended"."""
    async with running_sink() as sink:
        closed_port = sink.port
    node = await start_node(make_settings(delivery={
        "enabled": True, "poll_interval": 60.0, "minimal_backoff": 60.0,
        "max_connections_per_destination": 1,
        "routes": [{"domain": "*", "host": "127.0.0.1", "port": closed_port, "tls": "none"}],
    }))
    try:
        first = await submit(node, "a@dead.example", "d0")
        await wait_for(lambda: _is(node, first, "deferred"), timeout=10)
        (evidence,) = await store_of(node).deliveries(first)
        assert "no host accepted a connection" in (evidence.last_reply or "")
        later = await submit(node, "b@dead.example", "d1")
        await wait_for(lambda: _is(node, later, "deferred"), timeout=10)
        (evidence,) = await store_of(node).deliveries(later)
        assert (evidence.last_reply or "").startswith(
            "delivery temporarily suspended: no host accepted a connection"), evidence
    finally:
        await node.stop()


async def test_a_graceful_stop_gives_back_what_has_not_started_unattempted(
    make_settings: Callable[..., Settings],
) -> None:
    """Groups still waiting for a connection when the node stops return to the queue
    at once, unattempted and not counted as in flight at a crash; the one mid-attempt
    keeps its lease and journal record for the next start to settle."""
    async with running_sink(faults=Faults(hang=True), hang_limit=30) as hung:
        node = await start_node(make_settings(smtp={"shutdown_grace": 0.5}, delivery={
            "enabled": True, "poll_interval": 60.0, "max_connections_per_destination": 1,
            "routes": [{"domain": "*", "host": "127.0.0.1", "port": hung.port,
                        "tls": "none"}],
        }))
        stopped = False
        try:
            sent = [await submit(node, f"s{n}@slow.example", f"s{n}") for n in range(3)]
            await hung.wait_for_count(1, timeout=5)
            store = await Store.open(node.settings.database.dsn, node.settings)
            await node.stop()
            stopped = True
            try:
                found = [(await store.deliveries(m))[0] for m in sent]
            finally:
                await store.close()
        finally:
            if not stopped:
                await node.stop()
            hung.release()
    assert sorted(d.state for d in found) == ["leased", "queued", "queued"]
    assert all(d.attempts == 0 for d in found)


async def test_unknown_users_do_not_suspend_their_destination(
    make_settings: Callable[..., Settings], sink: Sink,
) -> None:
    """A 550 5.1.1 is about one recipient, not the destination (DESIGN.md, Destination
    feedback): with a window of one, a run of unknown users still gets each its own
    550, never "delivery temporarily suspended"."""
    sink.faults = Faults(reject={f"gone{n}@example.com": "550 5.1.1 no such user"
                                 for n in range(4)})
    node = await start_node(make_settings(delivery={
        "enabled": True, "poll_interval": 0.2, "max_connections_per_destination": 1,
        "routes": [{"domain": "*", "host": "127.0.0.1", "port": sink.port, "tls": "none"}],
    }))
    try:
        sent = [await submit(node, f"gone{n}@example.com", f"g{n}") for n in range(4)]
        for message_id in sent:
            await wait_for(lambda m=message_id: _is(node, m, "failed"), timeout=10)
            (delivery,) = await store_of(node).deliveries(message_id)
            assert delivery.last_reply_code == 550, delivery.last_reply
    finally:
        await node.stop()
