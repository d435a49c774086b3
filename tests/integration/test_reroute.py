"""Reroute is a handoff with receipts (DESIGN.md; I9): the pending mail of an isolated or
draining node moves to active nodes exactly once, also when a run is killed between the
copy and the receipt, and a second run moves nothing."""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import asyncpg

from mta.queue import Store
from mta.queue.ids import queue_id
from tests.support.admin import admin_get
from tests.support.fleet import FleetUnderTest, enqueue_tagged
from tests.support.nodes import free_port, wait_for
from tests.support.process import run_mta
from tests.support.sink import Faults, Sink, normalize_id, running_sink

KILL_HALFWAY = {"MTA_FAULT_HOOKS": "1", "MTA_FAULT_KILL_AT": "reroute.after_target_insert",
                "MTA_FAULT_KILL_AFTER": "4"}


def arrivals(sink: Sink) -> Counter[tuple[str, str]]:
    """(Message-ID, recipient) of every transaction the sink received."""
    return Counter((normalize_id(t.message_id or ""), rcpt)
                   for t in sink.transactions if t.received for rcpt in t.recipients)


async def test_an_isolated_backlog_moves_exactly_once_through_a_killed_run_and_a_rerun(
    tmp_path: Path, new_database: Callable[[], str], sink: Sink,
) -> None:
    closed = free_port()
    fleet = FleetUnderTest.create(tmp_path, new_database, {"a": closed, "b": sink.port,
                                                      "c": sink.port})
    store = await Store.open(fleet.dsns["a"], fleet.settings("a"))
    try:
        tags = [f"m{n}" for n in range(1000)]
        await enqueue_tagged(store, tags[:500])
        await enqueue_tagged(store, tags[500:], recipients=("one@example.com",
                                                            "two@example.net"))
        conn = await asyncpg.connect(fleet.dsns["a"])
        try:  # half of it as A's failed attempts would leave it: deferred, not due soon
            await conn.execute("UPDATE deliveries SET state = 'deferred', attempts = 3, "
                               "next_attempt_at = now() + interval '1 hour', "
                               "last_reply = '421 busy' WHERE id % 2 = 0")
        finally:
            await conn.close()
        expected = {(f"{t}@fleet.test", "user@example.com") for t in tags[:500]} | {
            (f"{t}@fleet.test", rcpt) for t in tags[500:]
            for rcpt in ("one@example.com", "two@example.net")}
        assert len(expected) == 1500
        await store.set_node_mode("a", "isolated", "seed 1 drill", "alice")
        await fleet.start("b", "c")  # A's daemon stays down: reroute reads only its store

        killed = await fleet.fleet("reroute", "a", "--batch", "100", env=KILL_HALFWAY)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        half = await store.queue_stats()
        assert 0 < half.by_state["queued"] + half.by_state["deferred"] < 1500

        again = await fleet.fleet("reroute", "a", "--to", "b", "--to", "c", "--json")
        assert again.returncode == 0, again.stderr
        report = json.loads(again.stdout)
        assert report["already_moved"] > 0, "the killed run's copies were found, not redone"
        assert set(report["moved"]) <= {"b", "c"}

        await wait_for(lambda: sum(arrivals(sink).values()) >= 1500, timeout=60)
        assert set(arrivals(sink)) == expected
        assert max(arrivals(sink).values()) == 1, "nothing arrived twice"

        third = await fleet.fleet("reroute", "a", "--json")
        assert third.returncode == 0, third.stderr
        assert json.loads(third.stdout)["moved_total"] == 0
        assert json.loads(third.stdout)["already_moved"] == 0
        stats = await store.queue_stats()
        assert stats.by_state == {"queued": 0, "deferred": 0, "leased": 0, "uncertain": 0,
                                  "held": 0}
        shown = await fleet.fleet("status", "--json")
        assert shown.returncode == 0, shown.stderr
    finally:
        await store.close()
        await fleet.close()


async def test_a_receipt_names_the_copy_and_the_copy_names_its_origin(
    tmp_path: Path, new_database: Callable[[], str], sink: Sink,
) -> None:
    fleet = FleetUnderTest.create(tmp_path, new_database, {"a": free_port(), "b": sink.port})
    source = await Store.open(fleet.dsns["a"], fleet.settings("a"))
    target = await Store.open(fleet.dsns["b"], fleet.settings("b"))
    try:
        await enqueue_tagged(source, ["one"])
        (listing,) = await source.deliveries_in_state("queued")
        await source.set_node_mode("a", "draining", "decommission", "alice")
        await fleet.start("b")
        result = await fleet.fleet("reroute", "a")
        assert result.returncode == 0, result.stderr
        (moved,) = await source.deliveries(listing.message_id)
        assert moved.state == "rerouted" and moved.reroute_target == "b"
        assert moved.rerouted_to_message is not None
        copy = await target.message(moved.rerouted_to_message)
        assert copy is not None
        assert (copy.origin_node, copy.origin_message) == ("a", listing.message_id)
        original = await source.message(listing.message_id)
        assert original is not None and original.done_at is not None
        assert copy.received_at == original.received_at, "its lifetime does not restart"
        assert (await source.queue_stats()).rerouted_out_last_minute == 1
        assert (await target.queue_stats()).rerouted_in_last_minute == 1
        assert (await source.queue_stats()).rerouted_in_last_minute == 0

        async def counted_in_on_b() -> bool:  # the running target node exports it
            _, text = await admin_get(fleet.nodes["b"].admin_port, "/metrics")
            return 'mta_queue_rerouted_last_minute_deliveries{direction="in"} 1.0' in text

        await wait_for(counted_in_on_b, timeout=20)

        on_source = await run_mta("queue", "show", queue_id(listing.message_id), "--config",
                                  str(fleet.nodes["a"].config_path))
        assert f"rerouted to b as {queue_id(copy.id)}" in on_source.stdout, on_source
        on_target = await run_mta("queue", "show", queue_id(copy.id), "--config",
                                  str(fleet.nodes["b"].config_path))
        assert f"rerouted from a ({queue_id(listing.message_id)})" in on_target.stdout, \
            on_target
        (record,) = [r for r in await source.audit_records() if r.action == "reroute"]
        assert record.counts["moved"] == 1
    finally:
        await source.close()
        await target.close()
        await fleet.close()


