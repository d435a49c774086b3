"""I3 at the named kill points of the delivery path: a real node process, SIGKILLed by
the fault hook, restarted, and checked against what the sink really received."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from mta.config import Settings
from mta.queue import Store
from tests.support.delivery import state_of, submit_tagged
from tests.support.nodes import wait_for
from tests.support.process import NodeProcess, run_mta
from tests.support.sink import Faults, Sink

SIGKILL_STATUS = -9


def delivering_node(tmp_path: Path, db_dsn: str, sink: Sink) -> NodeProcess:
    return NodeProcess.configure(tmp_path / "node", db_dsn, delivery={
        "enabled": True, "poll_interval": 60.0,
        "routes": [{"domain": "*", "host": "127.0.0.1", "port": sink.port, "tls": "none"}],
    })


async def kill_at(node: NodeProcess, point: str, after: int) -> None:
    node.env = {"MTA_FAULT_HOOKS": "1", "MTA_FAULT_KILL_AT": point,
                "MTA_FAULT_KILL_AFTER": str(after)}
    await node.start()


async def test_kill_with_the_dot_pending_leaves_the_delivery_uncertain_and_unsent(
    tmp_path: Path, db_dsn: str, sink: Sink, make_settings: object
) -> None:
    """"Dot pending" was journaled, then the process died before the dot: the store
    cannot know, so the delivery is uncertain, and it is never resent by itself."""
    node = delivering_node(tmp_path, db_dsn, sink)
    settings = make_settings()  # type: ignore[operator]
    await kill_at(node, "journal.after_append", after=1)
    try:
        message_id = await submit_tagged(node.smtp_port, "crash1")
        assert await node.wait_exit(15) == SIGKILL_STATUS
        assert await state_of(db_dsn, settings, message_id) == "leased", \
            "the kill came with the delivery in flight"
        node.env = {}
        await node.start()
        await wait_for(lambda: _is(db_dsn, settings, message_id, "uncertain"), timeout=15)
        # Another message is delivered after the restart; the uncertain one stays unsent.
        later = await submit_tagged(node.smtp_port, "after")
        await wait_for(lambda: _is(db_dsn, settings, later, "delivered"), timeout=15)
        assert sink.count("crash1@test", "user@example.com") == 0
        assert await state_of(db_dsn, settings, message_id) == "uncertain"
        shown = await run_mta("queue", "uncertain", "--json", "--config",
                              str(node.config_path))
        (row,) = json.loads(shown.stdout)["deliveries"]
        assert row["evidence"]["dot_at"] != "-", "the replay keeps the dot's time"
        assert row["evidence"]["reply_lost_after"] == "never answered (the process stopped)"
    finally:
        await node.close()


async def test_kill_after_the_reply_is_journaled_applies_it_at_restart_without_resending(
    tmp_path: Path, db_dsn: str, sink: Sink, make_settings: object
) -> None:
    """The 250 was journaled, then the process died before the store update: the replay
    records it as delivered, and the sink holds exactly one copy."""
    node = delivering_node(tmp_path, db_dsn, sink)
    settings = make_settings()  # type: ignore[operator]
    await kill_at(node, "journal.after_append", after=2)
    try:
        message_id = await submit_tagged(node.smtp_port, "crash2")
        assert await node.wait_exit(15) == SIGKILL_STATUS
        assert sink.count("crash2@test", "user@example.com") == 1
        assert await state_of(db_dsn, settings, message_id) == "leased"
        node.env = {}
        await node.start()
        await wait_for(lambda: _is(db_dsn, settings, message_id, "delivered"), timeout=15)
        assert sink.count("crash2@test", "user@example.com") == 1
    finally:
        await node.close()


async def test_kill_after_a_5xx_is_journaled_fails_it_at_restart_with_exactly_one_dsn(
    tmp_path: Path, db_dsn: str, sink: Sink, make_settings: object
) -> None:
    """The 554 to the dot was journaled, then the process died before the store update:
    the replay records the failure and queues its DSN with it; the sender hears once."""
    sink.faults = Faults(data_reply="554 5.6.0 content rejected")
    node = delivering_node(tmp_path, db_dsn, sink)
    settings = make_settings()  # type: ignore[operator]
    await kill_at(node, "journal.after_append", after=2)
    try:
        message_id = await submit_tagged(node.smtp_port, "crash5xx")
        assert await node.wait_exit(15) == SIGKILL_STATUS
        assert await state_of(db_dsn, settings, message_id) == "leased"
        assert [t.reply for t in sink.transactions] == ["554 5.6.0 content rejected"]
        sink.faults = Faults()  # the DSN is accepted
        node.env = {}
        await node.start()
        await wait_for(lambda: _is(db_dsn, settings, message_id, "failed"), timeout=15)

        def dsns() -> list[str]:
            return [rcpt for t in sink.transactions if t.mail_from == "" and t.received
                    for rcpt in t.recipients]

        await wait_for(lambda: dsns() == ["app@example.org"], timeout=15)
        await node.wait_logged("delivery.recovered")
        store = await Store.open(db_dsn, settings)
        try:
            assert await store.message_count() == 2, "the message and one DSN"
        finally:
            await store.close()
    finally:
        await node.close()


async def _is(db_dsn: str, settings: Settings, message_id: uuid.UUID, state: str) -> bool:
    return await state_of(db_dsn, settings, message_id) == state


async def test_a_message_that_kills_the_node_each_time_is_held_and_the_rest_delivered(
    tmp_path: Path, db_dsn: str, sink: Sink, make_settings: object
) -> None:
    """The second seed report: a node must not stay down on the same work. After three
    deaths with the poison message in flight it is held ('crash-loop'), and mail flows."""
    node = delivering_node(tmp_path, db_dsn, sink)
    node.sections["node"]["workers"] = 1
    node.sections["delivery"]["batch_size"] = 1
    settings = make_settings()  # type: ignore[operator]
    node.env = {"MTA_FAULT_HOOKS": "1", "MTA_FAULT_KILL_AT": "delivery.start:<poison@test>"}
    await node.start()
    try:
        before = [await submit_tagged(node.smtp_port, f"good{n}") for n in range(3)]
        for message_id in before:
            await wait_for(lambda m=message_id: _is(db_dsn, settings, m, "delivered"), 15)
        poison = await submit_tagged(node.smtp_port, "poison")
        deaths = 0
        for _ in range(3):
            assert await node.wait_exit(20) == SIGKILL_STATUS
            deaths += 1
            await node.start()
        assert deaths == 3
        await wait_for(lambda: _is(db_dsn, settings, poison, "held"), timeout=15)
        after = [await submit_tagged(node.smtp_port, f"later{n}") for n in range(2)]
        for message_id in after:
            await wait_for(lambda m=message_id: _is(db_dsn, settings, m, "delivered"), 15)
        assert node.process is not None and node.process.poll() is None, "the node stays up"
        for tag in ("good0", "good1", "good2", "later0", "later1"):
            assert sink.count(f"{tag}@test", "user@example.com") == 1, tag
        assert sink.count("poison@test", "user@example.com") == 0
        store = await Store.open(db_dsn, settings)
        try:
            (held,) = await store.deliveries_in_state("held")
            events = await store.delivery_events(held.id)
        finally:
            await store.close()
        assert held.hold_reason == "crash-loop"
        assert events[-1].detail.startswith("crash-loop: 3 deaths")
    finally:
        await node.close()


async def test_a_retry_route_resends_after_a_crash_with_the_dot_pending_marked(
    tmp_path: Path, db_dsn: str, sink: Sink, make_settings: object
) -> None:
    """``uncertain_mode = "retry"`` holds after a crash too: the replay resends the
    delivery with its dot pending and marks it ``possible_duplicate``, no operator
    needed."""
    node = NodeProcess.configure(tmp_path / "node", db_dsn, delivery={
        "enabled": True, "poll_interval": 0.5, "minimal_backoff": 0.5,
        "maximal_backoff": 1.0,
        "routes": [{"domain": "*", "host": "127.0.0.1", "port": sink.port, "tls": "none",
                    "uncertain_mode": "retry"}],
    })
    settings = make_settings()  # type: ignore[operator]
    await kill_at(node, "journal.after_append", after=1)
    try:
        message_id = await submit_tagged(node.smtp_port, "retry1")
        assert await node.wait_exit(15) == SIGKILL_STATUS
        assert await state_of(db_dsn, settings, message_id) == "leased"
        node.env = {}
        await node.start()
        await wait_for(lambda: _is(db_dsn, settings, message_id, "delivered"), timeout=15)
        store = await Store.open(db_dsn, settings)
        try:
            (delivery,) = await store.deliveries(message_id)
        finally:
            await store.close()
        assert delivery.possible_duplicate
        assert sink.count("retry1@test", "user@example.com") == 1
    finally:
        await node.close()
