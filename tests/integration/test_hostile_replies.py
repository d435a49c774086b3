"""I3b: one odd reply costs one delivery, never the node. Real node processes against a
real peer whose replies hold any bytes; each case restarts the node (replaying its
journal where the reply was journaled) and checks that it serves, that the delivery is
settled with its evidence escaped (``mta queue show``), and that new mail still flows."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from mta.config import Settings
from mta.queue.ids import queue_id
from tests.support.bad_peer import BadPeer, running_bad_peer
from tests.support.delivery import state_of, submit_tagged
from tests.support.nodes import free_port, wait_for
from tests.support.process import NodeProcess, run_mta
from tests.support.sink import Sink

PIPELINING_EHLO = "250-bad.peer.test\r\n250 PIPELINING"
MULTILINE_10KB = b"\r\n".join(b"550-5.1.1 line %03d " % n + b"x" * 90 for n in range(100)) \
    + b"\r\n550 5.1.1 end"
#: The reply, and what ``mta queue show`` must show of it.
HOSTILE = {
    "invalid-utf8": (b"550 5.1.1 caf\xe9 is not here", ": 550 5.1.1 caf\\xe9 is not here ("),
    "nul": (b"550 5.1.1 no\x00such user", ": 550 5.1.1 no\\x00such user ("),
    "10kb-multiline": (MULTILINE_10KB, "more characters cut] (550 reply"),
    "no-text": (b"550", ": 550 (550 reply"),
    "cr-inside": (b"550 5.1.1 one\rtwo", ": 550 5.1.1 one\\rtwo ("),
}


def node_for(tmp_path: Path, db_dsn: str, peer_port: int, sink: Sink) -> NodeProcess:
    return NodeProcess.configure(tmp_path / "node", db_dsn, delivery={
        "enabled": True, "poll_interval": 60.0,
        "routes": [
            {"domain": "bad.example", "host": "127.0.0.1", "port": peer_port, "tls": "none"},
            {"domain": "*", "host": "127.0.0.1", "port": sink.port, "tls": "none"},
        ],
    })


async def assert_recovered(node: NodeProcess, db_dsn: str, settings: Settings,
                           message_id: uuid.UUID, shown: str, sink: Sink) -> None:
    """The node serves, the delivery is failed with its evidence escaped, and new mail
    to a healthy route is delivered."""
    await wait_for(lambda: _is(db_dsn, settings, message_id, "failed"), timeout=15)
    show = await run_mta("queue", "show", queue_id(message_id), "--config",
                         str(node.config_path))
    assert show.returncode == 0, show.stderr
    assert shown in show.stdout, show.stdout
    assert "Traceback" not in show.stdout + show.stderr
    fresh = await submit_tagged(node.smtp_port, "fresh", recipients=["user@fine.example"])
    await wait_for(lambda: _is(db_dsn, settings, fresh, "delivered"), timeout=15)
    assert sink.count("fresh@test", "user@fine.example") == 1
    assert not node.logged("delivery.store_unavailable")


async def _is(db_dsn: str, settings: Settings, message_id: uuid.UUID, state: str) -> bool:
    return await state_of(db_dsn, settings, message_id) == state


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_an_odd_reply_to_the_dot_is_replayed_escaped_and_the_node_serves(
    tmp_path: Path, db_dsn: str, sink: Sink, make_settings: Callable[..., Settings],
    case: str,
) -> None:
    """Killed right after the reply was journaled: the restart replays it."""
    reply, shown = HOSTILE[case]
    peer = BadPeer(replies={"EHLO": PIPELINING_EHLO, "DATA": "354 go ahead", ".": reply})
    port = free_port()
    async with running_bad_peer(peer, "127.0.0.1", port):
        node = node_for(tmp_path, db_dsn, port, sink)
        node.env = {"MTA_FAULT_HOOKS": "1", "MTA_FAULT_KILL_AT": "delivery.after_reply_journaled",
                    "MTA_FAULT_KILL_AFTER": "1"}
        await node.start()
        try:
            message_id = await submit_tagged(node.smtp_port, case, recipients=["u@bad.example"])
            assert await node.wait_exit(15) == -signal.SIGKILL
            assert peer.contents == 1, "the content reached the peer before the kill"
            node.env = {}
            await node.start()
            await assert_recovered(node, db_dsn, make_settings(), message_id, shown, sink)
        finally:
            await node.close()


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_an_odd_reply_to_rcpt_is_settled_escaped_and_the_node_serves_after_a_restart(
    tmp_path: Path, db_dsn: str, sink: Sink, make_settings: Callable[..., Settings],
    case: str,
) -> None:
    reply, shown = HOSTILE[case]
    peer = BadPeer(replies={"EHLO": PIPELINING_EHLO, "RCPT": reply,
                            "DATA": "554 5.5.1 no valid recipients"})
    port = free_port()
    async with running_bad_peer(peer, "127.0.0.1", port):
        node = node_for(tmp_path, db_dsn, port, sink)
        await node.start()
        try:
            message_id = await submit_tagged(node.smtp_port, case, recipients=["u@bad.example"])
            await wait_for(lambda: _is(db_dsn, make_settings(), message_id, "failed"),
                           timeout=15)
            node.signal(signal.SIGTERM)
            assert await node.wait_exit(15) == 0
            await node.start()
            await assert_recovered(node, db_dsn, make_settings(), message_id, shown, sink)
        finally:
            await node.close()
