"""``mta serve`` as operators run it: SIGTERM, a second SIGTERM, and refusals at start."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import asyncpg
import pytest

from mta.queue.ids import parse_queue_id
from tests.support.admin import admin_get
from tests.support.mail import finish_parked, park_in_data, stored_message_ids
from tests.support.nodes import wait_for
from tests.support.process import NodeProcess, run_mta, write_config
from tests.support.smtp import RawSMTP, queue_id_of

GRACE_S = 15.0
IN_FLIGHT_ID = "<in-flight@test.invalid>"


async def wait_not_ready(node: NodeProcess, timeout: float = 10.0) -> None:
    """Wait until ``/readyz`` says 503: the node has stopped accepting."""

    async def not_ready() -> bool:
        return (await admin_get(node.admin_port, "/readyz"))[0] == 503

    await wait_for(not_ready, timeout)


async def assert_new_sessions_refused(port: int) -> None:
    """A new connection is refused, or greeted with 421 4.3.2."""
    try:
        client = await RawSMTP.connect(port)
    except ConnectionError:
        return
    try:
        assert client.greeting.startswith("421 4.3.2"), client.greeting
    finally:
        await client.close()


async def test_sigterm_finishes_data_in_flight_refuses_the_rest_and_exits_zero(
    tmp_path: Path, db_dsn: str
) -> None:
    """DESIGN.md "Shutdown": DATA in progress commits and gets 250; all else gets 421."""
    node = NodeProcess.configure(tmp_path / "node", db_dsn,
                                 smtp={"shutdown_grace": GRACE_S})
    await node.start()
    idle: RawSMTP | None = None
    in_flight: RawSMTP | None = None
    try:
        idle = await RawSMTP.connect(node.smtp_port)
        assert (await idle.cmd("EHLO idle.test")).startswith("250")
        in_flight = await park_in_data(node.smtp_port, IN_FLIGHT_ID)

        loop = asyncio.get_running_loop()
        signalled = loop.time()
        node.signal(signal.SIGTERM)
        await wait_not_ready(node)

        assert (await idle.cmd("NOOP")).startswith("421 4.3.2")
        await assert_new_sessions_refused(node.smtp_port)
        assert node.process is not None and node.process.poll() is None, \
            "the node must wait for the DATA in flight"

        await in_flight.send(finish_parked(IN_FLIGHT_ID))
        reply = await in_flight.reply()
        assert reply.startswith("250 2.0.0"), reply

        assert await node.wait_exit(GRACE_S) == 0
        assert loop.time() - signalled < GRACE_S
        stored = dict(await stored_message_ids(db_dsn))
        assert stored == {parse_queue_id(queue_id_of(reply)): IN_FLIGHT_ID}
    finally:
        for client in (idle, in_flight):
            if client is not None:
                await client.close()
        await node.close()


async def test_sigterm_with_data_stuck_exits_zero_when_the_grace_ends(
    tmp_path: Path, db_dsn: str
) -> None:
    """A DATA that never ends delays exit by the grace period, not longer, and is not stored."""
    grace = 2.0
    node = NodeProcess.configure(tmp_path / "node", db_dsn, smtp={"shutdown_grace": grace})
    await node.start()
    stuck: RawSMTP | None = None
    try:
        stuck = await park_in_data(node.smtp_port, "<stuck@test.invalid>")
        loop = asyncio.get_running_loop()
        signalled = loop.time()
        node.signal(signal.SIGTERM)
        assert await node.wait_exit(grace + 10) == 0
        assert grace * 0.9 <= loop.time() - signalled < grace + 5
        assert node.logged("node.shutdown_grace_expired")
        with pytest.raises(ConnectionError):
            await stuck.reply(timeout=5)
        assert await stored_message_ids(db_dsn) == []
    finally:
        if stuck is not None:
            await stuck.close()
        await node.close()


async def test_second_sigterm_exits_at_once_while_data_is_stuck(
    tmp_path: Path, db_dsn: str
) -> None:
    """A DATA that never ends holds the first SIGTERM's grace; the second ends it now."""
    node = NodeProcess.configure(tmp_path / "node", db_dsn, smtp={"shutdown_grace": 60.0})
    await node.start()
    stuck: RawSMTP | None = None
    try:
        stuck = await park_in_data(node.smtp_port, "<stuck@test.invalid>")
        node.signal(signal.SIGTERM)
        await wait_not_ready(node)
        assert node.process is not None and node.process.poll() is None
        node.signal(signal.SIGTERM)
        await node.wait_exit(5.0)  # any status: the stuck DATA was abandoned
        assert await stored_message_ids(db_dsn) == []
    finally:
        if stuck is not None:
            await stuck.close()
        await node.close()


async def test_serve_refuses_a_budget_over_max_connections(tmp_path: Path, db_dsn: str) -> None:
    """I6: a pool that cannot fit the server is refused at start: exit 2, one line."""
    conn = await asyncpg.connect(db_dsn)
    try:
        max_connections = int(await conn.fetchval("SHOW max_connections"))
    finally:
        await conn.close()
    node = NodeProcess.configure(tmp_path / "node", db_dsn,
                                 node={"workers": max_connections + 1})
    write_config(node.config_path, node.sections)
    result = await run_mta("serve", "--config", str(node.config_path))
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mta: connection budget"), lines
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(("section", "key", "value", "problem"), [
    ("node", "bogus", "1", "unknown key"),
    ("smtp", "max_sessions", '"lots"', "integer"),
    ("database", "acquire_timeout", "-1", "greater than 0"),
])
async def test_serve_refuses_an_invalid_config_naming_the_key(
    tmp_path: Path, section: str, key: str, value: str, problem: str
) -> None:
    """A config error is one line on stderr that names the key; exit 2, no traceback."""
    config = tmp_path / "node.toml"
    config.write_text(f"[{section}]\n{key} = {value}\n", encoding="utf-8")
    result = await run_mta("serve", "--config", str(config))
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{section}.{key}" in lines[0] and problem in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
