"""I3 at the named kill points of the delivery path: a real node process, SIGKILLed by
the fault hook, restarted, and checked against what the sink really received."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mta.config import Settings
from mta.queue import Store
from mta.queue.ids import parse_queue_id
from tests.support.nodes import wait_for
from tests.support.process import NodeProcess
from tests.support.sink import Sink, running_sink
from tests.support.smtp import RawSMTP, queue_id_of

SIGKILL_STATUS = -9


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async with running_sink() as running:
        yield running


def delivering_node(tmp_path: Path, db_dsn: str, sink: Sink) -> NodeProcess:
    return NodeProcess.configure(tmp_path / "node", db_dsn, delivery={
        "enabled": True, "poll_interval": 60.0,
        "routes": [{"domain": "*", "host": "127.0.0.1", "port": sink.port, "tls": "none"}],
    })


async def submit(port: int, tag: str) -> uuid.UUID:
    client = await RawSMTP.connect(port)
    await client.cmd("EHLO client.test")
    reply = await client.submit("app@example.org", ["user@example.com"],
                                f"Message-ID: <{tag}@test>\r\n\r\nbody\r\n".encode())
    await client.close()
    return parse_queue_id(queue_id_of(reply))


async def state_of(db_dsn: str, settings: Settings, message_id: uuid.UUID) -> str:
    store = await Store.open(db_dsn, settings)
    try:
        (delivery,) = await store.deliveries(message_id)
        return delivery.state
    finally:
        await store.close()


async def kill_at(node: NodeProcess, point: str, after: int) -> None:
    node.env = {"MTA_FAULT_HOOKS": "1", "MTA_FAULT_KILL_AT": point,
                "MTA_FAULT_KILL_AFTER": str(after)}
    await node.start()


async def test_kill_after_attempt_started_leaves_the_delivery_uncertain_and_unsent(
    tmp_path: Path, db_dsn: str, sink: Sink, make_settings: object
) -> None:
    """The attempt was journaled, then the process died before DATA: the store cannot
    know, so the delivery is uncertain, and it is never resent by itself."""
    node = delivering_node(tmp_path, db_dsn, sink)
    settings = make_settings()  # type: ignore[operator]
    await kill_at(node, "journal.after_append", after=1)
    try:
        message_id = await submit(node.smtp_port, "crash1")
        assert await node.wait_exit(15) == SIGKILL_STATUS
        assert await state_of(db_dsn, settings, message_id) == "leased", \
            "the kill came with the delivery in flight"
        node.env = {}
        await node.start()
        await wait_for(lambda: _is(db_dsn, settings, message_id, "uncertain"), timeout=15)
        # Another message is delivered after the restart; the uncertain one stays unsent.
        later = await submit(node.smtp_port, "after")
        await wait_for(lambda: _is(db_dsn, settings, later, "delivered"), timeout=15)
        assert sink.count("crash1@test", "user@example.com") == 0
        assert await state_of(db_dsn, settings, message_id) == "uncertain"
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
        message_id = await submit(node.smtp_port, "crash2")
        assert await node.wait_exit(15) == SIGKILL_STATUS
        assert sink.count("crash2@test", "user@example.com") == 1
        assert await state_of(db_dsn, settings, message_id) == "leased"
        node.env = {}
        await node.start()
        await wait_for(lambda: _is(db_dsn, settings, message_id, "delivered"), timeout=15)
        assert sink.count("crash2@test", "user@example.com") == 1
    finally:
        await node.close()


async def _is(db_dsn: str, settings: Settings, message_id: uuid.UUID, state: str) -> bool:
    return await state_of(db_dsn, settings, message_id) == state