async def test_reroute_refuses_an_active_source_and_leaves_what_it_must_not_move(
    tmp_path: Path, new_database: Callable[[], str], sink: Sink,
) -> None:
    fleet = FleetUnderTest.create(tmp_path, new_database, {"a": free_port(), "b": sink.port})
    store = await Store.open(fleet.dsns["a"], fleet.settings("a"))
    try:
        await enqueue_tagged(store, [f"s{n}" for n in range(6)])
        await fleet.start("b")
        refused = await fleet.fleet("reroute", "a")
        assert refused.returncode == 1
        assert "a is active" in refused.stderr
        assert len(await store.deliveries_in_state("queued")) == 6

        ids = [d.id for d in await store.deliveries_in_state("queued")]
        conn = await asyncpg.connect(fleet.dsns["a"])
        try:
            await conn.execute("UPDATE deliveries SET state = 'uncertain' WHERE id = $1", ids[0])
            await conn.execute("UPDATE deliveries SET state = 'leased', lease_owner = 'a-1-1', "
                               "lease_expires_at = now() + interval '1 hour' WHERE id = $1",
                               ids[1])
        finally:
            await conn.close()
        await store.hold([ids[2]], "alice", "looks like spam")
        await store.set_node_mode("a", "isolated", "drill", "alice")
        dry = await fleet.fleet("reroute", "a", "--dry-run", "--json")
        assert dry.returncode == 0, dry.stderr
        assert sum(g["count"] for g in json.loads(dry.stdout)["would_move"]) == 3
        assert len(await store.deliveries_in_state("queued")) == 3, "a dry run moves nothing"

        result = await fleet.fleet("reroute", "a", "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["moved_total"] == 3
        assert report["skipped"] == {"leased": 1, "uncertain": 1, "held": 1, "in_handoff": 0}
        await wait_for(lambda: len(sink.transactions) >= 3, timeout=30)
    finally:
        await store.close()
        await fleet.close()


async def test_reroute_off_a_draining_node_that_is_still_delivering_sends_each_once(
    tmp_path: Path, new_database: Callable[[], str], sink: Sink,
) -> None:
    async with running_sink(faults=Faults(hang=True)) as slow:
        fleet = FleetUnderTest.create(tmp_path, new_database, {"a": slow.port, "b": sink.port,
                                                               "c": sink.port})
        store = await Store.open(fleet.dsns["a"], fleet.settings("a"))
        try:
            tags = [f"d{n}" for n in range(300)]
            await enqueue_tagged(store, tags)
            await fleet.start()
            drained = await fleet.fleet("drain", "a", "--reason", "move its backlog")
            assert drained.returncode == 0, drained.stderr
            # A's workers are in the middle of sends (their final dots unanswered).
            await wait_for(lambda: len(slow.transactions) >= 1, timeout=20)
            result = await fleet.fleet("reroute", "a", "--batch", "50", "--json")
            assert result.returncode == 0, result.stderr
            in_flight = json.loads(result.stdout)["skipped"]["leased"]
            assert in_flight >= 1, "the sends in flight stayed with A"
            slow.release()
            both = lambda: arrivals(slow) + arrivals(sink)  # noqa: E731
            await wait_for(lambda: sum(both().values()) >= 300, timeout=60)
            assert set(both()) == {(f"{t}@fleet.test", "user@example.com") for t in tags}
            assert max(both().values()) == 1
            assert sum(arrivals(slow).values()) == in_flight
        finally:
            await store.close()
            await fleet.close()


async def test_a_target_at_its_admission_limit_or_on_an_old_schema_is_skipped(
    tmp_path: Path, new_database: Callable[[], str], sink: Sink,
) -> None:
    fleet = FleetUnderTest.create(tmp_path, new_database, {"a": free_port(), "b": sink.port,
                                                           "c": sink.port, "d": sink.port})
    fleet.nodes["c"].sections["admission"]["max_queued_bytes"] = 800
    fleet.nodes["c"].write_config()
    store = await Store.open(fleet.dsns["a"], fleet.settings("a"))
    try:
        await enqueue_tagged(store, [f"q{n}" for n in range(40)])
        conn = await asyncpg.connect(fleet.dsns["d"])
        try:
            await conn.execute("DELETE FROM schema_migrations WHERE version = 11")
        finally:
            await conn.close()
        await store.set_node_mode("a", "isolated", "drill", "alice")
        await fleet.start("b", "c")
        result = await fleet.fleet("reroute", "a", "--batch", "5", "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert "admission limit" in report["targets_skipped"].get("c", ""), report
        assert "lacks migrations [11]" in report["targets_skipped"]["d"]
        assert report["moved"]["b"] + report["moved"].get("c", 0) == 40
        assert report["moved"]["b"] > report["moved"].get("c", 0)
        await wait_for(lambda: len(arrivals(sink)) >= 40, timeout=30)
        assert max(arrivals(sink).values()) == 1
    finally:
        await store.close()
        await fleet.close()
