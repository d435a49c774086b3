"""I1, I6, I7 when the store is gone or busy: 451 in bounded time, health from memory."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from mta.config import Settings
from mta.queue import EmbeddedPostgres
from tests.support.admin import admin_get, healthz, metric
from tests.support.mail import finish_parked, park_in_data
from tests.support.nodes import start_node, wait_for
from tests.support.pg import DATABASE, own_postgres, signal_server
from tests.support.smtp import RawSMTP

ACQUIRE_S = 2.0
COMMIT_S = 2.0
#: Scheduling slack on a loaded CI machine, on top of the configured timeouts.
MARGIN_S = 1.5
BOUND_S = ACQUIRE_S + COMMIT_S + MARGIN_S
STORE_UNAVAILABLE = "451 4.3.0"
BODY = b"Subject: outage\r\n\r\nhello\r\n"


async def timed_submit(client: RawSMTP) -> tuple[str, float]:
    """Submit one message; returns the final reply and seconds from DATA's end to it."""
    assert (await client.cmd("MAIL FROM:<a@example.org>")).startswith("250")
    assert (await client.cmd("RCPT TO:<b@example.com>")).startswith("250")
    assert (await client.cmd("DATA")).startswith("354")
    return await timed_reply(client, BODY + b".\r\n")


async def timed_reply(client: RawSMTP, data: bytes) -> tuple[str, float]:
    """Send the rest of a DATA phase; returns the reply and how long it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    await client.send(data)
    reply = await client.reply(timeout=BOUND_S + 10)
    return reply, loop.time() - started


async def accepted_again(client: RawSMTP) -> bool:
    """True when a submission on ``client`` gets a 250."""
    reply, _ = await timed_submit(client)
    assert reply.startswith(("250 2.0.0", STORE_UNAVAILABLE)), reply
    return reply.startswith("250")


#: How each outage is caused and undone.
ServerAction = Callable[[EmbeddedPostgres], object]
OUTAGES: dict[str, tuple[ServerAction, ServerAction]] = {
    "stopped": (EmbeddedPostgres.stop, EmbeddedPostgres.start),
    "killed": (EmbeddedPostgres.kill, EmbeddedPostgres.start),
    "frozen": (lambda server: signal_server(server, signal.SIGSTOP),
               lambda server: signal_server(server, signal.SIGCONT)),
}


@pytest.mark.parametrize("outage", sorted(OUTAGES))
async def test_store_outage_answers_451_in_time_and_recovers_without_restart(
    outage: str, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """Database stopped, killed or frozen: 451 4.3.0 within the timeouts, never 250 or a hang.

    The admin endpoints keep answering from memory and report the store down; when the
    server is back, intake accepts again without a node restart.
    """
    cause, undo = OUTAGES[outage]
    async with own_postgres(tmp_path / "pg") as server:
        settings = make_settings(database={
            "dsn": server.dsn_for(DATABASE), "acquire_timeout": ACQUIRE_S,
            "commit_timeout": COMMIT_S, "connect_timeout": ACQUIRE_S,
        })
        handle = await start_node(settings)
        client = await RawSMTP.connect(handle.port)
        parked: RawSMTP | None = None
        try:
            await client.cmd("EHLO client.test")
            assert (await timed_submit(client))[0].startswith("250 2.0.0")
            assert (await healthz(handle.admin_port))["store_up"] is True
            parked = await park_in_data(handle.port, "<outage@test.invalid>")

            await asyncio.to_thread(cause, server)

            # The DATA that was in flight when the store went away. A slot and a pooled
            # connection are free, so only the commit can wait: at most commit_timeout.
            reply, elapsed = await timed_reply(parked, finish_parked("<outage@test.invalid>"))
            assert reply.startswith(STORE_UNAVAILABLE), reply
            assert elapsed < COMMIT_S + MARGIN_S, f"451 after {elapsed:.1f}s"
            # A transaction that starts while the store is away.
            reply, elapsed = await timed_submit(client)
            assert reply.startswith(STORE_UNAVAILABLE), reply
            assert elapsed < BOUND_S, f"451 after {elapsed:.1f}s"

            async def reported_down() -> bool:
                return (await healthz(handle.admin_port))["store_up"] is False

            await wait_for(reported_down, timeout=BOUND_S + 5)
            assert await metric(handle.admin_port, "mta_store_up") == 0
            assert (await admin_get(handle.admin_port, "/readyz"))[0] == 503

            await asyncio.to_thread(undo, server)

            await wait_for(lambda: accepted_again(client), timeout=30, interval=0.2)

            async def reported_up() -> bool:
                return (await healthz(handle.admin_port))["store_up"] is True

            await wait_for(reported_up, timeout=10)
            assert await metric(handle.admin_port, "mta_store_up") == 1
            assert (await admin_get(handle.admin_port, "/readyz"))[0] == 200
        finally:
            signal_server(server, signal.SIGCONT)
            for session in (client, parked):
                if session is not None:
                    await session.close()
            await handle.stop()


async def test_saturated_intake_slots_answer_451_then_recover(
    make_settings: Callable[..., Settings]
) -> None:
    """All ``intake_db_slots`` held: a new message waits ``acquire_timeout``, then 451."""
    handle = await start_node(make_settings(database={"acquire_timeout": ACQUIRE_S}))
    store = handle.node.store
    assert store is not None
    client = await RawSMTP.connect(handle.port)
    try:
        await client.cmd("EHLO client.test")
        async with contextlib.AsyncExitStack() as held:
            for _ in range(handle.settings.node.intake_db_slots):
                await held.enter_async_context(store.intake_slot())
            reply, elapsed = await timed_submit(client)
            assert reply.startswith(STORE_UNAVAILABLE), reply
            assert ACQUIRE_S * 0.9 <= elapsed < ACQUIRE_S + MARGIN_S, elapsed
            assert await store.message_count() == 0
        reply, _ = await timed_submit(client)
        assert reply.startswith("250 2.0.0"), reply
        assert await store.message_count() == 1
    finally:
        await client.close()
        await handle.stop()
